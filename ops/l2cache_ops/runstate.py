"""Reads of a run's incrementally kept state (:mod:`l2cache.store.runstate`).

Everything here reads O(1) rows in the run's size (the ``stat:`` box rows, a window of
``hist:`` minute rows) or O(what is shown) (a page of ``fail:`` rows, the ``live:`` rows
of the chunks in flight, bounded by the queue's concurrency). The one exception is
:func:`recount`, the explicit repair that streams the whole ledger page by page.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from l2cache.domain.lineage import utc_now
from l2cache.gcp.bigtable import KEYS_ONLY, CellFilter, RowCells, read_rows
from l2cache.store import runstate
from l2cache.store.ledger import LEDGER_FAMILY, RunLedger, RunRecord

PAGE = 1000


def _ints(row: RowCells) -> dict[str, int]:
    """The counters of a row: the sum family's int64 cells (big-endian)."""
    return {
        k.decode(): struct.unpack(">q", v)[0] for k, v in row.get(runstate.SUM_FAMILY, {}).items()
    }


def _fields(row: RowCells) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in row.get(LEDGER_FAMILY, {}).items():
        name = k.decode()
        if name in ("status", "at", "started_at", "queued_at", "finished_at"):
            out[name] = v.decode()
        else:
            out[name] = json.loads(v)
    return out


@dataclass
class RunCounts:
    """The run's counters summed over its boxes, and each box's own (the map)."""

    totals: dict[str, int] = field(default_factory=dict)
    cells: dict[int, dict[str, int]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.totals.get(name, 0)


def read_counts(ledger: RunLedger, run_id: str) -> RunCounts:
    """Every ``stat:`` box row of the run (at most a few hundred), summed."""
    counts = RunCounts()
    totals: dict[str, int] = defaultdict(int)
    for key, row in read_rows(ledger.table, prefix=f"stat:{run_id}:".encode()).items():
        cell = int(key.rsplit(b":", 1)[1])
        counts.cells[cell] = _ints(row)
        for name, value in counts.cells[cell].items():
            totals[name] += value
    counts.totals = dict(totals)
    return counts


def live_chunks(
    ledger: RunLedger, run_id: str, keys: list[bytes] | None = None, limit: int = 0
) -> list[dict[str, object]]:
    """The chunks queued, running or awaiting a retry, with the chunk's recorded state
    (``state``: None, ``r``, ``f`` or ``d``; a ``d`` is a mark its finish could not
    clear) and its attempts so far (its row's counter); O(chunks in flight), or only
    the rows of ``keys``, or the first ``limit``."""
    if keys is None:
        rows = read_rows(ledger.table, prefix=f"live:{run_id}:".encode(), limit=limit)
    else:
        rows = read_rows(ledger.table, keys=keys)
    if not rows:
        return []
    ids = [int(k.rsplit(b":", 1)[1]) for k in rows]
    chunk_keys = [b"chunk:%s:%020d" % (run_id.encode(), cid) for cid in ids]
    chunks = read_rows(
        ledger.table,
        keys=chunk_keys,
        cells=CellFilter(columns={LEDGER_FAMILY: [runstate.STATE, b"attempts"]}, per_column=1),
    )
    out = []
    for cid, ckey, row in zip(ids, chunk_keys, rows.values(), strict=True):
        entry = {"chunk_id": cid, **_fields(row)}
        cells = chunks.get(ckey, {}).get(LEDGER_FAMILY, {})
        st = cells.get(runstate.STATE)
        entry["state"] = st.decode() if st else None
        if b"attempts" in cells:  # the chunk's own counter: every attempt it ever made
            made = struct.unpack(">q", cells[b"attempts"])[0]
            entry["attempts"] = max(int(entry.get("attempts") or 0), made)  # type: ignore[call-overload]
        out.append(entry)
    return out


def silent_live_chunks(ledger: RunLedger, run_id: str, cutoff: datetime) -> list[dict[str, object]]:
    """The in-flight rows with no word since ``cutoff`` (candidates for "presumed lost"),
    as :func:`live_chunks` gives them: O(silent rows), not O(in flight).

    The server returns only rows holding a cell older than ``cutoff`` (every write of a
    live row rewrites all its cells, so a busy chunk's row has none); those few are read
    again in full, and the caller judges their newest stamps.
    """
    prefix = f"live:{run_id}:".encode()
    cells = CellFilter(end_micros=int(cutoff.timestamp() * 1_000_000), per_row=1, strip_values=True)
    keys = list(read_rows(ledger.table, prefix=prefix, cells=cells))
    return live_chunks(ledger, run_id, keys=keys) if keys else []


def failures_page(
    ledger: RunLedger, run_id: str, after: int | None = None, limit: int = 50
) -> tuple[list[dict[str, object]], int | None]:
    """One page of the run's failed and retrying chunks in chunk-id order, and the
    chunk id to continue after (None on the last page)."""
    prefix = f"fail:{run_id}:".encode()
    start = prefix if after is None else runstate.fail_key(run_id, after) + b"\x00"
    rows = read_rows(ledger.table, ranges=[(start, prefix + b"\xff")], limit=limit + 1)
    page = [
        {"chunk_id": int(k.rsplit(b":", 1)[1]), **_fields(r)} for k, r in list(rows.items())[:limit]
    ]
    more = len(rows) > limit
    return page, (page[-1]["chunk_id"] if more and page else None)  # type: ignore[return-value]


def iter_failures(ledger: RunLedger, run_id: str, page: int = PAGE) -> Iterator[dict[str, object]]:
    """Every failed or retrying chunk, page by page (reconcile, exports)."""
    after = None
    while True:
        rows, after = failures_page(ledger, run_id, after, page)
        yield from rows
        if after is None:
            return


def minutes(
    ledger: RunLedger, run_id: str, since: int | None = None, until: int | None = None
) -> dict[int, dict[str, int]]:
    """Per-minute counters (minutes since the epoch) in ``[since, until]``, shards summed."""
    prefix = f"hist:{run_id}:".encode()
    lo = prefix + (b"%010d" % since if since is not None else b"")
    hi = prefix + (b"%010d" % (until + 1) if until is not None else b"\xff")
    out: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, row in read_rows(ledger.table, ranges=[(lo, hi)]).items():
        minute = int(key.split(b":")[2])
        for name, value in _ints(row).items():
            out[minute][name] += value
    return {m: dict(v) for m, v in sorted(out.items())}


def active_minutes(ledger: RunLedger, run_id: str) -> list[int]:
    """The minutes in which anything of the run happened (keys only, shards merged)."""
    prefix = f"hist:{run_id}:".encode()
    keys = read_rows(ledger.table, prefix=prefix, cells=KEYS_ONLY)
    return sorted({int(k.split(b":")[2]) for k in keys})


def recent_rate(
    ledger: RunLedger, run: RunRecord, now: datetime | None = None, window_min: int = 10
) -> tuple[float, int]:
    """(done chunks per second, the minute of the last activity) over the last
    ``window_min`` minutes, or over the whole run once it has been quiet that long."""
    now = now or utc_now()
    m_now = runstate.minute_of(now)
    recent = minutes(ledger, run.run_id, m_now - window_min, m_now)
    done = sum(v.get("done", 0) for v in recent.values())
    if done:
        first = min(m for m, v in recent.items() if v.get("done"))
        created = runstate.minute_of(datetime.fromisoformat(run.created_at))
        span_s = max((now - datetime.fromisoformat(run.created_at)).total_seconds(), 1.0)
        if first > created:  # a full window of a long run: the window's own rate
            span_s = min(span_s, (m_now - first + 1) * 60.0)
        return done / span_s, max(recent)
    return 0.0, (max(recent) if recent else -1)


def busy_seconds(ledger: RunLedger, run_id: str) -> float:
    """Seconds the run kept a worker busy, per minute at most 60: the node-hours the
    cost charges. From the minute rows' compute time, so O(the run's minutes)."""
    return sum(min(60.0, v.get("compute_ms", 0) / 1000.0) for v in minutes(ledger, run_id).values())


def recount(ledger: RunLedger, run: RunRecord, page: int = PAGE) -> dict[str, int]:
    """Rebuild the run's box counters from its ledger rows; returns the corrections made.

    The explicit repair for a worker killed between a chunk's state change and its
    counters (see :mod:`l2cache.store.runstate`): streams the chunk rows page by page
    (bounded memory), sums per box, counts the attempts in flight from the ``live:``
    rows, and adds the difference to each box row.
    """
    grid = run.stat_grid
    want: dict[int, dict[bytes, int]] = defaultdict(lambda: defaultdict(int))
    prefix = f"chunk:{run.run_id}:".encode()
    start = prefix
    while True:
        rows = read_rows(ledger.table, ranges=[(start, prefix + b"\xff")], limit=page)
        for key, row in rows.items():
            cid = int(key.rsplit(b":", 1)[1])
            cells = row.get(LEDGER_FAMILY, {})
            coords = json.loads(cells.get(b"coords", b"[0,0,0]"))
            box = want[runstate.cell_of(grid, coords, cid)]
            state = cells.get(runstate.STATE)
            if state in runstate.STATE_COUNTER:
                box[runstate.STATE_COUNTER[state]] += 1
            if b"attempts" in cells:
                n = struct.unpack(">q", cells[b"attempts"])[0]
                box[b"attempts"] += n
                box[b"started"] += 1
                box[b"retried"] += n > 1
            if state == b"d":
                box[b"l2"] += int(json.loads(cells.get(b"l2_count", b"0")))
                box[b"compute_ms"] += round(
                    float(json.loads(cells.get(b"duration_s", b"0"))) * 1000
                )
                box[b"voxels"] += int(json.loads(cells.get(b"voxels", b"0")))
        if len(rows) < page:
            break
        start = next(reversed(rows)) + b"\x00"
    for row in live_chunks(ledger, run.run_id):  # attempts in flight: O(in flight)
        if row.get("status") == "running" and row.get("state") != "d":
            box = want[runstate.cell_of(grid, row["coords"], row["chunk_id"])]  # type: ignore[arg-type]
            box[b"inflight"] += 1
            box[b"inflight_retry"] += int(row.get("attempts") or 1) > 1  # type: ignore[call-overload]
    have = read_counts(ledger, run.run_id)
    corrections: dict[str, int] = defaultdict(int)
    for cell in set(want) | set(have.cells):
        current = have.cells.get(cell, {})
        delta = {}
        for name in (*runstate.COUNTED, *runstate.INFLIGHT):
            diff = want[cell].get(name.encode(), 0) - current.get(name, 0)
            if diff:
                delta[name.encode()] = diff
                corrections[name] += diff
        runstate.add_counts(ledger.table, runstate.stat_key(run.run_id, cell), delta)
    return dict(corrections)
