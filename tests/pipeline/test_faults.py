"""Faults through the real stack: every run ends, nothing is lost or silently wrong.

The local stack (Bigtable and Pub/Sub emulators, the extended Cloud Tasks emulator, the
three functions under functions-framework) with max 3 attempts per task, on a real
pinky40 crop of 2x2x2 chunks. Each test states which part of the failure contract
(``l2cache.domain.failures``) it exercises.
"""

from __future__ import annotations

import base64
import gzip
import os
import pickle
import shutil
import signal
import subprocess

import numpy as np
import pytest
import requests
from google.cloud import pubsub_v1
from stackutil import (
    CHUNK,
    RES,
    add_dataset,
    crop_volume,
    find_event,
    lookup,
    pull_dead_letters,
    wait_for,
    wait_tasks_gone,
)

from l2cache.compute import chunk_id, dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.domain import ids as idlib
from l2cache.engine.features import compute_features
from l2cache.handlers.compute_chunk import handle_task
from l2cache.store.ledger import new_run
from l2cache_ops.ingest import start_ingest
from l2cache_ops.ledger import chunk_rows, ignored_count
from l2cache_ops.status import run_status
from l2cache_tools.dataset.edits import apply_merge, edit_message, pick_merge
from l2cache_tools.local.stack import EDITS_TOPIC, PROJECT, LocalStack

DS = "faults"
MAX_ATTEMPTS = 3
ATTEMPT_DEADLINE_S = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    saved = dict(os.environ)
    directory = tmp_path_factory.mktemp("faults")
    with LocalStack(
        directory,
        compute_workers=2,
        max_attempts=MAX_ATTEMPTS,
        attempt_deadline_s=ATTEMPT_DEADLINE_S,
    ) as stack:
        made = add_dataset(stack, DS, crop_volume(), directory)
        config = load_config(stack.config_path)
        yield {
            "stack": stack,
            "config": config,
            "ctx": dataset_context(config, DS),
            "dir": directory,
            **made,
        }
    os.environ.clear()
    os.environ.update(saved)


def chunk_file(env, coords) -> str:
    lo = np.asarray(coords) * np.asarray(CHUNK)
    hi = lo + np.asarray(CHUNK)
    box = "_".join(f"{a}-{b}" for a, b in zip(lo.tolist(), hi.tolist(), strict=True))
    path = env["built"].segmentation.removeprefix("file://") + f"/16.0_16.0_40.0/{box}.gz"
    assert os.path.exists(path), path
    return path


def graph_l2_ids(env, coords) -> np.ndarray:
    """Every L2 id the graph table holds in one chunk (its keys form one range)."""
    from google.cloud.bigtable.row_set import RowSet

    bits = env["ctx"].dataset.spatial_bits
    first = int(idlib.chunk_id_from_coords(2, np.asarray(coords)[None], bits)[0])
    span = 1 << (64 - 8 - 3 * int(bits.bits_for(np.array([2]))[0]))
    rs = RowSet()
    rs.add_row_range_from_keys(idlib.row_key(first), idlib.row_key(first + span))
    table = env["instance"].table(DS)
    return np.array([int(r.row_key) for r in table.read_rows(row_set=rs)], dtype=np.uint64)


def finished(env, run_id: str, timeout: float = 120):
    cfg = env["config"]
    return wait_for(
        lambda: (
            (
                s := run_status(
                    env["ctx"].ledger,
                    run_id,
                    max_attempts=cfg.tasks.max_attempts,
                    attempt_deadline_s=cfg.tasks.attempt_deadline_s,
                )
            ).finished
            and s
        ),
        timeout,
        f"run {run_id} to finish",
    )


def test_corrupt_and_missing_chunk_files_fail_once_and_the_run_still_ends(env, tmp_path):
    corrupt, missing = chunk_file(env, (0, 0, 0)), chunk_file(env, (1, 0, 0))
    crashing = chunk_file(env, (0, 1, 0))
    for path, name in ((corrupt, "corrupt"), (missing, "missing"), (crashing, "crashing")):
        shutil.copy(path, tmp_path / f"{name}.bak")
    try:
        with open(corrupt, "wb") as f:
            f.write(b"\x1f\x8b" + os.urandom(300))  # gzip magic, garbage after it
        os.remove(missing)
        with open(crashing, "wb") as f:  # valid gzip, garbage inside: the decoder segfaults
            f.write(gzip.compress(os.urandom(4000), mtime=0))
        # one chunk per task: a crash takes no batch sibling with it (that case is
        # test_a_worker_crash_early_in_a_batch_still_ends_the_run)
        run = start_ingest(env["config"], DS, batch=1)
        status = finished(env, run.run_id, timeout=180)
        assert (status.done, status.failed, status.total) == (5, 3, 8), status.failures
        rows = {tuple(r["coords"]): r for r in chunk_rows(env["ctx"].ledger, run.run_id)}
        assert "corrupt" in rows[(0, 0, 0)]["error"]
        assert (
            "missing" in rows[(1, 0, 0)]["error"]
            and "graph has supervoxels" in rows[(1, 0, 0)]["error"]
        )
        # the worker died on every attempt: nothing could record it; status presumes it
        assert rows[(0, 1, 0)]["attempts"] == MAX_ATTEMPTS
        (crashed,) = [f for f in status.failures if f["chunk"] == [0, 1, 0]]
        assert crashed["status"] == "failed"
        assert crashed["error"].startswith(f"gave up after {MAX_ATTEMPTS} attempts: no answer")
        for c in ((0, 0, 0), (1, 0, 0)):  # permanent: one attempt, no retries, nothing written
            assert rows[c]["status"] == "failed" and rows[c]["permanent"] is True
            assert rows[c]["attempts"] == 1
            nodes = graph_l2_ids(env, c)
            assert nodes.size and not env["ctx"].store.read_raw(nodes)
        for c, r in rows.items():
            if c not in ((0, 0, 0), (1, 0, 0), (0, 1, 0)):
                assert r["status"] == "done" and r["orphan_sv"] == 0 and r["stray_ids"] == 0
    finally:
        for path, name in ((corrupt, "corrupt"), (missing, "missing"), (crashing, "crashing")):
            shutil.copy(tmp_path / f"{name}.bak", path)
    # once the input is repaired, reconcile finishes the run
    from l2cache_tools.cli import main

    assert main(["reconcile", DS, run.run_id, "--config", str(env["stack"].config_path)]) == 0
    wait_for(
        lambda: run_status(env["ctx"].ledger, run.run_id).done == 8, 120, "reconcile to finish"
    )


class FlakyGraph:
    """The real graph reader, failing its first ``failures`` calls like an unavailable
    Bigtable would (an exception that is not a PermanentError, so transient)."""

    def __init__(self, real, failures: int) -> None:
        self.real, self.left = real, failures

    def l2_parents(self, sv_ids, timestamp=None):
        if self.left:
            self.left -= 1
            raise ConnectionError("graph table unavailable (injected)")
        return self.real.l2_parents(sv_ids, timestamp)

    def has_supervoxels(self, coords, bits):
        return self.real.has_supervoxels(coords, bits)

    def chunk_supervoxels(self, coords, bits):
        return self.real.chunk_supervoxels(coords, bits)


def deliver(env, body: dict, attempt: int):
    headers = {"X-CloudTasks-TaskRetryCount": str(attempt - 1)}
    import json

    return handle_task(env["config"], json.dumps(body).encode(), headers)


def test_transient_failure_twice_then_success_and_exhaustion_is_recorded(env):
    ctx = env["ctx"]
    real = ctx.graph
    run = new_run("region_reprocess", ctx.dataset, [0, 1, 1, 1, 2, 2], 1)
    ctx.ledger.create_run(run)
    body = {"dataset": DS, "run_id": run.run_id, "region": [0, 1, 1, 1, 2, 2], "batch": 1}
    try:
        ctx.graph = FlakyGraph(real, failures=2)
        codes = [deliver(env, body, a)[0] for a in (1, 2, 3)]
        assert codes == [503, 503, 200]
        (row,) = chunk_rows(ctx.ledger, run.run_id)
        assert row["status"] == "done" and row["attempts"] == 3
        # the same chunk failing on every attempt: the last attempt records "gave up"
        again = new_run("region_reprocess", ctx.dataset, [0, 1, 1, 1, 2, 2], 1)
        ctx.ledger.create_run(again)
        body["run_id"] = again.run_id
        ctx.graph = FlakyGraph(real, failures=10)
        results = [deliver(env, body, a) for a in (1, 2, 3)]
        assert [r[0] for r in results] == [503, 503, 200]
        (row,) = chunk_rows(ctx.ledger, again.run_id)
        assert row["status"] == "failed" and row["permanent"] is False
        assert row["error"].startswith("gave up after 3 attempts: ConnectionError")
        status = run_status(ctx.ledger, again.run_id)
        assert status.finished and status.failed == 1 and status.retrying == 0
    finally:
        ctx.graph = real


def test_worker_killed_mid_run_loses_nothing(env):
    stack = env["stack"]
    master = next(p for p in stack.processes if p.name == "function:compute_chunk").process.pid
    run = start_ingest(env["config"], DS, batch=1)
    ledger = env["ctx"].ledger
    wait_for(
        lambda: any(r["status"] == "running" for r in chunk_rows(ledger, run.run_id)),
        60,
        "a chunk in flight",
        every=0.02,
    )
    children = subprocess.run(
        ["pgrep", "-P", str(master)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert children, "functions-framework has no worker processes"
    os.kill(int(children[0]), signal.SIGKILL)  # gunicorn starts a new worker
    status = finished(env, run.run_id)
    assert (status.done, status.failed) == (8, 0)
    # every chunk's nodes are in the cache with this run's lineage
    for x in range(2):
        for y in range(2):
            for z in range(2):
                nodes = load_chunk_l2(env["ctx"], (x, y, z), run.snapshot).l2_ids
                raw = env["ctx"].store.read_raw(nodes)
                assert set(raw) == set(nodes.tolist())
                runs = {r[b"run"] for r in env["ctx"].store.read_lineage(nodes).values()}
                assert runs == {run.run_id.encode()}


def test_tasks_delivered_three_times_compute_once(env):
    ctx = env["ctx"]
    url = env["stack"].urls["compute_chunk"]
    # a leaf task three times: computed once, the repeats skip it, identical bytes
    run = new_run("region_reprocess", ctx.dataset, [1, 1, 0, 2, 2, 1], 1)
    ctx.ledger.create_run(run)
    body = {"dataset": DS, "run_id": run.run_id, "region": [1, 1, 0, 2, 2, 1], "batch": 1}
    answers = [requests.post(url, json=body, timeout=60).json() for _ in range(3)]
    assert [a["chunks"][0]["status"] for a in answers] == ["done", "skipped", "skipped"]
    (row,) = chunk_rows(ctx.ledger, run.run_id)
    assert row["attempts"] == 1
    # a split task three times: its named sub-tasks are enqueued once (duplicates refused)
    split = new_run("bulk_ingest", ctx.dataset, [0, 0, 0, 2, 2, 2], 8)
    ctx.ledger.create_run(split)
    body = {"dataset": DS, "run_id": split.run_id, "region": [0, 0, 0, 2, 2, 2], "batch": 1}
    for _ in range(3):
        assert requests.post(url, json=body, timeout=60).json() == {"split": 8}
    status = finished(env, split.run_id)
    assert (status.done, status.failed) == (8, 0)
    # every task of those names has left the queue (succeeded): a duplicate, had one been
    # accepted, would be one of them, so it has run too by now
    wait_tasks_gone(split_task_names(env, split.run_id, body["region"], body["batch"]))
    assert all(r["attempts"] == 1 for r in chunk_rows(ctx.ledger, split.run_id))


def split_task_names(env, run_id: str, region, batch: int) -> list[str]:
    """Full names of the sub-tasks a split of ``region`` enqueues (generation 0); each
    is checked to be one the queue has seen (a new task of that name is refused)."""
    from l2cache.domain.regions import plan_task
    from l2cache.gcp.tasks import enqueue_region, queue_path, task_id, tasks_client

    cfg, client = env["config"].tasks, tasks_client()
    kind, parts = plan_task(region, batch)
    assert kind == "split"
    for part in parts:
        assert enqueue_region(client, cfg, DS, run_id, part, batch) is None
    return [f"{queue_path(client, cfg)}/tasks/{task_id(run_id, part)}" for part in parts]


def test_named_task_is_refused_a_second_time():
    from l2cache.gcp.tasks import enqueue_region, tasks_client

    cfg = load_config(os.environ["L2CACHE_CONFIG"]).tasks
    client = tasks_client()
    first = enqueue_region(client, cfg, DS, "no-run-dup", [0, 0, 0, 1, 1, 1], 1)
    second = enqueue_region(client, cfg, DS, "no-run-dup", [0, 0, 0, 1, 1, 1], 1)
    other_generation = enqueue_region(client, cfg, DS, "no-run-dup", [0, 0, 0, 1, 1, 1], 1, "r2")
    assert first and first.endswith("no-run-dup-g0-0-0-0-1-1-1")
    assert second is None and other_generation and other_generation != first


def push(env, data: bytes, attributes: dict, message_id: str, publish_time: str) -> int:
    """What a Pub/Sub push subscription POSTs to on_edit."""
    envelope = {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": attributes,
            "messageId": message_id,
            "publishTime": publish_time,
        },
        "subscription": f"projects/{PROJECT}/subscriptions/{EDITS_TOPIC}-on-edit",
    }
    url = f"{env['stack'].urls['on_edit']}/projects/{PROJECT}/topics/{EDITS_TOPIC}"
    return requests.post(url, json=envelope, timeout=60).status_code


def all_versions(env, node: int) -> dict:
    row = env["ctx"].store.table.read_row(idlib.row_key(node))
    return {
        fam: {col: [(c.timestamp, c.value) for c in cells] for col, cells in cols.items()}
        for fam, cols in row.cells.items()
    }


def test_edit_delivered_three_times_writes_one_version_and_one_event(env):
    ctx = env["ctx"]
    graph = env["instance"].table(DS)
    merge = apply_merge(graph, ctx.dataset, *pick_merge(ctx.dataset, graph, (0, 1, 0)))
    data, attrs = edit_message(DS, merge)
    from datetime import timedelta

    from l2cache.domain.lineage import utc_now

    when = (utc_now() + timedelta(seconds=2)).replace(microsecond=123000)
    stamp_text = when.strftime("%Y-%m-%dT%H:%M:%S.123456789Z")  # nanoseconds, as Pub/Sub
    codes = [push(env, data, attrs, "m-3x", stamp_text) for _ in range(3)]
    assert codes == [200, 200, 200]
    (node,) = merge.new_l2_ids.tolist()
    versions = all_versions(env, node)
    assert all(len(cells) == 1 for cells in versions["0"].values())  # one version only
    ((stamp, _),) = versions["0"][b"size_nm3"]
    assert stamp == when  # the publish time, to the millisecond
    _, event = find_event(ctx.ledger, DS, "edit_stream", f"op-{merge.operation_id}")
    assert event["delivery_count"] == 3 and event["written"] == 1 and event["status"] == "ok"
    assert event["chunks_skipped"] == 1  # the last delivery found the chunk already written


def test_poison_messages_are_dead_lettered_with_a_reason_and_good_ids_still_computed(env):
    ctx = env["ctx"]
    graph = env["instance"].table(DS)
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(PROJECT, EDITS_TOPIC)
    merge = apply_merge(graph, ctx.dataset, *pick_merge(ctx.dataset, graph, (1, 1, 1)))
    (good,) = merge.new_l2_ids.tolist()
    outside = int(idlib.encode_ids(2, [[7, 0, 0]], 5, ctx.dataset.spatial_bits)[0])
    edit = lambda ids: pickle.dumps({"operation_id": 9_000 + len(ids), "new_lvl2_ids": ids})  # noqa: E731
    sent = {
        "no table_id": (edit([good]), {}),
        "uncached table": (edit([good]), {"table_id": "another_graph"}),
        "wrong cache table": (
            np.array([good], "<u8").tobytes(),
            {"table_id": DS, "l2_cache_id": "someone_elses_table"},
        ),
        "no ids": (edit([]), {"table_id": DS}),
        "not ids": (pickle.dumps({"operation_id": 1, "new_lvl2_ids": "abc"}), {"table_id": DS}),
        "mixed": (edit([good, outside]), {"table_id": DS}),
    }
    ids = {
        publisher.publish(topic, data, **attrs).result(timeout=30) for data, attrs in sent.values()
    }
    letters = pull_dead_letters(
        5, settle=3.0, keep=lambda m: m.attributes.get("original_message_id") in ids
    )
    assert len(letters) == 5  # everything but the uncached table's edit
    reasons = {m.attributes["dead_letter_reason"]: m for m in letters}
    text = " | ".join(reasons)
    assert "no table_id" in text and "not the cache table" in text
    assert "names no L2 ids" in text and "not uint64 ids" in text
    partial = [m for r, m in reasons.items() if "could not be computed" in r]
    assert len(partial) == 1 and "outside the volume" in partial[0].attributes["dead_letter_reason"]
    assert np.frombuffer(partial[0].data, "<u8").tolist() == [outside]  # only the bad id
    wait_for(lambda: lookup(env["stack"], DS, [good])[good], 60, "the good id to be computed")
    from l2cache.handlers.on_edit import runs_ledger

    assert ignored_count(runs_ledger(env["config"]), "another_graph") == 1


def test_cli_user_errors_are_one_line_and_exit_2(env, capsys):
    from l2cache_tools.cli import main

    cfg = str(env["stack"].config_path)
    cases = [
        (["status", DS, "no-such-run", "--config", cfg], "no run 'no-such-run'"),
        (["status", "nope", "x", "--config", cfg], "unknown dataset 'nope'"),
        (["runs", "show", DS, "no-such-run", "--config", cfg], "no run"),
        (["ingest", DS, "--bbox", "1,2", "--config", cfg], "error:"),
        (["status", DS, "x", "--config", "/nonexistent.yaml"], "cannot read dataset map"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_edge_chunks_are_padded_with_background_like_the_existing_service(env):
    """A volume that is not a multiple of the chunk size: the last chunks are read as
    full chunks padded with background, and the stored values equal the reference's on
    that padded chunk (not on the clipped one)."""
    from reference_features import reference_features

    volume = crop_volume()[:90, :85, :44]
    made = add_dataset(env["stack"], "edge", volume, env["dir"])
    config = load_config(env["stack"].config_path)
    ctx = dataset_context(config, "edge")
    assert ctx.dataset.volume_size == (90, 85, 44)
    run = new_run("bulk_ingest", ctx.dataset, [0, 0, 0, 2, 2, 2], 8)
    ctx.ledger.create_run(run)
    from l2cache.compute import compute_chunk

    coords = (1, 1, 1)  # runs past the volume on all three axes
    assert compute_chunk(ctx, run, coords)["status"] == "done"
    chunk = load_chunk_l2(ctx, coords, run.snapshot)
    assert chunk.labels.shape == CHUNK
    lo = np.asarray(coords) * np.asarray(CHUNK)
    assert not chunk.labels[90 - lo[0] :, :, :].any() and not chunk.labels[:, :, 44 - lo[2] :].any()
    expected = reference_features(chunk.labels, RES)
    stored = ctx.store.read_features(np.array(list(expected), dtype=np.uint64))
    assert set(stored) == set(expected) and len(expected) > 0
    clipped = compute_features(chunk.labels[: 90 - lo[0], : 85 - lo[1], : 44 - lo[2]], RES)
    differs = 0
    for i, node in enumerate(clipped["l2id"].tolist()):
        ref = expected[node]
        assert stored[node]["area_nm2"] == int(ref["area_nm2"])
        assert stored[node]["max_dt_nm"] == int(ref["max_dt_nm"])
        assert stored[node]["chunk_intersect_count"] == ref["chunk_intersect_count"].tolist()
        differs += int(clipped["area_nm2"][i]) != int(ref["area_nm2"])
    assert differs > 0, "padding changed nothing: the test would not catch clipping"
    assert made["built"].n_l2 > 0


def test_messages_for_an_existing_cache_table_are_ignored_and_counted(env):
    """A table another service owns is served, never written: its edits are not ours."""
    import yaml

    from l2cache.config import parse_config
    from l2cache.handlers.on_edit import handle_message, runs_ledger

    raw = yaml.safe_load(env["stack"].config_path.read_text())
    raw["datasets"][DS]["existing_cache_table"] = True
    config = parse_config(raw, source="existing-table-map")
    before = ignored_count(runs_ledger(config), DS)
    data = pickle.dumps({"operation_id": 77, "new_lvl2_ids": [1]})
    result = handle_message(config, data, {"table_id": DS}, "existing-1")
    assert result["status"] == "ignored"
    assert ignored_count(runs_ledger(config), DS) == before + 1


def test_missing_ids_over_several_chunks_fan_out_one_task_per_chunk(env):
    """No message needs more than one chunk's work: on_edit enqueues, compute_chunk computes."""
    ctx = env["ctx"]
    picks = {c: load_chunk_l2(ctx, c, None).l2_ids[:2] for c in ((0, 0, 1), (1, 0, 1), (1, 1, 0))}
    ids = np.concatenate(list(picks.values()))
    before = {n: r["0"] for n, r in ctx.store.read_raw(ids).items()}
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(PROJECT, "l2cache-missing-ids")
    message_id = publisher.publish(
        topic, ids.astype("<u8").tobytes(), table_id=DS, l2_cache_id=ctx.dataset.cache_table_id
    ).result(timeout=30)
    key = f"msg-{message_id}"
    run, _ = wait_for(lambda: find_event(ctx.ledger, DS, "missing_ids", key), 60, "the event")
    chunks = wait_for(
        lambda: (
            (c := ctx.ledger.event_chunks(run.run_id, key))
            and len(c) == 3
            and all(v["status"] == "done" for v in c.values())
            and c
        ),
        90,
        "three chunk tasks to finish",
    )
    assert sum(v["written"] for v in chunks.values()) == ids.size
    _, event = find_event(ctx.ledger, DS, "missing_ids", key)
    assert event["status"] == "fanned_out" and event["chunks_enqueued"] == 3
    raw = ctx.store.read_raw(ids)
    assert {r[b"run"] for r in ctx.store.read_lineage(ids).values()} == {run.run_id.encode()}
    assert {n: r["0"] for n, r in raw.items()} == before  # same inputs, same bytes


# -- what a review found: each a way a run could fail to end or a failure go unrecorded --


def post_task(env, body: dict, attempt: int = 1):
    url = env["stack"].urls["compute_chunk"]
    headers = {"X-CloudTasks-TaskRetryCount": str(attempt - 1)}
    r = requests.post(url, json=body, headers=headers, timeout=60)
    return r.status_code, r.json()


def test_a_worker_crash_early_in_a_batch_still_ends_the_run(env, tmp_path):
    """The batch's later chunks are marked queued by the task attempt: when every attempt
    dies on one chunk, it and every chunk after it in the batch's order are presumed
    failed (those before it are done), and the run ends."""
    from l2cache.domain.permutation import permutation_key
    from l2cache.domain.spans import span_chunks

    crashing = chunk_file(env, (0, 0, 0))
    shutil.copy(crashing, tmp_path / "crashing.bak")
    try:
        with open(crashing, "wb") as f:
            f.write(gzip.compress(os.urandom(4000), mtime=0))
        run = start_ingest(env["config"], DS, batch=8)
        # the one leaf's order is the run's keyed order of its 8 chunks
        order = [tuple(c) for c in span_chunks(run.region, permutation_key(run.run_id), 0, 8)]
        lost = set(order[order.index((0, 0, 0)) :])
        status = finished(env, run.run_id, timeout=180)
        assert (status.done, status.failed, status.total) == (8 - len(lost), len(lost), 8)
        assert {tuple(f["chunk"]) for f in status.failures} == lost
        assert all("gave up after 3 attempts" in f["error"] for f in status.failures)
    finally:
        shutil.copy(tmp_path / "crashing.bak", crashing)


def test_a_rejected_task_of_an_existing_run_is_recorded_against_it(env):
    ctx = env["ctx"]
    run = new_run("region_reprocess", ctx.dataset, [0, 0, 0, 1, 1, 2], 2)
    ctx.ledger.create_run(run)
    base = {"dataset": DS, "run_id": run.run_id, "region": [0, 0, 0, 1, 1, 2]}
    assert post_task(env, {**base, "batch": 0}) == (
        200,
        {"status": "rejected", "error": "batch must be a positive integer"},
    )
    # a forged or wrong body names nothing the run can trust: refused and counted once,
    # no chunk failed, the run not broken (it was: any unreadable task broke it for good)
    status = run_status(ctx.ledger, run.run_id)
    assert (status.refused, status.failed, status.broken) == (1, 0, None)
    assert "batch must be a positive integer" in status.refused_latest
    other = new_run("region_reprocess", ctx.dataset, [0, 0, 0, 1, 1, 1], 1)
    ctx.ledger.create_run(other)
    code, answer = post_task(env, {"dataset": DS, "run_id": other.run_id, "region": "all"})
    assert code == 200 and answer["status"] == "rejected"
    assert run_status(ctx.ledger, other.run_id).refused == 1


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"region": [0, 0, 0, 3, 1, 1]}, "not inside the run's region"),
        ({"region": [0, 0, 0, 2**64, 1, 1]}, "does not fit"),
        (
            {"kind": "ids", "chunk": [0, 0, 0], "ids": [1], "at_ms": 10**20, "event_key": "k"},
            "outside the run's window",
        ),
        (
            {"kind": "ids", "chunk": [2**70, 0, 0], "ids": [1], "at_ms": 1, "event_key": "k"},
            "outside the volume",
        ),
        (
            {"kind": "ids", "chunk": [0, 0, 0], "ids": [True], "at_ms": 1, "event_key": "k"},
            "uint64",
        ),
    ],
)
def test_malformed_tasks_are_rejected_on_the_first_attempt(env, change, words):
    ctx = env["ctx"]
    if change.get("kind") == "ids":  # ids tasks belong to stream runs
        run = new_run("edit_stream", ctx.dataset)
    else:
        run = new_run("region_reprocess", ctx.dataset, [0, 0, 0, 1, 1, 1], 1)
    ctx.ledger.create_run(run)
    body = {"dataset": DS, "run_id": run.run_id, "region": [0, 0, 0, 1, 1, 1], **change}
    code, answer = post_task(env, body)
    assert code == 200 and answer["status"] == "rejected" and words in answer["error"], answer


def test_a_late_failure_never_overwrites_a_done_chunk(env):
    ctx = env["ctx"]
    run = new_run("region_reprocess", ctx.dataset, [0, 0, 1, 1, 1, 2], 1)
    ctx.ledger.create_run(run)
    from l2cache.compute import compute_chunk

    assert compute_chunk(ctx, run, (0, 0, 1))["status"] == "done"
    cid = chunk_id(ctx, (0, 0, 1))
    ctx.ledger.chunk_started(run.run_id, cid, (0, 0, 1))  # a duplicate delivery, late
    ctx.ledger.chunk_finished(run.run_id, cid, (0, 0, 1), "failed", error="gave up after 3")
    (row,) = chunk_rows(ctx.ledger, run.run_id)
    assert row["status"] == "done" and row["attempts"] == 2


def test_a_chunk_whose_next_attempt_never_came_is_presumed_failed(env):
    """The queue gave up before any attempt could record it: `retrying` must not last."""
    from datetime import timedelta

    from l2cache.domain.lineage import utc_now

    ctx = env["ctx"]
    run = new_run("region_reprocess", ctx.dataset, [0, 1, 1, 1, 2, 2], 1)
    ctx.ledger.create_run(run)
    cid = chunk_id(ctx, (0, 1, 1))
    for _ in range(MAX_ATTEMPTS):
        ctx.ledger.chunk_started(run.run_id, cid, (0, 1, 1))
        ctx.ledger.chunk_finished(run.run_id, cid, (0, 1, 1), "retrying", error="Unavailable")
    soon = run_status(ctx.ledger, run.run_id, max_attempts=MAX_ATTEMPTS, attempt_deadline_s=60)
    assert soon.retrying == 1 and not soon.finished
    later = run_status(
        ctx.ledger,
        run.run_id,
        now=utc_now() + timedelta(seconds=61),
        max_attempts=MAX_ATTEMPTS,
        attempt_deadline_s=60,
    )
    assert later.finished and later.failed == 1
    assert later.failures[0]["error"].startswith("gave up after 3 attempts: no answer")


def test_a_partly_zeroed_chunk_is_refused_or_counted_and_fails_qc(env, tmp_path):
    """The file decodes, but part of it was lost: the graph's supervoxels say so. With
    ``input: {strict: true}`` the chunk is refused with the count, as it always was; by
    default too, since it lost more than the map's per-chunk ghost limits (allowance
    and fraction); a map whose allowance covers the loss computes it, counts the ghosts
    in its ledger row, and the run fails QC (``max_ghost_sv_fraction``) with the reason."""
    from dataclasses import replace

    from cloudvolume import CloudVolume

    from l2cache.compute import compute_chunk
    from l2cache.inputs.volume import _volume
    from l2cache_ops.qc import run_qc

    path = chunk_file(env, (1, 0, 1))
    shutil.copy(path, tmp_path / "zeroed.bak")
    try:
        cv = CloudVolume(env["built"].segmentation, progress=False)
        cutout = np.asarray(cv[48:96, 0:48, 24:48])
        # lose whole supervoxels off the chunk's faces (a lost face is caught by the
        # geometry check, which always fails the chunk): every one of them inside
        inner = np.zeros(cutout.shape[:3], bool)
        inner[1:-1, 1:-1, 1:-1] = True
        ids = np.unique(cutout[..., 0])
        on_face = np.unique(cutout[..., 0][~inner])
        lost = np.setdiff1d(ids[ids != 0], on_face)
        assert lost.size, "no supervoxel of the chunk is off its faces"
        cutout[np.isin(cutout, lost)] = 0
        cv[48:96, 0:48, 24:48] = cutout
        _volume.cache_clear()
        ctx = env["ctx"]
        strict = replace(ctx, dataset=replace(ctx.dataset, strict_input=True))
        run = new_run("region_reprocess", ctx.dataset, [1, 0, 1, 2, 1, 2], 1)
        ctx.ledger.create_run(run)
        result = compute_chunk(strict, run, (1, 0, 1))
        assert result["status"] == "failed" and "absent from the segmentation" in result["error"]
        (row,) = chunk_rows(ctx.ledger, run.run_id)
        assert row["permanent"] is True and row["ghost_sv"] > 0
        run = new_run("region_reprocess", ctx.dataset, [1, 0, 1, 2, 1, 2], 1)
        ctx.ledger.create_run(run)
        result = compute_chunk(ctx, run, (1, 0, 1))
        assert result["status"] == "failed" and "input.ghost_sv_allowance" in result["error"]
        (row,) = chunk_rows(ctx.ledger, run.run_id)
        assert row["permanent"] is True and row["ghost_sv"] == lost.size
        loose = replace(ctx, dataset=replace(ctx.dataset, ghost_sv_allowance=int(lost.size)))
        run = new_run("region_reprocess", ctx.dataset, [1, 0, 1, 2, 1, 2], 1)
        ctx.ledger.create_run(run)
        result = compute_chunk(loose, run, (1, 0, 1))
        assert result["status"] == "done"
        (row,) = chunk_rows(ctx.ledger, run.run_id)
        assert row["ghost_sv"] == lost.size and row["orphan_sv"] == 0
        report = run_qc(ctx, run.run_id)
        assert report["coverage"]["inputs"]["ghost_sv"] == row["ghost_sv"]
        (reason,) = [r for r in report["reasons"] if "ghost" in r]
        assert f"{row['ghost_sv']} supervoxels of the graph have no voxel" in reason
    finally:
        shutil.copy(tmp_path / "zeroed.bak", path)
        _volume.cache_clear()


def test_fanned_out_chunks_that_fail_are_dead_lettered_with_their_ids(env, tmp_path):
    ctx = env["ctx"]
    ok_ids = load_chunk_l2(ctx, (0, 0, 1), None).l2_ids[:2]
    bad_ids = load_chunk_l2(ctx, (1, 1, 0), None).l2_ids[:3]
    path = chunk_file(env, (1, 1, 0))
    shutil.copy(path, tmp_path / "gone.bak")
    try:
        os.remove(path)
        publisher = pubsub_v1.PublisherClient()
        topic = publisher.topic_path(PROJECT, "l2cache-missing-ids")
        data = np.concatenate([ok_ids, bad_ids]).astype("<u8").tobytes()
        publisher.publish(topic, data, table_id=DS, l2_cache_id=ctx.dataset.cache_table_id).result(
            timeout=30
        )
        (letter,) = pull_dead_letters(
            1,
            timeout=90,
            settle=2.0,
            keep=lambda m: "segmentation file missing" in m.attributes["dead_letter_reason"],
        )
    finally:
        shutil.copy(tmp_path / "gone.bak", path)
    assert sorted(np.frombuffer(letter.data, "<u8").tolist()) == sorted(bad_ids.tolist())
    assert "segmentation file missing" in letter.attributes["dead_letter_reason"]


def test_non_layer2_ids_are_dead_lettered_not_dropped(env):
    from l2cache.handlers.on_edit import handle_message

    letters = []
    data = pickle.dumps({"operation_id": 4242, "new_lvl2_ids": [1, 2, 3]})
    result = handle_message(
        env["config"], data, {"table_id": DS}, "nl2", lambda d, a: letters.append((d, a))
    )
    assert result["status"] == "dead_lettered" and result["not_layer2"] == 3
    ((payload, attrs),) = letters
    assert np.frombuffer(payload, "<u8").tolist() == [1, 2, 3]
    assert "not layer-2 (L2) ids" in attrs["dead_letter_reason"]


def test_dead_letter_attributes_stay_within_pubsub_limits():
    from l2cache.domain.failures import dead_letter_attributes

    attrs = dead_letter_attributes({f"k{i}": "é" * 900 for i in range(150)}, "é" * 2000, "m")
    assert len(attrs) <= 100
    assert all(len(v.encode()) <= 1024 for v in attrs.values())
    assert attrs["dead_letter_reason"].startswith("éé")


def test_existing_cache_tables_are_never_ingested(env):
    import yaml

    from l2cache.config import parse_config

    raw = yaml.safe_load(env["stack"].config_path.read_text())
    raw["datasets"][DS]["existing_cache_table"] = True
    config = parse_config(raw, source="existing-table-map")
    with pytest.raises(ValueError, match="existing cache table"):
        start_ingest(config, DS, batch=1)
    run = new_run("region_reprocess", env["ctx"].dataset, [0, 0, 0, 1, 1, 1], 1)
    env["ctx"].ledger.create_run(run)
    body = {"dataset": DS, "run_id": run.run_id, "region": [0, 0, 0, 1, 1, 1]}
    import json

    code, answer = handle_task(config, json.dumps(body).encode())
    assert code == 200 and answer["status"] == "rejected" and "does not write" in answer["error"]


def test_the_store_itself_refuses_to_write_an_existing_cache_table(env):
    """The refusal sits in the one write path, not only in the entry points."""
    import yaml

    from l2cache.config import parse_config
    from l2cache.domain.failures import BadRequest
    from l2cache.domain.lineage import Lineage
    from l2cache.store.cache import CacheStore

    raw = yaml.safe_load(env["stack"].config_path.read_text())
    raw["datasets"][DS]["existing_cache_table"] = True
    owned = parse_config(raw, source="existing-table-map").dataset(DS)
    feats = compute_features(load_chunk_l2(env["ctx"], (0, 0, 1), None).dense, RES)
    with pytest.raises(BadRequest, match="another service owns"):
        CacheStore(env["ctx"].store.table, owned).write_features(feats, Lineage("r-owned"))


def test_reading_ahead_changes_when_chunks_are_read_not_what_a_batch_records(env, monkeypatch):
    """``tasks.read_ahead``: chunk i+1 is read while chunk i is still being written; each
    chunk's outcome, error and input checksum are the sequential batch's, a permanent
    failure stays its own chunk's, and a transient one stops the batch where it did."""
    import threading

    import l2cache.compute as pipeline
    from l2cache.domain.failures import CorruptInput

    ctx = env["ctx"]
    chunks = [[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]]
    real_read, real_write = pipeline.read_chunk, ctx.store.write_features
    fault: dict[tuple, Exception] = {}
    second_read_started = threading.Event()

    def read(dataset, coords, *args, **kwargs):
        if tuple(coords) == (0, 1, 0):
            second_read_started.set()
        if tuple(coords) in fault:
            raise fault[tuple(coords)]
        return real_read(dataset, coords, *args, **kwargs)

    overlapped = []
    mode = {"read_ahead": False}

    def write(feats, lineage):
        if not overlapped:  # chunk (0,0,0): does chunk (0,1,0)'s read start meanwhile?
            overlapped.append(second_read_started.wait(timeout=30 if mode["read_ahead"] else 0))
        return real_write(feats, lineage)

    monkeypatch.setattr(pipeline, "read_chunk", read)
    monkeypatch.setattr(ctx.store, "write_features", write)

    def batch(read_ahead: bool):
        run = new_run("region_reprocess", ctx.dataset, [0, 0, 0, 2, 2, 1], 4)
        ctx.ledger.create_run(run)
        second_read_started.clear()
        del overlapped[:]
        mode["read_ahead"] = read_ahead
        try:
            out = pipeline.compute_chunks(ctx, run, chunks, read_ahead=read_ahead)
        except ConnectionError as exc:
            out = f"raised {exc}"
        keys = ("status", "error", "input_checksum", "l2_count", "permanent")
        rows = {
            tuple(r["coords"]): tuple(r.get(k) for k in keys)
            for r in chunk_rows(ctx.ledger, run.run_id)
        }
        return out, rows, overlapped[:]

    fault[(0, 1, 0)] = CorruptInput("chunk (0, 1, 0): planted corruption")
    seq, seq_rows, seq_overlap = batch(False)
    par, par_rows, par_overlap = batch(True)
    assert [o["status"] for o in seq] == ["done", "failed", "done", "done"], seq
    assert seq == par and seq_rows == par_rows
    assert seq_rows[(0, 1, 0)][:2] == ("failed", "chunk (0, 1, 0): planted corruption")
    assert seq_rows[(0, 1, 0)][4] is True
    assert seq_overlap == [False] and par_overlap == [True]  # read ahead, and only then

    fault[(1, 0, 0)] = ConnectionError("storage unavailable")  # transient: the task retries
    seq, seq_rows, _ = batch(False)
    par, par_rows, _ = batch(True)
    assert seq == par == "raised storage unavailable"
    assert seq_rows == par_rows
    assert [seq_rows[tuple(c)][0] for c in chunks[:3]] == ["done", "failed", "retrying"]
    assert (1, 1, 0) not in seq_rows  # never started: the batch stopped at the transient error
