"""Read one atomic chunk of the supervoxel segmentation with CloudVolume.

CloudVolume handles every source PCG datasets use (``precomputed://``, ``file://``,
``gs://``, ``graphene://``) and returns Fortran-ordered arrays, which the feature
engine takes without a copy. Missing chunks read as 0 (``fill_missing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=16)
def _volume(path: str):
    from cloudvolume import CloudVolume

    return CloudVolume(path, fill_missing=True, progress=False, bounded=False, mip=0)


def chunk_bounds(dataset, chunk_coords: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Voxel box ``[start, stop)`` of an atomic chunk, clipped to the volume."""
    start = np.asarray(dataset.voxel_offset) + np.asarray(chunk_coords) * np.asarray(
        dataset.chunk_size
    )
    stop = start + np.asarray(dataset.chunk_size)
    if dataset.volume_size is not None:
        end = np.asarray(dataset.voxel_offset) + np.asarray(dataset.volume_size)
        stop = np.minimum(stop, end)
    if np.any(stop <= start):
        raise ValueError(f"chunk {tuple(chunk_coords)} lies outside the volume")
    return start, stop


def read_chunk(dataset, chunk_coords: Sequence[int]) -> np.ndarray:
    """Supervoxel ids (x, y, z) uint64 of one atomic chunk."""
    start, stop = chunk_bounds(dataset, chunk_coords)
    cv = _volume(dataset.segmentation)
    cutout = cv[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    return np.asarray(cutout)[..., 0].astype(np.uint64, copy=False)
