"""Rollback proportional to what a run touched, on the real Bigtable emulator.

Synthetic cache rows (every attribute column and the lineage columns, as a worker
writes them) and ledger rows, so each case states exactly which versions exist: a run
that wrote nothing reads one empty ledger page and deletes nothing; a run's versions go
and other runs' versions in the same rows stay; stream runs are found through their
``evchunk`` rows; a dry run writes nothing; the fan-out builds strict, deterministic
tasks, and the task handler deletes only the run's own versions and rejects bad bodies.
"""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from l2cache.config import parse_config
from l2cache.domain import ids
from l2cache.domain.attributes import ATTRIBUTES, FEATURE_FAMILY, LINEAGE_FAMILY
from l2cache.gcp.bigtable import CellFilter, bigtable_instance, read_rows, read_versions
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.handlers.rollback_task import (
    MAX_TASK_CHUNKS,
    handle_rollback_task,
    task_name,
    task_payload,
)
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import LEDGER_FAMILY, RunLedger, create_runs_table, new_run
from l2cache_ops.rollback import rollback_history, rollback_run_touched, run_versions

CONFIG = {
    "bigtable": {"project": "test-project", "instance": "test-instance"},
    "datasets": {
        "rb": {
            "segmentation": "file:///nonexistent",
            "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "rb"},
            "cache_table_id": "cache_rb",
            "resolution": [16, 16, 40],
            "chunk_size": [64, 64, 32],
            "voxel_offset": [0, 0, 0],
            "volume_size": [512, 512, 256],
            "spatial_bits": {1: 10, 2: 10, 3: 9},
        }
    },
}
DATASET = parse_config(CONFIG).dataset("rb")
BITS = DATASET.spatial_bits
ROWS_PER_CHUNK = 5


def chunk_id(coords) -> int:
    return int(ids.chunk_id_from_coords(2, np.asarray([coords]), BITS)[0])


def l2_ids(coords, n=ROWS_PER_CHUNK) -> list[int]:
    segs = np.arange(1, n + 1, dtype=np.uint64)
    return ids.encode_ids(2, np.tile(coords, (n, 1)), segs, BITS).tolist()


def write_cells(table, run_id: str, coords, stamp_ms: int, n=ROWS_PER_CHUNK) -> None:
    """One version of ``n`` rows of chunk ``coords``, as a worker writes it."""
    from datetime import UTC, datetime

    at = datetime.fromtimestamp(stamp_ms / 1000, tz=UTC)
    rows = []
    for node in l2_ids(coords, n):
        row = Row(b"%020d" % node)
        for a in ATTRIBUTES:
            row.set_cell(FEATURE_FAMILY, a.key, run_id.encode() + b"|" + a.key, at)
        for col, value in ((b"run", run_id), (b"params", "p"), (b"code", "c"), (b"input", "i")):
            row.set_cell(LINEAGE_FAMILY, col, value.encode(), at)
        rows.append(row)
    write_rows(table, rows, "test")


def chunk_row(ledger, run_id, coords, status: str | None, attempts: int, l2: int = 0) -> None:
    row = Row(b"chunk:%s:%020d" % (run_id.encode(), chunk_id(coords)))
    row.set_cell(LEDGER_FAMILY, b"queued_at", b"2026-01-01T00:00:00")
    if attempts:
        row.set_cell(LEDGER_FAMILY, b"attempts", struct.pack(">q", attempts))
    if status:
        row.set_cell(LEDGER_FAMILY, b"status", status.encode())
    if l2:
        row.set_cell(LEDGER_FAMILY, b"l2_count", json.dumps(l2).encode())
    write_rows(ledger.table, [row], "test")


def evchunk_row(ledger, run_id, event, coords, written: int) -> None:
    key = b"evchunk:%s:%s:%020d" % (run_id.encode(), event.encode(), chunk_id(coords))
    row = Row(key)
    row.set_cell(LEDGER_FAMILY, b"status", b"done")
    row.set_cell(LEDGER_FAMILY, b"written", json.dumps(written).encode())
    write_rows(ledger.table, [row], "test")


def snapshot(table) -> dict:
    """Every row, every version: what "nothing changed" is checked against."""
    return read_versions(table)


def bulk_run(ledger, stamp_ms: int, kind="bulk_ingest"):
    run = new_run(kind, DATASET, [0, 0, 0, 8, 8, 8], 512)
    run.cell_timestamp_ms = stamp_ms
    ledger.create_run(run)
    return run


@pytest.fixture()
def env(bigtable_emulator):
    instance = bigtable_instance("test-project", "test-instance", admin=True)
    suffix = np.random.default_rng().integers(1e9)
    cache = create_cache_table(instance, f"cache_rb_{suffix}")
    ledger = RunLedger(create_runs_table(instance, f"runs_rb_{suffix}"))
    yield SimpleNamespace(cache=cache, ledger=ledger)
    cache.delete()
    ledger.table.delete()


def rollback(env, run, **kw):
    return rollback_run_touched(env.cache, env.ledger, run, BITS, **kw)


def test_a_run_that_wrote_nothing_reads_one_empty_page_and_deletes_nothing(env):
    a = bulk_run(env.ledger, 1_700_000_000_000)
    for c in [(0, 0, 0), (1, 0, 0), (2, 0, 0)]:
        write_cells(env.cache, a.run_id, c, a.cell_timestamp_ms)
        chunk_row(env.ledger, a.run_id, c, "done", 1, ROWS_PER_CHUNK)
    idle = bulk_run(env.ledger, 1_700_000_001_000)
    chunk_row(env.ledger, idle.run_id, (0, 0, 0), None, 0)  # queued, never started
    before = snapshot(env.cache)
    done = rollback(env, idle)
    assert done.ledger_requests == 1 and done.ledger_rows == 0  # one read, nothing returned
    assert done.chunks == 0 and done.deleted.ranges == 0 and done.deleted.rows_scanned == 0
    assert done.versions == 0 and done.mode == "inline"
    assert snapshot(env.cache) == before
    (record,) = rollback_history(env.ledger, DATASET.name)
    assert record["run_id"] == idle.run_id and record["versions"] == 0 and not record["dry_run"]


def test_the_runs_versions_go_and_other_runs_versions_in_the_same_rows_stay(env):
    a = bulk_run(env.ledger, 1_700_000_000_000)
    b = bulk_run(env.ledger, 1_700_000_005_000, "region_reprocess")
    for c in [(0, 0, 0), (0, 0, 1)]:
        write_cells(env.cache, a.run_id, c, a.cell_timestamp_ms)
        chunk_row(env.ledger, a.run_id, c, "done", 1, ROWS_PER_CHUNK)
    for c in [(0, 0, 0), (0, 0, 1), (3, 3, 3)]:
        write_cells(env.cache, b.run_id, c, b.cell_timestamp_ms)
    chunk_row(env.ledger, b.run_id, (0, 0, 0), "done", 1, ROWS_PER_CHUNK)
    chunk_row(env.ledger, b.run_id, (0, 0, 1), "failed", 3)  # failed: may have written
    chunk_row(env.ledger, b.run_id, (3, 3, 3), "done", 2, ROWS_PER_CHUNK)
    chunk_row(env.ledger, b.run_id, (5, 5, 5), None, 0)  # queued only: not read
    a_before = run_versions(env.cache, a.run_id)
    done = rollback(env, b, batch_chunks=2)
    assert done.chunks == 3 and done.by_status == {"done": 2, "failed": 1}
    assert done.deleted.versions_deleted == 3 * ROWS_PER_CHUNK
    assert done.deleted.rows_scanned == 3 * ROWS_PER_CHUNK  # only rows holding b's versions
    assert not run_versions(env.cache, b.run_id)
    assert run_versions(env.cache, a.run_id) == a_before
    newest = read_rows(env.cache, keys=[b"%020d" % n for n in l2_ids((0, 0, 0))])
    assert {r[LINEAGE_FAMILY][b"run"] for r in newest.values()} == {a.run_id.encode()}
    assert all(
        r[FEATURE_FAMILY][b"size_nm3"].startswith(a.run_id.encode()) for r in newest.values()
    )
    # a repeat finds nothing left
    assert rollback(env, b).deleted.versions_deleted == 0


def test_a_stream_run_is_rolled_back_through_its_evchunk_rows(env):
    a = bulk_run(env.ledger, 1_700_000_000_000)
    write_cells(env.cache, a.run_id, (1, 1, 1), a.cell_timestamp_ms)
    write_cells(env.cache, a.run_id, (2, 2, 2), a.cell_timestamp_ms)
    s = new_run("edit_stream", DATASET, trigger="pubsub")
    env.ledger.create_run(s)
    # two messages wrote the same rows of chunk (1,1,1) at their own times, one (2,2,2)
    for i, when in enumerate((1_700_000_010_000, 1_700_000_020_000)):
        write_cells(env.cache, s.run_id, (1, 1, 1), when, n=2)
        evchunk_row(env.ledger, s.run_id, f"op{i}", (1, 1, 1), 2)
    write_cells(env.cache, s.run_id, (2, 2, 2), 1_700_000_030_000, n=1)
    evchunk_row(env.ledger, s.run_id, "op9", (2, 2, 2), 1)
    a_before = run_versions(env.cache, a.run_id)
    assert sum(len(v) for v in run_versions(env.cache, s.run_id).values()) == 5
    done = rollback(env, s)
    assert done.chunks == 3 and done.estimated_versions == 5
    assert done.deleted.versions_deleted == 5 and done.deleted.rows_touched == 3
    assert not run_versions(env.cache, s.run_id)
    assert run_versions(env.cache, a.run_id) == a_before


def test_a_dry_run_writes_nothing_and_counts_exactly_what_the_rollback_deletes(env):
    a = bulk_run(env.ledger, 1_700_000_000_000)
    b = bulk_run(env.ledger, 1_700_000_005_000)
    for c in [(0, 0, 0), (0, 1, 0)]:
        write_cells(env.cache, a.run_id, c, a.cell_timestamp_ms)
        write_cells(env.cache, b.run_id, c, b.cell_timestamp_ms)
        chunk_row(env.ledger, b.run_id, c, "done", 1, ROWS_PER_CHUNK)
    cache_before, runs_before = snapshot(env.cache), snapshot(env.ledger.table)
    dry = rollback(env, b, dry_run=True)
    assert snapshot(env.cache) == cache_before and snapshot(env.ledger.table) == runs_before
    assert dry.dry_run and dry.record is None and dry.mode == "inline"
    assert dry.deleted.versions_deleted == 2 * ROWS_PER_CHUNK == dry.estimated_versions
    # above the threshold a dry run without a queue reads no cache row: the estimate
    big = rollback(env, b, dry_run=True, fan_out_chunks=1)
    assert big.mode == "estimate" and big.deleted.rows_scanned == 0 and big.versions == 10
    queued = rollback(env, b, dry_run=True, fan_out_chunks=1, task_chunks=1, enqueue=_never)
    assert queued.mode == "queued" and queued.tasks == 2 and queued.tasks_new == 0
    assert snapshot(env.cache) == cache_before and snapshot(env.ledger.table) == runs_before
    done = rollback(env, b)
    assert done.deleted.versions_deleted == dry.deleted.versions_deleted
    assert done.deleted.rows_touched == dry.deleted.rows_touched


def _never(*args):
    raise AssertionError("a dry run enqueued a task")


def test_the_fan_out_enqueues_deterministic_tasks_that_complete_the_rollback(env):
    a = bulk_run(env.ledger, 1_700_000_000_000)
    b = bulk_run(env.ledger, 1_700_000_005_000)
    chunks = [(x, y, 0) for x in range(3) for y in range(3)]
    for c in chunks:
        write_cells(env.cache, a.run_id, c, a.cell_timestamp_ms, n=2)
        write_cells(env.cache, b.run_id, c, b.cell_timestamp_ms, n=2)
        chunk_row(env.ledger, b.run_id, c, "done", 1, 2)
    bodies: dict[str, dict] = {}

    def enqueue(run_id, chunk_ids, record):
        name = task_name(run_id, chunk_ids)
        if name in bodies:
            return None
        bodies[name] = task_payload(DATASET.name, run_id, chunk_ids, record)
        return name

    a_before = run_versions(env.cache, a.run_id)
    done = rollback(env, b, fan_out_chunks=4, task_chunks=4, page_rows=3, enqueue=enqueue)
    assert done.mode == "queued" and done.tasks == 3 == done.tasks_new  # 4 + 4 + 1 chunks
    assert done.deleted.rows_scanned == 0  # nothing read or deleted here
    assert sorted(c for body in bodies.values() for c in body["chunks"]) == sorted(
        chunk_id(c) for c in chunks
    )
    # enqueueing again names the same tasks: the queue drops them as duplicates
    again = rollback(env, b, fan_out_chunks=4, task_chunks=4, page_rows=3, enqueue=enqueue)
    assert again.tasks == 3 and again.tasks_new == 0
    ctx = SimpleNamespace(
        dataset=DATASET, store=SimpleNamespace(table=env.cache), ledger=env.ledger
    )
    for body in bodies.values():
        assert handle_rollback_task(ctx, b, body, last=False)[0] == 200
    assert not run_versions(env.cache, b.run_id)
    assert run_versions(env.cache, a.run_id) == a_before
    record = next(
        r for r in rollback_history(env.ledger, DATASET.name) if r["record"] == done.record
    )
    assert record["tasks_done"] == 3 and record["queued_versions_deleted"] == 18


@pytest.mark.parametrize(
    "change, why",
    [
        ({"chunks": []}, "non-empty list"),
        ({"chunks": "1"}, "non-empty list"),
        ({"chunks": [True]}, "positive uint64"),
        ({"chunks": [-1]}, "positive uint64"),
        ({"chunks": list(range(1, MAX_TASK_CHUNKS + 2))}, "at most"),
        ({"chunks": [1]}, "layer-2 chunk ids"),
        ({"chunks": ["x"]}, "positive uint64"),
        ({"extra": 1}, "unknown field"),
        ({"run_id": ""}, "non-empty string"),
        ({"record": "run:x"}, "record must be"),
        ({"dataset": "other"}, "belongs to dataset"),
    ],
)
def test_a_malformed_rollback_task_is_rejected_permanently(env, change, why):
    b = bulk_run(env.ledger, 1_700_000_005_000)
    write_cells(env.cache, b.run_id, (0, 0, 0), b.cell_timestamp_ms)
    body = {**task_payload(DATASET.name, b.run_id, [chunk_id((0, 0, 0))]), **change}
    if "record" in change:
        body["record"] = change["record"]
    ctx = SimpleNamespace(
        dataset=DATASET, store=SimpleNamespace(table=env.cache), ledger=env.ledger
    )
    before = snapshot(env.cache)
    status, out = handle_rollback_task(ctx, b, body, last=False)
    assert status == 200 and out["status"] == "rejected" and why in out["error"]
    assert snapshot(env.cache) == before


def test_a_layer2_id_that_is_not_a_chunk_id_is_rejected(env):
    b = bulk_run(env.ledger, 1_700_000_005_000)
    ctx = SimpleNamespace(
        dataset=DATASET, store=SimpleNamespace(table=env.cache), ledger=env.ledger
    )
    body = task_payload(DATASET.name, b.run_id, [l2_ids((0, 0, 0))[0]])
    status, out = handle_rollback_task(ctx, b, body, last=False)
    assert status == 200 and out["status"] == "rejected" and "segment bits" in out["error"]


def test_the_task_deletes_only_versions_at_the_runs_own_timestamp(env):
    """A version naming the run at another time (not the run's own write) is kept."""
    b = bulk_run(env.ledger, 1_700_000_005_000)
    write_cells(env.cache, b.run_id, (0, 0, 0), b.cell_timestamp_ms)
    write_cells(env.cache, b.run_id, (0, 0, 0), b.cell_timestamp_ms + 7_000)
    ctx = SimpleNamespace(
        dataset=DATASET, store=SimpleNamespace(table=env.cache), ledger=env.ledger
    )
    body = task_payload(DATASET.name, b.run_id, [chunk_id((0, 0, 0))])
    assert handle_rollback_task(ctx, b, body, last=False)[1]["versions_deleted"] == ROWS_PER_CHUNK
    left = run_versions(env.cache, b.run_id)
    assert {tuple(v) for v in left.values()} == {((b.cell_timestamp_ms + 7_000) * 1000,)}
    cells = CellFilter(columns={FEATURE_FAMILY: None})
    assert all(
        all(
            s == (b.cell_timestamp_ms + 7_000) * 1000
            for col in r[FEATURE_FAMILY].values()
            for s, _ in col
        )
        for r in read_versions(env.cache, cells=cells).values()
    )


@pytest.mark.parametrize(
    "yes, tty, answer, expected",
    [
        (True, False, None, None),  # --yes: no question, whatever the terminal
        (False, False, None, 2),  # no terminal, no --yes: refused, never waits
        (False, True, "y", None),
        (False, True, "yes", None),
        (False, True, "n", 1),
        (False, True, "", 1),  # the default is no
        (False, True, EOFError, 1),
    ],
)
def test_destructive_commands_confirm_on_a_terminal_and_refuse_without_one(
    monkeypatch, capsys, yes, tty, answer, expected
):
    from l2cache_tools.cli import rollback_cmd

    asked = []

    def fake_input(prompt):
        asked.append(prompt)
        if answer is EOFError:
            raise EOFError
        return answer

    monkeypatch.setattr(rollback_cmd.sys.stdin, "isatty", lambda: tty, raising=False)
    monkeypatch.setattr("builtins.input", fake_input)
    args = SimpleNamespace(yes=yes)
    assert rollback_cmd.confirm(args, "roll back run r of d") == expected
    assert bool(asked) == (tty and not yes)
    if expected == 2:
        assert "pass --yes" in capsys.readouterr().err
