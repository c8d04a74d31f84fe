"""Cost from ledger rows, the sample projection, SLO targets and verdicts, the sample pick."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from l2cache.config import ConfigError, parse_config
from l2cache.store.runstate import latency_bin
from l2cache_ops import cost
from l2cache_ops.settings import check_sections, slo_targets
from l2cache_ops.sizing import cpu_for_memory, worker_memory_mib
from l2cache_ops.slo import MET, MISSED, NO_DATA, SloTargets, bin_quantile, evaluate
from l2cache_tools.cli.ingest_cmd import scattered_chunks

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

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


def _p(**kw) -> cost.Prices:
    """Round prices: a row of 1 GiB stored 1 month at $1e-7, one node at $3600/h ($1/s)."""
    base = dict(
        gib_second=1e-6,
        vcpu_second=1e-5,
        task=1e-6,
        request=0.0,
        row_bytes=GIB,
        bigtable_ssd_gib_month=1e-7,
        bigtable_node_hour=3600.0,
        bigtable_nodes=1.0,
    )
    return cost.Prices(**{**base, **kw})


def test_chunk_cost_is_time_times_worker_price_plus_storage_and_dispatches():
    p = _p(request=5e-7).with_worker(2048, 1)
    row = {"status": "done", "duration_s": 10.0, "l2_count": 100, "attempts": 2}
    assert cost.chunk_cost(row, p) == pytest.approx(
        10 * (2 * 1e-6 + 1e-5) + 100 * 1e-7 + 2 * (1e-6 + 5e-7)
    )
    hdd = _p(bigtable_storage="HDD", bigtable_hdd_gib_month=2e-8, storage_months=3)
    assert hdd.row_storage == pytest.approx(3 * 2e-8)


def _at(s: float) -> str:
    return f"2026-12-01T00:{int(s) // 60:02d}:{s % 60:06.3f}+00:00"


def test_busy_seconds_is_the_union_of_the_chunks_intervals():
    rows = [
        {"started_at": _at(0), "finished_at": _at(10)},
        {"started_at": _at(5), "finished_at": _at(8)},  # inside the first
        {"started_at": _at(9), "finished_at": _at(12)},  # overlaps its end
        {"started_at": _at(100), "finished_at": _at(101)},  # after a pause: not charged
        {"started_at": _at(200)},  # still running: not yet
        {"status": "pending"},
    ]
    assert cost.busy_seconds(rows) == pytest.approx(13.0)
    assert cost.busy_seconds([]) == 0.0


def test_run_cost_counts_done_chunks_their_mm3_and_the_nodes_while_busy():
    rows = [
        {
            "status": "done",
            "duration_s": 2.0,
            "l2_count": 5,
            "attempts": 1,
            "voxels": 10**6,
            "started_at": _at(0),
            "finished_at": _at(2),
        },
        {
            "status": "done",
            "duration_s": 4.0,
            "l2_count": 7,
            "attempts": 1,
            "voxels": 10**6,
            "started_at": _at(1),
            "finished_at": _at(5),
        },
        {
            "status": "failed",
            "attempts": 3,
            "error": "x",
            "started_at": _at(10),
            "finished_at": _at(11),
        },
    ]
    p = _p().with_worker(1024, 1)
    rc = cost.run_cost(rows, voxel_volume_nm3=1e12, p=p)
    assert rc.chunks == 2 and rc.compute_s == 6.0 and rc.l2_rows == 12
    assert rc.mm3 == pytest.approx(2.0)  # 2e6 voxels x 1e12 nm^3 = 2e18 nm^3
    assert rc.compute_usd == pytest.approx(6 * (1e-6 + 1e-5))
    assert rc.dispatch_usd == pytest.approx(2 * 1e-6)  # the done chunks' attempts
    assert rc.storage_usd == pytest.approx(12 * 1e-7)
    assert rc.busy_s == pytest.approx(6.0)  # 0-5 and the failed chunk's 10-11
    assert rc.node_usd == pytest.approx(6.0)  # one node at $1/s
    parts = rc.compute_usd + rc.dispatch_usd + rc.storage_usd + rc.node_usd
    assert rc.usd == pytest.approx(parts) and rc.per_mm3 == pytest.approx(parts / 2.0)
    assert rc.prices is p
    assert sum(cost.chunk_cost(r, p) for r in rows[:2]) == pytest.approx(parts - rc.node_usd)


def test_projection_scales_the_sample_to_the_region_and_nodes_to_its_wall_time():
    p = _p()
    sample = cost.RunCost(usd=0.3 + 2.0, chunks=3, compute_s=30.0, l2_rows=0, mm3=0.0, node_usd=2.0)
    proj = cost.project(sample, 100, 512, 1e9, max_instances=8, p=p)
    assert proj.wall_s == pytest.approx(10.0 * math.ceil(100 / 8))
    assert proj.node_usd == pytest.approx(proj.wall_s * 1.0)  # one node at $1/s
    assert proj.usd == pytest.approx(10.0 + proj.node_usd)  # $0.1 a chunk without nodes
    assert proj.usd_per_chunk == pytest.approx(proj.usd / 100)
    assert proj.mm3 == pytest.approx(100 * 512 * 1e9 / 1e18)
    with pytest.raises(ValueError):
        cost.project(cost.RunCost(0, 0, 0, 0, 0), 10, 1, 1, 1)


def test_prices_come_from_the_environment_when_set():
    p = cost.prices({"L2CACHE_PRICE_TASK": "0.5", "L2CACHE_COST_FUNCTION_GIB": "4"})
    assert p.task == 0.5 and p.worker_gib == 4.0 and p.gib_second == cost.Prices().gib_second
    explicit = cost.worker_prices((128, 128, 128), base=p, env={"L2CACHE_COST_FUNCTION_GIB": "4"})
    assert explicit.worker_gib == 4.0  # an explicit worker size wins over the sizing


def _load_infra_sizing():
    spec = importlib.util.spec_from_file_location(
        "infra_sizing_probe", REPO / "infra" / "sizing.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_size_is_the_one_sizing_infra_deploys():
    infra = _load_infra_sizing()
    assert infra.worker_memory_mib is worker_memory_mib  # one definition, not a copy
    assert infra.cpu_for_memory is cpu_for_memory
    mib = worker_memory_mib((256, 256, 512))
    assert mib == 1024 and cost.DEFAULT_WORKER_GIB == mib / 1024
    assert cost.worker_prices((256, 256, 512), env={}).worker_gib == 1.0
    assert cost.worker_prices((128, 128, 128), env={}).worker_gib == (
        worker_memory_mib((128, 128, 128)) / 1024
    )
    # the map's tasks.read_ahead deploys a larger worker: cost follows it
    assert cost.worker_prices((256, 256, 512), read_ahead=True, env={}).worker_gib == 1.25


def test_a_runs_cost_is_priced_at_its_own_chunk_size_and_the_maps_read_ahead(monkeypatch):
    monkeypatch.delenv("L2CACHE_COST_FUNCTION_GIB", raising=False)
    run = SimpleNamespace(dataset="a", params={"chunk_size": [128, 128, 128]})
    cfg = SimpleNamespace(tasks=SimpleNamespace(read_ahead=True), dataset=None)
    assert cost.run_prices(run).worker_gib == worker_memory_mib((128, 128, 128)) / 1024
    assert cost.run_prices(run, cfg).worker_gib == (
        worker_memory_mib((128, 128, 128), read_ahead=True) / 1024
    )


def test_status_watch_and_inspect_price_a_run_the_same_way(monkeypatch):
    """Before, ``ingest --watch`` and ``runs inspect`` priced every run with the default
    1 GiB worker while ``status`` used the run's chunk size: two costs for one run."""
    from l2cache_tools.cli import ingest_cmd

    monkeypatch.delenv("L2CACHE_COST_FUNCTION_GIB", raising=False)
    run = SimpleNamespace(dataset="a", params={"chunk_size": [64, 64, 64]})
    ledger = SimpleNamespace(get_run=lambda run_id: run)
    seen = []
    monkeypatch.setattr(
        "l2cache_ops.status.run_status", lambda ledger, run_id, **kw: seen.append(kw["prices"])
    )
    ingest_cmd.current_status(ledger, "r")  # what watch and inspect call
    assert seen[0] == ingest_cmd.run_prices_of(ledger, "r") == cost.run_prices(run)
    assert seen[0].worker_gib == worker_memory_mib((64, 64, 64)) / 1024 != cost.PRICES.worker_gib


# a small ledger: three done chunks (two overlapping in time) and a failed one
LEDGER = [
    {
        "status": "done",
        "duration_s": 3.1,
        "l2_count": 940,
        "attempts": 1,
        "voxels": 256 * 256 * 512,
        "started_at": _at(0),
        "finished_at": _at(3.2),
    },
    {
        "status": "done",
        "duration_s": 2.9,
        "l2_count": 1099,
        "attempts": 2,
        "voxels": 256 * 256 * 512,
        "started_at": _at(1),
        "finished_at": _at(4),
    },
    {
        "status": "done",
        "duration_s": 3.0,
        "l2_count": 789,
        "attempts": 1,
        "voxels": 256 * 256 * 512,
        "started_at": _at(60),
        "finished_at": _at(63),
    },
    {"status": "failed", "attempts": 3, "started_at": _at(70), "finished_at": _at(71)},
]
PROBE = """
import importlib.util, json, sys
from l2cache_ops.cost import run_cost, worker_prices
rc = run_cost(json.load(sys.stdin), 16 * 16 * 40, worker_prices((256, 256, 512)))
print(json.dumps({
    "usd": rc.usd, "per_mm3": rc.per_mm3,
    "infra_on_path": [p for p in sys.path if "infra" in p],
    "sizing_importable": importlib.util.find_spec("sizing") is not None,
    "cost_file": sys.modules["l2cache_ops.cost"].__file__,
}))
"""


def test_a_cost_is_the_same_from_an_installed_package_outside_the_checkout(tmp_path):
    """The CLI's figure used to need infra/sizing.py loaded by file path: only a checkout
    could price a run. Now a process started elsewhere, with only the installed packages
    on sys.path (``-I``: no cwd, no PYTHONPATH), gets the very same number."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("L2CACHE_", "PYTHON"))}
    out = subprocess.run(
        [sys.executable, "-I", "-c", PROBE],
        cwd=tmp_path,
        input=json.dumps(LEDGER),
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    there = json.loads(out.stdout)
    assert there["infra_on_path"] == [] and not there["sizing_importable"]
    here = cost.run_cost(
        LEDGER, 16 * 16 * 40, cost.worker_prices((256, 256, 512), base=cost.prices({}), env={})
    )
    assert there["usd"] == here.usd and there["per_mm3"] == here.per_mm3  # exactly
    assert here.node_usd > 0 and here.storage_usd > 0


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


def _status(done, failed, rate, totals=None):
    counts = SimpleNamespace(totals=totals or {})
    return SimpleNamespace(done=done, failed=failed, rate_per_s=rate, retrying=0, counts=counts)


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
    # 3 chunks started, 2 needed a second attempt, 1 recovered after 30 s, 1 still failed
    totals = {"started": 3, "retried": 2, "recovered": 1, f"rec.{latency_bin(30)}": 1}
    # edit latencies 0, 1 and 3 s: bins of 0.5 s, 1 s and 3 s
    lat = {latency_bin(0): 1, latency_bin(1): 1, latency_bin(3): 1}
    rc = cost.RunCost(usd=5.0, chunks=2, compute_s=1, l2_rows=1, mm3=1.0)
    got = {
        r.name: r
        for r in evaluate(
            t, _status(2, 1, 0.05, totals), rc, {"passed": False, "reasons": ["coverage 50%"]}, lat
        )
    }
    assert got["throughput"].value == pytest.approx(180) and got["throughput"].verdict == MET
    assert got["failure rate"].verdict == MISSED  # 1 of 3
    assert got["retry rate"].value == pytest.approx(2 / 3) and got["retry rate"].verdict == MISSED
    assert got["time to recover a failed chunk"].verdict == MISSED  # one still failed
    assert got["edit-to-available p50"].value == pytest.approx(1.0)
    assert got["edit-to-available p50"].verdict == MET
    assert got["edit-to-available p95"].value == pytest.approx(3.0)  # the 3 s bin's edge
    assert got["edit-to-available p95"].verdict == MISSED
    assert got["QC pass"].verdict == MISSED and "coverage 50%" in got["QC pass"].detail
    assert got["cost envelope"].verdict == MET

    recovered = evaluate(t, _status(3, 0, 0.05, totals), rc, None, {})
    rec = {r.name: r for r in recovered}["time to recover a failed chunk"]
    assert rec.value == pytest.approx(30) and rec.verdict == MET  # the 30 s bin's edge

    none = {r.name: r for r in evaluate(t, _status(0, 0, 0), cost.RunCost(0, 0, 0, 0, 0), None, {})}
    assert all(r.verdict == NO_DATA for r in none.values())
    assert none["QC pass"].detail == "no QC yet"


def test_latency_quantiles_read_the_upper_bin_edge():
    assert bin_quantile({}, 0.5) is None
    bins = {latency_bin(0.2): 98, latency_bin(100): 2}
    assert bin_quantile(bins, 0.5) == 0.5
    assert bin_quantile(bins, 0.99) == 120
    assert bin_quantile({latency_bin(10_000): 1}, 0.5) == float("inf")  # the open last bin


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
