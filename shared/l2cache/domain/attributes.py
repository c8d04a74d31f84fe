"""The eight L2 attributes: names, storage dtypes and their exact bytes.

One table, used by the feature engine (what it returns), the store (what it writes)
and the lookup (what it reads), so the three can never disagree about a byte.
Storage values are little-endian and byte-compatible with tables written by the
existing L2 cache service (kvdbclient ``NumPyValue`` / ``NumPyArray`` serializers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Attribute:
    """One stored attribute.

    ``shape`` is the per-node shape of the engine's array (``()`` for scalars).
    ``may_be_empty`` marks attributes stored as 0 bytes for nodes too small to have
    them (PCA below 0.01 um^3); the engine marks such rows with NaN.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    may_be_empty: bool = False

    @property
    def key(self) -> bytes:
        """Bigtable column qualifier in family ``0``."""
        return self.name.encode()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


_LE = {
    "u2": np.dtype("<u2"),
    "u4": np.dtype("<u4"),
    "u8": np.dtype("<u8"),
    "f2": np.dtype("<f2"),
    "f4": np.dtype("<f4"),
}

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("size_nm3", _LE["u4"], ()),
    Attribute("area_nm2", _LE["u4"], ()),
    Attribute("max_dt_nm", _LE["u2"], ()),
    Attribute("mean_dt_nm", _LE["f2"], ()),
    Attribute("rep_coord_nm", _LE["u2"], (3,)),
    Attribute("chunk_intersect_count", _LE["u2"], (2, 3)),
    Attribute("pca", _LE["f2"], (3, 3), may_be_empty=True),
    Attribute("pca_val", _LE["f4"], (3,), may_be_empty=True),
)
BY_NAME: dict[str, Attribute] = {a.name: a for a in ATTRIBUTES}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(a.name for a in ATTRIBUTES)

# Before 2022 the existing service stored rep_coord_nm as absolute nm in uint64[3]
# (24 bytes); since then, as we do, the chunk-relative voxel index in uint16[3] (6 bytes).
# The lookup reads the old form only for datasets mapped ``row_format: legacy_nm``.
LEGACY_REP_COORD_DTYPE = _LE["u8"]

# Family and column names shared by writer and readers.
FEATURE_FAMILY = "0"
LINEAGE_FAMILY = "lineage"
LINEAGE_RUN_COLUMN = b"run"


def saturate(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to an integer ``dtype``, clipping at its range instead of wrapping.

    A u16 distance of 70,000 nm must read as 65,535, not 4,464: saturation keeps a
    value wrong in the safe direction and visibly at the limit.
    """
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype)
    return np.clip(values, info.min, info.max).astype(dtype)


def encode_column(attr: Attribute, values: np.ndarray) -> list[bytes]:
    """Per-node cell values of one attribute, in storage bytes.

    ``values`` has shape ``(N, *attr.shape)``. Rows of an ``may_be_empty`` attribute
    that contain NaN become ``b""``. One ``tobytes`` for the whole column, then slicing,
    so writing a chunk of thousands of nodes costs no per-node numpy call.
    """
    arr = np.ascontiguousarray(np.asarray(values).astype(attr.dtype, copy=False))
    n = arr.shape[0]
    if arr.shape[1:] != attr.shape:
        raise ValueError(f"{attr.name}: expected per-node shape {attr.shape}, got {arr.shape[1:]}")
    blob = arr.tobytes()
    step = attr.nbytes
    cells = [blob[i * step : (i + 1) * step] for i in range(n)]
    if attr.may_be_empty and n:
        empty = np.isnan(arr.reshape(n, -1).astype(np.float32)).any(axis=1)
        for i in np.flatnonzero(empty).tolist():
            cells[i] = b""
    return cells


def decode_cell(attr: Attribute, cell: bytes) -> np.ndarray | None:
    """Storage bytes of one cell to a numpy value; ``None`` for an empty cell.

    Accepts the legacy 24-byte uint64 ``rep_coord_nm`` of the existing service (the
    caller tells the two apart by dtype: uint64 means absolute nm already).
    """
    if not cell:
        return None if attr.may_be_empty else _bad(attr, cell)
    if attr.name == "rep_coord_nm" and len(cell) == 3 * LEGACY_REP_COORD_DTYPE.itemsize:
        return np.frombuffer(cell, dtype=LEGACY_REP_COORD_DTYPE)
    if len(cell) != attr.nbytes:
        return _bad(attr, cell)
    value = np.frombuffer(cell, dtype=attr.dtype)
    return value[0] if attr.shape == () else value.reshape(attr.shape)


def _bad(attr: Attribute, cell: bytes) -> np.ndarray:
    raise ValueError(f"{attr.name}: cell of {len(cell)} bytes, expected {attr.nbytes}")
