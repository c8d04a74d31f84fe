"""Helpers shared by the subcommands: config loading and table printing."""

from __future__ import annotations

import argparse

from l2cache.config import L2CacheConfig, load_config
from l2cache_ops.settings import check_sections
from l2cache_ops.status import RunStatus


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """``--config`` with one meaning on every command: a map file, or else
    ``$L2CACHE_CONFIG`` (read by :func:`config_from`)."""
    p.add_argument("--config", help="dataset map YAML (default: $L2CACHE_CONFIG)")


def config_from(args: argparse.Namespace) -> L2CacheConfig:
    """The dataset map, its operator sections (``qc:``, ``slo:``) checked too."""
    return check_sections(load_config(getattr(args, "config", None)))


def print_features(rows: dict[int, dict], title: str = "") -> None:
    """Looked-up features (API units) as a table a person can read."""
    if title:
        print(title)
    header = (
        f"{'l2id':>20} {'size_um3':>9} {'area_um2':>9} {'max_dt':>7} {'mean_dt':>8} "
        f"{'rep_coord_nm (x,y,z)':>26}"
    )
    print(header)
    print("-" * len(header))
    for node, f in rows.items():
        if not f:
            print(f"{node:>20} {'(not in cache)':>9}")
            continue
        rep = ",".join(str(int(v)) for v in f.get("rep_coord_nm", []))
        print(
            f"{node:>20} {f['size_nm3'] / 1e9:>9.4f} {f['area_nm2'] / 1e6:>9.3f} "
            f"{f['max_dt_nm']:>7} {f['mean_dt_nm']:>8.1f} {'(' + rep + ')':>26}"
        )


def print_status(status: RunStatus, cost: bool = True, failures: bool = True) -> None:
    """One line of progress (and cost, unless the caller prints the breakdown), then
    why the run is broken and the first failed or retrying chunks: the same words for
    ``status``, ``ingest --watch`` and the demo."""
    eta = f"{status.eta_s:.0f}s" if status.eta_s is not None else "-"
    print(
        f"run {status.run_id}: {status.done}/{status.total} done, {status.failed} failed, "
        f"{status.retrying} retrying, {status.running} running, {status.pending} pending; "
        f"{status.rate_per_s:.2f} chunks/s, "
        f"ETA {eta}; {status.l2_rows} L2 rows; compute {status.compute_s:.1f}s"
        + (f"; cost ${status.cost_usd:.6f}" if cost else "")
    )
    if status.broken:
        print(f"  BROKEN: {status.broken}")
    if status.closed:
        print(f"  CLOSED at {status.closed.get('at')} by {status.closed.get('by')}: "
              f"{status.closed.get('reason')} (late writes are refused)")  # fmt: skip
    if status.refused:
        print(f"  refused {status.refused} task(s); latest: {status.refused_latest}")
    if not failures:
        return
    shown = len(status.failures)
    if shown < status.failed + status.retrying:
        print(f"  first {shown} of {status.failed + status.retrying} (all: runs inspect)")
    for f in status.failures:
        print(f"  chunk {f['chunk']} {f['status']}: {f['error']} (attempts {f['attempts']})")
