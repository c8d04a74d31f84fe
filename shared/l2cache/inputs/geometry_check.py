"""Does a chunk's geometry match its graph? Faces against atomic cross-chunk edges.

Why: the other input checks compare *labels* (every supervoxel has an L2 parent of this
chunk, every supervoxel the graph has is present). A chunk file with the right labels
in the wrong place (mirrored along an axis, transposed, written for another
orientation) passes them all, and was computed, written as done, served and passed QC.
The graph is an independent witness of geometry: PCG's atomic cross-chunk edges
``[sv, partner]`` join a supervoxel of this chunk to one of a neighbouring chunk it
touches across their shared face. So a supervoxel with an edge toward the +x
neighbour must have a voxel on the chunk's +x face, and so on for the six faces. A
mirror along x moves the +x face's supervoxels to the -x face; a transpose moves the
x faces' to the y faces; either breaks that rule for every supervoxel that does not
happen to touch both faces.

Strict: one misplaced supervoxel fails the chunk (:class:`GeometryMismatch`, permanent,
counts in the ledger). Only the edges the chunk's ingest wrote are used (the graph
reader keeps the chunk's earliest write), since a later merge may join supervoxels that
do not touch. Edges toward chunks that are not face neighbours are not judged. When
the graph holds no cross edges for the chunk (a single-chunk volume, a graph built
without them, or a reader that cannot tell), the check says so (a ``geometry`` log
line, ``unchecked``) and passes: failing every chunk of such a graph would stop all
work for want of a witness, not because of bad input.

What it cannot see (tests/adversarial/test_geometry_abuse.py measures it): a mirror
along an axis moves nothing off the faces *perpendicular* to it, so it is caught
through the other faces' edges only, and a chunk with no neighbour along an axis (a
volume one chunk thick in z) cannot show a mirror along it; a shift by one voxel keeps
most face contacts (objects are thicker than one voxel) and is caught only sometimes.

Cost: the six face planes of the uint64 supervoxels (``np.unique`` of 2·(XY+XZ+YZ)
voxels) and one range read of the chunk's L2 rows' cross-edge family; no full-volume
pass: 59-98 ms per real 256x256x512 chunk, 1.1-1.8 % of its compute (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from l2cache.domain import ids as idlib
from l2cache.domain.failures import GeometryMismatch
from l2cache.support import logs

if TYPE_CHECKING:  # annotations only
    from l2cache.inputs.graph import GraphReader

# the six faces, in this order: (axis, side), side -1 = the low face, +1 = the high one
FACES: tuple[tuple[int, int], ...] = tuple((a, s) for a in range(3) for s in (-1, 1))
FACE_NAMES: tuple[str, ...] = tuple(f"{'-+'[s > 0]}{'xyz'[a]}" for a, s in FACES)


@dataclass(frozen=True)
class ChunkFaces:
    """The distinct non-zero supervoxel ids on each of a chunk's six faces (``FACES``
    order), taken from the supervoxels before they are relabelled and dropped."""

    ids: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class GeometryReport:
    """What the check looked at: ``checked`` (supervoxel, face) pairs the graph says
    must touch a face, ``misplaced`` of them that do not, ``skipped`` edges it could not
    judge (partner not in a face-neighbour chunk, or supervoxel not of this chunk)."""

    checked: int
    misplaced: int
    skipped: int
    by_face: dict[str, tuple[int, int]]  # face -> (misplaced, checked)


def chunk_faces(sv: np.ndarray) -> ChunkFaces:
    """The supervoxel ids on each face of ``sv`` (a full-size chunk, x, y, z)."""
    out = []
    for axis, side in FACES:
        at = [slice(None)] * 3
        at[axis] = 0 if side < 0 else sv.shape[axis] - 1
        ids = np.unique(sv[tuple(at)])  # a view: np.take(axis=) would copy the whole chunk
        out.append(ids[ids != 0])
    return ChunkFaces(tuple(out))


def judge(
    faces: ChunkFaces,
    edges: np.ndarray,
    coords: Sequence[int],
    spatial_bits: idlib.SpatialBits,
) -> GeometryReport:
    """Compare the faces with the ``(n, 2)`` edges ``[sv here, partner]`` (no I/O)."""
    edges = np.asarray(edges, dtype=np.uint64).reshape(-1, 2)
    here = np.asarray(coords, dtype=np.int64)
    if edges.size == 0:
        return GeometryReport(0, 0, 0, {})
    own = (idlib.get_chunk_coords(edges[:, 0], spatial_bits).astype(np.int64) == here).all(1)
    delta = idlib.get_chunk_coords(edges[:, 1], spatial_bits).astype(np.int64) - here
    adjacent = own & (np.abs(delta).sum(1) == 1)
    by_face: dict[str, tuple[int, int]] = {}
    checked = misplaced = 0
    for (axis, side), name, on_face in zip(FACES, FACE_NAMES, faces.ids, strict=True):
        svs = np.unique(edges[adjacent & (delta[:, axis] == side), 0])
        if svs.size == 0:
            continue
        off = int(np.count_nonzero(~np.isin(svs, on_face, assume_unique=True)))
        by_face[name] = (off, int(svs.size))
        checked += int(svs.size)
        misplaced += off
    return GeometryReport(checked, misplaced, int(np.count_nonzero(~adjacent)), by_face)


def check_geometry(
    graph: GraphReader,
    faces: ChunkFaces,
    coords: Sequence[int],
    spatial_bits: idlib.SpatialBits,
) -> GeometryReport:
    """Raise :class:`GeometryMismatch` when a supervoxel the graph joins across a face
    is not on that face; otherwise the report (``checked == 0``: not checked, logged)."""
    coords = [int(c) for c in coords]
    reader = getattr(graph, "chunk_cross_edges", None)
    edges = reader(coords, spatial_bits) if reader is not None else None
    report = judge(
        faces, edges if edges is not None else np.zeros((0, 2), np.uint64), coords, spatial_bits
    )
    if report.misplaced:
        worst = ", ".join(f"{f}: {m} of {n}" for f, (m, n) in report.by_face.items() if m)
        raise GeometryMismatch(
            f"chunk {tuple(coords)}: {report.misplaced} of the {report.checked} supervoxels "
            f"the graph joins across a face are not on that face ({worst}); the "
            "segmentation's geometry does not match the graph (mirrored, transposed or "
            "misplaced data)",
            misplaced_sv=report.misplaced,
            face_sv=report.checked,
        )
    if report.checked == 0 and any(f.size for f in faces.ids):
        why = "the graph reader cannot list them" if edges is None else "the graph has none"
        logs.emit(
            "geometry",
            status="unchecked",
            chunk=coords,
            reason=f"no cross-chunk edges to check the chunk's faces against: {why}",
        )
    return report
