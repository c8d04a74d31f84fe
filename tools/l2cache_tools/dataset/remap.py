"""Supervoxel chunk -> L2 label volume.

A chunk is stored as supervoxel ids; features are computed per L2 node, so every
voxel is relabelled with its supervoxel's L2 parent. One compiled pass turns the
chunk into a narrow dense index plus its small id table, the table is mapped, and a
second compiled pass writes the output in the input's memory order (CloudVolume hands
out Fortran order): no masked copy of the input and no per-voxel Python. The worker
path does not even build this uint64 volume (see :mod:`l2cache.engine.chunk_labels`); this
function serves the dataset tools and tests that want plain L2 labels.
"""

from __future__ import annotations

import numpy as np

from l2cache.engine import kernels as _kernels


def remap_to_l2(sv_labels: np.ndarray, sv_ids: np.ndarray, l2_ids: np.ndarray) -> np.ndarray:
    """Replace each supervoxel id with its L2 id; ids not in ``sv_ids`` become 0.

    ``sv_ids[i]`` maps to ``l2_ids[i]``; an L2 id of 0 (no parent known) also gives 0,
    so unmapped voxels count as background instead of inventing a node.
    """
    sv_ids = np.asarray(sv_ids, dtype=np.uint64).reshape(-1)
    l2_ids = np.asarray(l2_ids, dtype=np.uint64).reshape(-1)
    if sv_ids.shape != l2_ids.shape:
        raise ValueError(f"{sv_ids.size} supervoxel ids but {l2_ids.size} L2 ids")
    labels = np.asarray(sv_labels)
    if labels.dtype.kind != "u":
        labels = labels.astype(np.uint64)
    fortran = labels.flags.f_contiguous and not labels.flags.c_contiguous
    view = labels.T if fortran else np.ascontiguousarray(labels)
    index, seen = _kernels.dense_index(view)
    order = np.argsort(sv_ids, kind="stable")
    pos = np.minimum(np.searchsorted(sv_ids, seen, sorter=order), max(sv_ids.size - 1, 0))
    lut = np.zeros(seen.size, dtype=np.uint64)
    if sv_ids.size:
        hit = sv_ids[order[pos]] == seen
        lut[hit] = l2_ids[order[pos[hit]]]
    lut[0] = 0
    out = np.empty(view.shape, dtype=np.uint64)
    _kernels.lut_into(index, lut, out)
    return out.T if fortran else out
