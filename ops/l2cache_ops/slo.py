"""Service level objectives of a dataset and how a run measures against them.

Targets come from the dataset map's optional ``slo:`` section (top level, overridden
key by key by a dataset's own ``slo:``); a target left out is not checked. Every
measurement is read from the run's counters in the runs table (kept by the workers as
chunks finish: :mod:`l2cache.store.runstate`), never from a separate metrics store, so
``l2cache status``, the HTML dashboard and a test see the same numbers:

| SLO | target key | measured as |
| --- | --- | --- |
| throughput | ``throughput_chunks_per_h`` (min) | done chunks per hour over the last minutes (the run's average once it is quiet) |
| failure rate | ``max_failure_rate`` | failed / (done + failed) chunks |
| retry rate | ``max_retry_rate`` | chunks that needed more than one attempt / chunks started |
| time to recover | ``max_recover_s`` | done - first failure of chunks that failed and then finished, binned (upper edge of the worst bin; a chunk still failed is unrecovered: missed) |
| edit-to-available | ``edit_p50_s``, ``edit_p95_s`` | event recorded - PCG's publish time, edit events computed inline, read off the latency bins (upper bin edge) |
| QC | ``qc_pass: true`` | the run's QC report passed (``l2cache_ops.qc``) |
| cost envelope | ``max_usd_per_mm3`` | run cost / mm^3 of its done chunks (``l2cache_ops.cost``) |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from l2cache.config import DatasetConfig
from l2cache.store.ledger import RunLedger
from l2cache.store.runstate import LATENCY_EDGES_S
from l2cache_ops.cost import RunCost
from l2cache_ops.ledger import list_runs
from l2cache_ops.qc_reports import load_report
from l2cache_ops.runstate import read_counts
from l2cache_ops.status import RunStatus

MET, MISSED, NO_DATA = "met", "missed", "no data"


@dataclass(frozen=True)
class SloTargets:
    """Targets of one dataset; None = not an objective."""

    throughput_chunks_per_h: float | None = None
    max_failure_rate: float | None = None
    max_retry_rate: float | None = None
    max_recover_s: float | None = None
    edit_p50_s: float | None = None
    edit_p95_s: float | None = None
    qc_pass: bool | None = None
    max_usd_per_mm3: float | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], base: SloTargets | None = None) -> SloTargets:
        """Targets from a YAML mapping, on top of ``base``; ValueError names a bad key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, raw)) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "qc_pass":
                if not isinstance(value, bool):
                    raise ValueError(f"'qc_pass' must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{key!r} must be a non-negative number, got {value!r}")
            elif key.endswith("_rate") and value > 1:
                raise ValueError(f"{key!r} is a fraction (0..1), got {value!r}")
            values[str(key)] = value
        return replace(base or cls(), **values)


@dataclass(frozen=True)
class SloResult:
    """One objective: its measured value against its target, and the verdict."""

    name: str
    unit: str
    target: float | bool | None
    value: float | bool | None
    verdict: str  # met | missed | no data (or "no target" when none is set)
    detail: str = ""


def _verdict(
    value: float | bool | None, target: float | bool | None, higher_is_better: bool = False
) -> str:
    if target is None:
        return "no target"
    if value is None:
        return NO_DATA
    ok = value >= target if higher_is_better else value <= target
    return MET if ok else MISSED


def bin_quantile(bins: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile of a latency histogram (``lat.<bin>`` counters), read as the
    upper edge of the bin it falls in: an upper bound within one bin's width (the
    edges: :data:`l2cache.store.runstate.LATENCY_EDGES_S`); the open last bin reads as
    infinite. None without data."""
    total = sum(bins.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for i in sorted(bins):
        seen += bins[i]
        if seen >= rank:
            return LATENCY_EDGES_S[i] if i < len(LATENCY_EDGES_S) else float("inf")
    return float("inf")


def prefixed_bins(totals: Mapping[str, int], prefix: str) -> dict[int, int]:
    """``{bin: count}`` of the counters named ``<prefix>.<bin>``."""
    out: dict[int, int] = {}
    for name, value in totals.items():
        head, _, index = name.partition(".")
        if head == prefix and index.isdigit() and value:
            out[int(index)] = out.get(int(index), 0) + value
    return out


def stream_latency_bins(ledger: RunLedger, dataset: str) -> dict[int, int]:
    """The dataset's edit-to-available latency histogram, over all its edit-stream runs
    (every code revision): their counters, never their event rows."""
    bins: dict[int, int] = {}
    for run in list_runs(ledger):
        if run.dataset == dataset and run.kind == "edit_stream":
            for i, n in prefixed_bins(read_counts(ledger, run.run_id).totals, "lat").items():
                bins[i] = bins.get(i, 0) + n
    return bins


def evaluate(
    targets: SloTargets,
    status: RunStatus,
    run_cost: RunCost,
    qc_report: Mapping[str, Any] | None,
    latency_bins: Mapping[int, int],
) -> list[SloResult]:
    """Every objective of ``targets`` measured on a run (its RunStatus with its counters,
    RunCost and QC report) and the dataset's edit latency histogram."""
    totals = status.counts.totals if status.counts is not None else {}
    finished = status.done + status.failed
    started, retried = int(totals.get("started", 0)), int(totals.get("retried", 0))
    recovered = int(totals.get("recovered", 0))
    n_lat = sum(latency_bins.values())
    p50 = bin_quantile(latency_bins, 0.5)
    p95 = bin_quantile(latency_bins, 0.95)
    throughput = status.rate_per_s * 3600 if status.done else None
    fail_rate = status.failed / finished if finished else None
    retry_rate = retried / started if started else None
    # a chunk still failed has not recovered (missed); no failure at all: nothing to time
    worst = bin_quantile(prefixed_bins(totals, "rec"), 1.0)
    recover = float("inf") if status.failed else worst
    unrecovered = status.failed
    qc_passed = None if qc_report is None else bool(qc_report.get("passed"))
    per_mm3 = run_cost.per_mm3
    t = targets
    if not t.qc_pass:
        qc_verdict = "no target"
    else:
        qc_verdict = NO_DATA if qc_passed is None else (MET if qc_passed else MISSED)
    return [
        SloResult(
            "throughput",
            "chunks/h",
            t.throughput_chunks_per_h,
            throughput,
            _verdict(throughput, t.throughput_chunks_per_h, higher_is_better=True),
            f"{status.done} chunks done",
        ),
        SloResult(
            "failure rate",
            "",
            t.max_failure_rate,
            fail_rate,
            _verdict(fail_rate, t.max_failure_rate),
            f"{status.failed} of {finished} failed",
        ),
        SloResult(
            "retry rate",
            "",
            t.max_retry_rate,
            retry_rate,
            _verdict(retry_rate, t.max_retry_rate),
            f"{retried} of {started} chunks retried",
        ),
        SloResult(
            "time to recover a failed chunk",
            "s",
            t.max_recover_s,
            recover,
            _verdict(recover, t.max_recover_s),
            f"{recovered} recovered, {unrecovered} still failed",
        ),
        SloResult(
            "edit-to-available p50",
            "s",
            t.edit_p50_s,
            p50,
            _verdict(p50, t.edit_p50_s),
            f"{n_lat} edits",
        ),
        SloResult(
            "edit-to-available p95",
            "s",
            t.edit_p95_s,
            p95,
            _verdict(p95, t.edit_p95_s),
            f"{n_lat} edits",
        ),
        SloResult(
            "QC pass",
            "",
            t.qc_pass,
            qc_passed,
            qc_verdict,
            "no QC yet" if qc_report is None else "; ".join(qc_report.get("reasons") or []),
        ),
        SloResult(
            "cost envelope",
            "$/mm^3",
            t.max_usd_per_mm3,
            per_mm3,
            _verdict(per_mm3, t.max_usd_per_mm3),
            f"${run_cost.usd:.6f} for {run_cost.mm3:.3g} mm^3",
        ),
    ]


def run_slos(
    ledger: RunLedger,
    dataset_cfg: DatasetConfig,
    targets: SloTargets,
    run_id: str,
    status: RunStatus,
) -> list[SloResult]:
    """Evaluate ``targets`` for one run of ``dataset_cfg``: the status's own counters and
    cost (so the cost SLO judges the figure ``status`` prints, not a second
    computation), the run's stored QC report and the dataset's edit latency counters."""
    return evaluate(
        targets,
        status,
        status.cost,
        load_report(ledger, run_id, with_chunks=False),
        stream_latency_bins(ledger, dataset_cfg.name),
    )


def format_value(r: SloResult) -> str:
    """A measured value (or target) as a person reads it."""
    return _fmt(r.value, r.unit)


def format_target(r: SloResult) -> str:
    """The target with its direction (``>=`` for throughput, ``<=`` for the limits), so a
    reader sees which side of it the value must stay; "-" for no objective."""
    if r.target is None:
        return "-"
    if isinstance(r.target, bool):
        return "pass" if r.target else "-"
    op = ">=" if r.name == "throughput" else "<="
    return f"{op} {_fmt(r.target, r.unit)}"


def _fmt(v: float | bool | None, unit: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "passed" if v else "failed"
    if v == float("inf"):
        return "unrecovered"
    if unit == "":
        return f"{100 * v:.1f}%"
    if unit == "$/mm^3":
        return f"${v:,.2f}/mm^3"
    return f"{v:,.1f} {unit}"
