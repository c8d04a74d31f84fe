"""Roll back a run: delete exactly the cell versions it wrote, so older values show again.

Every cell a run writes carries the run's own timestamp (``RunRecord.cell_timestamp_ms``)
and its row carries ``lineage:run``; rollback finds the rows whose newest lineage names
the run and deletes, in those rows only, the cells at that one timestamp. Versions
written by other runs are untouched, and the cache table's GC keeps the last N
versions, so the previous run's values become current again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.cloud.bigtable import row_filters
from google.cloud.bigtable.row_filters import TimestampRange

from .attributes import ATTRIBUTES, FEATURE_FAMILY, LINEAGE_FAMILY

FEATURE_COLUMNS = [a.key for a in ATTRIBUTES]
LINEAGE_COLUMNS = [b"run", b"params", b"code", b"input"]


def rows_of_run(table, run_id: str) -> list[bytes]:
    """Keys of rows whose newest ``lineage:run`` is ``run_id`` (a filtered scan)."""
    filt = row_filters.RowFilterChain(
        [
            row_filters.FamilyNameRegexFilter(LINEAGE_FAMILY),
            row_filters.ColumnQualifierRegexFilter(b"^run$"),
            row_filters.CellsColumnLimitFilter(1),
            row_filters.ValueRegexFilter(b"^" + run_id.encode() + b"$"),
        ]
    )
    return [row.row_key for row in table.read_rows(filter_=filt)]


def rollback_run(table, run) -> int:
    """Delete the run's cell versions; returns the number of rows touched."""
    start = datetime.fromtimestamp(run.cell_timestamp_ms / 1000, tz=UTC)
    window = TimestampRange(start=start, end=start + timedelta(milliseconds=1))
    keys = rows_of_run(table, run.run_id)
    rows = []
    for key in keys:
        row = table.direct_row(key)
        # per column: a whole-family delete cannot be limited to a time range
        row.delete_cells(FEATURE_FAMILY, FEATURE_COLUMNS, time_range=window)
        row.delete_cells(LINEAGE_FAMILY, LINEAGE_COLUMNS, time_range=window)
        rows.append(row)
    for i in range(0, len(rows), 1000):
        statuses = table.mutate_rows(rows[i : i + 1000])
        failed = [s for s in statuses if s.code != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} rows failed to roll back: {failed[0].message}")
    return len(keys)
