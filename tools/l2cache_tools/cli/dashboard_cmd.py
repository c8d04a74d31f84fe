"""``l2cache dashboard DATASET [--out PATH]``: the dataset's one-page HTML dashboard."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import add_config_arg, config_from

# Where pages go without --out: one predictable place whatever the current directory
# (it used to be the current directory), ignored by git. $L2CACHE_DASHBOARD_DIR moves it.
REPO = Path(__file__).resolve().parents[3]
DIR_ENV = "L2CACHE_DASHBOARD_DIR"
DEFAULT_DIR = REPO / "build" / "dashboard"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dashboard``: one HTML page an operator can open offline or attach to a
    report, with the same numbers ``status`` prints (both read the runs ledger)."""
    p = sub.add_parser(
        "dashboard",
        help="one self-contained HTML page: throughput, failures, QC, cost, SLOs, release",
    )
    add_config_arg(p)
    p.add_argument("dataset")
    p.add_argument(
        "--out",
        metavar="PATH",
        help=f"the HTML file to write (default: DATASET.html in ${DIR_ENV}, else in "
        f"{DEFAULT_DIR.relative_to(REPO)}/ of the repository)",
    )
    p.set_defaults(func=run)


def default_out(dataset: str) -> Path:
    """``<$L2CACHE_DASHBOARD_DIR or build/dashboard>/<dataset>.html``."""
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR) / f"{dataset}.html"


def run(args: argparse.Namespace) -> int:
    """Write the page and print its absolute path, so it can be opened from anywhere."""
    from l2cache_tools.dashboard import write_dashboard

    cfg = config_from(args)
    cfg.dataset(args.dataset)  # an unknown dataset is a user error
    out = Path(args.out) if args.out else default_out(args.dataset)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory: give the HTML file's path")
    path = write_dashboard(cfg, args.dataset, out)
    print(f"dashboard: {path.resolve()}")
    return 0
