"""Per-id state from recorded facts on the local stack with the real compute path: the
lookup, on_edit and compute_chunk under functions-framework, the Bigtable and Pub/Sub
emulators and the local Cloud Tasks dispatcher (issue 20, item 3).

- an edit published as PCG publishes it, whose chunk's segmentation file is gone: its new
  id reads ``failed`` with the worker's reason and the operation id (the wait ends at a
  state check, not after 15 minutes of "pending by an edit");
- a bulk run (``start_ingest``, the tasks the CLI enqueues) with one chunk file missing:
  that chunk's ids read ``failed`` with the run and reason; once a later run computed the
  chunk they read ``computed`` and the chunk's ``chunkfail:`` row is gone.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import requests
from google.cloud import pubsub_v1
from stackutil import CHUNK, crop_stack, wait_for

from l2cache.compute import chunk_id, load_chunk_l2
from l2cache.gcp.bigtable import read_rows
from l2cache.store.ledger import chunk_failure_key
from l2cache_ops.ingest import start_ingest
from l2cache_ops.status import run_status
from l2cache_tools.dataset import apply_merge, publish_edit
from l2cache_tools.dataset.edits import pick_merge
from l2cache_tools.local.stack import EDITS_TOPIC, PROJECT

DS = "facts_stack"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with crop_stack(tmp_path_factory.mktemp(DS), DS) as made:
        yield made


def chunk_file(env, coords) -> str:
    lo = np.asarray(coords) * np.asarray(CHUNK)
    box = "_".join(f"{a}-{b}" for a, b in zip(lo.tolist(), (lo + CHUNK).tolist(), strict=True))
    path = env["built"].segmentation.removeprefix("file://") + f"/16.0_16.0_40.0/{box}.gz"
    assert os.path.exists(path), path
    return path


def ask(env, l2ids, **params) -> requests.Response:
    r = requests.post(
        env["url"], json={"l2_ids": [int(v) for v in l2ids]}, params=params, timeout=90
    )
    assert r.status_code == 200, r.text
    return r


def finished(env, run_id: str):
    cfg = env["config"]

    def status():
        s = run_status(
            env["ctx"].ledger,
            run_id,
            max_attempts=cfg.tasks.max_attempts,
            attempt_deadline_s=cfg.tasks.attempt_deadline_s,
        )
        return s.finished and s

    return wait_for(status, 180, f"run {run_id} to finish")


def test_an_edit_whose_chunk_file_is_gone_reads_failed_by_its_operation(env, tmp_path):
    ctx = env["ctx"]
    coords = (1, 1, 0)
    graph = env["instance"].table(DS)
    a, b = pick_merge(ctx.dataset, graph, coords)
    merge = apply_merge(graph, ctx.dataset, a, b)
    (node,) = merge.new_l2_ids.tolist()
    path = chunk_file(env, coords)
    shutil.copy(path, tmp_path / "gone.bak")
    publisher = pubsub_v1.PublisherClient()
    try:
        os.remove(path)
        publish_edit(publisher, publisher.topic_path(PROJECT, EDITS_TOPIC), DS, merge)
        # update_cache=false: only on_edit works on the id; the wait ends once it failed
        r = ask(env, [node], state="true", wait="30", update_cache="false")
    finally:
        shutil.copy(tmp_path / "gone.bak", path)
    state = r.json()["state"][str(node)]
    assert r.headers["X-L2Cache-Wait"] == "settled", state
    assert state["state"] == "failed", state
    assert "segmentation file missing" in state["reason"]
    assert state["by"]["queue"] == "edit"
    assert state["by"]["operation_id"] == merge.operation_id
    assert state["by"]["event"] == f"op-{merge.operation_id}"
    assert state["by"]["run"].startswith(f"edit_stream-{DS}-")
    # the wait stopped at a state check (2, 4 or 8 s in), not at the 30 s cap
    assert int(r.headers["X-L2Cache-Waited-Ms"]) < 30_000


def test_a_bulk_runs_failed_chunk_reads_failed_until_a_later_run_computes_it(env, tmp_path):
    ctx = env["ctx"]
    coords = (1, 0, 1)
    ids = load_chunk_l2(ctx, coords, None).l2_ids[:3]
    other = load_chunk_l2(ctx, (0, 0, 1), None).l2_ids[:2]
    cid = chunk_id(ctx, coords)
    path = chunk_file(env, coords)
    shutil.copy(path, tmp_path / "gone.bak")
    try:
        os.remove(path)
        run = start_ingest(env["config"], DS, batch=1)
        status = finished(env, run.run_id)
    finally:
        shutil.copy(tmp_path / "gone.bak", path)
    assert status.failed == 1, status.failures
    r = ask(env, [*ids.tolist(), *other.tolist()], state="true", update_cache="false")
    states = r.json()["state"]
    for node in ids.tolist():
        state = states[str(node)]
        assert state["state"] == "failed", state
        assert "segmentation file missing" in state["reason"]
        assert state["by"] == {"run": run.run_id, "kind": "bulk_ingest", "chunk": cid}
    for node in other.tolist():
        assert states[str(node)] == {"state": "computed"}
    assert int(r.headers["X-L2Cache-State-Reads"]) == 3  # guard, runs index, graph
    runs = ctx.ledger.table
    assert read_rows(runs, keys=[chunk_failure_key(DS, cid)])

    later = start_ingest(env["config"], DS, batch=1)  # the file is back
    assert finished(env, later.run_id).failed == 0
    assert not read_rows(runs, keys=[chunk_failure_key(DS, cid)])
    states = ask(env, ids, state="true", update_cache="false").json()["state"]
    assert {s["state"] for s in states.values()} == {"computed"}
