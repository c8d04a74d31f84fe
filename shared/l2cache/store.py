"""The cache table on Bigtable: write feature rows with lineage, read them in API units.

Row key ``%020d`` of the L2 id; family ``0`` holds the eight attributes in the exact
bytes of :mod:`l2cache.attributes` (byte-compatible with tables of the existing
service), family ``lineage`` the run id and friends, written in the same mutation so
a row never has features without provenance.

Two row flavours are served:
- ours (``lineage:run`` present): ``size_nm3`` is a voxel count, ``rep_coord_nm`` a
  chunk-relative voxel index (u16[3]); the reader converts both to nm.
- the existing service's (no lineage): ``size_nm3`` already in nm^3 and
  ``rep_coord_nm`` absolute nm (u64[3]); served as stored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from google.cloud.bigtable import column_family, row_filters
from google.cloud.bigtable.row_set import RowSet

from . import ids as idlib
from .attributes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    BY_NAME,
    FEATURE_FAMILY,
    LINEAGE_FAMILY,
    LINEAGE_RUN_COLUMN,
    decode_cell,
    encode_column,
)
from .config import DatasetConfig
from .lineage import Lineage

WRITE_BATCH = 2_000
READ_BATCH = 2_500
READ_THREADS = 8
WRITE_ATTEMPTS = 4


class StoreWriteError(RuntimeError):
    """Rows that still failed after every retry; nothing is silently dropped."""

    def __init__(self, failed: dict[int, str]) -> None:
        self.failed = failed
        sample = ", ".join(f"{k}: {v}" for k, v in list(failed.items())[:5])
        super().__init__(f"{len(failed)} rows failed to write after retries ({sample})")


def create_cache_table(instance, table_id: str, max_versions: int = 5):
    """Create (or reuse) a cache table with families ``0`` and ``lineage``.

    GC keeps the last ``max_versions`` cell versions, which is what lets a bad run be
    rolled back to the previous values.
    """
    table = instance.table(table_id)
    gc = column_family.MaxVersionsGCRule(max_versions)
    if not table.exists():
        table.create(column_families={FEATURE_FAMILY: gc, LINEAGE_FAMILY: gc})
    else:
        existing = table.list_column_families()
        for fam in (FEATURE_FAMILY, LINEAGE_FAMILY):
            if fam not in existing:
                table.column_family(fam, gc).create()
    return table


class CacheStore:
    """Feature rows of one dataset's cache table."""

    def __init__(self, table, dataset: DatasetConfig) -> None:
        self.table = table
        self.dataset = dataset

    # -- writing ---------------------------------------------------------------
    def write_features(self, features: dict[str, np.ndarray], lineage: Lineage) -> int:
        """Write one row per node; all cells at ``lineage.cell_timestamp``.

        Idempotent: the same features and lineage write the same cells at the same
        version, so a retried task leaves identical bytes.
        """
        if not isinstance(lineage, Lineage) or not lineage.run_id:
            raise ValueError("a feature write needs a Lineage with a run id")
        l2ids = np.asarray(features["l2id"], dtype=np.uint64)
        n = l2ids.size
        if n == 0:
            return 0
        columns = {a.name: encode_column(a, features[a.name]) for a in ATTRIBUTES}
        lineage_cols = lineage.columns()
        ts = lineage.cell_timestamp
        keys = idlib.row_keys(l2ids)
        rows = []
        for i, key in enumerate(keys):
            row = self.table.direct_row(key)
            for attr in ATTRIBUTES:
                row.set_cell(FEATURE_FAMILY, attr.key, columns[attr.name][i], timestamp=ts)
            for col, value in lineage_cols.items():
                row.set_cell(LINEAGE_FAMILY, col, value, timestamp=ts)
            rows.append(row)
        self._mutate(rows)
        return n

    def _mutate(self, rows: list) -> None:
        pending = rows
        errors: dict[int, str] = {}
        for attempt in range(WRITE_ATTEMPTS):
            failed = []
            errors = {}
            for start in range(0, len(pending), WRITE_BATCH):
                batch = pending[start : start + WRITE_BATCH]
                statuses = self.table.mutate_rows(batch)
                for row, status in zip(batch, statuses, strict=True):
                    if status.code != 0:
                        failed.append(row)
                        errors[int(row.row_key)] = status.message or f"code {status.code}"
            if not failed:
                return
            pending = failed
            time.sleep(min(0.1 * 2**attempt, 2.0))
        raise StoreWriteError(errors)

    # -- reading ---------------------------------------------------------------
    def read_raw(self, l2ids) -> dict[int, dict[str, dict[bytes, bytes]]]:
        """Newest cell bytes per family and column, for byte-level checks and tools."""
        out: dict[int, dict[str, dict[bytes, bytes]]] = {}
        filt = row_filters.CellsColumnLimitFilter(1)
        for rows in self._read_batches(idlib.as_uint64(l2ids), filt):
            for row in rows:
                out[int(row.row_key)] = {
                    fam: {col: cells[0].value for col, cells in cols.items()}
                    for fam, cols in row.cells.items()
                }
        return out

    def read_features(
        self, l2ids, attribute_names: Sequence[str] | None = None
    ) -> dict[int, dict[str, Any]]:
        """Features of the ids that have rows, in API units, JSON-ready.

        Missing ids are absent from the result. Raises ``KeyError`` for an unknown
        attribute name (the lookup turns that into a 400 before reading).
        """
        names = list(attribute_names) if attribute_names else list(ATTRIBUTE_NAMES)
        for name in names:
            if name not in BY_NAME:
                raise KeyError(name)
        ids = np.unique(idlib.as_uint64(l2ids))
        layer = idlib.get_layer(ids)
        ids = ids[layer == 2]
        if ids.size == 0:
            return {}
        qualifiers = "|".join(sorted(names))
        filt = row_filters.RowFilterChain(
            [
                row_filters.CellsColumnLimitFilter(1),
                row_filters.RowFilterUnion(
                    [
                        row_filters.RowFilterChain(
                            [
                                row_filters.FamilyNameRegexFilter(FEATURE_FAMILY),
                                row_filters.ColumnQualifierRegexFilter(
                                    f"^({qualifiers})$".encode()
                                ),
                            ]
                        ),
                        row_filters.RowFilterChain(
                            [
                                row_filters.FamilyNameRegexFilter(LINEAGE_FAMILY),
                                row_filters.ColumnQualifierRegexFilter(b"^run$"),
                            ]
                        ),
                    ]
                ),
            ]
        )
        result: dict[int, dict[str, Any]] = {}
        for rows in self._read_batches(ids, filt):
            self._decode_rows(rows, names, result)
        return result

    def _read_batches(self, ids: np.ndarray, filt):
        """Read ``ids`` in concurrent batches; yields each batch's rows."""
        keys = idlib.row_keys(ids)
        batches = [keys[i : i + READ_BATCH] for i in range(0, len(keys), READ_BATCH)]

        def read(batch: list[bytes]) -> list:
            row_set = RowSet()
            for key in batch:
                row_set.add_row_key(key)
            return list(self.table.read_rows(row_set=row_set, filter_=filt))

        if len(batches) <= 1:
            yield from (read(b) for b in batches)
            return
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(batches))) as pool:
            yield from pool.map(read, batches)

    def _decode_rows(self, rows: list, names: list[str], result: dict[int, dict[str, Any]]) -> None:
        if not rows:
            return
        ds = self.dataset
        res = np.asarray(ds.resolution, dtype=np.float64)
        for row in rows:
            node = int(row.row_key)
            feats = row.cells.get(FEATURE_FAMILY, {})
            if not feats:
                continue
            ours = LINEAGE_RUN_COLUMN in row.cells.get(LINEAGE_FAMILY, {})
            entry: dict[str, Any] = {}
            for name in names:
                cells = feats.get(name.encode())
                if not cells:
                    continue
                value = decode_cell(BY_NAME[name], cells[0].value)
                if value is None:
                    continue  # empty pca/pca_val: omitted, as the existing service does
                entry[name] = self._api_value(name, value, node, ours, res)
            result[node] = entry

    def _api_value(self, name: str, value: np.ndarray, node: int, ours: bool, res: np.ndarray):
        if name == "size_nm3":
            nm3 = float(value) * self.dataset.voxel_volume_nm3 if ours else float(value)
            return int(nm3) if nm3.is_integer() else nm3
        if name == "rep_coord_nm":
            if value.dtype.itemsize == 8:  # legacy: absolute nm already
                return [int(v) for v in value.tolist()]
            coords = idlib.get_chunk_coords(np.uint64(node), self.dataset.spatial_bits)[0]
            origin = np.asarray(self.dataset.voxel_offset) + coords * np.asarray(
                self.dataset.chunk_size
            )
            nm = (value.astype(np.float64) + origin) * res
            return [int(v) if float(v).is_integer() else float(v) for v in nm.tolist()]
        if name == "mean_dt_nm":
            return float(value)
        if value.ndim == 0:
            return value.item()
        return value.tolist()
