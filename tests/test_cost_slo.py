"""Cost from ledger rows, the sample projection, SLO targets and verdicts, the sample pick."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from l2cache.config import ConfigError, parse_config
from l2cache_ops import cost
from l2cache_ops.settings import check_sections, slo_targets
from l2cache_ops.slo import MET, MISSED, NO_DATA, SloTargets, edit_latencies, evaluate
from l2cache_tools.cli.ingest_cmd import scattered_chunks
from l2cache_tools.sizing import infra_sizing, worker_prices

BASE = {
    "bigtable": {"project": "p", "instance": "i"},
    "datasets": {
        "a": {
            "segmentation": "file:///x",
            "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "a"},
            "cache_table_id": "c",
            "resolution": [16, 16, 40],
            "voxel_offset": [0, 0, 0],
            "chunk_size": [8, 8, 8],
            "spatial_bits": {1: 10, 2: 10},
        }
    },
}


def test_chunk_cost_is_time_times_worker_price_plus_rows_and_tasks():
    p = cost.Prices(gib_second=1e-6, vcpu_second=1e-5, bigtable_row=1e-7, task=1e-6)
    p = p.with_worker(2048, 1)
    row = {"status": "done", "duration_s": 10.0, "l2_count": 100, "attempts": 2}
    assert cost.chunk_cost(row, p) == pytest.approx(10 * (2 * 1e-6 + 1e-5) + 100 * 1e-7 + 2e-6)


def test_run_cost_counts_done_chunks_and_their_mm3():
    rows = [
        {"status": "done", "duration_s": 2.0, "l2_count": 5, "attempts": 1, "voxels": 10**6},
        {"status": "done", "duration_s": 4.0, "l2_count": 7, "attempts": 1, "voxels": 10**6},
        {"status": "failed", "attempts": 3, "error": "x"},
    ]
    rc = cost.run_cost(rows, voxel_volume_nm3=1e12, p=cost.Prices())
    assert rc.chunks == 2 and rc.compute_s == 6.0 and rc.l2_rows == 12
    assert rc.mm3 == pytest.approx(2.0)  # 2e6 voxels x 1e12 nm^3 = 2e18 nm^3
    assert rc.per_mm3 == pytest.approx(rc.usd / 2.0)


def test_projection_scales_the_sample_to_the_region():
    sample = cost.RunCost(usd=0.3, chunks=3, compute_s=30.0, l2_rows=0, mm3=0.0)
    proj = cost.project(sample, 100, 512, 1e9, max_instances=8)
    assert proj.usd == pytest.approx(10.0)
    assert proj.wall_s == pytest.approx(10.0 * math.ceil(100 / 8))
    assert proj.mm3 == pytest.approx(100 * 512 * 1e9 / 1e18)
    with pytest.raises(ValueError):
        cost.project(cost.RunCost(0, 0, 0, 0, 0), 10, 1, 1, 1)


def test_prices_come_from_the_environment_when_set():
    p = cost.prices({"L2CACHE_PRICE_TASK": "0.5", "L2CACHE_COST_FUNCTION_GIB": "4"})
    assert p.task == 0.5 and p.worker_gib == 4.0 and p.gib_second == cost.Prices().gib_second


def test_worker_size_is_infras_sizing(monkeypatch):
    monkeypatch.delenv("L2CACHE_COST_FUNCTION_GIB", raising=False)
    mib = infra_sizing().worker_memory_mib((256, 256, 512))
    assert mib == 1024 and cost.DEFAULT_WORKER_GIB == mib / 1024
    assert worker_prices((256, 256, 512)).worker_gib == 1.0
    assert (
        worker_prices((128, 128, 128)).worker_gib
        == infra_sizing().worker_memory_mib((128, 128, 128)) / 1024
    )


def test_slo_section_top_level_and_per_dataset_override():
    raw = {**BASE, "slo": {"max_failure_rate": 0.01, "edit_p95_s": 60}}
    raw["datasets"] = {"a": {**BASE["datasets"]["a"], "slo": {"edit_p95_s": 5}}}
    t = slo_targets(parse_config(raw), "a")
    assert t.max_failure_rate == 0.01 and t.edit_p95_s == 5 and t.qc_pass is None
    assert slo_targets(parse_config(BASE), "a") == SloTargets()


@pytest.mark.parametrize(
    "slo, words",
    [
        ({"max_failure_rate": 2}, "fraction"),
        ({"throughput": 3}, "unknown key"),
        ({"qc_pass": "yes"}, "true or false"),
        ({"edit_p50_s": -1}, "non-negative"),
    ],
)
def test_bad_slo_targets_are_config_errors(slo, words):
    with pytest.raises(ConfigError, match=words):
        check_sections(parse_config({**BASE, "slo": slo}))


def _status(done, failed, rate):
    return SimpleNamespace(done=done, failed=failed, rate_per_s=rate, retrying=0)


def test_verdicts_met_missed_and_no_data():
    t = SloTargets(
        throughput_chunks_per_h=100,
        max_failure_rate=0.1,
        max_retry_rate=0.2,
        max_recover_s=60,
        edit_p50_s=1,
        edit_p95_s=2,
        qc_pass=True,
        max_usd_per_mm3=10,
    )
    rows = [
        {"status": "done", "attempts": 1},
        {
            "status": "done",
            "attempts": 2,
            "first_failed_at": "2026-01-01T00:00:00+00:00",
            "finished_at": "2026-01-01T00:00:30+00:00",
        },
        {"status": "failed", "attempts": 3, "first_failed_at": "2026-01-01T00:00:00+00:00"},
    ]
    events = [
        {
            "kind": "edit",
            "status": "ok",
            "published_at": "2026-01-01T00:00:00+00:00",
            "recorded_at": f"2026-01-01T00:00:0{s}+00:00",
        }
        for s in (0, 1, 3)
    ] + [{"kind": "missing", "status": "ok", "published_at": "x", "recorded_at": "y"}]
    rc = cost.RunCost(usd=5.0, chunks=2, compute_s=1, l2_rows=1, mm3=1.0)
    got = {
        r.name: r
        for r in evaluate(
            t, _status(2, 1, 0.05), rows, rc, {"passed": False, "reasons": ["coverage 50%"]}, events
        )
    }
    assert got["throughput"].value == pytest.approx(180) and got["throughput"].verdict == MET
    assert got["failure rate"].verdict == MISSED  # 1 of 3
    assert got["retry rate"].value == pytest.approx(2 / 3) and got["retry rate"].verdict == MISSED
    assert got["time to recover a failed chunk"].verdict == MISSED  # one still failed
    assert got["edit-to-available p50"].value == pytest.approx(1.0)
    assert got["edit-to-available p50"].verdict == MET
    assert got["edit-to-available p95"].verdict == MISSED  # 2.8 s > 2 s
    assert got["QC pass"].verdict == MISSED and "coverage 50%" in got["QC pass"].detail
    assert got["cost envelope"].verdict == MET

    none = {
        r.name: r for r in evaluate(t, _status(0, 0, 0), [], cost.RunCost(0, 0, 0, 0, 0), None, [])
    }
    assert all(r.verdict == NO_DATA for r in none.values())
    assert none["QC pass"].detail == "no QC yet"


def test_edit_latency_uses_inline_edits_only():
    ev = [{"kind": "edit", "status": "fanned_out", "published_at": "a", "recorded_at": "b"}]
    assert edit_latencies(ev) == []


def test_sample_is_scattered_deterministic_and_distinct():
    region = [0, 0, 0, 8, 8, 4]
    a = scattered_chunks(region, 16)
    assert a == scattered_chunks(region, 16)
    assert len({tuple(c) for c in a}) == 16
    # spread: every octant of the x/y plane and both z halves are hit
    assert {(c[0] // 4, c[1] // 4) for c in a} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert {c[2] // 2 for c in a} == {0, 1}
    assert len(scattered_chunks([0, 0, 0, 2, 1, 1], 5)) == 2  # never more than the region
    assert sorted(map(tuple, scattered_chunks([3, 0, 0, 5, 2, 2], 8))) == sorted(
        (x, y, z) for x in (3, 4) for y in (0, 1) for z in (0, 1)
    )
