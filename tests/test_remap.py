"""Supervoxel -> L2 remapping keeps order, maps exactly and zeroes unknown supervoxels."""

import numpy as np
import pytest

from l2cache_tools.dataset.remap import remap_to_l2


@pytest.mark.parametrize("order", ["C", "F"])
def test_remap_maps_known_and_zeroes_unknown(order):
    rng = np.random.default_rng(0)
    sv = np.asarray(rng.integers(0, 6, size=(5, 6, 7)).astype(np.uint64) + (2**40), order=order)
    sv[0, 0, 0] = 0
    sv_ids = np.array([2**40 + 1, 2**40 + 2, 2**40 + 3, 2**40 + 4], dtype=np.uint64)
    l2_ids = np.array([2**57 + 10, 2**57 + 10, 2**57 + 11, 0], dtype=np.uint64)
    before = sv.copy()
    out = remap_to_l2(sv, sv_ids, l2_ids)
    expected = np.zeros_like(sv)
    for s, l2 in zip(sv_ids, l2_ids, strict=True):
        expected[sv == s] = l2
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint64
    assert out.flags.f_contiguous == (order == "F")
    np.testing.assert_array_equal(sv, before)  # the input chunk is not modified


def test_remap_refuses_misaligned_tables():
    with pytest.raises(ValueError, match="supervoxel ids"):
        remap_to_l2(np.zeros((2, 2, 2), np.uint64), [1, 2], [3])


def test_remap_many_ids_unsorted_tables_and_unknown_ids():
    rng = np.random.default_rng(1)
    sv = (rng.permutation(80_000).astype(np.uint64) + 2**45).reshape(40, 50, 40)
    sv[0] = 0
    present = np.unique(sv[sv > 0])
    sv_ids = rng.permutation(present)[:-100]  # 100 supervoxels the table does not know
    l2_ids = sv_ids // np.uint64(10) + np.uint64(2**57)
    out = remap_to_l2(np.asfortranarray(sv), sv_ids, l2_ids)
    lookup = dict(zip(sv_ids.tolist(), l2_ids.tolist(), strict=True))
    expected = np.array([lookup.get(v, 0) for v in sv.ravel().tolist()], dtype=np.uint64)
    np.testing.assert_array_equal(out, expected.reshape(sv.shape))
    assert out.flags.f_contiguous
