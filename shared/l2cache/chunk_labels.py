"""One chunk's supervoxels -> its L2 label volume, with the facts integrity checks need.

Every worker path (bulk chunk, edit, missing ids) goes through
:func:`labels_from_supervoxels`: find the chunk's supervoxel ids, ask the graph for
their L2 parents, relabel the voxels, and fingerprint the input. It also counts what
did *not* map (supervoxels the graph gives no L2 parent), because a chunk whose
supervoxels and graph disagree must never be written as done with partial features:
the caller decides, this module only measures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .remap import remap_to_l2


@dataclass(frozen=True)
class ChunkLabels:
    """A chunk relabelled to L2 ids plus what the relabelling found."""

    labels: np.ndarray  # L2 id per voxel (0 = background or unmapped), same shape/order as input
    sv_ids: np.ndarray  # the chunk's distinct non-zero supervoxel ids, ascending
    parents: np.ndarray  # L2 parent of each of ``sv_ids`` (0 = the graph has none)
    checksum: str  # 16 hex digits over the voxels, the supervoxel ids and their parents
    unmapped_sv: int  # supervoxels present in the chunk with no L2 parent

    @property
    def l2_ids(self) -> np.ndarray:
        """Distinct L2 ids the chunk's supervoxels map to (0 excluded), ascending."""
        ids = np.unique(self.parents)
        return ids[ids != 0]


def input_checksum(sv: np.ndarray, sv_ids: np.ndarray, parents: np.ndarray) -> str:
    """Fingerprint of a chunk's input: its voxels (memory order), ids and parents."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(sv).tobytes())
    digest.update(sv_ids.tobytes() + parents.tobytes())
    return digest.hexdigest()[:16]


def labels_from_supervoxels(
    sv: np.ndarray, l2_parents: Callable[[np.ndarray], np.ndarray]
) -> ChunkLabels:
    """Relabel ``sv`` (uint64 supervoxel ids) with ``l2_parents(sv_ids)``.

    ``l2_parents`` receives the ascending distinct non-zero supervoxel ids and returns
    one L2 id per id (0 where the graph has no parent).
    """
    sv_ids = np.unique(sv)
    sv_ids = sv_ids[sv_ids != 0]
    parents = np.asarray(l2_parents(sv_ids), dtype=np.uint64).reshape(-1)
    if parents.shape != sv_ids.shape:
        raise ValueError(f"graph returned {parents.size} parents for {sv_ids.size} supervoxels")
    labels = remap_to_l2(sv, sv_ids, parents)
    return ChunkLabels(
        labels=labels,
        sv_ids=sv_ids,
        parents=parents,
        checksum=input_checksum(sv, sv_ids, parents),
        unmapped_sv=int(np.count_nonzero(parents == 0)),
    )
