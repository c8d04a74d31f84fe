"""``l2cache runs rollback``, and the dry run and confirmation every rollback shares.

A rollback deletes cell versions from the served table, so it is never done by accident:

- ``--dry-run`` prints what would change (runs, chunks, versions: counted exactly when
  the work is small, else the ledger's estimate, and the tasks it would enqueue) and
  writes nothing;
- on a terminal the plan is printed (a dry run first) and the command asks ``[y/N]``;
- without a terminal (a script, CI) it refuses with exit code 2 unless ``--yes``:
  it never hangs waiting for an answer nobody can give.

A real ``runs rollback`` first closes the run and waits for its in-flight writers
(:func:`l2cache_ops.rollback.fence_run`), so nothing of the run is written after its
cells are removed; it then records who, when, the wait and what it removed. A closed
edit-stream run's new edits go to its successor run (``<run>.2``, ...).
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from l2cache.compute import DatasetContext
    from l2cache.config import L2CacheConfig
    from l2cache.store.ledger import RunRecord
    from l2cache_ops.rollback import Fence, RunRollback

REFUSED = 2  # not confirmed without a terminal: a usage error, as argparse's
DECLINED = 1  # the operator answered no


def add_confirm_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--dry-run`` and ``--yes`` for a destructive command."""
    parser.add_argument(
        "--dry-run", action="store_true", help=f"print what {what} would change; write nothing"
    )
    parser.add_argument(
        "--yes", "-y", action="store_true", help="do it without asking (needed without a terminal)"
    )


def add_rollback_args(parser: argparse.ArgumentParser) -> None:
    """The options of ``runs rollback`` (added to its parser in ``ingest_cmd``)."""
    from l2cache_ops.rollback import FAN_OUT_CHUNKS

    add_confirm_args(parser, "the rollback")
    parser.add_argument(
        "--fan-out",
        type=int,
        default=FAN_OUT_CHUNKS,
        metavar="N",
        help=f"above N touched chunks, enqueue rollback tasks (default {FAN_OUT_CHUNKS}); "
        "without a tasks section it all runs here",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="S",
        help="wait at most S seconds for the run's in-flight writers after closing it "
        "(default: until each has ended or gone silent past the attempt deadline)",
    )
    parser.add_argument(
        "--full-scan",
        action="store_true",
        help="scan the whole cache table instead of the chunks the ledger names "
        "(O(table): only if the ledger lost rows)",
    )


def confirm(args: argparse.Namespace, question: str) -> int | None:
    """None to go ahead; else the exit code (refused without a terminal, or declined)."""
    if getattr(args, "yes", False):
        return None
    if not sys.stdin.isatty():
        print(
            f"error: {question}: refusing without a terminal to confirm on; pass --yes to "
            "go ahead, or --dry-run to see what would change",
            file=sys.stderr,
        )
        return REFUSED
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return None
    print("nothing changed")
    return DECLINED


def describe(r: RunRollback) -> str:
    """One paragraph: what the rollback of one run did, or would do."""
    verb = "would delete" if r.dry_run else "deleted"
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(r.by_status.items())) or "none"
    head = (
        f"run {r.run_id} ({r.kind}): {r.chunks} touched chunks in the ledger ({statuses}; "
        f"{r.ledger_rows} ledger rows in {r.ledger_requests} reads)"
    )
    if r.mode == "inline":
        d = r.deleted
        body = (
            f"{verb} {d.versions_deleted} versions ({r.cells} cells) in {d.rows_touched} rows "
            f"({d.rows_scanned} rows read in {d.ranges} key ranges of {d.chunks} chunks)"
        )
    elif r.mode == "queued":
        queued = "would enqueue" if r.dry_run else "enqueued"
        new = "" if r.dry_run else f" ({r.tasks_new} new, {r.tasks - r.tasks_new} already queued)"
        body = (
            f"{queued} {r.tasks} rollback tasks{new}; about {r.estimated_versions} versions "
            f"({r.cells} cells) by the ledger's row counts"
        )
    else:
        body = (
            f"{verb} about {r.estimated_versions} versions ({r.cells} cells) by the ledger's "
            "row counts (too many chunks to count exactly in a dry run)"
        )
    return f"{head}: {body} in {r.seconds:.3f}s"


def operator() -> str:
    """Who runs the rollback, for its record: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def close_and_wait(
    args: argparse.Namespace, cfg: L2CacheConfig, ctx: DatasetContext, run: RunRecord
) -> Fence:
    """Close the run and wait for its in-flight writers, saying what it waits on."""
    from l2cache_ops.rollback import fence_run

    deadline = cfg.tasks.attempt_deadline_s if cfg.tasks is not None else 1800.0
    fence = fence_run(
        ctx.ledger,
        run,
        operator(),
        deadline,
        timeout_s=getattr(args, "wait", None),
        say=lambda text: print(text, file=sys.stderr, flush=True),
    )
    print(
        f"closed run {run.run_id} at {fence.closed.get('at')} (late writes are refused); "
        f"waited {fence.waited_s:.1f}s on {fence.in_flight} in-flight writer(s)"
        + (f", {fence.silent} given up as silent" if fence.silent else "")
    )
    if run.kind in ("edit_stream", "missing_ids"):
        print(f"new {run.kind} messages go to a successor run ({run.run_id}.2, ...)")
    return fence


def runs_rollback(
    args: argparse.Namespace, cfg: L2CacheConfig, ctx: DatasetContext, run: RunRecord
) -> int:
    """``runs rollback DATASET RUN [--dry-run] [--yes] [--fan-out N] [--full-scan]``."""
    from l2cache_ops.rollback import (
        RunRollback,
        queue_enqueuer,
        record_rollback,
        rollback_run,
        rollback_run_touched,
    )

    if run.dataset != args.dataset:
        print(f"error: run {run.run_id} belongs to dataset {run.dataset!r}", file=sys.stderr)
        return REFUSED
    if args.full_scan:
        if args.dry_run:
            print(f"run {run.run_id}: a full scan reads the whole table; no dry run for it")
            return 0
        refused = confirm(args, f"scan the whole cache table and roll back run {run.run_id}")
        if refused is not None:
            return refused
        fence = close_and_wait(args, cfg, ctx, run)
        n = rollback_run(ctx.store.table, run)
        scan = RunRollback(run.run_id, run.kind, run.dataset, False, mode="full-scan")
        scan.deleted.rows_touched = n
        record_rollback(ctx.ledger, scan, fence, operator())
        print(f"rolled back run {run.run_id} (full scan): {n} rows restored; record {scan.record}")
        return 0
    enqueue: Callable | None = None
    if cfg.tasks is not None:
        enqueue = queue_enqueuer(cfg.tasks, args.dataset)

    def go(dry_run: bool, fence: Fence | None = None) -> RunRollback:
        return rollback_run_touched(
            ctx.store.table,
            ctx.ledger,
            run,
            ctx.dataset.spatial_bits,
            dry_run=dry_run,
            enqueue=enqueue,
            fan_out_chunks=args.fan_out,
            fence=fence,
            by="" if dry_run else operator(),
        )

    if args.dry_run or (not args.yes and sys.stdin.isatty()):
        plan = go(dry_run=True)
        print(f"dry run: {describe(plan)}")
        if args.dry_run:
            return 0
    refused = confirm(args, f"roll back run {run.run_id} of {args.dataset}")
    if refused is not None:
        return refused
    done = go(dry_run=False, fence=close_and_wait(args, cfg, ctx, run))
    print(f"rolled back: {describe(done)}; recorded as {done.record}")
    if done.mode == "queued":
        print(
            f"the compute function runs the {done.tasks} tasks; each adds to tasks_done "
            f"and versions_deleted of the record {done.record} as it finishes"
        )
    return 0
