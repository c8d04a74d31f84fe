"""Read one atomic chunk of the supervoxel segmentation with CloudVolume.

CloudVolume handles every source PCG datasets use (``precomputed://``, ``file://``,
``gs://``, ``graphene://``) and returns Fortran-ordered arrays, which the feature
engine takes without a copy.

Two rules make the values match the existing service and keep bad input out:

- A chunk that runs past the volume is padded with background (0) to the full chunk
  size, as the existing service reads it (``bounded=False``), so area,
  ``chunk_intersect_count`` and distances at the dataset boundary are the same.
- Missing data is never silently zero: CloudVolume reads with ``fill_missing=False``.
  A missing file is background only when the graph confirms the chunk has no
  supervoxels; otherwise it is :class:`~l2cache.domain.failures.MissingInput`. Undecodable
  data is :class:`~l2cache.domain.failures.CorruptInput`. Both are permanent.

One corruption cannot be caught here: a well-formed gzip file whose content is not a
valid compressed_segmentation stream makes the decoder (a C extension) crash the
process. The attempt then never answers, the queue retries it up to its maximum, and
the run's status presumes it failed ("gave up after N attempts: no answer") once the
attempt deadline has passed, so the run still ends (tests/pipeline/test_faults.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from l2cache.config import DatasetConfig
from l2cache.domain.failures import CorruptInput, MissingInput, OutsideVolume

if TYPE_CHECKING:  # imported when a chunk is first read: it is a heavy import
    from cloudvolume import CloudVolume


@lru_cache(maxsize=16)
def _volume(path: str) -> CloudVolume:
    from cloudvolume import CloudVolume

    return CloudVolume(path, fill_missing=False, progress=False, bounded=False, mip=0)


def _decode_errors() -> tuple[type[BaseException], ...]:
    """Exception types CloudVolume / CloudFiles raise for undecodable chunk files."""
    from cloudfiles.exceptions import DecompressionError
    from cloudvolume.exceptions import DecodingError
    from deflate import DeflateError

    return (DecodingError, DecompressionError, DeflateError, zlib.error, EOFError)


def chunk_origin(dataset: DatasetConfig, chunk_coords: Sequence[int]) -> np.ndarray:
    """First voxel of an atomic chunk (in the segmentation's voxel coordinates)."""
    return np.asarray(dataset.voxel_offset) + np.asarray(chunk_coords) * np.asarray(
        dataset.chunk_size
    )


def chunk_bounds(
    dataset: DatasetConfig, chunk_coords: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Voxel box ``[start, stop)`` of the chunk's data inside the volume (clipped)."""
    coords = np.asarray(chunk_coords)
    start = chunk_origin(dataset, coords)
    stop = start + np.asarray(dataset.chunk_size)
    if dataset.volume_size is not None:
        end = np.asarray(dataset.voxel_offset) + np.asarray(dataset.volume_size)
        stop = np.minimum(stop, end)
    if np.any(coords < 0) or np.any(stop <= start):
        raise OutsideVolume(f"chunk {tuple(int(c) for c in coords)} lies outside the volume")
    return start, stop


def in_volume(dataset: DatasetConfig, chunk_coords: Sequence[int]) -> bool:
    """Whether an atomic chunk has any voxel inside the dataset's volume."""
    try:
        chunk_bounds(dataset, chunk_coords)
    except OutsideVolume:
        return False
    return True


def read_chunk(
    dataset: DatasetConfig,
    chunk_coords: Sequence[int],
    graph_has_supervoxels: Callable[[], bool | None] | None = None,
) -> np.ndarray:
    """Supervoxel ids (x, y, z) uint64 of one atomic chunk, always the full chunk size.

    ``graph_has_supervoxels`` is asked only when data is missing: ``False`` (the graph
    confirms an empty chunk) reads as background; ``True`` or ``None`` (cannot tell)
    raises :class:`MissingInput`.
    """
    start, stop = chunk_bounds(dataset, chunk_coords)
    cv = _volume(dataset.segmentation)
    try:
        cutout = cv[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    except _decode_errors() as exc:
        raise CorruptInput(
            f"chunk {tuple(chunk_coords)}: segmentation data is corrupt ({type(exc).__name__}: "
            f"{str(exc)[:200]})"
        ) from None
    except Exception as exc:
        from cloudvolume.exceptions import EmptyVolumeException

        if not isinstance(exc, EmptyVolumeException):
            raise  # transient: storage or network
        verdict = graph_has_supervoxels() if graph_has_supervoxels is not None else None
        if verdict is False:
            return np.zeros(tuple(dataset.chunk_size), dtype=np.uint64, order="F")
        why = (
            "the graph has supervoxels there" if verdict else "the graph cannot confirm it is empty"
        )
        raise MissingInput(
            f"chunk {tuple(chunk_coords)}: segmentation file missing ({str(exc).splitlines()[0]}) "
            f"and {why}"
        ) from None
    data = np.asarray(cutout)[..., 0]
    full = tuple(int(v) for v in dataset.chunk_size)
    if data.shape == full:
        return data.astype(np.uint64, copy=False)
    padded = np.zeros(full, dtype=np.uint64, order="F")
    padded[: data.shape[0], : data.shape[1], : data.shape[2]] = data
    return padded
