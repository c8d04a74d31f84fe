"""Per-id state from recorded facts, through the real lookup function (functions-framework)
against the Bigtable and Pub/Sub emulators (issue 20, item 3).

An edit's ids are pending by their operation while on_edit works on it, and failed with
the ledger's reason as soon as it failed (no 15-minute guess from the graph's
``children`` age); a bulk run's permanently failed chunk makes its ids read failed with
the run and reason until a later run computes the chunk. Every edit and failure goes
through l2cache's own code: on_edit's ``handle_message``, the worker's ``compute_chunk``
and the ledger's ``chunk_finished``.
"""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import requests
import yaml
from google.cloud import pubsub_v1

from l2cache.compute import chunk_id, compute_chunk, dataset_context
from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.domain.lineage import Lineage
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import bigtable_instance, read_rows
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache.store.ledger import (
    INDEX_FAMILY,
    LEDGER_FAMILY,
    RunLedger,
    chunk_failure_key,
    create_runs_table,
    edit_index_key,
    new_run,
)
from l2cache.store.missing_guard import create_guard_table
from l2cache_tools.local.functions import start_function

PROJECT = "idfacts"
INSTANCE = "inst"
GRID = 4
BITS = {1: 10, 2: 10, 3: 9}
RES = (16.0, 16.0, 40.0)
RUNS = "idfacts_runs"


def _config(tmp) -> dict:
    return {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "pubsub": {
            "project": PROJECT,
            "missing_ids_topic": "missing",
            "max_delivery_attempts": 1,  # the first failure is the last: recorded failed
        },
        "runs_table_id": RUNS,
        "lookup_wait": {"max_s": 3, "max_ids": 50},
        "missing_ids": {"guard_table_id": "idfacts_guard"},
        "datasets": {
            "facts": {
                "segmentation": f"file://{tmp}/no-such-segmentation",
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": INSTANCE,
                    "table_id": "idfacts_graph",
                },
                "cache_table_id": "idfacts_cache",
                "resolution": list(RES),
                "voxel_offset": [0, 0, 0],
                "chunk_size": [96, 96, 48],
                "volume_size": [96 * GRID, 96 * GRID, 48 * GRID],
                "spatial_bits": BITS,
            }
        },
    }


SPATIAL = parse_config(_config("/x")).dataset("facts").spatial_bits


def l2(chunk, seg: int) -> int:
    return int(idlib.encode_ids(2, np.array([chunk]), np.array([seg]), SPATIAL)[0])


def sv(chunk, seg: int) -> int:
    return int(idlib.encode_ids(1, np.array([chunk]), np.array([seg]), SPATIAL)[0])


# edits: made "now" in the graph, so the children-age guess would say pending for 15 min
STRAY = [l2((1, 2, 3), s) for s in (1, 2, 3)]  # children in another chunk: fails for good
SLOW = [l2((2, 0, 1), s) for s in (4, 5)]  # in flight, then gives up (no segmentation)
# a bulk run's chunk: its ids were in the graph before the run
BULK_CHUNK = (3, 3, 0)
BULK = [l2(BULK_CHUNK, s) for s in (6, 7, 8)]
AFTER_RUN = l2(BULK_CHUNK, 9)  # made by an edit after the run's snapshot
OP_STRAY, OP_SLOW = 7001, 7002


@pytest.fixture(scope="module")
def stack(bigtable_emulator, pubsub_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idfacts")
    cfg = _config(tmp)
    (tmp / "l2cache.yaml").write_text(yaml.safe_dump(cfg))
    config = parse_config(cfg)
    dataset = config.dataset("facts")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    cache = create_cache_table(instance, "idfacts_cache")
    create_guard_table(instance, "idfacts_guard")
    runs = create_runs_table(instance, RUNS)
    graph = instance.table("idfacts_graph")
    if not graph.exists():
        graph.create(column_families={"0": None})
    old = datetime(2026, 1, 1, tzinfo=UTC)
    now = datetime.now(UTC)

    def children(node: int, chunk) -> bytes:
        return np.array([sv(chunk, int(node) & 0xFFFF)], dtype="<u8").tobytes()

    rows = [
        Row(idlib.row_key(n)).set_cell("0", b"children", children(n, (0, 0, 0)), now) for n in STRAY
    ]
    rows += [
        Row(idlib.row_key(n)).set_cell("0", b"children", children(n, (2, 0, 1)), now) for n in SLOW
    ]
    rows += [
        Row(idlib.row_key(n)).set_cell("0", b"children", children(n, BULK_CHUNK), old) for n in BULK
    ]
    later = now + timedelta(days=1)  # the graph made it after the bulk run's snapshot
    rows.append(
        Row(idlib.row_key(AFTER_RUN)).set_cell(
            "0", b"children", children(AFTER_RUN, BULK_CHUNK), later
        )
    )
    write_rows(graph, rows)

    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(PROJECT, "missing")
    publisher.create_topic(name=topic)
    fn = start_function(
        "lookup",
        {
            "L2CACHE_CONFIG": str(tmp / "l2cache.yaml"),
            **bigtable_emulator.env,
            **pubsub_emulator.env,
        },
        log_dir=tmp,
    )
    yield {
        "url": f"http://{fn.host}/l2cache/api/v1/table/facts/attributes",
        "config": config,
        "dataset": dataset,
        "store": CacheStore(cache, dataset),
        "runs": runs,
    }
    fn.stop()


def states_of(stack, l2ids) -> tuple[dict, requests.Response]:
    """The lookup's per-id states (nothing queued: ``update_cache=false``)."""
    r = requests.post(
        stack["url"],
        json={"l2_ids": list(l2ids)},
        params={"state": "true", "update_cache": "false"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["state"], r


def edit_message(op: int, l2ids: list[int]) -> bytes:
    """PCG's edit message body (builtins only, as its publish_edit pickles it)."""
    return pickle.dumps({"operation_id": op, "new_lvl2_ids": l2ids, "new_root_ids": [1]})


def test_an_edit_whose_chunk_fails_for_good_reads_failed_with_the_reason(stack):
    from l2cache.handlers.on_edit import handle_message

    published = datetime.now(UTC).replace(microsecond=0)
    result = handle_message(
        stack["config"],
        edit_message(OP_STRAY, STRAY),
        {"table_id": "facts"},
        "m-stray",
        None,
        published,
    )
    assert result["status"] == "partial", result  # the chunk failed: dead-lettered, acknowledged
    st, r = states_of(stack, STRAY)
    for node in STRAY:
        s = st[str(node)]
        assert s["state"] == "failed", s  # not "pending (by an edit)" for 15 minutes
        assert "graph disagrees with itself" in s["reason"]
        assert s["by"] == {
            "queue": "edit",
            "operation_id": OP_STRAY,
            "message_id": "m-stray",
            "run": s["by"]["run"],
            "event": f"op-{OP_STRAY}",
        }
        assert s["by"]["run"].startswith("edit_stream-facts-")
    # guard, the runs table's index rows, the event's rows, the failed ids' cache rows
    # again (written late?); the graph not at all (every id placed by its l2edit row)
    assert int(r.headers["X-L2Cache-State-Reads"]) == 4
    # the index: one row per new id, one cell, at the message's publish time
    keys = [edit_index_key("facts", n) for n in STRAY]
    rows = read_rows(stack["runs"], keys=keys)
    assert sorted(rows) == sorted(keys)
    sizes = []
    for key, row in rows.items():
        ((qualifier, value),) = row[INDEX_FAMILY].items()
        assert qualifier == b"event"
        pointer = json.loads(value)
        assert pointer["op"] == OP_STRAY and pointer["key"] == f"op-{OP_STRAY}"
        assert pointer["at"] == published.isoformat().replace("+00:00", "Z")
        sizes.append(len(key) + len(qualifier) + len(value))
    print(f"l2edit index: {max(sizes)} bytes per new id (key + column + value)")
    assert max(sizes) < 200


def test_an_edit_in_flight_is_pending_by_its_operation_then_failed_when_it_gives_up(
    stack, monkeypatch
):
    from l2cache.handlers import on_edit

    seen: dict = {}
    real = on_edit.compute_l2_ids

    def computing(*args, **kwargs):  # the lookup asked while on_edit computes the edit
        seen["during"] = states_of(stack, SLOW)[0]
        return real(*args, **kwargs)

    monkeypatch.setattr(on_edit, "compute_l2_ids", computing)
    published = datetime.now(UTC).replace(microsecond=0)
    result = on_edit.handle_message(
        stack["config"],
        edit_message(OP_SLOW, SLOW),
        {"table_id": "facts"},
        "m-slow",
        None,
        published,
    )
    assert result["status"] == "dead_lettered", result  # its only delivery gave up
    for node in SLOW:
        s = seen["during"][str(node)]
        assert s["state"] == "pending", s
        assert s["by"]["queue"] == "edit"
        assert s["by"]["operation_id"] == OP_SLOW
        assert s["by"]["event"] == f"op-{OP_SLOW}"
        assert s["since"] == published.isoformat().replace("+00:00", "Z")
    st, _ = states_of(stack, SLOW)
    for node in SLOW:
        s = st[str(node)]
        assert s["state"] == "failed", s
        assert s["reason"].startswith("gave up after 1 attempts")
        assert s["by"]["operation_id"] == OP_SLOW


def _bulk_run(stack):
    ctx = dataset_context(stack["config"], "facts")
    run = new_run("bulk_ingest", stack["dataset"], region=[0, 0, 0, GRID, GRID, GRID])
    ctx.ledger.create_run(run)
    return ctx, run


def test_a_bulk_runs_failed_chunk_reads_failed_until_a_later_run_computes_it(stack):
    ctx, run = _bulk_run(stack)
    # the worker's own path: the chunk cannot be read (no segmentation), its last attempt
    outcome = compute_chunk(ctx, run, list(BULK_CHUNK), last_attempt=True, task_attempt=1)
    assert outcome["status"] == "failed", outcome
    cid = chunk_id(ctx, BULK_CHUNK)
    st, r = states_of(stack, [*BULK, AFTER_RUN])
    for node in BULK:
        s = st[str(node)]
        assert s["state"] == "failed", s
        assert s["reason"] == outcome["error"]
        assert s["by"] == {"run": run.run_id, "kind": "bulk_ingest", "chunk": cid}
    # made after the run's snapshot: the run never covered it (no record: the graph's guess)
    assert st[str(AFTER_RUN)]["state"] == "pending"
    assert st[str(AFTER_RUN)]["by"]["received"] is False
    assert int(r.headers["X-L2Cache-State-Reads"]) == 3  # guard, runs index, graph
    assert read_rows(stack["runs"], keys=[chunk_failure_key("facts", cid)])

    # a later run computes the chunk: its rows are written, the ledger records it done
    later = new_run("region_reprocess", stack["dataset"], region=[3, 3, 0, 4, 4, 1])
    ledger = RunLedger(stack["runs"])
    ledger.create_run(later)
    ledger.chunk_started(later, cid, BULK_CHUNK)
    labels = np.zeros((24, 24, 12), dtype=np.uint64)
    for i, node in enumerate(BULK[:2]):
        labels[i * 6 : i * 6 + 5, 2:20, 1:11] = node
    stack["store"].write_features(compute_features(labels, RES), Lineage(later.run_id))
    assert ledger.chunk_finished(later, cid, BULK_CHUNK, "done", attempt=1, l2_count=2)
    assert not read_rows(stack["runs"], keys=[chunk_failure_key("facts", cid)])  # cleared
    st, _ = states_of(stack, BULK)
    assert st[str(BULK[0])] == {"state": "computed"}
    assert st[str(BULK[1])] == {"state": "computed"}
    # the later run did not produce it: no longer the old run's failure
    assert st[str(BULK[2])]["state"] == "unknown"
    assert st[str(BULK[2])]["reason"] == "not queued"


def test_a_retry_leaves_no_failure_and_a_failure_names_the_last_run(stack):
    ledger = RunLedger(stack["runs"])
    coords = (0, 3, 2)
    cid = chunk_id(dataset_context(stack["config"], "facts"), coords)
    first = new_run("bulk_ingest", stack["dataset"], region=[0, 0, 0, GRID, GRID, GRID])
    ledger.create_run(first)
    ledger.chunk_started(first, cid, coords)
    ledger.chunk_finished(first, cid, coords, "retrying", attempt=1, error="transient")
    assert not read_rows(stack["runs"], keys=[chunk_failure_key("facts", cid)])
    ledger.chunk_started(first, cid, coords)
    ledger.chunk_finished(
        first, cid, coords, "failed", attempt=2, error="bad input", permanent=True
    )
    second = new_run("region_reprocess", stack["dataset"], region=[0, 3, 2, 1, 4, 3])
    ledger.create_run(second)
    ledger.chunk_started(second, cid, coords)
    ledger.chunk_finished(second, cid, coords, "failed", attempt=1, error="still bad")
    (row,) = read_rows(stack["runs"], keys=[chunk_failure_key("facts", cid)]).values()
    cells = {k.decode(): json.loads(v) for k, v in row[LEDGER_FAMILY].items()}
    assert cells["run"] == second.run_id and cells["error"] == "still bad"
    assert cells["kind"] == "region_reprocess" and cells["permanent"] is False


def test_a_graph_that_cannot_date_a_node_never_blames_it_on_a_failed_run(stack):
    """A graphene server cannot say when a node was made, so an id without a row in a
    chunk a run failed may be that run's or a later edit's: not claimed failed, the
    chunk's failure shown beside it."""
    import dataclasses

    from l2cache.config import GraphSource
    from l2cache.serving.id_state import StateContext, states
    from l2cache.serving.wait import runs_reader

    ledger = RunLedger(stack["runs"])
    coords = (1, 3, 2)
    cid = chunk_id(dataset_context(stack["config"], "facts"), coords)
    run = new_run("bulk_ingest", stack["dataset"], region=[0, 0, 0, GRID, GRID, GRID])
    ledger.create_run(run)
    ledger.chunk_started(run, cid, coords)
    ledger.chunk_finished(run, cid, coords, "failed", attempt=1, error="bad", permanent=True)
    ds = dataclasses.replace(
        stack["dataset"], graph=GraphSource(kind="graphene", url="https://127.0.0.1/segmentation")
    )
    ctx = StateContext(stack["config"], stack["store"], None, runs_reader(stack["config"]))
    node = l2(coords, 5)
    (state,) = states(ctx, ds, np.array([node], np.uint64), {}, None).values()
    assert state["state"] == "unknown", state
    assert state["in_graph"] is None
    assert state["chunk_failure"]["by"] == {"run": run.run_id, "kind": "bulk_ingest", "chunk": cid}
    assert "cannot tell whether the node predates" in state["reason"]


def test_an_edit_received_that_never_recorded_an_outcome_is_not_pending_for_ever(stack):
    from l2cache.serving.id_state import EDIT_OUTCOME_WINDOW_S

    # on_edit's first step for each delivery, then every delivery timed out (no record)
    ledger = RunLedger(stack["runs"])
    lost, fresh = l2((3, 0, 3), 11), l2((3, 0, 3), 12)
    long_ago = datetime.now(UTC) - timedelta(seconds=EDIT_OUTCOME_WINDOW_S + 60)
    ledger.edit_received("edit_stream-facts-x", "op-7003", "facts", [lost], 7003, "m-l", long_ago)
    ledger.edit_received(
        "edit_stream-facts-x", "op-7004", "facts", [fresh], 7004, "m-f", datetime.now(UTC)
    )
    st, _ = states_of(stack, [lost, fresh])
    assert st[str(lost)]["state"] == "unknown"
    assert "recorded no outcome" in st[str(lost)]["reason"]
    assert st[str(lost)]["by"]["operation_id"] == 7003
    assert st[str(fresh)]["state"] == "pending"
    assert st[str(fresh)]["by"]["operation_id"] == 7004


def test_the_indexes_ride_in_requests_the_writers_make_anyway(stack, monkeypatch):
    """Counted at the MutateRows call: an edit's index is one request for the event row
    and every new id; a chunk's failure index goes with its ``fail:`` row, and a done
    chunk's deletion of it with the run's counters (no request of its own)."""
    from l2cache.gcp import bigtable_write

    sent: list[list[bytes]] = []
    real = bigtable_write.mutate_entries

    def counting(channel, table, entries, *args, **kwargs):
        sent.append([key for key, _ in entries])
        return real(channel, table, entries, *args, **kwargs)

    monkeypatch.setattr(bigtable_write, "mutate_entries", counting)
    ledger = RunLedger(stack["runs"])
    ids = [l2((2, 2, 3), s) for s in range(1, 31)]  # an edit of 30 new ids
    assert ledger.edit_received("r", "op-1", "facts", ids, 1, "m", datetime.now(UTC)) == 30
    assert len(sent) == 1 and len(sent[0]) == 31  # the event row and 30 index rows
    sent.clear()

    coords = (2, 3, 3)
    cid = chunk_id(dataset_context(stack["config"], "facts"), coords)
    run = new_run("bulk_ingest", stack["dataset"], region=[0, 0, 0, GRID, GRID, GRID])
    ledger.create_run(run)
    ledger.chunk_started(run, cid, coords)
    sent.clear()
    ledger.chunk_finished(run, cid, coords, "failed", attempt=1, error="bad", permanent=True)
    (with_fail,) = [keys for keys in sent if chunk_failure_key("facts", cid) in keys]
    assert any(k.startswith(b"fail:") for k in with_fail)
    later = new_run("bulk_ingest", stack["dataset"], region=[0, 0, 0, GRID, GRID, GRID])
    ledger.create_run(later)
    ledger.chunk_started(later, cid, coords)
    sent.clear()
    ledger.chunk_finished(later, cid, coords, "done", attempt=1, l2_count=0)
    (with_counts,) = [keys for keys in sent if chunk_failure_key("facts", cid) in keys]
    assert any(k.startswith(b"stat:") for k in with_counts)
    assert not read_rows(stack["runs"], keys=[chunk_failure_key("facts", cid)])


def test_a_region_task_that_gave_up_makes_its_chunks_ids_failed(stack):
    """The worker's own handler: a split region task in a map without a ``tasks``
    section cannot enqueue its parts and gives up for good; its ``task:`` row is per
    region, so the handler also writes its chunks' ``chunkfail:`` rows."""
    from l2cache.handlers.compute_chunk import handle_task

    region = [0, 2, 0, 2, 3, 1]  # chunks (0,2,0) and (1,2,0): a split with batch 1
    run = new_run("region_reprocess", stack["dataset"], region=region)
    RunLedger(stack["runs"]).create_run(run)
    body = {"dataset": "facts", "run_id": run.run_id, "region": region, "batch": 1}
    status, answer = handle_task(stack["config"], json.dumps(body).encode(), {})
    assert (status, answer["status"]) == (200, "rejected"), answer
    nodes = [l2((0, 2, 0), 21), l2((1, 2, 0), 22)]
    old = datetime(2026, 1, 1, tzinfo=UTC)
    graph = bigtable_instance(PROJECT, INSTANCE).table("idfacts_graph")
    write_rows(
        graph, [Row(idlib.row_key(n)).set_cell("0", b"children", b"\x01" * 8, old) for n in nodes]
    )
    st, _ = states_of(stack, nodes)
    for node, chunk in zip(nodes, [(0, 2, 0), (1, 2, 0)], strict=True):
        s = st[str(node)]
        assert s["state"] == "failed", s
        assert "cannot enqueue its parts" in s["reason"]
        ctx = dataset_context(stack["config"], "facts")
        assert s["by"] == {
            "run": run.run_id,
            "kind": "region_reprocess",
            "chunk": chunk_id(ctx, chunk),
        }
