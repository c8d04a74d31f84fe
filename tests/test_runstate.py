"""A run's incrementally kept state: counted once per chunk, readable without the ledger.

Against the Bigtable emulator: the workers' ledger calls move the box counters, the
minute rows, the failure and in-flight rows; status reads those (a run whose chunk rows
are gone still reads the same); ``recount`` repairs a counter a killed worker left short.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.domain.lineage import utc_now
from l2cache.domain.statgrid import StatGrid
from l2cache.gcp.bigtable import bigtable_instance, read_rows
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.store import runstate
from l2cache.store.ledger import RunLedger, create_runs_table, new_run
from l2cache_ops.runstate import failures_page, live_chunks, read_counts, recount
from l2cache_ops.status import run_status

MAP = {
    "bigtable": {"project": "p", "instance": "runstate"},
    "datasets": {
        "ds": {
            "segmentation": "file:///unused",
            "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "g"},
            "cache_table_id": "cache_ds",
            "resolution": [8, 8, 40],
            "voxel_offset": [0, 0, 0],
            "chunk_size": [64, 64, 64],
            "volume_size": [64 * 8, 64 * 8, 64 * 4],
            "spatial_bits": {"1": 10, "2": 10},
        }
    },
}


def test_grid_boxes_tile_the_region_and_stay_bounded():
    for region in ([0, 0, 0, 3, 2, 1], [5, 6, 7, 40, 30, 20], [0, 0, 0, 1400, 900, 600]):
        grid = StatGrid.for_region(region)
        assert grid.n_cells <= 512
        lo, hi = np.array(region[:3]), np.array(region[3:])
        corners = [lo, hi - 1, (lo + hi) // 2]
        cells = [grid.cell_of(c) for c in corners]
        for c, cell in zip(corners, cells, strict=True):
            box = grid.cell_box(cell)
            assert all(box[a] <= c[a] < box[a + 3] for a in range(3))
        assert cells[0] == 0 and cells[1] == grid.n_cells - 1
    assert StatGrid.from_json(StatGrid.for_region([0, 0, 0, 4, 4, 4]).to_json()).n_cells == 64


@pytest.fixture
def ledger(bigtable_emulator):
    instance = bigtable_instance("p", "runstate", admin=True)
    return RunLedger(create_runs_table(instance, "runs_state"))


@pytest.fixture
def run(ledger):
    ds = parse_config(MAP).dataset("ds")
    record = new_run("region_reprocess", ds, [0, 0, 0, 4, 4, 2], 32)
    ledger.create_run(record)
    return record, ds


def _cid(ds, coords):
    return int(idlib.chunk_id_from_coords(2, np.array([coords]), ds.spatial_bits)[0])


def test_each_chunk_counts_once_whatever_the_deliveries(ledger, run):
    record, ds = run
    a, b, c = [0, 0, 0], [3, 3, 1], [1, 2, 0]
    ca, cb, cc = (_cid(ds, x) for x in (a, b, c))
    for _ in range(2):  # a duplicate delivery computes and finishes the chunk again
        ledger.chunk_started(record, ca, a)
        ledger.chunk_finished(record, ca, a, "done", l2_count=10, duration_s=1.5, voxels=100)
    ledger.chunk_started(record, cb, b)
    ledger.chunk_finished(record, cb, b, "retrying", attempt=1, error="Unavailable")
    ledger.chunk_started(record, cb, b)
    ledger.chunk_finished(record, cb, b, "done", l2_count=5, duration_s=0.5, voxels=50)
    ledger.chunk_finished(record, cb, b, "failed", attempt=3, error="late")  # never undoes done
    ledger.chunk_started(record, cc, c)
    ledger.chunk_finished(record, cc, c, "failed", attempt=1, error="MissingInput: gone")

    counts = read_counts(ledger, record.run_id)
    assert (counts["done"], counts["failed"], counts["retrying"]) == (2, 1, 0)
    assert (counts["l2"], counts["compute_ms"], counts["voxels"]) == (15, 2000, 150)
    assert counts["attempts"] == 5 and counts["started"] == 3 and counts["retried"] == 2
    assert counts["recovered"] == 1
    grid = record.stat_grid
    assert counts.cells[grid.cell_of(a)]["done"] == 1  # the box of the chunk, not another
    assert counts.cells[grid.cell_of(c)]["failed"] == 1
    page, after = failures_page(ledger, record.run_id)
    assert [(r["coords"], r["status"], r["attempts"]) for r in page] == [(c, "failed", 1)]
    assert after is None
    assert live_chunks(ledger, record.run_id) == []  # every attempt reported

    st = run_status(ledger, record.run_id)
    assert (st.done, st.failed, st.retrying, st.running, st.pending) == (2, 1, 0, 0, 29)
    assert st.cost.chunks == 2 and st.l2_rows == 15


def test_status_is_read_from_the_state_rows_not_the_ledger(ledger, run):
    record, ds = run
    coords = [[x, y, 0] for x in range(4) for y in range(4)]
    for i, c in enumerate(coords):
        cid = _cid(ds, c)
        ledger.chunk_started(record, cid, c)
        if i < 12:
            ledger.chunk_finished(record, cid, c, "done", l2_count=1, duration_s=0.1)
        elif i < 14:
            ledger.chunk_finished(record, cid, c, "retrying", attempt=1, error="Unavailable")
    before = run_status(ledger, record.run_id)
    assert (before.done, before.retrying, before.running) == (12, 2, 2)
    # drop every chunk row: only the counters, failure and in-flight rows are left
    chunk_rows = read_rows(ledger.table, prefix=f"chunk:{record.run_id}:".encode())
    write_rows(ledger.table, [Row(k).delete_row() for k in chunk_rows], "test")
    after = run_status(ledger, record.run_id)
    assert (after.done, after.retrying, after.running, after.l2_rows) == (12, 2, 2, 12)


def test_a_retry_that_never_comes_and_a_dead_worker_are_presumed(ledger, run):
    record, ds = run
    waiting, dead = [0, 0, 1], [1, 1, 1]
    cw, cd = _cid(ds, waiting), _cid(ds, dead)
    for attempt in (1, 2, 3):
        ledger.chunk_started(record, cw, waiting)
        ledger.chunk_finished(record, cw, waiting, "retrying", attempt=attempt, error="x")
    ledger.chunk_started(record, cd, dead)  # its worker never answers
    kw = {"max_attempts": 3, "attempt_deadline_s": 60}
    soon = run_status(ledger, record.run_id, **kw)
    assert (soon.retrying, soon.running, soon.failed) == (1, 1, 0)
    later = run_status(ledger, record.run_id, now=utc_now() + timedelta(seconds=61), **kw)
    assert later.failed == 1 and later.retrying == 1 and later.running == 0
    # the retry that never came is failed; the dead worker's chunk awaits its retry
    assert sorted((f["chunk"], f["status"]) for f in later.failures) == [
        (waiting, "failed"),
        (dead, "retrying"),
    ]
    assert [f["kind"] for f in soon.failures] == ["chunk"]  # the recorded retrying one


def test_recount_repairs_a_counter_a_killed_worker_left_short(ledger, run):
    record, ds = run
    c = [2, 2, 1]
    cid = _cid(ds, c)
    ledger.chunk_started(record, cid, c)
    ledger.chunk_finished(record, cid, c, "done", l2_count=7, duration_s=0.25, voxels=9)
    key = runstate.stat_key(record.run_id, record.stat_grid.cell_of(c))
    runstate.add_counts(ledger.table, key, {b"done": -1, b"l2": -7})  # the lost increment
    assert read_counts(ledger, record.run_id)["done"] == 0
    fixed = recount(ledger, record, page=1)
    assert fixed == {"done": 1, "l2": 7}
    counts = read_counts(ledger, record.run_id)
    assert (counts["done"], counts["l2"], counts["compute_ms"]) == (1, 7, 250)
    assert recount(ledger, record) == {}  # exact now: nothing to correct


def test_a_runs_table_without_the_index_family_still_records_and_counts_events(
    bigtable_emulator, caplog
):
    """A runs table deployed before the ``idx`` family (not yet ``pulumi up``): a
    missing-id event's record and count stand; only its ``msg:`` index is lost, logged."""
    from l2cache.store.ledger import INDEX_FAMILY, LEDGER_FAMILY, message_key

    instance = bigtable_instance("p", "runstate", admin=True)
    table = create_runs_table(instance, "runs_no_idx")
    table.column_family(INDEX_FAMILY).delete()
    assert INDEX_FAMILY not in table.list_column_families()
    ledger = RunLedger(table)
    ds = parse_config(MAP).dataset("ds")
    record = new_run("missing_ids", ds, [0, 0, 0, 4, 4, 2], 32)
    ledger.create_run(record)
    with caplog.at_level("WARNING", logger="l2cache.store.ledger"):
        ledger.record_event(
            record.run_id, "msg-m1", kind="missing_ids", message_id="m1", status="ok"
        )
    event = table.read_row(f"event:{record.run_id}:msg-m1".encode())
    assert event is not None and b"status" in event.cells[LEDGER_FAMILY]
    assert table.read_row(message_key("m1")) is None
    assert any("msg:m1 index not written" in r.getMessage() for r in caplog.records)
    assert read_counts(ledger, record.run_id)["events"] == 1
