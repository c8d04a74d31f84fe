"""Per-L2-node features of one chunk, in storage units and dtypes.

Semantics (the stored features, comparable with the existing L2 cache; README "Data model"):

- ``size_nm3``: voxel count (the API multiplies by the voxel volume).
- ``area_nm2``: faces between a node voxel and a voxel of another label (background
  included) inside the chunk, per axis, times that face's area; chunk-border faces are
  not counted.
- EDT of the L2 label volume (anisotropic, ``black_border=False``), truncated to whole
  nm; ``max_dt_nm`` its max and ``mean_dt_nm`` its float64 mean cast to float16.
  A node whose voxels see no other label anywhere in the chunk has infinite distance;
  it saturates at 65,535 nm (the u16 limit) before any statistic, and a float16 mean
  saturates at 65,504 (the float16 max) instead of becoming inf.
- ``rep_coord_nm``: chunk-relative index of the voxel maximising
  ``dt * (1 - d / max(d))`` (d: nm from the node's voxel centroid; weight 1 where
  ``max(d) == 0``), first in C (x-major) order on ties.
- ``chunk_intersect_count``: voxels on the low (row 0) and high (row 1) chunk faces.
- ``pca`` / ``pca_val``: exact principal axes of the voxel coordinates in nm, rows by
  descending variance, each row's largest-magnitude entry positive;
  ``pca_val = sqrt(eigenvalue * (min(n, 10000) - 1))`` so values stay comparable with
  the old service's 10,000-voxel subsample. NaN rows for nodes under 0.01 um^3.

Cost: one dense relabel, one EDT, then three fused compiled passes
(:mod:`l2cache.engine.kernels`) and a batched 3x3 ``eigh``. No per-node Python.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import edt
import numpy as np

from l2cache.domain.attributes import BY_NAME, saturate
from l2cache.engine import kernels as _kernels

PCA_MIN_SIZE_NM3 = 1e7  # 0.01 um^3
PCA_SAMPLE_CAP = 10_000  # the old service's subsample size, kept for comparable pca_val
F16_MAX = float(np.finfo(np.float16).max)  # 65,504: saturate, never cast to inf


def _memory_view(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A C-contiguous view of ``labels`` and the original axis of each of its axes."""
    if labels.flags.c_contiguous:
        return labels, np.array([0, 1, 2], dtype=np.int64)
    if labels.flags.f_contiguous:
        return labels.T, np.array([2, 1, 0], dtype=np.int64)
    return np.ascontiguousarray(labels), np.array([0, 1, 2], dtype=np.int64)


@dataclass(frozen=True)
class DenseLabels:
    """A label volume already relabelled to a dense index: ``ids[index]`` = the labels.

    Lets the worker hand the engine the narrow index it built while relabelling
    supervoxels (:mod:`l2cache.engine.chunk_labels`), so the uint64 L2 volume never exists.
    ``index``: (x, y, z) uint16/uint32, C or Fortran order, values < ``ids.size``;
    ``ids``: uint64, ``ids[0] == 0`` (background), the others distinct and non-zero
    (one index per label: two indices for one label would split it in the EDT).
    """

    index: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        if self.index.ndim != 3 or self.index.dtype not in (np.uint16, np.uint32):
            raise ValueError(f"index must be 3-D uint16/uint32, got {self.index.dtype}")
        ids = self.ids
        if ids.dtype != np.uint64 or ids.ndim != 1 or ids.size == 0 or ids[0] != 0:
            raise ValueError("ids must be 1-D uint64 starting with 0")
        rest = np.sort(ids[1:])
        if rest.size and (rest[0] == 0 or np.any(rest[1:] == rest[:-1])):
            raise ValueError("ids after the first must be distinct and non-zero")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.index.shape

    @property
    def size(self) -> int:
        return self.index.size

    def to_ids(self) -> np.ndarray:
        """The uint64 label volume (a full-size array), same shape and memory order."""
        fortran = self.index.flags.f_contiguous and not self.index.flags.c_contiguous
        view = self.index.T if fortran else np.ascontiguousarray(self.index)
        out = np.empty(view.shape, dtype=np.uint64)
        _kernels.lut_into(view, self.ids, out)
        return out.T if fortran else out


def empty_features() -> dict[str, np.ndarray]:
    """The result for a chunk with no node (all arrays of length 0)."""
    out = {"l2id": np.zeros(0, dtype=np.uint64)}
    for name, attr in BY_NAME.items():
        out[name] = np.zeros((0, *attr.shape), dtype=attr.dtype)
    return out


def compute_features(
    labels: np.ndarray | DenseLabels,
    resolution: Sequence[float],
    only: np.ndarray | Sequence[int] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Features of every L2 node in ``labels`` (or of the ids in ``only``).

    Parameters
    ----------
    labels : (X, Y, Z) array of L2 ids, 0 = background; C or Fortran order give
        identical results (CloudVolume returns Fortran order). Unsigned integers.
        Or a :class:`DenseLabels` (the worker's relabelled chunk): same result as
        its ``to_ids()`` volume, without the relabel pass.
    resolution : nm per voxel along x, y, z.
    only : ids to report. The whole chunk still shapes the EDT and the faces, so a
        subset equals the matching rows of the full result; ids absent from the chunk
        are not reported.
    timings : if given, filled with seconds per phase (relabel, edt, passes, pca).

    Returns
    -------
    dict with ``l2id`` (uint64, ascending) and the eight attributes in the dtypes of
    :mod:`l2cache.domain.attributes`, one row per reported node.
    """
    res = np.asarray(resolution, dtype=np.float64).reshape(-1)
    if res.shape != (3,) or not np.all(np.isfinite(res)) or np.any(res <= 0):
        raise ValueError(f"resolution must be 3 positive numbers, got {resolution!r}")
    clock = _Clock(timings)
    if isinstance(labels, DenseLabels):
        shape = labels.shape
        if labels.size == 0:
            return empty_features()
        dense, perm = _memory_view(labels.index)
        orig_ids = labels.ids
    else:
        labels = np.asarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"labels must be 3-D (x, y, z), got shape {labels.shape}")
        if labels.dtype.kind not in "ui" or (
            labels.dtype.kind == "i" and labels.size and labels.min() < 0
        ):
            raise ValueError(f"labels must be non-negative integers, got {labels.dtype}")
        shape = labels.shape
        if labels.size == 0:
            return empty_features()
        # unsigned input is indexed as it is (no uint64 copy of a uint32 chunk)
        vol, perm = _memory_view(labels if labels.dtype.kind == "u" else labels.astype(np.uint64))
        dense, orig_ids = _kernels.dense_index(vol)
        del vol
    n_labels = orig_ids.size
    clock.lap("relabel")
    if n_labels == 1:
        return empty_features()
    anisotropy = tuple(float(res[p]) for p in perm)
    dt = edt.edt(dense, anisotropy=anisotropy, black_border=False, parallel=1)
    clock.lap("edt")

    count, coord_sum, faces, contacts, dt_max, dt_sum = _kernels.first_pass(
        dense, dt, n_labels, perm
    )
    clock.lap("pass1")

    wanted = np.ones(n_labels, dtype=np.bool_)
    wanted[0] = False
    wanted &= count > 0  # a DenseLabels id with no voxel is not a node
    if only is not None:
        only_ids = np.asarray(only, dtype=np.uint64).reshape(-1)
        wanted &= np.isin(orig_ids, only_ids)
    centroid = coord_sum / np.maximum(count, 1)[:, None]
    moments, max_d2 = _kernels.second_pass(dense, wanted, centroid, res, perm)
    clock.lap("pass2")
    shape_xyz = np.array(shape, dtype=np.int64)
    rep = _kernels.representative_pass(
        dense, dt, wanted, centroid, np.sqrt(max_d2), res, perm, shape_xyz
    )
    clock.lap("pass3")
    del dt, dense

    sel = np.flatnonzero(wanted)
    sel = sel[np.argsort(orig_ids[sel], kind="stable")]
    n = count[sel]
    face_area = np.array([res[1] * res[2], res[0] * res[2], res[0] * res[1]])
    area = np.floor(faces[sel].astype(np.float64) @ face_area)
    pca, pca_val = _pca(moments[sel], n, res)
    clock.lap("pca")
    return {
        "l2id": orig_ids[sel].astype(np.uint64),
        "size_nm3": saturate(n, np.uint32).astype("<u4"),
        "area_nm2": saturate(area, np.uint32).astype("<u4"),
        "max_dt_nm": saturate(dt_max[sel], np.uint16).astype("<u2"),
        "mean_dt_nm": np.minimum(dt_sum[sel] / n, F16_MAX).astype("<f2"),
        "rep_coord_nm": saturate(rep[sel], np.uint16).astype("<u2"),
        "chunk_intersect_count": saturate(contacts[sel], np.uint16).astype("<u2"),
        "pca": pca,
        "pca_val": pca_val,
    }


def _pca(moments: np.ndarray, n: np.ndarray, res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal axes and scaled singular values from centred second moments (nm^2)."""
    m = n.shape[0]
    pca = np.full((m, 3, 3), np.nan, dtype="<f2")
    pca_val = np.full((m, 3), np.nan, dtype="<f4")
    ok = (n * float(np.prod(res)) >= PCA_MIN_SIZE_NM3) & (n > 1)
    if not ok.any():
        return pca, pca_val
    cov = moments[ok] / (n[ok] - 1)[:, None, None]
    evals, evecs = np.linalg.eigh(cov)  # ascending
    evals = np.clip(evals[:, ::-1], 0.0, None)
    comps = np.transpose(evecs[:, :, ::-1], (0, 2, 1))  # rows = axes, descending
    pivot = np.argmax(np.abs(comps), axis=2)
    signs = np.sign(np.take_along_axis(comps, pivot[:, :, None], axis=2))
    signs[signs == 0] = 1.0
    comps = comps * signs
    scale = (np.minimum(n[ok], PCA_SAMPLE_CAP) - 1).astype(np.float64)
    pca[ok] = comps.astype("<f2")
    pca_val[ok] = np.sqrt(evals * scale[:, None]).astype("<f4")
    return pca, pca_val


class _Clock:
    """Phase timer that costs nothing when nobody asked for timings."""

    def __init__(self, sink: dict[str, float] | None) -> None:
        self.sink = sink
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.sink is None:
            return
        now = time.perf_counter()
        self.sink[name] = self.sink.get(name, 0.0) + now - self.t
        self.t = now
