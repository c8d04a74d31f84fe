"""Chunk regions of a dataset and how a compute_chunk task splits one.

A run is started with ONE task for its whole region. A task whose region holds more
than ``batch`` chunks splits it (halving the longer axes, up to 8 parts) and enqueues
a task per part; a task with at most ``batch`` chunks computes them. Enqueueing
millions of chunks is therefore itself spread over the workers, in O(log n) levels,
and no single process creates more than 8 tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product
from typing import Protocol

import numpy as np


class DatasetGeometry(Protocol):
    """What a region needs of a dataset (``l2cache.config.DatasetConfig`` has it); a
    protocol, so the domain layer does not depend on the dataset map."""

    name: str
    chunk_size: tuple[int, int, int]
    voxel_offset: tuple[int, int, int]
    volume_size: tuple[int, int, int] | None


DEFAULT_BATCH = 4


def chunk_grid(dataset: DatasetGeometry) -> np.ndarray:
    """Number of atomic chunks along x, y, z."""
    if dataset.volume_size is None:
        raise ValueError(f"dataset {dataset.name!r} has no volume_size: give it or a --bbox")
    return -(-np.asarray(dataset.volume_size) // np.asarray(dataset.chunk_size))


def region_from_bbox(dataset: DatasetGeometry, bbox_voxels: Sequence[int] | None) -> list[int]:
    """Chunk region ``[x0, y0, z0, x1, y1, z1)`` covering a voxel box (default: all)."""
    grid = chunk_grid(dataset)
    if bbox_voxels is None:
        return [0, 0, 0, *grid.tolist()]
    box = np.asarray(bbox_voxels, dtype=np.int64).reshape(2, 3) - np.asarray(dataset.voxel_offset)
    cs = np.asarray(dataset.chunk_size)
    lo = np.clip(box[0] // cs, 0, grid)
    hi = np.clip(-(-box[1] // cs), 0, grid)
    if np.any(hi <= lo):
        raise ValueError(f"bbox {list(bbox_voxels)} covers no chunk of the dataset")
    return [*lo.tolist(), *hi.tolist()]


def region_size(region: Sequence[int]) -> int:
    """Number of chunks in ``region`` (0 for an empty or inverted box)."""
    lo, hi = np.asarray(region[:3]), np.asarray(region[3:])
    return int(np.prod(np.maximum(hi - lo, 0)))


def region_chunks(region: Sequence[int]) -> list[list[int]]:
    """Every chunk of ``region`` in x-major order; for small regions (a task's batch,
    a QC region), never a whole dataset."""
    x0, y0, z0, x1, y1, z1 = region
    return [list(c) for c in product(range(x0, x1), range(y0, y1), range(z0, z1))]


def split_region(region: Sequence[int]) -> list[list[int]]:
    """Halve every axis longer than 1: 2 to 8 sub-regions that tile ``region``."""
    lo, hi = list(region[:3]), list(region[3:])
    cuts = []
    for a in range(3):
        if hi[a] - lo[a] > 1:
            mid = (lo[a] + hi[a]) // 2
            cuts.append([(lo[a], mid), (mid, hi[a])])
        else:
            cuts.append([(lo[a], hi[a])])
    return [[x[0], y[0], z[0], x[1], y[1], z[1]] for x, y, z in product(*cuts)]


def plan_task(region: Sequence[int], batch: int = DEFAULT_BATCH) -> tuple[str, list]:
    """``("compute", chunks)`` for a small region, ``("split", sub_regions)`` otherwise."""
    if region_size(region) <= batch:
        return "compute", region_chunks(region)
    return "split", split_region(region)
