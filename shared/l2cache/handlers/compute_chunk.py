"""The compute_chunk task handler: split a region or compute a batch of chunks.

Task body (JSON)::

    {"dataset": "...", "run_id": "...", "region": [x0, y0, z0, x1, y1, z1], "batch": 4,
     "generation": 0}

A region with more than ``batch`` chunks is split and a task per part is enqueued
under a deterministic name (a retried split re-enqueues the same names and Cloud Tasks
drops the duplicates); a smaller one is computed here, skipping chunks the run already
finished (resume and duplicate delivery cost nothing and count once).

Bulk and region runs start with a *span* task over positions of the run's scattered
chunk order (:mod:`l2cache.domain.spans`)::

    {"kind": "span", "dataset": "...", "run_id": "...", "start": 0, "stop": 11600000,
     "batch": 4, "generation": 0, "t0_ms": 1700000000000}

A span wider than ``batch`` enqueues up to ``tasks.fan_out`` child spans (leaves
scheduled by the warm-up ramp from ``t0_ms``, default the run's start); a leaf computes
the chunks at its positions exactly as a region leaf does. Region tasks remain for
reconcile, ``--sample`` and runs started before spans.

Every body is validated against its run before anything is recorded or written
(:func:`_check_task`): the run's dataset, a task kind the run's kind has (region and
span tasks for bulk and region runs, ids tasks for stream runs), a region inside the
run's region, a span within its chunk count, an ids task's cell time within the run's
window (not earlier than a message of the run could have been published, not later
than now plus a small clock skew), and an open run (``runs rollback`` closes it first).
A body that fails is *refused*: answered 200 (``rejected``) and counted once on its run
(:meth:`~l2cache.store.ledger.RunLedger.task_refused`), never marking the run broken;
only work of the run that was really lost (a split of its own region or span that
gave up, a task of its own dataset that this deployment's map lacks) does that.

The HTTP status follows the failure contract (:mod:`l2cache.domain.failures`), because Cloud
Tasks retries every non-2xx answer: 200 for success and for permanent failures
(recorded: in the ledger when the run exists, in the log otherwise), 503 for transient
ones, and 200 again on the task's last attempt, after recording "gave up after N
attempts" for whatever it could not finish.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

import numpy as np

from l2cache.compute import (
    DatasetContext,
    chunk_id,
    compute_chunks,
    compute_l2_ids,
    dataset_context,
)
from l2cache.config import L2CacheConfig, UnknownDatasetError
from l2cache.domain import ids as idlib
from l2cache.domain.failures import (
    PERMANENT,
    BadRequest,
    PermanentError,
    RunClosed,
    classify,
    dead_letter_attributes,
    describe,
    gave_up,
    is_last_attempt,
)
from l2cache.domain.lineage import utc_now
from l2cache.domain.permutation import permutation_key
from l2cache.domain.regions import DEFAULT_BATCH, plan_task, region_chunks, region_size
from l2cache.domain.spans import plan_span, ramp_offset_s, span_chunks
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.gcp.tasks import MAX_TASK_CHUNKS, enqueue_region, enqueue_span, tasks_client
from l2cache.handlers.rollback_task import handle_rollback_task
from l2cache.inputs.volume import in_volume
from l2cache.store.ledger import REGION_INDEX_MAX_CHUNKS, RunLedger, RunRecord
from l2cache.support import logs

log = logging.getLogger(__name__)

RETRY_COUNT_HEADER = "X-CloudTasks-TaskRetryCount"
MAX_AT_MS = 2**45  # ~3084 AD in milliseconds: beyond it, not a publish time
KINDS = (None, "region", "span", "chunks", "ids", "rollback")  # a body's "kind" (None: region)
STREAM_KINDS = ("edit_stream", "missing_ids")  # runs whose work comes as ids tasks
CLOCK_SKEW_MS = 5 * 60 * 1000  # how far ahead of this worker's clock a cell time may be
# How long before its stream run was recorded a message may have been published: Pub/Sub
# keeps an unacknowledged message at most 31 days (topic retention), and a new stream
# run is recorded on the first message it receives, possibly a backlog's oldest.
MAX_MESSAGE_AGE_MS = 31 * 24 * 3600 * 1000
MAX_KEY = 256  # characters of a run id or event key (parts of row keys)
MAX_ERROR = 500  # characters of a refusal's reason answered and recorded
DeadLetter = Callable[[bytes, dict[str, str]], object]  # (data, attributes); result unused
Enqueue = Callable[[list[int]], object]  # enqueue the task of one region; result unused
# enqueue one child span (start, stop, schedule time or None); result unused
SpanEnqueue = Callable[[int, int, "datetime | None"], object]
SPAN_ENQUEUE_THREADS = 8  # a split's create_task calls in parallel (fan_out may be 16+)


class BadTask(BadRequest):
    """A task that no retry can run (malformed body, unknown dataset or run, a region
    outside the run): permanent, so it is answered 200 and recorded, never retried."""


def parse_task(body: bytes) -> dict[str, Any]:
    """Validate a task body into the task to run, with ``batch`` and ``generation`` filled.

    Checked before anything is read or written: a body that is not a well-formed region
    or ids task is :class:`BadTask`, so Cloud Tasks stops delivering it.
    """
    task = _parse_json(body)
    if task.get("kind") == "ids":
        return _parse_ids_task(task)
    if task.get("kind") == "span":
        return _parse_span_task(task)
    if task.get("kind") == "chunks":
        return _parse_chunks_task(task)
    for key in ("dataset", "run_id", "region"):
        if key not in task:
            raise BadTask(f"task body lacks {key!r}")
    if not isinstance(task["dataset"], str) or not isinstance(task["run_id"], str):
        raise BadTask("dataset and run_id must be strings")
    if not _region_shaped(task["region"]):
        raise BadTask("region must be 6 non-negative integers x0,y0,z0,x1,y1,z1 with x0<x1 ...")
    batch = task.get("batch", DEFAULT_BATCH)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise BadTask("batch must be a positive integer")
    task["batch"] = batch
    generation = task.get("generation", 0)
    if not isinstance(generation, int | str):
        raise BadTask("generation must be an integer or a string")
    task["generation"] = generation
    return task


def _parse_ids_task(task: dict[str, Any]) -> dict[str, Any]:
    """An ids task (one chunk of a fanned-out message): see :func:`l2cache.gcp.tasks.enqueue_chunk_ids`."""
    for key in ("dataset", "run_id", "event_key", "chunk", "ids", "at_ms"):
        if key not in task:
            raise BadTask(f"ids task lacks {key!r}")
    if not all(isinstance(task[k], str) for k in ("dataset", "run_id", "event_key")):
        raise BadTask("dataset, run_id and event_key must be strings")
    if not 0 < len(task["event_key"]) <= MAX_KEY:
        raise BadTask(f"event_key must be 1 to {MAX_KEY} characters (a row key part)")
    chunk, ids = task["chunk"], task["ids"]
    ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not (
        isinstance(chunk, list) and len(chunk) == 3 and all(ok_int(v) and v >= 0 for v in chunk)
    ):
        raise BadTask("chunk must be 3 non-negative integers")
    if not (isinstance(ids, list) and ids and all(ok_int(v) and 0 <= v < 2**64 for v in ids)):
        raise BadTask("ids must be a non-empty list of uint64 ids")
    if not ok_int(task["at_ms"]) or task["at_ms"] <= 0:
        raise BadTask("at_ms must be a positive integer (milliseconds since the epoch)")
    return task


def _parse_span_task(task: dict[str, Any]) -> dict[str, Any]:
    """A span task: positions ``[start, stop)`` of a run's scattered chunk order
    (checked against the run's size in :func:`_check_task`)."""
    for key in ("dataset", "run_id", "start", "stop", "batch"):
        if key not in task:
            raise BadTask(f"span task lacks {key!r}")
    if not isinstance(task["dataset"], str) or not isinstance(task["run_id"], str):
        raise BadTask("dataset and run_id must be strings")
    ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not (ok_int(task["start"]) and ok_int(task["stop"]) and 0 <= task["start"] < task["stop"]):
        raise BadTask("span needs integers 0 <= start < stop")
    if not ok_int(task["batch"]) or task["batch"] < 1:
        raise BadTask("batch must be a positive integer")
    generation = task.get("generation", 0)
    if isinstance(generation, bool) or not isinstance(generation, int | str):
        raise BadTask("generation must be an integer or a string")
    task["generation"] = generation
    if "t0_ms" in task and (not ok_int(task["t0_ms"]) or not 0 < task["t0_ms"] < MAX_AT_MS):
        raise BadTask("t0_ms must be a time in milliseconds since the epoch")
    return task


def _parse_chunks_task(task: dict[str, Any]) -> dict[str, Any]:
    """A chunks task: an explicit list of 1 to :data:`MAX_TASK_CHUNKS` distinct chunks of
    the run (reconcile's batches; checked inside the run's region in :func:`_check_task`)."""
    for key in ("dataset", "run_id", "chunks"):
        if key not in task:
            raise BadTask(f"chunks task lacks {key!r}")
    if not isinstance(task["dataset"], str) or not isinstance(task["run_id"], str):
        raise BadTask("dataset and run_id must be strings")
    chunks = task["chunks"]
    ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not (
        isinstance(chunks, list)
        and 0 < len(chunks) <= MAX_TASK_CHUNKS
        and all(
            isinstance(c, list) and len(c) == 3 and all(ok_int(v) and v >= 0 for v in c)
            for c in chunks
        )
    ):
        raise BadTask(f"chunks must be 1 to {MAX_TASK_CHUNKS} triples of non-negative integers")
    if len({tuple(c) for c in chunks}) != len(chunks):
        raise BadTask("chunks must be distinct")
    generation = task.get("generation", 0)
    if isinstance(generation, bool) or not isinstance(generation, int | str):
        raise BadTask("generation must be an integer or a string")
    task["generation"] = generation
    return task


def attempt_number(headers: Mapping[str, str] | None) -> int:
    """1-based attempt of this delivery, from Cloud Tasks' retry-count header."""
    try:
        return int((headers or {}).get(RETRY_COUNT_HEADER, 0)) + 1
    except ValueError:
        return 1


def handle_task(
    config: L2CacheConfig,
    body: bytes,
    headers: Mapping[str, str] | None = None,
    enqueue: Enqueue | None = None,
    dead_letter: DeadLetter | None = None,
    enqueue_child_span: SpanEnqueue | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run one task; returns (HTTP status, JSON summary).

    The last attempt is known only from Cloud Tasks' retry-count header (a chunk's own
    attempt counter also counts resumes, reconciles and duplicate deliveries).
    """
    attempt = attempt_number(headers)
    max_attempts = config.tasks.max_attempts if config.tasks else None
    last = is_last_attempt(attempt, max_attempts)
    ctx: DatasetContext | None = None
    run: RunRecord | None = None
    task: dict[str, Any] | None = None
    try:
        task = _parse_json(body)
        if task.get("kind") not in KINDS:
            raise BadTask(f"unknown task kind {str(task.get('kind'))[:60]!r}")
        ctx, run = _task_run(config, task, body)
        if task.get("kind") == "rollback":  # handles its own failures; runs on a closed run
            status, answer = handle_rollback_task(ctx, run, task, last)
            if answer.get("status") == "rejected":
                _record_refusal(ctx, run, f"task rejected: {answer.get('error')}", body)
            return status, answer
        if run.closed is not None and task.get("kind") != "ids":  # ids: dead-lettered below
            raise BadTask(
                f"run {run.run_id} was closed at {run.closed.get('at')} "
                f"({run.closed.get('reason')}): late task refused"
            )
        task = parse_task(body) if task.get("kind") != "ids" else _parse_ids_task(task)
        _check_task(ctx, run, task)
    except PermanentError as exc:
        return _reject(ctx, run, body, exc)
    except Exception as exc:  # reading the runs table failed
        if classify(exc) == PERMANENT:  # NotFound (no runs table), permission: not retried
            return _reject(ctx, run, body, exc)
        log.exception("task could not start")
        return (200 if last else 503), {"status": "error", "error": describe(exc)}

    if task.get("kind") == "ids":
        return _ids_task(ctx, run, task, attempt, last, dead_letter)
    if task.get("kind") == "span":
        return _span_task(config, ctx, run, task, attempt, last, enqueue_child_span)
    if task.get("kind") == "chunks":
        return _chunks_task(config, ctx, run, task["chunks"], attempt, last)
    kind, items = plan_task(task["region"], task["batch"])
    if kind == "split" and enqueue is None and config.tasks is None:
        # no queue to put the parts on: no retry can change that (the map is wrong)
        reason = BadTask("the dataset map has no 'tasks' section: a split cannot enqueue its parts")
        status, answer = _give_up_region(ctx, run, task["region"], f"task rejected: {reason}", 1)
        return status, {**answer, "status": "rejected", "error": str(reason)}
    try:
        if kind == "split":
            enqueue = enqueue or _enqueuer(config, task)
            for sub in items:
                enqueue(sub)
            return 200, {"split": len(items)}
        return 200, {"chunks": _compute_leaf(config, ctx, run, items, attempt, last)}
    except Exception as exc:  # transient: Bigtable/storage hiccup, enqueue failure, ...
        if classify(exc) == PERMANENT:  # a missing table: no retry can help
            return _give_up_region(ctx, run, task["region"], describe(exc), attempt, final=True)
        if last:
            return _give_up_region(ctx, run, task["region"], gave_up(attempt, exc), attempt)
        log.exception("task failed; Cloud Tasks will retry")
        return 503, {"error": describe(exc)}


def _chunks_task(
    config: L2CacheConfig,
    ctx: DatasetContext,
    run: RunRecord,
    chunks: list[list[int]],
    attempt: int,
    last: bool,
) -> tuple[int, dict[str, Any]]:
    """Compute an explicit chunk list as a leaf does; a permanent failure, or the last
    attempt's, fails each chunk's one-chunk region (so the run still ends)."""
    try:
        return 200, {"chunks": _compute_leaf(config, ctx, run, chunks, attempt, last)}
    except Exception as exc:
        permanent = classify(exc) == PERMANENT
        if not (permanent or last):
            log.exception("chunks task failed; Cloud Tasks will retry")
            return 503, {"error": describe(exc)}
        reason = describe(exc) if permanent else gave_up(attempt, exc)
        answers = [
            _give_up_region(ctx, run, [*c, *(v + 1 for v in c)], reason, attempt, permanent)
            for c in chunks
        ]
        worst = max(status for status, _ in answers)
        return worst, {"status": "failed", "error": reason}


def _compute_leaf(
    config: L2CacheConfig,
    ctx: DatasetContext,
    run: RunRecord,
    items: list[list[int]],
    attempt: int,
    last: bool,
) -> list[dict[str, Any]]:
    """A leaf task's chunks (region or span): skip the done ones (resume reads only these
    rows), mark the rest queued by this attempt, compute them; the per-chunk results."""
    ids = [chunk_id(ctx, c) for c in items]
    done = ctx.ledger.done_among(run.run_id, ids)
    todo = [(cid, c) for cid, c in zip(ids, items, strict=True) if cid not in done]
    ctx.ledger.chunks_queued(run, todo, attempt)
    results = [
        {"chunk": c, "status": "skipped"} for cid, c in zip(ids, items, strict=True) if cid in done
    ]
    coords = [c for _, c in todo]
    read_ahead = bool(config.tasks and config.tasks.read_ahead)
    results += compute_chunks(ctx, run, coords, last, attempt, read_ahead=read_ahead)
    return results


def _span_task(
    config: L2CacheConfig,
    ctx: DatasetContext,
    run: RunRecord,
    task: dict[str, Any],
    attempt: int,
    last: bool,
    enqueue_child: SpanEnqueue | None,
) -> tuple[int, dict[str, Any]]:
    """Split a span into child spans (leaves scheduled by the ramp) or compute its chunks.

    A split's children are named per (run, start, stop, generation): a retried split
    re-enqueues the same names and the queue drops the duplicates. On the last attempt
    a leaf records its chunks failed (status counts them, the run can end); a split
    records the run broken with the span that was lost (``reconcile`` or ``--resume``
    re-covers it), since its range may hold millions of chunks.
    """
    start, stop, batch = task["start"], task["stop"], task["batch"]
    fan_out = config.tasks.fan_out if config.tasks else 2
    kind, children = plan_span(start, stop, batch, fan_out)
    if kind == "split" and enqueue_child is None and config.tasks is None:
        reason = BadTask("the dataset map has no 'tasks' section: a split cannot enqueue its parts")
        status, answer = _give_up_span(ctx, run, task, kind, f"task rejected: {reason}", 1)
        return status, {**answer, "status": "rejected", "error": str(reason)}
    try:
        if kind == "split":
            enqueue_child = enqueue_child or _span_enqueuer(config, task)
            times = _leaf_times(config, run, task, children)
            with ThreadPoolExecutor(min(SPAN_ENQUEUE_THREADS, len(children))) as pool:
                list(pool.map(enqueue_child, *zip(*children, strict=True), times))
            return 200, {"split": len(children)}
        items = span_chunks(run.region or [], permutation_key(run.run_id), start, stop)
        return 200, {"chunks": _compute_leaf(config, ctx, run, items, attempt, last)}
    except Exception as exc:  # transient: Bigtable/storage hiccup, enqueue failure, ...
        if classify(exc) == PERMANENT:  # a missing table: no retry can help
            return _give_up_span(ctx, run, task, kind, describe(exc), attempt, final=True)
        if not last:
            log.exception("span task failed; Cloud Tasks will retry")
            return 503, {"error": describe(exc)}
        return _give_up_span(ctx, run, task, kind, gave_up(attempt, exc), attempt)


def _leaf_times(
    config: L2CacheConfig, run: RunRecord, task: dict[str, Any], children: list[tuple[int, int]]
) -> list[datetime | None]:
    """Each child's schedule time: the ramp's offset of its leaf index from the run's
    start (``t0_ms``, else the run record's ``created_at``) for a leaf, None (due now)
    for a split, and None for all when the map's ramp is off."""
    ramp = config.tasks.ramp if config.tasks else None
    if ramp is None or not ramp.enabled:
        return [None] * len(children)
    batch = task["batch"]
    if "t0_ms" in task:
        t0 = datetime.fromtimestamp(task["t0_ms"] / 1000, tz=UTC)
    else:
        t0 = datetime.fromisoformat(run.created_at)
        t0 = t0 if t0.tzinfo else t0.replace(tzinfo=UTC)
    offsets = ramp_offset_s(np.array([a // batch for a, _ in children]), ramp).tolist()
    return [
        t0 + timedelta(seconds=off) if b - a <= batch else None
        for (a, b), off in zip(children, offsets, strict=True)
    ]


def _give_up_span(
    ctx: DatasetContext,
    run: RunRecord,
    task: dict[str, Any],
    kind: str,
    reason: str,
    attempt: int,
    final: bool = False,
) -> tuple[int, dict[str, Any]]:
    """The last attempt of a span failed: record it (see :func:`_span_task`), then 200;
    503 when even that record cannot be written, so the span is delivered again
    (200 all the same when the failure is ``final``: a missing table stays missing)."""
    start, stop = task["start"], task["stop"]
    log.error("span [%d, %d) of run %s: %s", start, stop, run.run_id, reason)
    try:
        if kind == "compute":
            for c in span_chunks(run.region or [], permutation_key(run.run_id), start, stop):
                cid = chunk_id(ctx, c)
                ctx.ledger.chunk_finished(
                    run, cid, c, "failed", attempt=attempt, started=False, error=reason
                )
        else:
            ctx.ledger.task_rejected(run.run_id, f"span [{start}, {stop}) was lost: {reason}")
    except Exception:
        log.exception("could not record that the span task gave up")
        return (200 if final else 503), {"status": "error", "error": reason}
    return 200, {"status": "failed", "error": reason}


def _span_enqueuer(config: L2CacheConfig, task: dict[str, Any]) -> SpanEnqueue:
    """Enqueue a split's child spans as tasks of the same run, batch, generation and
    ramp start, under scattered deterministic names (:func:`l2cache.gcp.tasks.span_task_id`)."""
    tasks = config.tasks
    if tasks is None:  # _span_task rejects a split on such a map before it gets here
        raise ValueError("the dataset map has no 'tasks' section")
    client = tasks_client()

    def enqueue(start: int, stop: int, when: datetime | None) -> str | None:
        return enqueue_span(
            client,
            tasks,
            task["dataset"],
            task["run_id"],
            start,
            stop,
            task["batch"],
            task["generation"],
            task.get("t0_ms"),
            when,
        )

    return enqueue


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        task = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadTask(f"task body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(task, dict):
        raise BadTask("task body must be a JSON object")
    return task


def _task_run(
    config: L2CacheConfig, task: dict[str, Any], body: bytes = b""
) -> tuple[DatasetContext, RunRecord]:
    """The task's dataset context and run (both must exist: else permanent)."""
    if not isinstance(task.get("dataset"), str) or not isinstance(task.get("run_id"), str):
        raise BadTask("task body needs string 'dataset' and 'run_id'")
    if not 0 < len(task["run_id"]) <= MAX_KEY:
        raise BadTask(f"run_id must be 1 to {MAX_KEY} characters")
    try:
        ctx = dataset_context(config, task["dataset"])
    except UnknownDatasetError as exc:
        _record_unknown_dataset(config, task, f"task rejected: {exc}", body)
        raise BadTask(str(exc)) from None
    if ctx.dataset.existing_cache_table:
        raise BadTask(
            f"dataset {ctx.dataset.name!r} is served from an existing cache table "
            f"({ctx.dataset.cache_table_id}) that l2cache does not write"
        )
    try:
        run = ctx.ledger.get_run(task["run_id"])
    except KeyError as exc:
        raise BadTask(str(exc.args[0]) if exc.args else "unknown run") from None
    return ctx, run


def _record_unknown_dataset(
    config: L2CacheConfig, task: dict[str, Any], reason: str, body: bytes
) -> None:
    """Record a task whose dataset the map does not have against its run, best effort.

    The runs table is the map's, not the dataset's, so the run (created by an operator
    whose map has the dataset) can still be told: when the task names the run's own
    dataset, the run's work is lost here and status reports it broken with the reason
    instead of pending forever; a task naming another dataset than its run's is refused
    (counted, the run untouched). No such run, or the table unreachable: the log is the
    record (the task is rejected either way; no retry can add the dataset, and the
    entry points already re-read a map that changed).
    """
    run_id = task["run_id"]
    try:
        instance = bigtable_instance(config.bigtable.project, config.bigtable.instance)
        ledger = RunLedger(instance.table(config.runs_table_id))
        if ledger.get_run(run_id).dataset == task["dataset"]:
            ledger.task_rejected(run_id, reason)
        else:
            ledger.task_refused(run_id, reason, body)
    except Exception as exc:  # noqa: BLE001 - best effort, said in the log
        log.warning("run %r: could not record %r: %s", run_id, reason, describe(exc))


def _check_task(
    ctx: DatasetContext, run: RunRecord, task: dict[str, Any], now_ms: int | None = None
) -> None:
    """What must hold for a task of this run before anything is recorded or written:
    the run's dataset, a kind of task the run has, its chunks inside the run (region
    inside the run's region, span within its chunk count, an ids task's chunk in the
    volume and its ids of that chunk) and an ids task's cell time within the run's
    window (``now_ms``: this worker's clock, for tests)."""
    if task["dataset"] != run.dataset:
        raise BadTask(
            f"task names dataset {task['dataset']!r}; run {run.run_id} is of {run.dataset!r}"
        )
    stream = run.kind in STREAM_KINDS
    if (task.get("kind") == "ids") != stream:
        raise BadTask(
            f"a {task.get('kind') or 'region'} task cannot belong to run {run.run_id} "
            f"({run.kind}): ids tasks are for stream runs, region, span and chunks tasks for "
            "the rest"
        )
    bits = ctx.dataset.spatial_bits
    limit = 1 << int(bits.bits_for(np.array([2]))[0])
    now_ms = int(utc_now().timestamp() * 1000) if now_ms is None else now_ms
    if task.get("kind") == "ids":
        chunk = task["chunk"]
        if any(v >= limit for v in chunk) or not in_volume(ctx.dataset, chunk):
            raise BadTask(f"chunk {chunk} is outside the volume")
        lo = _created_ms(run) - MAX_MESSAGE_AGE_MS
        hi = now_ms + CLOCK_SKEW_MS
        if not lo <= task["at_ms"] <= hi:
            raise BadTask(
                f"at_ms {task['at_ms']} is outside the run's window [{lo}, {hi}] (published "
                f"at most {MAX_MESSAGE_AGE_MS // 86_400_000} days before the run began, "
                f"at most {CLOCK_SKEW_MS // 1000} s after now)"
            )
        ids = np.array(task["ids"], dtype=np.uint64)
        own = idlib.get_chunk_coords(ids, bits)
        if ((own != np.asarray(chunk)).any(1) & (idlib.get_layer(ids) == 2)).any():
            raise BadTask("ids task names layer-2 ids of another chunk")
        return
    if run.region is None:
        raise BadTask(f"run {run.run_id} has no chunk region for a region or span task")
    if task.get("kind") == "chunks":
        lo, hi = run.region[:3], run.region[3:]
        outside = [c for c in task["chunks"] if any(not lo[a] <= c[a] < hi[a] for a in range(3))]
        if outside:
            raise BadTask(
                f"chunks {_short(outside[:3])} are not inside the run's region {run.region}"
            )
        return
    if task.get("kind") == "span":
        if region_size(run.region) != run.n_chunks:
            raise BadTask(f"run {run.run_id} has no chunk region a span can index")
        if task["stop"] > run.n_chunks:
            raise BadTask(
                f"span [{task['start']}, {task['stop']}) exceeds the run's {run.n_chunks} chunks"
            )
        if "t0_ms" in task and not _created_ms(run) - CLOCK_SKEW_MS <= task["t0_ms"] <= (
            now_ms + CLOCK_SKEW_MS
        ):
            raise BadTask(f"t0_ms {task['t0_ms']} is not between the run's start and now")
        return
    region = task["region"]
    if any(v > limit for v in region):
        raise BadTask(f"region {_short(region)} does not fit the dataset's chunk coordinates")
    lo, hi = run.region[:3], run.region[3:]
    if any(region[a] < lo[a] or region[a + 3] > hi[a] for a in range(3)):
        raise BadTask(f"region {_short(region)} is not inside the run's region {run.region}")


def _created_ms(run: RunRecord) -> int:
    """When the run was recorded, in milliseconds since the epoch (naive means UTC)."""
    created = datetime.fromisoformat(run.created_at)
    created = created if created.tzinfo else created.replace(tzinfo=UTC)
    return int(created.timestamp() * 1000)


def _short(value: object, limit: int = 120) -> str:
    """A value for a reason, cut: a forged body's numbers may be thousands of digits."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _reject(
    ctx: DatasetContext | None,
    run: RunRecord | None,
    body: bytes,
    exc: Exception,
) -> tuple[int, dict[str, Any]]:
    """A task refused for good: 2xx so Cloud Tasks stops, recorded where it can be.

    With a known run the refusal is counted on it once per distinct body, with the
    latest reason (:meth:`~l2cache.store.ledger.RunLedger.task_refused`): a forged or
    wrong body names nothing the run can trust, so no chunk is failed and the run is
    not broken by it. Without a run (or when even that record fails) the log is the
    record.
    """
    error = describe(exc)[:MAX_ERROR]
    reason = f"task rejected: {error}"
    log.error("%s (permanent, not retried)", reason)
    if ctx is not None and run is not None:  # a run is only ever read with its context
        _record_refusal(ctx, run, reason, body)
    return 200, {"status": "rejected", "error": error}


def _record_refusal(ctx: DatasetContext, run: RunRecord, reason: str, body: bytes) -> None:
    """Count a refused body on its run, best effort (the log is the record otherwise)."""
    try:
        ctx.ledger.task_refused(run.run_id, reason, body)
    except Exception as exc:  # noqa: BLE001 - said in the log
        log.warning("could not record the refusal: %s", describe(exc))


def _region_shaped(region: object) -> TypeGuard[list[int]]:
    """Six non-negative integers bounding at least one chunk (x0,y0,z0,x1,y1,z1)."""
    return (
        isinstance(region, list)
        and len(region) == 6
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in region)
        and region_size(region) > 0
    )


def _give_up_region(
    ctx: DatasetContext,
    run: RunRecord,
    region: list[int],
    reason: str,
    attempt: int,
    final: bool = False,
) -> tuple[int, dict[str, Any]]:
    """Record that the task's (validated: inside the run's) region gave up: its chunks
    fail and the run can end; then 200.

    503 instead when even that record cannot be written, so the task is delivered again
    rather than leaving the region neither done nor failed; 200 all the same when the
    failure is ``final`` (a missing table stays missing).
    """
    log.error("task for region %s of run %s: %s", region, run.run_id, reason)
    try:
        ctx.ledger.task_gave_up(run.run_id, region, reason, attempt)
    except Exception:
        log.exception("could not record that the task gave up")
        return (200 if final else 503), {"status": "error", "error": reason}
    try:  # the per-chunk index the lookup's per-id state reads (best effort)
        if region_size(region) <= REGION_INDEX_MAX_CHUNKS:
            cids = [chunk_id(ctx, c) for c in region_chunks(region)]
            ctx.ledger.region_gave_up(run, cids, reason)
    except Exception as exc:  # noqa: BLE001 - the region's failure is recorded above
        log.warning("could not index the chunks of the region that gave up: %s", describe(exc))
    return 200, {"status": "failed", "error": reason}


@logs.ids_task
def _ids_task(
    ctx: DatasetContext,
    run: RunRecord,
    task: dict[str, Any],
    attempt: int,
    last: bool,
    dead_letter: DeadLetter | None = None,
) -> tuple[int, dict[str, Any]]:
    """Recompute one chunk's ids of a stream event; record the chunk under the event.

    Ids that cannot be computed (permanently, or after the last attempt) are recorded
    under the event and dead-lettered with exactly those ids and the reason, as on_edit
    does for a message it computes itself.
    """
    from datetime import UTC, datetime

    at = datetime.fromtimestamp(task["at_ms"] / 1000, tz=UTC)
    ids = np.array(task["ids"], dtype=np.uint64)
    cid = chunk_id(ctx, task["chunk"])
    key = task["event_key"]
    try:
        if run.closed is not None:  # fenced by a rollback: refused, the ids dead-lettered
            raise RunClosed(f"run {run.run_id} was closed at {run.closed.get('at')}")
        result = compute_l2_ids(ctx, ids, at, run, cell_timestamp=at, event_key=key)
    except Exception as exc:  # bad input comes back in result["failed"]; a closed run,
        permanent = classify(exc) == PERMANENT  # a missing table: permanent, here
        if not permanent and not last:
            log.exception("ids task failed; Cloud Tasks will retry")
            return 503, {"error": describe(exc)}
        error = describe(exc) if permanent else gave_up(attempt, exc)
        result = {"failed": [{"chunk": task["chunk"], "ids": ids.tolist(), "error": error}]}
    for failure in result["failed"]:
        try:
            ctx.ledger.event_chunk_failed(
                run.run_id, key, cid, failure["error"], len(failure["ids"])
            )
        except Exception as exc:
            if classify(exc) != PERMANENT and not last:
                log.exception("could not record the failed chunk; Cloud Tasks will retry")
                return 503, {"error": describe(exc)}
            log.warning("could not record the failed chunk: %s", describe(exc))
        if dead_letter is not None:
            dead_letter(
                np.asarray(failure["ids"], dtype="<u8").tobytes(),
                dead_letter_attributes(
                    {"table_id": ctx.dataset.name, "l2_cache_id": ctx.dataset.cache_table_id},
                    f"{len(failure['ids'])} ids of event {key} could not be computed: "
                    f"chunk {failure['chunk']}: {failure['error']}",
                    key,
                ),
            )
    if result["failed"]:
        return 200, {"status": "failed", "errors": [f["error"] for f in result["failed"]]}
    return 200, {"status": "done", **{k: v for k, v in result.items() if k != "failed"}}


def _enqueuer(config: L2CacheConfig, task: dict[str, Any]) -> Callable[[list[int]], str | None]:
    """Enqueue a split's sub-regions as tasks of the same run, batch and generation.

    Named deterministically (:func:`l2cache.gcp.tasks.task_id`), so a retried split
    re-enqueues the same names and Cloud Tasks drops the duplicates.
    """
    tasks = config.tasks
    if tasks is None:  # handle_task rejects a split on such a map before it gets here
        raise ValueError("the dataset map has no 'tasks' section")
    client = tasks_client()

    def enqueue(region: list[int]) -> str | None:
        return enqueue_region(
            client,
            tasks,
            task["dataset"],
            task["run_id"],
            region,
            task["batch"],
            task["generation"],
        )

    return enqueue
