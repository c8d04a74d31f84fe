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
``row_format: legacy_nm``, and never for rows l2cache wrote: those have a 6-byte
``rep_coord_nm`` (u16[3], where a legacy row has 24 bytes), and rows written before
lineage moved out of the feature rows also carry a ``lineage:run`` cell.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from l2cache.config import DatasetConfig
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import (
    BY_NAME,
    FEATURE_FAMILY,
    LINEAGE_FAMILY,
    LINEAGE_RUN_COLUMN,
    Attribute,
)

log = logging.getLogger(__name__)

LEGACY_NM = "legacy_nm"
CURRENT = "current"
_REP_COORD = BY_NAME["rep_coord_nm"]
_U8 = np.dtype("<u8")
_EMPTY: Mapping[bytes, bytes] = {}  # a family the row does not have
_ABSENT = object()  # a row's missing value while its dict is assembled


def decode_rows(
    rows: Mapping[bytes, Mapping[str, Mapping[bytes, bytes]]],
    names: list[str],
    ds: DatasetConfig,
    int64_as_str: bool = False,
) -> dict[int, dict[str, Any]]:
    """``{l2 id: {attribute: API value}}`` for the rows that hold a requested column.

    Columnar on purpose (this is most of a lookup's own CPU): per attribute one
    ``frombuffer`` over all rows' cells and one ``tolist``; the per-id dicts are then
    zipped together in C. Only cells of an unusual length take a per-cell path, and only
    rows lacking a column get a dict built one by one.
    """
    if not rows:
        return {}
    keys = list(rows)
    nodes = np.array(list(map(int, keys)), dtype=np.uint64)
    order = np.argsort(nodes, kind="stable")  # the existing service answers in id order
    order_list = order.tolist()
    nodes = nodes[order]
    families = [rows[keys[i]].get(FEATURE_FAMILY, _EMPTY) for i in order_list]
    wanted = sorted(names)  # Bigtable's column order, as kvdbclient returns them
    cells = {name: [f.get(key) for f in families] for name, key in _keys(wanted)}
    lengths = {
        name: np.fromiter((-1 if c is None else len(c) for c in col), np.int64, len(col))
        for name, col in cells.items()
    }
    present = np.logical_or.reduce([lens >= 0 for lens in lengths.values()])
    if not present.all():  # rows with none of the requested columns are left out
        keep = np.flatnonzero(present)
        keep_list = keep.tolist()
        nodes = nodes[keep]
        order_list = [order_list[i] for i in keep_list]
        cells = {name: [col[i] for i in keep_list] for name, col in cells.items()}
        lengths = {name: lens[keep] for name, lens in lengths.items()}
    n = nodes.size
    if n == 0:
        return {}
    if ds.row_format == LEGACY_NM:
        legacy = np.array([_is_legacy(rows[keys[i]]) for i in order_list], dtype=bool)
    else:
        legacy = np.zeros(n, dtype=bool)
    columns = []
    complete = np.ones(n, dtype=bool)  # rows that have every requested value
    for name in wanted:
        values, has = _column(
            BY_NAME[name], cells[name], lengths[name], nodes, legacy, ds, int64_as_str
        )
        columns.append(values)
        complete &= has
    out_keys = nodes.tolist()
    dicts = [dict(zip(wanted, vals, strict=True)) for vals in zip(*columns, strict=True)]
    for i in np.flatnonzero(~complete).tolist():
        dicts[i] = {k: v for k, v in dicts[i].items() if v is not _ABSENT}
    return dict(zip(out_keys, dicts, strict=True))


def is_placeholder_row(row: Mapping[str, Mapping[bytes, bytes]]) -> bool:
    """Whether a row is the existing worker's placeholder for an id it could not
    compute: its feature family holds only ``size_nm3``, all zero bytes (8 of them:
    ``np.uint64(0)``, or 4)."""
    cells = row.get(FEATURE_FAMILY, _EMPTY)
    size = cells.get(b"size_nm3")
    return len(cells) == 1 and size is not None and size.count(0) == len(size) > 0


def _is_legacy(row: Mapping[str, Mapping[bytes, bytes]]) -> bool:
    """Whether a row of a ``legacy_nm`` table is in the pre-2022 format: not l2cache's
    (no ``lineage:run`` of the older layout, no u16[3] ``rep_coord_nm``)."""
    if LINEAGE_RUN_COLUMN in row.get(LINEAGE_FAMILY, _EMPTY):
        return False
    rep = row.get(FEATURE_FAMILY, _EMPTY).get(_REP_COORD.key)
    return rep is None or len(rep) != _REP_COORD.nbytes


def _keys(names: list[str]) -> list[tuple[str, bytes]]:
    return [(name, BY_NAME[name].key) for name in names]


def _column(
    attr: Attribute,
    cells: Sequence[bytes | None],
    lengths: np.ndarray,
    nodes: np.ndarray,
    legacy: np.ndarray,
    ds: DatasetConfig,
    int64_as_str: bool,
) -> tuple[list[Any], np.ndarray]:
    """``(API value per row, whether the row has one)`` for one attribute; a row without a
    value holds ``_ABSENT``."""
    n = len(cells)
    values: list[Any] = [_ABSENT] * n
    has = np.zeros(n, dtype=bool)
    for is_legacy in (False, True):
        rows_of_kind = legacy == is_legacy
        if not rows_of_kind.any():
            continue
        dtype, shape = attr.dtype, attr.shape
        if is_legacy and attr.name == "rep_coord_nm":
            dtype = _U8
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        standard_mask = rows_of_kind & (lengths == nbytes)
        if standard_mask.all():  # the common case: one cell of the stored size per row
            blob = b"".join(cells)
            arr = np.frombuffer(blob, dtype=dtype).reshape(-1, *shape)
            return _api_values(attr, arr, nodes, is_legacy, ds, int64_as_str), standard_mask
        standard = np.flatnonzero(standard_mask)
        if standard.size:
            blob = b"".join([cells[i] for i in standard.tolist()])
            arr = np.frombuffer(blob, dtype=dtype).reshape(-1, *shape)
            api = _api_values(attr, arr, nodes[standard], is_legacy, ds, int64_as_str)
            for i, value in zip(standard.tolist(), api, strict=True):
                values[i] = value
            has[standard] = True
        # Anything else kvdbclient would still read (e.g. the 8-byte placeholder size);
        # 0-byte cells are the empty PCA of tiny nodes and are left out, as upstream.
        for i in np.flatnonzero(rows_of_kind & (lengths > 0) & (lengths != nbytes)).tolist():
            arr = _kvdbclient_value(attr, dtype, cells[i])
            if arr is None:
                log.warning("%s of %d: %d-byte cell not served", attr.name, nodes[i], lengths[i])
                continue
            values[i] = _api_values(attr, arr[None], nodes[i : i + 1], is_legacy, ds, int64_as_str)[
                0
            ]
            has[i] = True
    return values, has


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


def _api_values(
    attr: Attribute,
    arr: np.ndarray,
    nodes: np.ndarray,
    is_legacy: bool,
    ds: DatasetConfig,
    int64_as_str: bool,
) -> list[Any]:
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


def _int64(values: np.ndarray, as_str: bool) -> list[Any]:
    """int64/uint64 values as the existing encoder writes them (strings on request)."""
    if as_str:
        return values.astype(str).tolist()
    return values.tolist()
