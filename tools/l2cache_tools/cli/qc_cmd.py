"""``l2cache qc DATASET RUN``: check a run's coverage, distributions and diff; store the report.

Exit 0 when the run (or region) passes QC, 1 when it fails (the reasons are printed), 2
for a user error (unknown dataset or run, a run kind QC does not check, a bad region).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_config_arg, config_from

EPILOG = """\
what it reads:
  whole run      the run's QC counters (written by the workers as chunks finish) and,
                 when a release covers part of the run, both runs' chunk rows there
  --region/--bbox  only that box's chunk rows (and the covering release's)
  --verify       also re-reads the graph and the cache rows of every chunk checked
                 (slow: at most 10,000 chunks, so give a --region for a large run)

The run's report is stored in the runs table (row qc:<run>), where `release promote`
and the dashboard read it; a region's report is stored apart (qcregion:<run>:<box>) and
never lets a run be promoted. Changes against the release are signed: -100.0% is a
chunk that lost every node.

exit status: 0 passed, 1 failed (reasons printed), 2 user error (unknown dataset or
run, a run kind QC does not check, a bad or non-overlapping region)
"""


def _box(text: str) -> list[int]:
    """``x0,y0,z0,x1,y1,z1``: six integers, the end exclusive and beyond the start."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        msg = f"expected six integers x0,y0,z0,x1,y1,z1, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if len(values) != 6:
        raise argparse.ArgumentTypeError(
            f"expected six integers x0,y0,z0,x1,y1,z1, got {len(values)} in {text!r}"
        )
    if any(values[a + 3] <= values[a] for a in range(3)):
        raise argparse.ArgumentTypeError(f"empty box {text!r}: each end must exceed its start")
    return values


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qc``: a run must pass it before ``release promote`` accepts it."""
    p = sub.add_parser(
        "qc",
        help="QC a bulk or region run (coverage, distributions, diff against the release)",
        description="QC a bulk or region run, or a region of it, and store the report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arg(p)
    p.add_argument("dataset", help="dataset name in the map")
    p.add_argument("run", help="run id (see `l2cache runs list`)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--region",
        type=_box,
        metavar="X0,Y0,Z0,X1,Y1,Z1",
        help="check only these chunks: a chunk-coordinate box, end exclusive",
    )
    where.add_argument(
        "--bbox",
        type=_box,
        metavar="X0,Y0,Z0,X1,Y1,Z1",
        help="check only the chunks covering this voxel box (dataset voxels, end exclusive)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="also re-read the graph and the cache rows of every chunk checked (<= 10,000)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    p.add_argument("--html", metavar="PATH", help="also write an HTML page with plots to PATH")
    p.set_defaults(func=run)


def print_report(report: dict) -> None:
    """The verdict and the figures a person checks first."""
    cov = report["coverage"]
    scope = report.get("scope") or {"kind": "run"}
    what = f"run {report['run_id']}"
    if scope["kind"] == "region":
        what += f", chunks {scope['region']} ({scope['chunks']} chunks)"
    print(f"QC of {what}: {'PASS' if report['passed'] else 'FAIL'}")
    print(
        f"  chunks done: {cov['chunks_done']} of {cov['chunks']}"
        + (
            f" ({cov['chunks_done_without_stats']} without QC statistics)"
            if cov.get("chunks_done_without_stats")
            else ""
        )
    )
    print(
        f"  coverage {cov['ratio']:.4f}: {cov['matched']} of {cov['expected_l2_ids']} L2 ids of "
        f"the graph have a row of the run; {cov['extra']} extra, {cov['malformed']} malformed "
        f"rows [{cov.get('source', '')}]"
    )
    feats = report["features"]
    for name in ("size_nm3", "area_nm2", "max_dt_nm", "mean_dt_nm"):
        q = feats[name]["quantiles"]
        print(
            f"  {name:11} n={feats[name]['count']} p05={q.get('p05')} p50={q.get('p50')} "
            f"p95={q.get('p95')} max<={feats[name]['max']}"
        )
    diff = report["diff"]
    if diff is None:
        print("  diff: no release covers these chunks")
    else:
        nc, cv = diff["node_count_change"], diff["covered_voxels_change"]
        print(
            f"  diff vs release(s) {', '.join(map(str, diff['releases'])) or '-'}: "
            f"{diff['chunks_compared']} chunks compared; node count {_range(nc)}; "
            f"covered voxels {_range(cv)}"
        )
    reads = report.get("reads") or {}
    if reads:
        print("  read: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in reads.items()))
    for reason in report["reasons"]:
        print(f"  reason: {reason}")


def _range(metric: dict) -> str:
    """A change's signed range over the compared chunks: a drop reads negative."""
    if not metric.get("count"):
        return "not compared"
    return f"change {metric['min']:+.1%} to {metric['max']:+.1%}"


def run(args: argparse.Namespace) -> int:
    """QC the run (or region) and store the report in the ledger, where ``release
    promote`` and the dashboard read it; exit 1 on a failed QC so a script can stop
    there (a user error is reported by the CLI's one handler, exit 2)."""
    from l2cache.compute import dataset_context
    from l2cache.domain.regions import region_from_bbox
    from l2cache_ops.qc import run_qc
    from l2cache_ops.qc_reports import save_report
    from l2cache_ops.settings import qc_thresholds

    cfg = config_from(args)
    ctx = dataset_context(cfg, args.dataset)
    region = args.region
    if args.bbox is not None:
        region = region_from_bbox(ctx.dataset, args.bbox)
    report = run_qc(
        ctx, args.run, qc_thresholds(cfg, args.dataset), region=region, verify=args.verify
    )
    key = save_report(ctx.ledger, report)
    print_report(report)
    print(f"  stored: {key}")
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
