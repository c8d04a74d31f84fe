"""``l2cache qc DATASET RUN``: check a run's coverage, distributions and diff; store the report.

Exit 0 when the run passes QC, 1 when it fails (the reasons are printed), 2 for a
user error (unknown dataset or run, a run kind QC does not check).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_config_arg, config_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qc``: a run must pass it before ``release promote`` accepts it."""
    p = sub.add_parser("qc", help="QC a bulk or region run (coverage, distributions, diff)")
    add_config_arg(p)
    p.add_argument("dataset")
    p.add_argument("run")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON here")
    p.add_argument("--html", metavar="PATH", help="write the report as an HTML page with plots")
    p.set_defaults(func=run)


def print_report(report: dict) -> None:
    """The verdict and the figures a person checks first."""
    cov = report["coverage"]
    print(f"QC of run {report['run_id']}: {'PASS' if report['passed'] else 'FAIL'}")
    print(
        f"  coverage {cov['ratio']:.4f}: {cov['matched']}/{cov['expected_l2_ids']} L2 ids of the "
        f"graph have a row of the run; {cov['chunks_done']}/{cov['chunks']} chunks done; "
        f"{cov['extra']} extra, {cov['malformed']} malformed rows"
    )
    feats = report["features"]
    for name in ("size_nm3", "area_nm2", "max_dt_nm", "mean_dt_nm"):
        q = feats[name]["quantiles"]
        print(
            f"  {name:11} n={feats[name]['count']} p05={q.get('p05')} p50={q.get('p50')} "
            f"p95={q.get('p95')} max={feats[name]['max']}"
        )
    diff = report["diff"]
    if diff is None:
        print("  diff: no previous release covers these chunks")
    else:
        nc, cv = diff["node_count_change"], diff["covered_voxels_change"]
        print(
            f"  diff vs release {diff['releases']}: {diff['chunks_compared']} chunks; node count "
            f"change max {nc.get('max', 0):.1%}, covered voxels change max {cv.get('max', 0):.1%}"
        )
    for reason in report["reasons"]:
        print(f"  reason: {reason}")


def run(args: argparse.Namespace) -> int:
    """QC the run and store the report in the ledger, where ``release promote`` and the
    dashboard read it; exit 1 on a failed QC so a script can stop there."""
    from l2cache.compute import dataset_context
    from l2cache_ops.qc import run_qc
    from l2cache_ops.qc_reports import save_report
    from l2cache_ops.settings import qc_thresholds

    cfg = config_from(args)
    ctx = dataset_context(cfg, args.dataset)
    report = run_qc(ctx, args.run, qc_thresholds(cfg, args.dataset))
    save_report(ctx.ledger, report)
    print_report(report)
    write_outputs(report, args.json, args.html)
    return 0 if report["passed"] else 1


def write_outputs(report: dict, json_path: str | None, html_path: str | None) -> None:
    """The report as files to keep or share, beside the copy in the ledger: JSON for
    tools, an HTML page with the plots for a person."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))
        print(f"  report: {json_path}")
    if html_path:
        from l2cache_tools.qc_html import render_report_html

        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        Path(html_path).write_text(render_report_html(report))
        print(f"  page:   {html_path}")
