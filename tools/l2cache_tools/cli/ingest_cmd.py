"""``l2cache ingest|status|reconcile|runs``: bulk runs through Cloud Tasks and their ledger.

``ingest --sample N`` computes N scattered chunks first and projects the whole run's
wall time and cost before anything else is enqueued; ``runs pause|resume|scale`` act
on the Cloud Tasks queue; ``runs inspect`` lists a run's failed and retrying chunks;
``status`` shows cost per chunk and per mm^3 and every SLO against its target.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

from l2cache.compute import DatasetContext
from l2cache.config import L2CacheConfig
from l2cache.store.ledger import RunLedger
from l2cache_ops.cost import Prices, RunCost
from l2cache_ops.ledger import list_runs
from l2cache_ops.settings import slo_targets
from l2cache_ops.slo import SloResult
from l2cache_ops.status import RunStatus

from .argformats import BBOX_HELP, BOX_FORMAT, box, positive_float, positive_int
from .common import add_config_arg, config_from, print_status
from .rollback_cmd import add_rollback_args
from .runref import no_such_run
from .sampling import sample_run, wait_for_sample, widen_sample


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ingest``, ``status``, ``reconcile`` and ``runs``: everything an operator
    does with a bulk run, from its first sampled chunk to its rollback."""
    p = sub.add_parser("ingest", help="start (or resume) a bulk ingest run through Cloud Tasks")
    add_config_arg(p)
    p.add_argument("dataset")
    p.add_argument("--bbox", type=box, metavar=BOX_FORMAT, help=f"{BBOX_HELP} (default: all)")
    p.add_argument("--batch", type=positive_int, default=4, help="chunks per leaf task")
    p.add_argument("--resume", metavar="RUN", help="re-enqueue a run; done chunks are skipped")
    p.add_argument("--watch", action="store_true", help="show progress until the run ends")
    p.add_argument(
        "--pin-revision",
        metavar="REV",
        help="only workers running this code revision may write for the run (others fail "
        "the chunk permanently, with the reason)",
    )
    p.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="compute N scattered chunks first, wait for them, print the projected wall "
        "time and cost of the whole region, and stop (unless --yes)",
    )
    p.add_argument(
        "--max-instances",
        type=int,
        metavar="M",
        help="workers the projection assumes (default: the queue's max concurrent dispatches)",
    )
    p.add_argument("--yes", action="store_true", help="after --sample, go on with the full run")
    p.add_argument(
        "--sample-timeout",
        type=positive_float,
        default=3600.0,
        metavar="SECONDS",
        help="how long to wait for the sampled chunks",
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
    r.add_argument(
        "--batch",
        type=int,
        default=8,
        help="chunks per re-queued task (at most 64), and per leaf if the region is re-enqueued",
    )
    r.set_defaults(func=reconcile)

    runs = sub.add_parser(
        "runs", help="list, show, inspect or roll back runs; pause, resume or scale the queue"
    )
    rs = runs.add_subparsers(dest="runs_command", required=True)
    for name, what in (
        ("list", "the dataset's runs with their progress"),
        ("show", "a run's record: kind, region, parameters, code revision"),
        ("rollback", "undo what a run wrote (each row back to its previous version)"),
        ("inspect", "a run's failed, retrying and running chunks, a page at a time"),
        ("recount", "rebuild a run's counters from its ledger rows (streams the run)"),
    ):
        q = rs.add_parser(name, help=what)
        add_config_arg(q)
        q.add_argument("dataset")
        if name != "list":
            q.add_argument("run")
        if name == "rollback":
            add_rollback_args(q)
        if name == "inspect":
            q.add_argument(
                "--page-size", type=int, default=50, help="failed or retrying chunks per page"
            )
            q.add_argument(
                "--after", type=int, metavar="CHUNK_ID", help="continue after this chunk id"
            )
        q.set_defaults(func=runs_command if name != "inspect" else inspect)
    for name, what in (
        ("pause", "stop dispatching tasks (attempts in flight finish)"),
        ("resume", "dispatch again"),
        ("scale", "set how many tasks run at once"),
    ):
        q = rs.add_parser(name, help=f"the Cloud Tasks queue: {what}")
        add_config_arg(q)
        q.add_argument("dataset")
        if name == "scale":
            q.add_argument(
                "--concurrency",
                type=positive_int,
                required=True,
                metavar="N",
                help="tasks dispatched at once (the queue's max concurrent dispatches)",
            )
        q.set_defaults(func=queue_command)


def _ctx(args: argparse.Namespace) -> tuple[L2CacheConfig, DatasetContext]:
    from l2cache.compute import dataset_context

    cfg = config_from(args)
    return cfg, dataset_context(cfg, args.dataset)


def _status_args(cfg: L2CacheConfig) -> dict[str, int | float]:
    if cfg.tasks is None:
        return {}
    return {
        "max_attempts": cfg.tasks.max_attempts,
        "attempt_deadline_s": cfg.tasks.attempt_deadline_s,
    }


def current_status(
    ledger: RunLedger,
    run_id: str,
    cfg: L2CacheConfig | None = None,
    prices: Prices | None = None,
) -> RunStatus:
    """The run's status; a run whose ledger row is gone is reported broken, not pending.

    Priced with ``prices`` or else as the run's worker was deployed
    (:func:`run_prices_of`): every command that prints a run's cost gets the same one.
    """
    from google.api_core.exceptions import NotFound

    from l2cache_ops.status import run_status

    if prices is None:
        prices = run_prices_of(ledger, run_id, cfg)
    bits = None
    if cfg is not None:
        with contextlib.suppress(KeyError, LookupError):
            bits = cfg.dataset(ledger.get_run(run_id).dataset).spatial_bits
    try:
        return run_status(
            ledger, run_id, **_status_args(cfg) if cfg else {}, prices=prices, bits=bits
        )
    except (KeyError, NotFound) as exc:
        raise _broken(run_id, exc) from None


def run_prices_of(ledger: RunLedger, run_id: str, cfg: L2CacheConfig | None = None) -> Prices:
    """Prices of the worker that computed the run (its recorded chunk size, the map's
    ``tasks.read_ahead``): :func:`l2cache_ops.cost.run_prices` of its ledger record."""
    from google.api_core.exceptions import NotFound

    from l2cache_ops.cost import run_prices

    try:
        run = ledger.get_run(run_id)
    except KeyError:  # no record with this id: mistyped, not broken
        raise no_such_run(ledger, run_id) from None
    except NotFound as exc:  # the runs table itself is gone
        raise _broken(run_id, exc) from None
    return run_prices(run, cfg)


def _broken(run_id: str, exc: BaseException) -> RunBroken:
    return RunBroken(
        f"run {run_id} is broken: its ledger cannot be read ({_words(exc)}); "
        "it will never be done: start a new run"
    )


class RunBroken(LookupError):
    """The run's ledger cannot be read, so it can never finish. A LookupError, so the
    CLI reports it as a user error (one line, exit 2) whose message says to start a new
    run rather than wait on this one."""


def _words(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc).splitlines()[0]


T = TypeVar("T")
WAIT_NOTICE_S = 3.0  # a status read slower than this is said to be waiting on Bigtable
WAIT_EVERY_S = 5.0  # and said again this often while it waits


def patiently(
    read: Callable[[], T],
    say: Callable[[str], object],
    notice_after_s: float = WAIT_NOTICE_S,
    every_s: float = WAIT_EVERY_S,
) -> T:
    """``read()``, saying "waiting on Bigtable for Ns" while it takes longer than
    ``notice_after_s``: a watch must never sit silent while Bigtable hangs. The read
    itself ends: every Bigtable read fails after its no-progress deadline
    (:data:`l2cache.gcp.bigtable.READ_DEADLINE_S`), and its error is raised here."""
    from l2cache.gcp.bigtable import READ_DEADLINE_S

    pool = ThreadPoolExecutor(1, thread_name_prefix="l2cache-status-read")
    try:
        future = pool.submit(read)
        start, notice = time.monotonic(), notice_after_s
        while True:  # wait(), not result(timeout): the read may raise TimeoutError itself
            wait([future], timeout=max(start + notice - time.monotonic(), 0.01))
            if future.done():
                return future.result()
            waited = time.monotonic() - start
            if waited >= notice:
                say(
                    f"waiting on Bigtable for {waited:.0f}s (a read gives up after "
                    f"{READ_DEADLINE_S:.0f}s without progress)"
                )
                notice += every_s
    finally:
        pool.shutdown(wait=False)


def watch(
    ledger: RunLedger,
    run_id: str,
    interval: float = 0.5,
    timeout: float | None = None,
    cfg: L2CacheConfig | None = None,
) -> RunStatus:
    """tqdm bar over the run's chunks until it finishes; returns the final status.

    It always returns: a run finishes when every chunk is done or failed, failed
    includes "gave up after N attempts" (recorded by the last attempt, or presumed
    after the attempt deadline), and a run whose ledger vanished raises RunBroken.
    A status read slower than a few seconds says so ("waiting on Bigtable for Ns").
    """
    from tqdm import tqdm

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    prices = patiently(lambda: run_prices_of(ledger, run_id, cfg), say)  # once, not per poll
    st = patiently(lambda: current_status(ledger, run_id, cfg, prices), say)
    start = time.monotonic()
    with tqdm(
        total=st.total, unit="chunk", desc=run_id, dynamic_ncols=True, mininterval=1.0
    ) as bar:
        while True:
            st = patiently(
                lambda: current_status(ledger, run_id, cfg, prices),
                lambda text: bar.write(text, file=sys.stderr),
            )
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
    """``ingest``: start, resume or sample a run; with ``--watch`` the exit code says
    whether every chunk was done (1 when any failed), so a script can wait on it."""
    from l2cache_ops.ingest import start_ingest

    cfg = config_from(args)
    bbox = args.bbox  # checked by argformats.box: six integers, a non-empty box
    if args.sample is not None:
        return sample_then_ingest(args, cfg, bbox)
    if args.resume:  # a stopped sample continues over its whole region
        widen_sample(_ctx(args)[1].ledger, args.resume)
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
    """``status``: progress, cost and SLOs priced and measured as the dashboard does;
    exit 1 while any chunk failed or the run is broken, so a check can gate on it."""
    from l2cache_ops.slo import run_slos

    cfg, ctx = _ctx(args)
    prices = run_prices_of(ctx.ledger, args.run, cfg)
    if args.watch:
        watch(ctx.ledger, args.run, cfg=cfg)
    st = current_status(ctx.ledger, args.run, cfg, prices)
    print_status(st, cost=False)  # the breakdown below is the one cost figure
    print_cost(st.cost)
    print_slos(run_slos(ctx.ledger, ctx.dataset, slo_targets(cfg, args.dataset), args.run, st))
    return 0 if st.failed == 0 and not st.broken else 1


def _prices(ctx: DatasetContext, cfg: L2CacheConfig | None = None) -> Prices:
    """Prices of the worker deployed for the dataset's chunk size (and the map's
    ``tasks.read_ahead``); for a run in the ledger, :func:`run_prices_of`."""
    from l2cache_ops.cost import map_read_ahead, worker_prices

    return worker_prices(ctx.dataset.chunk_size, map_read_ahead(cfg))


def print_cost(cost: RunCost | None) -> None:
    """Per chunk and per mm^3, then its parts with the prices that made them (how
    Bigtable is charged: :mod:`l2cache_ops.cost`; the price file's region and date)."""
    from l2cache_ops.cost import PRICES

    if cost is None or not cost.chunks:
        print("cost: no chunk done yet")
        return
    p = cost.prices or PRICES
    per_mm3 = f"${cost.per_mm3:,.2f}/mm^3" if cost.per_mm3 is not None else "-"
    print(
        f"cost: ${cost.usd:.6f} for {cost.chunks} chunks (${cost.per_chunk:.6f}/chunk, "
        f"{cost.compute_s:.1f} compute-s, {cost.l2_rows} rows), {cost.mm3:.4g} mm^3 -> {per_mm3}"
    )
    print(
        f"  compute ${cost.compute_usd:.6f} (worker {p.worker_gib:g} GiB x "
        f"{p.worker_vcpu:g} vCPU), dispatch ${cost.dispatch_usd:.6f}, storage "
        f"${cost.storage_usd:.6f} ({p.storage_months:g} month of {cost.l2_rows} rows x "
        f"{p.row_bytes:g} B, {p.bigtable_storage}), Bigtable nodes ${cost.node_usd:.6f} "
        f"({p.bigtable_nodes:g} x {cost.busy_s / 3600:.3g} h busy); {p.currency} list "
        f"prices of {p.region}, {p.date}"
    )


def print_slos(results: Iterable[SloResult]) -> None:
    """Each SLO: measured value, target, verdict (met / missed / no data / no target)."""
    from l2cache_ops.slo import format_target, format_value

    print("SLOs:")
    for r in results:
        detail = f" ({r.detail})" if r.detail else ""
        print(
            f"  {r.name:32} {format_value(r):>18}  target {format_target(r):>18}  "
            f"{r.verdict}{detail}"
        )


def scattered_chunks(region: Sequence[int], n: int) -> list[list[int]]:
    """``n`` chunks spread over ``region``, deterministic: the Halton sequence in bases
    2, 3, 5 (low discrepancy: every part of the region is sampled, no clumps), each
    point mapped to its chunk, duplicates skipped; the region in order fills the rest
    when it is smaller than the points can reach."""
    import numpy as np

    lo, hi = np.asarray(region[:3]), np.asarray(region[3:])
    size = hi - lo
    total = int(np.prod(size))
    n = max(0, min(int(n), total))
    picked: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()

    def radical_inverse(i: int, base: int) -> float:
        inv, f = 0.0, 1.0 / base
        while i:
            inv += f * (i % base)
            i //= base
            f /= base
        return inv

    i = 1
    while len(picked) < n and i <= 64 * total + 64:
        h = np.array([radical_inverse(i, b) for b in (2, 3, 5)])
        c = tuple(int(v) for v in lo + np.minimum((h * size).astype(int), size - 1))
        if c not in seen:
            seen.add(c)
            picked.append(list(c))
        i += 1
    if len(picked) < n:
        from l2cache.domain.regions import region_chunks

        for c in region_chunks(region):
            if tuple(c) not in seen and len(picked) < n:
                seen.add(tuple(c))
                picked.append(c)
    return picked


def queue_concurrency(cfg: L2CacheConfig) -> int:
    """The queue's max concurrent dispatches: how many chunks run at once in practice,
    the default instance count a projection's wall time assumes."""
    from l2cache.gcp.tasks import queue_path, tasks_client

    client = tasks_client()
    return int(
        client.get_queue(name=queue_path(client, cfg.tasks)).rate_limits.max_concurrent_dispatches
    )


def sample_then_ingest(
    args: argparse.Namespace, cfg: L2CacheConfig, bbox: Sequence[int] | None
) -> int:
    """Sample first: a run over the whole region is recorded, only the sampled chunks are
    enqueued (one task each); once they are done the projection is printed. With
    ``--yes`` the run continues as a resume (the sampled chunks are skipped as done);
    without, nothing else is enqueued and ``ingest --resume RUN`` continues it later."""
    import math

    from l2cache.compute import chunk_id, dataset_context
    from l2cache.domain.regions import region_from_bbox, region_size
    from l2cache.gcp.tasks import enqueue_region, tasks_client
    from l2cache.store.ledger import new_run
    from l2cache_ops.cost import project, run_cost, run_prices
    from l2cache_ops.ingest import start_ingest

    if args.resume:
        raise ValueError("--sample starts a new run; it cannot be combined with --resume")
    if args.sample <= 0:
        raise ValueError("--sample needs a positive number of chunks")
    if cfg.tasks is None:
        raise ValueError("the dataset map has no 'tasks' section: nowhere to enqueue")
    ctx = dataset_context(cfg, args.dataset)
    region = region_from_bbox(ctx.dataset, bbox)
    kind = "region_reprocess" if bbox is not None else "bulk_ingest"
    picks = scattered_chunks(region, args.sample)
    run = new_run(
        kind, ctx.dataset, region, region_size(region), "cli", pinned_revision=args.pin_revision
    )
    run = sample_run(run, len(picks))  # finished once they are (sampling.py)
    ctx.ledger.create_run(run)
    client = tasks_client()
    for c in picks:
        enqueue_region(
            client, cfg.tasks, args.dataset, run.run_id, [*c, *(v + 1 for v in c)], 1, "sample"
        )
    print(
        f"run {run.run_id}: sampling {len(picks)} of {region_size(region)} chunks first: {picks}",
        flush=True,
    )
    prices = run_prices(run, cfg)  # as `status` and `--watch` price this run
    ids = [chunk_id(ctx, c) for c in picks]
    rows = wait_for_sample(ctx.ledger, run.run_id, ids, args.sample_timeout)
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        print(f"  sampled chunk {r.get('coords')} failed: {r.get('error')}")
    sample = run_cost(rows, ctx.dataset.voxel_volume_nm3, prices)
    instances = args.max_instances or queue_concurrency(cfg)
    proj = project(
        sample,
        region_size(region),
        math.prod(ctx.dataset.chunk_size),
        ctx.dataset.voxel_volume_nm3,
        instances,
        prices,
    )
    per_mm3 = f"${proj.usd_per_mm3:,.2f}/mm^3" if proj.usd_per_mm3 is not None else "-"
    print(
        f"projection from {proj.sample_chunks} sampled chunks "
        f"({proj.seconds_per_chunk:.2f} compute-s and ${proj.usd_per_chunk:.6f} per chunk, "
        f"worker {prices.worker_gib:g} GiB x {prices.worker_vcpu:g} vCPU):\n"
        f"  whole region: {proj.total_chunks} chunks, {proj.mm3:.4g} mm^3 -> "
        f"wall time {proj.wall_s:,.0f}s at {proj.max_instances} instances, "
        f"cost ${proj.usd:.4f} ({per_mm3}; Bigtable nodes ${proj.node_usd:.4f} of it, "
        f"{prices.bigtable_nodes:g} for the wall time; {prices.currency} list prices of "
        f"{prices.region}, {prices.date})"
    )
    if failed:
        print(f"{len(failed)} sampled chunks failed: fix them before a full run")
        return 1
    if not args.yes:
        print(
            f"stopped after the sample (run {run.run_id} is its {len(picks)} chunks, "
            f"finished); continue over the whole region with: l2cache ingest "
            f"{args.dataset} --resume {run.run_id}   (or run --sample with --yes)"
        )
        return 0
    widen_sample(ctx.ledger, run.run_id)  # the sample's run now covers the region
    start_ingest(cfg, args.dataset, batch=args.batch, resume_run=run.run_id)
    print(f"run {run.run_id}: the remaining chunks are enqueued (sampled ones are done)")
    if args.watch:
        st = watch(ctx.ledger, run.run_id, cfg=cfg)
        print_status(st)
        return 0 if st.failed == 0 else 1
    return 0


def queue_command(args: argparse.Namespace) -> int:
    """Pause, resume or scale the Cloud Tasks queue every run of this map goes through."""
    from google.cloud import tasks_v2
    from google.protobuf import field_mask_pb2

    from l2cache.gcp.tasks import queue_path, tasks_client

    cfg = config_from(args)
    cfg.dataset(args.dataset)  # an unknown dataset is a user error
    if cfg.tasks is None:
        raise ValueError("the dataset map has no 'tasks' section: no queue to control")
    client = tasks_client()
    name = queue_path(client, cfg.tasks)
    if args.runs_command == "pause":
        q = client.pause_queue(name=name)
    elif args.runs_command == "resume":
        q = client.resume_queue(name=name)
    else:
        if args.concurrency <= 0:
            raise ValueError("--concurrency must be a positive number of tasks")
        q = client.update_queue(
            queue=tasks_v2.Queue(
                name=name,
                rate_limits=tasks_v2.RateLimits(max_concurrent_dispatches=args.concurrency),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["rate_limits.max_concurrent_dispatches"]),
        )
    state = tasks_v2.Queue.State(q.state).name.lower()
    print(
        f"queue {name}: {state}, max {q.rate_limits.max_concurrent_dispatches} concurrent "
        "dispatches (applies to every run of this queue)"
    )
    return 0


def inspect(args: argparse.Namespace) -> int:
    """``runs inspect``: the run's status line, then one page of its failed and retrying
    chunks (chunk-id order) with their errors and attempts; the first page also lists
    the chunks in flight. Reads O(page), whatever the run's size; ``--after`` continues."""
    from l2cache_ops.runstate import failures_page, live_chunks

    cfg, ctx = _ctx(args)
    st = current_status(ctx.ledger, args.run, cfg)
    print_status(st, failures=False)
    if args.after is None:
        for r in live_chunks(ctx.ledger, args.run, limit=args.page_size):
            if r.get("state") != "d":
                since = r.get("started_at") or r.get("queued_at") or ""
                print(f"  {r.get('status', 'running'):9} chunk {r.get('coords')} since={since}")
        for f in st.failures:  # presumed lost, or chunks of split tasks that gave up
            if f["kind"] == "lost":
                print(f"  {f['status']:9} chunk {f['chunk']} lost error={f['error']}")
            elif f["kind"] == "task":
                print(
                    f"  {'failed':9} chunk {f['chunk']} never started "
                    f"attempts={f['attempts']} error={f['error']}"
                )
    page, after = failures_page(ctx.ledger, args.run, args.after, args.page_size)
    for r in page:
        kind = "permanent" if r.get("permanent") else "transient"
        print(
            f"  {r['status']:9} chunk {r.get('coords')} {kind} attempts={r.get('attempts')} "
            f"at={r.get('at')} error={r.get('error') or '-'}"
        )
    if after is not None:
        print(f"  more: l2cache runs inspect {args.dataset} {args.run} --after {after}")
    elif not page and not st.failed and not st.retrying:
        print("  no failed or retrying chunk")
    return 0 if st.failed == 0 else 1


def reconcile(args: argparse.Namespace) -> int:
    """``reconcile``: re-queue what a run has not done, under a fresh generation (names
    the queue has not seen), for a run whose tasks were lost or gave up.

    Proportional to what is missing, never to the run: the failed and retrying chunks
    (its ``fail:`` rows) and the attempts presumed lost are re-queued in tasks of
    ``--batch`` chunks, enqueued concurrently. Chunks no task ever reached (a split that
    gave up, a lost task) have no row at all; when the counters say some remain, the
    run's region is re-enqueued too, and the workers skip every done chunk by key.
    """
    from concurrent.futures import ThreadPoolExecutor

    from l2cache.domain.lineage import utc_now
    from l2cache.domain.regions import region_size
    from l2cache.gcp.tasks import (
        MAX_TASK_CHUNKS,
        enqueue_chunks,
        enqueue_region,
        enqueue_span,
        tasks_client,
    )
    from l2cache_ops.runstate import iter_failures
    from l2cache_ops.status import lost_chunks

    cfg, ctx = _ctx(args)
    if cfg.tasks is None:
        raise ValueError("the dataset map has no 'tasks' section: nowhere to enqueue")
    run = ctx.ledger.get_run(args.run)
    if run.region is None:
        raise ValueError(
            f"run {run.run_id} is a {run.kind} run (messages, no region): reconcile applies "
            "to bulk and region runs"
        )
    st = current_status(ctx.ledger, run.run_id, cfg)
    gaps = [tuple(r["coords"]) for r in iter_failures(ctx.ledger, run.run_id)]  # type: ignore[arg-type]
    gaps += lost_chunks(ctx.ledger, run.run_id, **_status_args(cfg))
    gaps = sorted(set(gaps))
    unreached = st.pending if not st.running else 0
    client = tasks_client()
    generation = "reconcile" + utc_now().strftime("%Y%m%dT%H%M%S%f")
    per_task = min(args.batch, MAX_TASK_CHUNKS)
    batches = [gaps[i : i + per_task] for i in range(0, len(gaps), per_task)]

    def enqueue(chunks: list[tuple[int, ...]]) -> str | None:
        return enqueue_chunks(client, cfg.tasks, args.dataset, run.run_id, chunks, generation)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(enqueue, batches))
    print(
        f"run {run.run_id}: re-queued {len(gaps)} failed, retrying or lost chunks "
        f"in {len(batches)} tasks"
    )
    if unreached and region_size(run.region) == run.n_chunks:  # the run's permuted order
        now_ms = int(utc_now().timestamp() * 1000)
        enqueue_span(
            client, cfg.tasks, args.dataset, run.run_id, 0, run.n_chunks, args.batch,
            generation, t0_ms=now_ms,
        )  # fmt: skip
    elif unreached:
        enqueue_region(
            client, cfg.tasks, args.dataset, run.run_id, run.region, args.batch, generation
        )
    if unreached:
        print(
            f"  and the run's region for {unreached} chunks no task reached "
            "(workers skip the done ones by key)"
        )
    return 0


def runs_command(args: argparse.Namespace) -> int:
    """``runs list|show|rollback``: the ledger's record of each run, and undoing what
    one wrote (each row back to its previous version)."""
    from .rollback_cmd import runs_rollback

    _, ctx = _ctx(args)
    if args.runs_command == "list":
        from l2cache_ops.runstate import read_counts

        runs = [r for r in list_runs(ctx.ledger) if r.dataset == args.dataset]
        if not runs:
            print(f"no runs of dataset {args.dataset}")
        for run in runs:
            c = read_counts(ctx.ledger, run.run_id)
            progress = (
                f"done={c['done']}/{run.n_chunks} failed={c['failed']}"
                if run.region is not None
                else f"events={c['events']}"
            )
            print(
                f"{run.run_id:40} {run.kind:18} {run.created_at} {progress} "
                f"params={run.params_hash} code={run.code_revision}"
            )
        return 0
    run = ctx.ledger.get_run(args.run)
    if args.runs_command == "recount":
        from l2cache_ops.runstate import recount

        fixed = recount(ctx.ledger, run)
        print(
            f"run {run.run_id}: counters "
            + (", ".join(f"{k} {v:+d}" for k, v in sorted(fixed.items())) or "were exact")
        )
        return 0
    if args.runs_command == "show":
        from dataclasses import asdict

        for k, v in asdict(run).items():
            print(f"{k:20} {v}")
        return 0
    return runs_rollback(args, config_from(args), ctx, run)
