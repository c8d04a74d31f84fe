"""Supervoxels -> dense L2 labels: same labels, ids, checksum facts and features as the plain way."""

from pathlib import Path

import numpy as np
import pytest

from l2cache.engine.chunk_labels import input_checksum, labels_from_supervoxels
from l2cache.engine.features import DenseLabels, compute_features
from l2cache_tools.dataset.build import chunk_supervoxels

DATA = Path(__file__).parent / "data" / "pinky40_crop_96x96x48.npz"
RES = (16.0, 16.0, 40.0)
SV_BASE = np.uint64(1 << 50)
L2_BASE = np.uint64(1 << 57)


def plain_labels(sv: np.ndarray, sv_ids: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """The obvious per-id relabel, as the reference."""
    out = np.zeros(sv.shape, dtype=np.uint64)
    for s, p in zip(sv_ids.tolist(), parents.tolist(), strict=True):
        out[sv == s] = p
    return out


@pytest.fixture(scope="module")
def real_chunk():
    """Real pinky40 supervoxels (pieces cut by octants) with PCG-sized ids; one sv unmapped."""
    local, piece_of_sv, _ = chunk_supervoxels(np.load(DATA)["labels"])
    sv = np.where(local > 0, local + SV_BASE, 0).astype(np.uint64)
    ids = np.unique(sv)[1:]
    parents = piece_of_sv[(ids - SV_BASE).astype(np.int64)] + L2_BASE
    parents[len(parents) // 2] = 0  # the graph knows no parent for this one
    return sv, dict(zip(ids.tolist(), parents.tolist(), strict=True))


def graph_of(table):
    calls = []

    def l2_parents(ids):
        calls.append(ids.copy())
        return np.array([table.get(int(i), 0) for i in ids], dtype=np.uint64)

    return l2_parents, calls


@pytest.mark.parametrize("order", ["C", "F"])
def test_real_chunk_labels_ids_and_features_match_the_plain_way(real_chunk, order):
    sv, table = real_chunk
    sv = np.asarray(sv, order=order)
    before = sv.copy(order="K")
    l2_parents, calls = graph_of(table)
    chunk = labels_from_supervoxels(sv, l2_parents)
    want_ids = np.unique(sv)[1:]
    np.testing.assert_array_equal(chunk.sv_ids, want_ids)
    assert len(calls) == 1 and np.array_equal(calls[0], want_ids)  # ascending, no 0
    parents = np.array([table[i] for i in want_ids.tolist()], dtype=np.uint64)
    np.testing.assert_array_equal(chunk.parents, parents)
    assert chunk.unmapped_sv == 1
    orphan = want_ids[parents == 0]
    assert chunk.orphan_voxels == int(np.isin(sv, orphan).sum()) > 0  # counted, background
    assert chunk.ghost_sv == 0  # the caller's count (the graph's side)
    plain = plain_labels(sv, want_ids, parents)
    labels = chunk.labels
    np.testing.assert_array_equal(labels, plain)
    assert labels.dtype == np.uint64 and labels.flags.f_contiguous == (order == "F")
    assert chunk.dense.index.dtype == np.uint16 and chunk.dense.shape == sv.shape
    np.testing.assert_array_equal(chunk.l2_ids, np.unique(parents[parents != 0]))
    np.testing.assert_array_equal(sv, before)  # input untouched
    # the engine on the dense index = the engine on the uint64 L2 volume, byte for byte
    got = compute_features(chunk.dense, RES)
    want = compute_features(plain, RES)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].tobytes() == want[key].tobytes(), key
    only = want["l2id"][::7]
    sub = compute_features(chunk.dense, RES, only=only)
    np.testing.assert_array_equal(sub["l2id"], only)
    assert sub["pca"].tobytes() == want["pca"][::7].tobytes()


def test_checksum_fingerprints_voxels_ids_and_parents(real_chunk):
    sv, table = real_chunk
    l2_parents, _ = graph_of(table)
    chunk = labels_from_supervoxels(sv, l2_parents)
    assert len(chunk.checksum) == 16 and int(chunk.checksum, 16) >= 0
    assert input_checksum(sv, chunk.sv_ids, chunk.parents) == chunk.checksum
    same = sv.copy(order="K")  # same voxels, same memory order: same checksum
    assert labels_from_supervoxels(same, l2_parents).checksum == chunk.checksum
    moved = sv.copy()
    moved[0, 0, 0], moved[-1, -1, -1] = moved[-1, -1, -1], moved[0, 0, 0]
    assert moved[0, 0, 0] != sv[0, 0, 0]
    assert labels_from_supervoxels(moved, l2_parents).checksum != chunk.checksum
    other = dict(table)
    first = int(chunk.sv_ids[0])
    other[first] = int(L2_BASE) + 999_999
    assert labels_from_supervoxels(sv, graph_of(other)[0]).checksum != chunk.checksum


def test_more_than_65535_supervoxels_give_a_narrow_l2_index():
    n = 70 * 100 * 12
    sv = (np.arange(n, dtype=np.uint64) + SV_BASE).reshape(70, 100, 12)
    sv[:, :, 0] = 0
    table = {int(s): int(L2_BASE + (s - SV_BASE) // 12) for s in sv[sv > 0]}
    chunk = labels_from_supervoxels(np.asfortranarray(sv), graph_of(table)[0])
    assert chunk.sv_ids.size > 65535
    assert chunk.dense.index.dtype == np.uint16  # 7,000 L2 nodes
    plain = plain_labels(sv, chunk.sv_ids, chunk.parents)
    np.testing.assert_array_equal(chunk.labels, plain)
    got, want = compute_features(chunk.dense, RES), compute_features(plain, RES)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_empty_chunk_and_wrong_graph_answers():
    chunk = labels_from_supervoxels(np.zeros((4, 5, 6), np.uint64), lambda ids: ids)
    assert chunk.sv_ids.size == 0 and chunk.unmapped_sv == 0
    assert compute_features(chunk.dense, RES)["l2id"].size == 0
    sv = np.arange(1, 9, dtype=np.uint64).reshape(2, 2, 2)
    with pytest.raises(ValueError, match="parents for 8 supervoxels"):
        labels_from_supervoxels(sv, lambda ids: ids[:3])
    with pytest.raises(ValueError, match="unsigned"):
        labels_from_supervoxels(sv.astype(np.float32), lambda ids: ids)


def test_dense_labels_refuse_inconsistent_input():
    index = np.zeros((3, 3, 3), np.uint16)
    with pytest.raises(ValueError, match="distinct"):
        DenseLabels(index, np.array([0, 5, 5], np.uint64))
    with pytest.raises(ValueError, match="starting with 0"):
        DenseLabels(index, np.array([1, 5], np.uint64))
    with pytest.raises(ValueError, match="uint16/uint32"):
        DenseLabels(index.astype(np.uint64), np.array([0], np.uint64))
    index[1, 1, 1] = 3  # beyond ids
    with pytest.raises(ValueError, match="out of range"):
        compute_features(DenseLabels(index, np.array([0, 7], np.uint64)), RES)
