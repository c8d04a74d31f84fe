"""Issue 20 items 1 and 2 on the Bigtable emulator, through the handlers' real code.

A PCG-layout graph built from the pinky40 crop (2 x 2 x 2 chunks), edited the way PCG
edits it (new L2 rows with ``children``, new ``parents`` cells). Item 1: a node made by a
merge and split again later is computed on request from its own ``children`` cell, with
the features of a direct computation on its children's voxels; an id without a children
row is not found and nothing is written. Item 2: a one-voxel orphan supervoxel (in the
segmentation, not in the graph) leaves its chunk done, counted in the ledger, in the rows'
lineage and in QC; a run over the map's ``qc.max_orphan_voxel_fraction`` fails QC with the
reason; a dataset whose map says ``input: {strict: true}`` fails the chunk as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from l2cache.compute import compute_chunk, compute_l2_ids, dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import ATTRIBUTES, encode_column
from l2cache.domain.lineage import parse_input
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.handlers.on_edit import handle_message
from l2cache.inputs.volume import _volume, read_chunk
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import create_runs_table, new_run
from l2cache_ops.ledger import chunk_rows, events, list_runs
from l2cache_ops.qc import run_qc
from l2cache_ops.settings import qc_thresholds
from l2cache_tools.dataset import build_dataset
from l2cache_tools.dataset.edits import apply_merge, apply_split, edit_message, pick_merge

PROJECT, INSTANCE = "idsorphans", "inst"
DS, STRICT = "idsorph", "idsorph_strict"
CHUNK = (48, 48, 24)
RES = (16.0, 16.0, 40.0)
CROP = Path(__file__).resolve().parent / "data" / "pinky40_crop_96x96x48.npz"


@pytest.fixture(scope="module")
def env(bigtable_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idsorph")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    built = build_dataset(np.load(CROP)["labels"], f"file://{tmp}/sv", RES, CHUNK, instance, DS)
    for table in (f"{DS}_cache", f"{STRICT}_cache"):
        create_cache_table(instance, table)
    create_runs_table(instance, "runs")
    graph = {"kind": "bigtable", "project": PROJECT, "instance": INSTANCE, "table_id": DS}
    config = {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "runs_table_id": "runs",
        "datasets": {
            DS: {
                "segmentation": built.segmentation,
                "graph": graph,
                "cache_table_id": f"{DS}_cache",
                "qc": {"max_orphan_voxel_fraction": 0.0},  # any orphan voxel fails QC
            },
            STRICT: {
                "segmentation": built.segmentation,
                "graph": graph,
                "cache_table_id": f"{STRICT}_cache",
                "input": {"strict": True},
            },
        },
    }
    path = tmp / "l2cache.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    return {"config": cfg, "instance": instance, "built": built, "ctx": dataset_context(cfg, DS)}


def missing_ids_message(ctx, ids) -> tuple[bytes, dict[str, str]]:
    """The lookup's missing-id message: raw little-endian uint64 ids."""
    data = np.asarray(ids, dtype="<u8").tobytes()
    return data, {"table_id": DS, "l2_cache_id": ctx.dataset.cache_table_id}


def direct_cells(ctx, node: int) -> dict[bytes, bytes]:
    """The cells of ``node`` computed directly: its children's voxels on background."""
    kids = ctx.graph.l2_children(np.array([node]))[node]
    coords = idlib.get_chunk_coords(np.uint64(node), ctx.dataset.spatial_bits)[0].tolist()
    sv = np.asarray(read_chunk(ctx.dataset, coords))
    labels = np.where(np.isin(sv, kids), np.uint64(node), np.uint64(0))
    feats = compute_features(labels, RES)
    assert feats["l2id"].tolist() == [node]
    return {a.key: encode_column(a, feats[a.name])[0] for a in ATTRIBUTES}


def test_a_merged_node_split_again_is_computed_from_its_children(env):
    ctx, cfg = env["ctx"], env["config"]
    graph = env["instance"].table(DS)
    a, b = pick_merge(ctx.dataset, graph, (0, 1, 0))
    merge = apply_merge(graph, ctx.dataset, a, b)
    (merged,) = merge.new_l2_ids.tolist()
    split = apply_split(graph, ctx.dataset, merged)
    parts = split.new_l2_ids.tolist()
    # at any time after the split, no supervoxel has the merged node as its parent
    kids = ctx.graph.l2_children(np.array([merged]))[merged]
    assert merged not in set(ctx.graph.l2_parents(kids).tolist())
    # the lookup asks for the merged node (e.g. a skeleton at the root's old timestamp)
    data, attributes = missing_ids_message(ctx, [merged])
    result = handle_message(cfg, data, attributes, "msg-merged")
    assert result["status"] == "ok" and result["written"] == 1 and result["not_found"] == []
    raw = ctx.store.read_raw([merged])[merged]
    assert raw["0"] == direct_cells(ctx, merged)
    lineage = ctx.store.read_lineage([merged])[merged]
    checksum, counts = parse_input(lineage[b"input"].decode())
    assert len(checksum) == 16 and counts == {}  # a clean chunk: the bare checksum
    # the split's own edit message: its parts, each from its own children
    data, attributes = edit_message(DS, split)
    result = handle_message(cfg, data, attributes, "msg-split")
    assert result["status"] == "ok" and result["written"] == 2
    stored = ctx.store.read_raw(parts)
    for node in parts:
        assert stored[node]["0"] == direct_cells(ctx, node)
    # the merged node and its split parts in one request share supervoxels: each its own
    data, attributes = missing_ids_message(ctx, [merged, *parts, a])
    result = handle_message(cfg, data, attributes, "msg-all")
    assert result["written"] == 4 and result["not_found"] == []
    stored = ctx.store.read_raw([merged, *parts, a])
    for node in (merged, *parts, a):
        assert stored[node]["0"] == direct_cells(ctx, node), node


def test_an_id_without_a_children_row_is_not_found_and_nothing_is_written(env):
    ctx, cfg = env["ctx"], env["config"]
    bits = ctx.dataset.spatial_bits
    never = int(idlib.encode_ids(2, np.array([[1, 1, 0]]), np.array([4000]), bits)[0])
    assert not ctx.graph.l2_children(np.array([never]))
    data, attributes = missing_ids_message(ctx, [never])
    result = handle_message(cfg, data, attributes, "msg-never")
    assert result["status"] == "ok" and result["written"] == 0
    assert result["not_found"] == [never] and result["chunks_read"] == 0
    assert ctx.store.read_raw([never]) == {}
    (event,) = [
        e for e in events(ctx.ledger, result_run(ctx)) if e.get("message_id") == "msg-never"
    ]
    assert event["not_found"] == 1 and event["written"] == 0
    # a redelivery skips the chunk (recorded done with nothing written), still nothing
    again = handle_message(cfg, data, attributes, "msg-never")
    assert again["chunks_skipped"] == 1 and ctx.store.read_raw([never]) == {}


def result_run(ctx) -> str:
    """The dataset's missing-ids stream run (what the lookup's messages are recorded in)."""
    (run,) = [r for r in list_runs(ctx.ledger) if r.kind == "missing_ids" and r.dataset == DS]
    return run.run_id


def add_orphan(ctx, coords) -> tuple[int, tuple[int, int, int]]:
    """Write one voxel of a supervoxel id the graph does not have into chunk ``coords``
    (at a voxel of the chunk's largest supervoxel, so no supervoxel loses its last
    voxel); returns (the orphan id, the voxel's chunk-relative position)."""
    from cloudvolume import CloudVolume

    sv = np.asarray(read_chunk(ctx.dataset, coords))
    ids, counts = np.unique(sv[sv > 0], return_counts=True)
    biggest = ids[np.argmax(counts)]
    orphan = int(ids.max()) + 1000  # a layer-1 id of this chunk with no graph row
    assert idlib.get_layer(np.uint64(orphan))[0] == 1
    where = tuple(int(v) for v in np.argwhere(sv == biggest)[0])
    lo = np.asarray(coords) * np.asarray(CHUNK)
    cv = CloudVolume(ctx.dataset.segmentation, progress=False)
    box = tuple(slice(int(a), int(a) + int(c)) for a, c in zip(lo, CHUNK, strict=True))
    cutout = np.asarray(cv[box])[..., 0]
    cutout[where] = orphan
    cv[box] = cutout[..., None]
    _volume.cache_clear()
    return orphan, where


ORPHAN_CHUNK = (1, 0, 1)


@pytest.fixture(scope="module")
def orphaned(env):
    orphan, where = add_orphan(env["ctx"], ORPHAN_CHUNK)
    return orphan, where


def test_a_one_voxel_orphan_is_background_and_counted(env, orphaned):
    ctx, cfg = env["ctx"], env["config"]
    orphan, where = orphaned
    run = new_run(
        "region_reprocess", ctx.dataset, [*ORPHAN_CHUNK, *(c + 1 for c in ORPHAN_CHUNK)], 1
    )
    ctx.ledger.create_run(run)
    result = compute_chunk(ctx, run, ORPHAN_CHUNK)
    assert result["status"] == "done", result
    (row,) = chunk_rows(ctx.ledger, run.run_id)
    assert (row["orphan_sv"], row["orphan_voxels"], row["ghost_sv"]) == (1, 1, 0)
    assert row["qc"]["orphan_sv"] == 1 and row["qc"]["orphan_voxels"] == 1
    # the orphan's voxel is background: the rows equal the graph's nodes on that volume
    chunk = load_chunk_l2(ctx, ORPHAN_CHUNK, run.snapshot)
    assert chunk.labels[where] == 0 and chunk.unmapped_sv == 1
    feats = compute_features(chunk.labels, RES)
    raw = ctx.store.read_raw(feats["l2id"])
    assert set(raw) == set(feats["l2id"].tolist())
    for node, cells in ctx.store.read_lineage(feats["l2id"]).items():
        checksum, counts = parse_input(cells[b"input"].decode())
        assert checksum == chunk.checksum
        assert counts == {"orphan_sv": 1, "orphan_voxels": 1, "ghost_sv": 0}, node
    # QC: counted, and over the map's max_orphan_voxel_fraction (0) the run fails
    report = run_qc(ctx, run.run_id, qc_thresholds(cfg, DS))
    inputs = report["coverage"]["inputs"]
    assert (inputs["orphan_sv"], inputs["orphan_voxels"], inputs["ghost_sv"]) == (1, 1, 0)
    assert inputs["orphan_voxel_fraction"] > 0
    assert not report["passed"]
    (reason,) = [r for r in report["reasons"] if "orphan" in r]
    assert "max_orphan_voxel_fraction" in reason and "1 voxels of 1 supervoxels" in reason
    # the defaults tolerate one voxel in 55,296: the same run passes
    default = run_qc(ctx, run.run_id)
    assert default["passed"], default["reasons"]
    # region QC reads the chunk rows instead of the run counters: the same figures
    region = run_qc(ctx, run.run_id, qc_thresholds(cfg, DS), region=run.region)
    assert region["coverage"]["inputs"]["orphan_voxels"] == 1 and not region["passed"]
    (reason,) = [r for r in region["reasons"] if "orphan" in r]
    assert f"e.g. chunks {list(ORPHAN_CHUNK)}" in reason  # the chunk rows name the chunk


def test_the_ids_path_counts_the_orphan_in_its_event_chunk(env, orphaned):
    ctx = env["ctx"]
    chunk = load_chunk_l2(ctx, ORPHAN_CHUNK, None)
    node = int(chunk.l2_ids[0])
    stream = new_run(
        "region_reprocess", ctx.dataset, [*ORPHAN_CHUNK, *(c + 1 for c in ORPHAN_CHUNK)], 1
    )
    ctx.ledger.create_run(stream)
    result = compute_l2_ids(ctx, np.array([node]), None, stream, event_key="orphan-ids")
    assert result["written"] == 1 and result["failed"] == []
    (done,) = ctx.ledger.event_chunks_done(stream.run_id, "orphan-ids").values()
    assert (done["orphan_sv"], done["orphan_voxels"], done["ghost_sv"]) == (1, 1, 0)
    lineage = ctx.store.read_lineage([node])[node]
    assert parse_input(lineage[b"input"].decode())[1]["orphan_sv"] == 1


def test_a_strict_map_fails_the_orphan_chunk_as_before(env, orphaned):
    cfg = env["config"]
    ctx = dataset_context(cfg, STRICT)
    assert ctx.dataset.strict_input and not env["ctx"].dataset.strict_input
    run = new_run(
        "region_reprocess", ctx.dataset, [*ORPHAN_CHUNK, *(c + 1 for c in ORPHAN_CHUNK)], 1
    )
    ctx.ledger.create_run(run)
    result = compute_chunk(ctx, run, ORPHAN_CHUNK)
    assert result["status"] == "failed" and "have no L2 parent" in result["error"]
    (row,) = chunk_rows(ctx.ledger, run.run_id)
    assert row["permanent"] is True and row["orphan_sv"] == 1 and row["attempts"] == 1
    node = int(load_chunk_l2(env["ctx"], ORPHAN_CHUNK, None).l2_ids[0])
    assert ctx.store.read_raw([node]) == {}  # nothing written
    ids = compute_l2_ids(ctx, np.array([node]), None, run)
    (failed,) = ids["failed"]
    assert "no row in the graph" in failed["error"] and ids["written"] == 0
    assert json.dumps(failed)  # reportable as the dead letter's reason
