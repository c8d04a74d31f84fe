"""Lineage rows under the cases that broke them, on the real Bigtable emulator.

- two writes of one stream run in one chunk in the same millisecond (missing-id messages
  share a run and write at their publish time): both keep their lineage and a rollback
  of the run deletes both;
- two runs writing one cell in the same millisecond: Bigtable keeps one value, both
  lineage rows name it, readers report both candidates, a rollback counts the collision;
- ``lineage migrate`` crashing between its lineage-row writes and its deletes, then re-run:
  no lineage is lost; it pages (bounded reads) and marks the table migrated at the end;
- ``lineage prune`` between a write's lineage row and its feature rows keeps the row;
- a rollback's lineage read returns only the run's lineage rows (server-side key filter)
  and skips the old-layout pass on a migrated table.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from lookup_support import PROJECT, dataset_entry

import l2cache.store.cache as cachemod
from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import ATTRIBUTES
from l2cache.domain.lineage import Lineage
from l2cache.gcp.bigtable import RowReader, bigtable_instance
from l2cache.handlers.rollback_task import chunk_key_ranges, rollback_chunks
from l2cache.store import lineage_rows
from l2cache.store.cache import CacheStore, create_cache_table

AT = datetime(2026, 6, 1, 12, 0, 0, 123000, tzinfo=UTC)  # one publish millisecond
STREAM = "missing_ids-d-abc-123"
AT_US = int(AT.timestamp() * 1000) * 1000


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
    ds = cfg.dataset("d")
    return CacheStore(create_cache_table(inst, table_id), ds)


def _ids(store: CacheStore, n: int) -> list[int]:
    bits = store.dataset.spatial_bits
    return [int(x) for x in idlib.encode_ids(2, [[1, 1, 1]] * n, list(range(5, 5 + n)), bits)]


def _feats(ids: list[int], value: int = 1) -> dict[str, np.ndarray]:
    out = {"l2id": np.array(ids, np.uint64)}
    for attr in ATTRIBUTES:
        out[attr.name] = np.full((len(ids), *attr.shape), value, dtype=attr.dtype)
    return out


def _chunk(store: CacheStore, node: int) -> int:
    return int(idlib.get_chunk_id(np.array([node], np.uint64), store.dataset.spatial_bits)[0])


def _feature_rows(store: CacheStore, ids: list[int]) -> list[int]:
    return sorted(int(k) for k in RowReader(store.table).versions(keys=idlib.row_keys(ids)))


def test_two_writes_of_one_run_in_one_millisecond_keep_both_lineages(inst):
    store = _store(inst, "collide_same_run")
    a, b = _ids(store, 2)
    store.write_features(_feats([a]), Lineage(STREAM, "p", "c", "in-A", AT))
    store.write_features(_feats([b]), Lineage(STREAM, "p", "c", "in-B", AT))
    found = store.read_lineage([a, b])
    assert {n: v[b"input"] for n, v in found.items()} == {a: b"in-A", b: b"in-B"}
    done = rollback_chunks(store.table, [STREAM], [_chunk(store, a)], store.dataset.spatial_bits)
    assert done.versions_deleted == 2
    assert done.collisions == 0
    assert _feature_rows(store, [a, b]) == []
    assert not RowReader(store.table).versions(prefix=lineage_rows.PREFIX)


def test_two_runs_writing_one_cell_in_one_millisecond_are_both_reported(inst):
    store = _store(inst, "collide_two_runs")
    a, b = _ids(store, 2)
    store.write_features(_feats([a, b], 1), Lineage("run-one", "p", "c", "i1", AT))
    store.write_features(_feats([a], 2), Lineage("run-two", "p", "c", "i2", AT))
    # one value survives in a; both lineage rows name it: no reader may pick one
    cands = lineage_rows.lineage_candidates(store.reader, [a, b], store.dataset.spatial_bits)
    assert sorted(c[b"run"] for c in cands[a]) == [b"run-one", b"run-two"]
    assert [c[b"run"] for c in cands[b]] == [b"run-one"]
    found = store.read_lineage([a, b])
    assert found[a][b"candidates"] == b"run-one run-two"
    assert b"candidates" not in found[b]
    bits = store.dataset.spatial_bits
    done = rollback_chunks(store.table, ["run-one"], [_chunk(store, a)], bits)
    assert done.versions_deleted == 2
    assert done.collisions == 1  # a's value may have been run-two's: counted, reported
    assert done.collided == [[(b"%020d" % a).decode(), AT_US, ["run-two"]]]  # and named
    # run-two's lineage row stays (it names a version now gone: prune's to remove)
    keys = list(RowReader(store.table).versions(prefix=lineage_rows.PREFIX))
    assert [lineage_rows.parse_key(k)[2] for k in keys] == ["run-two"]


def _write_old_layout(store: CacheStore, ids: list[int], run_id: str) -> None:
    for n in ids:
        r = store.table.direct_row(b"%020d" % n)
        for attr in ATTRIBUTES:
            r.set_cell("0", attr.key, np.ones(attr.shape, attr.dtype).tobytes(), AT)
        for c, v in ((b"run", run_id.encode()), (b"params", b"p"), (b"code", b"c")):
            r.set_cell("lineage", c, v, AT)
        r.set_cell("lineage", b"input", b"x", AT)
        r.commit()


def test_migrate_rerun_after_a_crash_mid_delete_keeps_every_lineage(inst, monkeypatch):
    store = _store(inst, "migrate_crash")
    marker = store.table.direct_row(lineage_rows.MIGRATED_KEY)  # a table made before it
    marker.delete()
    marker.commit()
    ids = _ids(store, 3)
    _write_old_layout(store, ids, "bulk-1")
    bits = store.dataset.spatial_bits
    real = lineage_rows.write_rows
    calls: list[int] = []

    def crash_in_deletes(table, rows, what):
        calls.append(len(rows))
        if len(calls) == 2:  # the first page's deletes: one row applied, then the crash
            real(table, rows[:1], what)
            raise RuntimeError("crash mid-delete")
        return real(table, rows, what)

    monkeypatch.setattr(lineage_rows, "write_rows", crash_in_deletes)
    with pytest.raises(RuntimeError):
        lineage_rows.migrate_rows(store.table, bits)
    monkeypatch.setattr(lineage_rows, "write_rows", real)
    assert not lineage_rows.is_migrated(RowReader(store.table))
    again = lineage_rows.migrate_rows(store.table, bits, page=1)
    assert (again.rows, again.pages) == (2, 2)  # the two rows left, one per page
    assert lineage_rows.is_migrated(RowReader(store.table))
    found = lineage_rows.lineage_of(RowReader(store.table), ids, bits)
    assert {n: v[b"run"] for n, v in found.items()} == dict.fromkeys(ids, b"bulk-1")
    # nothing of the old layout is left, and the run rolls back completely
    assert not RowReader(store.table).versions(
        keys=idlib.row_keys(ids), cells=lineage_rows.CellFilter(columns={"lineage": None})
    )
    done = rollback_chunks(store.table, ["bulk-1"], [_chunk(store, ids[0])], bits)
    assert done.versions_deleted == 3 and _feature_rows(store, ids) == []


def test_prune_between_a_writes_lineage_row_and_its_feature_rows_keeps_the_row(inst, monkeypatch):
    store = _store(inst, "prune_race")
    (a,) = _ids(store, 1)
    real = cachemod.mutate_entries
    pruned = []

    def prune_in_between(channel, name, entries, what):
        real(channel, name, entries, what)
        if what == "lineage":  # the lineage row is stored, the feature rows not yet
            pruned.append(lineage_rows.prune_rows(store.table))

    monkeypatch.setattr(cachemod, "mutate_entries", prune_in_between)
    store.write_features(_feats([a]), Lineage("edit_stream-x", "p", "c", "i", AT))
    monkeypatch.setattr(cachemod, "mutate_entries", real)
    assert (pruned[0].scanned, pruned[0].deleted, pruned[0].young) == (1, 0, 1)
    assert store.read_lineage([a])[a][b"run"] == b"edit_stream-x"
    # once past the grace period a lineage row naming no version is pruned
    row = store.table.direct_row(b"%020d" % a)
    row.delete()
    row.commit()
    later = lineage_rows.prune_rows(store.table, grace_s=0)
    assert (later.scanned, later.deleted, later.young) == (1, 1, 0)


def test_a_rollbacks_lineage_read_returns_only_the_runs_rows(inst):
    store = _store(inst, "run_filter")
    ids = _ids(store, 4)
    for i, n in enumerate(ids):
        store.write_features(_feats([n]), Lineage(f"other-{i}", "p", "c", "i", AT))
    store.write_features(_feats(ids[:1]), Lineage("mine", "p", "c", "i", AT))
    reader = RowReader(store.table)
    lineage_rows.mark_migrated(store.table)
    ranges = chunk_key_ranges([_chunk(store, ids[0])], store.dataset.spatial_bits)
    found = lineage_rows.run_versions(reader, ["mine"], ranges)
    assert found.lineage_rows_read == 1  # the run's row only: the others stay on the server
    assert found.old_layout_read is False  # a migrated table has no lineage:run cells
    assert sorted(found.rows) == [b"%020d" % ids[0]]


def test_which_kvdbclient_reads_reach_lineage_rows(inst, monkeypatch):
    """kvdbclient 0.7's ``BigTableClient`` (the existing frontend's) on a table l2cache
    wrote: reads by id and id ranges never return a lineage row (``read_nodes`` refuses a
    range without both ends, and every ``%020d`` key sorts before ``l``); only the raw
    whole-table ``read_all_rows`` returns them, and their keys are no node ids."""
    from kvdbclient import BigTableClient, get_default_client_info
    from kvdbclient.exceptions import PreconditionError
    from kvdbclient.serializers import deserialize_uint64

    monkeypatch.setenv("BIGTABLE_PROJECT", PROJECT)
    monkeypatch.setenv("BIGTABLE_INSTANCE", "inst")
    store = _store(inst, "kvdb_reach")
    ids = _ids(store, 3)
    store.write_features(_feats(ids), Lineage("bulk-k", "p", "c", "i", AT))
    lineage_rows.mark_migrated(store.table)
    client = BigTableClient("kvdb_reach", config=get_default_client_info().CONFIG)
    with pytest.raises(PreconditionError):
        client.read_nodes(start_id=np.uint64(ids[0]))  # open-ended: refused, reads nothing
    everything = client.read_nodes(
        start_id=np.uint64(0),
        end_id=np.uint64(np.iinfo(np.uint64).max),
        end_id_inclusive=True,
        attr_keys=False,
    )
    assert sorted(int(k) for k in everything) == ids  # the widest id range: no lineage row
    raw = sorted(client.read_all_rows().rows)
    assert [k for k in raw if not k.isdigit()] == [
        lineage_rows.MIGRATED_KEY,  # '!' sorts before '#'
        *sorted(k for k in raw if lineage_rows.is_lineage_key(k)),
    ]
    assert len([k for k in raw if lineage_rows.is_lineage_key(k)]) == 1
    with pytest.raises(ValueError):
        deserialize_uint64(raw[-1])  # a caller turning raw keys into ids trips here


def test_release_and_full_scan_rollbacks_count_collisions_too(inst):
    from l2cache_ops.rollback import rollback_runs_in_ranges, run_versions

    store = _store(inst, "collide_release")
    a, b = _ids(store, 2)
    bits = store.dataset.spatial_bits
    store.write_features(_feats([a]), Lineage(STREAM, "p", "c", "in-A", AT))
    store.write_features(_feats([b]), Lineage(STREAM, "p", "c", "in-B", AT))
    store.write_features(_feats([b], 2), Lineage("other", "p", "c", "in-O", AT))
    assert run_versions(store.table, STREAM) == {
        b"%020d" % a: [AT_US],
        b"%020d" % b: [AT_US],
    }
    ranges = chunk_key_ranges([_chunk(store, a)], bits)
    done = rollback_runs_in_ranges(store.table, [STREAM], ranges)
    assert (done.versions_deleted, done.collisions) == (2, 1)
    assert _feature_rows(store, [a, b]) == []
