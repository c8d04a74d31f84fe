"""Memory, CPU, timeouts and queue concurrency of the functions, from measured figures.

Every number the program sizes with is here or imported here, with where it came from,
so a new measurement changes one constant and the resources follow.

compute_chunk's **memory and CPU** are defined once, in :mod:`l2cache_ops.sizing`
(re-exported below under the same names): the cost of a chunk is priced with exactly
what Pulumi deploys, and it must be computable from an installed ``l2cache`` where
this folder does not exist. Timeouts and concurrency are infra's alone and stay here.

Measurement (BENCHMARKS.md, "Worker path": `bench/worker.py`, the real
``compute_chunk`` on 256x256x512 chunks of the pinky40 data): **~3.0 s per chunk on one
vCPU** (1.53x the bare EDT); memory: see :mod:`l2cache_ops.sizing` (627 MiB peak,
11.6 B per voxel). (Before the worker path was reworked a chunk took ~6 s.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# -- memory and CPU: the one definition, shared with the cost figures -----------------
from l2cache_ops.sizing import (  # noqa: F401  (re-exported: infra reads sizing.<name>)
    BYTES_PER_VOXEL,
    CLOUD_TASKS_MAX_DISPATCHES_PER_S,
    CPU_FOR_MEMORY,
    INTERPRETER_MIB,
    MAX_MEMORY_MIB,
    MEMORY_HEADROOM,
    MEMORY_STEP_MIB,
    MINNIE65_CHUNKS,
    READ_AHEAD_BYTES_PER_VOXEL,
    DispatchPlan,
    SizingError,
    cpu_for_memory,
    plan_dispatch,
    queue_concurrency,
    worker_memory_mib,
)

# -- time ---------------------------------------------------------------------------
SECONDS_PER_CHUNK_VOXEL = 3.0 / (256 * 256 * 512)  # real compute_chunk, one vCPU (bench/worker.py)
COLD_START_S = 10.0  # imports + numba compile on an instance with no kernel cache (~4-5 s) x2
TIME_HEADROOM = 5.0  # cloud reads (GCS, PCG Bigtable) are slower and noisier than local ones
MIN_TIMEOUT_S = 120
# Cloud Tasks waits this long for an HTTP target by default (the tasks carry no
# dispatch_deadline): a longer function timeout would be retried while still running.
TASK_DISPATCH_DEADLINE_S = 600
# Pub/Sub's longest push ack deadline: on_edit must answer within it or be redelivered.
PUSH_ACK_DEADLINE_S = 600
DEFAULT_CHUNKS_PER_TASK = 4  # = l2cache.domain.regions.DEFAULT_BATCH, the CLI's --batch default

# -- concurrency ----------------------------------------------------------------------
WORKER_REQUESTS_PER_INSTANCE = 1  # memory is sized for exactly one chunk at a time
DEFAULT_WORKER_MAX_INSTANCES = 50
# the bulk queue's share; the edits queue keeps the rest (l2cache_ops.sizing.queue_concurrency)
DEFAULT_QUEUE_MAX_CONCURRENT = queue_concurrency(
    DEFAULT_WORKER_MAX_INSTANCES, WORKER_REQUESTS_PER_INSTANCE
)[0]


def chunk_seconds(chunk_size: Sequence[int]) -> float:
    """Measured seconds of the real worker path for one chunk of this size, one vCPU."""
    return math.prod(chunk_size) * SECONDS_PER_CHUNK_VOXEL


def worker_timeout_s(
    chunk_size: Sequence[int], chunks_per_task: int = DEFAULT_CHUNKS_PER_TASK
) -> int:
    """compute_chunk timeout: (cold start + chunks x measured time) x 5, at least 120 s.

    256x256x512, 4 chunks per task: (10 + 4 x 3.0) x 5 = 110 -> the 120 s floor. Raises if that exceeds
    Cloud Tasks' 600 s dispatch deadline (use fewer chunks per task).
    """
    need = math.ceil((COLD_START_S + chunks_per_task * chunk_seconds(chunk_size)) * TIME_HEADROOM)
    timeout = max(MIN_TIMEOUT_S, need)
    if timeout > TASK_DISPATCH_DEADLINE_S:
        raise SizingError(
            f"{chunks_per_task} chunks of {tuple(chunk_size)} per task need a {timeout} s "
            f"timeout, over Cloud Tasks' {TASK_DISPATCH_DEADLINE_S} s dispatch deadline: "
            "lower l2cache:maxChunksPerTask (and ingest with --batch no larger)"
        )
    return timeout


def on_edit_timeout_s(
    chunk_size: Sequence[int], chunks_per_task: int = DEFAULT_CHUNKS_PER_TASK
) -> int:
    """on_edit computes at most one task's worth of chunks; within Pub/Sub's ack deadline."""
    return min(worker_timeout_s(chunk_size, chunks_per_task), PUSH_ACK_DEADLINE_S)


def check_queue_concurrency(
    max_concurrent: int, worker_max_instances: int, edits_max_concurrent: int | None = None
) -> None:
    """Dispatches beyond the instances that can take them only queue up inside Cloud Run
    (and time out or 429); refuse the configuration instead of deploying it. With an
    explicit ``edits_max_concurrent`` both queues together must fit: the edits queue's
    share is what keeps an edit from waiting behind a bulk ingest."""
    capacity = worker_max_instances * WORKER_REQUESTS_PER_INSTANCE
    if edits_max_concurrent is not None and max_concurrent + edits_max_concurrent > capacity:
        raise SizingError(
            f"l2cache:queueMaxConcurrent={max_concurrent} + "
            f"l2cache:editsQueueMaxConcurrent={edits_max_concurrent} exceeds what "
            f"compute_chunk can run at once: l2cache:workerMaxInstances={worker_max_instances}"
            f" x {WORKER_REQUESTS_PER_INSTANCE} = {capacity}; an edit would wait for a free "
            "worker behind the bulk queue"
        )
    if max_concurrent > capacity:
        raise SizingError(
            f"l2cache:queueMaxConcurrent={max_concurrent} exceeds what compute_chunk can run "
            f"at once: l2cache:workerMaxInstances={worker_max_instances} x "
            f"{WORKER_REQUESTS_PER_INSTANCE} request per instance = {capacity}; lower "
            "queueMaxConcurrent or raise workerMaxInstances"
        )
