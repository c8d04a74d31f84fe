"""A dataset added to the map while the function runs is known without a restart, and
a task for a dataset the map does not have is rejected and recorded against its run.

Found by trying the local stack as a new operator: after ``local up``, ``dataset add``
then ``ingest`` left the run "1 pending" forever, the running function still holding
the map it read first and rejecting the task into its log only.
"""

from __future__ import annotations

import copy
import json

from test_compute_chunk_main import call

from l2cache.config import parse_config
from l2cache.store.ledger import RunLedger, new_run
from l2cache_ops.ledger import rejected_tasks

REGION = [0, 0, 0, 1, 1, 1]


def _run_of_new_dataset(bigtable, fn_map: dict) -> tuple[RunLedger, str, dict]:
    """A run of dataset ``added``, created by an operator whose map has it."""
    with_added = copy.deepcopy(fn_map)
    with_added["datasets"]["added"] = copy.deepcopy(fn_map["datasets"]["ds"])
    ledger = RunLedger(bigtable.table("l2cache_runs"))
    run = new_run("bulk_ingest", parse_config(with_added).dataset("added"), REGION, 1)
    ledger.create_run(run)
    return ledger, run.run_id, with_added


def _task(run_id: str) -> bytes:
    return json.dumps({"dataset": "added", "run_id": run_id, "region": REGION}).encode()


def test_a_dataset_added_to_the_map_is_known_without_a_restart(
    load_main, bigtable, fn_map, use_map
):
    use_map(fn_map)
    main = load_main("compute_chunk")
    ledger, run_id, with_added = _run_of_new_dataset(bigtable, fn_map)
    status, summary = call(main, _task(run_id))  # the map the function read first
    assert (status, summary["status"]) == (200, "rejected")
    assert "unknown dataset 'added'" in summary["error"]

    use_map(with_added)  # the operator adds the dataset; the function keeps running
    status, summary = call(main, _task(run_id))
    assert "unknown dataset" not in json.dumps(summary)
    assert summary.get("status") != "rejected"


def test_a_task_of_a_truly_unknown_dataset_is_rejected_and_recorded_on_its_run(
    load_main, bigtable, fn_map, use_map
):
    """The runs table is the map's, not the dataset's: status can say why the run
    cannot finish ("rejected unread: unknown dataset ...") instead of "1 pending"."""
    use_map(fn_map)
    main = load_main("compute_chunk")
    ledger, run_id, _ = _run_of_new_dataset(bigtable, fn_map)
    for retry_count in ("0", "1"):  # permanent: 2xx on every attempt, one record
        status, summary = call(main, _task(run_id), {"X-CloudTasks-TaskRetryCount": retry_count})
        assert (status, summary["status"]) == (200, "rejected")
    [reason] = rejected_tasks(ledger, run_id)
    assert "unknown dataset 'added'" in reason and "known: ds, theirs" in reason


def test_an_unknown_dataset_without_a_run_is_rejected_and_logged(
    load_main, bigtable, config_path, caplog
):
    status, summary = call(load_main("compute_chunk"), _task("no-such-run"))
    assert (status, summary["status"]) == (200, "rejected")
    assert "no run 'no-such-run'" in caplog.text
