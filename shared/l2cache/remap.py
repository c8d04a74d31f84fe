"""Supervoxel chunk -> L2 label volume.

A chunk is stored as supervoxel ids; features are computed per L2 node, so every
voxel is relabelled with its supervoxel's L2 parent. fastremap does it in compiled
code, keeps the memory order (CloudVolume hands out Fortran order) and never makes a
per-voxel Python call.
"""

from __future__ import annotations

import fastremap
import numpy as np


def remap_to_l2(sv_labels: np.ndarray, sv_ids: np.ndarray, l2_ids: np.ndarray) -> np.ndarray:
    """Replace each supervoxel id with its L2 id; ids not in ``sv_ids`` become 0.

    ``sv_ids[i]`` maps to ``l2_ids[i]``; an L2 id of 0 (no parent known) also gives 0,
    so unmapped voxels count as background instead of inventing a node.
    """
    sv_ids = np.asarray(sv_ids, dtype=np.uint64).reshape(-1)
    l2_ids = np.asarray(l2_ids, dtype=np.uint64).reshape(-1)
    if sv_ids.shape != l2_ids.shape:
        raise ValueError(f"{sv_ids.size} supervoxel ids but {l2_ids.size} L2 ids")
    labels = np.asarray(sv_labels).astype(np.uint64, copy=False)
    order = "F" if labels.flags.f_contiguous and not labels.flags.c_contiguous else "C"
    known = sv_ids[sv_ids != 0]
    masked = fastremap.mask_except(labels, known.tolist(), in_place=False)
    table = dict(zip(sv_ids.tolist(), l2_ids.tolist(), strict=True))
    table[0] = 0
    out = fastremap.remap(masked, table, preserve_missing_labels=True, in_place=True)
    return np.asarray(out, dtype=np.uint64, order=order)
