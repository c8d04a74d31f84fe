"""Roll back a run: delete exactly the cell versions it wrote, so older values show again.

Selection is by lineage, for every kind of run: each cell a run writes is written in
the same mutation as a ``lineage:run`` cell naming the run, at the same timestamp.
Bulk and region runs write all their cells at the run's one timestamp; stream runs
(edits, missing ids) write each message's cells at that message's publish time, so one
row can hold several of a stream run's versions. Rollback reads every version of
``lineage:run`` equal to the run id (a server-side value filter), and deletes, in each
such row, the feature and lineage cells at exactly those timestamps. Versions written
by other runs are untouched, and the cache table's GC keeps the last N versions, so
the previous values become current again.

The scans go through the one read path (:func:`l2cache.gcp.bigtable.read_versions`,
every version with its timestamp) and the deletions through the one write path
(:func:`l2cache.gcp.bigtable_write.write_rows`, every row's status checked).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from l2cache.domain.attributes import ATTRIBUTES, FEATURE_FAMILY, LINEAGE_FAMILY
from l2cache.domain.ids import SpatialBits, get_layer
from l2cache.gcp.bigtable import CellFilter, KeyRange, read_versions
from l2cache.gcp.bigtable_write import Row, write_rows

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.table import Table

    from l2cache.store.ledger import RunRecord

FEATURE_COLUMNS = [a.key for a in ATTRIBUTES]
LINEAGE_COLUMNS = [b"run", b"params", b"code", b"input"]
MS = 1000  # Bigtable cell timestamps are whole milliseconds, in microseconds


def run_versions(table: Table | str, run_id: str) -> dict[bytes, list[int]]:
    """Row key -> timestamps (microseconds) of every version whose ``lineage:run`` is ``run_id``."""
    cells = CellFilter(
        columns={LINEAGE_FAMILY: [b"run"]}, values=[run_id.encode()], strip_values=True
    )
    out: dict[bytes, list[int]] = {}
    for key, row in read_versions(table, cells=cells).items():
        stamps = sorted({stamp for stamp, _ in row.get(LINEAGE_FAMILY, {}).get(b"run", [])})
        if stamps:
            out[key] = stamps
    return out


def rollback_run(table: Table | str, run: RunRecord) -> int:
    """Delete every cell version the run wrote; returns the number of rows touched."""
    versions = run_versions(table, run.run_id)
    rows = []
    for key, stamps in versions.items():
        row = Row(key)
        for micros in stamps:
            _delete_version(row, micros)
        rows.append(row)
    write_rows(table, rows, "rollback")
    return len(rows)


def _delete_version(row: Row, micros: int) -> None:
    """Delete the feature and lineage cells of the version at ``micros``."""
    row.delete_cells(FEATURE_FAMILY, FEATURE_COLUMNS, micros, micros + MS)
    row.delete_cells(LINEAGE_FAMILY, LINEAGE_COLUMNS, micros, micros + MS)


def _micros(ts: datetime) -> int:
    """A cell timestamp (whole milliseconds, in microseconds); naive means UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return int(round(ts.timestamp() * 1000)) * 1000


# -- region-scoped rollback ------------------------------------------------------------
# The L2 ids of one atomic chunk share its chunk id in their high bits, so their
# ``%020d`` row keys are one contiguous range: [chunk_id, chunk_id + 2**segment_bits).
# A region's rollback reads exactly those ranges (one per chunk, adjacent ones merged),
# never the whole table: a region of a few chunks in a table of billions of rows costs
# what the region holds.


def chunk_key_ranges(
    chunk_ids: np.ndarray | Sequence[int], spatial_bits: SpatialBits
) -> list[KeyRange]:
    """``[start, end)`` row-key ranges of the ids in ``chunk_ids`` (chunk ids of one layer:
    layer 2 for cache rows, layer 1 for a graph's supervoxels), adjacent chunks merged."""
    ids = np.unique(np.asarray(chunk_ids, dtype=np.uint64))
    if ids.size == 0:
        return []
    layers = np.unique(get_layer(ids))
    if layers.size != 1:
        raise ValueError("chunk key ranges need chunk ids of one layer")
    seg_bits = 64 - 8 - 3 * int(spatial_bits.bits_for(layers)[0])
    span = 1 << seg_bits
    ranges: list[list[int]] = []
    for cid in ids.tolist():
        if ranges and ranges[-1][1] == cid:
            ranges[-1][1] = cid + span
        else:
            ranges.append([cid, cid + span])
    return [(b"%020d" % lo, b"%020d" % hi) for lo, hi in ranges]


@dataclass
class RangeRollback:
    """What a range-scoped rollback read and deleted."""

    ranges: int  # key ranges requested (one per chunk, adjacent chunks merged)
    rows_scanned: int  # rows the scan returned (only rows holding a selected version)
    rows_touched: int  # rows mutated
    versions_deleted: int  # (row, timestamp) versions removed
    runs: dict[str, int]  # run id -> versions deleted


def versions_in_ranges(
    table: Table | str,
    run_ids: Iterable[str],
    ranges: list[KeyRange],
    after: datetime | None = None,
) -> tuple[dict[bytes, dict[str, list[int]]], int]:
    """Row key -> {run id: timestamps} of the ``lineage:run`` versions naming one of
    ``run_ids``, newer than ``after``, within ``ranges`` only; plus the rows scanned."""
    run_ids = sorted(set(run_ids))
    if not run_ids or not ranges:
        return {}, 0
    cells = CellFilter(
        columns={LINEAGE_FAMILY: [b"run"]},
        start_micros=None if after is None else _micros(after) + MS,
        values=[r.encode() for r in run_ids],
    )
    found = read_versions(table, ranges=ranges, cells=cells)
    out: dict[bytes, dict[str, list[int]]] = {}
    for key, row in found.items():
        per_run: dict[str, set[int]] = {}
        for stamp, value in row.get(LINEAGE_FAMILY, {}).get(b"run", []):
            per_run.setdefault(value.decode(), set()).add(stamp)
        if per_run:
            out[key] = {run: sorted(stamps) for run, stamps in per_run.items()}
    return out, len(found)


def rollback_runs_in_ranges(
    table: Table | str,
    run_ids: Iterable[str],
    ranges: list[KeyRange],
    after: datetime | None = None,
) -> RangeRollback:
    """Delete, within ``ranges`` only, every cell version written by one of ``run_ids``
    (selected by ``lineage:run``, as :func:`rollback_run`), newer than ``after``."""
    versions, scanned = versions_in_ranges(table, run_ids, ranges, after)
    rows, per_run, deleted = [], {}, 0
    for key, by_run in versions.items():
        row = Row(key)
        for run, stamps in by_run.items():
            per_run[run] = per_run.get(run, 0) + len(stamps)
            for micros in stamps:
                _delete_version(row, micros)
                deleted += 1
        rows.append(row)
    write_rows(table, rows, "rollback")
    return RangeRollback(len(ranges), scanned, len(rows), deleted, per_run)
