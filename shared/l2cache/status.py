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
    run_id: str
    total: int
    done: int
    failed: int
    retrying: int
    pending: int
    l2_rows: int
    compute_s: float
    rate_per_s: float
    eta_s: float | None
    cost_usd: float
    failures: list[dict]

    @property
    def finished(self) -> bool:
        return self.done + self.failed >= self.total


def run_status(ledger, run_id: str, now: datetime | None = None) -> RunStatus:
    run = ledger.get_run(run_id)
    rows = ledger.chunk_rows(run_id)
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    retrying = [r for r in rows if r["status"] in ("retrying", "running")]
    total = max(run.n_chunks, len(rows))
    compute_s = sum(float(r.get("duration_s", 0)) for r in done)
    l2_rows = sum(int(r.get("l2_count", 0)) for r in done)
    finish_times = [datetime.fromisoformat(r["finished_at"]) for r in done if "finished_at" in r]
    start = datetime.fromisoformat(run.created_at)
    elapsed = ((max(finish_times) if finish_times else start) - start).total_seconds()
    rate = len(done) / elapsed if elapsed > 0 else 0.0
    remaining = total - len(done) - len(failed)
    eta = remaining / rate if rate > 0 else None
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
        len(failed),
        len(retrying),
        max(remaining - len(retrying), 0),
        l2_rows,
        compute_s,
        rate,
        eta,
        cost,
        [
            {"chunk": r.get("coords"), "error": r.get("error"), "attempts": r.get("attempts")}
            for r in failed + retrying
            if r.get("error")
        ],
    )
