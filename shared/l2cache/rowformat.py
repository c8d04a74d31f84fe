"""Cache rows to API values, exactly as the existing service (PCGL2Cache) serves them.

The existing frontend reads every cell with kvdbclient's serializers, then
(``app/common.py``) multiplies ``size_nm3`` by the voxel volume and turns
``rep_coord_nm`` into nm by adding the chunk origin, for *every* row: since 2022 its
writer stores a voxel count and a chunk-relative u16 voxel index. This module does the
same arithmetic in the same numpy types, so the JSON matches value for value and type
for type:

- ``size_nm3``: ``uint32 * prod(resolution)``: an int64 (stringified by
  ``int64_as_str``) when the segmentation's resolution is integral, else a float.
- ``rep_coord_nm``: ``(uint64 index + int chunk origin) * resolution``: floats.
- ``mean_dt_nm``, ``pca``, ``pca_val``: floats; the other attributes unsigned ints.
- empty array cells (PCA of tiny nodes) are left out.
- the placeholder the existing worker writes for an id it could not compute (only
  ``size_nm3``, 8 zero bytes of ``np.uint64(0)``; kvdbclient reads the first 4 bytes as
  uint32) is served as ``{"size_nm3": 0}`` and, being present, never re-queued.

Rows of the pre-2022 format (``size_nm3`` in nm^3, ``rep_coord_nm`` absolute nm in
u64[3]) are served as stored, but only for a dataset whose map entry says
``row_format: legacy_nm``, and never for rows l2cache wrote (they carry lineage).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import ids as idlib
from .attributes import BY_NAME, FEATURE_FAMILY, LINEAGE_FAMILY, LINEAGE_RUN_COLUMN, Attribute
from .config import DatasetConfig

log = logging.getLogger(__name__)

LEGACY_NM = "legacy_nm"
_U8 = np.dtype("<u8")


def decode_rows(
    rows: dict[bytes, dict], names: list[str], ds: DatasetConfig, int64_as_str: bool = False
) -> dict[int, dict[str, Any]]:
    """``{l2 id: {attribute: API value}}`` for the rows that hold a requested column.

    Decoding is per attribute over all rows at once (one ``frombuffer`` per attribute
    and storage variant); only cells of an unusual length take the per-cell path.
    """
    keys = [name.encode() for name in names]
    present = [
        (k, r[FEATURE_FAMILY])
        for k, r in rows.items()
        if any(key in r.get(FEATURE_FAMILY, {}) for key in keys)
    ]
    if not present:
        return {}
    nodes = np.array([int(k) for k, _ in present], dtype=np.uint64)
    legacy = np.array(
        [
            ds.row_format == LEGACY_NM and LINEAGE_RUN_COLUMN not in rows[k].get(LINEAGE_FAMILY, {})
            for k, _ in present
        ]
    )
    order = np.argsort(nodes, kind="stable")  # the existing service answers in id order
    out_keys = nodes.tolist()
    result: dict[int, dict[str, Any]] = {out_keys[i]: {} for i in order.tolist()}
    for name in sorted(names):  # Bigtable's column order, as kvdbclient returns them
        attr = BY_NAME[name]
        cells = [cols.get(attr.key) for _, cols in present]
        for index, values in _column(attr, cells, nodes, legacy, ds, int64_as_str):
            for i, value in zip(index.tolist(), values, strict=True):
                result[out_keys[i]][name] = value
    return result


def _column(attr: Attribute, cells, nodes, legacy, ds, int64_as_str):
    """Yield ``(row indices, API values)`` per storage variant of one attribute."""
    lengths = np.array([-1 if c is None else len(c) for c in cells])
    for is_legacy in (False, True):
        rows_of_kind = legacy == is_legacy
        if not rows_of_kind.any():
            continue
        dtype, shape = attr.dtype, attr.shape
        if is_legacy and attr.name == "rep_coord_nm":
            dtype = _U8
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        standard = np.flatnonzero(rows_of_kind & (lengths == nbytes))
        if standard.size:
            blob = b"".join(cells[i] for i in standard.tolist())
            arr = np.frombuffer(blob, dtype=dtype).reshape(-1, *shape)
            yield standard, _api_values(attr, arr, nodes[standard], is_legacy, ds, int64_as_str)
        # Anything else kvdbclient would still read (e.g. the 8-byte placeholder size);
        # 0-byte cells are the empty PCA of tiny nodes and are left out, as upstream.
        for i in np.flatnonzero(rows_of_kind & (lengths > 0) & (lengths != nbytes)).tolist():
            arr = _kvdbclient_value(attr, dtype, cells[i])
            if arr is None:
                log.warning("%s of %d: %d-byte cell not served", attr.name, nodes[i], lengths[i])
                continue
            values = _api_values(attr, arr[None], nodes[i : i + 1], is_legacy, ds, int64_as_str)
            yield np.array([i]), values


def _kvdbclient_value(attr: Attribute, dtype: np.dtype, cell: bytes) -> np.ndarray | None:
    """What kvdbclient's serializer reads from an odd-sized cell, or None if it cannot.

    ``NumPyValue`` takes the first element; ``NumPyArray`` reshapes to ``(-1, 3)`` (or
    flat); ``rep_coord_nm`` must have 3 elements to be offset to nm.
    """
    if len(cell) % dtype.itemsize:
        return None
    flat = np.frombuffer(cell, dtype=dtype)
    if attr.shape == ():
        return flat[0]
    if attr.name == "rep_coord_nm":
        return flat if flat.size == 3 else None
    if len(attr.shape) == 2:
        return flat.reshape(-1, attr.shape[1]) if flat.size % attr.shape[1] == 0 else None
    return flat


def _api_values(attr, arr, nodes, is_legacy, ds: DatasetConfig, int64_as_str) -> list:
    """API values of ``arr`` (leading axis = rows) for ``nodes``."""
    name = attr.name
    if name == "size_nm3" and not is_legacy:
        if ds.integral_resolution:  # uint32 * int64 -> int64
            vol = int(np.prod(np.asarray(ds.resolution, dtype=np.int64)))
            return _int64(arr.astype(np.int64) * vol, int64_as_str)
        return (arr.astype(np.float64) * float(np.prod(ds.resolution))).tolist()
    if name == "rep_coord_nm":
        if is_legacy:  # absolute nm as uint64
            return _int64(arr, int64_as_str)
        chunk = idlib.get_chunk_coords(nodes, ds.spatial_bits)
        origin = chunk * np.asarray(ds.chunk_size) + np.asarray(ds.voxel_offset)
        # upstream: (uint64 + int64 -> float64) * resolution
        return ((arr.astype(np.float64) + origin) * np.asarray(ds.resolution)).tolist()
    if arr.dtype.kind == "f":
        return arr.astype(np.float64).tolist()
    return arr.astype(np.int64).tolist()


def _int64(values: np.ndarray, as_str: bool) -> list:
    """int64/uint64 values as the existing encoder writes them (strings on request)."""
    if as_str:
        return values.astype(str).tolist()
    return values.tolist()
