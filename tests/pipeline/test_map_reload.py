"""A dataset added to the map of a running local stack is ingested without a restart.

Tried as a new operator would: ``local up``, ingest one dataset, then ``dataset add`` a
second and ingest it. The running compute function had read the map at its first
request and rejected the second dataset's task as unknown; the run showed "1 pending"
forever. The functions now read the map again when its file changes.
"""

from __future__ import annotations

import os

from stackutil import add_dataset, crop_volume, wait_for

from l2cache.compute import dataset_context
from l2cache.config import load_config
from l2cache_ops.ingest import start_ingest
from l2cache_ops.status import run_status
from l2cache_tools.local.stack import LocalStack


def _ingest_and_wait(stack: LocalStack, dataset: str):
    config = load_config(stack.config_path)
    ledger = dataset_context(config, dataset).ledger
    run = start_ingest(config, dataset, batch=8)
    return wait_for(
        lambda: (s := run_status(ledger, run.run_id)).finished and s,
        120,
        f"the ingest of {dataset} to finish",
    )


def test_a_dataset_added_after_the_stack_serves_is_ingested(tmp_path):
    saved = dict(os.environ)
    try:
        with LocalStack(tmp_path, compute_workers=1) as stack:
            add_dataset(stack, "first", crop_volume(), tmp_path)
            first = _ingest_and_wait(stack, "first")  # the function has read the map
            assert (first.done, first.failed) == (first.total, 0)

            add_dataset(stack, "second", crop_volume(), tmp_path)
            second = _ingest_and_wait(stack, "second")
            assert (second.done, second.failed, second.broken) == (second.total, 0, None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
