"""The local stack end to end: real emulators, functions over HTTP, Cloud Tasks, Pub/Sub."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import requests
import stackutil
from google.cloud import pubsub_v1
from stackutil import RES, add_dataset, crop_volume, expected_cells, pull_dead_letters, wait_for

from l2cache.compute import compute_chunk, dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.domain import ids
from l2cache.engine.features import compute_features
from l2cache.store.ledger import new_run
from l2cache_ops.ingest import start_ingest
from l2cache_ops.ledger import chunk_rows
from l2cache_ops.status import run_status
from l2cache_tools.dataset import apply_merge, apply_split, publish_edit
from l2cache_tools.dataset.edits import pick_merge, pick_split
from l2cache_tools.local.stack import DEAD_LETTER_TOPIC, EDITS_TOPIC, PROJECT, LocalStack

DATASET = "pinky_test"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    saved = dict(os.environ)
    directory = tmp_path_factory.mktemp("stack")
    with LocalStack(directory, compute_workers=2) as st:
        made = add_dataset(st, DATASET, crop_volume(), directory)
        config = load_config(st.config_path)
        yield {
            "stack": st,
            "config": config,
            "ctx": dataset_context(config, DATASET),
            "instance": made["instance"],
            "built": made["built"],
        }
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def ingested(stack):
    run = start_ingest(stack["config"], DATASET, batch=2)
    status = wait_for(
        lambda: (s := run_status(stack["ctx"].ledger, run.run_id)).finished and s,
        120,
        "the ingest to finish",
    )
    return run, status


def test_full_ingest_equals_direct_computation_byte_for_byte(stack, ingested):
    run, status = ingested
    assert status.total == 8 and status.done == 8 and status.failed == 0
    ctx = stack["ctx"]
    expected = {}
    for x in range(2):
        for y in range(2):
            for z in range(2):
                expected.update(expected_cells(ctx, run, (x, y, z)))
    assert len(expected) == stack["built"].n_l2
    raw = ctx.store.read_raw(np.array(list(expected), dtype=np.uint64))
    assert set(raw) == set(expected)
    lineage = ctx.store.read_lineage(np.array(list(expected), dtype=np.uint64))
    for node, cells in expected.items():
        assert raw[node]["0"] == cells, node
        assert set(raw[node]) == {"0"}  # lineage is in the chunk's lineage row
        assert lineage[node][b"run"] == run.run_id.encode()
    assert status.l2_rows == len(expected)


def test_task_delivered_twice_leaves_identical_bytes_and_counts_once(stack, ingested):
    ctx = stack["ctx"]
    run = new_run("region_reprocess", ctx.dataset, [1, 1, 1, 2, 2, 2], 1)
    ctx.ledger.create_run(run)
    first = compute_chunk(ctx, run, [1, 1, 1])
    ids_written = list(expected_cells(ctx, run, (1, 1, 1)))
    before = ctx.store.read_raw(np.array(ids_written, dtype=np.uint64))
    second = compute_chunk(ctx, run, [1, 1, 1])  # the same task again
    assert first["status"] == second["status"] == "done"
    assert ctx.store.read_raw(np.array(ids_written, dtype=np.uint64)) == before
    status = run_status(ctx.ledger, run.run_id)
    assert status.done == 1 and status.total == 1
    (row,) = chunk_rows(ctx.ledger, run.run_id)
    assert row["attempts"] == 2
    # delivered through the function: a done chunk is skipped, not recomputed
    url = stack["stack"].urls["compute_chunk"]
    body = {"dataset": DATASET, "run_id": run.run_id, "region": [1, 1, 1, 2, 2, 2]}
    r = requests.post(url, json=body, timeout=60)
    assert r.status_code == 200 and r.json()["chunks"][0]["status"] == "skipped"
    assert chunk_rows(ctx.ledger, run.run_id)[0]["attempts"] == 2


def test_bad_tasks_are_rejected_with_2xx_so_cloud_tasks_stops(stack):
    """Permanent by the failure contract: Cloud Tasks retries every non-2xx answer."""
    url = stack["stack"].urls["compute_chunk"]
    cases = [
        (b"nope", "not JSON"),
        (b'{"dataset": "nope", "run_id": "x", "region": [0, 0, 0, 1, 1, 1]}', "unknown dataset"),
        (b'{"dataset": "%s", "run_id": "x", "region": [0, 0]}' % DATASET.encode(), "no run"),
        (
            b'{"dataset": "%s", "run_id": "no-such-run", "region": [0, 0, 0, 1, 1, 1]}'
            % DATASET.encode(),
            "no run",
        ),
    ]
    for body, words in cases:
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 200, (body, r.status_code)
        assert r.json()["status"] == "rejected" and words in r.json()["error"], r.json()


def lookup(stack, l2ids):
    return stackutil.lookup(stack["stack"], DATASET, l2ids)


def cache_row_keys(stack) -> set[int]:
    table = stack["instance"].table("l2cache_pinky_test_v1")
    # feature rows only: the chunks' lineage rows (lineage#...) sit beside them
    return {int(r.row_key) for r in table.read_rows() if r.row_key.isdigit()}


def test_edits_make_exactly_the_new_l2_ids_appear(stack, ingested):
    ctx = stack["ctx"]
    graph_table = stack["instance"].table(DATASET)
    before = cache_row_keys(stack)
    a, b = pick_merge(ctx.dataset, graph_table, (0, 0, 0))
    merge = apply_merge(graph_table, ctx.dataset, a, b)
    split = apply_split(graph_table, ctx.dataset, pick_split(ctx.dataset, graph_table, (1, 0, 0)))
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(PROJECT, EDITS_TOPIC)
    for result in (merge, split):
        publish_edit(publisher, topic, DATASET, result)
    new_ids = set(merge.new_l2_ids.tolist()) | set(split.new_l2_ids.tolist())
    found = wait_for(
        lambda: (d := lookup(stack, new_ids)) and all(d.values()) and d,
        60,
        "on_edit to write the new L2 nodes",
    )
    assert cache_row_keys(stack) - before == new_ids
    # the values are those of a direct computation at the edit's graph state
    chunk = load_chunk_l2(ctx, (0, 0, 0), None)
    direct = compute_features(chunk.labels, RES, only=merge.new_l2_ids)
    (node,) = merge.new_l2_ids.tolist()
    assert found[node]["size_nm3"] == int(direct["size_nm3"][0]) * 16 * 16 * 40
    assert found[node]["area_nm2"] == int(direct["area_nm2"][0])


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_poison_and_malicious_messages_are_dead_lettered_and_service_continues(
    stack, ingested, tmp_path
):
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(PROJECT, EDITS_TOPIC)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"operation_id": 1, "new_lvl2_ids": [_Exploit(str(marker))]})
    publisher.publish(topic, evil, table_id=DATASET).result(timeout=30)
    publisher.publish(topic, b"\x00garbage", table_id=DATASET).result(timeout=30)
    letters = pull_dead_letters(2)
    reasons = sorted(m.attributes["dead_letter_reason"] for m in letters)
    assert any("not allowed" in r for r in reasons), reasons
    assert any("not a decodable pickle" in r for r in reasons), reasons
    assert not marker.exists(), "the malicious pickle was executed"
    # the function keeps serving: a missing-id message for an uncached node is processed
    ctx = stack["ctx"]
    graph_table = stack["instance"].table(DATASET)
    a, b = pick_merge(ctx.dataset, graph_table, (1, 1, 0))
    merge = apply_merge(graph_table, ctx.dataset, a, b)
    missing_topic = publisher.topic_path(PROJECT, "l2cache-missing-ids")
    data = merge.new_l2_ids.astype("<u8").tobytes()
    publisher.publish(
        missing_topic, data, table_id=DATASET, l2_cache_id="l2cache_pinky_test_v1"
    ).result(timeout=30)
    wait_for(
        lambda: all(lookup(stack, merge.new_l2_ids).values()),
        60,
        "the missing id to be computed after the poison messages",
    )
    assert DEAD_LETTER_TOPIC


def test_edit_recompute_reads_each_chunk_once(stack, ingested):
    ctx = stack["ctx"]
    graph_table = stack["instance"].table(DATASET)
    split = apply_split(graph_table, ctx.dataset, pick_split(ctx.dataset, graph_table, (0, 1, 1)))
    from l2cache.handlers.on_edit import handle_message
    from l2cache_tools.dataset.edits import edit_message

    data, attrs = edit_message(DATASET, split)
    extra = ids.encode_ids(1, [[0, 1, 1]], 3, ctx.dataset.spatial_bits)  # not layer 2
    result = handle_message(stack["config"], data, attrs, "direct-1")
    assert result["status"] == "ok"
    assert result["chunks_read"] == 1 and result["written"] == 2
    assert extra.size == 1


def test_rollback_restores_the_previous_run(stack, ingested):
    from l2cache_ops.rollback import rollback_run

    first, _ = ingested
    ctx = stack["ctx"]
    time.sleep(0.01)
    again = new_run("region_reprocess", ctx.dataset, [0, 1, 0, 1, 2, 1], 1)
    ctx.ledger.create_run(again)
    compute_chunk(ctx, again, [0, 1, 0])
    nodes = np.array(list(expected_cells(ctx, first, (0, 1, 0))), dtype=np.uint64)
    raw = ctx.store.read_raw(nodes)
    assert {r[b"run"] for r in ctx.store.read_lineage(nodes).values()} == {again.run_id.encode()}
    touched = rollback_run(ctx.store.table, again)
    assert touched == nodes.size
    raw_after = ctx.store.read_raw(nodes)
    assert {r[b"run"] for r in ctx.store.read_lineage(nodes).values()} == {first.run_id.encode()}
    assert all(raw_after[n]["0"] == raw[n]["0"] for n in raw)  # same inputs, same bytes


def test_status_runs_and_reconcile_commands(stack, ingested, capsys):
    from l2cache_tools.cli import main

    run, _ = ingested
    cfg = str(stack["stack"].config_path)
    assert main(["status", DATASET, run.run_id, "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert f"run {run.run_id}: 8/8 done, 0 failed" in out
    assert out.count("cost: $") == 1  # one cost figure, with its breakdown
    assert main(["runs", "list", DATASET, "--config", cfg]) == 0
    listed = capsys.readouterr().out
    assert run.run_id in listed and "done=8/8 failed=0" in listed
    assert main(["runs", "show", DATASET, run.run_id, "--config", cfg]) == 0
    shown = capsys.readouterr().out
    assert "params_hash" in shown and "code_revision" in shown
    assert main(["reconcile", DATASET, run.run_id, "--config", cfg]) == 0
    assert "re-queued 0 failed, retrying or lost chunks" in capsys.readouterr().out
