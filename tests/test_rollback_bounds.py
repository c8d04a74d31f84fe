"""Rollback and prune stay bounded at scale, on the real Bigtable emulator.

- a version's deletion on a new-layout table is its feature cells only (8 mutations,
  not 12): the four old-layout lineage columns are deleted only where the old layout
  was read (a table not marked migrated);
- ``lineage prune`` reads the feature rows its lineage rows name as chunk key ranges
  (contiguous), never by key;
- a rollback of 500 runs splits its server-side run regex into reads of at most
  :data:`lineage_rows.RUNS_PER_READ` runs, each filter well under Bigtable's ~20 KiB;
- a collision is recorded in the rollback's record as (row, micros, other runs), not
  only counted, and logged by the one core function the ops side uses too.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import numpy as np
import pytest
from lookup_support import PROJECT, dataset_entry

from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import ATTRIBUTES
from l2cache.domain.lineage import Lineage
from l2cache.gcp import bigtable as bt
from l2cache.gcp.bigtable import RowReader, bigtable_instance
from l2cache.handlers import rollback_task
from l2cache.handlers.rollback_task import (
    chunk_key_ranges,
    handle_rollback_task,
    record_key,
    rollback_chunks,
    task_payload,
)
from l2cache.store import lineage_rows
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache.store.ledger import RunLedger, create_runs_table, new_run

AT = datetime(2026, 6, 1, 12, 0, 0, 123000, tzinfo=UTC)
AT_MS = int(AT.timestamp() * 1000)
AT_US = AT_MS * 1000


@pytest.fixture(scope="module")
def inst(bigtable_emulator):
    return bigtable_instance(PROJECT, "inst", admin=True)


def _store(inst, table_id: str) -> CacheStore:
    cfg = parse_config(
        {
            "datasets": {"d": dataset_entry(table_id)},
            "bigtable": {"project": PROJECT, "instance": "inst"},
        }
    )
    return CacheStore(create_cache_table(inst, table_id), cfg.dataset("d"))


def _ids(store: CacheStore, n: int, x: int = 1, first: int = 5) -> list[int]:
    bits = store.dataset.spatial_bits
    segs = list(range(first, first + n))
    return [int(v) for v in idlib.encode_ids(2, [[x, 1, 1]] * n, segs, bits)]


def _feats(ids: list[int], value: int = 1) -> dict[str, np.ndarray]:
    out = {"l2id": np.array(ids, np.uint64)}
    for attr in ATTRIBUTES:
        out[attr.name] = np.full((len(ids), *attr.shape), value, dtype=attr.dtype)
    return out


def _chunk(store: CacheStore, node: int) -> int:
    return int(idlib.get_chunk_id(np.array([node], np.uint64), store.dataset.spatial_bits)[0])


def _spy_writes(monkeypatch) -> list:
    written: list = []
    real = rollback_task.write_rows

    def spy(table, rows, what):
        written.extend(rows)
        return real(table, rows, what)

    monkeypatch.setattr(rollback_task, "write_rows", spy)
    return written


@pytest.mark.parametrize("migrated, per_version", [(True, 8), (False, 12)])
def test_a_version_deletes_old_layout_lineage_cells_only_on_an_unmigrated_table(
    inst, monkeypatch, migrated, per_version
):
    store = _store(inst, f"delete_cells_{migrated}")
    if migrated:  # made by l2cache with lineage rows, or migrated completely
        lineage_rows.mark_migrated(store.table)
    assert lineage_rows.is_migrated(RowReader(store.table)) is migrated
    ids = _ids(store, 3)
    store.write_features(_feats(ids), Lineage("bulk-a", "p", "c", "i", AT))
    written = _spy_writes(monkeypatch)
    done = rollback_chunks(
        store.table, ["bulk-a"], [_chunk(store, ids[0])], store.dataset.spatial_bits
    )
    assert done.versions_deleted == 3
    features = [r for r in written if not lineage_rows.is_lineage_key(r.key)]
    assert [len(r.mutations) for r in features] == [per_version] * 3
    assert len(ATTRIBUTES) == 8  # one delete per feature column, + 4 old lineage columns
    left = RowReader(store.table).versions(keys=idlib.row_keys(ids))
    assert left == {}  # every version gone either way


def test_prune_reads_the_named_rows_as_chunk_ranges_never_by_key(inst, monkeypatch):
    store = _store(inst, "prune_ranges")
    bits = store.dataset.spatial_bits
    a = _ids(store, 50, x=1)
    b = _ids(store, 50, x=2)
    store.write_features(_feats(a), Lineage("bulk-a", "p", "c", "i", AT))
    store.write_features(_feats(b), Lineage("bulk-b", "p", "c", "i", AT))
    store.write_features(_feats(a[:10], 2), Lineage("edit-c", "p", "c", "i", AT.replace(second=5)))
    # chunk b's versions vanish (as GC or a rollback without its lineage delete leaves them)
    for n in b:
        row = store.table.direct_row(b"%020d" % n)
        row.delete()
        row.commit()
    calls: list[tuple] = []
    real = bt.RowReader.versions

    def spy(self, **kw):
        calls.append((kw.get("keys"), kw.get("ranges")))
        return real(self, **kw)

    monkeypatch.setattr(bt.RowReader, "versions", spy)
    done = lineage_rows.prune_rows(store.table, grace_s=0, page=2)
    assert (done.scanned, done.deleted) == (3, 1)  # chunk b's row named nothing left
    assert all(keys is None for keys, _ in calls)  # no read by key
    named = [r for _, r in calls if r and not r[0][0].startswith(lineage_rows.PREFIX)]
    assert len(named) == 2  # one read per page of lineage rows
    assert named[0] == [(b"%020d" % a[0], b"%020d" % a[-1] + b"\x00")]  # two rows, one span
    monkeypatch.setattr(bt.RowReader, "versions", real)
    keys = list(RowReader(store.table).versions(prefix=lineage_rows.PREFIX))
    assert sorted(lineage_rows.parse_key(k)[2] for k in keys) == ["bulk-a", "edit-c"]
    ranges = chunk_key_ranges([_chunk(store, a[0])], bits)
    assert len(lineage_rows.run_versions(RowReader(store.table), ["bulk-a"], ranges).rows) == 50


def test_a_rollback_of_500_runs_splits_its_run_regex(inst, monkeypatch):
    store = _store(inst, "many_runs")
    runs = [f"missing_ids-some_long_dataset_name-{i:04d}-{'x' * 24}" for i in range(500)]
    ids = _ids(store, 3)
    for i, n in zip((0, 250, 499), ids, strict=True):
        store.write_features(_feats([n]), Lineage(runs[i], "p", "c", "i", AT))
    store.write_features(_feats(ids), Lineage("not-named", "p", "c", "i", AT.replace(second=9)))
    filters: list[int] = []
    real = bt.RowReader.versions

    def spy(self, **kw):
        cells = kw.get("cells")
        if cells is not None and cells.key_regex:
            filters.append(cells.to_pb().ByteSize())
        return real(self, **kw)

    monkeypatch.setattr(bt.RowReader, "versions", spy)
    assert len(lineage_rows.runs_key_regex(runs)) > 20 * 1024  # one regex: over the limit
    ranges = chunk_key_ranges([_chunk(store, ids[0])], store.dataset.spatial_bits)
    found = lineage_rows.run_versions(RowReader(store.table), runs, ranges)
    assert len(filters) == 5 and max(filters) < 8 * 1024  # 100 runs per read
    assert {k: sorted(v) for k, v in found.rows.items()} == {
        b"%020d" % n: [runs[i]] for i, n in zip((0, 250, 499), ids, strict=True)
    }
    assert found.lineage_rows_read == 3


def test_a_tasks_collisions_are_recorded_as_row_and_micros_pairs(inst, caplog):
    from l2cache_ops.ledger import put_record
    from l2cache_ops.rollback import rollback_history

    store = _store(inst, "collided_record")
    ledger = RunLedger(create_runs_table(inst, "runs_collided_record"))
    run = new_run("bulk_ingest", store.dataset, [0, 0, 0, 8, 8, 8], 1)
    run.cell_timestamp_ms = AT_MS
    ledger.create_run(run)
    a, b = _ids(store, 2)
    store.write_features(_feats([a, b]), Lineage(run.run_id, "p", "c", "i", AT))
    store.write_features(_feats([b], 2), Lineage("other-run", "p", "c", "i", AT))
    key = record_key(store.dataset.name, AT_MS + 1, run.run_id)
    put_record(ledger, key, {"meta": json.dumps({"record": key}).encode()})
    ctx = type("Ctx", (), {"dataset": store.dataset, "store": store, "ledger": ledger})()
    body = task_payload(store.dataset.name, run.run_id, [_chunk(store, a)], key)
    with caplog.at_level(logging.WARNING):
        status, out = handle_rollback_task(ctx, run, body, last=False)
    assert status == 200 and out["versions_deleted"] == 2 and out["collisions"] == 1
    pair = [(b"%020d" % b).decode(), AT_US, ["other-run"]]
    assert out["collided"] == [pair]
    (entry,) = [e for e in rollback_history(ledger, store.dataset.name) if e["record"] == key]
    assert entry["queued_collisions"] == 1 and entry["queued_collided"] == [pair]
    assert sum("also written by other-run" in r.getMessage() for r in caplog.records) == 1


def test_collided_pairs_are_bounded():
    many = {(b"%020d" % i, AT_US): {"x"} for i in range(1500)}
    pairs = rollback_task.collided_pairs(many)
    assert len(pairs) == rollback_task.MAX_COLLIDED
    assert pairs[0] == [f"{0:020d}", AT_US, ["x"]]
    total = rollback_task.ChunkRollback(collided=pairs[:600])
    total.add(rollback_task.ChunkRollback(collided=pairs[600:]))
    total.add(rollback_task.ChunkRollback(collided=pairs[:10]))
    assert total.collided == pairs  # the first 1,000, never more
