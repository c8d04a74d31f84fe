"""Rollbacks fence live writers, on the real Bigtable emulator (docs/design.md, "Rollback").

The writer is the real :func:`l2cache.compute.compute_chunk` (ledger marks, the fence
check, the write, the outcome) with the feature engine stubbed and a store that writes
synthetic rows carrying the run's lineage, slowed so that the rollback lands while
the run is writing. After ``fence_run`` + ``rollback_run_touched`` no version of the
run is left, the late chunks are refused and recorded, and the rollback is recorded
with who, the fence and the wait. Stream writes (``writing:`` marks) are waited for,
or taken into the rollback when silent; a closed stream run hands over to a successor.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pytest

import l2cache.compute as compute
from l2cache.config import parse_config
from l2cache.domain import ids
from l2cache.domain.attributes import ATTRIBUTES, FEATURE_FAMILY, LINEAGE_FAMILY
from l2cache.domain.failures import RunClosed
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import LEDGER_FAMILY, RunLedger, create_runs_table, new_run
from l2cache_ops.rollback import (
    FenceTimeout,
    fence_run,
    rollback_history,
    rollback_run_touched,
    run_versions,
)
from l2cache_ops.status import run_status

CONFIG = {
    "bigtable": {"project": "test-project", "instance": "test-instance"},
    "datasets": {
        "fz": {
            "segmentation": "file:///nonexistent",
            "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "fz"},
            "cache_table_id": "cache_fz",
            "resolution": [16, 16, 40],
            "chunk_size": [64, 64, 32],
            "voxel_offset": [0, 0, 0],
            "volume_size": [512, 512, 256],
            "spatial_bits": {1: 10, 2: 10, 3: 9},
        }
    },
}
DATASET = parse_config(CONFIG).dataset("fz")
BITS = DATASET.spatial_bits
ROWS = 4
CHUNKS = [(x, y, 0) for x in range(3) for y in range(2)]  # 6 chunks


def chunk_id(coords) -> int:
    return int(ids.chunk_id_from_coords(2, np.asarray([coords]), BITS)[0])


class SlowStore:
    """A cache store whose write is a few synthetic rows of the chunk with the run's
    lineage, as a worker writes them (feature and lineage cells at one timestamp)."""

    def __init__(self, table) -> None:
        self.table = table

    def write_features(self, feats, lineage) -> int:
        coords = feats["coords"]
        segs = np.arange(1, ROWS + 1, dtype=np.uint64)
        nodes = ids.encode_ids(2, np.tile(coords, (ROWS, 1)), segs, BITS).tolist()
        rows = []
        for node in nodes:
            row = Row(b"%020d" % node)
            for a in ATTRIBUTES:
                row.set_cell(FEATURE_FAMILY, a.key, b"v", lineage.cell_timestamp)
            for col in (b"run", b"params", b"code", b"input"):
                value = lineage.run_id if col == b"run" else "x"
                row.set_cell(LINEAGE_FAMILY, col, value.encode(), lineage.cell_timestamp)
            rows.append(row)
        write_rows(self.table, rows, "test")
        return len(rows)


@pytest.fixture()
def env(bigtable_emulator, monkeypatch):
    instance = bigtable_instance("test-project", "test-instance", admin=True)
    suffix = np.random.default_rng().integers(1e9)
    cache = create_cache_table(instance, f"cache_fz_{suffix}")
    ledger = RunLedger(create_runs_table(instance, f"runs_fz_{suffix}"))
    # the engine is not what is tested: features are the chunk's coordinates
    monkeypatch.setattr(compute, "compute_features", lambda dense, res: {"coords": dense})
    monkeypatch.setattr(
        compute,
        "chunk_qc",
        lambda feats, ds, graph_l2, inputs: SimpleNamespace(summary={}, bins={}),
    )
    ctx = compute.DatasetContext(DATASET, SlowStore(cache), None, ledger)  # type: ignore[arg-type]
    yield SimpleNamespace(cache=cache, ledger=ledger, ctx=ctx)
    cache.delete()
    ledger.table.delete()


def slow_load(coords, delay_s: float):
    def load():
        time.sleep(delay_s)
        return SimpleNamespace(
            checksum="c",
            dense=np.asarray(coords),
            sv_ids=np.zeros(1),
            unmapped_sv=0,
            orphan_voxels=0,
            ghost_sv=0,
            graph_l2=None,  # the graph could not list the chunk: QC counts its nodes
            l2_ids=np.zeros(0, dtype=np.uint64),
        )

    return load


def test_a_rollback_while_the_run_writes_leaves_no_row_of_it_and_is_recorded(env):
    run = new_run("bulk_ingest", DATASET, [0, 0, 0, 3, 2, 1], len(CHUNKS))
    env.ledger.create_run(run)
    results: list[dict] = []
    two_written = threading.Event()

    def writer() -> None:  # one worker going through its batch, chunk after chunk
        for c in CHUNKS:
            results.append(compute.compute_chunk(env.ctx, run, c, load=slow_load(c, 0.15)))
            if len(results) == 2:
                two_written.set()

    worker = threading.Thread(target=writer)
    worker.start()
    assert two_written.wait(30)
    assert run_versions(env.cache, run.run_id)  # the run is writing
    fence = fence_run(env.ledger, run, "tester@here", attempt_deadline_s=60, poll_s=0.02)
    done = rollback_run_touched(env.cache, env.ledger, run, BITS, fence=fence, by="tester@here")
    worker.join(30)
    assert not worker.is_alive()

    assert run_versions(env.cache, run.run_id) == {}  # nothing of the run is left
    late = [r for r in results if r["status"] == "failed"]
    assert late and all("late write refused" in r["error"] for r in late)
    assert len(results) == len(CHUNKS) and len(late) < len(CHUNKS) - 1
    written = sum(r["status"] == "done" for r in results)
    assert done.deleted.versions_deleted == written * ROWS  # exactly what it removed
    [record] = [r for r in rollback_history(env.ledger, DATASET.name) if r["run_id"] == run.run_id]
    assert record["by"] == "tester@here" and record["fence"]["closed"]["by"] == "tester@here"
    assert record["versions"] == written * ROWS and record["record"] == done.record
    st = run_status(env.ledger, run.run_id)
    assert st.closed and st.closed["reason"] == "rollback"
    assert st.failed == len(late)  # late writes are recorded, with the reason
    with pytest.raises(RunClosed):
        env.ledger.check_open(run)
    again = env.ledger.close_run(run.run_id, "someone else", "rollback")
    assert again == fence.closed  # stamped once


def test_the_fence_waits_for_a_stream_write_in_flight_and_takes_a_silent_one(env):
    run = new_run("edit_stream", DATASET, trigger="pubsub")
    env.ledger.create_run(run)
    busy = env.ledger.writing_started(run.run_id, chunk_id((1, 1, 1)), "op-1")
    timer = threading.Timer(0.4, env.ledger.writing_ended, [busy])
    timer.start()
    fence = fence_run(env.ledger, run, "t", attempt_deadline_s=60, poll_s=0.05)
    assert fence.waited_s >= 0.35 and fence.in_flight == 1 and fence.chunk_ids == []

    other = new_run("edit_stream", DATASET, trigger="pubsub")
    env.ledger.create_run(other)
    dead = env.ledger.writing_started(other.run_id, chunk_id((2, 2, 2)), "op-2")
    row = Row(dead)  # a worker died mid-write an hour ago
    old = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    row.set_cell(LEDGER_FAMILY, b"at", old.encode())
    write_rows(env.ledger.table, [row], "test")
    fence = fence_run(env.ledger, other, "t", attempt_deadline_s=60, poll_s=0.05)
    assert fence.silent == 1 and fence.chunk_ids == [chunk_id((2, 2, 2))]
    done = rollback_run_touched(env.cache, env.ledger, other, BITS, fence=fence, by="t")
    assert done.by_status == {"in flight": 1}  # its chunk is rolled back too


def test_a_fence_wait_is_bounded_and_a_closed_stream_run_hands_over(env):
    run = new_run("edit_stream", DATASET, trigger="pubsub")
    run.run_id = "edit_stream-fz-rev"
    env.ledger.create_run(run)
    env.ledger.writing_started(run.run_id, chunk_id((0, 0, 0)), "op")
    with pytest.raises(FenceTimeout, match="1 writer"):
        fence_run(env.ledger, run, "t", attempt_deadline_s=60, timeout_s=0.2, poll_s=0.05)
    # closed: the next messages of the stream go to a successor run, then the next
    template = new_run("edit_stream", DATASET, trigger="pubsub")
    template.run_id = "edit_stream-fz-rev"
    successor = env.ledger.ensure_run(template)
    assert successor.run_id == "edit_stream-fz-rev.2" and successor.closed is None
    env.ledger.close_run(successor.run_id, "t", "rollback")
    template.run_id = "edit_stream-fz-rev"
    assert env.ledger.ensure_run(template).run_id == "edit_stream-fz-rev.3"
