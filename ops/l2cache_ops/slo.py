"""Service level objectives of a dataset and how a run measures against them.

Targets come from the dataset map's optional ``slo:`` section (top level, overridden
key by key by a dataset's own ``slo:``); a target left out is not checked. Every
measurement is read from the runs ledger, never from a separate metrics store, so
``l2cache status``, the HTML dashboard and a test see the same numbers:

| SLO | target key | measured as |
| --- | --- | --- |
| throughput | ``throughput_chunks_per_h`` (min) | done chunks / hours from run start to last finish |
| failure rate | ``max_failure_rate`` | failed / (done + failed) chunks |
| retry rate | ``max_retry_rate`` | chunks that needed more than one attempt / chunks started |
| time to recover | ``max_recover_s`` | done - first failure of chunks that failed and then finished (a chunk still failed is unrecovered: missed) |
| edit-to-available | ``edit_p50_s``, ``edit_p95_s`` | event recorded (``recorded_at``) - PCG's publish time, edit events computed inline |
| QC | ``qc_pass: true`` | the run's QC report passed (``l2cache_ops.qc``) |
| cost envelope | ``max_usd_per_mm3`` | run cost / mm^3 of its done chunks (``l2cache_ops.cost``) |
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

import numpy as np

from l2cache.config import DatasetConfig
from l2cache.store.ledger import RunLedger
from l2cache_ops.cost import RunCost
from l2cache_ops.ledger import events, list_runs
from l2cache_ops.qc_reports import load_report
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


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def recovery_seconds(rows: Iterable[Mapping[str, Any]]) -> tuple[list[float], int]:
    """Seconds from first failure to done of every recovered chunk, and how many chunks
    failed and are still failed (unrecovered)."""
    recovered, unrecovered = [], 0
    for r in rows:
        first = r.get("first_failed_at")
        if not first:
            continue
        if r.get("status") == "done" and r.get("finished_at"):
            recovered.append((_ts(r["finished_at"]) - _ts(first)).total_seconds())
        elif r.get("status") == "failed":
            unrecovered += 1
    return recovered, unrecovered


def edit_latencies(events: Iterable[Mapping[str, Any]]) -> list[float]:
    """Publish -> recorded seconds of edit events whose values were written inline."""
    out = []
    for e in events:
        if e.get("kind") != "edit" or e.get("status") not in ("ok", "partial"):
            continue
        if e.get("recorded_at") and e.get("published_at"):
            out.append((_ts(e["recorded_at"]) - _ts(e["published_at"])).total_seconds())
    return out


def stream_events(ledger: RunLedger, dataset: str) -> list[dict]:
    """Every event of the dataset's edit-stream runs (all code revisions)."""
    out: list[dict] = []
    for run in list_runs(ledger):
        if run.dataset == dataset and run.kind == "edit_stream":
            out.extend(events(ledger, run.run_id))
    return out


def evaluate(
    targets: SloTargets,
    status: RunStatus,
    rows: list[Mapping[str, Any]],
    run_cost: RunCost,
    qc_report: Mapping[str, Any] | None,
    events: list[Mapping[str, Any]],
) -> list[SloResult]:
    """Every objective of ``targets`` measured on a run (its RunStatus, ledger chunk
    rows and RunCost) and the dataset's edit events."""
    finished = status.done + status.failed
    started = [r for r in rows if int(r.get("attempts", 0) or 0) > 0]
    retried = [r for r in started if int(r.get("attempts", 0)) > 1]
    recovered, unrecovered = recovery_seconds(rows)
    lat = edit_latencies(events)
    p50 = float(np.percentile(lat, 50)) if lat else None
    p95 = float(np.percentile(lat, 95)) if lat else None
    throughput = status.rate_per_s * 3600 if status.done else None
    fail_rate = status.failed / finished if finished else None
    retry_rate = len(retried) / len(started) if started else None
    # a chunk still failed has not recovered (missed); no failure at all: nothing to time
    recover = float("inf") if unrecovered else (max(recovered) if recovered else None)
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
            f"{len(retried)} of {len(started)} chunks retried",
        ),
        SloResult(
            "time to recover a failed chunk",
            "s",
            t.max_recover_s,
            recover,
            _verdict(recover, t.max_recover_s),
            f"{len(recovered)} recovered, {unrecovered} still failed",
        ),
        SloResult(
            "edit-to-available p50",
            "s",
            t.edit_p50_s,
            p50,
            _verdict(p50, t.edit_p50_s),
            f"{len(lat)} edits",
        ),
        SloResult(
            "edit-to-available p95",
            "s",
            t.edit_p95_s,
            p95,
            _verdict(p95, t.edit_p95_s),
            f"{len(lat)} edits",
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
    """Evaluate ``targets`` for one run of ``dataset_cfg``: the status's own rows and cost
    (so the cost SLO judges the figure ``status`` prints, not a second computation),
    the run's stored QC report and the dataset's stream events."""
    return evaluate(
        targets,
        status,
        status.rows,
        status.cost,
        load_report(ledger, run_id, with_chunks=False),
        stream_events(ledger, dataset_cfg.name),
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
