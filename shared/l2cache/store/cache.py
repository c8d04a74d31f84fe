"""The cache table on Bigtable: write feature rows with lineage, read them in API units.

Row key ``%020d`` of the L2 id; family ``0`` holds the eight attributes in the exact
bytes of :mod:`l2cache.domain.attributes` (byte-compatible with tables of the existing
service) and nothing else, so the existing service's frontend and any kvdbclient reader
can read a table l2cache wrote. The lineage of each write (run id and friends) is one
row per written chunk beside them, written first: a feature version is stored only
after its lineage row (a crash between the two leaves a lineage row naming versions
that do not exist, never the reverse; :mod:`l2cache.store.lineage_rows` says what can
still separate them).

A dataset with a ``fallback_table_id`` (the switch-over) is read from its cache table
first and from the fallback table for the ids the cache table has no row for.

Rows are stored in the existing service's current format (``size_nm3`` a voxel count,
``rep_coord_nm`` a chunk-relative voxel index) whoever wrote them; reading them back in
API units, exactly as the existing frontend does, is :mod:`l2cache.store.rowformat`'s job.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from google.cloud.bigtable import column_family

from l2cache.config import DatasetConfig
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    BY_NAME,
    FEATURE_FAMILY,
    LINEAGE_FAMILY,
    encode_column,
)
from l2cache.domain.failures import BadRequest
from l2cache.domain.lineage import Lineage, utc_now
from l2cache.gcp.bigtable import WRITE_SCOPE, RowCells, RowReader, data_channel
from l2cache.gcp.bigtable_write import encode_columns, mutate_entries, timestamp_micros
from l2cache.store import lineage_rows
from l2cache.store.rowformat import CURRENT, decode_rows, is_placeholder_row

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.instance import Instance
    from google.cloud.bigtable.table import Table

log = logging.getLogger(__name__)

READ_BATCH = 10_000  # one stream per 10k ids: measured fastest on the emulator (GIL-bound parse)
READ_THREADS = 4
# the existing worker's row for an id it could not compute: {SIZE_NM3: np.uint64(0)}
PLACEHOLDER_CELL = (FEATURE_FAMILY, BY_NAME["size_nm3"].key, bytes(8))


def create_cache_table(instance: Instance, table_id: str, max_versions: int = 5) -> Table:
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

    def __init__(self, table: Table, dataset: DatasetConfig) -> None:
        self.table = table
        self.dataset = dataset
        self._reader: RowReader | None = None
        self._fallback: CacheStore | None = None
        # with a fallback, ``row_format`` describes the fallback table: this one's rows
        # are l2cache's own, always current
        self._own_format = (
            dataclasses.replace(dataset, row_format=CURRENT)
            if dataset.fallback_table_id
            else dataset
        )

    # -- writing ---------------------------------------------------------------
    def write_features(
        self,
        features: dict[str, np.ndarray],
        lineage: Lineage,
        placeholders: np.ndarray | Sequence[int] | None = None,
    ) -> int:
        """Write one row per node; all cells at ``lineage.cell_timestamp``.

        ``placeholders``: ids that exist in the graph but have no voxel (every supervoxel
        a ghost), written as the existing worker writes them (``0:size_nm3`` = 8 zero
        bytes of ``np.uint64(0)``, :func:`.rowformat.is_placeholder_row`), so the lookup
        serves ``{"size_nm3": 0}`` and never queues them again; the write's lineage rows
        name them too, so a rollback of the write takes them back. Counted in the result.

        The write's lineage rows (one per chunk, :mod:`.lineage_rows`) go first, then
        the feature rows (family ``0`` only). Idempotent: the same features and lineage
        write the same cells at the same version (the lineage row's key names the ids
        written), so a retried task leaves identical bytes, except the lineage row's
        ``written`` (the wall clock of the latest attempt, what prune's grace counts
        from). A table another service owns (``existing_cache_table``) is refused here,
        whichever path tries to write it.
        """
        if not isinstance(lineage, Lineage) or not lineage.run_id:
            raise ValueError("a feature write needs a Lineage with a run id")
        if self.dataset.existing_cache_table:
            raise BadRequest(
                f"cache table {self.dataset.cache_table_id} of {self.dataset.name!r} is an "
                "existing table another service owns: l2cache does not write it"
            )
        l2ids = np.asarray(features["l2id"], dtype=np.uint64)
        empty = np.setdiff1d(
            np.asarray([] if placeholders is None else placeholders, dtype=np.uint64), l2ids
        )
        n = l2ids.size
        if n + empty.size == 0:
            return 0
        # the lineage row's key names the version's time: never left to the server
        at = lineage.cell_timestamp or utc_now()
        micros = timestamp_micros(at)
        rows = lineage_rows.lineage_rows(
            np.union1d(l2ids, empty),
            lineage.columns(),
            lineage.run_id,
            micros,
            self.dataset.spatial_bits,
        )
        lineage_entries = []
        for key, cells in rows:
            shared = [(LINEAGE_FAMILY, col, value) for col, value in cells.items()]
            lineage_entries += encode_columns([key], [], shared, at)
        channel = data_channel(WRITE_SCOPE)
        mutate_entries(channel, self.table.name, lineage_entries, "lineage")
        entries = []
        if n:
            columns = [
                (FEATURE_FAMILY, a.key, encode_column(a, features[a.name])) for a in ATTRIBUTES
            ]
            entries += encode_columns(idlib.row_keys(l2ids), columns, [], at)
        if empty.size:
            entries += encode_columns(idlib.row_keys(empty), [], [PLACEHOLDER_CELL], at)
        mutate_entries(channel, self.table.name, entries, "cache")
        return n + int(empty.size)

    def read_lineage(
        self, l2ids: np.ndarray | Iterable[int], stamps: dict[int, int] | None = None
    ) -> dict[int, dict[bytes, bytes]]:
        """Lineage columns (``run``, ``params``, ``code``, ``input``) of each id's newest
        version (or of the version at ``stamps[id]`` micros), whichever layout holds
        them; ids without l2cache lineage are left out (:func:`.lineage_rows.lineage_of`)."""
        return lineage_rows.lineage_of(self.reader, l2ids, self.dataset.spatial_bits, stamps)

    # -- reading ---------------------------------------------------------------
    def chunk_row_ids(self, coords: Sequence[int]) -> np.ndarray:
        """The L2 ids that have a row in this table in chunk ``coords`` (ascending): one
        keys-only range read of the chunk's id range (a chunk's L2 ids share its chunk id
        in their high bits, so their ``%020d`` keys are one range; lineage rows sort
        after every digit and are never in it). What a reprocess reads to find the ids
        an edit computed earlier that the graph has since replaced."""
        bits = self.dataset.spatial_bits
        first = int(idlib.chunk_id_from_coords(2, np.asarray([coords]), bits)[0])
        seg_bits = 64 - 8 - 3 * int(bits.bits_for(np.array([2]))[0])  # id - layer - xyz
        end = first + (1 << seg_bits)
        keys = self.reader.keys_in_range(idlib.row_key(first), idlib.row_key(end))
        return np.array([int(k) for k in keys], dtype=np.uint64)

    def row_stamps(self, l2ids: np.ndarray | Iterable[int]) -> dict[int, int]:
        """Each id's newest cell timestamp in this table (microseconds; ids without a row
        left out): what a reprocess compares with its own version to skip the ids an edit
        wrote after the run began."""
        stamps: dict[bytes, int] = {}
        for _ in self._read_batches(idlib.as_uint64(l2ids), [FEATURE_FAMILY], None, stamps):
            pass
        return {int(k): v for k, v in stamps.items()}

    @property
    def reader(self) -> RowReader:
        """The table's reader, made on first read (a store that only writes, as a
        worker's does, never needs one)."""
        if self._reader is None:
            self._reader = RowReader(self.table.name)
        return self._reader

    def read_raw(
        self, l2ids: np.ndarray | Iterable[int], with_fallback: bool = False
    ) -> dict[int, RowCells]:
        """Newest cell bytes per family and column, for byte-level checks and tools;
        ``with_fallback``: the fallback table's row for ids this table has none for, as
        the lookup serves them."""
        ids = idlib.as_uint64(l2ids)
        rows: dict[bytes, RowCells] = {}
        for part in self._read_batches(ids, None, None):
            rows.update(part)
        if with_fallback:
            rows.update(self._read_fallback(np.unique(ids), rows, None))
        return {int(k): v for k, v in rows.items()}

    def read_features(
        self,
        l2ids: np.ndarray | Iterable[int],
        attribute_names: Sequence[str] | None = None,
        int64_as_str: bool = False,
        timings: dict[str, float] | None = None,
        stamps: dict[int, int] | None = None,
        heal: list[int] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Features of the layer-2 ids that have rows, as the existing service serves them.

        A row is present when it has any of the requested attribute cells (the existing
        service's read with a column filter); absent ids are left out of the result. The
        values are what PCGL2Cache's frontend returns, JSON-ready (see :mod:`.rowformat`).
        Raises ``KeyError`` for an unknown attribute name (the lookup turns that into a
        400 before reading). ``timings`` receives the seconds spent in ``read`` and
        ``decode``; ``stamps``, when given, each read row's newest cell timestamp
        (microseconds), from which the lookup makes its ``ETag``; ``heal``, when given,
        the ids served from the fallback table whose row is only the existing worker's
        placeholder (it could not compute them; the children path can, so the lookup
        queues them into this table while still serving the placeholder).
        """
        names = list(attribute_names) if attribute_names else list(ATTRIBUTE_NAMES)
        for name in names:
            if name not in BY_NAME:
                raise KeyError(name)
        ids = np.unique(idlib.as_uint64(l2ids))
        ids = ids[idlib.get_layer(ids) == 2]
        if ids.size == 0:
            return {}
        # Whole rows (newest cells only), no family/qualifier filters: a row is ~100
        # bytes, and regex filters made the emulator 4-7x slower (0.25 s -> 1.7 s for
        # 10,000 rows); the decoder picks the requested columns.
        t0 = time.perf_counter()
        rows: dict[bytes, RowCells] = {}
        raw_stamps: dict[bytes, int] | None = {} if stamps is not None else None
        for part in self._read_batches(ids, None, None, raw_stamps):
            rows.update(part)
        fallback = self._read_fallback(ids, rows, raw_stamps)
        if stamps is not None and raw_stamps:
            stamps.update(zip(map(int, raw_stamps), raw_stamps.values(), strict=True))
        t1 = time.perf_counter()
        decoded = decode_rows(rows, names, self._own_format, int64_as_str)
        if fallback:  # the ids this table lacks, as the fallback table's service serves them
            decoded.update(decode_rows(fallback, names, self.dataset, int64_as_str))
            if heal is not None:
                heal.extend(int(k) for k, row in fallback.items() if is_placeholder_row(row))
            decoded = dict(sorted(decoded.items()))
        if timings is not None:
            timings["read"] = t1 - t0
            timings["decode"] = time.perf_counter() - t1
        return decoded

    @property
    def fallback(self) -> CacheStore | None:
        """The dataset's fallback table (read only), or None without one."""
        if self._fallback is None and self.dataset.fallback_table_id:
            table = self.table._instance.table(self.dataset.fallback_table_id)
            self._fallback = CacheStore(table, self.dataset)
        return self._fallback

    def _read_fallback(
        self, ids: np.ndarray, rows: dict[bytes, RowCells], stamps: dict[bytes, int] | None
    ) -> dict[bytes, RowCells]:
        """Rows of the fallback table for the ``ids`` this table has no row for."""
        if self.fallback is None:
            return {}
        keys = idlib.row_keys(ids)
        absent = ids[np.fromiter((k not in rows for k in keys), bool, len(keys))]
        out: dict[bytes, RowCells] = {}
        if absent.size:
            for part in self.fallback._read_batches(absent, None, None, stamps):
                out.update(part)
        return out

    def _read_batches(
        self,
        ids: np.ndarray,
        families: list[str] | None,
        qualifiers: dict[str, list[bytes]] | None,
        stamps: dict[bytes, int] | None = None,
    ) -> Iterator[dict[bytes, RowCells]]:
        """Read ``ids`` in concurrent batches; yields each batch's rows (and fills
        ``stamps`` with each row's newest cell timestamp when given)."""
        keys = idlib.row_keys(ids)
        batches = [keys[i : i + READ_BATCH] for i in range(0, len(keys), READ_BATCH)]

        def read(batch: list[bytes]) -> dict[bytes, RowCells]:
            if stamps is None:
                return self.reader.read(batch, families, qualifiers)
            mine: dict[bytes, int] = {}  # one dict per batch: threads never share one
            rows = self.reader.read(batch, families, qualifiers, stamps=mine)
            stamps.update(mine)
            return rows

        if len(batches) <= 1:
            yield from (read(b) for b in batches)
            return
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(batches))) as pool:
            yield from pool.map(read, batches)
