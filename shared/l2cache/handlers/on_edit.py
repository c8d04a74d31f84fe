"""Pub/Sub messages on_edit accepts, and what happens to each under the failure contract.

- PCG edit message (on PCG's own edits topic, which other services also read):
  attributes ``table_id`` (+ user_id, remesh ...), data =
  ``pickle.dumps({"operation_id", "new_lvl2_ids", "new_root_ids"})`` (builtins only),
  read as plain data by :mod:`l2cache.support.safe_pickle` (never ``pickle.loads``),
  every size limit checked before allocation.
- missing-id message (from the lookup): raw little-endian uint64 data, attributes
  ``table_id`` and ``l2_cache_id``.

Outcomes (:mod:`l2cache.domain.failures`):

- ``table_id`` that l2cache does not cache, or whose cache table is an existing one
  another service owns (``existing_cache_table``): acknowledged and counted (the
  existing service ignores uncached tables too; the topic carries every PCG table's
  edits).
- undecodable, over a limit (bytes, ids, depth, objects, str length), wrong types, no
  ids, or an ``l2_cache_id`` that is neither the dataset's cache table nor its
  ``fallback_table_id`` (whose ids are computed into the cache table): permanent,
  dead-lettered with the reason (the message as it came, cut to Pub/Sub's size),
  acknowledged. Ids dead-lettered later are re-encoded from the validated array.
- per chunk: good chunks are written once (a redelivery skips them), chunks that fail
  permanently (outside the volume, missing/corrupt/inconsistent input) are dead-lettered
  with their ids and reasons while the rest of the message is still computed.
- transient: raised, so the function answers 5xx and Pub/Sub redelivers; the last
  delivery (counted per event in the ledger) is dead-lettered "gave up after N attempts".

Size: a message whose ids lie in one chunk is computed here (an edit, typically); one
spanning several chunks is fanned out as one compute_chunk task per chunk, so no message
needs more than one chunk's work within on_edit's timeout.

Per-id index: once an edit is accepted (its run and event known), each of its new L2
ids gets an ``l2edit:`` row in the runs table naming the event (run, key, operation,
message, publish time), in one MutateRows with the event row's ``received_at``: the
lookup's per-id state follows it to the event and its chunks' rows (pending while they
are unfinished, failed with their reason).

Idempotence: the graph is read and every cell is written at the message's publish
time, and the event row is keyed by the PCG operation id (or the message id; operation
id 0 is PCG's "no operation"), so a redelivered message rewrites the same bytes at the
same version and the same row. The operation's first content (a digest of table,
operation id and id set) is claimed on its event row: the same id with other content is
a reused operation id, processed as its own event (``op-<id>-<digest>``), logged, and
counted (``reused_operation_id`` on the event row, ``events.reused_op`` counter).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from l2cache.compute import DatasetContext, compute_l2_ids, dataset_context, group_by_chunk
from l2cache.config import DatasetConfig, L2CacheConfig, TasksConfig
from l2cache.domain import ids as idlib
from l2cache.domain.failures import (
    PERMANENT,
    BadRequest,
    classify,
    dead_letter_attributes,
    describe,
    gave_up,
    is_last_attempt,
)
from l2cache.domain.lineage import code_revision, utc_now
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.gcp.tasks import enqueue_chunk_ids, tasks_client
from l2cache.inputs.volume import in_volume
from l2cache.store.ledger import RunLedger, RunRecord, new_run
from l2cache.support import logs
from l2cache.support.safe_pickle import MAX_MESSAGE_BYTES, UnsafePickleError, restricted_loads

log = logging.getLogger(__name__)

# A message whose ids lie in more chunks than this is fanned out, one task per chunk.
INLINE_MAX_CHUNKS = 1
ENQUEUE_THREADS = 16
# Ids in one message, either form: a 10 MB Pub/Sub message holds ~1 M pickled uint64 ids
# (10 bytes each) or 1.25 M raw ones; the lookup publishes at most its per-request cap.
MAX_IDS = 1_000_000
# A dead letter's payload: the original message (at most Pub/Sub's 10 MB) or the ids
# that failed; anything larger (only a direct push can send it) is cut to what fits
# beside the attributes (<= 100 x 1.3 KB), so the publish of the dead letter cannot be
# refused (which would answer 5xx and loop).
MAX_DEAD_LETTER_BYTES = 10_000_000 - 2**17
# PCG graph table ids ("minnie65_public", "fly_v31"): anything else is not a table.
TABLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")

DeadLetter = Callable[[bytes, dict[str, str]], None]
ChunkGroups = list[tuple[list[int], np.ndarray]]  # (chunk coords, its L2 ids) per chunk


class _ToDeadLetter(Protocol):
    """``handle_message``'s dead-lettering of this message (or of chosen ids of it)."""

    def __call__(
        self, reason: str, payload: bytes = ..., extra: dict[str, str] | None = None
    ) -> None: ...


class _Record(Protocol):
    """``handle_message``'s record of this event in the ledger, with these fields."""

    def __call__(self, **fields: Any) -> None: ...


class PoisonMessage(BadRequest):
    """Can never succeed: goes to the dead-letter topic with this reason."""


@dataclass(frozen=True)
class RecomputeRequest:
    """What a message asks for, in one shape whichever of the two forms it came in (a PCG
    edit or the lookup's missing ids), so everything after decoding treats both alike."""

    dataset: str
    l2ids: np.ndarray
    kind: str  # "edit" | "missing_ids"
    operation_id: int | None = None
    l2_cache_id: str | None = None


def decode_message(data: bytes, attributes: dict[str, str]) -> RecomputeRequest:
    """Read either message form into a :class:`RecomputeRequest`, or raise PoisonMessage.

    Every limit is checked before what it guards is allocated (see
    :mod:`l2cache.support.safe_pickle`): the payload's size, then the number of ids, and
    for the pickled edit message each object the pickle would create. The ids come out
    as a fresh uint64 array built from validated integers, so whatever is dead-lettered
    later is re-encoded from them. Anything that can never be a request is poison
    (dead-lettered once with the reason, not redelivered).
    """
    table_id = attributes.get("table_id")
    if not table_id:
        raise PoisonMessage("message has no table_id attribute")
    if not TABLE_ID.fullmatch(table_id):
        raise PoisonMessage(f"table_id {table_id[:64]!r} is not a graph table id")
    if len(data) > MAX_MESSAGE_BYTES:
        raise PoisonMessage(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    l2_cache_id = attributes.get("l2_cache_id")
    if l2_cache_id is not None:  # the lookup's missing-id message: raw uint64 ids
        if len(data) % 8:
            raise PoisonMessage(f"missing-id data of {len(data)} bytes is not uint64 ids")
        if len(data) // 8 > MAX_IDS:
            raise PoisonMessage(f"{len(data) // 8} ids exceed the limit of {MAX_IDS}")
        ids = np.frombuffer(data, dtype="<u8").astype(np.uint64)  # a copy, every value valid
        return RecomputeRequest(table_id, ids, "missing_ids", None, l2_cache_id)
    try:
        payload = restricted_loads(data)
    except UnsafePickleError as exc:
        raise PoisonMessage(f"edit message rejected: {exc}") from None
    if not isinstance(payload, dict) or "new_lvl2_ids" not in payload:
        raise PoisonMessage("edit message has no new_lvl2_ids")
    ids = _uint64_list(payload["new_lvl2_ids"], "new_lvl2_ids")
    op = payload.get("operation_id")
    if op is not None and (type(op) is not int or not 0 <= op < 2**64):
        raise PoisonMessage(f"operation_id is not a uint64 but {type(op).__name__}")
    return RecomputeRequest(table_id, ids, "edit", op)


def _uint64_list(value: object, name: str) -> np.ndarray:
    """A list (or tuple) of plain ints in [0, 2**64) as a new uint64 array; else poison."""
    if not isinstance(value, list | tuple):
        raise PoisonMessage(f"{name} are not uint64 ids: a {type(value).__name__}, not a list")
    if len(value) > MAX_IDS:
        raise PoisonMessage(f"{len(value)} ids exceed the limit of {MAX_IDS}")
    if not all(type(v) is int for v in value):  # bool, float, str, containers: refused
        bad = next(v for v in value if type(v) is not int)
        raise PoisonMessage(f"{name} are not uint64 ids: holds a {type(bad).__name__}")
    if value and (min(value) < 0 or max(value) >= 2**64):
        raise PoisonMessage(f"{name} are not uint64 ids: a value outside [0, 2**64)")
    return np.array(value, dtype=np.uint64).reshape(-1)


def event_key(request: RecomputeRequest, message_id: str) -> str:
    """Ledger key of one event: the PCG operation, else the Pub/Sub message.

    Operation id 0 is PCG's "no operation" (its manual remesh publishes every request
    with it): such messages are distinct events, keyed by message id. An operation id
    that comes back with other content gets :func:`reused_key` (see handle_message).
    """
    if request.kind == "edit" and request.operation_id:
        return f"op-{request.operation_id}"
    return f"msg-{message_id}"


def content_digest(request: RecomputeRequest) -> str:
    """What an edit event is about (table, operation, the set of its ids), so a reused
    operation id with other content is told apart from a redelivery."""
    h = hashlib.sha256(f"{request.dataset}\0{request.operation_id}\0".encode())
    h.update(np.unique(request.l2ids).astype("<u8").tobytes())
    return h.hexdigest()[:32]


def reused_key(key: str, digest: str) -> str:
    """The event key of a reused operation id's other content."""
    return f"{key}-{digest[:16]}"


def runs_ledger(config: L2CacheConfig) -> RunLedger:
    """The runs table's ledger, for a message of a table l2cache does not cache.

    Such a message has no dataset context (whose ledger every other path uses), yet it
    is still counted, so the ignored edits of other PCG tables stay visible.
    """
    instance = bigtable_instance(config.bigtable.project, config.bigtable.instance)
    return RunLedger(instance.table(config.runs_table_id))


@logs.event
def handle_message(
    config: L2CacheConfig,
    data: bytes,
    attributes: dict[str, str],
    message_id: str,
    dead_letter: DeadLetter | None = None,
    publish_time: datetime | None = None,
    ledger_factory: Callable[[L2CacheConfig], RunLedger] = runs_ledger,
    unreadable: str | None = None,
) -> dict[str, Any]:
    """Recompute what a message asks for; returns a summary (raises when transient).

    ``unreadable`` is why the envelope's data could not even be read (see
    :func:`unwrap_cloud_event`): the message is dead-lettered with that reason at once.
    """
    when = to_millisecond(publish_time or utc_now())

    def to_dead_letter(
        reason: str, payload: bytes = data, extra: dict[str, str] | None = None
    ) -> None:
        log.warning("dead-lettering message %s: %s", message_id, reason)
        if dead_letter is None:
            return
        extra = dict(extra or {})
        if len(payload) > MAX_DEAD_LETTER_BYTES:
            extra["dead_letter_truncated_from"] = str(len(payload))
            payload = payload[:MAX_DEAD_LETTER_BYTES]
        dead_letter(payload, dead_letter_attributes({**attributes, **extra}, reason, message_id))

    if unreadable is not None:
        to_dead_letter(unreadable)
        return {"status": "dead_lettered", "reason": unreadable}
    try:
        request = decode_message(data, attributes)
    except PoisonMessage as exc:
        to_dead_letter(str(exc))
        return {"status": "dead_lettered", "reason": str(exc)}
    known = config.datasets.get(request.dataset)
    if known is None or known.existing_cache_table:
        # the topic carries every PCG table's edits; a table l2cache does not write
        # (none, or an existing table another service owns) is not an error
        total = ledger_factory(config).count_ignored(request.dataset)
        why = "no cache for that table" if known is None else "its cache table is not ours to write"
        log.info("message for %s ignored: %s (%d so far)", request.dataset, why, total)
        return {"status": "ignored", "table_id": request.dataset, "ignored_total": total}
    ctx = dataset_context(config, request.dataset)
    try:
        _check_target(request, ctx.dataset)
        if request.l2ids.size == 0:
            raise PoisonMessage("message names no L2 ids")
    except PoisonMessage as exc:
        to_dead_letter(str(exc))
        return {"status": "dead_lettered", "reason": str(exc)}

    kind = "edit_stream" if request.kind == "edit" else "missing_ids"
    key = event_key(request, message_id)
    try:  # a closed stream run hands over to its successor (RunLedger.ensure_run)
        run = ctx.ledger.ensure_run(stream_run(kind, ctx.dataset))
        reused_from = _claim_operation(ctx, run, request, key)
        key = reused_key(key, content_digest(request)) if reused_from else key
        attempt = ctx.ledger.event_delivered(run.run_id, key)
    except Exception as exc:  # no runs table (NotFound) is permanent: never redelivered
        if classify(exc) != PERMANENT:
            raise
        to_dead_letter(describe(exc))
        return {"status": "dead_lettered", "reason": describe(exc)}
    if request.kind == "edit":
        _index_edit(ctx, run, key, request, message_id, when)
    max_attempts = config.pubsub.max_delivery_attempts if config.pubsub else None
    reuse = {"reused_operation_id": True, "reused_from": reused_from} if reused_from else {}

    def record(**fields: Any) -> None:
        ctx.ledger.record_event(
            run.run_id,
            key,
            kind=request.kind,
            operation_id=request.operation_id,
            message_id=message_id,
            ids=int(request.l2ids.size),
            published_at=when.isoformat(),
            recorded_at=utc_now().isoformat(),
            deliveries=attempt,
            **reuse,
            **fields,
        )

    def give_up_or_raise(exc: Exception) -> dict[str, Any]:
        """A permanent failure, or a transient one on the last delivery: record it,
        dead-letter the message with the reason, acknowledge. Otherwise re-raise: the
        function answers 5xx and Pub/Sub redelivers with backoff."""
        permanent = classify(exc) == PERMANENT
        if not permanent and not is_last_attempt(attempt, max_attempts):
            raise exc
        reason = describe(exc) if permanent else gave_up(attempt, exc)
        record(status="failed", error=reason)
        to_dead_letter(reason)
        return {"status": "dead_lettered", "reason": reason}

    not_layer2, groups = group_by_chunk(ctx.dataset, request.l2ids)
    if not_layer2:  # never computable: reported now, the rest still runs
        ids = np.unique(request.l2ids)
        bad = ids[idlib.get_layer(ids) != 2]
        _dead_letter_ids(to_dead_letter, ctx, request, bad, "they are not layer-2 (L2) ids")
    if not groups:
        record(status="dead_lettered", not_layer2=not_layer2, written=0)
        return {"status": "dead_lettered", "reason": "no layer-2 ids", "not_layer2": not_layer2}
    if config.tasks is not None and len(groups) > INLINE_MAX_CHUNKS:
        try:
            fanned = _fan_out(
                config.tasks, ctx, run, key, request, when, groups, record, to_dead_letter
            )
            return {**fanned, **reuse}
        except Exception as exc:  # enqueueing failed; the tasks already created stay unique
            return give_up_or_raise(exc)
    try:
        result = compute_l2_ids(ctx, request.l2ids, when, run, cell_timestamp=when, event_key=key)
    except Exception as exc:  # per-chunk permanent errors come back in result["failed"]
        return give_up_or_raise(exc)
    status = "ok"
    if result["failed"]:
        status = "partial"
        bad = np.array([i for f in result["failed"] for i in f["ids"]], dtype="<u8")
        reason = "; ".join(f"chunk {f['chunk']}: {f['error']}" for f in result["failed"])
        _dead_letter_ids(to_dead_letter, ctx, request, bad, reason)
    record(
        status=status,
        written=result["written"],
        chunks_read=result["chunks_read"],
        chunks_skipped=result["chunks_skipped"],
        not_found=len(result["not_found"]),
        not_found_sample=result["not_found"][:10],
        empty=len(result["empty"]),  # placeholders written: a children row, no voxel
        failed_ids=sum(len(f["ids"]) for f in result["failed"]),
        not_layer2=not_layer2,
        errors=[f["error"] for f in result["failed"]][:10],
    )
    return {"status": status, **reuse, **result}


def _index_edit(
    ctx: DatasetContext,
    run: RunRecord,
    key: str,
    request: RecomputeRequest,
    message_id: str,
    when: datetime,
) -> None:
    """Point each new L2 id of an accepted edit at its event (``l2edit:`` rows, see
    :meth:`RunLedger.edit_received`), so the lookup's per-id state says pending (by
    this operation) while the event is unfinished and failed (its reason) once it
    failed. Best effort: the index only informs the state, so a failed write is logged
    and the edit is computed all the same (its ids then read as an edit l2cache has no
    record of, the state's fallback)."""
    ids = (
        request.l2ids[idlib.get_layer(request.l2ids) == 2] if request.l2ids.size else request.l2ids
    )
    try:
        ctx.ledger.edit_received(
            run.run_id,
            key,
            ctx.dataset.name,
            ids.tolist(),
            request.operation_id,
            message_id,
            when,
        )
    except Exception as exc:  # noqa: BLE001 - the state falls back; the edit goes on
        log.warning("could not index the ids of event %s: %s", key, describe(exc))


def _claim_operation(
    ctx: DatasetContext, run: RunRecord, request: RecomputeRequest, key: str
) -> str | None:
    """Whether this PCG operation id was first seen with other content: the key it was
    seen under (this message is then a reused id, its own event), else None.

    The first content of an operation id is claimed on its event row (one
    CheckAndMutateRow: of two concurrent contents exactly one wins), so a redelivery
    (same content) stays the same event and skips what it already wrote, while a reused
    id with other ids or another table is processed and reported, never mistaken for one.
    """
    if not key.startswith("op-"):
        return None
    digest = content_digest(request)
    first = ctx.ledger.claim_event_content(run.run_id, key, digest)
    if first is None or first == digest:
        return None
    log.warning(
        "operation id %s of %s came back with other content (%d ids): processed as "
        "its own event %s, not as a redelivery",
        request.operation_id,
        request.dataset,
        request.l2ids.size,
        reused_key(key, digest),
    )
    return key


def _fan_out(
    tasks: TasksConfig,
    ctx: DatasetContext,
    run: RunRecord,
    key: str,
    request: RecomputeRequest,
    when: datetime,
    groups: ChunkGroups,
    record: _Record,
    to_dead_letter: _ToDeadLetter,
) -> dict[str, Any]:
    """One Cloud Task per chunk: no message ever needs more than one chunk's work.

    A missing-id message may name up to the lookup's id cap, spread over many chunks;
    computed here in sequence it would outlast on_edit's timeout and be redelivered
    until dead-lettered. Chunks outside the volume are reported now; the rest run as
    ``compute_chunk`` tasks named per (run, event, chunk), so a redelivery enqueues
    nothing twice, and each task records its chunk under the event. Raises when
    enqueueing fails (the caller decides between redelivery and giving up).
    """
    from concurrent.futures import ThreadPoolExecutor

    inside: ChunkGroups = []
    outside: ChunkGroups = []
    for chunk, ids in groups:
        (inside if in_volume(ctx.dataset, chunk) else outside).append((chunk, ids))
    client = tasks_client()
    at_ms = int(when.timestamp() * 1000)

    def enqueue(group: tuple[list[int], np.ndarray]) -> str | None:
        chunk, ids = group
        return enqueue_chunk_ids(
            client, tasks, ctx.dataset.name, run.run_id, key, chunk, ids, at_ms
        )

    with ThreadPoolExecutor(max_workers=ENQUEUE_THREADS) as pool:
        list(pool.map(enqueue, inside))
    status = "fanned_out"
    if outside:
        status = "partial"
        bad = np.concatenate([m for _, m in outside])
        where = ", ".join(str(c) for c, _ in outside[:5])
        _dead_letter_ids(
            to_dead_letter, ctx, request, bad, f"chunks {where} lie outside the volume"
        )
    record(
        status=status,
        chunks_enqueued=len(inside),
        failed_ids=int(sum(m.size for _, m in outside)),
    )
    return {"status": status, "chunks_enqueued": len(inside), "outside": len(outside)}


def _dead_letter_ids(
    to_dead_letter: _ToDeadLetter,
    ctx: DatasetContext,
    request: RecomputeRequest,
    bad: np.ndarray,
    reason: str,
) -> None:
    """Dead-letter exactly the ids that could not be computed, as a missing-id message
    of the dataset's cache table, so they can be re-published once the cause is fixed."""
    to_dead_letter(
        f"{bad.size} of {request.l2ids.size} ids could not be computed: {reason}",
        payload=np.asarray(bad, dtype="<u8").tobytes(),
        extra={"l2_cache_id": ctx.dataset.cache_table_id, "failed_ids": str(bad.size)},
    )


def _check_target(request: RecomputeRequest, dataset: DatasetConfig) -> None:
    """A missing-id message must name the cache table l2cache writes for its dataset, or
    its ``fallback_table_id``: the existing service's frontend, still serving during a
    switch-over, publishes its own missing ids naming its table; they are computed into
    the cache table, which is what heals the switch-over (the fallback is never written)."""
    allowed = {dataset.cache_table_id, dataset.fallback_table_id} - {None}
    if request.l2_cache_id is not None and request.l2_cache_id not in allowed:
        raise PoisonMessage(
            f"l2_cache_id {request.l2_cache_id!r} is not the cache table of {request.dataset!r} "
            f"({dataset.cache_table_id!r}); l2cache writes only the table its dataset map names"
        )


def stream_run(kind: str, dataset: DatasetConfig) -> RunRecord:
    """The run of a message stream: one per dataset, kind, code revision and parameters.

    A new deployment (new revision) starts a new stream run, so lineage never credits
    cells to code that did not compute them; each cell carries its message's time.
    """
    run = new_run(kind, dataset, trigger="pubsub")
    revision = code_revision()
    run.run_id = f"{kind}-{dataset.name}-{revision[:12]}-{run.params_hash[:8]}"
    run.code_revision = revision
    return run


def to_millisecond(when: datetime) -> datetime:
    """``when`` in UTC, cut to whole milliseconds: Bigtable versions are whole
    milliseconds, and so is everything derived from them (a naive time is UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.replace(microsecond=(when.microsecond // 1000) * 1000)


@dataclass(frozen=True)
class PubSubMessage:
    """A Pub/Sub message as on_edit's CloudEvent carries it, unwrapped."""

    data: bytes
    attributes: dict[str, str]
    message_id: str
    published: datetime | None
    problem: str | None = None  # why ``data`` could not be read; it then holds the raw text


def unwrap_cloud_event(
    envelope: object, event_id: str | None, event_time: str | None
) -> PubSubMessage:
    """The Pub/Sub message inside a CloudEvent's data (``{"message": {...}}``).

    Base64 is decoded strictly: a lenient decode drops stray characters and turns
    corrupted text into other bytes, which would be dead-lettered with a misleading
    reason (or, worse, read). Data that is not base64 keeps its raw text and a
    ``problem``, so the dead letter shows what was sent and why it was refused.
    """
    outer = envelope if isinstance(envelope, dict) else {}
    message = outer.get("message") if isinstance(outer.get("message"), dict) else {}
    raw_attributes = message.get("attributes")
    attributes = (
        {str(k): str(v) for k, v in raw_attributes.items()}
        if isinstance(raw_attributes, dict)
        else {}
    )
    message_id = str(message.get("messageId") or message.get("message_id") or event_id)
    published = parse_publish_time(message.get("publishTime") or event_time)
    raw = message.get("data") or ""
    try:
        data, problem = base64.b64decode(raw, validate=True), None
    except (binascii.Error, TypeError, ValueError) as exc:
        data, problem = str(raw).encode("utf-8", "replace"), f"message data is not base64: {exc}"
    return PubSubMessage(data, attributes, message_id, published, problem)


def parse_publish_time(value: str | None) -> datetime | None:
    """Pub/Sub's RFC 3339 publish time as an aware datetime in UTC; None if unreadable.

    ``datetime.fromisoformat`` (3.11+) reads every RFC 3339 form Pub/Sub and CloudEvents
    send: ``Z`` or a numeric offset, and fractions of any length (nanoseconds are cut to
    microseconds). A time without an offset is taken as UTC. None lets the caller fall
    back to the time of receipt instead of failing a message over its envelope.
    """
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


__all__ = [
    "PoisonMessage",
    "RecomputeRequest",
    "decode_message",
    "describe",
    "handle_message",
    "parse_publish_time",
    "unwrap_cloud_event",
    "stream_run",
]
