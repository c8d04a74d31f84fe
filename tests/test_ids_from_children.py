"""The ids path labels a chunk from each requested id's own ``children``: same features
as the whole-chunk path for the same node, whatever the other labels of the chunk are."""

from pathlib import Path

import numpy as np
import pytest

from l2cache.compute import features_of_ids
from l2cache.engine.chunk_labels import disjoint_groups, labels_from_children
from l2cache.engine.features import compute_features
from l2cache_tools.dataset.build import chunk_supervoxels

DATA = Path(__file__).parent / "data" / "pinky40_crop_96x96x48.npz"
RES = (16.0, 16.0, 40.0)
SV_BASE = np.uint64(1 << 50)
L2_BASE = np.uint64(1 << 57)


@pytest.fixture(scope="module")
def real_chunk():
    """Real pinky40 supervoxels (pieces cut by octants) and each L2 node's children."""
    local, piece_of_sv, _ = chunk_supervoxels(np.load(DATA)["labels"])
    sv = np.where(local > 0, local + SV_BASE, 0).astype(np.uint64)
    ids = np.unique(sv)[1:]
    parents = piece_of_sv[(ids - SV_BASE).astype(np.int64)] + L2_BASE
    children = {int(p): ids[parents == p] for p in np.unique(parents).tolist()}
    l2 = np.zeros(sv.shape, np.uint64)
    for p, kids in children.items():
        l2[np.isin(sv, kids)] = p
    return sv, children, l2


def same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].tobytes() == want[key].tobytes(), key


@pytest.mark.parametrize("order", ["C", "F"])
def test_every_node_from_its_children_equals_the_whole_chunk(real_chunk, order):
    """Each node alone on background (its children's voxels, all else 0) gives exactly
    its row of the whole-chunk result: the engine's per-node features depend only on
    the node's own mask and the chunk (EDT, faces, contacts, rep coord, PCA)."""
    sv, children, l2 = real_chunk
    sv = np.asarray(sv, order=order)
    whole = compute_features(l2, RES)
    assert whole["l2id"].size > 20
    nodes = whole["l2id"][::5]
    for node in nodes.tolist():  # one node at a time: the strongest form of the claim
        alone = compute_features(np.where(l2 == node, l2, 0), RES)
        want = {k: v[whole["l2id"] == node] for k, v in whole.items()}
        same(alone, want)
    labels = labels_from_children(sv, {n: children[n] for n in nodes.tolist()})
    assert len(labels.groups) == 1  # distinct nodes never share supervoxels
    got = features_of_ids(labels, RES)
    same(got, {k: v[np.isin(whole["l2id"], nodes)] for k, v in whole.items()})


def test_overlapping_ids_are_grouped_and_each_gets_its_own_voxels(real_chunk):
    sv, children, l2 = real_chunk
    whole = compute_features(l2, RES)
    a, b = (int(v) for v in whole["l2id"][[3, 9]])
    merged = int(L2_BASE) + 999_999  # a merge of a and b that a later edit replaced
    kids = {a: children[a], b: children[b], merged: np.concatenate([children[a], children[b]])}
    labels = labels_from_children(sv, kids)
    assert [g.tolist() for g in labels.groups] == [[a, b], [merged]]
    got = features_of_ids(labels, RES)
    assert got["l2id"].tolist() == sorted([a, b, merged])
    mask = np.isin(sv, kids[merged])
    direct = compute_features(np.where(mask, np.uint64(merged), np.uint64(0)), RES)
    same({k: v[got["l2id"] == merged] for k, v in got.items()}, direct)
    for node in (a, b):
        same(
            {k: v[got["l2id"] == node] for k, v in got.items()},
            {k: v[whole["l2id"] == node] for k, v in whole.items()},
        )


def test_disjoint_groups_first_fit():
    kids = {5: np.array([1, 2]), 3: np.array([2, 7]), 9: np.array([8]), 4: np.array([1, 8])}
    assert [g.tolist() for g in disjoint_groups(kids)] == [[3, 4], [5, 9]]  # ids ascending
    assert disjoint_groups({}) == []


def test_checksum_fingerprints_voxels_and_the_children_mapping(real_chunk):
    sv, children, _ = real_chunk
    node = next(iter(children))
    base = labels_from_children(sv, {node: children[node]})
    assert len(base.checksum) == 16
    assert (
        labels_from_children(sv.copy(order="K"), {node: children[node][::-1]}).checksum
        == base.checksum
    )
    fewer = labels_from_children(sv, {node: children[node][:-1]})
    assert fewer.checksum != base.checksum
    moved = sv.copy()
    moved[0, 0, 0], moved[-1, -1, -1] = moved[-1, -1, -1], moved[0, 0, 0]
    assert labels_from_children(moved, {node: children[node]}).checksum != base.checksum
    voxels = int(np.isin(sv, children[node]).sum())
    assert base.voxels_of(children[node]) == voxels and base.voxels_of(np.zeros(0)) == 0
    # the last group may take the shared index over, after the hash has read it
    before = base.checksum
    labels = base.group_labels(0, consume=True)
    assert base.index is None and base.checksum == before
    assert int(np.count_nonzero(labels.index)) == voxels
    with pytest.raises(ValueError, match="consumed"):
        base.group_labels(0)
