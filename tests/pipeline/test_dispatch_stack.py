"""Span tasks end to end on the local stack: a run fanned out over its scattered chunk
order through the Cloud Tasks emulator (fan-out 2, so several levels of splits), leaves
held back by the warm-up ramp, duplicates refused by name, a malformed span rejected
for good, and edits on their own queue while the bulk queue is paused."""

from __future__ import annotations

import os
import time
from datetime import datetime

import numpy as np
import pytest
import requests
from stackutil import add_dataset, crop_volume, wait_for, wait_tasks_gone

from l2cache.compute import dataset_context
from l2cache.config import load_config
from l2cache.domain.permutation import permutation_key, permute
from l2cache.domain.regions import region_chunks
from l2cache.domain.spans import Ramp, ramp_offset_s
from l2cache.gcp.tasks import enqueue_chunk_ids, queue_path, span_task_id, tasks_client
from l2cache.handlers.on_edit import stream_run
from l2cache_ops.ingest import start_ingest
from l2cache_ops.ledger import chunk_rows
from l2cache_ops.status import run_status
from l2cache_tools.local.stack import LocalStack

DS = "spans"
N_CHUNKS = 8  # the 96x96x48 crop in 48x48x24 chunks: 2 x 2 x 2
RAMP = {"start_per_s": 4.0, "growth": 1.5, "step_s": 3600.0, "max_per_s": 500.0}


class SpanStack(LocalStack):
    """The local stack with a fan-out of 2 and a slow, observable ramp (4 leaves/s)."""

    def base_config(self, compute_url: str) -> dict:
        cfg = super().base_config(compute_url)
        cfg["tasks"].update({"fan_out": 2, "ramp": dict(RAMP)})
        return cfg


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    saved = dict(os.environ)
    directory = tmp_path_factory.mktemp("spans")
    with SpanStack(directory, compute_workers=2) as stack:
        made = add_dataset(stack, DS, crop_volume(), directory)
        config = load_config(stack.config_path)
        yield {"stack": stack, "config": config, "ctx": dataset_context(config, DS), **made}
    os.environ.clear()
    os.environ.update(saved)


def finished(env, run_id: str, timeout: float = 180):
    return wait_for(
        lambda: (s := run_status(env["ctx"].ledger, run_id)).finished and s,
        timeout,
        f"run {run_id} to finish",
    )


def test_span_run_computes_every_chunk_once_in_scattered_order_on_the_ramp(env):
    ctx = env["ctx"]
    run = start_ingest(env["config"], DS, batch=1)
    status = finished(env, run.run_id)
    assert (status.total, status.done, status.failed) == (N_CHUNKS, N_CHUNKS, 0)
    rows = {tuple(r["coords"]): r for r in chunk_rows(ctx.ledger, run.run_id)}
    assert sorted(rows) == sorted(map(tuple, region_chunks(run.region)))
    assert all(r["attempts"] == 1 for r in rows.values())
    # leaf i (= position i at batch 1) holds the i-th chunk of the keyed order, and was
    # not started before the ramp made it due: t0 + i / 4 s
    order = permute(np.arange(N_CHUNKS), N_CHUNKS, permutation_key(run.run_id))
    t0 = datetime.fromisoformat(run.created_at)
    due = ramp_offset_s(np.arange(N_CHUNKS), Ramp(**RAMP))
    assert due[-1] == pytest.approx((N_CHUNKS - 1) / 4)
    for position, linear in enumerate(order.tolist()):
        coords = tuple(region_chunks(run.region)[linear])
        started = datetime.fromisoformat(rows[coords]["queued_at"])
        assert (started - t0).total_seconds() >= due[position] - 0.05, (position, coords)


def test_a_retried_split_enqueues_nothing_twice(env):
    ctx = env["ctx"]
    from l2cache.store.ledger import new_run

    run = new_run("bulk_ingest", ctx.dataset, [0, 0, 0, 2, 2, 2], N_CHUNKS)
    ctx.ledger.create_run(run)
    url = env["stack"].urls["compute_chunk"]
    body = {"kind": "span", "dataset": DS, "run_id": run.run_id, "start": 0}
    body.update({"stop": N_CHUNKS, "batch": 2, "generation": 0})
    for _ in range(3):  # the root, delivered three times: the same two child names
        assert requests.post(url, json=body, timeout=60).json() == {"split": 2}
    status = finished(env, run.run_id)
    assert (status.done, status.failed) == (N_CHUNKS, 0)
    cfg, client = env["config"].tasks, tasks_client()
    names = [span_task_id(run.run_id, a, b, 0) for a, b in ((0, 4), (4, 8))]
    wait_tasks_gone([f"{queue_path(client, cfg)}/tasks/{n}" for n in names])
    assert all(r["attempts"] == 1 for r in chunk_rows(ctx.ledger, run.run_id))


def test_a_malformed_span_of_a_known_run_is_rejected_for_good(env):
    ctx = env["ctx"]
    from l2cache.store.ledger import new_run

    run = new_run("bulk_ingest", ctx.dataset, [0, 0, 0, 2, 2, 2], N_CHUNKS)
    ctx.ledger.create_run(run)
    url = env["stack"].urls["compute_chunk"]
    base = {"kind": "span", "dataset": DS, "run_id": run.run_id, "batch": 1}
    for bad in ({"start": 0, "stop": N_CHUNKS + 1}, {"start": 3, "stop": 3}, {"start": "0"}):
        answer = requests.post(url, json={**base, "stop": 1, **bad}, timeout=60)
        assert answer.status_code == 200 and answer.json()["status"] == "rejected", bad
    st = run_status(ctx.ledger, run.run_id)  # refused and counted, the run not broken
    assert st.refused == 3 and st.broken is None and "span" in st.refused_latest


def test_edits_go_to_the_edits_queue_and_never_wait_behind_a_paused_bulk_queue(env):
    ctx, cfg, client = env["ctx"], env["config"].tasks, tasks_client()
    bulk = queue_path(client, cfg)
    edits = queue_path(client, cfg, cfg.edits_queue_name)
    assert edits != bulk and edits.endswith("/queues/l2cache-compute-edits")
    client.pause_queue(name=bulk)
    try:
        held = start_ingest(env["config"], DS, batch=1)  # a bulk run stuck in the queue
        run = ctx.ledger.ensure_run(stream_run("edit_stream", ctx.dataset))
        chunk = [1, 1, 1]
        ids = _chunk_l2_ids(env, chunk)
        at_ms = int(time.time() * 1000)
        name = enqueue_chunk_ids(client, cfg, DS, run.run_id, "op-dispatch-1", chunk, ids, at_ms)
        assert name and name.startswith(edits + "/tasks/")
        wait_tasks_gone([name], timeout=120)  # done while the bulk queue holds its run
        raw = ctx.store.read_raw(np.asarray(ids, dtype=np.uint64))
        assert set(raw) == {int(i) for i in ids}
        assert chunk_rows(ctx.ledger, held.run_id) == []  # the bulk run has not started
    finally:
        client.resume_queue(name=bulk)
    assert finished(env, held.run_id).done == N_CHUNKS


def _chunk_l2_ids(env, coords) -> list[int]:
    """The L2 ids the graph table holds in one chunk (its keys form one range)."""
    from google.cloud.bigtable.row_set import RowSet

    from l2cache.domain import ids as idlib

    bits = env["ctx"].dataset.spatial_bits
    first = int(idlib.chunk_id_from_coords(2, np.asarray(coords)[None], bits)[0])
    width = 1 << (64 - 8 - 3 * int(bits.bits_for(np.array([2]))[0]))
    rs = RowSet()
    rs.add_row_range_from_keys(idlib.row_key(first), idlib.row_key(first + width))
    rows = env["instance"].table(DS).read_rows(row_set=rs)
    ids = [int(r.row_key) for r in rows]
    assert ids
    return ids
