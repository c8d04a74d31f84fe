"""``l2cache ingest|status|reconcile|runs``: bulk runs through Cloud Tasks and their ledger."""

from __future__ import annotations

import argparse
import time

from .common import add_config_arg, config_from, print_status


def register(sub) -> None:
    p = sub.add_parser("ingest", help="start (or resume) a bulk ingest run through Cloud Tasks")
    add_config_arg(p)
    p.add_argument("dataset")
    p.add_argument("--bbox", help="voxel box x0,y0,z0,x1,y1,z1 (default: whole dataset)")
    p.add_argument("--batch", type=int, default=4, help="chunks per leaf task")
    p.add_argument("--resume", metavar="RUN", help="re-enqueue a run; done chunks are skipped")
    p.add_argument("--watch", action="store_true", help="show progress until the run ends")
    p.add_argument(
        "--pin-revision",
        metavar="REV",
        help="only workers running this code revision may write for the run (others fail "
        "the chunk permanently, with the reason)",
    )
    p.set_defaults(func=ingest)

    s = sub.add_parser("status", help="progress, rate, ETA, failures and cost of a run")
    add_config_arg(s)
    s.add_argument("dataset")
    s.add_argument("run")
    s.add_argument("--watch", action="store_true", help="live progress bar until the run ends")
    s.set_defaults(func=status)

    r = sub.add_parser("reconcile", help="re-queue the chunks of a run that are not done")
    add_config_arg(r)
    r.add_argument("dataset")
    r.add_argument("run")
    r.set_defaults(func=reconcile)

    runs = sub.add_parser("runs", help="list, show or roll back runs")
    rs = runs.add_subparsers(dest="runs_command", required=True)
    for name in ("list", "show", "rollback"):
        q = rs.add_parser(name)
        add_config_arg(q)
        q.add_argument("dataset")
        if name != "list":
            q.add_argument("run")
        q.set_defaults(func=runs_command)


def _ctx(args):
    from l2cache.pipeline import dataset_context

    cfg = config_from(args)
    return cfg, dataset_context(cfg, args.dataset)


def _status_args(cfg) -> dict:
    if cfg.tasks is None:
        return {}
    return {
        "max_attempts": cfg.tasks.max_attempts,
        "attempt_deadline_s": cfg.tasks.attempt_deadline_s,
    }


def current_status(ledger, run_id: str, cfg=None):
    """The run's status; a run whose ledger row is gone is reported broken, not pending."""
    from google.api_core.exceptions import NotFound

    from l2cache.status import run_status

    try:
        return run_status(ledger, run_id, **_status_args(cfg) if cfg else {})
    except (KeyError, NotFound) as exc:
        raise RunBroken(
            f"run {run_id} is broken: its ledger cannot be read ({_words(exc)}); "
            "it will never be done: start a new run"
        ) from None


class RunBroken(LookupError):
    pass


def _words(exc) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc).splitlines()[0]


def watch(ledger, run_id: str, interval: float = 0.5, timeout: float | None = None, cfg=None):
    """tqdm bar over the run's chunks until it finishes; returns the final status.

    It always returns: a run finishes when every chunk is done or failed, failed
    includes "gave up after N attempts" (recorded by the last attempt, or presumed
    after the attempt deadline), and a run whose ledger vanished raises RunBroken.
    """
    from tqdm import tqdm

    st = current_status(ledger, run_id, cfg)
    start = time.monotonic()
    with tqdm(
        total=st.total, unit="chunk", desc=run_id, dynamic_ncols=True, mininterval=1.0
    ) as bar:
        while True:
            st = current_status(ledger, run_id, cfg)
            bar.set_postfix(
                failed=st.failed,
                retrying=st.retrying,
                running=st.running,
                rows=st.l2_rows,
                refresh=False,
            )
            bar.update(st.done + st.failed - bar.n)
            if st.finished:
                return st
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"run {run_id} not finished after {timeout:.0f}s")
            time.sleep(interval)


def ingest(args: argparse.Namespace) -> int:
    from l2cache.ingest import start_ingest

    cfg = config_from(args)
    bbox = [int(v) for v in args.bbox.split(",")] if args.bbox else None
    run = start_ingest(
        cfg, args.dataset, bbox, args.batch, args.resume, pinned_revision=args.pin_revision
    )
    print(f"run {run.run_id}: {run.n_chunks} chunks in region {run.region}, enqueued")
    if args.watch:
        _, ctx = _ctx(args)
        st = watch(ctx.ledger, run.run_id, cfg=cfg)
        print_status(st)
        return 0 if st.failed == 0 else 1
    return 0


def status(args: argparse.Namespace) -> int:
    cfg, ctx = _ctx(args)
    st = (
        watch(ctx.ledger, args.run, cfg=cfg)
        if args.watch
        else current_status(ctx.ledger, args.run, cfg)
    )
    print_status(st)
    return 0 if st.failed == 0 else 1


def reconcile(args: argparse.Namespace) -> int:
    from l2cache.ingest import region_chunks
    from l2cache.lineage import utc_now
    from l2cache.pipeline import chunk_id
    from l2cache.tasks import enqueue_region, tasks_client

    cfg, ctx = _ctx(args)
    if cfg.tasks is None:
        raise ValueError("the dataset map has no 'tasks' section: nowhere to enqueue")
    run = ctx.ledger.get_run(args.run)
    done = ctx.ledger.done_chunks(run.run_id)
    gaps = [c for c in region_chunks(run.region) if chunk_id(ctx, c) not in done]
    client = tasks_client()
    generation = "reconcile" + utc_now().strftime("%Y%m%dT%H%M%S%f")
    for c in gaps:
        region = [*c, *(v + 1 for v in c)]
        enqueue_region(client, cfg.tasks, args.dataset, run.run_id, region, 1, generation)
    print(f"run {run.run_id}: re-queued {len(gaps)} chunks")
    return 0


def runs_command(args: argparse.Namespace) -> int:
    from l2cache.rollback import rollback_run

    _, ctx = _ctx(args)
    if args.runs_command == "list":
        for run in ctx.ledger.list_runs():
            print(
                f"{run.run_id:40} {run.kind:18} {run.dataset:16} {run.created_at} "
                f"chunks={run.n_chunks} params={run.params_hash} code={run.code_revision}"
            )
        return 0
    run = ctx.ledger.get_run(args.run)
    if args.runs_command == "show":
        from dataclasses import asdict

        for k, v in asdict(run).items():
            print(f"{k:20} {v}")
        return 0
    n = rollback_run(ctx.store.table, run)
    print(f"rolled back run {run.run_id}: {n} rows restored to their previous version")
    return 0
