"""One self-contained HTML page per dataset: SLOs, throughput, failures, where chunks
fail, edits, QC, cost, lineage and rollbacks.

Everything is read from the run's incrementally kept state (the reads ``l2cache
status`` makes: box counters, minute rows, chunks in flight, a page of failures), so
the page and the CLI never disagree and the page costs the same at 10 thousand chunks
as at 10 million: O(runs shown x (boxes + minutes)), never a ledger scan. Plots are
plotly figures with plotly.js inlined once (``include_plotlyjs=True`` on the first):
the file opens offline, from disk, with no request to any server; every series is
per minute or per box, so the page stays a few hundred KB above plotly.js whatever
the run's size.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from l2cache.compute import dataset_context
from l2cache.config import L2CacheConfig
from l2cache.domain.lineage import utc_now
from l2cache.store.ledger import RunRecord
from l2cache_ops.cost import Prices, map_read_ahead, run_prices, worker_prices
from l2cache_ops.ledger import list_runs
from l2cache_ops.qc_reports import load_report
from l2cache_ops.releases import current_release, release_history
from l2cache_ops.rollback import rollback_history
from l2cache_ops.runstate import minutes, read_counts
from l2cache_ops.settings import slo_targets
from l2cache_ops.slo import (
    SloResult,
    bin_quantile,
    evaluate,
    format_target,
    format_value,
    prefixed_bins,
    stream_latency_bins,
)
from l2cache_ops.status import RunStatus, run_status

if TYPE_CHECKING:  # plotly (~0.1 s) loads only when a figure is made; collect() needs none
    import plotly.graph_objects as go

STREAM_KINDS = ("edit_stream", "missing_ids")
MAX_RUNS = 12  # runs drawn: every unfinished one, then the most recent finished ones


@dataclass
class RunView:
    """One run as the page shows it: what every figure and table needs of the run,
    read once so the parts of the page agree."""

    run: RunRecord
    status: RunStatus
    qc: dict[str, Any] | None  # the stored QC report summary
    slos: list[SloResult] = field(default_factory=list)
    minutes: dict[int, dict[str, int]] = field(default_factory=dict)  # per-minute counters


@dataclass
class StreamView:
    """An edit-stream (or missing-id) run: its event counters and per-minute latency."""

    run: RunRecord
    totals: dict[str, int]
    minutes: dict[int, dict[str, int]]


@dataclass
class DashboardData:
    """Everything the page shows, collected before any HTML is made, so the reads
    (:func:`collect`) and the rendering (:func:`render`) are apart."""

    dataset: str
    generated_at: str
    runs: list[RunView]
    release: dict[str, Any] | None
    history: list[dict[str, Any]]
    latency_bins: dict[int, int]
    prices: Prices  # the dataset's worker as deployed now (each run is priced as its own)
    streams: list[StreamView] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    grid_shape: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def collect(cfg: L2CacheConfig, dataset: str, max_runs: int = MAX_RUNS) -> DashboardData:
    """The dataset's unfinished runs and most recent finished ones (``max_runs`` in
    all) with status, cost, QC, SLOs and per-minute counters; its streams; the current
    release, its history and the recorded rollbacks."""
    ctx = dataset_context(cfg, dataset)
    prices = worker_prices(ctx.dataset.chunk_size, map_read_ahead(cfg))
    targets = slo_targets(cfg, dataset)
    latency = stream_latency_bins(ctx.ledger, dataset)
    extra = {}
    if cfg.tasks is not None:
        extra = {
            "max_attempts": cfg.tasks.max_attempts,
            "attempt_deadline_s": cfg.tasks.attempt_deadline_s,
        }
    runs = sorted(
        (r for r in list_runs(ctx.ledger) if r.dataset == dataset), key=lambda r: r.created_at
    )
    views, streams = [], []
    for run in runs:
        if run.kind in STREAM_KINDS:
            streams.append(
                StreamView(
                    run,
                    read_counts(ctx.ledger, run.run_id).totals,
                    minutes(ctx.ledger, run.run_id),
                )
            )
            continue
        st = run_status(
            ctx.ledger,
            run.run_id,
            prices=run_prices(run, cfg),
            bits=ctx.dataset.spatial_bits,
            **extra,
        )
        views.append(RunView(run, st, None))
    active = [v for v in views if not v.status.finished]
    recent = [v for v in views if v.status.finished][-max(max_runs - len(active), 0) :]
    shown = sorted([*active, *recent], key=lambda v: v.run.created_at)[-max_runs:]
    for v in shown:
        v.qc = load_report(ctx.ledger, v.run.run_id, with_chunks=False)
        v.slos = evaluate(targets, v.status, v.status.cost, v.qc, latency)
        v.minutes = minutes(ctx.ledger, v.run.run_id)
    rollbacks = rollback_history(ctx.ledger, dataset)[-50:]
    return DashboardData(
        dataset,
        utc_now().isoformat(timespec="seconds"),
        shown,
        current_release(ctx.ledger, dataset),
        release_history(ctx.ledger, dataset),
        latency,
        prices,
        streams,
        rollbacks,
    )


def _when(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, tz=UTC)


# -- figures ---------------------------------------------------------------------------
def _layout(fig: go.Figure, title: str, ytitle: str = "") -> go.Figure:
    fig.update_layout(
        title=title,
        height=320,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        yaxis_title=ytitle,
        legend={"orientation": "h", "y": -0.2},
        template="plotly_white",
    )
    return fig


def throughput_figure(views: list[RunView]) -> go.Figure:
    """Chunks done per hour, per minute of each run: a rate, not a running total."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for v in views:
        ms = [m for m, c in v.minutes.items() if c.get("done")]
        if ms:
            fig.add_trace(
                go.Scatter(
                    x=[_when(m) for m in ms],
                    y=[v.minutes[m]["done"] * 60 for m in ms],
                    mode="lines+markers",
                    name=v.run.run_id,
                )
            )
    return _layout(fig, "Throughput: chunks done per hour", "chunks / h")


def failures_figure(views: list[RunView]) -> go.Figure:
    """Failed and retried attempts per minute of every run, on a log scale: a handful of
    failures stays visible next to a million done chunks."""
    import plotly.graph_objects as go

    fig = go.Figure()
    styles = {"failed": ("#c62828", "solid"), "retried": ("#ef6c00", "dot")}
    for v in views:
        for what, (color, dash) in styles.items():
            ms = [m for m, c in v.minutes.items() if c.get(what)]
            if ms:
                fig.add_trace(
                    go.Scatter(
                        x=[_when(m) for m in ms],
                        y=[v.minutes[m][what] for m in ms],
                        mode="markers+lines",
                        name=f"{what} {v.run.run_id}",
                        line={"color": color, "dash": dash},
                    )
                )
    fig.update_yaxes(type="log")
    return _layout(fig, "Failures and retries per minute", "chunks / minute (log)")


def map_figure(view: RunView | None) -> go.Figure:
    """Where in the volume chunks fail: the run's counter boxes projected on x-y (summed
    over z), coloured by failed + retrying chunks, hover: done / failed / retrying."""
    import plotly.graph_objects as go

    fig = go.Figure()
    grid = view.run.stat_grid if view is not None else None
    if view is None or grid is None or view.status.counts is None:
        return _layout(fig, "Where chunks fail: no gridded run yet", "")
    gx, gy, gz = grid.shape
    done = np.zeros((gy, gx), dtype=np.int64)
    bad = np.zeros((gy, gx), dtype=np.int64)
    for cell, c in view.status.counts.cells.items():
        ix, rest = divmod(cell, gy * gz)
        iy = rest // gz
        if ix < gx and iy < gy:
            done[iy, ix] += c.get("done", 0)
            bad[iy, ix] += c.get("failed", 0) + c.get("retrying", 0)
    text = [[f"done {d:,}<br>failed+retrying {b:,}" for d, b in zip(dr, br, strict=True)]
            for dr, br in zip(done, bad, strict=True)]  # fmt: skip
    fig.add_trace(
        go.Heatmap(
            z=bad,
            x=[grid.origin[0] + i * grid.cell[0] for i in range(gx)],
            y=[grid.origin[1] + i * grid.cell[1] for i in range(gy)],
            text=text,
            hoverinfo="text",
            colorscale="Reds",
            colorbar={"title": "failing"},
        )
    )
    fig.update_xaxes(title="chunk x")
    fig.update_yaxes(title="chunk y", scaleanchor="x")
    fig.add_annotation(
        text=f"run {view.run.run_id}, boxes of {'x'.join(map(str, grid.cell))} chunks",
        showarrow=False, x=0, y=1.08, xref="paper", yref="paper", xanchor="left",
    )  # fmt: skip
    return _layout(fig, "Where chunks fail (x-y, summed over z)", "")


def edits_figure(streams: list[StreamView]) -> go.Figure:
    """Edit-to-available latency per minute (p50 and p95 read off the minute's bins)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for sv in streams:
        ms = sorted(m for m, c in sv.minutes.items() if prefixed_bins(c, "lat"))
        for q in (0.5, 0.95):
            fig.add_trace(
                go.Scatter(
                    x=[_when(m) for m in ms],
                    y=[bin_quantile(prefixed_bins(sv.minutes[m], "lat"), q) for m in ms],
                    mode="lines+markers",
                    name=f"p{round(q * 100)} {sv.run.run_id}",
                )
            )
    if not fig.data:
        _empty(fig, "no edit yet")
    return _layout(fig, "Edit latency over time (upper bin edge)", "seconds")


def _empty(fig: go.Figure, text: str) -> None:
    """A figure with nothing to draw says so, instead of bare axes."""
    fig.add_annotation(
        text=text, showarrow=False, font={"size": 18}, x=0.5, y=0.5, xref="paper", yref="paper"
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)


def cost_figure(views: list[RunView]) -> go.Figure:
    """Cost per mm^3 of each run's done chunks."""
    import plotly.graph_objects as go

    shown = [v for v in views if v.status.cost is not None and v.status.cost.per_mm3]
    fig = go.Figure(
        go.Bar(
            x=[v.run.run_id for v in shown],
            y=[v.status.cost.per_mm3 for v in shown],
            text=[f"${v.status.cost.per_mm3:,.0f}" for v in shown],
            marker_color="#1565c0",
        )
    )
    return _layout(fig, "Cost per mm^3 (USD)", "$ / mm^3")


def qc_figure(views: list[RunView]) -> go.Figure:
    """Coverage of each run's QC report (runs without QC are left out)."""
    import plotly.graph_objects as go

    shown = [v for v in views if v.qc is not None]
    cov = [_coverage(v.qc) for v in shown]
    fig = go.Figure(
        go.Bar(
            x=[v.run.run_id for v in shown],
            y=[c if c is not None else 0 for c in cov],
            marker_color=["#2e7d32" if v.qc.get("passed") else "#c62828" for v in shown],
            text=["passed" if v.qc.get("passed") else "failed" for v in shown],
        )
    )
    fig.update_yaxes(range=[0, 1.05])
    if not shown:
        fig.add_annotation(
            text="no QC yet",
            showarrow=False,
            font={"size": 18},
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
        fig.update_xaxes(visible=False)
    return _layout(fig, "QC: coverage (rows written / L2 ids in the graph)", "coverage")


def _coverage(qc: dict) -> float | None:
    c = qc.get("coverage")
    if isinstance(c, int | float):
        return float(c)
    if isinstance(c, dict):
        for key in ("fraction", "ratio", "coverage"):
            if isinstance(c.get(key), int | float):
                return float(c[key])
        if c.get("expected"):
            return float(c.get("written", c.get("rows", 0))) / float(c["expected"])
    return None


# -- page ------------------------------------------------------------------------------
VERDICT_COLORS = {"met": "#2e7d32", "missed": "#c62828", "no data": "#757575"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{margin:0 0 4px} .sub{color:#666;margin-bottom:16px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.card{border:1px solid #ddd;border-radius:8px;padding:12px;background:#fff}
table{border-collapse:collapse;width:100%;font-size:13px}
td,th{border-bottom:1px solid #eee;padding:4px 6px;text-align:left;vertical-align:top}
.v{font-weight:600} .none{color:#757575;font-style:italic}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def slo_table(views: list[RunView]) -> str:
    """Every SLO of every run shown (unfinished runs first), one row per run, a
    verdict-coloured cell per SLO: no run's missed objective hides behind another's."""
    if not views:
        return '<p class="none">no run yet</p>'
    ordered = sorted(views, key=lambda v: (v.status.finished, v.run.created_at))
    names = [r.name for r in ordered[0].slos]
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = []
    for v in ordered:
        cells = "".join(
            f'<td title="{_e(r.detail)} (target {_e(format_target(r))})" '
            f'style="color:{VERDICT_COLORS.get(r.verdict, "#555")}">'
            f"{_e(format_value(r))}<br><b>{_e(r.verdict)}</b></td>"
            for r in v.slos
        )
        state = "finished" if v.status.finished else "running"
        rows.append(f"<tr><td>{_e(v.run.run_id)}<br><i>{state}</i></td>{cells}</tr>")
    return f"<table><tr><th>run</th>{head}</tr>{''.join(rows)}</table>"


def stream_table(streams: list[StreamView]) -> str:
    """Events of each stream run by outcome: dead-lettered and failed ones are what an
    operator replays."""
    if not streams:
        return '<p class="none">no edit stream yet</p>'
    kinds = ("ok", "partial", "fanned_out", "dead_lettered", "failed")
    rows = "".join(
        f"<tr><td>{_e(sv.run.run_id)}</td><td>{sv.totals.get('events', 0):,}</td>"
        + "".join(f"<td>{sv.totals.get('events.' + k, 0):,}</td>" for k in kinds)
        + "</tr>"
        for sv in streams
    )
    return (
        "<table><tr><th>stream run</th><th>events</th>"
        + "".join(f"<th>{k}</th>" for k in kinds)
        + f"</tr>{rows}</table>"
    )


def qc_table(views: list[RunView]) -> str:
    """Every run's QC verdict, with "no QC yet" for a run never checked, so a run that
    cannot be promoted yet is visible as such."""
    rows = []
    for v in views:
        if v.qc is None:
            rows.append(
                f'<tr><td>{_e(v.run.run_id)}</td><td class="none" colspan="3">no QC yet</td></tr>'
            )
            continue
        reasons = "; ".join(map(str, v.qc.get("reasons") or [])) or "-"
        cov = _coverage(v.qc)
        rows.append(
            f"<tr><td>{_e(v.run.run_id)}</td>"
            f'<td class="v" style="color:{"#2e7d32" if v.qc.get("passed") else "#c62828"}">'
            f"{'passed' if v.qc.get('passed') else 'failed'}</td>"
            f"<td>{'-' if cov is None else f'{100 * cov:.1f}%'}</td><td>{_e(reasons)}</td></tr>"
        )
    if not rows:
        return '<p class="none">no QC yet</p>'
    return (
        "<table><tr><th>run</th><th>QC</th><th>coverage</th><th>reasons</th></tr>"
        + "".join(rows)
        + "</table>"
    )


RELEASE_KEYS = ("release", "run_id", "promoted_at", "qc_passed")
LINEAGE_KEYS = ("code_revision", "params_hash", "segmentation", "graph", "snapshot_timestamp")


def _cell(value: object) -> str:
    if isinstance(value, dict | list):
        value = (
            ", ".join(f"{k}={v}" for k, v in value.items())
            if isinstance(value, dict)
            else ", ".join(map(str, value))
        )
    return _e(value)


def release_block(release: dict[str, Any] | None, history: list[dict[str, Any]]) -> str:
    """The release served now and the history a rollback goes back through, as tables."""
    if release is None:
        return '<p class="none">no release yet</p>'
    cur = "".join(f"<tr><th>{_e(k)}</th><td>{_cell(v)}</td></tr>" for k, v in release.items())
    hist = "".join(
        "<tr>" + "".join(f"<td>{_cell(h.get(k, '-'))}</td>" for k in RELEASE_KEYS) + "</tr>"
        for h in history
    )
    return (
        f"<h3>current</h3><table>{cur}</table><h3>history</h3><table><tr>"
        + "".join(f"<th>{k}</th>" for k in RELEASE_KEYS)
        + f"</tr>{hist}</table>"
    )


def lineage_table(views: list[RunView]) -> str:
    """What computed each run: code, parameters, inputs and graph time."""
    rows = "".join(
        f"<tr><td>{_e(v.run.run_id)}</td>"
        + "".join(f"<td>{_cell(getattr(v.run, k))}</td>" for k in LINEAGE_KEYS)
        + "</tr>"
        for v in views
    )
    return (
        "<table><tr><th>run</th>"
        + "".join(f"<th>{k}</th>" for k in LINEAGE_KEYS)
        + f"</tr>{rows}</table>"
    )


ROLLBACK_KEYS = ("at", "run_id", "kind", "mode", "chunks", "versions", "cells", "tasks", "seconds")


def rollback_table(rollbacks: list[dict[str, Any]]) -> str:
    """The recorded rollbacks of the dataset's runs, oldest first: when, which run, how
    (inline or fanned out), what they removed."""
    if not rollbacks:
        return '<p class="none">no rollback recorded</p>'
    rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(k, '-'))}</td>" for k in ROLLBACK_KEYS) + "</tr>"
        for r in rollbacks
    )
    head = "".join(f"<th>{k}</th>" for k in ROLLBACK_KEYS)
    return f"<table><tr>{head}</tr>{rows}</table>"


def runs_table(data: DashboardData) -> str:
    """Every run shown with its progress, what is in flight and still waiting in the
    queue, cost and code and params hashes."""
    rows = []
    for v in data.runs:
        st, c = v.status, v.status.cost
        per = "-" if c is None or c.per_mm3 is None else f"${c.per_mm3:,.2f}"
        rows.append(
            f"<tr><td>{_e(v.run.run_id)}</td><td>{_e(v.run.kind)}</td>"
            f"<td>{st.done:,}/{st.total:,}</td><td>{st.failed:,}</td><td>{st.retrying:,}</td>"
            f"<td>{st.running:,}</td><td>{st.pending:,}</td>"
            f"<td>{st.rate_per_s * 3600:,.0f}</td><td>${st.cost_usd:.6f}</td><td>{per}</td>"
            f"<td>{_e(v.run.code_revision[:12])}</td><td>{_e(v.run.params_hash[:12])}</td></tr>"
        )
    return (
        "<table><tr><th>run</th><th>kind</th><th>done</th><th>failed</th><th>retrying</th>"
        "<th>in flight</th><th>waiting (queue)</th>"
        "<th>chunks/h</th><th>cost</th><th>$/mm^3</th><th>code</th><th>params</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def render(data: DashboardData) -> str:
    """The page: one inlined copy of plotly.js, the figures, the SLO, QC, release,
    lineage, stream and rollback tables."""
    worst = max(
        (v for v in data.runs if v.run.stat_grid is not None),
        key=lambda v: (v.status.failed + v.status.retrying, v.run.created_at),
        default=None,
    )
    figs = [
        throughput_figure(data.runs),
        failures_figure(data.runs),
        map_figure(worst),
        edits_figure(data.streams),
        qc_figure(data.runs),
        cost_figure(data.runs),
    ]
    divs = [
        f.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
        for i, f in enumerate(figs)
    ]
    n_lat = sum(data.latency_bins.values())
    p95 = bin_quantile(data.latency_bins, 0.95)
    edits = f"{n_lat:,} edits, edit-to-available p95 <= {p95:g}s" if n_lat else "no edit yet"
    p = data.prices
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>l2cache: {_e(data.dataset)}</title>
<style>{CSS}</style></head><body>
<h1>l2cache dashboard: {_e(data.dataset)}</h1>
<div class="sub">generated {_e(data.generated_at)} from the runs table's counters;
{len(data.runs)} runs shown; {_e(edits)}; prices: worker {p.worker_gib:g} GiB x
{p.worker_vcpu:g} vCPU, ${p.gib_second}/GiB-s, ${p.vcpu_second}/vCPU-s,
${p.bigtable_node_hour}/node-hour, ${p.storage_gib_month}/GiB-month, ${p.task}/task</div>
<div class="card" id="slo"><h2>SLO status</h2>{slo_table(data.runs)}</div>
<div class="grid" style="margin-top:16px">
<div class="card">{divs[0]}</div>
<div class="card">{divs[1]}</div>
<div class="card" id="map">{divs[2]}</div>
<div class="card" id="edits"><h2>Edits</h2>{stream_table(data.streams)}{divs[3]}</div>
<div class="card" id="qc"><h2>QC</h2>{qc_table(data.runs)}{divs[4]}</div>
<div class="card">{divs[5]}</div>
<div class="card" id="release"><h2>Current release and lineage</h2>
{release_block(data.release, data.history)}</div>
<div class="card" id="rollbacks"><h2>Rollbacks</h2>{rollback_table(data.rollbacks)}</div>
</div>
<div class="card" id="runs" style="margin-top:16px"><h2>Runs</h2>{runs_table(data)}
<h3>Lineage</h3>{lineage_table(data.runs)}</div>
</body></html>
"""


def write_dashboard(cfg: L2CacheConfig, dataset: str, out: Path | str) -> Path:
    """Collect, render and write the page; returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(collect(cfg, dataset)), encoding="utf-8")
    return out
