"""``l2cache dashboard DATASET [--out PATH]``: the dataset's one-page HTML dashboard."""

from __future__ import annotations

import argparse

from .common import add_config_arg, config_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dashboard``: one HTML page an operator can open offline or attach to a
    report, with the same numbers ``status`` prints (both read the runs ledger)."""
    p = sub.add_parser(
        "dashboard",
        help="one self-contained HTML page: throughput, failures, QC, cost, SLOs, release",
    )
    add_config_arg(p)
    p.add_argument("dataset")
    p.add_argument("--out", help="where to write it (default: DATASET-dashboard.html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the page and print its absolute path, so it can be opened from anywhere."""
    from l2cache_tools.dashboard import write_dashboard

    cfg = config_from(args)
    cfg.dataset(args.dataset)  # an unknown dataset is a user error
    path = write_dashboard(cfg, args.dataset, args.out or f"{args.dataset}-dashboard.html")
    print(f"dashboard: {path.resolve()}")
    return 0
