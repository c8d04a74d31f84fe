"""Run status from the run's incrementally kept state: progress, rate, ETA, failures, cost.

Cost is computed by :mod:`l2cache_ops.cost` (the one place with unit prices) from the
ledger's measured compute seconds, attempts and row counts, per chunk, per run and per
mm^3 of the chunks done (voxel volume from the run's recorded resolution).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from l2cache.domain import ids as idlib
from l2cache.domain.ids import SpatialBits
from l2cache.domain.lineage import utc_now
from l2cache.domain.regions import region_size
from l2cache.gcp.bigtable import CellFilter, read_row, read_rows
from l2cache.store import runstate
from l2cache.store.ledger import LEDGER_FAMILY, RunLedger, RunRecord
from l2cache_ops.cost import PRICES, Prices, RunCost, cost_from_counts
from l2cache_ops.ledger import failed_tasks, rejected_tasks
from l2cache_ops.runstate import (
    RunCounts,
    busy_seconds,
    failures_page,
    read_counts,
    recent_rate,
    silent_live_chunks,
)

SHOW_FAILURES = 20
# Chunks of split tasks that gave up whose states status reads one by one; beyond it a
# gave-up region's chunks count failed without a read (pessimistic, never more than
# the run has): status stays bounded whatever a task record says.
MAX_EXPANDED = 100_000
EXPAND_BATCH = 10_000


@dataclass
class RunStatus:
    """Where a run stands. Every chunk is in exactly one of: done, failed, retrying
    (its last attempt failed transiently and the queue will try again), running (an
    attempt is in flight) or pending (not started)."""

    run_id: str
    total: int
    done: int
    failed: int
    retrying: int
    running: int
    pending: int
    l2_rows: int
    compute_s: float
    rate_per_s: float
    eta_s: float | None
    cost_usd: float
    failures: list[dict]
    broken: str | None = None  # why the run cannot finish as planned (work of it was lost)
    refused: int = 0  # distinct task bodies refused for the run (forged, wrong, late)
    refused_latest: str | None = None  # the latest refusal's reason
    closed: dict | None = None  # the fence: a rollback closed the run (at, by, reason)
    cost: RunCost | None = None  # per chunk / per mm^3 breakdown of cost_usd
    counts: RunCounts | None = field(default=None, repr=False)  # the box counters read
    run: RunRecord | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        """No chunk can change any more: every chunk is done or failed, or the run is broken."""
        return self.broken is not None or self.done + self.failed >= self.total


def presume_lost(
    row: dict, now: datetime, max_attempts: int | None, attempt_deadline_s: float | None
) -> None:
    """Turn a chunk nobody has reported on for ``attempt_deadline_s`` into its verdict.

    Applies to every state that waits on a worker: running (the attempt's worker died),
    queued (a leaf task's worker died on an earlier chunk of the batch) and retrying
    (the next attempt never came: the queue gave up). Attempts are the most the chunk
    or its task made; at ``max_attempts`` the chunk is failed, else still retrying.
    """
    if row["status"] in ("done", "failed") or not attempt_deadline_s:
        return
    stamps = [row[k] for k in ("started_at", "finished_at", "queued_at") if k in row]
    if not stamps:
        return
    silent = (now - max(datetime.fromisoformat(t) for t in stamps)).total_seconds()
    if silent <= attempt_deadline_s:
        return
    n = max(int(row.get("attempts", 0)), int(row.get("task_attempt", 0)))
    if max_attempts and n >= max_attempts:
        row["status"] = "failed"
        row["error"] = f"gave up after {n} attempts: no answer for {silent:.0f}s" + (
            f" (last error: {row['error']})" if row.get("error") else ""
        )
    else:
        row["status"] = "retrying"
        row["error"] = f"attempt {n} lost: no answer for {silent:.0f}s"


def run_status(
    ledger: RunLedger,
    run_id: str,
    now: datetime | None = None,
    max_attempts: int | None = None,
    attempt_deadline_s: float | None = None,
    prices: Prices = PRICES,
    show_failures: int = SHOW_FAILURES,
    bits: SpatialBits | None = None,
) -> RunStatus:
    """The run's status from its incrementally kept state, never its whole ledger.

    Reads the run's box counters (``stat:``, a few hundred rows at most: done, failed,
    retrying, in flight), the in-flight marks silent past the deadline (``live:``, a
    server-side timestamp filter), the first ``show_failures`` failures, the minute rows
    of the last minutes (rate) and the records of split tasks that gave up or were
    refused: O(1) in the run's size, O(silent marks + failures shown).

    An attempt silent for longer than ``attempt_deadline_s`` (its worker was killed or
    timed out and never answered) is presumed lost: retrying if attempts remain, failed
    ("gave up after N attempts") once ``max_attempts`` were made, so a run always ends.
    Chunks of a split task that gave up, never started, count as failed (``bits``, the
    dataset's id layout, names their ledger rows; without it every chunk of such a
    region counts failed).
    """
    now = now or utc_now()
    run = ledger.get_run(run_id)
    counts = read_counts(ledger, run_id)
    done, failed, retrying = counts["done"], counts["failed"], counts["retrying"]
    # attempts in flight from the counters; those of chunks already counted retrying
    # (or failed, re-queued) are not also pending
    running = max(counts["inflight"], 0)
    again = min(max(counts["inflight_retry"], 0), running)
    lost: list[dict] = []
    cutoff = now - timedelta(seconds=attempt_deadline_s) if attempt_deadline_s else None
    for row in silent_live_chunks(ledger, run_id, cutoff) if cutoff else []:
        state = row.pop("state")
        was = row.get("status")  # queued, running, or retrying: a retry the queue owes
        if state == "d" or (was == "retrying" and state != "r"):
            continue  # a mark its chunk's later outcome could not clear: counted there
        presume_lost(row, now, max_attempts, attempt_deadline_s)
        if row["status"] not in ("failed", "retrying"):
            continue  # its newest word is recent: not silent after all
        lost.append(row)
        if was == "retrying":  # counted retrying by its state; failed once given up
            if row["status"] == "failed":
                retrying, failed = retrying - 1, failed + 1
            continue
        if was == "running":  # its start is in the in-flight counters: it ended silently
            running -= 1
            if int(row.get("attempts") or 1) > 1:
                again = max(again - 1, 0)
        if state == "f":  # its own state counted it: the presumed verdict replaces that
            failed -= 1
        elif state == "r":
            retrying -= 1
        if row["status"] == "failed":
            failed += 1
        else:
            retrying += 1
    running = max(running, 0)
    again = min(again, running)
    room = max(run.n_chunks - (done + failed + retrying + running - again), 0)
    unstarted_failed, unread = _unstarted_of_failed_tasks(ledger, run, bits, room)
    failed += len(unstarted_failed) + unread
    total = max(run.n_chunks, done + failed + retrying + running - again)
    rate, _ = recent_rate(ledger, run, now)
    remaining = max(total - done - failed, 0)
    eta = remaining / rate if rate > 0 and remaining else (0.0 if not remaining else None)
    rejected = rejected_tasks(ledger, run_id)
    refused, refused_latest = refusals(ledger, run_id)
    res = run.params.get("resolution") or [1, 1, 1]
    cost = cost_from_counts(
        counts.totals, busy_seconds(ledger, run_id), float(math.prod(res)), prices
    )
    shown, _ = failures_page(ledger, run_id, limit=show_failures)
    presumed = {r["chunk_id"] for r in lost}
    shown = [r for r in shown if r["chunk_id"] not in presumed]  # its newer verdict is above
    failures = [
        {
            "chunk": r.get("coords"),
            "status": r["status"],
            "error": r.get("error"),
            "attempts": r.get("attempts", r.get("task_attempt")),
            "kind": kind,
        }
        for kind, part in (("lost", lost), ("chunk", shown), ("task", unstarted_failed))
        for r in part
    ][:show_failures]
    return RunStatus(
        run_id,
        total,
        done,
        failed,
        retrying,
        running,
        max(remaining - retrying - (running - again), 0),
        counts["l2"],
        counts["compute_ms"] / 1000.0,
        rate,
        eta,
        cost.usd,
        failures,
        broken=(
            f"{len(rejected)} task(s) of the run were rejected unread: {rejected[0]}"
            if rejected
            else None
        ),
        refused=refused,
        refused_latest=refused_latest,
        closed=run.closed,
        cost=cost,
        counts=counts,
        run=run,
    )


def refusals(ledger: RunLedger, run_id: str) -> tuple[int, str | None]:
    """How many distinct task bodies were refused for the run, and the latest reason:
    one row (``refusals:<run>``), whatever their number."""
    row = read_row(ledger.table, f"refusals:{run_id}".encode())
    if row is None:
        return 0, None
    count = row.get(runstate.SUM_FAMILY, {}).get(b"refused")
    latest = row.get(LEDGER_FAMILY, {}).get(b"latest")
    return (
        struct.unpack(">q", count)[0] if count else 0,
        json.loads(latest) if latest else None,
    )


def lost_chunks(
    ledger: RunLedger,
    run_id: str,
    max_attempts: int | None = None,
    attempt_deadline_s: float | None = None,
    now: datetime | None = None,
) -> list[tuple[int, ...]]:
    """Coordinates of every chunk whose attempt or awaited retry went silent past the
    deadline (what reconcile re-queues besides the ``fail:`` rows); O(chunks in flight)."""
    now = now or utc_now()
    if not attempt_deadline_s:
        return []
    out = []
    for row in silent_live_chunks(ledger, run_id, now - timedelta(seconds=attempt_deadline_s)):
        if row.pop("state") == "d":
            continue
        before = row.get("error")
        presume_lost(row, now, max_attempts, attempt_deadline_s or None)
        if row.get("error") != before and row.get("coords"):
            out.append(tuple(row["coords"]))
    return out


def _unstarted_of_failed_tasks(
    ledger: RunLedger, run: RunRecord, bits: SpatialBits | None, room: int
) -> tuple[list[dict], int]:
    """Chunks of split tasks that gave up and never got a state of their own: failed.

    Returns (those read one by one, how many more count failed unread). Each gave-up
    region is clipped to the run's region (a record naming chunks outside the run
    counts none of them) and at most ``room`` chunks (what the run has left) count,
    the first :data:`MAX_EXPANDED` read by key, the rest failed without a read: status
    costs O(min(failed regions, MAX_EXPANDED)) and bounded memory whatever a task
    record says, nothing when no split task gave up.
    """
    out: list[dict] = []
    unread = 0
    if run.region is None:
        return out, unread
    seen: set[tuple[int, ...]] = set()
    for task in failed_tasks(ledger, run.run_id):
        region = _clip(task.get("region"), run.region)
        if region is None or room <= 0:
            continue
        chunks = _chunks_of(region, min(room, MAX_EXPANDED - len(seen)), seen)
        seen.update(chunks)
        beyond = max(min(region_size(region), room) - len(chunks), 0)
        if len(seen) >= MAX_EXPANDED:  # read no more; the rest count failed unread
            unread += beyond
            room -= beyond
        for i in range(0, len(chunks), EXPAND_BATCH):
            part = chunks[i : i + EXPAND_BATCH]
            if bits is None:
                keys, have = [b""] * len(part), {}
            else:
                ids = idlib.chunk_id_from_coords(2, np.asarray(part, dtype=np.int64), bits)
                keys = [b"chunk:%s:%020d" % (run.run_id.encode(), int(cid)) for cid in ids]
                have = read_rows(
                    ledger.table,
                    keys=keys,
                    cells=CellFilter(columns={LEDGER_FAMILY: [runstate.STATE]}, per_column=1),
                )
            new = [
                {"coords": list(c), "error": task.get("error"), "attempts": task.get("attempts"),
                 "status": "failed"}
                for c, k in zip(part, keys, strict=True)
                if k not in have
            ]  # fmt: skip
            out += new
            room -= len(new)
    return out, unread


def _clip(region: object, run_region: list[int]) -> list[int] | None:
    """``region`` intersected with the run's region; None when empty or not a region."""
    if not (isinstance(region, list) and len(region) == 6):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in region):
        return None
    lo = [max(region[a], run_region[a]) for a in range(3)]
    hi = [min(region[a + 3], run_region[a + 3]) for a in range(3)]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return None
    return lo + hi


def _chunks_of(region: list[int], limit: int, seen: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Up to ``limit`` chunks of ``region`` not in ``seen``, x-major, generated lazily
    (never the whole region's list)."""
    from itertools import islice, product

    x0, y0, z0, x1, y1, z1 = region
    every = product(range(x0, x1), range(y0, y1), range(z0, z1))
    return list(islice((c for c in every if c not in seen), max(limit, 0)))
