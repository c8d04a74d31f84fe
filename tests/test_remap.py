"""Supervoxel -> L2 remapping keeps order, maps exactly and zeroes unknown supervoxels."""

import numpy as np
import pytest

from l2cache.remap import remap_to_l2


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
