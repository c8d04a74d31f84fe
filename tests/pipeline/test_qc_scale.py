"""QC that scales, on the real Bigtable emulator with synthetic ledgers.

Chunk rows and the run's ``qchist`` counter shards are written as the workers write them
(the chunk's ``qc`` JSON from :func:`l2cache.engine.chunk_qc.chunk_qc` of random features,
its bins added to shard ``chunk_id % 16``), thousands at a time, so the tests can check
what QC reads: a region's rows only, 16 counter rows for a whole run, a bounded report,
and a per-chunk diff against the release whose sign tells a drop from a gain.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from l2cache.compute import DatasetContext
from l2cache.config import DatasetConfig, GraphSource
from l2cache.domain.ids import SpatialBits
from l2cache.domain.regions import region_chunks
from l2cache.engine.chunk_qc import chunk_qc, merge_counters
from l2cache.engine.features import empty_features
from l2cache.gcp.bigtable import bigtable_instance, read_row
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.store import runstate
from l2cache.store.ledger import LEDGER_FAMILY, RunLedger, create_runs_table, new_run
from l2cache_ops.qc import PAGE, QcThresholds, region_qc, run_qc
from l2cache_ops.qc_reports import MAX_REPORT_BYTES, chunk_ids_of, load_report, save_report
from l2cache_ops.releases import promote
from l2cache_tools.cli.qc_cmd import print_report

PROJECT, INSTANCE = "qcscale-project", "qcscale-instance"
RUN_REGION = [0, 0, 0, 20, 20, 10]  # 4,000 chunks
QC_REGION = [0, 0, 0, 10, 10, 10]  # 1,000 of them


def dataset(name: str) -> DatasetConfig:
    return DatasetConfig(
        name=name,
        segmentation="file:///nowhere",
        graph=GraphSource("bigtable", PROJECT, INSTANCE, f"{name}_graph"),
        cache_table_id=f"l2cache_{name}",
        resolution=(8.0, 8.0, 40.0),
        voxel_offset=(0, 0, 0),
        chunk_size=(256, 256, 512),
        spatial_bits=SpatialBits.from_mapping({1: 10, 2: 10, 3: 9, 4: 8}),
        volume_size=(256 * 64, 256 * 64, 512 * 16),
    )


def random_features(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Features with the engine's dtypes and plausible spreads (a tenth without PCA)."""
    if n == 0:
        return empty_features()
    pca = rng.normal(size=(n, 3, 3)).astype("<f2")
    pca_val = rng.lognormal(5, 1, size=(n, 3)).astype("<f4")
    small = rng.random(n) < 0.1
    pca[small], pca_val[small] = np.nan, np.nan
    return {
        "l2id": np.arange(1, n + 1, dtype=np.uint64),
        "size_nm3": rng.lognormal(8, 2, n).clip(1, 2**25).astype("<u4"),
        "area_nm2": rng.lognormal(12, 2, n).clip(0, 2**32 - 1).astype("<u4"),
        "max_dt_nm": rng.lognormal(5, 1, n).clip(0, 65535).astype("<u2"),
        "mean_dt_nm": rng.lognormal(4, 1, n).astype("<f2"),
        "rep_coord_nm": rng.integers(0, 256, size=(n, 3)).astype("<u2"),
        "chunk_intersect_count": rng.integers(0, 300, size=(n, 2, 3)).astype("<u2"),
        "pca": pca,
        "pca_val": pca_val,
    }


def write_chunks(ledger: RunLedger, run, chunks: dict[tuple, object], failed=()) -> None:
    """Done chunk rows with their ``qc`` JSON, and their bins in the run's 16 shards, as
    the workers leave them; ``failed`` chunks get a failed row and a ``fail:`` row."""
    ds_bits = SPATIAL
    coords = np.asarray(list(chunks) + list(failed), dtype=np.int64).reshape(-1, 3)
    cids = chunk_ids_of(coords, ds_bits).tolist()
    rows, shards = [], {}
    for c, cid in zip(coords.tolist(), cids, strict=True):
        row = Row(b"chunk:%s:%020d" % (run.run_id.encode(), cid))
        row.set_cell(LEDGER_FAMILY, b"coords", json.dumps(c).encode())
        if tuple(c) in chunks:
            qc = chunks[tuple(c)]
            row.set_cell(LEDGER_FAMILY, b"status", b"done")
            row.set_cell(LEDGER_FAMILY, b"state", b"d")
            row.set_cell(LEDGER_FAMILY, b"l2_count", json.dumps(qc.summary["nodes"]).encode())
            row.set_cell(LEDGER_FAMILY, b"qc", json.dumps(qc.summary).encode())
            # spread over the 16 shards (which chunk lands where does not matter to QC)
            shard = shards.setdefault(len(rows) % runstate.QC_SHARDS, [])
            shard.append(qc.bins)
        else:
            row.set_cell(LEDGER_FAMILY, b"status", b"failed")
            row.set_cell(LEDGER_FAMILY, b"error", json.dumps("corrupt input").encode())
            rows.append(runstate.failure_row(run.run_id, cid, "failed", c, "now", {"error": "x"}))
        rows.append(row)
    for start in range(0, len(rows), 500):
        write_rows(ledger.table, rows[start : start + 500], "test")
    for shard, parts in shards.items():
        runstate.add_counts(ledger.table, runstate.qc_key(run.run_id, shard), merge_counters(parts))


SPATIAL = dataset("x").spatial_bits


@pytest.fixture(scope="module")
def env(bigtable_emulator):
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    table = create_runs_table(instance, "qcscale_runs")
    ds = dataset("scale")
    ctx = DatasetContext(ds, None, None, RunLedger(table))
    rng = np.random.default_rng(18)
    templates = [chunk_qc(random_features(rng, int(n)), ds) for n in rng.integers(50, 400, 8)]
    odd = chunk_qc(random_features(np.random.default_rng(1), 5000), ds)  # would skew a region
    return {"ctx": ctx, "ds": ds, "templates": templates, "odd": odd}


@pytest.fixture(scope="module")
def big_run(env):
    """4,000 chunks: inside QC_REGION, the templates; outside, odd chunks and failures."""
    ctx, templates = env["ctx"], env["templates"]
    run = new_run("bulk_ingest", env["ds"], RUN_REGION, 4000)
    ctx.ledger.create_run(run)
    done, failed, inside = {}, [], {}
    for i, c in enumerate(region_chunks(RUN_REGION)):
        in_qc = all(QC_REGION[a] <= c[a] < QC_REGION[a + 3] for a in range(3))
        if not in_qc and i % 10 == 0:
            failed.append(c)
            continue
        qc = templates[i % len(templates)] if in_qc else env["odd"]
        done[tuple(c)] = qc
        if in_qc:
            inside[tuple(c)] = qc
    t = time.perf_counter()
    write_chunks(ctx.ledger, run, done, failed)
    print(
        f"\nwrote {len(done) + len(failed)} synthetic chunk rows in {time.perf_counter() - t:.1f}s"
    )
    return {"run": run, "inside": inside, "failed": failed, "done": done}


def test_region_qc_reads_only_the_region_rows(env, big_run):
    ctx, run = env["ctx"], big_run["run"]
    t = time.perf_counter()
    report = region_qc(ctx, run.run_id, QC_REGION)
    seconds = time.perf_counter() - t
    print(f"\nregion QC of 1,000 chunks of a 4,000-chunk run: {seconds:.2f}s")
    assert report["scope"] == {"kind": "region", "region": QC_REGION, "chunks": 1000}
    assert report["reads"]["chunk_rows"] == 1000  # one keyed read per page, region only
    assert report["passed"], report["reasons"]
    cov = report["coverage"]
    nodes = sum(q.summary["nodes"] for q in big_run["inside"].values())
    assert cov["chunks_done"] == 1000 and cov["rows_written"] == nodes
    # out-of-region chunks (failed, or 5,000 huge nodes each) would change all of this
    assert report["features"]["size_nm3"]["count"] == nodes
    assert cov["covered_voxels"] == sum(
        q.summary["covered_voxels"] for q in big_run["inside"].values()
    )
    # a region over the edge of the run is cut to the run
    cut = region_qc(ctx, run.run_id, [15, 15, 5, 30, 30, 30])
    assert cut["scope"]["region"] == [15, 15, 5, 20, 20, 10]
    assert cut["reads"]["chunk_rows"] == 5 * 5 * 5 < PAGE
    with pytest.raises(ValueError, match="does not overlap"):
        region_qc(ctx, run.run_id, [30, 30, 30, 31, 31, 31])


def test_run_qc_merges_16_counter_rows_and_the_report_stays_small(env, big_run):
    ctx, run = env["ctx"], big_run["run"]
    t = time.perf_counter()
    report = run_qc(ctx, run.run_id)
    print(f"\nrun QC of a 4,000-chunk run from its counters: {time.perf_counter() - t:.2f}s")
    assert report["reads"]["counter_rows"] == 16 and report["reads"]["chunk_rows"] == 0
    cov = report["coverage"]
    assert cov["chunks"] == 4000 and cov["chunks_done"] == len(big_run["done"])
    nodes = sum(q.summary["nodes"] for q in big_run["done"].values())
    assert cov["rows_written"] == cov["expected_l2_ids"] == nodes
    assert report["features"]["size_nm3"]["count"] == nodes
    assert not report["passed"]
    (reason,) = report["reasons"]
    assert reason.startswith(f"{len(big_run['failed'])} of 4000 chunks not done (")
    assert len(cov["chunks_not_done"]) == 10  # examples, bounded
    key = save_report(ctx.ledger, report)
    row = read_row(ctx.ledger.table, key.encode())
    stored = sum(len(v) for fam in row.values() for v in fam.values())
    print(f"stored report: {stored} bytes for 4,000 chunks")
    assert stored < MAX_REPORT_BYTES and list(row["run"]) == [b"report"]
    assert load_report(ctx.ledger, run.run_id) == json.loads(json.dumps(report))
    # the run's figures equal the region figures merged over its whole box
    whole = region_qc(ctx, run.run_id, RUN_REGION)
    assert whole["features"] == report["features"]
    assert whole["coverage"]["chunks_done"] == cov["chunks_done"]


def test_a_report_has_no_per_chunk_table_however_many_chunks(env):
    """200,000 chunks recorded in the counters: the report's size does not grow with them."""
    ctx = env["ctx"]
    run = new_run("bulk_ingest", env["ds"], [0, 0, 0, 64, 64, 16], 65536)
    ctx.ledger.create_run(run)
    total = {k: v * 25_000 for k, v in merge_counters(t.bins for t in env["templates"]).items()}
    runstate.add_counts(ctx.ledger.table, runstate.qc_key(run.run_id, 0), total)
    report = run_qc(ctx, run.run_id)
    assert report["coverage"]["chunks_done"] == 200_000  # (more than the box: synthetic)
    size = len(json.dumps(report))
    print(f"\nreport of a run with 200,000 chunks recorded: {size} bytes")
    assert size < 200_000
    save_report(ctx.ledger, report)


def test_per_chunk_diff_against_the_release_reads_a_drop_as_negative(env, capsys):
    ctx, ds, templates = env["ctx"], env["ds"], env["templates"]
    region = [0, 0, 0, 4, 4, 4]
    chunks = [tuple(c) for c in region_chunks(region)]
    first = new_run("bulk_ingest", ds, region, 64)
    ctx.ledger.create_run(first)
    write_chunks(ctx.ledger, first, {c: templates[i % 8] for i, c in enumerate(chunks)})
    report = run_qc(ctx, first.run_id)
    assert report["passed"] and report["diff"] is None and report["reads"]["baseline_rows"] == 0
    save_report(ctx.ledger, report)
    assert promote(ctx.ledger, ds.name, first.run_id)["release"] == 1
    # the next run: chunk (1,1,1) lost every node, chunk (2,2,2) grew by a few percent
    second = new_run("bulk_ingest", ds, region, 64)
    ctx.ledger.create_run(second)
    grown_base = templates[chunks.index((2, 2, 2)) % 8]
    n = grown_base.summary["nodes"]
    grown = chunk_qc(random_features(np.random.default_rng(7), n + max(1, n // 50)), ds)
    later = {c: templates[i % 8] for i, c in enumerate(chunks)}
    later[(1, 1, 1)] = chunk_qc(empty_features(), ds, graph_l2=0)
    later[(2, 2, 2)] = grown
    write_chunks(ctx.ledger, second, later)
    lost = templates[chunks.index((1, 1, 1)) % 8].summary["nodes"]

    # a region QC compares just its chunks, reading both runs' rows of them by key
    th = QcThresholds(max_node_count_change=0.05, max_covered_voxels_change=10.0)
    part = region_qc(ctx, second.run_id, [0, 0, 0, 2, 2, 2], th)
    assert part["reads"] == {"chunk_rows": 8, "baseline_rows": 8}
    diff = part["diff"]
    assert diff["releases"] == [1] and diff["chunks_compared"] == 8
    worst = diff["node_count_change"]["worst"]
    assert worst["chunk"] == [1, 1, 1] and worst["nodes"] == [lost, 0]
    assert worst["node_count_change"] == -1.0 and diff["node_count_change"]["min"] == -1.0
    (reason,) = part["reasons"]
    assert reason == (
        f"1 of 8 chunks changed node count by more than 5% against release 1 "
        f"(worst: chunk [1, 1, 1] {lost} -> 0, -100.0%)"
    )
    capsys.readouterr()
    print_report(part)
    out = capsys.readouterr().out
    assert "-100.0%" in out and "+100.0%" not in out
    assert "chunks [0, 0, 0, 2, 2, 2] (8 chunks): FAIL" in out

    # the whole run: every covered chunk compared, page by page; the growth is signed +
    whole = run_qc(ctx, second.run_id, th)
    assert whole["reads"]["chunk_rows"] == whole["reads"]["baseline_rows"] == 64
    nc = whole["diff"]["node_count_change"]
    assert nc["count"] == 64 and nc["shrunk"] == 1 and nc["grown"] == 1
    assert 0 < nc["max"] <= 0.05 and nc["min"] == -1.0
    assert whole["diff"]["chunks_over_node_count"] == 1
    # the region report is stored apart: it never stands for the run
    key = save_report(ctx.ledger, part)
    assert key == f"qcregion:{second.run_id}:0-0-0-2-2-2"
    assert load_report(ctx.ledger, second.run_id) is None
    assert load_report(ctx.ledger, second.run_id, region=[0, 0, 0, 2, 2, 2])["passed"] is False
