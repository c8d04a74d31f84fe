"""Where a cache table keeps lineage: one row per written chunk, beside the feature rows.

Why not in the feature rows: the existing service's frontend (PCGL2Cache) reads a row
with kvdbclient, which turns every cell it gets into an attribute with
``attributes.from_key(family, qualifier)``; a lookup without ``attribute_names`` (what
caveclient sends by default) reads whole rows, all families, so a ``lineage:code`` cell
in a feature row fails the request with ``KeyError: Unknown key lineage:code`` (a 500).
A feature row therefore holds family ``0`` only, exactly what the existing service's
writer writes, and a table l2cache wrote can be served by that frontend again.

The lineage of a write is one row per chunk it wrote, keyed
``lineage#<chunk id %020d>#<cell timestamp, microseconds %016d>#<run id>``, family
``lineage``, every cell at the write's cell timestamp:

- ``run``, ``params``, ``code``, ``input``: :meth:`l2cache.domain.lineage.Lineage.columns`;
- ``ids``: the layer-2 ids the write gave a version at that timestamp (sorted, delta
  coded uint64, zlib), so every stored value names its lineage exactly: the value of
  id ``n`` at timestamp ``t`` comes from the lineage row of ``n``'s chunk at ``t`` whose
  ``ids`` hold ``n``.

The key starts with ``l``, after every digit, so no ``%020d`` node-id key or id range
(kvdbclient's ``read_nodes`` by ids or ``start_id``/``end_id``) ever reaches a lineage
row; a chunk's lineage rows are one key range, as its feature rows are.

The lineage row is written before the feature rows it describes (so no feature version
exists without provenance) and a rollback deletes it after the feature versions it
names. Rows l2cache wrote before this layout carry the same columns in their own
``lineage`` family; every reader here reads both (:func:`run_versions`,
:func:`lineage_of`), so older tables stay readable and rollbackable unchanged.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from l2cache.domain import ids as idlib
from l2cache.domain.attributes import FEATURE_FAMILY, LINEAGE_FAMILY, LINEAGE_RUN_COLUMN
from l2cache.domain.ids import SpatialBits
from l2cache.gcp.bigtable import CellFilter, KeyRange, RowReader
from l2cache.gcp.bigtable_write import Row, write_rows

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.table import Table

PREFIX = b"lineage#"
IDS_COLUMN = b"ids"
LINEAGE_COLUMNS = [b"run", b"params", b"code", b"input"]  # also a feature row's, before
ROW_COLUMNS = [*LINEAGE_COLUMNS, IDS_COLUMN]
MS = 1000
ALL_LINEAGE_ROWS: KeyRange = (PREFIX, PREFIX[:-1] + b"$")  # '$' follows '#'
# every l2cache write has a size_nm3 cell: whether a version still exists is read there
_SIZE_COLUMN_KEY = b"size_nm3"
_SIZE_COLUMN = {FEATURE_FAMILY: [_SIZE_COLUMN_KEY]}


def row_key(chunk_id: int, micros: int, run_id: str) -> bytes:
    """The lineage row of one chunk's write at ``micros`` by ``run_id``."""
    return b"%s%020d#%016d#%s" % (PREFIX, chunk_id, micros, run_id.encode())


def parse_key(key: bytes) -> tuple[int, int, str]:
    """(chunk id, cell timestamp micros, run id) of a lineage row key."""
    chunk, micros, run = key[len(PREFIX) :].split(b"#", 2)
    return int(chunk), int(micros), run.decode()


def is_lineage_key(key: bytes) -> bool:
    """Whether ``key`` is a lineage row's (never a feature row's ``%020d``)."""
    return key.startswith(PREFIX)


def encode_ids(l2ids: np.ndarray) -> bytes:
    """Sorted ids as zlib'd uint64 deltas: ids of one chunk differ in the low bits only,
    so the deltas are small and compress to a few bits each."""
    ids = np.unique(np.asarray(l2ids, dtype=np.uint64))
    deltas = np.diff(ids, prepend=np.uint64(0)).astype("<u8")
    return zlib.compress(deltas.tobytes(), 6)


MAX_IDS_BYTES = 64 << 20  # a chunk holds far fewer ids; a bigger cell is not ours


def decode_ids(value: bytes) -> np.ndarray:
    """The ids of :func:`encode_ids` (bounded decompression)."""
    inflater = zlib.decompressobj()
    raw = inflater.decompress(value, MAX_IDS_BYTES)
    if inflater.unconsumed_tail or len(raw) % 8:
        raise ValueError("lineage ids cell is not an id list")
    return np.cumsum(np.frombuffer(raw, dtype="<u8"), dtype=np.uint64)


def lineage_rows(
    l2ids: np.ndarray, columns: dict[bytes, bytes], run_id: str, micros: int, bits: SpatialBits
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """(key, cells) of the lineage rows of one write: one per chunk of ``l2ids``."""
    ids = np.asarray(l2ids, dtype=np.uint64)
    chunks = idlib.get_chunk_id(ids, bits)
    out = []
    for cid in np.unique(chunks).tolist():
        cells = dict(columns)
        cells[IDS_COLUMN] = encode_ids(ids[chunks == cid])
        out.append((row_key(int(cid), micros, run_id), cells))
    return out


def key_ranges_for(feature_ranges: Sequence[KeyRange]) -> list[KeyRange]:
    """The lineage rows of the chunks whose feature rows are ``feature_ranges`` (chunk
    key ranges: ``[%020d first chunk id, %020d id after the last chunk)``)."""
    return [(PREFIX + lo + b"#", PREFIX + hi + b"#") for lo, hi in feature_ranges]


@dataclass
class Versions:
    """Versions selected by lineage, from both layouts.

    ``rows``: feature row key -> {run id: timestamps (micros)};
    ``lineage``: lineage row key -> its timestamp (micros), to delete after the features.
    """

    rows: dict[bytes, dict[str, set[int]]]
    lineage: dict[bytes, int]
    scanned: int = 0  # rows the reads returned (feature rows of the old layout + lineage rows)

    def add(self, key: bytes, run_id: str, micros: int) -> None:
        """One (row, run, timestamp) version."""
        self.rows.setdefault(key, {}).setdefault(run_id, set()).add(micros)


def run_versions(
    reader: RowReader,
    run_ids: Iterable[str],
    feature_ranges: Sequence[KeyRange] | None,
    start_micros: int | None = None,
    end_micros: int | None = None,
    stamps: set[int] | None = None,
) -> Versions:
    """Every version named by one of ``run_ids`` in ``feature_ranges`` (chunk key ranges;
    ``None``: the whole table), within ``[start_micros, end_micros)`` and, when given, at
    one of ``stamps``: lineage rows (expanded by their ``ids``, kept where the feature
    row still has a version at that time: one keys-and-timestamps read of the named
    rows) and, for rows written before lineage rows, the rows' own ``lineage:run``
    cells."""
    runs = sorted(set(run_ids))
    found = Versions({}, {})
    if not runs or (feature_ranges is not None and not feature_ranges):
        return found
    window = {"start_micros": start_micros, "end_micros": end_micros}
    values = [r.encode() for r in runs]
    # the old layout: lineage:run cells in the feature rows (a lineage row has no
    # feature-range key, and the range read below never returns feature rows)
    old = CellFilter(columns={LINEAGE_FAMILY: [LINEAGE_RUN_COLUMN]}, values=values, **window)
    if feature_ranges is None:
        old_rows = reader.versions(cells=old)
    else:
        old_rows = reader.versions(ranges=feature_ranges, cells=old)
    for key, families in old_rows.items():
        if is_lineage_key(key):
            continue
        found.scanned += 1
        for micros, value in families.get(LINEAGE_FAMILY, {}).get(LINEAGE_RUN_COLUMN, []):
            if stamps is None or micros in stamps:
                found.add(key, value.decode(), micros)
    ranges = [ALL_LINEAGE_ROWS] if feature_ranges is None else key_ranges_for(feature_ranges)
    cells = CellFilter(
        columns={LINEAGE_FAMILY: [LINEAGE_RUN_COLUMN, IDS_COLUMN]}, per_column=1, **window
    )
    named: dict[bytes, list[tuple[str, int]]] = {}  # feature row -> (run, micros) named
    for key, families in reader.versions(ranges=ranges, cells=cells).items():
        _, micros, run_id = parse_key(key)
        cols = families.get(LINEAGE_FAMILY, {})
        if run_id not in runs or (stamps is not None and micros not in stamps):
            continue
        if not cols.get(IDS_COLUMN):
            continue
        found.scanned += 1
        found.lineage[key] = micros
        for node in decode_ids(cols[IDS_COLUMN][0][1]).tolist():
            named.setdefault(b"%020d" % node, []).append((run_id, micros))
    if named:  # only the versions that still exist (GC keeps a column's last N)
        present = reader.versions(
            keys=sorted(named),
            cells=CellFilter(columns=_SIZE_COLUMN, strip_values=True, **window),
        )
        for key, pairs in named.items():
            have = present.get(key, {}).get(FEATURE_FAMILY, {}).get(_SIZE_COLUMN_KEY, [])
            existing = {s for s, _ in have}
            for run_id, micros in pairs:
                if micros in existing:
                    found.add(key, run_id, micros)
    return found


def delete_lineage_rows(rows: dict[bytes, int]) -> list[Row]:
    """Mutations deleting the lineage rows' cells at their timestamps (written after the
    feature versions they name are deleted)."""
    out = []
    for key, micros in rows.items():
        row = Row(key)
        row.delete_cells(LINEAGE_FAMILY, ROW_COLUMNS, micros, micros + MS)
        out.append(row)
    return out


def lineage_of(
    reader: RowReader, l2ids: Iterable[int], bits: SpatialBits, stamps: dict[int, int] | None = None
) -> dict[int, dict[bytes, bytes]]:
    """``{l2 id: {b"run", b"params", b"code", b"input": value}}`` of each id's newest
    feature version (or of the version at ``stamps[id]`` micros), from its chunk's
    lineage row, else from the row's own ``lineage`` family (older rows). Ids without a
    row, or whose version has no lineage (a row the existing service wrote), are left
    out. One read of the ids' feature rows and one of their chunks' lineage rows."""
    ids = np.unique(np.asarray(list(l2ids), dtype=np.uint64))
    if ids.size == 0:
        return {}
    keys = idlib.row_keys(ids)
    newest = reader.versions(keys=keys, cells=CellFilter(per_column=1))
    wanted: dict[int, int] = {}
    out: dict[int, dict[bytes, bytes]] = {}
    for key, families in newest.items():
        node = int(key)
        micros = stamps.get(node) if stamps else None
        if micros is None:
            micros = max(s for cols in families.values() for v in cols.values() for s, _ in v)
        own = {
            col: value
            for col, versions in families.get(LINEAGE_FAMILY, {}).items()
            for s, value in versions
            if s == micros
        }
        if own:
            out[node] = own
        wanted[node] = micros
    todo = [n for n in wanted if n not in out]
    if not todo:
        return out
    chunks = idlib.get_chunk_id(np.asarray(todo, dtype=np.uint64), bits).tolist()
    prefixes = sorted({b"%s%020d#" % (PREFIX, c) for c in chunks})
    rows = reader.versions(
        ranges=[(p, p[:-1] + b"$") for p in prefixes], cells=CellFilter(per_column=1)
    )
    by_chunk_stamp: dict[tuple[int, int], list[tuple[set[int], dict[bytes, bytes]]]] = {}
    for key, families in rows.items():
        cid, micros, _ = parse_key(key)
        cols = {c: v[0][1] for c, v in families.get(LINEAGE_FAMILY, {}).items()}
        written = set(decode_ids(cols.pop(IDS_COLUMN, b"")).tolist())
        by_chunk_stamp.setdefault((cid, micros), []).append((written, cols))
    for node, cid in zip(todo, chunks, strict=True):
        for written, cols in by_chunk_stamp.get((cid, wanted[node]), []):
            if node in written:
                out[node] = cols
                break
    return out


@dataclass
class Migration:
    """What :func:`migrate_rows` found and moved."""

    rows: int = 0  # feature rows that carried lineage cells
    versions: int = 0  # (row, timestamp) versions whose lineage moved
    lineage_rows: int = 0  # lineage rows written


def migrate_rows(
    table: Table | str,
    bits: SpatialBits,
    feature_ranges: Sequence[KeyRange] | None = None,
    dry_run: bool = False,
) -> Migration:
    """Move the lineage cells of rows written before lineage rows into lineage rows, so
    the existing service's frontend and kvdbclient can read those rows too.

    Reads the feature rows in ``feature_ranges`` (``None``: the whole table) that still
    hold ``lineage`` cells, writes one lineage row per (chunk, timestamp, run) naming
    exactly those rows, and only then deletes the rows' lineage cells: at every moment
    each version has its lineage in one layout or the other. Idempotent (a repeat finds
    nothing left); the feature cells are never touched.
    """
    reader = RowReader(table)
    cells = CellFilter(columns={LINEAGE_FAMILY: None})
    if feature_ranges is None:
        found = reader.versions(cells=cells)
    else:
        found = reader.versions(ranges=feature_ranges, cells=cells)
    groups: dict[tuple[int, int, str], tuple[dict[bytes, bytes], list[int]]] = {}
    done = Migration()
    touched: dict[bytes, list[int]] = {}  # row key -> the versions whose lineage moves
    for key, families in found.items():
        if is_lineage_key(key):
            continue
        columns = families.get(LINEAGE_FAMILY, {})
        by_stamp: dict[int, dict[bytes, bytes]] = {}
        for col, versions in columns.items():
            for micros, value in versions:
                by_stamp.setdefault(micros, {})[col] = value
        node = int(key)
        cid = int(idlib.get_chunk_id(np.array([node], dtype=np.uint64), bits)[0])
        for micros, cols in by_stamp.items():
            run_id = cols.get(LINEAGE_RUN_COLUMN, b"").decode()
            if not run_id:
                continue
            entry = groups.setdefault((cid, micros, run_id), (cols, []))
            entry[1].append(node)
            done.versions += 1
        touched[key] = sorted(by_stamp)
    done.rows = len(touched)
    done.lineage_rows = len(groups)
    if dry_run or not touched:
        return done
    writes = []
    for (cid, micros, run_id), (cols, nodes) in groups.items():
        at = datetime.fromtimestamp(micros / 1e6, UTC)
        row = Row(row_key(cid, micros, run_id))
        for col, value in cols.items():
            row.set_cell(LINEAGE_FAMILY, col, value, at)
        row.set_cell(LINEAGE_FAMILY, IDS_COLUMN, encode_ids(np.asarray(nodes)), at)
        writes.append(row)
    write_rows(table, writes, "lineage")
    deletes = []
    for key, stamps in touched.items():
        row = Row(key)
        for micros in stamps:
            row.delete_cells(LINEAGE_FAMILY, LINEAGE_COLUMNS, micros, micros + MS)
        deletes.append(row)
    write_rows(table, deletes, "lineage")
    return done


PRUNE_PAGE = 500  # lineage rows per read: bounded memory whatever the table's size


@dataclass
class Prune:
    """What :func:`prune_rows` read and deleted."""

    scanned: int = 0  # lineage rows read
    deleted: int = 0  # lineage rows naming no version that still exists


def prune_rows(table: Table | str, dry_run: bool = False, page: int = PRUNE_PAGE) -> Prune:
    """Delete the lineage rows whose versions are all gone.

    A feature column keeps its last N versions (the table's GC); a lineage row is a row
    of its own, which no GC rule ties to them, so a chunk edited for years would keep a
    lineage row per edit after its versions were collected. A lineage row is kept while
    any id it names still has a ``size_nm3`` version (every l2cache write has one) at its
    timestamp; otherwise nothing can be served or rolled back by it any more. Pages of
    ``page`` lineage rows, one keys-and-timestamps read of their ids' ``size_nm3``
    versions per page; safe to run at any time (a version written later has a lineage
    row of its own).
    """
    reader = RowReader(table)
    done = Prune()
    start = ALL_LINEAGE_ROWS[0]
    size_col = _SIZE_COLUMN
    while True:
        cells = CellFilter(columns={LINEAGE_FAMILY: [IDS_COLUMN]}, per_column=1)
        rows = reader.versions(ranges=[(start, ALL_LINEAGE_ROWS[1])], cells=cells, limit=page)
        if not rows:
            break
        named: dict[bytes, tuple[int, list[bytes]]] = {}
        for key, families in rows.items():
            _, micros, _ = parse_key(key)
            value = families.get(LINEAGE_FAMILY, {}).get(IDS_COLUMN, [(0, b"")])[0][1]
            named[key] = (micros, [b"%020d" % n for n in decode_ids(value).tolist()])
        keys = sorted({k for _, ks in named.values() for k in ks})
        alive = reader.versions(keys=keys, cells=CellFilter(columns=size_col, strip_values=True))
        stale = {}
        for key, (micros, ks) in named.items():
            stamps = (
                {s for s, _ in alive.get(k, {}).get(FEATURE_FAMILY, {}).get(_SIZE_COLUMN_KEY, [])}
                for k in ks
            )
            if not any(micros in s for s in stamps):
                stale[key] = micros
        done.scanned += len(rows)
        done.deleted += len(stale)
        if stale and not dry_run:
            write_rows(table, delete_lineage_rows(stale), "lineage")
        if len(rows) < page:
            break
        start = max(rows) + b"\x00"
    return done
