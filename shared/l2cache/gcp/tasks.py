"""Cloud Tasks: the client (real API or the local emulator) and HTTP task creation.

There is no official emulator variable, so ``L2CACHE_TASKS_EMULATOR_HOST`` selects
the local emulator (``l2cache_tools.local.tasks_emulator``) over an insecure loopback
channel; otherwise the client uses the real API with default credentials. Tasks
carry a JSON body with an explicit Content-Type (without it the emulator delivers
form-encoded bodies) and, in the cloud, an OIDC token of the queue's service account.

Task names start with a hash of what they name (run, span or region, generation), not
with the run id: Cloud Tasks shards its index by name, and its documentation warns that
names sharing a prefix (sequential or timestamped ones) raise latency and errors. The
hash is deterministic, so a retried split re-enqueues the same names and the queue drops
the duplicates. Multi-chunk edits go on the edits queue (``tasks.edits_queue``), never
behind a bulk run's tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import grpc
import numpy as np
from google.api_core import exceptions as api_exceptions
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport
from google.protobuf import duration_pb2, timestamp_pb2

from l2cache.config import TasksConfig

EMULATOR_ENV = "L2CACHE_TASKS_EMULATOR_HOST"
MAX_TASK_CHUNKS = 64  # chunks of one explicit-list task (a leaf's work stays bounded)


def tasks_client() -> tasks_v2.CloudTasksClient:
    """The local emulator's client when ``L2CACHE_TASKS_EMULATOR_HOST`` is set, else the API's."""
    host = os.environ.get(EMULATOR_ENV)
    if host:
        # No message size limit, as the API client's own channel (gRPC's default 4 MiB
        # receive limit fails a ListTasks of a large run on the emulator).
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        channel = grpc.insecure_channel(host, options=unlimited)
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    return tasks_v2.CloudTasksClient()


def queue_path(
    client: tasks_v2.CloudTasksClient, cfg: TasksConfig, queue: str | None = None
) -> str:
    """The resource name of ``queue`` (default: the map's bulk queue, ``tasks.queue``)."""
    return client.queue_path(cfg.project, cfg.location, queue or cfg.queue)


def ensure_queue(
    client: tasks_v2.CloudTasksClient,
    cfg: TasksConfig,
    max_attempts: int | None = None,
    min_backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    max_concurrent: int = 2,
    queue: str | None = None,
    max_per_second: float | None = None,
) -> None:
    """Create ``queue`` (default: the bulk queue) with its retry and rate settings if it
    does not exist.

    ``max_attempts`` defaults to the map's ``tasks.max_attempts``: the handler answers
    the last attempt itself ("gave up"), so the queue must give up at the same count.
    """
    max_attempts = cfg.max_attempts if max_attempts is None else max_attempts
    parent = f"projects/{cfg.project}/locations/{cfg.location}"
    name = queue_path(client, cfg, queue)
    existing = {q.name for q in client.list_queues(parent=parent)}
    if name in existing:
        return
    client.create_queue(
        parent=parent,
        queue=tasks_v2.Queue(
            name=name,
            retry_config=tasks_v2.RetryConfig(
                max_attempts=max_attempts,
                min_backoff=duration_pb2.Duration(
                    seconds=int(min_backoff_s), nanos=int(min_backoff_s % 1 * 1e9)
                ),
                max_backoff=duration_pb2.Duration(seconds=int(max_backoff_s)),
            ),
            rate_limits=tasks_v2.RateLimits(
                max_concurrent_dispatches=max_concurrent,
                **({"max_dispatches_per_second": max_per_second} if max_per_second else {}),
            ),
        ),
    )


def _name(scattered: str, readable: str) -> str:
    """``<16 hex of sha256(scattered)>-<readable>``: the hash spreads names over Cloud
    Tasks' index; the readable tail is for people. Ids are ``[A-Za-z0-9_-]``, <= 500."""
    digest = hashlib.sha256(scattered.encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9_-]", "_", readable)
    if len(tail) > 480:
        tail = tail[:400] + "-" + hashlib.sha256(tail.encode()).hexdigest()[:32]
    return f"{digest}-{tail}"


def task_id(run_id: str, region: Sequence[int], generation: int | str = 0) -> str:
    """Deterministic task id for one (run, region, generation).

    Cloud Tasks refuses a second task with the same name (ALREADY_EXISTS), so a split
    task that is retried re-enqueues the same names and duplicates are dropped by the
    queue itself, not by luck. ``generation`` distinguishes deliberate re-runs
    (resume, reconcile): Cloud Tasks keeps a name reserved for a while after the task
    ran, so a re-run needs new names. The name starts with a hash (module docstring).
    """
    box = "-".join(str(int(v)) for v in region)
    return _name(f"{run_id}|{generation}|{box}", f"{run_id}-g{generation}-{box}")


def span_task_id(run_id: str, start: int, stop: int, generation: int | str = 0) -> str:
    """Deterministic, scattered task id for one span ``[start, stop)`` of a run's
    permuted chunk order under ``generation`` (see :func:`task_id`)."""
    return _name(
        f"span|{run_id}|{generation}|{start}|{stop}",
        f"{run_id}-g{generation}-s{int(start)}-{int(stop)}",
    )


def enqueue(
    client: tasks_v2.CloudTasksClient,
    cfg: TasksConfig,
    payload: dict[str, Any],
    name: str | None = None,
    queue: str | None = None,
    schedule_time: datetime | None = None,
) -> str | None:
    """Create one HTTP POST task for the compute function on ``queue`` (default: the
    bulk queue), not dispatched before ``schedule_time`` when given.

    Returns the task name, or None when a task of that ``name`` already exists (a
    duplicate: the earlier one does the work).
    """
    http = tasks_v2.HttpRequest(
        http_method=tasks_v2.HttpMethod.POST,
        url=cfg.compute_url,
        headers={"Content-Type": "application/json"},
        body=json.dumps(payload, sort_keys=True).encode(),
    )
    if cfg.service_account_email:
        http.oidc_token = tasks_v2.OidcToken(service_account_email=cfg.service_account_email)
    parent = queue_path(client, cfg, queue)
    task = tasks_v2.Task(http_request=http)
    if schedule_time is not None:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(schedule_time)
        task.schedule_time = stamp
    if name:
        task.name = f"{parent}/tasks/{name}"
    try:
        created = client.create_task(parent=parent, task=task)
    except api_exceptions.AlreadyExists:
        return None
    return created.name


def enqueue_region(
    client: tasks_v2.CloudTasksClient,
    cfg: TasksConfig,
    dataset: str,
    run_id: str,
    region: Sequence[int],
    batch: int,
    generation: int | str = 0,
) -> str | None:
    """Enqueue the task for one region of a run under its deterministic name."""
    payload = {
        "dataset": dataset,
        "run_id": run_id,
        "region": [int(v) for v in region],
        "batch": int(batch),
        "generation": generation,
    }
    return enqueue(client, cfg, payload, task_id(run_id, region, generation))


def enqueue_span(
    client: tasks_v2.CloudTasksClient,
    cfg: TasksConfig,
    dataset: str,
    run_id: str,
    start: int,
    stop: int,
    batch: int,
    generation: int | str = 0,
    t0_ms: int | None = None,
    schedule_time: datetime | None = None,
) -> str | None:
    """Enqueue the span task ``[start, stop)`` of a run under its scattered name.

    ``t0_ms`` is the time the warm-up ramp counts from (the children inherit it, so a
    resumed run ramps from its resume); ``schedule_time`` is set on leaf spans only.
    """
    payload: dict[str, Any] = {
        "kind": "span",
        "dataset": dataset,
        "run_id": run_id,
        "start": int(start),
        "stop": int(stop),
        "batch": int(batch),
        "generation": generation,
    }
    if t0_ms is not None:
        payload["t0_ms"] = int(t0_ms)
    name = span_task_id(run_id, start, stop, generation)
    return enqueue(client, cfg, payload, name, schedule_time=schedule_time)


def chunks_task_id(run_id: str, chunks: Sequence[Sequence[int]], generation: int | str) -> str:
    """Deterministic, scattered task id for an explicit chunk list of a run (reconcile's
    batches): the same chunks under the same generation are one task."""
    listed = ";".join(",".join(str(int(v)) for v in c) for c in chunks)
    first = "-".join(str(int(v)) for v in chunks[0])
    return _name(f"chunks|{run_id}|{generation}|{listed}", f"{run_id}-g{generation}-c{first}")


def enqueue_chunks(
    client: tasks_v2.CloudTasksClient,
    cfg: TasksConfig,
    dataset: str,
    run_id: str,
    chunks: Sequence[Sequence[int]],
    generation: int | str,
) -> str | None:
    """Enqueue one task computing an explicit list of a run's chunks (at most
    :data:`MAX_TASK_CHUNKS`): what reconcile re-queues a run's scattered failures in,
    a batch per task instead of a task per chunk."""
    if not 0 < len(chunks) <= MAX_TASK_CHUNKS:
        raise ValueError(f"a chunks task holds 1 to {MAX_TASK_CHUNKS} chunks, got {len(chunks)}")
    payload = {
        "kind": "chunks",
        "dataset": dataset,
        "run_id": run_id,
        "chunks": [[int(v) for v in c] for c in chunks],
        "generation": generation,
    }
    return enqueue(client, cfg, payload, chunks_task_id(run_id, chunks, generation))


def enqueue_chunk_ids(
    client: tasks_v2.CloudTasksClient,
    cfg: TasksConfig,
    dataset: str,
    run_id: str,
    event_key: str,
    chunk: Sequence[int],
    ids: Sequence[int] | np.ndarray,
    at_ms: int,
) -> str | None:
    """Enqueue the recompute of ``ids`` (all in ``chunk``) for one stream event.

    Named per (run, event, chunk): a redelivered message enqueues nothing twice. Goes
    on the edits queue (``tasks.edits_queue``), so it never waits behind a bulk run.
    """
    payload = {
        "kind": "ids",
        "dataset": dataset,
        "run_id": run_id,
        "event_key": event_key,
        "chunk": [int(v) for v in chunk],
        "ids": [int(v) for v in ids],
        "at_ms": int(at_ms),
    }
    name = task_id(run_id, list(chunk), f"e{event_key}")
    return enqueue(client, cfg, payload, name, queue=cfg.edits_queue_name)
