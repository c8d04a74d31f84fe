"""A QC report as one self-contained HTML page with plotly figures (offline).

Kept out of the production core: plotly is a tool dependency, never in a function's
archive. The page inlines plotly.js once, so it opens from a file with no network.
:func:`qc_figures` is separate so another page (the dashboard) can embed the same plots.
"""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from l2cache_ops.qc import BY_SERIES


def qc_figures(report: dict[str, Any]) -> list[tuple[str, go.Figure]]:
    """(title, figure): per-feature histograms, per-chunk coverage, the diff if any."""
    figs: list[tuple[str, go.Figure]] = []
    chunks = report.get("chunks") or {}
    if chunks.get("chunk_id"):
        labels = [",".join(map(str, c)) for c in chunks["coords"]]
        fig = go.Figure()
        fig.add_bar(name="graph L2 ids", x=labels, y=chunks["expected"], opacity=0.5)
        fig.add_bar(name="rows written", x=labels, y=chunks["rows"], opacity=0.8)
        fig.add_scatter(name="missing", x=labels, y=chunks["missing"], mode="markers")
        fig.update_layout(barmode="overlay", xaxis_title="chunk (x,y,z)", yaxis_title="L2 ids")
        figs.append(("Coverage per chunk", fig))
        fig = go.Figure(go.Histogram(x=chunks["covered_voxels"], nbinsx=40))
        fig.update_layout(xaxis_title="covered voxels per chunk", yaxis_title="chunks")
        figs.append(("Covered voxels per chunk", fig))
    for name, summary in (report.get("features") or {}).items():
        hist = summary.get("histogram") or {}
        edges, counts = hist.get("edges") or [], hist.get("counts") or []
        if not counts:
            continue
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        fig = go.Figure(go.Bar(x=centers, y=counts, width=widths))
        log = BY_SERIES[name].scale == "log" if name in BY_SERIES else False
        q = summary.get("quantiles", {})
        fig.update_layout(
            xaxis_title=f"{name} ({summary.get('unit', '')})",
            yaxis_title="nodes",
            xaxis_type="log" if log and centers and min(centers) > 0 else "linear",
            bargap=0,
            title=f"n={summary['count']}  p05={q.get('p05')}  p50={q.get('p50')}  p95={q.get('p95')}",
        )
        figs.append((f"Distribution: {name}", fig))
    diff = report.get("diff")
    if diff and diff.get("per_chunk"):
        rows = diff["per_chunk"]
        labels = [",".join(map(str, r["chunk"])) for r in rows]
        fig = go.Figure()
        fig.add_bar(name="node count", x=labels, y=[100 * r["node_count_change"] for r in rows])
        fig.add_bar(
            name="covered voxels", x=labels, y=[100 * r["covered_voxels_change"] for r in rows]
        )
        th = report["thresholds"]
        fig.add_hline(y=100 * th["max_node_count_change"], line_dash="dash")
        fig.update_layout(xaxis_title="chunk (x,y,z)", yaxis_title="change vs release (%)")
        figs.append((f"Diff against release(s) {diff['releases']}", fig))
    return figs


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{body}</table>"


def render_report_html(report: dict[str, Any]) -> str:
    """The whole page: verdict, reasons, lineage, coverage, then the figures."""
    verdict = "PASS" if report["passed"] else "FAIL"
    cov = report["coverage"]
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in report["reasons"]) or "<li>none</li>"
    summary = _table(
        [
            ("run", report["run_id"]),
            ("dataset", report["dataset"]),
            ("kind / region (chunks)", f"{report['kind']} {report['region']}"),
            ("checked at", report["created_at"]),
            ("coverage", f"{cov['ratio']} ({cov['matched']}/{cov['expected_l2_ids']} L2 ids)"),
            ("chunks done", f"{cov['chunks_done']}/{cov['chunks']}"),
            ("extra / malformed rows", f"{cov['extra']} / {cov['malformed']}"),
            ("thresholds", report["thresholds"]),
            *((f"lineage: {k}", v) for k, v in report["lineage"].items()),
        ]
    )
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=False, default_width="100%")
        for _, fig in qc_figures(report)
    ]
    titles = [t for t, _ in qc_figures(report)]
    sections = "".join(
        f"<section><h2>{html.escape(t)}</h2>{p}</section>"
        for t, p in zip(titles, parts, strict=True)
    )
    colour = "#1a7f37" if report["passed"] else "#cf222e"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>QC {html.escape(report["run_id"])}: {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left}} .verdict{{color:{colour}}}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>QC of run {html.escape(report["run_id"])}: <span class="verdict">{verdict}</span></h1>
<h2>Reasons</h2><ul>{reasons}</ul>{summary}{sections}</body></html>
"""
