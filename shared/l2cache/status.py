"""Run status from the ledger: progress, rate, ETA, failures and an estimated cost.

Cost is an estimate from the ledger's measured compute seconds and row counts, with
list prices stated here (USD, us-east1, November 2026 list; override with
environment variables named like the constants) so anyone can recompute it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

# function memory per instance (GiB) and list prices
FUNCTION_GIB = float(os.environ.get("L2CACHE_COST_FUNCTION_GIB", "2"))
PRICE_GIB_SECOND = float(os.environ.get("L2CACHE_PRICE_GIB_SECOND", "0.0000025"))
PRICE_VCPU_SECOND = float(os.environ.get("L2CACHE_PRICE_VCPU_SECOND", "0.000024"))
PRICE_BIGTABLE_WRITE_PER_ROW = float(os.environ.get("L2CACHE_PRICE_BT_ROW", "0.0000001"))
PRICE_TASK = float(os.environ.get("L2CACHE_PRICE_TASK", "0.0000004"))


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
    broken: str | None = None  # why the run cannot finish (its ledger is gone)

    @property
    def finished(self) -> bool:
        """No chunk can change any more: every chunk is done or failed, or the run is broken."""
        return self.broken is not None or self.done + self.failed >= self.total


def run_status(
    ledger,
    run_id: str,
    now: datetime | None = None,
    max_attempts: int | None = None,
    attempt_deadline_s: float | None = None,
) -> RunStatus:
    """The run's status from its ledger rows.

    An attempt silent for longer than ``attempt_deadline_s`` (its worker was killed or
    timed out and never answered) is presumed lost: retrying if attempts remain, failed
    ("gave up after N attempts") once ``max_attempts`` were made, so a run always ends.
    Chunks of a split task that gave up, never started, count as failed.
    """
    from .ingest import region_chunks
    from .lineage import utc_now

    now = now or utc_now()
    run = ledger.get_run(run_id)
    rows = ledger.chunk_rows(run_id)
    for r in rows:
        if r["status"] == "running" and attempt_deadline_s and "started_at" in r:
            silent = (now - datetime.fromisoformat(r["started_at"])).total_seconds()
            if silent > attempt_deadline_s:
                n = int(r.get("attempts", 0))
                if max_attempts and n >= max_attempts:
                    r["status"] = "failed"
                    r["error"] = f"gave up after {n} attempts: no answer for {silent:.0f}s"
                else:
                    r["status"] = "retrying"
                    r["error"] = f"attempt {n} lost: no answer for {silent:.0f}s"
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    retrying = [r for r in rows if r["status"] == "retrying"]
    running = [r for r in rows if r["status"] == "running"]
    total = max(run.n_chunks, len(rows))
    unstarted_failed = []
    known = {tuple(r["coords"]) for r in rows if "coords" in r}
    for task in ledger.failed_tasks(run_id):
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
    tasks = len(rows) + max(1, total // 4)
    cost = (
        compute_s * (FUNCTION_GIB * PRICE_GIB_SECOND + PRICE_VCPU_SECOND)
        + l2_rows * PRICE_BIGTABLE_WRITE_PER_ROW
        + tasks * PRICE_TASK
    )
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
        cost,
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
    )
