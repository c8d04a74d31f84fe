"""Memory, CPU, timeouts and queue concurrency of the functions, from measured figures.

Every number the program sizes with is here, with where it came from, so a new
measurement changes one constant and the resources follow.

Measurement (BENCHMARKS.md, "Worker path": `bench/worker.py`, the real
``compute_chunk`` on 256x256x512 chunks (33.5 M voxels) of the pinky40 data, graph read,
CloudVolume chunk read, feature engine and Bigtable write): peak **627 MiB VmHWM** in a
fresh process, 256 MiB of it the interpreter after imports (python + numpy + numba +
Google clients), so **11.6 B per voxel**; **~3.0 s per chunk on one vCPU** (1.53x the
bare EDT). We size with 14 B/voxel and 300 MiB, then 1.25x headroom. (Before the worker
path was reworked it peaked at 1.26-1.42 GiB, 31-36 B/voxel, and took ~6 s.)
"""

from __future__ import annotations

import math

# -- memory -------------------------------------------------------------------------
INTERPRETER_MIB = 300  # python + numpy + numba + clients, measured ~250-300 MiB
BYTES_PER_VOXEL = 14  # real worker path above the interpreter: measured 11.6
# tasks.read_ahead: one more chunk's read in flight next to the engine, measured +182 MiB
# (5.7 B/voxel) on 256x256x512 (822 vs 640 MiB VmHWM, bench/worker.py "batch")
READ_AHEAD_BYTES_PER_VOXEL = 8
MEMORY_HEADROOM = 1.25  # on top of the measured peak: allocator fragmentation, larger nodes
MEMORY_STEP_MIB = 256  # Cloud Run takes any size; we round up to 256 MiB steps
MAX_MEMORY_MIB = 32 * 1024  # Cloud Run's ceiling

# Cloud Run: memory above these limits needs at least this many vCPUs
# (https://cloud.google.com/run/docs/configuring/services/memory-limits).
CPU_FOR_MEMORY = ((4096, 1), (8192, 2), (16384, 4), (24576, 6), (MAX_MEMORY_MIB, 8))

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
DEFAULT_QUEUE_MAX_CONCURRENT = DEFAULT_WORKER_MAX_INSTANCES * WORKER_REQUESTS_PER_INSTANCE


class SizingError(ValueError):
    """A configuration the sized resources cannot serve; the message says what to change."""


def worker_memory_mib(chunk_size, read_ahead: bool = False) -> int:
    """Memory for a compute function: (14 B x voxels + 300 MiB) x 1.25, up to 256 MiB.

    256x256x512 -> (448 + 300) x 1.25 = 935 -> 1,024 MiB, against the measured 627 MiB
    peak (1.63x). With the map's ``tasks.read_ahead`` 8 B/voxel more: 1,280 MiB.
    """
    voxels = math.prod(chunk_size)
    per_voxel = BYTES_PER_VOXEL + (READ_AHEAD_BYTES_PER_VOXEL if read_ahead else 0)
    need = (voxels * per_voxel / 2**20 + INTERPRETER_MIB) * MEMORY_HEADROOM
    mib = int(math.ceil(need / MEMORY_STEP_MIB) * MEMORY_STEP_MIB)
    if mib > MAX_MEMORY_MIB:
        raise SizingError(
            f"chunk size {tuple(chunk_size)} needs {mib} MiB per worker, over Cloud Run's "
            f"{MAX_MEMORY_MIB} MiB"
        )
    return mib


def cpu_for_memory(memory_mib: int) -> str:
    """The fewest vCPUs Cloud Run allows with ``memory_mib`` (1 up to 4 GiB)."""
    for limit, cpus in CPU_FOR_MEMORY:
        if memory_mib <= limit:
            return str(cpus)
    raise SizingError(f"{memory_mib} MiB is over Cloud Run's {MAX_MEMORY_MIB} MiB")


def chunk_seconds(chunk_size) -> float:
    """Measured seconds of the real worker path for one chunk of this size, one vCPU."""
    return math.prod(chunk_size) * SECONDS_PER_CHUNK_VOXEL


def worker_timeout_s(chunk_size, chunks_per_task: int = DEFAULT_CHUNKS_PER_TASK) -> int:
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


def on_edit_timeout_s(chunk_size, chunks_per_task: int = DEFAULT_CHUNKS_PER_TASK) -> int:
    """on_edit computes at most one task's worth of chunks; within Pub/Sub's ack deadline."""
    return min(worker_timeout_s(chunk_size, chunks_per_task), PUSH_ACK_DEADLINE_S)


def check_queue_concurrency(max_concurrent: int, worker_max_instances: int) -> None:
    """Dispatches beyond the instances that can take them only queue up inside Cloud Run
    (and time out or 429); refuse the configuration instead of deploying it."""
    capacity = worker_max_instances * WORKER_REQUESTS_PER_INSTANCE
    if max_concurrent > capacity:
        raise SizingError(
            f"l2cache:queueMaxConcurrent={max_concurrent} exceeds what compute_chunk can run "
            f"at once: l2cache:workerMaxInstances={worker_max_instances} x "
            f"{WORKER_REQUESTS_PER_INSTANCE} request per instance = {capacity}; lower "
            "queueMaxConcurrent or raise workerMaxInstances"
        )
