"""``l2cache release promote|list|rollback``: QC-passed runs as the dataset's releases.

A promotion the release contract forbids (no QC report, QC failed, QC diffed against
an older release state, run already released) prints one ``error:`` line and exits 2.
``release rollback`` takes ``--dry-run`` and asks for confirmation on a terminal; without
one it refuses (exit 2) unless ``--yes`` (:mod:`.rollback_cmd`).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from l2cache_ops.rollback import FAN_OUT_CHUNKS

from .common import add_config_arg, config_from
from .rollback_cmd import add_confirm_args, confirm

if TYPE_CHECKING:  # annotations only
    from l2cache.compute import DatasetContext


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``release promote|list|rollback``: which run's values a dataset serves as
    known good, and the way back to the previous ones."""
    p = sub.add_parser("release", help="promote a QC-passed run, list releases, roll one back")
    rs = p.add_subparsers(dest="release_command", required=True)
    promote = rs.add_parser("promote", help="make a QC-passed run the current release")
    add_config_arg(promote)
    promote.add_argument("dataset")
    promote.add_argument("run")
    promote.set_defaults(func=run)
    listing = rs.add_parser("list", help="every release with its lineage and rollbacks")
    add_config_arg(listing)
    listing.add_argument("dataset")
    listing.set_defaults(func=run)
    rollback = rs.add_parser(
        "rollback", help="restore the previous release's values (in a region, or everywhere)"
    )
    add_config_arg(rollback)
    rollback.add_argument("dataset")
    rollback.add_argument(
        "--region", metavar="x0,y0,z0,x1,y1,z1", help="voxel box (default: the whole release)"
    )
    add_confirm_args(rollback, "the rollback")
    rollback.add_argument(
        "--fan-out",
        type=int,
        default=FAN_OUT_CHUNKS,
        metavar="N",
        help=f"above N chunks, enqueue rollback tasks (default {FAN_OUT_CHUNKS}); "
        "without a tasks section it all runs here",
    )
    rollback.set_defaults(func=run)


def _region(text: str | None) -> list[int] | None:
    if text is None:
        return None
    values = [int(v) for v in text.split(",")]
    if len(values) != 6:
        raise ValueError(f"--region needs 6 integers x0,y0,z0,x1,y1,z1, got {text!r}")
    return values


def print_release(r: dict) -> None:
    """One release with its lineage (code, params, snapshot, sources) and each region
    rolled back, so ``release list`` answers what produced the values served."""
    lin = r["lineage"]
    state = "rolled back" if r["rolled_back"] else "live"
    if r["rollbacks"] and not r["rolled_back"]:
        state += f", {len(r['rollbacks'])} region(s) rolled back"
    print(
        f"release {r['release']:>3}  {r['run_id']}  {r['kind']} chunks {r['region']}  "
        f"promoted {r['promoted_at']}  qc {'pass' if r['qc_passed'] else 'fail'}  [{state}]"
    )
    print(
        f"             code={lin['code_revision']} params={lin['params_hash']} "
        f"snapshot={lin['snapshot']} graph={lin['graph']} segmentation={lin['segmentation']}"
    )
    for rb in r["rollbacks"]:
        print(
            f"             rolled back {rb['at']} chunks {rb['region']}: {rb['versions_deleted']} "
            f"versions in {rb['rows_touched']} rows ({rb['rows_scanned']} scanned in "
            f"{rb['ranges']} key ranges) in {rb['seconds']:.3f}s"
        )


def run(args: argparse.Namespace) -> int:
    """All three subcommands: each needs the dataset's ledger, opened once here."""
    from l2cache.compute import dataset_context
    from l2cache_ops.releases import current_release, promote, release_history

    ctx = dataset_context(config_from(args), args.dataset)
    if args.release_command == "promote":
        r = promote(ctx.ledger, args.dataset, args.run)
        print(f"run {r['run_id']} is release {r['release']} of {args.dataset}")
        return 0
    if args.release_command == "list":
        history = release_history(ctx.ledger, args.dataset)
        if not history:
            print(f"{args.dataset} has no release")
        for r in history:
            print_release(r)
        cur = current_release(ctx.ledger, args.dataset)
        print(f"current release: {cur['release'] if cur else 'none'}")
        return 0
    return _rollback(args, ctx)


def describe_rollback(done: dict) -> str:
    """One line: what a release rollback did, or (dry) would do."""
    restored = ", ".join(map(str, done["restored"])) or "none (values before the release)"
    runs = ", ".join(sorted(done["runs"])) or "none"
    if done["mode"] == "inline":
        verb = "would delete" if done["dry_run"] else "deleted"
        what = (
            f"{verb} {done['versions_deleted']} versions in {done['rows_touched']} rows "
            f"({done['rows_scanned']} rows scanned in {done['ranges']} key ranges)"
        )
    elif done["mode"] == "queued":
        verb = "would enqueue" if done["dry_run"] else "enqueued"
        what = f"{verb} {done['tasks']} rollback tasks (the compute function runs them)"
    else:
        what = "too many chunks to count in a dry run"
    head = "dry run: release" if done["dry_run"] else "release"
    return (
        f"{head} {done['release']} rolled back in chunks {done['region']}: {what}; "
        f"{done['chunks_to_undo']} of {done['chunks']} chunks hold later batch runs "
        f"({runs}) in {done['seconds']:.3f}s; restored release(s): {restored}"
    )


def _rollback(args: argparse.Namespace, ctx: DatasetContext) -> int:
    """``release rollback``: dry run, confirmation (``--yes`` without a terminal), then
    the rollback, through the queue when the region is large."""
    import sys

    from l2cache_ops.releases import rollback_release
    from l2cache_ops.rollback import queue_enqueuer

    cfg = config_from(args)
    enqueue = queue_enqueuer(cfg.tasks, args.dataset) if cfg.tasks is not None else None
    region = _region(args.region)

    def go(dry_run: bool) -> dict:
        return rollback_release(
            ctx, region, dry_run=dry_run, enqueue=enqueue, fan_out_chunks=args.fan_out
        )

    if args.dry_run or (not args.yes and sys.stdin.isatty()):
        print(describe_rollback(go(dry_run=True)))
        if args.dry_run:
            return 0
    refused = confirm(args, f"roll back the current release of {args.dataset}")
    if refused is not None:
        return refused
    print(describe_rollback(go(dry_run=False)))
    return 0
