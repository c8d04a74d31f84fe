"""Forged and invalid task bodies: refused before anything is written, counted once on
their run, never turning a finished run "broken" (docs/design.md, "The failure contract").

The real compute_chunk function under functions-framework, against the Bigtable
emulator. Two runs of dataset ``ds``: a finished bulk run over ``[0,0,0,2,2,2]`` (its 8
chunks done, as the ledger records a finished run) and an edit-stream run. Each case
is a row of a table: a body (built against those runs), the words of the refusal and
whether a run can record it. Every answer must be 200 ``rejected``; the cache tables
stay empty; each recorded body is counted once (a repeat counts nothing); the finished
run's status is the same as before (not broken) and bounded in time and memory, even
with a gave-up record naming a region far outside the run.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import pytest
import requests
import yaml

from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.gcp.bigtable import bigtable_instance, read_rows
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import RunLedger, create_runs_table, new_run
from l2cache_ops import status as status_mod
from l2cache_ops.status import run_status
from l2cache_tools.local.functions import start_function

PROJECT = "taskabuse"
INSTANCE = "inst"
BITS = {1: 10, 2: 10, 3: 9}
RUN_REGION = [0, 0, 0, 2, 2, 2]
YEAR_3084_MS = 2**45 - 1


def _dataset(cache_table: str) -> dict:
    return {
        "segmentation": "file:///nowhere/sv",
        "graph": {"kind": "bigtable", "project": PROJECT, "instance": INSTANCE, "table_id": "g"},
        "cache_table_id": cache_table,
        "resolution": [16, 16, 40],
        "voxel_offset": [0, 0, 0],
        "chunk_size": [96, 96, 48],
        "volume_size": [96 * 8, 96 * 8, 48 * 8],
        "spatial_bits": BITS,
    }


CONFIG = {
    "bigtable": {"project": PROJECT, "instance": INSTANCE},
    "runs_table_id": "abuse_runs",
    "datasets": {"ds": _dataset("abuse_cache_ds"), "other": _dataset("abuse_cache_other")},
}
DS = parse_config(CONFIG).dataset("ds")


@pytest.fixture(scope="module")
def stack(bigtable_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("taskabuse")
    (tmp / "l2cache.yaml").write_text(yaml.safe_dump(CONFIG))
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    caches = [create_cache_table(instance, t) for t in ("abuse_cache_ds", "abuse_cache_other")]
    ledger = RunLedger(create_runs_table(instance, "abuse_runs"))
    bulk = new_run("bulk_ingest", DS, RUN_REGION, 8)
    ledger.create_run(bulk)
    for x, y, z in np.ndindex(2, 2, 2):  # finished: every chunk done
        cid = int(idlib.chunk_id_from_coords(2, np.array([[x, y, z]]), DS.spatial_bits)[0])
        ledger.chunk_finished(bulk, cid, [x, y, z], "done", l2_count=3, duration_s=0.1)
    stream = new_run("edit_stream", DS, trigger="pubsub")
    ledger.create_run(stream)
    fn = start_function(
        "compute_chunk",
        {"L2CACHE_CONFIG": str(tmp / "l2cache.yaml"), **bigtable_emulator.env},
        log_dir=tmp,
    )
    yield {
        "url": f"http://{fn.host}/",
        "ledger": ledger,
        "bulk": bulk,
        "stream": stream,
        "caches": caches,
    }
    fn.stop()


def region(run, **fields) -> dict:
    return {"dataset": "ds", "run_id": run.run_id, "region": [0, 0, 0, 1, 1, 1], **fields}


def span(run, **fields) -> dict:
    return {"kind": "span", "dataset": "ds", "run_id": run.run_id, "start": 0, "stop": 1,
            "batch": 1, **fields}  # fmt: skip


def chunks_task(run, **fields) -> dict:
    return {"kind": "chunks", "dataset": "ds", "run_id": run.run_id, "chunks": [[0, 0, 0]],
            **fields}  # fmt: skip


def ids_task(run, **fields) -> dict:
    node = int(
        idlib.encode_ids(2, np.array([[1, 1, 1]]), np.array([5], np.uint64), DS.spatial_bits)[0]
    )
    return {"kind": "ids", "dataset": "ds", "run_id": run.run_id, "event_key": "op-1",
            "chunk": [1, 1, 1], "ids": [node], "at_ms": int(time.time() * 1000), **fields}  # fmt: skip


# (name, body builder (bulk run, stream run) -> JSON value or raw bytes, words, which run
# records it: "bulk", "stream" or None when no run can be known)
CASES = [
    ("other dataset", lambda b, s: region(b, dataset="other"), "run", "bulk"),
    ("region outside", lambda b, s: region(b, region=[4, 4, 4, 5, 5, 5]), "not inside", "bulk"),
    ("region partly outside", lambda b, s: region(b, region=[1, 1, 1, 3, 3, 3]), "not inside", "bulk"),
    ("huge region", lambda b, s: region(b, region=[0, 0, 0, 1000, 1000, 1000]), "not inside", "bulk"),
    ("region beyond ids", lambda b, s: region(b, region=[0, 0, 0, 10**6, 1, 1]), "does not fit", "bulk"),
    ("region of 10**30", lambda b, s: region(b, region=[0, 0, 0, 10**30, 10**30, 10**30]), "does not fit", "bulk"),
    ("negative region", lambda b, s: region(b, region=[-1, 0, 0, 1, 1, 1]), "region must be", "bulk"),
    ("bool region", lambda b, s: region(b, region=[False, 0, 0, True, 1, 1]), "region must be", "bulk"),
    ("float region", lambda b, s: region(b, region=[0.0, 0, 0, 1, 1, 1]), "region must be", "bulk"),
    ("empty region", lambda b, s: region(b, region=[1, 1, 1, 1, 1, 1]), "region must be", "bulk"),
    ("string region", lambda b, s: region(b, region="all"), "region must be", "bulk"),
    ("batch 0", lambda b, s: region(b, batch=0), "batch", "bulk"),
    ("batch bool", lambda b, s: region(b, batch=True), "batch", "bulk"),
    ("span beyond n_chunks", lambda b, s: span(b, stop=9), "exceeds the run's 8", "bulk"),
    ("span of 2**63", lambda b, s: span(b, stop=2**63), "exceeds", "bulk"),
    ("span negative", lambda b, s: span(b, start=-5), "0 <= start < stop", "bulk"),
    ("span float", lambda b, s: span(b, start=0.5), "0 <= start < stop", "bulk"),
    ("span t0 in 3084", lambda b, s: span(b, t0_ms=YEAR_3084_MS), "t0_ms", "bulk"),
    ("span on a stream run", lambda b, s: span(s), "ids tasks are for stream runs", "stream"),
    ("region on a stream run", lambda b, s: region(s), "ids tasks are for stream runs", "stream"),
    ("chunks outside", lambda b, s: chunks_task(b, chunks=[[0, 0, 0], [2, 0, 0]]), "not inside", "bulk"),
    ("chunks repeated", lambda b, s: chunks_task(b, chunks=[[0, 0, 0], [0, 0, 0]]), "distinct", "bulk"),
    ("65 chunks", lambda b, s: chunks_task(b, chunks=[[0, 0, i] for i in range(65)]), "1 to 64", "bulk"),
    ("no chunks", lambda b, s: chunks_task(b, chunks=[]), "1 to 64", "bulk"),
    ("bool chunk", lambda b, s: chunks_task(b, chunks=[[True, 0, 0]]), "triples", "bulk"),
    ("chunks on a stream run", lambda b, s: chunks_task(s), "ids tasks are for stream runs", "stream"),
    ("ids on a bulk run", lambda b, s: ids_task(b), "ids tasks are for stream runs", "bulk"),
    ("ids at_ms in 3084", lambda b, s: ids_task(s, at_ms=YEAR_3084_MS), "outside the run's window", "stream"),
    ("ids at_ms an hour ahead", lambda b, s: ids_task(s, at_ms=int(time.time() * 1000) + 3_600_000), "outside the run's window", "stream"),
    ("ids at_ms in 1970", lambda b, s: ids_task(s, at_ms=1000), "outside the run's window", "stream"),
    ("ids at_ms bool", lambda b, s: ids_task(s, at_ms=True), "at_ms", "stream"),
    ("ids of another chunk", lambda b, s: ids_task(s, chunk=[0, 0, 0]), "another chunk", "stream"),
    ("ids chunk outside", lambda b, s: ids_task(s, chunk=[9, 9, 9]), "outside the volume", "stream"),
    ("ids other dataset", lambda b, s: ids_task(s, dataset="other"), "run", "stream"),
    ("ids huge event key", lambda b, s: ids_task(s, event_key="k" * 5000), "event_key", "stream"),
    ("unknown kind", lambda b, s: region(b, kind="explode"), "unknown task kind", None),
    ("kind a list", lambda b, s: region(b, kind=[1]), "unknown task kind", None),
    ("rollback of bad chunks", lambda b, s: {"kind": "rollback", "dataset": "ds", "run_id": b.run_id, "chunks": [1]}, "layer-2", "bulk"),
    ("rollback other dataset", lambda b, s: {"kind": "rollback", "dataset": "other", "run_id": b.run_id, "chunks": [1]}, "belongs to dataset", "bulk"),
    ("run_id a number", lambda b, s: region(b, run_id=7), "needs string", None),
    ("run_id huge", lambda b, s: region(b, run_id="r" * 10_000), "run_id must be", None),
    ("unknown run", lambda b, s: region(b, run_id="no-such-run"), "no run", None),
    ("dataset null", lambda b, s: region(b, dataset=None), "needs string", None),
    ("not JSON", lambda b, s: b"{not json", "not JSON", None),
    ("a JSON array", lambda b, s: b"[1, 2]", "JSON object", None),
    ("deep nesting", lambda b, s: b"[" * 100_000, "not JSON", None),
    ("10**5000", lambda b, s: b'{"dataset": "ds", "run_id": "x", "region": [' + b"9" * 5000 + b"]}", "not JSON", None),
]  # fmt: skip


def refused_count(stack, run) -> int:
    return status_mod.refusals(stack["ledger"], run.run_id)[0]


def post(stack, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        stack["url"], data=data, headers={"Content-Type": "application/json"}, timeout=60
    )


@pytest.mark.parametrize(
    ("name", "build", "words", "recorded_on"), CASES, ids=[c[0] for c in CASES]
)
def test_a_forged_task_is_refused_recorded_once_and_writes_nothing(
    stack, name, build, words, recorded_on
):
    bulk, stream = stack["bulk"], stack["stream"]
    before = {r: refused_count(stack, run) for r, run in (("bulk", bulk), ("stream", stream))}
    body = build(bulk, stream)
    for _ in range(2):  # a repeat of the same body is refused again and counted nothing
        answer = post(stack, body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "rejected", answer.text
        assert words in answer.json()["error"], answer.json()["error"]
        assert len(answer.json()["error"]) <= 500
    after = {r: refused_count(stack, run) for r, run in (("bulk", bulk), ("stream", stream))}
    expected = {r: before[r] + (r == recorded_on) for r in before}
    assert after == expected
    for table in stack["caches"]:
        assert read_rows(table) == {}  # nothing written to any cache table


def test_the_finished_run_stays_finished_and_its_status_bounded(stack, monkeypatch):
    """After every forged body (this test runs after the table) and an old gave-up
    record naming a region far outside the run, status is the finished run's status,
    not broken, with the refusals counted and the latest reason; a huge gave-up record
    of a huge run is read at most MAX_EXPANDED chunks by key, counted within the run."""
    ledger, bulk = stack["ledger"], stack["bulk"]
    ledger.task_gave_up(bulk.run_id, [0, 0, 0, 10**6, 10**6, 10**6], "forged, pre-validation", 3)
    tracemalloc.start()
    st = run_status(ledger, bulk.run_id, bits=DS.spatial_bits)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (st.done, st.failed, st.total, st.broken) == (8, 0, 8, None) and st.finished
    assert st.refused >= sum(c[3] == "bulk" for c in CASES) and st.refused_latest
    assert peak < 50 * 2**20  # memory, not time: bounded whatever the forged region

    huge = new_run("bulk_ingest", DS, [0, 0, 0, 1000, 1000, 1000], 10**9)
    ledger.create_run(huge)
    ledger.task_gave_up(huge.run_id, [0, 0, 0, 1000, 1000, 1000], "split gave up", 3)
    monkeypatch.setattr(status_mod, "MAX_EXPANDED", 2_000)
    tracemalloc.start()
    st = run_status(ledger, huge.run_id, bits=DS.spatial_bits)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert st.failed == 10**9 and st.total == 10**9 and st.broken is None
    assert len(st.failures) == status_mod.SHOW_FAILURES
    assert peak < 100 * 2**20
