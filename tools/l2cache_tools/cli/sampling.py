"""``ingest --sample``: the sample's run, its progress, and continuing it.

A sample is recorded as a run of exactly its sampled chunks (``n_chunks`` = the
sample) over the whole region, so once they finish ``status`` reads it finished (it
read "N pending" with an ETA for chunks nobody had enqueued) while QC still refuses it
(coverage is counted over the region). Continuing it (``--yes``, or
``ingest --resume RUN`` later) widens the record to the region first, and the resumed
run skips the sampled chunks as done. While it waits, the sample prints its progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from l2cache.domain.regions import region_size
from l2cache.store.ledger import RunLedger, RunRecord
from l2cache_ops.ledger import chunk_rows_of

BULK_KINDS = ("bulk_ingest", "region_reprocess")
PROGRESS_EVERY_S = 10.0  # a line at least this often while nothing changes
POLL_S = 0.3


def sample_run(run: RunRecord, n_sampled: int) -> RunRecord:
    """The record of a sample of ``n_sampled`` chunks of ``run``'s region."""
    return replace(run, n_chunks=n_sampled)


def is_sample(run: RunRecord) -> bool:
    """A bulk or region run recorded with fewer chunks than its region: a sample."""
    return (
        run.kind in BULK_KINDS and run.region is not None and run.n_chunks < region_size(run.region)
    )


def widen_sample(ledger: RunLedger, run_id: str) -> bool:
    """Make a sample's run cover its whole region before it is resumed; False (nothing
    written) for any other run. The record is rewritten in place (same id, lineage and
    cell timestamp), so the sampled chunks stay done for it."""
    run = ledger.get_run(run_id)
    if not is_sample(run):
        return False
    ledger.create_run(replace(run, n_chunks=region_size(run.region)))
    return True


def wait_for_sample(
    ledger: RunLedger,
    run_id: str,
    chunk_ids: Sequence[int],
    timeout_s: float,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> list[dict[str, Any]]:
    """Poll the sampled chunks' ledger rows (by key: O(sample)) until each is done or
    failed; print ``finished/total`` with the rate whenever it changes, and at least
    every :data:`PROGRESS_EVERY_S`. Returns the rows; TimeoutError after ``timeout_s``."""
    wanted = sorted(chunk_ids)
    start = time.monotonic()
    last_line, last_at = "", 0.0
    while True:
        rows = chunk_rows_of(ledger, run_id, wanted)
        done = sum(r["status"] == "done" for r in rows)
        failed = sum(r["status"] == "failed" for r in rows)
        elapsed = time.monotonic() - start
        finished = done + failed
        rate = finished / elapsed if elapsed > 0 else 0.0
        line = f"sample: {finished}/{len(wanted)} chunks finished ({done} done, {failed} failed)"
        now = time.monotonic()
        if line != last_line or now - last_at >= PROGRESS_EVERY_S:
            say(f"{line}, {rate:.2f} chunks/s, {elapsed:.0f}s elapsed")
            last_line, last_at = line, now
        if finished >= len(wanted):
            return rows
        if elapsed > timeout_s:
            raise TimeoutError(
                f"sample of run {run_id} not finished after {timeout_s:.0f}s "
                f"({finished}/{len(wanted)}); see: l2cache runs inspect DATASET {run_id}"
            )
        time.sleep(POLL_S)
