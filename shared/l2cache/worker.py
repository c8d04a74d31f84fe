"""The compute_chunk task handler: split a region or compute a batch of chunks.

Task body (JSON)::

    {"dataset": "...", "run_id": "...", "region": [x0, y0, z0, x1, y1, z1], "batch": 4}

A region with more than ``batch`` chunks is split and a task per part is enqueued; a
smaller one is computed here, skipping chunks the run already finished (resume and
duplicate delivery cost nothing and count once). HTTP status tells Cloud Tasks what
to do: 200 done or permanently failed (recorded), 400 malformed task, 503 transient
(retry with the queue's backoff).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .config import L2CacheConfig, UnknownDatasetError
from .ingest import DEFAULT_BATCH, plan_task, region_size
from .pipeline import compute_chunk, dataset_context

log = logging.getLogger(__name__)


class BadTask(ValueError):
    pass


def parse_task(body: bytes) -> dict[str, Any]:
    try:
        task = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadTask(f"task body is not JSON: {exc}") from None
    if not isinstance(task, dict):
        raise BadTask("task body must be a JSON object")
    for key in ("dataset", "run_id", "region"):
        if key not in task:
            raise BadTask(f"task body lacks {key!r}")
    region = task["region"]
    if (
        not isinstance(region, list)
        or len(region) != 6
        or not all(isinstance(v, int) and v >= 0 for v in region)
        or region_size(region) == 0
    ):
        raise BadTask("region must be 6 non-negative integers x0,y0,z0,x1,y1,z1 with x0<x1 ...")
    batch = task.get("batch", DEFAULT_BATCH)
    if not isinstance(batch, int) or batch < 1:
        raise BadTask("batch must be a positive integer")
    task["batch"] = batch
    return task


def handle_task(config: L2CacheConfig, body: bytes, enqueue=None) -> tuple[int, dict]:
    """Run one task; returns (HTTP status, JSON summary)."""
    try:
        task = parse_task(body)
        ctx = dataset_context(config, task["dataset"])
    except (BadTask, UnknownDatasetError) as exc:
        return 400, {"error": str(exc)}
    try:
        run = ctx.ledger.get_run(task["run_id"])
    except KeyError as exc:
        return 400, {"error": str(exc)}
    kind, items = plan_task(task["region"], task["batch"])
    try:
        if kind == "split":
            if enqueue is None:
                from .tasks import enqueue as enqueue_task
                from .tasks import tasks_client

                client = tasks_client()

                def enqueue(payload):
                    return enqueue_task(client, config.tasks, payload)

            for sub in items:
                enqueue({**task, "region": sub})
            return 200, {"split": len(items)}
        done = ctx.ledger.done_among(run.run_id, [_chunk_id(ctx, c) for c in items])
        results = []
        for coords in items:
            if _chunk_id(ctx, coords) in done:
                results.append({"chunk": coords, "status": "skipped"})
                continue
            results.append(compute_chunk(ctx, run, coords))
        return 200, {"chunks": results}
    except Exception as exc:  # transient: Bigtable/storage hiccup, enqueue failure, ...
        log.exception("task failed; Cloud Tasks will retry")
        return 503, {"error": f"{type(exc).__name__}: {exc}"}


def _chunk_id(ctx, coords) -> int:
    from .pipeline import chunk_id

    return chunk_id(ctx, coords)
