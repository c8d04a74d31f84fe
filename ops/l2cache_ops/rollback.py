"""Roll back a run: delete exactly the cell versions it wrote, so older values show again.

Selection is by lineage, for every kind of run: each write stores, before its cells,
one lineage row per chunk naming the run and the ids written, at the cells' timestamp
(rows written before lineage rows: a ``lineage:run`` cell in the same mutation). Two
runs writing one cell in the same millisecond leave one value and two lineage rows
naming it; a rollback of either deletes that version and counts and logs it as a
collision (``collisions``), since the value kept may have been the other run's.
Bulk and region runs write all their cells at the run's one timestamp; stream runs
(edits, missing ids) write each message's cells at that message's publish time, so one
row can hold several of a stream run's versions. Versions written by other runs are
untouched, and the cache table's GC keeps the last N versions, so the previous values
become current again.

**Proportional to what the run touched** (:func:`rollback_run_touched`): the run's
ledger names every chunk it may have written (``chunk:<run>:<chunk>`` rows with an
attempt or done, for bulk and region runs; ``evchunk:<run>:<event>:<chunk>`` rows for
stream runs). They are read page by page (:func:`touched_chunk_pages`, bounded memory),
turned into the cache's per-chunk key ranges, and only the run's own versions in those
ranges are read (server-side filter) and deleted, a batch of chunks at a time
(:func:`l2cache.handlers.rollback_task.rollback_chunks`). A run that wrote nothing
costs one empty ledger read. Above :data:`FAN_OUT_CHUNKS` chunks the work goes through
the queue as ``rollback`` tasks (deterministic names: a repeat is dropped as a
duplicate) that the compute function runs. Every rollback, dry or not, is returned as a
:class:`RunRollback`; a real one is recorded as ``rollback:<dataset>:<at ms>:<run>`` in
the runs table (:func:`rollback_history`).

**Fenced first** (:func:`fence_run`): a real rollback closes the run (the run row's
``closed`` column: at, by, reason) before it reads anything, then waits until the run's
in-flight writers have ended: ``live:`` rows (chunks queued or running) and
``writing:`` rows (stream writes) gone, or silent past the attempt deadline (a worker
that died). Every writer checks the fence after storing its in-flight mark and before
writing cells, so once the wait is over no cell of the run can appear again: a late
write is refused as permanent and recorded (the chunk failed "late write refused"; a
stream chunk's ids dead-lettered). A silent ``writing:`` row's chunk is rolled back too
(the write may have landed without its ``evchunk`` row). Who, when, how long it waited
and on how many marks go into the record with what was removed.

The whole-table lineage scan (:func:`rollback_run`, :func:`run_versions`) stays as the
exhaustive fallback (``runs rollback --full-scan``): it finds a version even where the
ledger has no row (a write whose ledger record was lost), at O(table) cost.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from l2cache.domain.ids import SpatialBits
from l2cache.domain.lineage import utc_now
from l2cache.gcp.bigtable import CellFilter, KeyRange, RowCells, RowReader, prefix_range
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.handlers.rollback_task import (
    BATCH_CHUNKS,
    CELLS_PER_VERSION,
    MAX_COLLIDED,
    MAX_TASK_CHUNKS,
    MS,
    ChunkRollback,
    chunk_key_ranges,
    collided_pairs,
    delete_version,
    enqueue_rollback,
    own_timestamp_ms,
    record_key,
    report_collisions,
    rollback_chunks,
)
from l2cache.store import lineage_rows
from l2cache.store.ledger import LEDGER_FAMILY, RunLedger, RunRecord, prefix_rows, row_cells
from l2cache_ops.ledger import put_record, records

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.table import Table

    from l2cache.config import TasksConfig

__all__ = [
    "FAN_OUT_CHUNKS",
    "ChunkRollback",
    "Fence",
    "FenceTimeout",
    "fence_run",
    "record_rollback",
    "RunRollback",
    "chunk_key_ranges",
    "rollback_history",
    "rollback_run",
    "rollback_run_touched",
    "touched_chunk_pages",
]

FENCE_POLL_S = 1.0  # how often the in-flight marks are read again while fencing
PAGE_ROWS = 1_000  # ledger rows per read: bounded memory whatever the run's size
FAN_OUT_CHUNKS = 2_000  # above this many chunks a rollback is enqueued, not run here
TASK_CHUNKS = 200  # chunks per rollback task (<= MAX_TASK_CHUNKS)
STREAM_KINDS = ("edit_stream", "missing_ids")
# (run id, chunk ids, record key) -> the task's name, or None when it was already queued
Enqueue = Callable[[str, list[int], str | None], object]


# -- the fence -------------------------------------------------------------------------


@dataclass
class Fence:
    """A run closed for a rollback, and what the rollback waited on."""

    closed: dict[str, Any]  # the mark (at, by, reason)
    waited_s: float = 0.0
    in_flight: int = 0  # in-flight marks (live: queued or running, writing:) when fenced
    silent: int = 0  # of those, given up on as silent past the attempt deadline
    chunk_ids: list[int] = field(default_factory=list)  # stream chunks of silent writes


class FenceTimeout(TimeoutError):
    """Writers of the run are still active after the wait allowed."""


def in_flight(ledger: RunLedger, run_id: str) -> list[tuple[bytes, datetime | None]]:
    """The run's in-flight marks with the time of their last word: ``live:`` rows that
    are queued or running (a chunk awaiting a retry has no worker: its next attempt
    starts after the fence and is refused) and ``writing:`` rows. O(in flight)."""
    out: list[tuple[bytes, datetime | None]] = []
    for prefix in (f"live:{run_id}:", f"writing:{run_id}:"):
        for key, row in prefix_rows(ledger.table, prefix.encode()).items():
            c = row_cells(row, LEDGER_FAMILY)
            if c.get("status") == b"retrying":
                continue
            stamps = [c[k].decode() for k in ("started_at", "queued_at", "at") if k in c]
            when = max((_aware(datetime.fromisoformat(t)) for t in stamps), default=None)
            out.append((key, when))
    return out


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def fence_run(
    ledger: RunLedger,
    run: RunRecord,
    by: str,
    attempt_deadline_s: float,
    timeout_s: float | None = None,
    poll_s: float = FENCE_POLL_S,
    sleep: Callable[[float], object] = time.sleep,
    say: Callable[[str], object] | None = None,
) -> Fence:
    """Close ``run`` and wait until none of its writers is in flight (each in-flight
    mark gone, or silent for more than ``attempt_deadline_s``: its worker died, the
    function's own timeout ended it). ``timeout_s`` bounds the wait
    (:class:`FenceTimeout`); ``say`` hears what it waits on."""
    t0 = time.monotonic()
    mark = ledger.close_run(run.run_id, by, "rollback")
    fence = Fence(mark)
    first = True
    while True:
        now = utc_now()
        marks = in_flight(ledger, run.run_id)
        active = [
            k for k, at in marks if at is None or (now - at).total_seconds() <= attempt_deadline_s
        ]
        if first:
            fence.in_flight, first = len(marks), False
        if not active:
            fence.silent = len(marks)
            fence.chunk_ids = sorted(
                {int(k.split(b":")[2]) for k, _ in marks if k.startswith(b"writing:")}
            )
            fence.waited_s = round(time.monotonic() - t0, 3)
            return fence
        waited = time.monotonic() - t0
        if timeout_s is not None and waited > timeout_s:
            raise FenceTimeout(
                f"run {run.run_id} is closed, but {len(active)} writer(s) are still in flight "
                f"after {waited:.0f}s; run the rollback again once they end"
            )
        if say is not None:
            say(f"run {run.run_id} closed; waiting on {len(active)} in-flight writer(s)")
        sleep(poll_s)


# -- what the run touched: the ledger, page by page ----------------------------------


@dataclass
class ReadCount:
    """Ledger reads a rollback made: requests and rows returned (the O(1) check)."""

    requests: int = 0
    rows: int = 0


def prefix_pages(
    table: Table | str,
    prefix: bytes,
    cells: CellFilter,
    page_rows: int = PAGE_ROWS,
    count: ReadCount | None = None,
    reader: RowReader | None = None,
) -> Iterator[dict[bytes, RowCells]]:
    """The rows under ``prefix`` that ``cells`` keeps, ``page_rows`` at a time, in key
    order: each page is one read starting after the previous page's last key, so a
    prefix of millions of rows is walked in bounded memory."""
    reader = reader or RowReader(table)
    start, end = prefix_range(prefix)
    while True:
        page = reader.rows(ranges=[(start, end)], cells=cells, limit=page_rows)
        if count is not None:
            count.requests += 1
            count.rows += len(page)
        if page:
            yield page
        if len(page) < page_rows:
            return
        start = max(page) + b"\x00"  # the smallest key after the last one read


@dataclass(frozen=True)
class TouchedChunk:
    """A chunk the run may have written: its L2 chunk id, ledger status and the rows
    the ledger says it wrote (``l2_count`` / ``written``; 0 when not recorded)."""

    chunk_id: int
    status: str
    rows: int


_CHUNK_CELLS = CellFilter(columns={LEDGER_FAMILY: [b"status", b"attempts", b"l2_count"]})
_EVCHUNK_CELLS = CellFilter(columns={LEDGER_FAMILY: [b"status", b"written"]})


def touched_chunk_pages(
    ledger: RunLedger,
    run: RunRecord,
    page_rows: int = PAGE_ROWS,
    count: ReadCount | None = None,
) -> Iterator[list[TouchedChunk]]:
    """Pages of the chunks ``run`` may have written, from its ledger only.

    Bulk and region runs: ``chunk:`` rows with an attempt or done (a queued chunk that
    never started wrote nothing; a failed one may have written part). Stream runs:
    ``evchunk:`` rows, done or failed; a chunk several events wrote appears once per
    event (deleting twice is harmless: the second read finds nothing).
    """
    stream = run.kind in STREAM_KINDS
    prefix = f"{'evchunk' if stream else 'chunk'}:{run.run_id}:".encode()
    cells = _EVCHUNK_CELLS if stream else _CHUNK_CELLS
    for page in prefix_pages(ledger.table, prefix, cells, page_rows, count):
        out = []
        for key, row in page.items():
            c = row_cells(row, LEDGER_FAMILY)
            status = c.get("status", b"").decode()
            if not stream and not status and "attempts" not in c:
                continue  # a chunk row without a start: nothing written
            n = c.get("written" if stream else "l2_count")
            out.append(TouchedChunk(int(key.rsplit(b":", 1)[1]), status or "running", _json_int(n)))
        if out:
            yield out


def _json_int(value: bytes | None) -> int:
    try:
        return int(json.loads(value)) if value else 0
    except (ValueError, TypeError):
        return 0


# -- the proportional rollback -------------------------------------------------------


@dataclass
class RunRollback:
    """What a rollback of one run did (or, dry, would do)."""

    run_id: str
    kind: str
    dataset: str
    dry_run: bool
    mode: str = "inline"  # inline | queued | estimate (dry run above the threshold)
    at: str = ""
    chunks: int = 0  # touched chunks the ledger names (stream runs: per event)
    by_status: dict[str, int] = field(default_factory=dict)
    ledger_requests: int = 0
    ledger_rows: int = 0
    estimated_versions: int = 0  # from the ledger (l2_count / written): one per row
    deleted: ChunkRollback = field(default_factory=ChunkRollback)  # exact, inline only
    tasks: int = 0  # rollback tasks enqueued (dry run: that would be)
    tasks_new: int = 0  # of those, not already in the queue
    seconds: float = 0.0
    record: str | None = None  # the operator record's key (real rollbacks)
    by: str = ""  # who ran it (real rollbacks)
    fence: dict[str, Any] | None = None  # the run's closing and the wait (real rollbacks)

    @property
    def versions(self) -> int:
        """Versions deleted (inline) or, fanned out or estimated, the ledger's estimate."""
        return self.deleted.versions_deleted if self.mode == "inline" else self.estimated_versions

    @property
    def cells(self) -> int:
        """Feature cells those versions hold (lineage: a row per chunk and run)."""
        return self.versions * CELLS_PER_VERSION

    def to_json(self) -> dict[str, Any]:
        """The operator record and the CLI's ``--json``: every field plus cells."""
        return {**asdict(self), "versions": self.versions, "cells": self.cells}


def rollback_run_touched(
    cache_table: Table | str,
    ledger: RunLedger,
    run: RunRecord,
    spatial_bits: SpatialBits,
    *,
    dry_run: bool = False,
    enqueue: Enqueue | None = None,
    fan_out_chunks: int = FAN_OUT_CHUNKS,
    task_chunks: int = TASK_CHUNKS,
    batch_chunks: int = BATCH_CHUNKS,
    page_rows: int = PAGE_ROWS,
    fence: Fence | None = None,
    by: str = "",
) -> RunRollback:
    """Roll back ``run`` reading and deleting only in the chunks its ledger names.

    Up to ``fan_out_chunks`` chunks (or with no ``enqueue``) the deletion runs here,
    ``batch_chunks`` at a time; beyond, with ``enqueue``, tasks of ``task_chunks`` chunks
    are enqueued as the ledger streams (the compute function runs them). ``dry_run``
    writes nothing: up to the threshold it reads the ranges and counts exactly what
    would go; beyond, it reports the ledger's estimate and the tasks it would enqueue.
    A real rollback is recorded in the runs table (:func:`rollback_history`) with
    ``by`` and ``fence`` (:func:`fence_run`, done first by the caller: the chunks of
    silent stream writes it found are rolled back too).
    """
    if not 0 < task_chunks <= MAX_TASK_CHUNKS:
        raise ValueError(f"task_chunks must be 1..{MAX_TASK_CHUNKS}")
    t0 = time.perf_counter()
    now = utc_now()
    at_ms = int(now.timestamp() * 1000)
    out = RunRollback(run.run_id, run.kind, run.dataset, dry_run, at=now.isoformat(), by=by)
    if fence is not None:
        out.fence = asdict(fence)
    key = None if dry_run else record_key(run.dataset, at_ms, run.run_id)
    stamp = own_timestamp_ms(run)
    stamps = None if stamp is None else [stamp]
    reader = RowReader(cache_table)
    count = ReadCount()
    pending: list[int] = []
    mode: str | None = None  # decided once the ledger shows more than the threshold
    if fence is not None:  # a stream write that went silent: maybe written, no evchunk row
        pending.extend(fence.chunk_ids)
        out.chunks += len(fence.chunk_ids)
        if fence.chunk_ids:
            out.by_status["in flight"] = len(fence.chunk_ids)

    def inline(chunk_ids: list[int]) -> None:
        out.deleted.add(
            rollback_chunks(
                cache_table,
                [run.run_id],
                chunk_ids,
                spatial_bits,
                stamps,
                dry_run,
                batch_chunks,
                reader,
            )
        )

    def queue(chunk_ids: list[int]) -> None:
        out.tasks += 1
        if not dry_run and enqueue is not None and enqueue(run.run_id, chunk_ids, key):
            out.tasks_new += 1

    for page in touched_chunk_pages(ledger, run, page_rows, count):
        for ch in page:
            out.chunks += 1
            out.by_status[ch.status] = out.by_status.get(ch.status, 0) + 1
            out.estimated_versions += ch.rows
        pending.extend(ch.chunk_id for ch in page)
        if mode is None and len(pending) > fan_out_chunks:
            # large: through the queue; dry without a queue, the ledger's estimate only
            mode = "queued" if enqueue is not None else "estimate" if dry_run else "inline"
        if mode == "inline":
            inline(pending)
            pending = []
        elif mode == "queued":
            while len(pending) >= task_chunks:
                queue(pending[:task_chunks])
                pending = pending[task_chunks:]
        elif mode == "estimate":
            pending = []
    if mode == "queued":
        for start in range(0, len(pending), task_chunks):
            queue(pending[start : start + task_chunks])
    elif mode is None and pending:
        inline(pending)
    out.mode = mode or "inline"
    out.ledger_requests, out.ledger_rows = count.requests, count.rows
    out.seconds = round(time.perf_counter() - t0, 4)
    if key is not None:
        record_rollback(ledger, out, fence, by, key)
    return out


def record_rollback(
    ledger: RunLedger,
    out: RunRollback,
    fence: Fence | None,
    by: str,
    key: str | None = None,
) -> str:
    """Record a real rollback in the runs table (``rollback:<dataset>:<at ms>:<run>``):
    who, when, the fence and its wait, and what was removed; returns the key."""
    if not out.at:
        out.at = utc_now().isoformat()
    if key is None:
        at_ms = int(datetime.fromisoformat(out.at).timestamp() * 1000)
        key = record_key(out.dataset, at_ms, out.run_id)
    out.record, out.by = key, by
    if fence is not None:
        out.fence = asdict(fence)
    put_record(ledger, key, {"meta": json.dumps(out.to_json(), sort_keys=True).encode()})
    return key


def queue_enqueuer(tasks: TasksConfig, dataset: str) -> Enqueue:
    """Enqueue rollback tasks of ``dataset`` on the map's queue (one client, reused)."""
    from l2cache.gcp.tasks import tasks_client

    client = tasks_client()

    def enqueue(run_id: str, chunk_ids: list[int], record: str | None) -> str | None:
        return enqueue_rollback(client, tasks, dataset, run_id, chunk_ids, record)

    return enqueue


def rollback_history(ledger: RunLedger, dataset: str) -> list[dict[str, Any]]:
    """Every recorded rollback of ``dataset``, oldest first, with the fanned-out tasks'
    progress (``tasks_done``, ``queued_versions_deleted``, ``queued_rows_touched``,
    ``queued_collisions``: counted by the tasks as they finish; ``queued_collided``:
    the first :data:`MAX_COLLIDED` collided ``[row key, micros, [other runs]]`` the
    tasks recorded)."""
    out = []
    for _, cells in records(ledger, f"rollback:{dataset}:"):
        if "meta" not in cells:
            continue  # a task's counters arrived before the record: not listed yet
        entry = json.loads(cells["meta"])
        for column in ("tasks_done", "versions_deleted", "rows_touched", "collisions"):
            if column in cells:
                done = struct.unpack(">q", cells[column])[0]
                entry["tasks_done" if column == "tasks_done" else f"queued_{column}"] = done
        collided = [
            pair
            for column in sorted(c for c in cells if c.startswith("collided:"))
            for pair in json.loads(cells[column])
        ]
        if collided:
            entry["queued_collided"] = sorted(collided)[:MAX_COLLIDED]
        out.append(entry)
    return out


# -- the exhaustive fallback: every row of the table -----------------------------------


def run_versions(table: Table | str, run_id: str) -> dict[bytes, list[int]]:
    """Row key -> timestamps (microseconds) of every version ``run_id`` wrote, by lineage
    (lineage rows and the older rows' own ``lineage:run``), over the **whole table**
    (O(table): the fallback and the tests' oracle)."""
    found = lineage_rows.run_versions(RowReader(table), [run_id], None)
    return {key: sorted(by_run[run_id]) for key, by_run in sorted(found.rows.items())}


def rollback_run(table: Table | str, run: RunRecord) -> int:
    """Delete every cell version the run wrote, found by a scan of the whole table;
    returns the number of rows touched. O(table): ``runs rollback --full-scan`` only."""
    found = lineage_rows.run_versions(RowReader(table), [run.run_id], None)
    report_collisions(run.run_id, found.collisions)
    rows = []
    for key, by_run in found.rows.items():
        row = Row(key)
        for micros in sorted(by_run[run.run_id]):
            delete_version(row, micros, found.old_layout_read)
        rows.append(row)
    write_rows(table, rows, "rollback")
    write_rows(table, lineage_rows.delete_lineage_rows(found.lineage), "rollback")
    return len(rows)


def _micros(ts: datetime) -> int:
    """A cell timestamp (whole milliseconds, in microseconds); naive means UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return int(round(ts.timestamp() * 1000)) * MS


# -- several runs in given key ranges (release rollback) --------------------------------


@dataclass
class RangeRollback:
    """What a range-scoped rollback read and deleted."""

    ranges: int  # key ranges requested (one per chunk, adjacent chunks merged)
    rows_scanned: int  # rows the scan returned (only rows holding a selected version)
    rows_touched: int  # rows mutated
    versions_deleted: int  # (row, timestamp) versions removed
    runs: dict[str, int]  # run id -> versions deleted
    collisions: int = 0  # of those, also named by another run's lineage (same millisecond)
    # the first MAX_COLLIDED of them: [row key, micros, [the other runs]], to recompute
    collided: list[list[Any]] = field(default_factory=list)


def versions_in_ranges(
    table: Table | str,
    run_ids: Iterable[str],
    ranges: list[KeyRange],
    after: datetime | None = None,
) -> tuple[dict[bytes, dict[str, list[int]]], int, dict[bytes, int]]:
    """Row key -> {run id: timestamps} of the versions one of ``run_ids`` wrote (by
    lineage), newer than ``after``, within ``ranges`` (chunk key ranges) only; plus the
    rows scanned and the lineage rows naming them (to delete after the versions)."""
    found = _versions_in_ranges(table, run_ids, ranges, after)
    out = {
        key: {run: sorted(stamps) for run, stamps in by_run.items()}
        for key, by_run in sorted(found.rows.items())
    }
    return out, found.scanned, found.lineage


def _versions_in_ranges(
    table: Table | str,
    run_ids: Iterable[str],
    ranges: list[KeyRange],
    after: datetime | None,
) -> lineage_rows.Versions:
    """The versions of :func:`versions_in_ranges`, their collisions reported here."""
    start = None if after is None else _micros(after) + MS
    runs = sorted(set(run_ids))
    found = lineage_rows.run_versions(RowReader(table), runs, ranges, start_micros=start)
    report_collisions(",".join(runs), found.collisions)
    return found


def rollback_runs_in_ranges(
    table: Table | str,
    run_ids: Iterable[str],
    ranges: list[KeyRange],
    after: datetime | None = None,
    dry_run: bool = False,
) -> RangeRollback:
    """Delete, within ``ranges`` only, every cell version written by one of ``run_ids``
    (selected by lineage), newer than ``after``; ``dry_run`` counts only."""
    found = _versions_in_ranges(table, run_ids, ranges, after)
    rows, per_run, deleted = [], {}, 0
    for key, by_run in sorted(found.rows.items()):
        row = Row(key)
        for run, stamps in by_run.items():
            per_run[run] = per_run.get(run, 0) + len(stamps)
            for micros in sorted(stamps):
                delete_version(row, micros, found.old_layout_read)
                deleted += 1
        rows.append(row)
    if not dry_run:
        write_rows(table, rows, "rollback")
        write_rows(table, lineage_rows.delete_lineage_rows(found.lineage), "rollback")
    return RangeRollback(
        len(ranges),
        found.scanned,
        len(rows),
        deleted,
        per_run,
        len(found.collisions),
        collided_pairs(found.collisions),
    )
