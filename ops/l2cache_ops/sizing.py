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

Only :mod:`math` is imported: infra loads this at every ``pulumi up``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
