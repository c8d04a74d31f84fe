"""Pub/Sub messages on_edit accepts, and where the bad ones go.

- PCG edit message: attributes ``table_id`` (+ user_id, remesh ...), data =
  ``pickle.dumps({"operation_id", "new_lvl2_ids", ...})``, decoded with the
  restricted unpickler (never plain ``pickle.loads``).
- missing-id message (from the lookup): raw little-endian uint64 data, attributes
  ``table_id`` and ``l2_cache_id``.

A message that cannot be decoded or names an unknown dataset is published to the
dead-letter topic with the reason and acknowledged: it would fail the same way on
every redelivery, so retrying it would only be a crash loop. Transient failures
raise, the function answers 5xx, and Pub/Sub redelivers (its own dead-letter policy
caps the attempts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from .config import L2CacheConfig, UnknownDatasetError
from .lineage import utc_now
from .pipeline import compute_l2_ids, dataset_context
from .runs import new_run
from .safe_pickle import UnsafePickleError, restricted_loads

log = logging.getLogger(__name__)


class PoisonMessage(ValueError):
    """Can never succeed: goes to the dead-letter topic with this reason."""


@dataclass(frozen=True)
class RecomputeRequest:
    dataset: str
    l2ids: np.ndarray
    kind: str  # "edit" | "missing_ids"
    operation_id: int | None = None


def decode_message(data: bytes, attributes: dict[str, str]) -> RecomputeRequest:
    table_id = attributes.get("table_id")
    if not table_id:
        raise PoisonMessage("message has no table_id attribute")
    if "l2_cache_id" in attributes:
        if len(data) % 8:
            raise PoisonMessage(f"missing-id data of {len(data)} bytes is not uint64 ids")
        ids = np.frombuffer(data, dtype="<u8").astype(np.uint64)
        return RecomputeRequest(table_id, ids, "missing_ids")
    try:
        payload = restricted_loads(data)
    except UnsafePickleError as exc:
        raise PoisonMessage(f"edit message rejected: {exc}") from None
    if not isinstance(payload, dict) or "new_lvl2_ids" not in payload:
        raise PoisonMessage("edit message has no new_lvl2_ids")
    try:
        ids = np.asarray(payload["new_lvl2_ids"], dtype=np.uint64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PoisonMessage(f"new_lvl2_ids are not uint64 ids: {exc}") from None
    op = payload.get("operation_id")
    return RecomputeRequest(table_id, ids, "edit", int(op) if isinstance(op, int) else None)


def handle_message(
    config: L2CacheConfig,
    data: bytes,
    attributes: dict[str, str],
    message_id: str,
    dead_letter=None,
    now: datetime | None = None,
) -> dict:
    """Recompute what a message asks for; poison goes to ``dead_letter(data, attrs)``."""
    try:
        request = decode_message(data, attributes)
        try:
            ctx = dataset_context(config, request.dataset)
        except UnknownDatasetError as exc:
            raise PoisonMessage(str(exc)) from None
        if request.l2ids.size == 0:
            raise PoisonMessage("message names no L2 ids")
    except PoisonMessage as exc:
        log.warning("dead-lettering message %s: %s", message_id, exc)
        if dead_letter is not None:
            dead_letter(
                data,
                {
                    **attributes,
                    "dead_letter_reason": str(exc)[:1000],
                    "original_message_id": message_id,
                },
            )
        return {"status": "dead_lettered", "reason": str(exc)}
    now = now or utc_now()
    kind = "edit_stream" if request.kind == "edit" else "missing_ids"
    run = ctx.ledger.ensure_run(_stream_run(kind, ctx.dataset))
    result = compute_l2_ids(ctx, request.l2ids, now, run, cell_timestamp=now)
    ctx.ledger.record_event(
        run.run_id,
        message_id,
        kind=request.kind,
        operation_id=request.operation_id,
        ids=len(request.l2ids),
        written=result["written"],
        chunks_read=result["chunks_read"],
        not_found=len(result["not_found"]),
        at=now.isoformat(),
    )
    return {"status": "ok", **result}


def _stream_run(kind: str, dataset):
    """One long-lived run per dataset and stream kind; each cell carries its own time."""
    run = new_run(kind, dataset, trigger="pubsub")
    run.run_id = f"{kind}-{dataset.name}"
    return run
