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
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from google.cloud.bigtable import row_filters
from google.cloud.bigtable.row_filters import TimestampRange

from .attributes import ATTRIBUTES, FEATURE_FAMILY, LINEAGE_FAMILY
from .bigtable_write import write_rows

FEATURE_COLUMNS = [a.key for a in ATTRIBUTES]
LINEAGE_COLUMNS = [b"run", b"params", b"code", b"input"]


def run_versions(table, run_id: str) -> dict[bytes, list[int]]:
    """Row key -> timestamps (microseconds) of every version whose ``lineage:run`` is ``run_id``."""
    filt = row_filters.RowFilterChain(
        [
            row_filters.FamilyNameRegexFilter(LINEAGE_FAMILY),
            row_filters.ColumnQualifierRegexFilter(b"^run$"),
            row_filters.ValueRegexFilter(b"^" + re.escape(run_id).encode() + b"$"),
            row_filters.StripValueTransformerFilter(True),
        ]
    )
    out: dict[bytes, list[int]] = {}
    for row in table.read_rows(filter_=filt):
        cells = row.cells.get(LINEAGE_FAMILY, {}).get(b"run", [])
        stamps = sorted({_micros(c.timestamp) for c in cells})
        if stamps:
            out[row.row_key] = stamps
    return out


def rows_of_run(table, run_id: str) -> list[bytes]:
    """Keys of rows holding any version written by ``run_id``."""
    return list(run_versions(table, run_id))


def rollback_run(table, run) -> int:
    """Delete every cell version the run wrote; returns the number of rows touched."""
    versions = run_versions(table, run.run_id)
    rows = []
    for key, stamps in versions.items():
        row = table.direct_row(key)
        for micros in stamps:
            start = datetime.fromtimestamp(micros / 1e6, tz=UTC)
            window = TimestampRange(start=start, end=start + timedelta(milliseconds=1))
            # per column: a whole-family delete cannot be limited to a time range
            row.delete_cells(FEATURE_FAMILY, FEATURE_COLUMNS, time_range=window)
            row.delete_cells(LINEAGE_FAMILY, LINEAGE_COLUMNS, time_range=window)
        rows.append(row)
    write_rows(table, rows, "rollback")
    return len(rows)


def _micros(ts: datetime) -> int:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return int(round(ts.timestamp() * 1000)) * 1000
