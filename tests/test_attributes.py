"""Attribute cell bytes: exact little-endian layout, empty PCA cells, saturation, legacy cells."""

import numpy as np
import pytest

from l2cache.domain.attributes import ATTRIBUTES, BY_NAME, decode_cell, encode_column, saturate


def test_cell_sizes_match_design_schema():
    sizes = {a.name: a.nbytes for a in ATTRIBUTES}
    assert sizes == {
        "size_nm3": 4,
        "area_nm2": 4,
        "max_dt_nm": 2,
        "mean_dt_nm": 2,
        "rep_coord_nm": 6,
        "chunk_intersect_count": 12,
        "pca": 18,
        "pca_val": 12,
    }


def test_encode_decode_round_trip_and_little_endian():
    attr = BY_NAME["size_nm3"]
    cells = encode_column(attr, np.array([1, 258], dtype=np.uint32))
    assert cells == [b"\x01\x00\x00\x00", b"\x02\x01\x00\x00"]
    assert decode_cell(attr, cells[1]) == 258

    cic = BY_NAME["chunk_intersect_count"]
    value = np.arange(6, dtype=np.uint16).reshape(1, 2, 3)
    (cell,) = encode_column(cic, value)
    np.testing.assert_array_equal(decode_cell(cic, cell), value[0])


def test_nan_pca_rows_become_empty_cells():
    pca = BY_NAME["pca"]
    values = np.zeros((2, 3, 3), dtype=np.float16)
    values[1] = np.nan
    cells = encode_column(pca, values)
    assert len(cells[0]) == 18 and cells[1] == b""
    assert decode_cell(pca, b"") is None


def test_non_optional_attribute_refuses_empty_or_wrong_length_cell():
    with pytest.raises(ValueError):
        decode_cell(BY_NAME["size_nm3"], b"")
    with pytest.raises(ValueError):
        decode_cell(BY_NAME["size_nm3"], b"\x00\x00\x00")


def test_legacy_uint64_rep_coord_is_recognised():
    cell = np.array([160, 320, 4000], dtype="<u8").tobytes()
    value = decode_cell(BY_NAME["rep_coord_nm"], cell)
    assert value.dtype == np.dtype("<u8")
    assert value.tolist() == [160, 320, 4000]


def test_saturate_clips_instead_of_wrapping():
    out = saturate(np.array([-5, 70_000, 12], dtype=np.int64), np.uint16)
    assert out.tolist() == [0, 65535, 12]
    assert saturate(np.array([2**40]), np.uint32).tolist() == [2**32 - 1]
