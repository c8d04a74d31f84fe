"""Lost input fails its chunk; a reprocess recomputes superseded ids (issue 20, review).

On the Bigtable emulator with a PCG-layout graph built from the pinky40 crop:

- a chunk file that decodes but lost a fifth of its supervoxels (inside, off the faces,
  so the geometry check cannot see it) fails permanently as incomplete input, with its
  counts; before, it was done with whole L2 nodes missing and QC saw 2e-05 of a run;
- one ghost supervoxel (a graph supervoxel with no voxel: the existing service's case)
  never fails a chunk, and its node, which has no voxel at all, is counted missing in
  QC's coverage because ``graph_l2`` comes from the graph, not from the segmentation;
- a region reprocess recomputes the ids an edit computed earlier that a later edit
  superseded (merge, then split: the merged id), in the chunk's own write, at the
  run's version and with its lineage.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from l2cache.compute import compute_chunk, dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import ATTRIBUTES, encode_column
from l2cache.domain.lineage import utc_now
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.handlers.on_edit import handle_message
from l2cache.inputs.volume import _volume, read_chunk
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import create_runs_table, new_run
from l2cache_ops.ledger import chunk_rows
from l2cache_ops.qc import run_qc
from l2cache_tools.dataset import build_dataset
from l2cache_tools.dataset.edits import (
    _new_l2_ids,
    _write,
    apply_merge,
    apply_split,
    edit_message,
    pick_merge,
)

PROJECT, INSTANCE, DS = "lostinput", "inst", "lostin"
CHUNK = (48, 48, 24)
RES = (16.0, 16.0, 40.0)
CROP = Path(__file__).resolve().parent / "data" / "pinky40_crop_96x96x48.npz"


@pytest.fixture(scope="module")
def env(bigtable_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lostin")
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
    return {"config": cfg, "instance": instance, "built": built, "ctx": dataset_context(cfg, DS)}


def region_of(coords) -> list[int]:
    return [*coords, *(c + 1 for c in coords)]


def reprocess(ctx, coords):
    run = new_run("region_reprocess", ctx.dataset, region_of(coords), 1)
    ctx.ledger.create_run(run)
    return run, compute_chunk(ctx, run, coords)


def rewrite_chunk(ctx, coords, cutout: np.ndarray) -> None:
    from cloudvolume import CloudVolume

    lo = np.asarray(coords) * np.asarray(CHUNK)
    box = tuple(slice(int(a), int(a) + int(c)) for a, c in zip(lo, CHUNK, strict=True))
    CloudVolume(ctx.dataset.segmentation, progress=False)[box] = cutout[..., None]
    _volume.cache_clear()


def hidden_supervoxels(sv: np.ndarray, coords, grid=(2, 2, 2)) -> np.ndarray:
    """Supervoxels with no voxel on a face the chunk shares with another chunk: the
    geometry check (the graph's cross-chunk edges) cannot see them go."""
    shared = np.zeros(sv.shape, bool)
    for axis in range(3):
        index = [slice(None)] * 3
        if coords[axis] > 0:
            index[axis] = 0
            shared[tuple(index)] = True
        if coords[axis] < grid[axis] - 1:
            index[axis] = -1
            shared[tuple(index)] = True
    ids = np.unique(sv[sv > 0])
    return np.setdiff1d(ids, np.unique(sv[shared]))


LOST_CHUNK = (1, 0, 0)


def test_a_chunk_that_lost_a_fifth_of_its_supervoxels_fails_as_incomplete_input(env):
    ctx = env["ctx"]
    original = np.asarray(read_chunk(ctx.dataset, LOST_CHUNK)).copy()
    graph_sv = ctx.graph.chunk_supervoxels(LOST_CHUNK, ctx.dataset.spatial_bits)
    inside = hidden_supervoxels(original, LOST_CHUNK)
    lost = inside[: int(np.ceil(0.2 * graph_sv.size))]
    assert lost.size > ctx.dataset.ghost_sv_allowance, "too few supervoxels off the faces"
    assert lost.size >= 0.2 * graph_sv.size
    try:
        rewrite_chunk(ctx, LOST_CHUNK, np.where(np.isin(original, lost), 0, original))
        run, result = reprocess(ctx, LOST_CHUNK)
        assert result["status"] == "failed", result
        assert "the input is incomplete" in result["error"]
        assert "input.ghost_sv_allowance" in result["error"]
        (row,) = chunk_rows(ctx.ledger, run.run_id)
        assert row["permanent"] is True and row["attempts"] == 1
        assert (row["ghost_sv"], row["graph_sv"]) == (lost.size, graph_sv.size)
        # nothing was written for the chunk
        assert ctx.store.chunk_row_ids(LOST_CHUNK).size == 0
        # a map that tolerates it (allowance over the loss) computes it, and QC's coverage
        # now compares with the graph: the nodes whose supervoxels were all lost are missing
        loose = replace(ctx, dataset=replace(ctx.dataset, ghost_sv_allowance=int(lost.size)))
        run, result = reprocess(loose, LOST_CHUNK)
        assert result["status"] == "done", result
        parents = ctx.graph.l2_parents(graph_sv, run.snapshot)
        kept = np.unique(parents[~np.isin(graph_sv, lost)])
        gone = np.setdiff1d(np.unique(parents), kept)
        (row,) = chunk_rows(ctx.ledger, run.run_id)
        assert row["qc"]["graph_l2"] == np.unique(parents).size
        assert row["qc"]["missing"] == gone.size
    finally:
        rewrite_chunk(ctx, LOST_CHUNK, original)


GHOST_CHUNK = (1, 1, 1)


def test_one_ghost_supervoxel_passes_and_its_empty_node_counts_missing(env):
    """A graph supervoxel without a voxel (the existing service's ghost), alone in its L2
    node: the chunk is done, the ghost counted, and the node it alone made is missing in
    QC's coverage (before, coverage took its denominator from the segmentation)."""
    ctx = env["ctx"]
    bits = ctx.dataset.spatial_bits
    graph_sv = ctx.graph.chunk_supervoxels(GHOST_CHUNK, bits)
    seg = int(idlib.get_segment_id(graph_sv, bits).max()) + 1000
    ghost = idlib.encode_ids(1, np.array([GHOST_CHUNK]), np.array([seg]), bits)
    (node,) = _new_l2_ids(env["instance"].table(DS), GHOST_CHUNK, 1, bits).tolist()
    _write(env["instance"].table(DS), {node: ghost}, utc_now())
    run, result = reprocess(ctx, GHOST_CHUNK)
    assert result["status"] == "done", result
    (row,) = chunk_rows(ctx.ledger, run.run_id)
    assert row["ghost_sv"] == 1 and row["orphan_sv"] == 0
    nodes = row["l2_count"]
    assert row["qc"]["nodes"] == nodes
    assert row["qc"]["graph_l2"] == nodes + 1 and row["qc"]["missing"] == 1
    assert ctx.store.read_raw([node]) == {}  # no voxel, no row (as the existing service)
    report = run_qc(ctx, run.run_id)
    assert report["coverage"]["missing"] == 1
    assert report["coverage"]["expected_l2_ids"] == nodes + 1


def direct_cells(ctx, node: int) -> dict[bytes, bytes]:
    """``node``'s cells computed directly: its children's voxels on background."""
    kids = ctx.graph.l2_children(np.array([node]))[node]
    coords = idlib.get_chunk_coords(np.uint64(node), ctx.dataset.spatial_bits)[0].tolist()
    sv = np.asarray(read_chunk(ctx.dataset, coords))
    feats = compute_features(np.where(np.isin(sv, kids), np.uint64(node), np.uint64(0)), RES)
    return {a.key: encode_column(a, feats[a.name])[0] for a in ATTRIBUTES}


EDIT_CHUNK = (0, 1, 0)


def test_a_reprocess_recomputes_the_superseded_ids_of_its_chunks(env):
    ctx, cfg = env["ctx"], env["config"]
    graph = env["instance"].table(DS)
    _, first = reprocess(ctx, EDIT_CHUNK)  # the chunk's rows
    assert first["superseded"] == 0  # a fresh chunk: one keys-only read, nothing else
    a, b = pick_merge(ctx.dataset, graph, EDIT_CHUNK)
    merge = apply_merge(graph, ctx.dataset, a, b)
    (merged,) = merge.new_l2_ids.tolist()
    assert handle_message(cfg, *edit_message(DS, merge), "m-merge")["written"] == 1
    split = apply_split(graph, ctx.dataset, merged)
    parts = split.new_l2_ids.tolist()
    assert handle_message(cfg, *edit_message(DS, split), "m-split")["written"] == 2
    before = ctx.store.read_lineage([merged, a, b])
    edit_run = before[merged][b"run"].decode()
    # the merged id now has a row but is no node of the chunk at any later time
    current = load_chunk_l2(ctx, EDIT_CHUNK, None).l2_ids
    assert merged not in current.tolist() and a not in current.tolist()
    assert set(parts) <= set(current.tolist())
    run, result = reprocess(ctx, EDIT_CHUNK)
    assert result["status"] == "done", result
    # superseded: the merged id and the two ingest nodes it replaced (a, b), all with rows
    assert result["superseded"] == 3 and result["superseded_passes"] == 2
    (row,) = chunk_rows(ctx.ledger, run.run_id)
    assert row["superseded"] == 3 and row["l2_count"] == current.size
    after = ctx.store.read_lineage([merged, a, b, *parts])
    for node in (merged, a, b, *parts):
        assert after[node][b"run"].decode() == run.run_id, node
    assert edit_run != run.run_id
    stamps: dict[int, int] = {}
    ctx.store.read_features([merged], stamps=stamps)
    assert stamps[merged] == run.cell_timestamp_ms * 1000  # the run's version
    raw = ctx.store.read_raw([merged, a, b])
    for node in (merged, a, b):
        assert raw[node]["0"] == direct_cells(ctx, node), node


def test_the_superseded_pass_is_bounded_in_ids_and_engine_passes(env, monkeypatch):
    """After the test above the chunk holds 3 superseded rows (a, b, and their merge):
    with at most 2 ids and 1 pass, the newest 2 are taken and the passes are filled
    newest id first: the merged id (the newest) is computed, the ingest node it overlaps
    needs a second pass and is left with the oldest id; all counted."""
    import l2cache.compute as compute

    ctx = env["ctx"]
    current = load_chunk_l2(ctx, EDIT_CHUNK, None).l2_ids
    old = np.setdiff1d(ctx.store.chunk_row_ids(EDIT_CHUNK), current)
    assert old.size == 3
    monkeypatch.setattr(compute, "SUPERSEDED_MAX_IDS", 2)
    monkeypatch.setattr(compute, "SUPERSEDED_MAX_PASSES", 1)
    run, result = reprocess(ctx, EDIT_CHUNK)
    assert result["status"] == "done", result
    assert (result["superseded"], result["superseded_passes"], result["superseded_left"]) == (
        1,
        1,
        2,
    )
    (row,) = chunk_rows(ctx.ledger, run.run_id)
    assert row["superseded_left"] == 2 and row["l2_count"] == current.size
    runs = {n: c[b"run"].decode() for n, c in ctx.store.read_lineage(old).items()}
    assert sorted(n for n, r in runs.items() if r == run.run_id) == [int(old[2])]
