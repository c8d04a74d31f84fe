"""Reads of the runs table that only operators make: whole-run scans and stored records.

The functions write the ledger (:class:`l2cache.store.ledger.RunLedger`) and read only
the few rows a task or message needs; everything that scans a run, lists runs or keeps
operator records (QC reports, releases) lives here, outside every deploy archive. Reads
and writes go through the same two paths as the functions' (:mod:`l2cache.gcp.bigtable`,
:mod:`l2cache.gcp.bigtable_write`).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from l2cache.gcp.bigtable import RowCells, read_row, read_rows
from l2cache.gcp.bigtable_write import Row, increment, write_rows
from l2cache.store.ledger import (
    LEDGER_FAMILY,
    RUN_FAMILY,
    RunLedger,
    RunRecord,
    prefix_rows,
    row_cells,
)

TEXT_COLUMNS = ("status", "state", "finished_at", "started_at", "first_failed_at", "queued_at")


def list_runs(ledger: RunLedger) -> list[RunRecord]:
    """Every run the ledger records, in run-id order: what ``runs list`` shows and what
    a release rollback and the SLO checks choose their runs from."""
    return [
        RunRecord(**json.loads(row_cells(r, RUN_FAMILY)["meta"]))
        for r in prefix_rows(ledger.table, b"run:").values()
    ]


def rejected_tasks(ledger: RunLedger, run_id: str) -> list[str]:
    """Why each rejected task of the run could not be read: its region is unknown, so
    no chunk row records what it lost, and only these rows tell status that the run
    cannot complete as planned."""
    return [
        json.loads(row_cells(r, LEDGER_FAMILY)["error"])
        for r in prefix_rows(ledger.table, f"rejected:{run_id}:".encode()).values()
    ]


def failed_tasks(ledger: RunLedger, run_id: str) -> list[dict[str, Any]]:
    """The split tasks of the run that gave up (region, error, attempts): their unstarted
    chunks have no chunk row, and status counts them failed from these."""
    return [
        {
            k: json.loads(v) if k != "status" else v.decode()
            for k, v in row_cells(r, LEDGER_FAMILY).items()
        }
        for r in prefix_rows(ledger.table, f"task:{run_id}:".encode()).values()
    ]


def chunk_rows(ledger: RunLedger, run_id: str) -> list[dict[str, Any]]:
    """Every chunk row of the run, decoded (``chunk_id`` added, ``attempts`` the counter's
    integer, times and status as text, the rest JSON); a row with no status yet is
    ``running``. The whole-run scan status, QC and reconcile are built on."""
    return [
        _decode_chunk(int(key.rsplit(b":", 1)[1]), r)
        for key, r in prefix_rows(ledger.table, f"chunk:{run_id}:".encode()).items()
    ]


def _decode_chunk(chunk_id: int, r: RowCells) -> dict[str, Any]:
    """One chunk row decoded: counters as integers, times and states as text, the rest
    JSON; a row with no status yet is ``running``."""
    entry: dict[str, Any] = {"chunk_id": chunk_id}
    for k, v in row_cells(r, LEDGER_FAMILY).items():
        if k == "attempts":
            entry[k] = struct.unpack(">q", v)[0]
        elif k in TEXT_COLUMNS:
            entry[k] = v.decode()
        else:
            entry[k] = json.loads(v)
    entry.setdefault("status", "running")
    return entry


def chunk_rows_of(ledger: RunLedger, run_id: str, chunk_ids: list[int]) -> list[dict[str, Any]]:
    """The chunk rows of ``chunk_ids`` only, decoded as :func:`chunk_rows` does; a chunk
    with no row yet is ``pending``. O(len(chunk_ids)) by key, never a scan."""
    keys = [b"chunk:%s:%020d" % (run_id.encode(), cid) for cid in chunk_ids]
    found = read_rows(ledger.table, keys=keys)
    return [
        _decode_chunk(cid, found[k]) if k in found else {"chunk_id": cid, "status": "pending"}
        for cid, k in zip(chunk_ids, keys, strict=True)
    ]


def done_chunks(ledger: RunLedger, run_id: str) -> set[int]:
    """Chunk ids of the run recorded done: what reconcile leaves out when it re-queues
    the rest."""
    return {r["chunk_id"] for r in chunk_rows(ledger, run_id) if r["status"] == "done"}


def events(ledger: RunLedger, run_id: str) -> list[dict[str, Any]]:
    """Every event row of a stream run, decoded, with its ``key``: the edit-stream SLO
    is measured from their publish and record times."""
    out = []
    for key, r in prefix_rows(ledger.table, f"event:{run_id}:".encode()).items():
        entry: dict[str, Any] = {"key": key.decode().split(":", 2)[2]}
        for k, v in row_cells(r, LEDGER_FAMILY).items():
            entry[k] = struct.unpack(">q", v)[0] if k == "delivery_count" else json.loads(v)
        out.append(entry)
    return out


def ignored_count(ledger: RunLedger, table_id: str) -> int:
    """How many edits arrived for ``table_id``, a graph table without a cache (0 when
    none did): the trace of edits on_edit acknowledges without computing anything."""
    row = read_row(ledger.table, f"ignored:{table_id}".encode())
    if row is None:
        return 0
    return struct.unpack(">q", row_cells(row, LEDGER_FAMILY)["count"])[0]


def put_record(ledger: RunLedger, key: str, columns: dict[str, bytes]) -> None:
    """Write (replace) the given columns of one record row, checked."""
    row = Row(key.encode())
    for column, value in columns.items():
        row.set_cell(RUN_FAMILY, column.encode(), value)
    write_rows(ledger.table, [row], "record")


def get_record(ledger: RunLedger, key: str) -> dict[str, bytes] | None:
    """The newest value of every column of a record row; None when it does not exist."""
    row = read_row(ledger.table, key.encode())
    return None if row is None else row_cells(row, RUN_FAMILY)


def records(ledger: RunLedger, prefix: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, columns) of every record whose key starts with ``prefix``, in key order."""
    return [
        (key.decode(), row_cells(r, RUN_FAMILY))
        for key, r in prefix_rows(ledger.table, prefix.encode()).items()
    ]


def next_sequence(ledger: RunLedger, key: str) -> int:
    """Atomically count one more in ``key``'s counter; returns the new value (1-based),
    so two concurrent callers never get the same number."""
    return increment(ledger.table, key.encode(), RUN_FAMILY, b"seq", what="record")
