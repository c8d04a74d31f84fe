"""A mirrored chunk of the real pinky40 crop fails permanently and writes nothing.

The crop built as a PCG dataset (8 chunks, with atomic cross-chunk edges in PCG's
layout) on the Bigtable emulator; chunks computed in process with ``compute_chunk``
(the worker's own code: ledger, cache store). One chunk file is rewritten mirrored
along x (same labels, same bytes per label: every label check passes); its run records
it failed for good with the reason and counts, no cell of it is written, and the other
seven chunks are done. The check's own cost is measured against each chunk's compute.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import yaml
from stackutil import CHUNK, RES, crop_volume

from l2cache.compute import compute_chunk, dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.domain import ids as idlib
from l2cache.domain.regions import region_chunks
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.inputs.geometry_check import chunk_faces, judge
from l2cache.inputs.volume import read_chunk
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import create_runs_table, new_run
from l2cache_ops.ledger import chunk_rows
from l2cache_tools.dataset import build_dataset

DS = "geom"
PROJECT, INSTANCE = "geom-project", "geom-instance"
CHUNKS = region_chunks([0, 0, 0, 2, 2, 2])
MIRRORED = (1, 0, 1)


@pytest.fixture(scope="module")
def env(bigtable_emulator, tmp_path_factory):
    directory = tmp_path_factory.mktemp("geom")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    built = build_dataset(crop_volume(), f"file://{directory}/sv", RES, CHUNK, instance, DS)
    create_cache_table(instance, f"l2cache_{DS}")
    create_runs_table(instance, "geom_runs")
    path = directory / "datasets.yaml"
    graph = {"kind": "bigtable", "project": PROJECT, "instance": INSTANCE, "table_id": DS}
    path.write_text(
        yaml.safe_dump(
            {
                "bigtable": {"project": PROJECT, "instance": INSTANCE},
                "runs_table_id": "geom_runs",
                "datasets": {
                    DS: {
                        "segmentation": built.segmentation,
                        "graph": graph,
                        "cache_table_id": f"l2cache_{DS}",
                    }
                },
            }
        )
    )
    return {"ctx": dataset_context(load_config(path), DS), "built": built}


def rewrite_chunk(ctx, coords, transform) -> np.ndarray:
    """Write ``transform(chunk)`` over one chunk file (labels kept); returns the original."""
    from cloudvolume import CloudVolume

    cv = CloudVolume(ctx.dataset.segmentation, progress=False, compress="gzip")
    lo = np.asarray(coords) * np.asarray(CHUNK)
    hi = lo + np.asarray(CHUNK)
    box = tuple(slice(a, b) for a, b in zip(lo.tolist(), hi.tolist(), strict=True))
    original = np.asarray(cv[box])[..., 0]
    cv[box] = np.asfortranarray(transform(original))
    return original


def test_every_chunk_of_the_real_crop_has_cross_edges_and_passes(env):
    ctx = env["ctx"]
    bits = ctx.dataset.spatial_bits
    for coords in CHUNKS:
        edges = ctx.graph.chunk_cross_edges(coords, bits)
        assert edges.shape[1] == 2 and edges.shape[0] > 0, coords
        assert (idlib.get_chunk_coords(edges[:, 0], bits) == coords).all()
        report = judge(chunk_faces(read_chunk(ctx.dataset, coords)), edges, coords, bits)
        assert report.checked > 0 and report.misplaced == 0 and report.skipped == 0
        assert {f[1] for f in report.by_face} == {"x", "y", "z"}  # a 2x2x2 grid: 3 faces each
        load_chunk_l2(ctx, coords, None)


def test_a_mirrored_chunk_fails_permanently_writes_nothing_and_the_others_are_done(env):
    ctx = env["ctx"]
    original = rewrite_chunk(ctx, MIRRORED, lambda a: a[::-1])
    try:
        assert np.array_equal(np.unique(read_chunk(ctx.dataset, MIRRORED)), np.unique(original))
        run = new_run("bulk_ingest", ctx.dataset, [0, 0, 0, 2, 2, 2], len(CHUNKS))
        ctx.ledger.create_run(run)
        outcomes = {tuple(c): compute_chunk(ctx, run, c) for c in CHUNKS}
    finally:
        rewrite_chunk(ctx, MIRRORED, lambda a: original)
    failed = outcomes.pop(MIRRORED)
    assert failed["status"] == "failed"
    assert "geometry does not match the graph" in failed["error"]
    assert all(o["status"] == "done" for o in outcomes.values())
    rows = {tuple(r["coords"]): r for r in chunk_rows(ctx.ledger, run.run_id)}
    row = rows[MIRRORED]
    assert row["status"] == "failed" and row["permanent"] is True and row["attempts"] == 1
    assert 0 < row["misplaced_sv"] <= row["face_sv"]
    assert "+x" in row["error"] or "-x" in row["error"]
    # nothing of the mirrored chunk in the cache: every L2 node of it reads as absent
    nodes = load_chunk_l2(ctx, MIRRORED, None).l2_ids
    assert nodes.size and not ctx.store.read_raw(nodes)
    # the repaired chunk computes
    assert compute_chunk(ctx, run, list(MIRRORED))["status"] == "done"


def test_the_check_costs_little_against_a_chunk(env):
    """The check's parts (faces, the cross-edge read, the comparison) against the whole
    of ``load_chunk_l2`` + features; printed (pytest -s) and bounded."""
    from l2cache.engine.features import compute_features

    ctx = env["ctx"]
    bits = ctx.dataset.spatial_bits
    check, whole = [], []
    for _ in range(3):
        for coords in CHUNKS:
            sv = read_chunk(ctx.dataset, coords)
            t0 = time.perf_counter()
            faces = chunk_faces(sv)
            edges = ctx.graph.chunk_cross_edges(coords, bits)
            judge(faces, edges, coords, bits)
            t1 = time.perf_counter()
            chunk = load_chunk_l2(ctx, coords, None)
            compute_features(chunk.dense, ctx.dataset.resolution)
            t2 = time.perf_counter()
            check.append(t1 - t0)
            whole.append(t2 - t1)
    share = np.median(check) / np.median(whole)
    print(
        f"geometry check: median {np.median(check) * 1e3:.2f} ms per chunk "
        f"(48x48x24), chunk read+compute {np.median(whole) * 1e3:.1f} ms: {share:.1%}"
    )
    assert share < 0.5
