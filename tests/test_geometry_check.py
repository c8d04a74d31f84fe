"""The geometry check on a synthetic chunk: faces against the graph's cross-chunk edges.

A 16x12x8 chunk at (1, 1, 1) with one supervoxel per face plus an inner one; the graph
joins each face's supervoxel to one of the neighbour on that side. Mirrors and a
transpose move them to the wrong faces; the real chunk, a graph with no cross edges and
a reader that cannot list them pass (the last two say so in a ``geometry`` log line).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2cache.domain import ids
from l2cache.domain.failures import PERMANENT, GeometryMismatch, InconsistentInput, classify
from l2cache.inputs.geometry_check import FACE_NAMES, check_geometry, chunk_faces, judge

BITS = ids.SpatialBits.from_mapping({1: 10, 2: 10})
HERE = np.array([1, 1, 1])
SHAPE = (16, 12, 8)


def sv_id(coords, seg: int) -> int:
    return int(ids.encode_ids(1, np.asarray([coords]), seg, BITS)[0])


def synthetic() -> tuple[np.ndarray, np.ndarray]:
    """(supervoxels, edges): supervoxel k+1 is a slab against face k of FACE_NAMES (a
    2-voxel-thick slab in the middle of that face), supervoxel 7 is inside."""
    sv = np.zeros(SHAPE, dtype=np.uint64, order="F")
    edges = []
    for k, name in enumerate(FACE_NAMES):
        axis, side = "xyz".index(name[1]), 1 if name[0] == "+" else -1
        box = [slice(2, 6), slice(2, 6), slice(2, 6)]
        box[axis] = slice(0, 2) if side < 0 else slice(SHAPE[axis] - 2, SHAPE[axis])
        sv[tuple(box)] = sv_id(HERE, k + 1)
        neighbour = HERE.copy()
        neighbour[axis] += side
        edges.append([sv_id(HERE, k + 1), sv_id(neighbour, 1)])
    sv[7:9, 6:8, 3:5] = sv_id(HERE, 7)
    # an edge toward a diagonal chunk is not judged
    edges.append([sv_id(HERE, 7), sv_id(HERE + 1, 1)])
    return sv, np.array(edges, dtype=np.uint64)


class Graph:
    def __init__(self, edges) -> None:
        self.edges = edges

    def chunk_cross_edges(self, coords, bits):
        return self.edges


def test_the_real_chunk_passes_and_every_face_is_checked():
    sv, edges = synthetic()
    report = check_geometry(Graph(edges), chunk_faces(sv), HERE, BITS)
    assert (report.checked, report.misplaced, report.skipped) == (6, 0, 1)
    assert set(report.by_face) == set(FACE_NAMES)


@pytest.mark.parametrize(
    ("corrupt", "wrong_faces"),
    [
        (lambda a: a[::-1], {"-x", "+x"}),
        (lambda a: a[:, ::-1], {"-y", "+y"}),
        (lambda a: a[:, :, ::-1], {"-z", "+z"}),
        (lambda a: a[::-1, ::-1, ::-1], set(FACE_NAMES)),
    ],
    ids=["mirror-x", "mirror-y", "mirror-z", "mirror-xyz"],
)
def test_a_mirrored_chunk_fails_permanently_with_its_counts(corrupt, wrong_faces):
    sv, edges = synthetic()
    with pytest.raises(GeometryMismatch) as caught:
        check_geometry(Graph(edges), chunk_faces(corrupt(sv)), HERE, BITS)
    exc = caught.value
    assert isinstance(exc, InconsistentInput) and classify(exc) == PERMANENT
    assert exc.counts == {"misplaced_sv": len(wrong_faces), "face_sv": 6}
    assert "geometry does not match the graph" in str(exc)
    for face in wrong_faces:
        assert f"{face}: 1 of 1" in str(exc)


def test_a_transposed_chunk_fails():
    sv, edges = synthetic()
    square = np.zeros((12, 12, 8), dtype=np.uint64)  # a transpose keeps a square chunk's shape
    square[:] = sv[2:14]
    report = judge(chunk_faces(square), edges, HERE, BITS)
    assert report.misplaced == 2  # the crop cut the x-face slabs off: leave their edges out
    with pytest.raises(GeometryMismatch):
        check_geometry(Graph(edges[2:]), chunk_faces(square.transpose(1, 0, 2)), HERE, BITS)


def test_no_cross_edges_or_a_reader_that_cannot_tell_passes_and_says_so(capsys):
    sv, _ = synthetic()
    for graph, why in (
        (Graph(np.zeros((0, 2), np.uint64)), "the graph has none"),
        (Graph(None), "cannot list them"),
        (object(), "cannot list them"),  # a reader without the method (a test double)
    ):
        report = check_geometry(graph, chunk_faces(sv[::-1]), HERE, BITS)
        assert report.checked == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["l2cache"] == "geometry" and line["status"] == "unchecked"
        assert why in line["reason"] and line["chunk"] == [1, 1, 1]


def test_an_empty_chunk_with_no_edges_says_nothing(capsys):
    empty = np.zeros(SHAPE, dtype=np.uint64)
    assert check_geometry(Graph(None), chunk_faces(empty), HERE, BITS).checked == 0
    assert capsys.readouterr().out == ""
