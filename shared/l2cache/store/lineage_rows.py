"""Where a cache table keeps lineage: one row per written chunk, beside the feature rows.

Why not in the feature rows: the existing service's frontend (PCGL2Cache) reads a row
with kvdbclient, which turns every cell it gets into an attribute with
``attributes.from_key(family, qualifier)``; a lookup without ``attribute_names`` (what
caveclient sends by default) reads whole rows, all families, so a ``lineage:code`` cell
in a feature row fails the request with ``KeyError: Unknown key lineage:code`` (a 500).
A feature row therefore holds family ``0`` only, exactly what the existing service's
writer writes, and a table l2cache wrote can be served by that frontend again.

The lineage of a write is one row per chunk it wrote, keyed
``lineage#<chunk id %020d>#<cell timestamp, microseconds %016d>#<digest>#<run id>``
(``digest``: 16 hex digits of a hash of the ids written, :func:`ids_digest`), family
``lineage``, every cell at the write's cell timestamp:

- ``run``, ``params``, ``code``, ``input``: :meth:`l2cache.domain.lineage.Lineage.columns`;
- ``ids``: the layer-2 ids the write gave a version at that timestamp (sorted, delta
  coded uint64, zlib); every reader matches versions by these ids, never by the key;
- ``written``: the wall clock (micros) of the latest write of the row, what
  :func:`prune_rows`' grace period is measured from.

Why the digest: missing-id messages of a dataset share one stream run and write at the
message's publish time (whole milliseconds), so two writes of one run in one chunk can
share (chunk, timestamp, run); the digest keeps them two rows (a retry of the same
write names the same ids: the same key, idempotent).

What the rows cannot tell: Bigtable keeps one value per (cell, timestamp). When two
writes store the same cell in the same millisecond (two runs, or one run's two writes
of overlapping ids), one value survives and both lineage rows name the id; which value
survived is not recorded. Readers report every candidate (:func:`lineage_candidates`,
``lineage_of``'s ``candidates``), and a rollback of either run deletes the version and
counts it as a collision (:attr:`Versions.collisions`), so the other run's value is
never removed silently.

Order and what it guarantees: a write stores its lineage rows, then its feature rows,
so a crash between them leaves a lineage row naming versions that do not exist (never a
stored version that had no lineage row when stored). Afterwards a version can still
lose its lineage row only by a ``lineage prune`` that takes a row whose versions it
sees as gone (hence prune's grace period on ``written``) or a rollback of a colliding
run (counted, above).

kvdbclient readers (the existing service's frontend): reads by id (``read_nodes(
node_ids=...)``, what the frontend does) and bounded id ranges (``start_id`` *and*
``end_id``) never reach a lineage row, whose key starts with ``l`` and sorts after
every ``%020d`` key. An open-ended read does: ``read_nodes(start_id=X)`` without
``end_id``, or a whole-table read, returns the ``lineage#`` rows (and the
``lineage!migrated`` mark) too and fails in kvdbclient's ``deserialize_uint64`` on their
keys. A chunk's lineage rows are one key range, as its feature rows are.

Rows l2cache wrote before this layout carry ``run``/``params``/``code``/``input`` in
their own ``lineage`` family; every reader here reads both (:func:`run_versions`,
:func:`lineage_candidates`) until the table is marked migrated (:func:`migrate_rows`
marks it after a complete whole-table pass; then the old-layout scan is skipped).
"""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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
WRITTEN_COLUMN = b"written"  # wall-clock micros of the (latest) write: prune's grace
LINEAGE_COLUMNS = [b"run", b"params", b"code", b"input"]  # also a feature row's, before
ROW_COLUMNS = [*LINEAGE_COLUMNS, IDS_COLUMN, WRITTEN_COLUMN]
MS = 1000
ALL_LINEAGE_ROWS: KeyRange = (PREFIX, PREFIX[:-1] + b"$")  # '$' follows '#'
# '!' sorts before '#': outside ALL_LINEAGE_ROWS, after every digit (no id range reaches it)
MIGRATED_KEY = b"lineage!migrated"
MIGRATED_COLUMN = b"migrated"
# the feature rows of a whole table: every key but the lineage rows and the marker
FEATURE_KEYS: list[KeyRange] = [(b"", b"lineage!"), (ALL_LINEAGE_ROWS[1], b"")]
DIGEST_HEX = 16  # 8 bytes of blake2b over the written ids
# every l2cache write has a size_nm3 cell: whether a version still exists is read there
_SIZE_COLUMN_KEY = b"size_nm3"
_SIZE_COLUMN = {FEATURE_FAMILY: [_SIZE_COLUMN_KEY]}


def ids_digest(l2ids: np.ndarray) -> bytes:
    """The key segment that keeps writes apart: 16 hex digits of a digest of the sorted
    unique ids written. Two writes of different ids at one (chunk, millisecond, run) get
    different keys; a retry of the same write gets the same key (idempotent)."""
    ids = np.unique(np.asarray(l2ids, dtype=np.uint64)).astype("<u8")
    return hashlib.blake2b(ids.tobytes(), digest_size=DIGEST_HEX // 2).hexdigest().encode()


def row_key(chunk_id: int, micros: int, run_id: str, digest: bytes) -> bytes:
    """The lineage row of one chunk's write at ``micros`` by ``run_id`` of the ids whose
    :func:`ids_digest` is ``digest``."""
    return b"%s%020d#%016d#%s#%s" % (PREFIX, chunk_id, micros, digest, run_id.encode())


def stamp_prefix(chunk_id: int, micros: int) -> bytes:
    """The key prefix of every lineage row of one chunk at one cell timestamp (all
    runs, all writes): what a reader of one version reads."""
    return b"%s%020d#%016d#" % (PREFIX, chunk_id, micros)


def parse_key(key: bytes) -> tuple[int, int, str]:
    """(chunk id, cell timestamp micros, run id) of a lineage row key."""
    chunk, micros, _digest, run = key[len(PREFIX) :].split(b"#", 3)
    return int(chunk), int(micros), run.decode()


def runs_key_regex(run_ids: Iterable[str]) -> bytes:
    """RE2 matching exactly the lineage row keys of ``run_ids`` (the run is the key's
    last segment): a rollback's server-side run filter."""
    runs = b"|".join(re.escape(r.encode()) for r in sorted(set(run_ids)))
    return b"^lineage#[0-9]{20}#[0-9]{16}#[0-9a-f]{%d}#(?:%s)$" % (DIGEST_HEX, runs)


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


def now_micros() -> int:
    """Wall-clock microseconds: a lineage row's ``written`` value."""
    return time.time_ns() // 1000


def lineage_rows(
    l2ids: np.ndarray,
    columns: dict[bytes, bytes],
    run_id: str,
    micros: int,
    bits: SpatialBits,
    written_micros: int | None = None,
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """(key, cells) of the lineage rows of one write: one per chunk of ``l2ids``, keyed
    by the ids it names (:func:`ids_digest`), with the wall-clock time of the write
    (``written``, what :func:`prune_rows`' grace period is measured from)."""
    ids = np.asarray(l2ids, dtype=np.uint64)
    chunks = idlib.get_chunk_id(ids, bits)
    written = b"%d" % (now_micros() if written_micros is None else written_micros)
    out = []
    for cid in np.unique(chunks).tolist():
        mine = ids[chunks == cid]
        cells = dict(columns)
        cells[IDS_COLUMN] = encode_ids(mine)
        cells[WRITTEN_COLUMN] = written
        out.append((row_key(int(cid), micros, run_id, ids_digest(mine)), cells))
    return out


def key_ranges_for(feature_ranges: Sequence[KeyRange]) -> list[KeyRange]:
    """The lineage rows of the chunks whose feature rows are ``feature_ranges`` (chunk
    key ranges: ``[%020d first chunk id, %020d id after the last chunk)``)."""
    return [(PREFIX + lo + b"#", PREFIX + hi + b"#") for lo, hi in feature_ranges]


def is_migrated(reader: RowReader) -> bool:
    """Whether the table is marked as holding no old-layout lineage cells (made by
    l2cache with lineage rows, or migrated completely): readers skip the old layout."""
    return bool(reader.rows(keys=[MIGRATED_KEY]))


def mark_migrated(table: Table | str) -> None:
    """Mark the table as holding no ``lineage`` cells in feature rows (a new table, or
    a whole-table :func:`migrate_rows` that found none left)."""
    row = Row(MIGRATED_KEY)
    row.set_cell(LINEAGE_FAMILY, MIGRATED_COLUMN, b"%d" % now_micros(), datetime.now(UTC))
    write_rows(table, [row], "lineage")


@dataclass
class Versions:
    """Versions selected by lineage, from both layouts.

    ``rows``: feature row key -> {run id: timestamps (micros)};
    ``lineage``: lineage row key -> its timestamp (micros), to delete after the features;
    ``collisions``: (feature row key, micros) of a selected version that a lineage row of
    another run names too (both wrote that cell in the same millisecond; Bigtable kept
    one value, not recorded which) -> those other runs.
    """

    rows: dict[bytes, dict[str, set[int]]]
    lineage: dict[bytes, int]
    scanned: int = 0  # rows the reads returned (feature rows of the old layout + lineage rows)
    collisions: dict[tuple[bytes, int], set[str]] = field(default_factory=dict)
    lineage_rows_read: int = 0  # lineage rows the run-filtered read returned
    old_layout_read: bool = False  # whether feature rows were read for ``lineage:run``

    def add(self, key: bytes, run_id: str, micros: int) -> None:
        """One (row, run, timestamp) version."""
        self.rows.setdefault(key, {}).setdefault(run_id, set()).add(micros)


def _named(families: dict, key: bytes) -> tuple[int, int, str, list[int]] | None:
    """(chunk, micros, run, ids) of one lineage row read with its ``ids`` cell."""
    value = families.get(LINEAGE_FAMILY, {}).get(IDS_COLUMN)
    if not value:
        return None
    cid, micros, run_id = parse_key(key)
    return cid, micros, run_id, decode_ids(value[0][1]).tolist()


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
    one of ``stamps``.

    The run's lineage rows only (a server-side row-key filter on the run segment),
    expanded by the ids each names, kept where the feature row still has a version at
    that time (one keys-and-timestamps read of the named rows); then the lineage rows of
    other runs at the same (chunk, timestamp), whose ids give :attr:`Versions.collisions`.
    For rows written before lineage rows, the rows' own ``lineage:run`` cells: a scan of
    the feature ranges, skipped on a table marked migrated (:func:`is_migrated`).
    """
    runs = sorted(set(run_ids))
    found = Versions({}, {})
    if not runs or (feature_ranges is not None and not feature_ranges):
        return found
    window = {"start_micros": start_micros, "end_micros": end_micros}
    if not is_migrated(reader):
        found.old_layout_read = True
        values = [r.encode() for r in runs]
        old = CellFilter(columns={LINEAGE_FAMILY: [LINEAGE_RUN_COLUMN]}, values=values, **window)
        ranges = FEATURE_KEYS if feature_ranges is None else feature_ranges
        for key, families in reader.versions(ranges=ranges, cells=old).items():
            if not key.isdigit():
                continue
            found.scanned += 1
            for micros, value in families.get(LINEAGE_FAMILY, {}).get(LINEAGE_RUN_COLUMN, []):
                if stamps is None or micros in stamps:
                    found.add(key, value.decode(), micros)
    ranges = [ALL_LINEAGE_ROWS] if feature_ranges is None else key_ranges_for(feature_ranges)
    named: dict[bytes, list[tuple[str, int]]] = {}  # feature row -> (run, micros) named
    for key, families in _run_lineage_rows(reader, runs, ranges, window):
        found.lineage_rows_read += 1
        got = _named(families, key)
        if got is None or (stamps is not None and got[1] not in stamps):
            continue
        _, micros, run_id, nodes = got
        found.scanned += 1
        found.lineage[key] = micros
        for node in nodes:
            named.setdefault(b"%020d" % node, []).append((run_id, micros))
    if not named:
        return found
    present = reader.versions(  # only the versions that still exist (GC keeps the last N)
        keys=sorted(named), cells=CellFilter(columns=_SIZE_COLUMN, strip_values=True, **window)
    )
    for key, pairs in named.items():
        have = present.get(key, {}).get(FEATURE_FAMILY, {}).get(_SIZE_COLUMN_KEY, [])
        existing = {s for s, _ in have}
        for run_id, micros in pairs:
            if micros in existing:
                found.add(key, run_id, micros)
    _find_collisions(reader, found, runs)
    return found


RUNS_PER_READ = 100  # runs per key regex: Bigtable bounds a row filter (~20 KiB)


def _run_lineage_rows(
    reader: RowReader, runs: list[str], ranges: list[KeyRange], window: dict
) -> Iterable[tuple[bytes, dict]]:
    """The lineage rows of ``runs`` in ``ranges`` with their ``ids`` cell: one read per
    :data:`RUNS_PER_READ` runs, so the server-side key regex stays a few KiB whatever
    the number of runs (a release rollback names one run per ingest)."""
    for start in range(0, len(runs), RUNS_PER_READ):
        cells = CellFilter(
            key_regex=runs_key_regex(runs[start : start + RUNS_PER_READ]),
            columns={LINEAGE_FAMILY: [IDS_COLUMN]},
            per_column=1,
            **window,
        )
        yield from reader.versions(ranges=ranges, cells=cells).items()


def _find_collisions(reader: RowReader, found: Versions, runs: list[str]) -> None:
    """Fill ``found.collisions``: the selected versions another run's lineage row names
    too (one read of the lineage rows at the selected rows' (chunk, timestamp))."""
    prefixes = set()
    for key in found.lineage:
        cid, micros, _ = parse_key(key)
        prefixes.add(stamp_prefix(cid, micros))
    ranges = [(p, p[:-1] + b"$") for p in sorted(prefixes)]
    cells = CellFilter(columns={LINEAGE_FAMILY: [IDS_COLUMN]}, per_column=1)
    for key, families in reader.versions(ranges=ranges, cells=cells).items():
        got = _named(families, key)
        if got is None or got[2] in runs:
            continue
        _, micros, other, nodes = got
        for node in nodes:
            fkey = b"%020d" % node
            if micros in set().union(*found.rows.get(fkey, {}).values()):
                found.collisions.setdefault((fkey, micros), set()).add(other)


def delete_lineage_rows(rows: dict[bytes, int]) -> list[Row]:
    """Mutations deleting the lineage rows' cells at their timestamps (written after the
    feature versions they name are deleted)."""
    out = []
    for key, micros in rows.items():
        row = Row(key)
        row.delete_cells(LINEAGE_FAMILY, ROW_COLUMNS, micros, micros + MS)
        out.append(row)
    return out


CANDIDATES_COLUMN = b"candidates"


def lineage_candidates(
    reader: RowReader, l2ids: Iterable[int], bits: SpatialBits, stamps: dict[int, int] | None = None
) -> dict[int, list[dict[bytes, bytes]]]:
    """``{l2 id: [{b"run", b"params", b"code", b"input": value}, ...]}``: every lineage
    naming each id's newest feature version (or the version at ``stamps[id]`` micros).

    One entry, except where several writes stored that cell in the same millisecond
    (two runs, or one run's two writes of overlapping ids with different inputs):
    Bigtable keeps one value per (cell, timestamp) and does not record whose, so each
    such write is a candidate (sorted by run, then input). Old-layout rows answer their
    own ``lineage`` cells (one value survived there too). Ids without a row, or whose
    version has no lineage (a row the existing service wrote), are left out. One read
    of the ids' feature rows and one of the lineage rows at their (chunk, timestamp).
    """
    ids = np.unique(np.asarray(list(l2ids), dtype=np.uint64))
    if ids.size == 0:
        return {}
    newest = reader.versions(keys=idlib.row_keys(ids), cells=CellFilter(per_column=1))
    wanted: dict[int, int] = {}
    out: dict[int, list[dict[bytes, bytes]]] = {}
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
            out[node] = [own]
        else:
            wanted[node] = micros
    if not wanted:
        return out
    todo = list(wanted)
    chunks = idlib.get_chunk_id(np.asarray(todo, dtype=np.uint64), bits).tolist()
    prefixes = sorted({stamp_prefix(c, wanted[n]) for n, c in zip(todo, chunks, strict=True)})
    rows = reader.versions(
        ranges=[(p, p[:-1] + b"$") for p in prefixes],
        cells=CellFilter(columns={LINEAGE_FAMILY: [*LINEAGE_COLUMNS, IDS_COLUMN]}, per_column=1),
    )
    by_chunk_stamp: dict[tuple[int, int], list[tuple[set[int], dict[bytes, bytes]]]] = {}
    for key, families in rows.items():
        cid, micros, _ = parse_key(key)
        cols = {c: v[0][1] for c, v in families.get(LINEAGE_FAMILY, {}).items()}
        written = set(decode_ids(cols.pop(IDS_COLUMN, b"")).tolist())
        by_chunk_stamp.setdefault((cid, micros), []).append((written, cols))
    for node, cid in zip(todo, chunks, strict=True):
        cands = [c for ids_, c in by_chunk_stamp.get((cid, wanted[node]), []) if node in ids_]
        unique = {tuple(sorted(c.items())): c for c in cands}
        if unique:
            out[node] = [unique[k] for k in sorted(unique)]
    return out


def lineage_of(
    reader: RowReader, l2ids: Iterable[int], bits: SpatialBits, stamps: dict[int, int] | None = None
) -> dict[int, dict[bytes, bytes]]:
    """``{l2 id: {b"run", b"params", b"code", b"input": value}}`` of each id's newest
    version (or the version at ``stamps[id]``): :func:`lineage_candidates`' first, and
    where there are several (same-millisecond writes of one cell, one value kept, which
    not recorded) also ``b"candidates"``: every candidate's run id, space separated, so
    no caller mistakes the first for certain."""
    out = {}
    for node, cands in lineage_candidates(reader, l2ids, bits, stamps).items():
        cols = dict(cands[0])
        if len(cands) > 1:
            cols[CANDIDATES_COLUMN] = b" ".join(c.get(b"run", b"") for c in cands)
        out[node] = cols
    return out


@dataclass
class Migration:
    """What :func:`migrate_rows` found and moved."""

    rows: int = 0  # feature rows that carried lineage cells
    versions: int = 0  # (row, timestamp) versions whose lineage moved
    lineage_rows: int = 0  # lineage rows written
    pages: int = 0  # pages that held rows (each: one read, its writes, its deletes)
    marked: bool = False  # the table was marked migrated (a whole-table pass, none left)


MIGRATE_PAGE = 2000  # feature rows per read: bounded memory whatever the table's size


def migrate_rows(
    table: Table | str,
    bits: SpatialBits,
    feature_ranges: Sequence[KeyRange] | None = None,
    dry_run: bool = False,
    page: int = MIGRATE_PAGE,
) -> Migration:
    """Move the lineage cells of rows written before lineage rows into lineage rows, so
    the existing service's frontend and kvdbclient can read those rows too.

    Pages of ``page`` feature rows that still hold ``lineage`` cells, in key order over
    ``feature_ranges`` (``None``: the whole table): per page, one lineage row per
    (chunk, timestamp, run) naming exactly that page's rows, then the deletion of those
    rows' lineage cells, so at every moment each version has its lineage in one layout
    or the other and memory is one page. Resumable: a crash leaves the rows not yet
    cleaned holding their cells, and a re-run moves them again into a lineage row keyed
    by *their* ids (:func:`ids_digest`), beside the first one, never over it; the same
    version named twice by one run with the same columns reads as one lineage. The
    feature cells are never touched. A whole-table pass that completes marks the table
    migrated (:func:`mark_migrated`), so rollbacks stop scanning for old-layout cells.
    """
    reader = RowReader(table)
    cells = CellFilter(columns={LINEAGE_FAMILY: LINEAGE_COLUMNS})
    done = Migration()
    for lo, hi in FEATURE_KEYS if feature_ranges is None else feature_ranges:
        start = lo
        while True:
            found = reader.versions(ranges=[(start, hi)], cells=cells, limit=page)
            if not found:
                break
            done.pages += 1
            _migrate_page(table, bits, found, dry_run, done)
            if len(found) < page:
                break
            start = max(found) + b"\x00"
    if feature_ranges is None and not dry_run:
        mark_migrated(table)
        done.marked = True
    return done


def _migrate_page(
    table: Table | str, bits: SpatialBits, found: dict, dry_run: bool, done: Migration
) -> None:
    """One page of :func:`migrate_rows`: its lineage rows, then its deletes."""
    groups: dict[tuple[int, int, str], tuple[dict[bytes, bytes], list[int]]] = {}
    touched: dict[bytes, list[int]] = {}  # row key -> the versions whose lineage moves
    for key, families in found.items():
        if not key.isdigit():
            continue
        by_stamp: dict[int, dict[bytes, bytes]] = {}
        for col, versions in families.get(LINEAGE_FAMILY, {}).items():
            for micros, value in versions:
                by_stamp.setdefault(micros, {})[col] = value
        node = int(key)
        cid = int(idlib.get_chunk_id(np.array([node], dtype=np.uint64), bits)[0])
        for micros, cols in by_stamp.items():
            run_id = cols.get(LINEAGE_RUN_COLUMN, b"").decode()
            if not run_id:
                continue
            groups.setdefault((cid, micros, run_id), (cols, []))[1].append(node)
            done.versions += 1
        touched[key] = sorted(by_stamp)
    done.rows += len(touched)
    done.lineage_rows += len(groups)
    if dry_run or not touched:
        return
    writes = []
    written = b"%d" % now_micros()
    for (cid, micros, run_id), (cols, nodes) in groups.items():
        at = datetime.fromtimestamp(micros / 1e6, UTC)
        ids = np.asarray(nodes, dtype=np.uint64)
        row = Row(row_key(cid, micros, run_id, ids_digest(ids)))
        for col, value in cols.items():
            row.set_cell(LINEAGE_FAMILY, col, value, at)
        row.set_cell(LINEAGE_FAMILY, IDS_COLUMN, encode_ids(ids), at)
        row.set_cell(LINEAGE_FAMILY, WRITTEN_COLUMN, written, at)
        writes.append(row)
    write_rows(table, writes, "lineage")
    deletes = []
    for key, stamps in touched.items():
        row = Row(key)
        for micros in stamps:
            row.delete_cells(LINEAGE_FAMILY, LINEAGE_COLUMNS, micros, micros + MS)
        deletes.append(row)
    write_rows(table, deletes, "lineage")


def _alive(reader: RowReader, named: dict[bytes, tuple[int, list[bytes]]]) -> dict:
    """The ``size_nm3`` timestamps of the feature rows ``named`` names, read as key
    ranges, not by key: each lineage row's ids lie in one chunk, whose row keys are
    contiguous, so ``[its smallest id, its largest]`` holds them (overlapping spans
    merged), read keys-and-timestamps only within the page's timestamps. A page of 500
    lineage rows is at most 500 range scans instead of ~470,000 point reads."""
    spans = sorted((ks[0], ks[-1] + b"\x00") for _, ks in named.values() if ks)
    if not spans:
        return {}
    merged: list[list[bytes]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    stamps = [micros for micros, _ in named.values()]
    cells = CellFilter(
        columns=_SIZE_COLUMN,
        strip_values=True,
        start_micros=min(stamps),
        end_micros=max(stamps) + MS,
    )
    return reader.versions(ranges=[(lo, hi) for lo, hi in merged], cells=cells)


PRUNE_PAGE = 500  # lineage rows per read: bounded memory whatever the table's size
PRUNE_GRACE_S = 24 * 3600.0  # far longer than one write's two mutations (or any retry)


@dataclass
class Prune:
    """What :func:`prune_rows` read and deleted."""

    scanned: int = 0  # lineage rows read
    deleted: int = 0  # lineage rows naming no version that still exists
    young: int = 0  # lineage rows written within the grace period: never pruned


def prune_rows(
    table: Table | str,
    dry_run: bool = False,
    page: int = PRUNE_PAGE,
    grace_s: float = PRUNE_GRACE_S,
) -> Prune:
    """Delete the lineage rows whose versions are all gone, except those written within
    the last ``grace_s`` seconds.

    A feature column keeps its last N versions (the table's GC); a lineage row is a row
    of its own, which no GC rule ties to them, so a chunk edited for years would keep a
    lineage row per edit after its versions were collected. A lineage row is kept while
    any id it names still has a ``size_nm3`` version (every l2cache write has one) at its
    timestamp; otherwise nothing can be served or rolled back by it any more.

    Why the grace period: a write stores its lineage row first and its feature rows
    second, so between the two a lineage row names versions that do not exist *yet*;
    pruning it then would leave the features without lineage. Age is the row's
    ``written`` cell (the wall clock of its latest write, retries included; rows without
    it: the cell timestamp), not the cell timestamp, which a bulk run or a redelivered
    message sets long before it writes. Left: a retry that rewrites an old row whose
    versions are gone, landing between this page's read and its delete (the delete
    removes the rewritten cells too) - run prune when no such retry is expected.
    Pages of ``page`` lineage rows, one keys-and-timestamps read of their ids'
    ``size_nm3`` versions per page, over the chunks' key ranges (:func:`_alive`).
    """
    reader = RowReader(table)
    done = Prune()
    start = ALL_LINEAGE_ROWS[0]
    cutoff = now_micros() - int(grace_s * 1e6)
    while True:
        cells = CellFilter(columns={LINEAGE_FAMILY: [IDS_COLUMN, WRITTEN_COLUMN]}, per_column=1)
        rows = reader.versions(ranges=[(start, ALL_LINEAGE_ROWS[1])], cells=cells, limit=page)
        if not rows:
            break
        named: dict[bytes, tuple[int, list[bytes]]] = {}
        for key, families in rows.items():
            _, micros, _ = parse_key(key)
            cols = families.get(LINEAGE_FAMILY, {})
            written = cols.get(WRITTEN_COLUMN)
            age_from = int(written[0][1]) if written else micros
            if age_from > cutoff:
                done.young += 1
                continue
            value = cols.get(IDS_COLUMN, [(0, b"")])[0][1]
            named[key] = (micros, [b"%020d" % n for n in decode_ids(value).tolist()])
        alive = _alive(reader, named)
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
