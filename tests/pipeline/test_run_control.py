"""Operating a run through the real local stack: pause/resume, --sample, inspect, status
with SLOs and cost, and the HTML dashboard rendered in headless Chromium.

The stack is the real one (Bigtable and Pub/Sub emulators, the extended Cloud Tasks
emulator, compute_chunk under functions-framework); the dataset is the vendored pinky40
crop in 8 chunks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from chromium import load_page
from stackutil import DispatchProbe, add_dataset, crop_volume

from l2cache.compute import dataset_context
from l2cache.config import load_config
from l2cache.gcp.tasks import queue_path, span_task_id, tasks_client
from l2cache.store.runstate import latency_bin
from l2cache_ops.ingest import start_ingest
from l2cache_ops.ledger import chunk_rows
from l2cache_ops.runstate import read_counts
from l2cache_ops.settings import slo_targets
from l2cache_tools.cli import main
from l2cache_tools.cli.ingest_cmd import watch
from l2cache_tools.local.stack import LocalStack

DATASET = "pinky_ops"
N_CHUNKS = 8
SLO = {
    "throughput_chunks_per_h": 10,
    "max_failure_rate": 0.01,
    "max_retry_rate": 0.5,
    "max_recover_s": 600,
    "edit_p50_s": 30,
    "edit_p95_s": 60,
    "qc_pass": True,
    "max_usd_per_mm3": 1e9,
}
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "test-screenshots"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    saved = dict(os.environ)
    directory = tmp_path_factory.mktemp("ops")
    with LocalStack(directory, compute_workers=2) as stack:
        add_dataset(stack, DATASET, crop_volume(), directory)
        cfg = yaml.safe_load(stack.config_path.read_text())
        cfg["slo"] = SLO
        cfg["datasets"][DATASET]["slo"] = {"max_usd_per_mm3": 1e12}  # per-dataset override
        stack.config_path.write_text(yaml.safe_dump(cfg))
        config = load_config(stack.config_path)
        yield {
            "stack": stack,
            "config": config,
            "path": str(stack.config_path),
            "ctx": dataset_context(config, DATASET),
        }
    os.environ.clear()
    os.environ.update(saved)


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


def queued_tasks(config) -> list:
    client = tasks_client()
    return list(client.list_tasks(parent=queue_path(client, config.tasks)))


def test_slo_targets_merge_top_level_and_dataset(env):
    t = slo_targets(env["config"], DATASET)
    assert t.max_usd_per_mm3 == 1e12  # the dataset's own value wins
    assert t.throughput_chunks_per_h == 10 and t.qc_pass is True  # the rest from the top


def test_pause_stops_dispatch_and_resume_finishes_the_run(env, capsys):
    config, ledger = env["config"], env["ctx"].ledger
    code, out = cli(capsys, "runs", "pause", DATASET, "--config", env["path"])
    assert code == 0 and ": paused," in out
    try:
        run = start_ingest(config, DATASET, batch=2)
        with DispatchProbe(config.tasks.project, config.tasks.location) as probe:
            probe.passed()  # the dispatcher has since looked at every queue: ours held
        assert chunk_rows(ledger, run.run_id) == []  # no chunk started, none finished
        held = queued_tasks(config)
        root = span_task_id(run.run_id, 0, N_CHUNKS, 0)  # the root span: all 8 chunks
        assert [t.name.rsplit("/", 1)[1] for t in held] == [root]
    finally:
        code, out = cli(capsys, "runs", "resume", DATASET, "--config", env["path"])
    assert code == 0 and ": running," in out
    st = watch(ledger, run.run_id, interval=0.2, timeout=240, cfg=config)
    assert (st.done, st.failed) == (N_CHUNKS, 0)

    # the worker logged one structured line per chunk (what the log-based metrics read)
    log = env["stack"].dir / "logs" / "function-compute_chunk.log"
    lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    mine = [e for e in lines if e.get("l2cache") == "chunk" and e["run_id"] == run.run_id]
    assert sorted(tuple(e["chunk"]) for e in mine) == sorted(
        tuple(r["coords"]) for r in chunk_rows(ledger, run.run_id)
    )
    assert {(e["status"], e["severity"], e["dataset"], e["attempts"]) for e in mine} == {
        ("done", "INFO", DATASET, 1)
    }
    assert all(e["duration_s"] > 0 for e in mine)

    code, out = cli(capsys, "status", DATASET, run.run_id, "--config", env["path"])
    assert code == 0
    cost = re.search(r"cost: \$([\d.]+) for 8 chunks .* -> \$([\d,.]+)/mm\^3", out)
    assert cost, out
    assert float(cost.group(1)) > 0
    verdicts = dict(re.findall(r"^  (\S.*?\S)\s{2,}.*?\s(met|missed|no data|no target)", out, re.M))
    assert verdicts["throughput"] == "met"
    assert verdicts["failure rate"] == "met"
    assert verdicts["cost envelope"] == "met"
    assert verdicts["time to recover a failed chunk"] == "no data"  # nothing failed
    assert verdicts["QC pass"] in ("no data", "met", "missed")  # QC is a separate step
    assert verdicts["edit-to-available p50"] == "no data"  # no edit in this module


def test_sample_projects_before_anything_else_is_enqueued(env, capsys):
    config, ledger = env["config"], env["ctx"].ledger
    code, out = cli(
        capsys, "ingest", DATASET, "--sample", "3", "--max-instances", "4", "--config", env["path"]
    )
    assert code == 0, out
    run_id = re.search(r"run (\S+): sampling 3 of 8 chunks", out).group(1)
    proj = re.search(
        r"compute-s and \$([\d.]+) per chunk.*\n  whole region: 8 chunks, .* -> wall time "
        r"([\d,]+)s at 4 instances, cost \$([\d.]+)",
        out,
    )
    assert proj, out
    assert "stopped after the sample" in out
    rows = chunk_rows(ledger, run_id)
    assert sorted(r["status"] for r in rows) == ["done"] * 3
    assert len({tuple(r["coords"]) for r in rows}) == 3  # scattered: three different chunks
    assert queued_tasks(config) == []  # nothing else was enqueued
    per_chunk, total = float(proj.group(1)), float(proj.group(3))
    assert total == pytest.approx(per_chunk * 8, rel=1e-3, abs=1e-4)

    code, out = cli(
        capsys, "ingest", DATASET, "--sample", "2", "--yes", "--watch", "--config", env["path"]
    )
    assert code == 0, out
    run_id = re.search(r"run (\S+): sampling 2 of 8 chunks", out).group(1)
    rows = chunk_rows(ledger, run_id)
    assert len(rows) == N_CHUNKS and all(r["status"] == "done" for r in rows)
    assert all(r["attempts"] == 1 for r in rows)  # sampled chunks were not computed again


def test_inspect_lists_failed_chunks_with_errors_and_attempts(env, capsys):
    code, out = cli(
        capsys,
        "ingest",
        DATASET,
        "--bbox",
        "0,0,0,48,48,24",
        "--pin-revision",
        "not-this-code",
        "--watch",
        "--config",
        env["path"],
    )
    assert code == 1, out  # the chunk failed
    run_id = re.search(r"run (\S+): 1 chunks", out).group(1)
    code, out = cli(capsys, "runs", "inspect", DATASET, run_id, "--config", env["path"])
    assert code == 1
    line = next(ln for ln in out.splitlines() if ln.startswith("  failed    chunk [0, 0, 0]"))
    assert "permanent attempts=1" in line
    assert "pinned to revision not-this-code" in line
    code, out = cli(capsys, "status", DATASET, run_id, "--config", env["path"])
    assert re.search(r"failure rate\s+100\.0%.*missed", out)
    assert re.search(r"time to recover a failed chunk\s+unrecovered.*missed", out)


def test_first_failure_is_stamped_once_and_recovery_is_timed(env):
    ledger = env["ctx"].ledger
    run_id, cid = "test-recovery", 12345
    ledger.chunk_started(run_id, cid, [0, 0, 0])
    ledger.chunk_finished(run_id, cid, [0, 0, 0], "retrying", error="transient")
    first = chunk_rows(ledger, run_id)[0]["first_failed_at"]
    time.sleep(0.05)
    ledger.chunk_started(run_id, cid, [0, 0, 0])
    ledger.chunk_finished(run_id, cid, [0, 0, 0], "retrying", error="again")
    ledger.chunk_started(run_id, cid, [0, 0, 0])
    ledger.chunk_finished(run_id, cid, [0, 0, 0], "done", duration_s=1.0)
    rows = chunk_rows(ledger, run_id)
    assert rows[0]["first_failed_at"] == first  # later failures do not move it
    counts = read_counts(ledger, run_id)
    # the recovery is counted once, in the bin of its duration; the chunk counts done
    assert counts["recovered"] == 1 and counts["done"] == 1 and counts["retrying"] == 0
    assert counts[f"rec.{latency_bin(0.05)}"] == 1
    assert counts["started"] == 1 and counts["retried"] == 1 and counts["attempts"] == 3


def test_dashboard_renders_in_headless_chromium(env, capsys, tmp_path):
    out_path = tmp_path / "dash.html"
    code, out = cli(capsys, "dashboard", DATASET, "--out", str(out_path), "--config", env["path"])
    assert code == 0 and str(out_path) in out
    page = out_path.read_text()
    assert "<script src=" not in page  # self-contained: plotly.js is inlined
    assert "Plotly.newPlot" in page and len(page) > 1_000_000
    for section in (
        "SLO status",
        "Current release and lineage",
        "QC",
        "Cost per mm^3",
        "Throughput: chunks done per hour",
        "Failures and retries per minute",
        "Where chunks fail",
        "Edit latency over time",
        "Rollbacks",
        "Lineage",
    ):
        assert section in page
    shot = tmp_path / "dashboard.png"
    result = load_page(out_path.as_uri(), shot, settle_s=1.5)
    assert result.console_errors == []
    assert result.title == f"l2cache: {DATASET}"
    assert result.plots >= 6  # every figure was drawn
    assert shot.stat().st_size > 50_000
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SCREENSHOTS / "dashboard.png")  # kept for a person to look at


def test_console_errors_are_really_captured(tmp_path):
    """The harness itself: a page that logs an error and throws is reported."""
    page = tmp_path / "bad.html"
    page.write_text("<title>bad</title><script>console.error('boom'); nope();</script>")
    result = load_page(page.as_uri(), tmp_path / "bad.png", settle_s=0.3)
    assert "boom" in result.console_errors
    assert any("nope is not defined" in e for e in result.console_errors)
