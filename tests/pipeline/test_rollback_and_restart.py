"""Rollback of every run kind, selected by lineage in the chunks the run's ledger names;
the CLI's confirmation, dry run and fan-out through the queue (tasks run by the compute
function); then Bigtable lost mid-ingest.

The last test restarts the Bigtable emulator (memory only: every table is gone), so it
runs last in this module, on this module's own stack.
"""

from __future__ import annotations

import os
import pickle
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from stackutil import add_dataset, crop_volume, wait_for

from l2cache.compute import compute_chunk, dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.handlers.on_edit import handle_message, stream_run
from l2cache.store.ledger import new_run
from l2cache_ops.ingest import start_ingest
from l2cache_ops.ledger import chunk_rows
from l2cache_ops.rollback import rollback_history, rollback_run_touched, run_versions
from l2cache_tools.dataset.edits import apply_merge, pick_merge
from l2cache_tools.local.emulators import start_bigtable_emulator
from l2cache_tools.local.stack import LocalStack

DS = "rollback"
CHUNKS = [(x, y, z) for x in range(2) for y in range(2) for z in range(2)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    saved = dict(os.environ)
    directory = tmp_path_factory.mktemp("rollback")
    with LocalStack(directory, compute_workers=2, max_attempts=3, attempt_deadline_s=8) as stack:
        made = add_dataset(stack, DS, crop_volume(), directory)
        config = load_config(stack.config_path)
        yield {"stack": stack, "config": config, "ctx": dataset_context(config, DS), **made}
    os.environ.clear()
    os.environ.update(saved)


def bulk(ctx, kind="bulk_ingest", chunks=CHUNKS, region=(0, 0, 0, 2, 2, 2)):
    run = new_run(kind, ctx.dataset, list(region), len(chunks))
    ctx.ledger.create_run(run)
    for c in chunks:
        assert compute_chunk(ctx, run, c)["status"] == "done"
    return run


def rollback(ctx, run):
    """The proportional rollback (the ledger's chunks only); returns rows touched."""
    return rollback_run_touched(
        ctx.store.table, ctx.ledger, run, ctx.dataset.spatial_bits
    ).deleted.rows_touched


def nodes_of(ctx, chunk, run) -> np.ndarray:
    return load_chunk_l2(ctx, chunk, run.snapshot).l2_ids


def newest(ctx, nodes) -> dict:
    return ctx.store.read_raw(nodes)


def message(ctx, env, ids, when: datetime, op: int | None, missing: bool = False):
    if missing:
        data = np.asarray(ids, "<u8").tobytes()
        attrs = {"table_id": DS, "l2_cache_id": ctx.dataset.cache_table_id}
    else:
        data = pickle.dumps({"operation_id": op, "new_lvl2_ids": list(ids)})
        attrs = {"table_id": DS}
    return handle_message(env["config"], data, attrs, f"m-{op}-{when.timestamp()}", None, when)


def test_rollback_of_bulk_and_region_runs_restores_the_previous_values(env):
    ctx = env["ctx"]
    first = bulk(ctx)
    nodes = np.concatenate([nodes_of(ctx, c, first) for c in CHUNKS])
    before = newest(ctx, nodes)
    second = bulk(ctx)  # a later bulk run over the same data
    region = bulk(ctx, "region_reprocess", [(1, 1, 1)], (1, 1, 1, 2, 2, 2))
    assert {r[b"run"] for r in ctx.store.read_lineage(nodes).values()} == {
        second.run_id.encode(),
        region.run_id.encode(),
    }
    for run in (region, second):
        touched = rollback(ctx, run)
        assert touched and not run_versions(ctx.store.table, run.run_id)
    after = newest(ctx, nodes)
    assert after == before  # the first run's bytes and lineage, exactly
    # rolling back the only run leaves no value at all: nothing stale survives
    rollback(ctx, first)
    assert newest(ctx, nodes) == {} or all(not r.get("0") for r in newest(ctx, nodes).values())
    bulk(ctx)  # leave the table populated for the next tests


def test_rollback_of_an_edit_stream_removes_every_version_it_wrote(env):
    """Stream cells carry each message's own time: one row can hold several of them."""
    ctx = env["ctx"]
    graph = env["instance"].table(DS)
    merge = apply_merge(graph, ctx.dataset, *pick_merge(ctx.dataset, graph, (0, 0, 1)))
    (new,) = merge.new_l2_ids.tolist()
    base = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0)  # after the merge
    now_ids = nodes_of(ctx, (0, 0, 1), stream_run("edit_stream", ctx.dataset))
    existing = int(np.setdiff1d(now_ids, merge.new_l2_ids)[0])  # same chunk: one message, inline
    before = newest(ctx, [existing])
    assert message(ctx, env, [new], base, 501)["status"] == "ok"
    assert message(ctx, env, [new, existing], base + timedelta(seconds=1), 502)["status"] == "ok"
    run = ctx.ledger.get_run(stream_run("edit_stream", ctx.dataset).run_id)
    versions = run_versions(ctx.store.table, run.run_id)
    assert len(versions[b"%020d" % new]) == 2  # two messages, two versions of one row
    assert rollback(ctx, run) == 2
    assert not run_versions(ctx.store.table, run.run_id)
    assert not newest(ctx, [new]).get(new, {}).get("0")  # only the stream ever wrote it
    assert newest(ctx, [existing]) == before  # the bulk value is current again


def test_rollback_of_a_missing_ids_run_restores_the_bulk_values(env):
    ctx = env["ctx"]
    nodes = nodes_of(ctx, (1, 1, 0), stream_run("missing_ids", ctx.dataset))[:3]
    before = newest(ctx, nodes)
    result = message(ctx, env, nodes.tolist(), datetime.now(UTC), None, missing=True)
    assert result["status"] == "ok" and result["written"] == 3
    run = ctx.ledger.get_run(stream_run("missing_ids", ctx.dataset).run_id)
    assert {r[b"run"] for r in ctx.store.read_lineage(nodes).values()} == {run.run_id.encode()}
    assert rollback(ctx, run) == 3
    assert newest(ctx, nodes) == before


def test_runs_rollback_confirms_dry_runs_and_fans_out_through_the_queue(env, capsys):
    """Without a terminal the CLI refuses unless --yes; --dry-run changes nothing; above
    --fan-out chunks the rollback is enqueued and the compute function's tasks finish it."""
    from l2cache.handlers.compute_chunk import handle_task
    from l2cache_tools.cli import main

    ctx = env["ctx"]
    nodes = np.concatenate(
        [nodes_of(ctx, c, stream_run("edit_stream", ctx.dataset)) for c in CHUNKS]
    )
    before = newest(ctx, nodes)
    run = bulk(ctx)
    args = ["runs", "rollback", DS, run.run_id, "--config", str(env["stack"].config_path)]
    capsys.readouterr()
    assert main(args) == 2
    assert "refusing without a terminal" in capsys.readouterr().err
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dry run: run {run.run_id} (bulk_ingest): 8 touched chunks")
    assert f"would delete {nodes.size} versions" in out
    assert main([*args, "--dry-run", "--fan-out", "2"]) == 0
    assert "would enqueue 1 rollback tasks" in capsys.readouterr().out
    assert len(run_versions(ctx.store.table, run.run_id)) == nodes.size  # all still there
    assert main([*args, "--yes", "--fan-out", "2"]) == 0
    assert "enqueued 1 rollback tasks (1 new" in capsys.readouterr().out
    wait_for(lambda: not run_versions(ctx.store.table, run.run_id), 60, "the rollback tasks")
    assert newest(ctx, nodes) == before  # the previous run's values, exactly
    record = wait_for(
        lambda: [
            r
            for r in rollback_history(ctx.ledger, DS)
            if r["run_id"] == run.run_id and r.get("tasks_done")
        ],
        30,
        "the task's progress in the record",
    )[-1]
    assert record["mode"] == "queued" and record["queued_versions_deleted"] == nodes.size
    # a malformed rollback task is answered 200 and rejected, and never marks the run broken
    body = b'{"kind": "rollback", "dataset": "%s", "run_id": "%s", "chunks": [1]}' % (
        DS.encode(),
        run.run_id.encode(),
    )
    status, answer = handle_task(env["config"], body)
    assert status == 200 and answer["status"] == "rejected"
    from l2cache_ops.ledger import rejected_tasks

    assert not rejected_tasks(ctx.ledger, run.run_id)
    bulk(ctx)  # leave the table populated


def test_bigtable_lost_mid_ingest_reports_the_run_broken_never_done(env, capsys):
    """The emulator is memory only: a restart loses every table, the run row included."""
    from l2cache_tools.cli import main
    from l2cache_tools.cli.ingest_cmd import RunBroken, watch

    stack, ctx = env["stack"], env["ctx"]
    run = start_ingest(env["config"], DS, batch=1)
    wait_for(
        lambda: any(r["status"] == "done" for r in chunk_rows(ctx.ledger, run.run_id)),
        60,
        "a first chunk to finish",
        every=0.05,
    )
    old = next(p for p in stack.processes if p.name == "bigtable")
    old.stop()
    fresh = start_bigtable_emulator(log_dir=stack.dir / "logs", port=old.port)
    stack.processes[stack.processes.index(old)] = fresh
    with pytest.raises(RunBroken, match="broken"):
        watch(ctx.ledger, run.run_id, interval=0.1, timeout=30, cfg=env["config"])
    assert main(["status", DS, run.run_id, "--config", str(stack.config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run {run.run_id} is broken") and "never be done" in err
