"""Run status from the ledger: progress, rate, ETA, failures and cost.

Cost is computed by :mod:`l2cache_ops.cost` (the one place with unit prices) from the
ledger's measured compute seconds, attempts and row counts, per chunk, per run and per
mm^3 of the chunks done (voxel volume from the run's recorded resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from l2cache.domain.lineage import utc_now
from l2cache.domain.regions import region_chunks
from l2cache.store.ledger import RunLedger
from l2cache_ops.cost import PRICES, Prices, RunCost, run_cost
from l2cache_ops.ledger import chunk_rows, failed_tasks, rejected_tasks


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
    broken: str | None = None  # why the run cannot finish as planned (a task was unreadable)
    cost: RunCost | None = None  # per chunk / per mm^3 breakdown of cost_usd
    rows: list[dict] = field(default_factory=list, repr=False)  # the ledger rows read

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
) -> RunStatus:
    """The run's status from its ledger rows.

    An attempt silent for longer than ``attempt_deadline_s`` (its worker was killed or
    timed out and never answered) is presumed lost: retrying if attempts remain, failed
    ("gave up after N attempts") once ``max_attempts`` were made, so a run always ends.
    Chunks of a split task that gave up, never started, count as failed.
    """
    now = now or utc_now()
    run = ledger.get_run(run_id)
    rows = chunk_rows(ledger, run_id)
    for r in rows:
        presume_lost(r, now, max_attempts, attempt_deadline_s)
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    retrying = [r for r in rows if r["status"] == "retrying"]
    running = [r for r in rows if r["status"] in ("running", "queued")]
    total = max(run.n_chunks, len(rows))
    unstarted_failed = []
    known = {tuple(r["coords"]) for r in rows if "coords" in r}
    for task in failed_tasks(ledger, run_id):
        for c in region_chunks(task["region"]):
            if tuple(c) not in known:
                known.add(tuple(c))
                unstarted_failed.append(
                    {"coords": c, "error": task.get("error"), "attempts": task.get("attempts")}
                )
    n_failed = len(failed) + len(unstarted_failed)
    compute_s = sum(float(r.get("duration_s", 0)) for r in done)
    l2_rows = sum(int(r.get("l2_count", 0)) for r in done)
    finish_times = [datetime.fromisoformat(r["finished_at"]) for r in done if "finished_at" in r]
    start = datetime.fromisoformat(run.created_at)
    elapsed = ((max(finish_times) if finish_times else start) - start).total_seconds()
    rate = len(done) / elapsed if elapsed > 0 else 0.0
    remaining = max(total - len(done) - n_failed, 0)
    eta = remaining / rate if rate > 0 and remaining else (0.0 if not remaining else None)
    rejected = rejected_tasks(ledger, run_id)
    res = run.params.get("resolution") or [1, 1, 1]
    cost = run_cost(rows, float(math.prod(res)), prices)
    return RunStatus(
        run_id,
        total,
        len(done),
        n_failed,
        len(retrying),
        len(running),
        max(remaining - len(retrying) - len(running), 0),
        l2_rows,
        compute_s,
        rate,
        eta,
        cost.usd,
        [
            {
                "chunk": r.get("coords"),
                "status": r["status"],
                "error": r.get("error"),
                "attempts": r.get("attempts"),
            }
            for r in failed + retrying
            if r.get("error")
        ]
        + [
            {
                "chunk": u["coords"],
                "status": "failed",
                "error": u["error"],
                "attempts": u["attempts"],
            }
            for u in unstarted_failed
        ],
        broken=(
            f"{len(rejected)} task(s) of the run were rejected unread: {rejected[0]}"
            if rejected
            else None
        ),
        cost=cost,
        rows=rows,
    )
