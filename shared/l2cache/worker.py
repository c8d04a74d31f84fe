"""The compute_chunk task handler: split a region or compute a batch of chunks.

Task body (JSON)::

    {"dataset": "...", "run_id": "...", "region": [x0, y0, z0, x1, y1, z1], "batch": 4,
     "generation": 0}

A region with more than ``batch`` chunks is split and a task per part is enqueued
under a deterministic name (a retried split re-enqueues the same names and Cloud Tasks
drops the duplicates); a smaller one is computed here, skipping chunks the run already
finished (resume and duplicate delivery cost nothing and count once).

The HTTP status follows the failure contract (:mod:`l2cache.failures`), because Cloud
Tasks retries every non-2xx answer: 200 for success and for permanent failures
(recorded: in the ledger when the run exists, in the log otherwise), 503 for transient
ones, and 200 again on the task's last attempt, after recording "gave up after N
attempts" for whatever it could not finish.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from . import logs
from .config import L2CacheConfig, UnknownDatasetError
from .failures import BadRequest, PermanentError, describe, gave_up
from .ingest import DEFAULT_BATCH, plan_task, region_size
from .pipeline import chunk_id, compute_chunk, dataset_context

log = logging.getLogger(__name__)

RETRY_COUNT_HEADER = "X-CloudTasks-TaskRetryCount"


class BadTask(BadRequest):
    pass


def parse_task(body: bytes) -> dict[str, Any]:
    try:
        task = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadTask(f"task body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(task, dict):
        raise BadTask("task body must be a JSON object")
    if task.get("kind") == "ids":
        return _parse_ids_task(task)
    for key in ("dataset", "run_id", "region"):
        if key not in task:
            raise BadTask(f"task body lacks {key!r}")
    if not isinstance(task["dataset"], str) or not isinstance(task["run_id"], str):
        raise BadTask("dataset and run_id must be strings")
    region = task["region"]
    if (
        not isinstance(region, list)
        or len(region) != 6
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in region)
        or region_size(region) == 0
    ):
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


def _parse_ids_task(task: dict) -> dict[str, Any]:
    """An ids task (one chunk of a fanned-out message): see :func:`l2cache.tasks.enqueue_chunk_ids`."""
    for key in ("dataset", "run_id", "event_key", "chunk", "ids", "at_ms"):
        if key not in task:
            raise BadTask(f"ids task lacks {key!r}")
    if not all(isinstance(task[k], str) for k in ("dataset", "run_id", "event_key")):
        raise BadTask("dataset, run_id and event_key must be strings")
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
    enqueue: Callable[[list[int]], Any] | None = None,
) -> tuple[int, dict]:
    """Run one task; returns (HTTP status, JSON summary)."""
    attempt = attempt_number(headers)
    max_attempts = config.tasks.max_attempts if config.tasks else None
    last = max_attempts is not None and attempt >= max_attempts
    try:
        task = parse_task(body)
        try:
            ctx = dataset_context(config, task["dataset"])
        except UnknownDatasetError as exc:
            raise BadTask(str(exc)) from None
        try:
            run = ctx.ledger.get_run(task["run_id"])
        except KeyError as exc:
            raise BadTask(str(exc.args[0]) if exc.args else "unknown run") from None
    except PermanentError as exc:
        # nothing to record it against: the log is the record (Cloud Logging keeps it)
        log.error("task rejected (permanent, not retried): %s", exc)
        return 200, {"status": "rejected", "error": str(exc)}
    except Exception as exc:  # reading the runs table failed: transient
        log.exception("task could not start")
        return (200 if last else 503), {"status": "error", "error": describe(exc)}

    if task.get("kind") == "ids":
        return _ids_task(ctx, run, task, attempt, last)
    kind, items = plan_task(task["region"], task["batch"])
    try:
        if kind == "split":
            enqueue = enqueue or _enqueuer(config, task)
            for sub in items:
                enqueue(sub)
            return 200, {"split": len(items)}
        done = ctx.ledger.done_among(run.run_id, [chunk_id(ctx, c) for c in items])
        results = []
        for coords in items:
            if chunk_id(ctx, coords) in done:
                results.append({"chunk": coords, "status": "skipped"})
                continue
            results.append(compute_chunk(ctx, run, coords, max_attempts, last))
        return 200, {"chunks": results}
    except Exception as exc:  # transient: Bigtable/storage hiccup, enqueue failure, ...
        if last:
            reason = gave_up(attempt, exc)
            log.error("task for region %s of run %s: %s", task["region"], run.run_id, reason)
            try:
                ctx.ledger.task_gave_up(run.run_id, task["region"], reason, attempt)
            except Exception:
                log.exception("could not record that the task gave up")
                return 503, {"status": "error", "error": reason}
            return 200, {"status": "failed", "error": reason}
        log.exception("task failed; Cloud Tasks will retry")
        return 503, {"error": describe(exc)}


@logs.ids_task
def _ids_task(ctx, run, task: dict, attempt: int, last: bool) -> tuple[int, dict]:
    """Recompute one chunk's ids of a stream event; record the chunk under the event."""
    from datetime import UTC, datetime

    import numpy as np

    from .pipeline import compute_l2_ids

    at = datetime.fromtimestamp(task["at_ms"] / 1000, tz=UTC)
    ids = np.array(task["ids"], dtype=np.uint64)
    cid = chunk_id(ctx, task["chunk"])
    try:
        result = compute_l2_ids(ctx, ids, at, run, cell_timestamp=at, event_key=task["event_key"])
    except Exception as exc:  # transient (permanent ones come back in result["failed"])
        if not last:
            log.exception("ids task failed; Cloud Tasks will retry")
            return 503, {"error": describe(exc)}
        reason = gave_up(attempt, exc)
        ctx.ledger.event_chunk_failed(run.run_id, task["event_key"], cid, reason, ids.size)
        return 200, {"status": "failed", "error": reason}
    for failure in result["failed"]:
        ctx.ledger.event_chunk_failed(
            run.run_id, task["event_key"], cid, failure["error"], len(failure["ids"])
        )
    status = "failed" if result["failed"] else "done"
    return 200, {"status": status, **{k: v for k, v in result.items() if k != "failed"}}


def _enqueuer(config: L2CacheConfig, task: dict) -> Callable[[list[int]], Any]:
    from .tasks import enqueue_region, tasks_client

    client = tasks_client()

    def enqueue(region: list[int]):
        return enqueue_region(
            client,
            config.tasks,
            task["dataset"],
            task["run_id"],
            region,
            task["batch"],
            task["generation"],
        )

    return enqueue
