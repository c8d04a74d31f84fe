"""PCG id decoding/encoding: the worked example, round trips, and refusal to wrap."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2cache.domain import ids

PINNED = ids.SpatialBits.from_mapping({1: 10, 2: 10, 3: 9, 4: 8, 5: 7, 6: 6, 7: 5})


def test_worked_example_from_design():
    node = np.uint64(156098560020972550)
    assert ids.get_layer(node).tolist() == [2]
    assert ids.get_chunk_coords(node, PINNED).tolist() == [[170, 301, 13]]
    assert ids.get_segment_id(node, PINNED).tolist() == [1030]
    expected_chunk = int(node) - 1030
    assert ids.get_chunk_id(node, PINNED).tolist() == [expected_chunk]
    assert ids.encode_ids(2, [[170, 301, 13]], 1030, PINNED).tolist() == [int(node)]


def test_bits_come_from_the_dataset_not_a_constant():
    node = np.uint64(156098560020972550)
    other = ids.SpatialBits.from_mapping({2: 9})
    assert ids.get_chunk_coords(node, other).tolist() != [[170, 301, 13]]


@st.composite
def layouts_and_ids(draw):
    layer = draw(st.integers(1, 12))
    bits = draw(st.integers(1, 12))
    layout = ids.SpatialBits.from_mapping({layer: bits})
    seg_bits = 64 - 8 - 3 * bits
    n = draw(st.integers(1, 50))
    coords = draw(st.lists(st.tuples(*[st.integers(0, 2**bits - 1)] * 3), min_size=n, max_size=n))
    segs = draw(st.lists(st.integers(0, 2**seg_bits - 1), min_size=n, max_size=n))
    return layer, layout, np.array(coords, dtype=np.int64), np.array(segs, dtype=np.uint64)


@settings(max_examples=200, deadline=None)
@given(layouts_and_ids())
def test_encode_decode_round_trip(case):
    layer, layout, coords, segs = case
    encoded = ids.encode_ids(layer, coords, segs, layout)
    assert encoded.dtype == np.uint64
    assert (ids.get_layer(encoded) == layer).all()
    np.testing.assert_array_equal(ids.get_chunk_coords(encoded, layout), coords)
    np.testing.assert_array_equal(ids.get_segment_id(encoded, layout), segs)
    chunk_ids = ids.get_chunk_id(encoded, layout)
    np.testing.assert_array_equal(chunk_ids, ids.chunk_id_from_coords(layer, coords, layout))
    np.testing.assert_array_equal(chunk_ids | segs, encoded)


def test_mixed_layers_decode_with_their_own_bits():
    a = ids.encode_ids(1, [[3, 4, 5]], 77, PINNED)
    b = ids.encode_ids(4, [[3, 4, 5]], 77, PINNED)
    both = np.concatenate([a, b])
    np.testing.assert_array_equal(ids.get_chunk_coords(both, PINNED), [[3, 4, 5], [3, 4, 5]])
    np.testing.assert_array_equal(ids.get_layer(both), [1, 4])


def test_fields_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="chunk coordinate"):
        ids.encode_ids(2, [[1024, 0, 0]], 1, PINNED)
    with pytest.raises(ValueError, match="segment id"):
        ids.encode_ids(2, [[0, 0, 0]], 2**26, PINNED)
    with pytest.raises(ValueError, match="not defined"):
        ids.get_chunk_coords(np.uint64(9 << 56), PINNED)


def test_as_uint64_rejects_negative_and_oversized():
    with pytest.raises(ValueError):
        ids.as_uint64([-1])
    with pytest.raises(ValueError):
        ids.as_uint64(np.array([2**64], dtype=object))
    assert ids.as_uint64(np.array([2**64 - 1], dtype=object)).tolist() == [2**64 - 1]
    with pytest.raises(TypeError):
        ids.as_uint64([1.5])


def test_row_keys_match_pcg_format():
    assert ids.row_key(156098560020972550) == b"00156098560020972550"
    assert ids.row_keys(np.array([1, 2**64 - 1], dtype=np.uint64)) == [
        b"00000000000000000001",
        b"18446744073709551615",
    ]
    assert ids.parse_row_key(b"00156098560020972550") == 156098560020972550
