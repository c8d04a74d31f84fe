"""The ids path after the issue 20 review, on the Bigtable emulator (PCG-layout graph
built from the pinky40 crop, edited the way PCG edits it):

1. an L2 id with a ``children`` row but no voxel in its chunk (every supervoxel a
   ghost) gets the existing worker's placeholder (``{size_nm3: np.uint64(0)}``) in the
   cache table, with the write's lineage, and is served ``{"size_nm3": 0}``; an id
   with no children row is still only not found;
2. the ghost limit on the ids path judges the requested ids' own supervoxels: a chunk
   that lost all of node A's (over the chunk-wide limit) fails A, while an edit's new
   nodes beside it are computed; the whole-chunk path keeps the chunk-wide limit;
3. a region reprocess skips the superseded-looking ids whose rows an edit wrote after
   the run began (their recomputation at the run's earlier version would never be
   served) and leaves their rows as the edit wrote them.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from l2cache.compute import compute_chunk, dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.domain import ids as idlib
from l2cache.domain.lineage import utc_now
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.handlers.on_edit import handle_message
from l2cache.handlers.rollback_task import rollback_chunks
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import create_runs_table, new_run
from l2cache_ops.ledger import chunk_rows, list_runs
from l2cache_tools.dataset import build_dataset
from l2cache_tools.dataset.edits import (
    EditResult,
    _new_l2_ids,
    _write,
    apply_merge,
    apply_split,
    edit_message,
    pick_merge,
    pick_split,
)

PROJECT, INSTANCE, DS = "idsreview", "inst", "idsrev"
CHUNK = (48, 48, 24)
RES = (16.0, 16.0, 40.0)
CROP = Path(__file__).resolve().parent / "data" / "pinky40_crop_96x96x48.npz"
PLACEHOLDER = {b"size_nm3": bytes(8)}  # the existing worker's {SIZE_NM3: np.uint64(0)}


@pytest.fixture(scope="module")
def env(bigtable_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idsrev")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    built = build_dataset(np.load(CROP)["labels"], f"file://{tmp}/sv", RES, CHUNK, instance, DS)
    create_cache_table(instance, f"{DS}_cache")
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
            }
        },
    }
    path = tmp / "l2cache.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    return {"config": cfg, "instance": instance, "ctx": dataset_context(cfg, DS)}


def voxel_less_node(env, coords, n_children: int = 1) -> tuple[int, np.ndarray]:
    """A new L2 id of chunk ``coords`` whose ``n_children`` supervoxels have graph rows
    (parents cells) but no voxel in the segmentation: ghosts, as PCG would hold them."""
    ctx, table = env["ctx"], env["instance"].table(DS)
    bits = ctx.dataset.spatial_bits
    graph_sv = ctx.graph.chunk_supervoxels(coords, bits)
    first = int(idlib.get_segment_id(graph_sv, bits).max()) + 1000
    segs = np.arange(first, first + n_children)
    ghosts = idlib.encode_ids(1, np.tile(coords, (n_children, 1)), segs, bits)
    (node,) = _new_l2_ids(table, coords, 1, bits).tolist()
    _write(table, {node: ghosts}, utc_now())
    return int(node), ghosts


def missing_ids(ctx, ids) -> tuple[bytes, dict[str, str]]:
    """The lookup's missing-id message: raw little-endian uint64 ids."""
    data = np.asarray(ids, dtype="<u8").tobytes()
    return data, {"table_id": DS, "l2_cache_id": ctx.dataset.cache_table_id}


def reprocess(ctx, coords):
    run = new_run("region_reprocess", ctx.dataset, [*coords, *(c + 1 for c in coords)], 1)
    ctx.ledger.create_run(run)
    return run, compute_chunk(ctx, run, coords)


# -- 1: a children row, no voxel: the placeholder ---------------------------------------


def test_a_voxel_less_id_gets_the_existing_workers_placeholder_with_lineage(env):
    ctx, cfg = env["ctx"], env["config"]
    coords = (0, 0, 1)
    node, _ = voxel_less_node(env, coords)
    bits = ctx.dataset.spatial_bits
    never = int(idlib.encode_ids(2, np.array([coords]), np.array([4000]), bits)[0])
    assert not ctx.graph.l2_children(np.array([never]))
    result = handle_message(cfg, *missing_ids(ctx, [node, never]), "msg-voxel-less")
    assert result["status"] == "ok" and not result["failed"], result
    raw = ctx.store.read_raw([node, never])
    assert set(raw) == {node}  # no children row: still nothing written
    assert raw[node]["0"] == PLACEHOLDER
    assert result["empty"] == [node] and result["not_found"] == [never]
    assert result["written"] == 1
    assert ctx.store.read_features([node]) == {node: {"size_nm3": 0}}
    # the write's lineage row names it (what a rollback of the write deletes by)
    (stream,) = [r for r in list_runs(ctx.ledger) if r.kind == "missing_ids" and r.dataset == DS]
    assert ctx.store.read_lineage([node])[node][b"run"].decode() == stream.run_id
    # an edit naming such an id (3 ghost supervoxels, within the allowance) writes it too
    other, _ = voxel_less_node(env, coords, n_children=3)
    ids = np.array([other], np.uint64)
    edit = EditResult(999_001, utc_now(), ids, np.zeros(0, np.uint64), "test")
    out = handle_message(cfg, *edit_message(DS, edit), "msg-edit-voxel-less")
    assert out["status"] == "ok" and out["empty"] == [other] and out["written"] == 1, out
    assert ctx.store.read_raw([other])[other]["0"] == PLACEHOLDER
    # rolling the write back by its lineage rows takes the placeholder back
    stamp_ms = ctx.store.row_stamps([node])[node] // 1000
    cid = int(idlib.get_chunk_id(np.array([node], np.uint64), bits)[0])
    done = rollback_chunks(ctx.store.table, [stream.run_id], [cid], bits, [stamp_ms])
    assert done.runs == {stream.run_id: 1}
    assert ctx.store.read_raw([node]) == {}


# -- 2: ghosts judged per requested id -------------------------------------------------

LOST_CHUNK = (1, 0, 1)


def test_an_edit_beside_a_lost_node_is_computed_and_only_the_lost_node_fails(env):
    ctx, cfg = env["ctx"], env["config"]
    bits = ctx.dataset.spatial_bits
    graph = env["instance"].table(DS)
    n = ctx.graph.chunk_supervoxels(LOST_CHUNK, bits).size
    k = max(ctx.dataset.ghost_sv_allowance + 1, math.ceil(0.1 * n) + 1)
    lost, ghosts = voxel_less_node(env, LOST_CHUNK, n_children=k)
    assert k > ctx.dataset.max_ghost_sv_fraction * (n + k)  # over the chunk-wide limit
    # the whole-chunk path keeps the chunk-wide limit
    _, whole = reprocess(ctx, LOST_CHUNK)
    assert whole["status"] == "failed" and "input.ghost_sv_allowance" in whole["error"], whole
    # an edit's new nodes beside the lost one: all their children present, computed
    split = apply_split(graph, ctx.dataset, pick_split(ctx.dataset, graph, LOST_CHUNK))
    parts = split.new_l2_ids.tolist()
    out = handle_message(cfg, *edit_message(DS, split), "msg-split-beside-lost")
    assert out["status"] == "ok" and not out["failed"] and out["written"] == 2, out
    assert set(ctx.store.read_raw(parts)) == set(parts)
    # asked together with the lost node: only the lost node fails, with its own counts
    both = handle_message(cfg, *missing_ids(ctx, [lost, parts[0]]), "msg-lost-and-part")
    assert both["status"] == "partial" and both["written"] == 1, both
    (failure,) = both["failed"]
    assert failure["ids"] == [lost]
    assert f"L2 id {lost}: {k} of its {k} supervoxels" in failure["error"]
    assert "input.ghost_sv_allowance" in failure["error"]
    assert ctx.store.read_raw([lost]) == {}  # lost input: no placeholder either


# -- 3: the superseded pass skips rows written after the run began --------------------

EDIT_CHUNK = (0, 1, 1)


def test_a_reprocess_skips_ids_an_edit_wrote_after_the_run_began(env):
    ctx, cfg = env["ctx"], env["config"]
    graph = env["instance"].table(DS)
    run = new_run("region_reprocess", ctx.dataset, [*EDIT_CHUNK, *(c + 1 for c in EDIT_CHUNK)], 1)
    ctx.ledger.create_run(run)
    started = run.snapshot
    # an edit after the run's snapshot and version: its id is no node at the snapshot
    a, b = pick_merge(ctx.dataset, graph, EDIT_CHUNK)
    merge = apply_merge(graph, ctx.dataset, a, b)
    (merged,) = merge.new_l2_ids.tolist()
    later = started + timedelta(seconds=5)
    assert (
        handle_message(cfg, *edit_message(DS, merge), "m-late", publish_time=later)["written"] == 1
    )
    edit_lineage = ctx.store.read_lineage([merged])[merged]
    assert merged not in load_chunk_l2(ctx, EDIT_CHUNK, started).l2_ids.tolist()
    result = compute_chunk(ctx, run, EDIT_CHUNK)
    assert result["status"] == "done", result
    assert result["superseded"] == 0 and result["superseded_newer"] == 1, result
    (row,) = chunk_rows(ctx.ledger, run.run_id)
    assert row["superseded_newer"] == 1 and row["superseded"] == 0
    # no version of the run's under the edit's: the row is exactly as the edit wrote it
    assert ctx.store.read_lineage([merged])[merged] == edit_lineage
    versions = cache_versions_ms(ctx, merged)
    assert run.cell_timestamp_ms not in versions
    assert versions == [int(later.timestamp() * 1000)], versions
    # the ids current at the snapshot were written by the run
    assert ctx.store.read_lineage([a, b])[a][b"run"].decode() == run.run_id


def cache_versions_ms(ctx, node: int) -> list[int]:
    """Distinct cell timestamps (ms) of ``node``'s feature row in the cache table."""
    row = ctx.store.table.read_row(idlib.row_key(node))
    return sorted(
        {round(c.timestamp.timestamp() * 1000) for cells in row.cells["0"].values() for c in cells}
    )
