"""QC per run and releases with region rollback, on the real Bigtable emulator.

Real pinky40 crop built as a PCG dataset (8 chunks), runs computed in process with
``compute_chunk`` (the worker's own code, which records each chunk's QC statistics), QC
merging them (and, with ``verify``, re-reading the cache and graph tables by key range),
releases in the runs table, the CLI through ``l2cache_tools.cli.main``.
The tests build on each other in order: release 1, release 2, bad runs, a region
rollback, then an edit whose node-count change QC catches.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import yaml
from stackutil import CHUNK, RES, crop_volume

from l2cache.compute import chunk_id, compute_chunk, dataset_context, load_chunk_l2
from l2cache.config import ConfigError, load_config, parse_config
from l2cache.domain.attributes import ATTRIBUTES
from l2cache.domain.regions import region_chunks
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.gcp.bigtable_write import write_rows
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import create_runs_table, new_run
from l2cache_ops.qc import QcThresholds, graph_l2_ids, run_qc
from l2cache_ops.qc_reports import load_report, save_report
from l2cache_ops.releases import (
    ReleaseRefused,
    current_release,
    promote,
    release_history,
    rollback_release,
)
from l2cache_ops.rollback import chunk_key_ranges
from l2cache_ops.settings import check_sections, qc_thresholds
from l2cache_tools.cli import main
from l2cache_tools.dataset import build_dataset
from l2cache_tools.dataset.edits import apply_merge, pick_merge

DS = "qcrel"
PROJECT, INSTANCE = "qc-project", "qc-instance"
CHUNKS = region_chunks([0, 0, 0, 2, 2, 2])
REGION_CHUNK = [1, 1, 1]


@pytest.fixture(scope="module")
def env(bigtable_emulator, tmp_path_factory):
    directory = tmp_path_factory.mktemp("qcrel")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    built = build_dataset(crop_volume(), f"file://{directory}/sv", RES, CHUNK, instance, DS)
    create_cache_table(instance, f"l2cache_{DS}")
    create_runs_table(instance, "qc_runs")
    config_path = directory / "datasets.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "bigtable": {"project": PROJECT, "instance": INSTANCE},
                "runs_table_id": "qc_runs",
                "qc": {"max_node_count_change": 0.05, "min_coverage": 1.0},
                "datasets": {
                    DS: {
                        "segmentation": built.segmentation,
                        "graph": {
                            "kind": "bigtable",
                            "project": PROJECT,
                            "instance": INSTANCE,
                            "table_id": DS,
                        },
                        "cache_table_id": f"l2cache_{DS}",
                        "qc": {"max_node_count_change": 0.01},
                    }
                },
            }
        )
    )
    config = load_config(config_path)
    ctx = dataset_context(config, DS)
    return {
        "config": config,
        "path": str(config_path),
        "ctx": ctx,
        "instance": instance,
        "dir": directory,
        "runs": {},
        "thresholds": qc_thresholds(config, DS),
    }


def bulk(ctx, chunks=CHUNKS, skip=()):
    """A bulk run over the whole crop, computed in process; returns (run, seconds per chunk)."""
    run = new_run("bulk_ingest", ctx.dataset, [0, 0, 0, 2, 2, 2], len(chunks))
    ctx.ledger.create_run(run)
    seconds = {}
    for c in chunks:
        if tuple(c) in skip:
            continue
        t = time.perf_counter()
        assert compute_chunk(ctx, run, c)["status"] == "done"
        seconds[tuple(c)] = time.perf_counter() - t
    time.sleep(0.002)  # the next run gets a later cell timestamp
    return run, seconds


def chunk_nodes(ctx, chunk, run) -> np.ndarray:
    return load_chunk_l2(ctx, chunk, run.snapshot).l2_ids


def raw(ctx, nodes) -> dict:
    return ctx.store.read_raw(nodes)


def runs_of(ctx, nodes) -> dict:
    """Each node's newest version's lineage (its chunk's lineage row)."""
    return ctx.store.read_lineage(nodes)


def qc(env, run_id, **kwargs):
    report = run_qc(env["ctx"], run_id, env["thresholds"], **kwargs)
    save_report(env["ctx"].ledger, report)
    return report


def test_thresholds_come_from_the_map_top_level_then_dataset(env):
    th = env["thresholds"]
    assert th == QcThresholds(max_node_count_change=0.01, max_covered_voxels_change=0.05)
    base = {"bigtable": {"project": "p", "instance": "i"}, "datasets": {}}
    with pytest.raises(ConfigError, match="qc: unknown key 'max_nodes'"):
        check_sections(parse_config({**base, "qc": {"max_nodes": 1}}))
    with pytest.raises(ConfigError, match="min_coverage is a fraction"):
        check_sections(parse_config({**base, "qc": {"min_coverage": 2}}))


def test_a_clean_run_passes_qc_with_full_coverage_and_distributions(env, tmp_path):
    ctx = env["ctx"]
    run, _ = bulk(ctx)
    env["runs"]["A"] = run
    # the cheap graph query (supervoxel key ranges) agrees with reading every chunk
    coords = np.asarray(CHUNKS)
    from_graph = graph_l2_ids(ctx, coords, run.snapshot)
    per_chunk = {chunk_id(ctx, c): chunk_nodes(ctx, c, run) for c in CHUNKS}
    assert {k: v.tolist() for k, v in from_graph.items()} == {
        k: np.sort(v).tolist() for k, v in per_chunk.items()
    }
    total = sum(v.size for v in per_chunk.values())
    json_path, html_path = tmp_path / "qc.json", tmp_path / "qc.html"
    code = main(
        ["qc", DS, run.run_id, "--config", env["path"], "--json", str(json_path),
         "--html", str(html_path)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(json_path.read_text())
    assert report["passed"] and report["reasons"] == []
    cov = report["coverage"]
    assert cov["ratio"] == 1.0 and cov["expected_l2_ids"] == cov["rows_written"] == total
    assert cov["chunks_done"] == 8 and cov["missing"] == cov["extra"] == cov["malformed"] == 0
    assert report["diff"] is None  # no release yet
    size = report["features"]["size_nm3"]
    assert size["count"] == total and size["min"] <= size["quantiles"]["p50"] <= size["max"]
    assert sum(size["histogram"]["counts"]) == total
    # whole-run QC merged the workers' counters: it read the 16 shard rows, no chunk row
    assert report["scope"]["kind"] == "run" and report["features_source"] == "run counters"
    assert report["reads"]["chunk_rows"] == 0 and report["reads"]["counter_rows"] <= 16 + 512
    # the same figures from the chunk rows (region QC of the whole box) and re-read (--verify)
    by_rows = run_qc(ctx, run.run_id, env["thresholds"], region=[0, 0, 0, 2, 2, 2])
    verified = run_qc(ctx, run.run_id, env["thresholds"], verify=True)
    for other in (by_rows, verified):
        assert other["passed"] and other["coverage"]["rows_written"] == total
        assert other["features"] == report["features"]
    assert verified["coverage"]["source"].startswith("verify")
    assert verified["reads"]["cache_rows"] == total and verified["reads"]["recorded_mismatch"] == 0
    # the stored report is the one written to JSON
    assert load_report(ctx.ledger, run.run_id) == report
    assert load_report(ctx.ledger, "no-such-run") is None
    page = html_path.read_text()
    assert run.run_id in page and "PASS" in page and "Plotly" in page
    assert "<script src=" not in page  # self-contained: plotly.js inlined, no network


def test_promote_records_lineage_and_the_next_run_is_diffed_against_it(env, capsys):
    ctx, a = env["ctx"], env["runs"]["A"]
    assert main(["release", "promote", DS, a.run_id, "--config", env["path"]]) == 0
    first = current_release(ctx.ledger, DS)
    assert first["release"] == 1 and first["run_id"] == a.run_id and first["qc_passed"]
    assert first["lineage"]["code_revision"] == a.code_revision
    assert first["lineage"]["params_hash"] == a.params_hash
    assert first["lineage"]["snapshot"] == a.snapshot_timestamp
    with pytest.raises(ReleaseRefused, match="already release 1"):
        promote(ctx.ledger, DS, a.run_id)
    b, seconds = bulk(ctx)
    env["runs"]["B"], env["ingest_seconds"] = b, seconds
    report = qc(env, b.run_id)
    assert report["passed"], report["reasons"]
    diff = report["diff"]
    assert diff["releases"] == [1] and diff["chunks_compared"] == 8
    assert (
        diff["node_count_change"]["max_abs"] == 0 and diff["covered_voxels_change"]["max_abs"] == 0
    )
    # the diff read both runs' chunk rows by key, and only those a release covers
    assert report["reads"]["chunk_rows"] == report["reads"]["baseline_rows"] == 8
    assert promote(ctx.ledger, DS, b.run_id)["release"] == 2
    assert [r["release"] for r in release_history(ctx.ledger, DS)] == [1, 2]
    capsys.readouterr()
    assert main(["release", "list", DS, "--config", env["path"]]) == 0
    out = capsys.readouterr().out
    assert a.run_id in out and b.run_id in out and "current release: 2" in out


def test_tampered_or_failed_runs_fail_qc_and_cannot_be_promoted(env, capsys):
    ctx = env["ctx"]
    # C: every chunk done, then three of its rows lost (deleted at its own version)
    c, _ = bulk(ctx)
    lost = chunk_nodes(ctx, [0, 0, 0], c)[:3]
    start = datetime.fromtimestamp(c.cell_timestamp_ms / 1000, tz=UTC)
    rows = []
    for node in lost.tolist():
        row = ctx.store.table.direct_row(b"%020d" % node)
        row.delete_cells("0", [a.key for a in ATTRIBUTES], time_range=_window(start))
        rows.append(row)
    write_rows(ctx.store.table, rows, "test")
    # the workers' figures cannot see rows lost after they were written: --verify does
    assert run_qc(ctx, c.run_id, env["thresholds"])["passed"]
    report = qc(env, c.run_id, verify=True)
    assert not report["passed"]
    assert report["coverage"]["missing"] == 3
    assert report["reads"]["recorded_mismatch"] == 1  # chunk (0,0,0): 3 rows fewer than recorded
    assert any(r.startswith("coverage ") and "3 of" in r for r in report["reasons"])
    assert set(report["coverage"]["missing_examples"]) == {str(v) for v in lost.tolist()}
    # D: one chunk failed (the ledger's permanent failure), its ids never written
    d, _ = bulk(ctx, skip={(1, 0, 1)})
    ctx.ledger.chunk_finished(
        d.run_id, chunk_id(ctx, [1, 0, 1]), [1, 0, 1], "failed", error="corrupt", permanent=True
    )
    report = qc(env, d.run_id)
    assert not report["passed"]
    assert any("1 of 8 chunks not done ([1, 0, 1] failed)" in r for r in report["reasons"])
    assert report["coverage"]["chunks_done"] == 7
    report = qc(env, d.run_id, verify=True)  # the failed chunk's L2 ids, from the graph
    assert any("1 of 8 chunks not done ([1, 0, 1] failed)" in r for r in report["reasons"])
    assert any(r.startswith("coverage ") for r in report["reasons"])
    assert report["coverage"]["missing"] == chunk_nodes(ctx, [1, 0, 1], d).size
    capsys.readouterr()
    for run in (c, d):
        assert main(["release", "promote", DS, run.run_id, "--config", env["path"]]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: run {run.run_id} failed QC: ") and err.count("\n") == 1
    env["runs"]["C"], env["runs"]["D"] = c, d
    assert current_release(ctx.ledger, DS)["release"] == 2


def _window(start):
    from google.cloud.bigtable.row_filters import TimestampRange

    return TimestampRange(start=start, end=start + timedelta(milliseconds=1))


def test_region_rollback_restores_the_previous_release_in_that_region_only(env, capsys):
    ctx = env["ctx"]
    a = env["runs"]["A"]
    inside = chunk_nodes(ctx, REGION_CHUNK, a)
    outside = np.concatenate([chunk_nodes(ctx, c, a) for c in CHUNKS if c != REGION_CHUNK])
    # release 1's bytes, as they were when release 1 was current: its lineage names run A
    before_inside = raw(ctx, inside)
    assert {r[b"run"] for r in runs_of(ctx, inside).values()} != {a.run_id.encode()}
    before_outside = raw(ctx, outside)
    cs, off = np.asarray(ctx.dataset.chunk_size), np.asarray(ctx.dataset.voxel_offset)
    lo = off + cs * np.asarray(REGION_CHUNK)
    region = ",".join(str(int(v)) for v in [*lo, *(lo + cs)])
    capsys.readouterr()
    args = ["release", "rollback", DS, "--region", region, "--config", env["path"]]
    # without a terminal and without --yes: refused, nothing changed
    assert main(args) == 2
    assert "pass --yes" in capsys.readouterr().err
    # a dry run prints exactly what would go and writes nothing
    assert main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert dry.startswith("dry run: release 2 rolled back in chunks [1, 1, 1, 2, 2, 2]")
    assert f"would delete {3 * inside.size} versions in {inside.size} rows" in dry
    assert raw(ctx, inside) == before_inside and not current_release(ctx.ledger, DS)["rollbacks"]
    assert main([*args, "--yes"]) == 0
    out = capsys.readouterr().out
    assert "release 2 rolled back in chunks [1, 1, 1, 2, 2, 2]" in out and "release(s): 1" in out
    after_inside = raw(ctx, inside)
    assert {r[b"run"] for r in runs_of(ctx, inside).values()} == {a.run_id.encode()}
    assert all(after_inside[n]["0"] == before_inside[n]["0"] for n in inside.tolist())
    assert raw(ctx, outside) == before_outside  # other regions untouched, byte for byte
    # it read only the region's key range: the chunk's lineage rows (one per run that
    # wrote it), then touched exactly that chunk's L2 rows, not the table
    (event,) = current_release(ctx.ledger, DS)["rollbacks"]
    assert event["ranges"] == 1 and event["rows_scanned"] == len(event["runs"])
    assert event["rows_touched"] == inside.size
    assert set(event["runs"]) == {env["runs"][k].run_id for k in "BCD"}  # later batch runs
    ingest_s = env["ingest_seconds"][tuple(REGION_CHUNK)]
    print(
        f"\nregion rollback of 1 chunk ({inside.size} L2 rows): {event['seconds']:.3f}s vs "
        f"ingest of that chunk {ingest_s:.3f}s (x{event['seconds'] / ingest_s:.2f})"
    )
    # the range reader itself never strays outside the region's chunk
    ((lo_key, hi_key),) = chunk_key_ranges([chunk_id(ctx, REGION_CHUNK)], ctx.dataset.spatial_bits)
    assert all(lo_key <= b"%020d" % n < hi_key for n in inside.tolist())
    # release 2 stays current outside the rolled-back region
    assert current_release(ctx.ledger, DS)["release"] == 2


def test_a_diff_above_threshold_fails_qc(env):
    """A merge in chunk (0,0,1) leaves it one L2 node fewer: more than the map's 1%."""
    ctx = env["ctx"]
    graph = env["instance"].table(DS)
    apply_merge(graph, ctx.dataset, *pick_merge(ctx.dataset, graph, (0, 0, 1)))
    time.sleep(0.002)
    f, _ = bulk(ctx)
    report = qc(env, f.run_id)
    assert not report["passed"]
    assert report["coverage"]["ratio"] == 1.0  # complete: the graph changed, not the run
    (reason,) = report["reasons"]
    assert reason.startswith("1 of 8 chunks changed node count by more than 1%")
    assert "chunk [0, 0, 1]" in reason
    # a merge leaves fewer nodes: the change reads as a drop
    worst = report["diff"]["node_count_change"]["worst"]
    old_n, new_n = worst["nodes"]
    assert new_n < old_n and worst["node_count_change"] < 0
    assert f"{old_n} -> {new_n}, -" in reason and "+" not in reason.split("->")[-1]
    # the rolled-back chunk is compared with release 1, the others with release 2
    assert report["diff"]["releases"] == [1, 2]
    with pytest.raises(ReleaseRefused, match="failed QC"):
        promote(ctx.ledger, DS, f.run_id)


def test_whole_release_rollback_makes_the_previous_release_current(env):
    ctx = env["ctx"]
    a = env["runs"]["A"]
    done = rollback_release(ctx)
    assert done["release"] == 2 and done["restored"] == [1] and done["whole"]
    assert current_release(ctx.ledger, DS)["release"] == 1
    nodes = np.concatenate([chunk_nodes(ctx, c, a) for c in CHUNKS])
    runs = {r[b"run"] for r in runs_of(ctx, nodes).values()}
    assert runs == {a.run_id.encode()}  # every later batch run's version is gone
