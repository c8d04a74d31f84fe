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
    """(title, figure): per-feature histograms, then the diff's largest changes if any."""
    figs: list[tuple[str, go.Figure]] = []
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
    if diff and diff.get("worst"):
        rows = diff["worst"]  # the largest changes only: the report keeps no per-chunk table
        labels = [",".join(map(str, r["chunk"])) for r in rows]
        fig = go.Figure()
        for key, name in (
            ("node_count_change", "node count"),
            ("covered_voxels_change", "covered voxels"),
        ):
            values = [None if r.get(key) is None else 100 * r[key] for r in rows]
            fig.add_bar(name=name, x=labels, y=values)
        th = report["thresholds"]
        for sign in (1, -1):  # a drop is a negative change, as bad as a gain
            fig.add_hline(y=sign * 100 * th["max_node_count_change"], line_dash="dash")
        fig.update_layout(xaxis_title="chunk (x,y,z)", yaxis_title="signed change vs release (%)")
        title = f"Diff against release(s) {diff['releases']}: the {len(rows)} largest changes"
        figs.append((title, fig))
    return figs


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{body}</table>"


def _scope(report: dict[str, Any]) -> str:
    """What the report covers: the whole run or a box of its chunks."""
    scope = report.get("scope") or {"kind": "run"}
    if scope["kind"] == "run":
        return "the whole run"
    return f"region {scope['region']} ({scope['chunks']} chunks)"


def _examples(items: list[dict[str, Any]] | None) -> str:
    """A few example chunks, one per line of text."""
    if not items:
        return "-"
    return "; ".join(
        " ".join(f"{k}={v}" for k, v in item.items() if v is not None) for item in items
    )


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
            ("checked", _scope(report)),
            ("checked at", report["created_at"]),
            ("coverage", f"{cov['ratio']} ({cov['matched']}/{cov['expected_l2_ids']} L2 ids)"),
            ("coverage from", cov.get("source", "")),
            ("chunks done", f"{cov['chunks_done']}/{cov['chunks']}"),
            ("chunks not done (examples)", _examples(cov.get("chunks_not_done"))),
            ("chunks with gaps (examples)", _examples(cov.get("chunks_with_gaps"))),
            ("extra / malformed rows", f"{cov['extra']} / {cov['malformed']}"),
            ("features from", report.get("features_source", "")),
            ("rows read", report.get("reads", {})),
            ("thresholds", report["thresholds"]),
            *((f"lineage: {k}", v) for k, v in report["lineage"].items()),
        ]
    )
    sections = "".join(
        f"<section><h2>{html.escape(title)}</h2>"
        f"{fig.to_html(full_html=False, include_plotlyjs=False, default_width='100%')}</section>"
        for title, fig in qc_figures(report)
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
