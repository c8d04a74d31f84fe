"""compute_chunk's memory and CPU, from measured figures: the one definition.

Pulumi deploys exactly these numbers (``infra/sizing.py`` imports them from here) and
the cost of a chunk is priced with them (:func:`l2cache_ops.cost.worker_prices`). They
live in the operations package, not in ``infra/``, so that a cost figure is the same
from a checkout and from an installed ``l2cache`` (``infra/`` is not a package and is
not installed); ``infra`` may import ``l2cache_ops``, never the other way round.

Measurement (BENCHMARKS.md, "Worker path": ``bench/worker.py``, the real
``compute_chunk`` on 256x256x512 chunks (33.5 M voxels) of the pinky40 data, graph read,
CloudVolume chunk read, feature engine and Bigtable write): peak **627 MiB VmHWM** in a
fresh process, 256 MiB of it the interpreter after imports (python + numpy + numba +
Google clients), so **11.6 B per voxel**. We size with 14 B/voxel and 300 MiB, then
1.25x headroom. (Before the worker path was reworked it peaked at 1.26-1.42 GiB,
31-36 B/voxel.)

Only :mod:`math` is imported at load: infra loads this at every ``pulumi up``. The
dispatch sizing (:func:`plan_dispatch`, the end of this module) imports the span tree
and the warm-up ramp from :mod:`l2cache.domain.spans` when called, so infra, the CLI
and the workers count tasks and ramp offsets with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

# The production chunk (PCG's 256x256x512 at layer 2): what cost assumes when it is told
# no chunk size.
PRODUCTION_CHUNK = (256, 256, 512)


class SizingError(ValueError):
    """A configuration the sized resources cannot serve; the message says what to change."""


def worker_memory_mib(chunk_size: Sequence[int], read_ahead: bool = False) -> int:
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
    """The fewest vCPUs Cloud Run allows with ``memory_mib`` (1 up to 4 GiB); a string,
    as Cloud Run's ``available_cpu`` takes it."""
    for limit, cpus in CPU_FOR_MEMORY:
        if memory_mib <= limit:
            return str(cpus)
    raise SizingError(f"{memory_mib} MiB is over Cloud Run's {MAX_MEMORY_MIB} MiB")


# -- dispatch: the queue's rate and concurrency, from the dataset's size ----------------
# Cloud Tasks' per-queue limits (https://cloud.google.com/tasks/docs/quotas).
CLOUD_TASKS_MAX_DISPATCHES_PER_S = 500.0
CLOUD_TASKS_MAX_CONCURRENT = 5000
MIN_DISPATCHES_PER_S = 20.0  # the rate every queue had before; the floor for small runs
DISPATCH_TARGET_S = 3 * 3600  # issue 18: a connectome's fan-out dispatched within 3 h
MINNIE65_CHUNKS = 11_600_000  # the connectome the target is set for
EDITS_RESERVE_FRACTION = 0.1  # of the workers' capacity, kept for the edits queue
MAX_SIZED_BATCH = 32  # chunks per task the sizing may choose (timeouts: infra/sizing.py)
MIN_SIZED_BATCH = 4  # = l2cache.domain.regions.DEFAULT_BATCH, the CLI's --batch default
# the rate is chosen to dispatch within this share of the target, so a slower queue
# (retries, a paused hour) still ends within it
DISPATCH_HEADROOM = 2 / 3


@dataclass(frozen=True)
class DispatchPlan:
    """How a run of ``n_chunks`` is dispatched: the queues' settings and the projection.

    ``dispatch_s`` is the time for the queue to hand out every task (leaves follow the
    warm-up ramp capped at the queue's rate; split tasks take dispatch slots too);
    ``compute_s`` is the wall time the workers need at ``max_concurrent_dispatches``, at
    ``chunk_s`` per chunk: the run ends at the later of the two.
    """

    n_chunks: int
    batch: int
    fan_out: int
    leaves: int
    splits: int
    max_dispatches_per_second: float
    max_concurrent_dispatches: int
    edits_max_concurrent: int
    ramp_to_max_s: float
    dispatch_s: float
    compute_s: float

    @property
    def tasks(self) -> int:
        """Every task the run's fan-out dispatches (leaves and splits)."""
        return self.leaves + self.splits

    def summary(self) -> str:
        """One paragraph for the CLI: what the queue does with a run of this size."""
        return (
            f"dispatch of {self.n_chunks:,} chunks: {self.tasks:,} tasks ({self.leaves:,} "
            f"leaves of {self.batch} chunks, {self.splits:,} splits, fan-out {self.fan_out}) "
            f"at <= {self.max_dispatches_per_second:g}/s after a {self.ramp_to_max_s / 60:.0f} "
            f"min warm-up ramp: {self.dispatch_s / 3600:.2f} h; compute at "
            f"{self.max_concurrent_dispatches} concurrent tasks: {self.compute_s / 3600:,.1f} h "
            f"({self.edits_max_concurrent} more kept for the edits queue)"
        )


def queue_concurrency(max_instances: int, per_instance: int = 1) -> tuple[int, int]:
    """(bulk queue, edits queue) ``max_concurrent_dispatches`` for workers of
    ``max_instances`` x ``per_instance`` requests: the edits queue keeps 10 % of that
    capacity (at least 1) that the bulk queue can never fill, so an edit is dispatched
    to a free worker even while a bulk ingest saturates the rest. With a capacity of 1
    both queues get 1 (and share it)."""
    capacity = max_instances * per_instance
    if capacity < 2:
        return max(capacity, 1), 1
    reserve = max(1, round(capacity * EDITS_RESERVE_FRACTION))
    return min(capacity - reserve, CLOUD_TASKS_MAX_CONCURRENT), reserve


def dispatch_seconds(n_chunks: int, batch: int, fan_out: int, rate: float, ramp: Any) -> float:
    """Projected time for a queue of ``rate`` dispatches/s to dispatch a run's span tree:
    the last leaf's due time under ``ramp`` (a :class:`l2cache.domain.spans.Ramp`)
    capped at ``rate``, plus the split tasks' share of the dispatches."""
    from l2cache.domain.spans import Ramp, ramp_offset_s, span_tree_size

    leaves, splits = span_tree_size(n_chunks, batch, fan_out)
    if leaves == 0:
        return 0.0
    if ramp is not None and ramp.enabled:
        capped = Ramp(ramp.start_per_s, ramp.growth, ramp.step_s, min(ramp.max_per_s, rate))
        last = float(ramp_offset_s(leaves - 1, capped))
    else:
        last = (leaves - 1) / rate
    return last + splits / rate


def plan_dispatch(
    n_chunks: int,
    max_instances: int,
    per_instance: int = 1,
    chunk_s: float = 3.0,
    fan_out: int | None = None,
    ramp: Any = None,
    target_s: float = DISPATCH_TARGET_S,
    batch: int | None = None,
    max_batch: int = MAX_SIZED_BATCH,
) -> DispatchPlan:
    """The queue settings for datasets of ``n_chunks`` and workers of ``max_instances``.

    - ``batch`` (unless given): the smallest number of chunks per task, from the CLI's
      default 4 up, whose dispatch at Cloud Tasks' 500/s cap, ramp included, fits
      ``target_s`` (3 h); smaller batches retry less work and scatter finer. (minnie65,
      11.6 M chunks: 4 -> 2.50 h at 500/s.)
    - ``max_dispatches_per_second``: the lowest rate (>= 20/s, the old fixed rate;
      <= 500/s) that dispatches that tree within 2/3 of the target (headroom for retries
      and pauses), so a small dataset's queue stays gentle on Bigtable and PCG; 500/s
      when even that cap cannot.
    - ``max_concurrent_dispatches``: :func:`queue_concurrency` of the workers.
    ``ramp`` defaults to :class:`l2cache.domain.spans.Ramp` (5/s, x1.5 per 5 min).
    """
    from l2cache.domain.spans import DEFAULT_FAN_OUT, Ramp, span_tree_size

    fan_out = fan_out or DEFAULT_FAN_OUT
    ramp = Ramp() if ramp is None else ramp
    cap = CLOUD_TASKS_MAX_DISPATCHES_PER_S
    if batch is None:
        batch = next(
            (
                b
                for b in range(MIN_SIZED_BATCH, max_batch + 1)
                if dispatch_seconds(n_chunks, b, fan_out, cap, ramp) <= target_s
            ),
            max_batch,
        )
    lo, hi = MIN_DISPATCHES_PER_S, cap
    aim = target_s * DISPATCH_HEADROOM
    if dispatch_seconds(n_chunks, batch, fan_out, hi, ramp) > aim:
        rate = cap
    elif dispatch_seconds(n_chunks, batch, fan_out, lo, ramp) > aim:
        for _ in range(40):  # bisection: dispatch time falls as the rate grows
            mid = (lo + hi) / 2
            if dispatch_seconds(n_chunks, batch, fan_out, mid, ramp) <= aim:
                hi = mid
            else:
                lo = mid
        rate = float(min(cap, math.ceil(hi)))
    else:
        rate = lo
    bulk, edits = queue_concurrency(max_instances, per_instance)
    leaves, splits = span_tree_size(n_chunks, batch, fan_out)
    if ramp.enabled and ramp.start_per_s < rate:
        ramp_s = math.ceil(math.log(rate / ramp.start_per_s) / math.log(ramp.growth)) * ramp.step_s
    else:
        ramp_s = 0.0
    return DispatchPlan(
        n_chunks=n_chunks,
        batch=batch,
        fan_out=fan_out,
        leaves=leaves,
        splits=splits,
        max_dispatches_per_second=rate,
        max_concurrent_dispatches=bulk,
        edits_max_concurrent=edits,
        ramp_to_max_s=float(ramp_s),
        dispatch_s=dispatch_seconds(n_chunks, batch, fan_out, rate, ramp),
        compute_s=leaves * batch * chunk_s / bulk,
    )
