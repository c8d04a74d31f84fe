"""The compute_chunk entry point under the failure contract, request in, answer out.

Cloud Tasks retries every non-2xx answer, so a task that can never succeed (not JSON,
keys missing, unknown dataset or run, a table l2cache does not write) must answer 2xx
with ``{"status": "rejected"}``, and a transient failure 503 until the last attempt
(known from ``X-CloudTasks-TaskRetryCount``), which answers 200. Every answer is JSON.
The cases that need the runs table use the real Bigtable emulator.
"""

from __future__ import annotations

import json

import flask
import pytest

REGION = [0, 0, 0, 1, 1, 1]


@pytest.fixture
def main(load_main, config_path):
    return load_main("compute_chunk")


def call(main, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST ``body`` as Cloud Tasks would; (status, parsed JSON) after checking the type."""
    app = flask.Flask(__name__)
    with app.test_request_context(
        "/",
        method="POST",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    ):
        text, status, response_headers = main.compute_chunk(flask.request)
    assert response_headers == {"Content-Type": "application/json"}
    return status, json.loads(text)


def task(**fields) -> bytes:
    return json.dumps({"dataset": "ds", "run_id": "run-1", "region": REGION, **fields}).encode()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "task body is not JSON"),
        (b"\xff\xfe\x00", "task body is not JSON"),
        (b"", "task body is not JSON"),
        (b"[1, 2, 3]", "must be a JSON object"),
        (b'{"run_id": "run-1", "region": [0, 0, 0, 1, 1, 1]}', "needs string 'dataset'"),
        (b'{"dataset": "ds", "region": [0, 0, 0, 1, 1, 1]}', "needs string 'dataset' and 'run_id'"),
        (b'{"dataset": 7, "run_id": "run-1"}', "needs string 'dataset'"),
        (task(dataset="nope"), "unknown dataset"),
    ],
)
def test_a_task_that_can_never_succeed_answers_2xx_rejected(main, body, words):
    """No Bigtable needed: the body alone decides, and Cloud Tasks must stop retrying."""
    status, summary = call(main, body)
    assert status == 200
    assert summary["status"] == "rejected"
    assert words in summary["error"]


def test_rejected_on_every_attempt_whatever_the_retry_count(main, fn_map):
    last = fn_map["tasks"]["max_attempts"] - 1
    for retry_count in ("0", str(last), str(last + 5), "not-a-number"):
        status, summary = call(main, b"{", {"X-CloudTasks-TaskRetryCount": retry_count})
        assert (status, summary["status"]) == (200, "rejected")


def test_unknown_run_and_existing_cache_table_are_rejected(main, bigtable):
    status, summary = call(main, task(run_id="no-such-run"))
    assert (status, summary["status"]) == (200, "rejected")
    assert "no run 'no-such-run'" in summary["error"]
    status, summary = call(main, task(dataset="theirs"))
    assert (status, summary["status"]) == (200, "rejected")
    assert "existing cache table (their_cache)" in summary["error"]


def test_a_missing_runs_table_is_permanent_on_every_attempt(load_main, bigtable, fn_map, use_map):
    """The runs table does not exist: NotFound is permanent (the failure contract), so
    2xx ``rejected`` with the reason on every attempt, never a 503 retry loop (it was
    503 until the queue's last attempt)."""
    fn_map["runs_table_id"] = "no_such_runs_table"
    use_map(fn_map)
    main = load_main("compute_chunk")
    last = fn_map["tasks"]["max_attempts"] - 1
    for retry_count in (None, "0", str(last - 1), str(last)):
        headers = {} if retry_count is None else {"X-CloudTasks-TaskRetryCount": retry_count}
        status, summary = call(main, task(), headers)
        assert (status, summary["status"]) == (200, "rejected"), retry_count
        assert "NotFound" in summary["error"]


def test_a_split_on_a_map_without_a_queue_is_rejected_and_recorded(
    load_main, bigtable, fn_map, use_map
):
    """A region larger than a batch must be split onto the queue; with no ``tasks``
    section there is none, and no retry changes that: 2xx rejected, and the region is
    recorded as failed against the run so the run still ends (it was a 503 loop)."""
    from l2cache.config import load_config
    from l2cache.store.ledger import RunLedger, new_run
    from l2cache_ops.ledger import failed_tasks

    del fn_map["tasks"]
    path = use_map(fn_map)
    ledger = RunLedger(bigtable.table("l2cache_runs"))
    region = [0, 0, 0, 2, 2, 2]
    run = new_run("bulk_ingest", load_config(path).dataset("ds"), region, 8)
    ledger.create_run(run)
    main = load_main("compute_chunk")
    body = json.dumps({"dataset": "ds", "run_id": run.run_id, "region": region}).encode()
    status, summary = call(main, body)
    assert (status, summary["status"]) == (200, "rejected")
    assert "no 'tasks' section" in summary["error"]
    [failed] = failed_tasks(ledger, run.run_id)
    assert failed["region"] == region and "no 'tasks' section" in failed["error"]
