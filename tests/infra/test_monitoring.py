"""Log-based metrics and the SLO panels of the Cloud Monitoring dashboard, under mocks.

Built in a fresh process by the harness (as the variants are), with an ``slo:``
section in the dataset map, so the thresholds can be checked against it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from l2cache_ops.cost import PRICES

from .harness import DATASETS_YAML

HARNESS = Path(__file__).with_name("harness.py")
METRIC = "gcp:logging/metric:Metric"
DASHBOARD = "gcp:monitoring/dashboard:Dashboard"
SLO = "slo: {throughput_chunks_per_h: 7200, edit_p50_s: 20, edit_p95_s: 90, max_recover_s: 900, qc_pass: true, max_usd_per_mm3: 12.5}\n"


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    arg = json.dumps({"datasets_yaml": DATASETS_YAML + SLO})
    out = subprocess.run(
        [sys.executable, str(HARNESS), arg],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=HARNESS.parent,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def of_type(rows, typ):
    return [r for r in rows if r["type"] == typ]


def test_log_metrics_read_the_structured_lines(resources):
    metrics = {r["inputs"]["name"]: r["inputs"] for r in of_type(resources, METRIC)}
    assert set(metrics) == {
        "l2cache_chunks",
        "l2cache_chunk_seconds",
        "l2cache_chunk_attempts",
        "l2cache_edit_latency",
        "l2cache_events",
        "l2cache_lookups",
    }
    chunks = metrics["l2cache_chunks"]
    assert 'resource.type="cloud_run_revision"' in chunks["filter"]
    assert 'jsonPayload.l2cache="chunk"' in chunks["filter"]
    assert chunks["labelExtractors"] == {
        "status": "EXTRACT(jsonPayload.status)",
        "dataset": "EXTRACT(jsonPayload.dataset)",
    }
    assert chunks["metricDescriptor"]["valueType"] == "INT64"
    assert {lb["key"] for lb in chunks["metricDescriptor"]["labels"]} == {"status", "dataset"}
    latency = metrics["l2cache_edit_latency"]
    assert latency["valueExtractor"] == "EXTRACT(jsonPayload.latency_s)"
    assert latency["metricDescriptor"]["valueType"] == "DISTRIBUTION"
    assert latency["metricDescriptor"]["unit"] == "s"
    assert 'jsonPayload.l2cache="event"' in latency["filter"]
    assert latency["bucketOptions"]["exponentialBuckets"]["growthFactor"] == 2
    seconds = metrics["l2cache_chunk_seconds"]
    assert seconds["valueExtractor"] == "EXTRACT(jsonPayload.duration_s)"
    assert 'jsonPayload.status="done"' in seconds["filter"]
    assert metrics["l2cache_chunk_attempts"]["valueExtractor"] == "EXTRACT(jsonPayload.attempts)"
    assert all(m["project"] == "proj" for m in metrics.values())


def test_metrics_and_dashboard_belong_to_the_monitoring_component(resources):
    ours = [r for r in resources if r["type"] in (METRIC, DASHBOARD)]
    assert len(ours) == 7
    assert {r["parent"] for r in ours} == {"l2cache:index:Monitoring::monitoring"}
    assert all(["", "", True] in r["aliases"] for r in ours)  # kept from the stack root
    (registered,) = [
        r["inputs"]
        for r in resources
        if r["type"] == "registered_outputs" and r["name"] == "l2cache:index:Monitoring"
    ]
    assert registered["dashboard"] == "dashboard_id"
    assert sorted(registered["log_metrics"]) == sorted(
        r["inputs"]["name"] for r in of_type(resources, METRIC)
    )


def test_the_log_fields_are_what_the_functions_write():
    """Every field a metric extracts is one l2cache.support.logs writes."""
    import io

    from l2cache.support import logs

    sys.path.insert(0, str(HARNESS.parents[2] / "infra"))
    from monitoring import LOG_METRICS  # noqa: E402

    line = logs.emit("chunk", stream=io.StringIO(), status="done")
    for _, _, labels, value in LOG_METRICS.values():
        for field in (*labels, *([value] if value else [])):
            assert field in line or field in ("latency_s", "http_status"), field


def test_dashboard_has_the_slo_panels_with_the_maps_targets(resources):
    (board,) = of_type(resources, DASHBOARD)
    layout = json.loads(board["inputs"]["dashboardJson"])
    tiles = {w["title"]: w for w in layout["gridLayout"]["widgets"]}
    by_prefix = {t.split(":")[0]: w for t, w in tiles.items()}
    throughput = next(w for t, w in tiles.items() if t.startswith("SLO throughput"))
    (th,) = throughput["xyChart"]["thresholds"]
    assert th["value"] == pytest.approx(7200 / 3600) and th["direction"] == "BELOW"
    q = throughput["xyChart"]["dataSets"][0]["timeSeriesQuery"]["timeSeriesFilter"]["filter"]
    assert "logging.googleapis.com/user/l2cache_chunks" in q and '"status"="done"' in q
    edit = next(w for t, w in tiles.items() if t.startswith("SLO edit-to-available"))
    assert sorted(t["value"] for t in edit["xyChart"]["thresholds"]) == [20.0, 90.0]
    aligners = [
        d["timeSeriesQuery"]["timeSeriesFilter"]["aggregation"]["perSeriesAligner"]
        for d in edit["xyChart"]["dataSets"]
    ]
    assert sorted(aligners) == ["ALIGN_PERCENTILE_50", "ALIGN_PERCENTILE_95"]
    assert "SLO failures and retries" in by_prefix
    text = tiles["SLOs measured from the runs ledger"]["text"]["content"]
    assert "900 s" in text and "required" in text and "12.5 USD per mm^3" in text
    cost = next(t for t in tiles if t.startswith("estimated compute cost"))
    assert str(PRICES.gib_second) in cost and str(PRICES.vcpu_second) in cost
    # every user metric a chart reads is one the program defines
    used = set()
    for w in tiles.values():
        for d in w.get("xyChart", {}).get("dataSets", []):
            f = d["timeSeriesQuery"]["timeSeriesFilter"]["filter"]
            if "logging.googleapis.com/user/" in f:
                used.add(f.split("logging.googleapis.com/user/")[1].split('"')[0])
    assert used == {r["inputs"]["name"] for r in of_type(resources, METRIC)} - set()
