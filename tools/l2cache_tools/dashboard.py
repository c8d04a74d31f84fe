"""One self-contained HTML page per dataset: throughput, failures, QC, cost, SLOs, release.

Everything is read from the runs ledger (the same reads ``l2cache status`` makes), so
the page and the CLI never disagree. Plots are plotly figures with plotly.js inlined
once (``include_plotlyjs=True`` on the first): the file opens offline, from disk, with
no request to any server. QC reports and releases come from ``l2cache_ops.qc`` and
``l2cache_ops.releases`` when those modules exist; a run without QC shows "no QC yet", a
dataset without a release "no release yet".
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from l2cache.compute import dataset_context
from l2cache.config import L2CacheConfig
from l2cache.domain.lineage import utc_now
from l2cache.store.ledger import RunRecord
from l2cache_ops.cost import Prices, map_read_ahead, run_prices, worker_prices
from l2cache_ops.ledger import list_runs
from l2cache_ops.qc_reports import load_report
from l2cache_ops.releases import current_release, release_history
from l2cache_ops.settings import slo_targets
from l2cache_ops.slo import (
    SloResult,
    edit_latencies,
    evaluate,
    format_target,
    format_value,
    stream_events,
)
from l2cache_ops.status import RunStatus, run_status

if TYPE_CHECKING:  # plotly (~0.1 s) loads only when a figure is made; collect() needs none
    import plotly.graph_objects as go

STREAM_KINDS = ("edit_stream", "missing_ids")


@dataclass
class RunView:
    """One run as the page shows it: what every figure and table needs of the run,
    read from the ledger once so the parts of the page agree."""

    run: RunRecord
    status: RunStatus
    qc: dict[str, Any] | None  # the stored QC report, without its per-chunk figures
    slos: list[SloResult] = field(default_factory=list)


@dataclass
class DashboardData:
    """Everything the page shows, collected before any HTML is made, so the ledger
    reads (:func:`collect`) and the rendering (:func:`render`) are apart."""

    dataset: str
    generated_at: str
    runs: list[RunView]
    release: dict[str, Any] | None
    history: list[dict[str, Any]]
    edit_latencies: list[float]
    prices: Prices  # the dataset's worker as deployed now (each run is priced as its own)


def collect(cfg: L2CacheConfig, dataset: str) -> DashboardData:
    """Every run of ``dataset`` with its status, cost, QC and SLOs; the current release."""
    ctx = dataset_context(cfg, dataset)
    prices = worker_prices(ctx.dataset.chunk_size, map_read_ahead(cfg))
    targets = slo_targets(cfg, dataset)
    events = stream_events(ctx.ledger, dataset)
    extra = {}
    if cfg.tasks is not None:
        extra = {
            "max_attempts": cfg.tasks.max_attempts,
            "attempt_deadline_s": cfg.tasks.attempt_deadline_s,
        }
    views = []
    runs = sorted(
        (r for r in list_runs(ctx.ledger) if r.dataset == dataset), key=lambda r: r.created_at
    )
    for run in runs:
        if run.kind in STREAM_KINDS:
            continue
        st = run_status(ctx.ledger, run.run_id, prices=run_prices(run, cfg), **extra)
        qc = load_report(ctx.ledger, run.run_id, with_chunks=False)
        slos = evaluate(targets, st, st.rows, st.cost, qc, events)
        views.append(RunView(run, st, qc, slos))
    release = current_release(ctx.ledger, dataset)
    history = release_history(ctx.ledger, dataset)
    return DashboardData(
        dataset,
        utc_now().isoformat(timespec="seconds"),
        views,
        release,
        history,
        edit_latencies(events),
        prices,
    )


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
    """Chunks done over time, one line per run (cumulative, by finish time)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for v in views:
        times = sorted(
            datetime.fromisoformat(r["finished_at"])
            for r in v.status.rows
            if r.get("status") == "done" and r.get("finished_at")
        )
        if times:
            fig.add_trace(
                go.Scatter(
                    x=times,
                    y=list(range(1, len(times) + 1)),
                    mode="lines+markers",
                    name=v.run.run_id,
                    line={"shape": "hv"},
                )
            )
    return _layout(fig, "Throughput: chunks done over time", "chunks done")


def failures_figure(views: list[RunView]) -> go.Figure:
    """Per run: done, failed, retried (needed more than one attempt), still retrying."""
    import plotly.graph_objects as go

    names = [v.run.run_id for v in views]

    def count(v: RunView, pred: Callable[[Mapping[str, Any]], bool]) -> int:
        return sum(1 for r in v.status.rows if pred(r))

    series = {
        "done": [v.status.done for v in views],
        "failed": [v.status.failed for v in views],
        "retried": [count(v, lambda r: int(r.get("attempts", 0) or 0) > 1) for v in views],
        "retrying": [v.status.retrying for v in views],
    }
    colors = {"done": "#2e7d32", "failed": "#c62828", "retried": "#ef6c00", "retrying": "#f9a825"}
    fig = go.Figure(
        [go.Bar(name=k, x=names, y=vals, marker_color=colors[k]) for k, vals in series.items()]
    )
    fig.update_layout(barmode="group")
    return _layout(fig, "Failures and retries per run", "chunks")


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
    """The SLO verdicts of the latest run, the one an operator is watching; the other
    runs' progress and cost are in the runs table."""
    if not views:
        return '<p class="none">no run yet</p>'
    latest = views[-1]
    rows = "".join(
        f"<tr><td>{_e(r.name)}</td><td>{_e(format_value(r))}</td><td>{_e(format_target(r))}</td>"
        f'<td class="v" style="color:{VERDICT_COLORS.get(r.verdict, "#555")}">'
        f"{_e(r.verdict)}</td><td>{_e(r.detail)}</td></tr>"
        for r in latest.slos
    )
    return (
        f"<p>run <b>{_e(latest.run.run_id)}</b> ({_e(latest.run.kind)})</p>"
        "<table><tr><th>SLO</th><th>measured</th><th>target</th><th>verdict</th>"
        f"<th>detail</th></tr>{rows}</table>"
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


LINEAGE_KEYS = ("release", "run_id", "promoted_at", "qc_passed")


def release_block(release: dict[str, Any] | None, history: list[dict[str, Any]]) -> str:
    """The release served now with its lineage, and the history of releases a rollback
    goes back through."""
    if release is None:
        return '<p class="none">no release yet</p>'
    cur = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in release.items())
    hist = "".join(
        "<tr>" + "".join(f"<td>{_e(h.get(k, '-'))}</td>" for k in LINEAGE_KEYS) + "</tr>"
        for h in history
    )
    return (
        f"<h3>current</h3><table>{cur}</table><h3>history</h3><table><tr>"
        + "".join(f"<th>{k}</th>" for k in LINEAGE_KEYS)
        + f"</tr>{hist}</table>"
    )


def runs_table(data: DashboardData) -> str:
    """Every run with its progress, cost and code and params hashes, to tell apart runs
    of the same region by what computed them."""
    rows = []
    for v in data.runs:
        st, c = v.status, v.status.cost
        per = "-" if c is None or c.per_mm3 is None else f"${c.per_mm3:,.2f}"
        rows.append(
            f"<tr><td>{_e(v.run.run_id)}</td><td>{_e(v.run.kind)}</td>"
            f"<td>{st.done}/{st.total}</td><td>{st.failed}</td><td>{st.retrying}</td>"
            f"<td>{st.rate_per_s * 3600:,.0f}</td><td>${st.cost_usd:.6f}</td><td>{per}</td>"
            f"<td>{_e(v.run.code_revision[:12])}</td><td>{_e(v.run.params_hash[:12])}</td></tr>"
        )
    return (
        "<table><tr><th>run</th><th>kind</th><th>done</th><th>failed</th><th>retrying</th>"
        "<th>chunks/h</th><th>cost</th><th>$/mm^3</th><th>code</th><th>params</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def render(data: DashboardData) -> str:
    """The page: one inlined copy of plotly.js, four figures, the SLO, QC, release tables."""
    figs = [
        throughput_figure(data.runs),
        failures_figure(data.runs),
        qc_figure(data.runs),
        cost_figure(data.runs),
    ]
    divs = [
        f.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
        for i, f in enumerate(figs)
    ]
    lat = data.edit_latencies
    edits = f"{len(lat)} edits, edit-to-available max {max(lat):.2f}s" if lat else "no edit yet"
    p = data.prices
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>l2cache: {_e(data.dataset)}</title>
<style>{CSS}</style></head><body>
<h1>l2cache dashboard: {_e(data.dataset)}</h1>
<div class="sub">generated {_e(data.generated_at)} from the runs ledger; {len(data.runs)} runs;
{_e(edits)}; prices: worker {p.worker_gib:g} GiB x {p.worker_vcpu:g} vCPU,
${p.gib_second}/GiB-s, ${p.vcpu_second}/vCPU-s, ${p.bigtable_node_hour}/node-hour,
${p.storage_gib_month}/GiB-month, ${p.task}/task</div>
<div class="grid">
<div class="card" id="slo"><h2>SLO status</h2>{slo_table(data.runs)}</div>
<div class="card" id="release"><h2>Current release and lineage</h2>
{release_block(data.release, data.history)}</div>
<div class="card">{divs[0]}</div>
<div class="card">{divs[1]}</div>
<div class="card" id="qc"><h2>QC</h2>{qc_table(data.runs)}{divs[2]}</div>
<div class="card">{divs[3]}</div>
</div>
<div class="card" id="runs" style="margin-top:16px"><h2>Runs</h2>{runs_table(data)}</div>
</body></html>
"""


def write_dashboard(cfg: L2CacheConfig, dataset: str, out: Path | str) -> Path:
    """Collect, render and write the page; returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(collect(cfg, dataset)), encoding="utf-8")
    return out
