"""Operator commands at connectome scale: wall time and peak memory against run size.

    .venv/bin/python bench/scale.py                   # 10k, 100k and 1M chunks
    .venv/bin/python bench/scale.py --sizes 10000     # one size

A synthetic minnie65-like run per size is written into the Bigtable emulator exactly
as the workers leave it (:mod:`l2cache.store.runstate`): one ``chunk:`` row per chunk
(97 % done, 1 % failed, 0.5 % retrying, 0.5 % running, 1 % never reached), the box
counters, one minute row per shard and minute over a 3-hour run, the ``fail:`` and
``live:`` rows. Before the big ones, a small run is produced through the real
``RunLedger`` calls and through the generator, and their status must agree, so the
synthetic rows are what workers write.

Each command runs in a fresh process (``python bench/scale.py --one ...``), as an
operator's CLI call would, and reports its wall time (the command only, imports
excluded: the process's wall time is reported beside it) and the process's peak RSS. Commands: ``status``, ``runs inspect`` (first
page), ``dashboard`` (and its page size), ``runs list``, ``reconcile`` (the run's
failed, retrying and lost chunks enqueued to a paused queue of the local Cloud Tasks
emulator), QC of a 1,000-chunk region, and ``runs rollback`` of a run that wrote
nothing on a table holding 400k cache rows. The growth column is the 1M figure over
the 10k one (1.0 = flat; 100 = linear in the run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SIZES = (10_000, 100_000, 1_000_000)
DATASET = "minnie_synth"
CHUNK = (256, 256, 512)
RES = (8.0, 8.0, 40.0)
BITS = {"1": 10, "2": 10, "3": 9, "4": 8}
SHAPES = {10_000: (25, 20, 20), 100_000: (50, 50, 40), 1_000_000: (100, 100, 100)}
RUN_HOURS = 3
FAMILY = "ledger"
CACHE_ROWS = 400_000
WRITE_BATCH = 5_000


def shape_for(n: int) -> tuple[int, int, int]:
    """A box of about ``n`` chunks, minnie65's aspect when not listed."""
    if n in SHAPES:
        return SHAPES[n]
    side = max(round(n ** (1 / 3)), 1)
    return side, side, max(n // (side * side), 1)


def dataset_map(tmp: Path, n: int, tasks_host: str | None) -> Path:
    """A dataset map whose geometry is given (nothing is read from storage)."""
    shape = shape_for(n)
    doc = {
        "bigtable": {"project": "bench", "instance": "bench"},
        "runs_table_id": f"runs_{n}",
        "datasets": {
            DATASET: {
                "segmentation": f"file://{tmp}/unused",
                "graph": {
                    "kind": "bigtable",
                    "project": "bench",
                    "instance": "bench",
                    "table_id": "graph_unused",
                },
                "cache_table_id": f"cache_{n}",
                "resolution": list(RES),
                "voxel_offset": [0, 0, 0],
                "chunk_size": list(CHUNK),
                "volume_size": [s * c for s, c in zip(shape, CHUNK, strict=True)],
                "spatial_bits": BITS,
            }
        },
    }
    if tasks_host:
        doc["tasks"] = {
            "project": "bench",
            "location": "local",
            "queue": "bench-queue",
            "compute_url": "http://127.0.0.1:9/unused",
            "max_attempts": 3,
            "attempt_deadline_s": 7200,  # the 1M ledger takes ~18 min to write: marks stay fresh
        }
    path = tmp / f"map_{n}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# -- the synthetic run -------------------------------------------------------------------
def synthesize(cfg_path: Path, n: int, seed: int = 0) -> str:
    """Write a run of ``n`` chunks as workers leave it; returns its run id."""
    from l2cache.compute import dataset_context
    from l2cache.config import load_config
    from l2cache.domain import ids as idlib
    from l2cache.domain.regions import region_chunks
    from l2cache.gcp.bigtable_write import Row, write_rows
    from l2cache.store import runstate
    from l2cache.store.ledger import new_run

    cfg = load_config(cfg_path)
    ctx = dataset_context(cfg, DATASET)
    shape = shape_for(n)
    region = [0, 0, 0, *shape]
    run = new_run("bulk_ingest", ctx.dataset, region, int(np.prod(shape)))
    start = datetime.now(UTC) - timedelta(hours=RUN_HOURS)
    run.created_at = start.isoformat()
    ctx.ledger.create_run(run)
    grid = run.stat_grid
    coords = np.asarray(region_chunks(region), dtype=np.int64)
    ids = idlib.chunk_id_from_coords(2, coords, ctx.dataset.spatial_bits)
    rng = np.random.default_rng(seed)
    fate = rng.choice(5, size=len(ids), p=[0.97, 0.01, 0.005, 0.005, 0.01])
    finish = start + timedelta(seconds=1) + (np.arange(len(ids)) * (RUN_HOURS * 3600 / len(ids))) * timedelta(seconds=1)  # fmt: skip
    templates = qc_templates(ctx.dataset)
    qc_json = [json.dumps(t.summary).encode() for t in templates]
    qc_shards: dict[int, dict[bytes, int]] = defaultdict(lambda: defaultdict(int))
    boxes: dict[int, dict[bytes, int]] = defaultdict(lambda: defaultdict(int))
    minutes: dict[tuple[int, int], dict[bytes, int]] = defaultdict(lambda: defaultdict(int))
    rows: list = []

    def flush(force: bool = False) -> None:
        if rows and (force or len(rows) >= WRITE_BATCH):
            write_rows(ctx.ledger.table, rows, "bench")
            rows.clear()

    for i, (cid, c, f) in enumerate(zip(ids.tolist(), coords.tolist(), fate.tolist(), strict=True)):
        if f == 4:
            continue  # never reached by any task: no row at all
        at = finish[i].isoformat()
        row = Row(b"chunk:%s:%020d" % (run.run_id.encode(), cid))
        box = boxes[runstate.cell_of(grid, c, cid)]
        minute = minutes[(runstate.minute_of(finish[i]), cid % runstate.HIST_SHARDS)]
        attempts = 1 if f == 0 else 2
        row.set_cell(FAMILY, b"attempts", struct.pack(">q", attempts))
        row.set_cell(FAMILY, b"coords", json.dumps(c).encode())
        row.set_cell(FAMILY, b"started_at", at.encode())
        box[b"attempts"] += attempts
        box[b"started"] += 1
        box[b"retried"] += attempts > 1
        if f == 0:
            qc = templates[i % len(templates)]
            l2, ms = int(qc.summary["nodes"]), int(rng.integers(800, 3000))
            row.set_cell(FAMILY, b"qc", qc_json[i % len(templates)])
            shard = qc_shards[runstate.shard_of(cid, runstate.QC_SHARDS)]
            for k, v in qc.bins.items():
                shard[k] += v
            row.set_cell(FAMILY, runstate.STATE, b"d")
            row.set_cell(FAMILY, b"status", b"done")
            row.set_cell(FAMILY, b"finished_at", at.encode())
            for name, value in (("l2_count", l2), ("duration_s", ms / 1000), ("voxels", 2**25)):
                row.set_cell(FAMILY, name.encode(), json.dumps(value).encode())
            for d in (box, minute):
                d[b"done"] += 1
                d[b"l2"] += l2
                d[b"compute_ms"] += ms
                d[b"voxels"] += 2**25
        elif f in (1, 2):
            status = "failed" if f == 1 else "retrying"
            error = "MissingInput: chunk file absent" if f == 1 else "Unavailable: Bigtable"
            fields = {"error": error, "attempts": attempts, "permanent": f == 1}
            row.set_cell(FAMILY, runstate.STATE, b"f" if f == 1 else b"r")
            row.set_cell(FAMILY, b"status", status.encode())
            row.set_cell(FAMILY, b"error", json.dumps(error).encode())
            row.set_cell(FAMILY, b"first_failed_at", at.encode())
            box[status.encode()] += 1
            minute[b"failed" if f == 1 else b"retried"] += 1
            rows.append(runstate.failure_row(run.run_id, cid, status, c, at, fields))
        else:  # running now
            box[b"inflight"] += 1
            row.set_cell(FAMILY, b"status", b"running")
            now = datetime.now(UTC).isoformat()
            rows.append(runstate.live_row(run.run_id, cid, "running", c, now, 1))
        rows.append(row)
        flush()
    flush(force=True)
    counts = {runstate.stat_key(run.run_id, cell): a for cell, a in boxes.items()}
    counts |= {runstate.hist_key(run.run_id, m, sh): a for (m, sh), a in minutes.items()}
    counts |= {runstate.qc_key(run.run_id, sh): a for sh, a in qc_shards.items()}
    counters = [r for key, a in counts.items() if (r := runstate.counts_row(key, a))]
    for i in range(0, len(counters), 500):
        write_rows(ctx.ledger.table, counters[i : i + 500], "bench")
    return run.run_id


def qc_templates(dataset: object, n: int = 8, seed: int = 1) -> list:
    """A few chunks' QC statistics (``l2cache.engine.chunk_qc``) of plausible random
    features; each synthetic done chunk carries one, as a worker would record it."""
    from l2cache.engine.chunk_qc import chunk_qc

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(200, 2000))
        pca = rng.normal(size=(k, 3, 3)).astype("<f2")
        feats = {
            "l2id": np.arange(1, k + 1, dtype=np.uint64),
            "size_nm3": rng.lognormal(8, 2, k).clip(1, 2**25).astype("<u4"),
            "area_nm2": rng.lognormal(12, 2, k).clip(0, 2**32 - 1).astype("<u4"),
            "max_dt_nm": rng.lognormal(5, 1, k).clip(0, 65535).astype("<u2"),
            "mean_dt_nm": rng.lognormal(4, 1, k).astype("<f2"),
            "rep_coord_nm": rng.integers(0, 256, size=(k, 3)).astype("<u2"),
            "chunk_intersect_count": rng.integers(0, 300, size=(k, 2, 3)).astype("<u2"),
            "pca": pca,
            "pca_val": rng.lognormal(5, 1, size=(k, 3)).astype("<f4"),
        }
        out.append(chunk_qc(feats, dataset, graph_l2=k))
    return out


def cache_rows(cfg_path: Path, n_rows: int) -> None:
    """``n_rows`` cache rows written by some other run (what a rollback must not scan)."""
    from l2cache.compute import dataset_context
    from l2cache.config import load_config
    from l2cache.gcp.bigtable_write import Row, write_rows

    ctx = dataset_context(load_config(cfg_path), DATASET)
    when = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(n_rows):
        r = Row(b"%020d" % (2**58 + i * 7))
        r.set_cell("0", b"size_nm3", struct.pack("<f", 1.0), when)
        rows.append(r)
        if len(rows) >= WRITE_BATCH:
            write_rows(ctx.store.table, rows, "bench")
            rows.clear()
    if rows:
        write_rows(ctx.store.table, rows, "bench")


# -- one measured command (child process) --------------------------------------------------
def one(command: str, cfg: str, run_id: str, extra: list[str]) -> dict:
    """Run one CLI command in this process; wall time of the call and peak RSS."""
    from l2cache_tools.cli import build_parser
    from l2cache_tools.cli import main as cli

    build_parser()  # the CLI's imports (Bigtable client, numpy...): timed apart, per process

    argv = {
        "status": ["status", DATASET, run_id],
        "inspect": ["runs", "inspect", DATASET, run_id],
        "list": ["runs", "list", DATASET],
        "dashboard": ["dashboard", DATASET, "--out", extra[0] if extra else "dash.html"],
        "reconcile": ["reconcile", DATASET, run_id],
        "rollback": ["runs", "rollback", DATASET, run_id, "--yes"],
        "qc": ["qc", DATASET, run_id, "--region", *extra],
    }[command]
    out = io.StringIO()
    profile = None
    if os.environ.get("BENCH_PROFILE"):  # where a command's time goes, on stderr
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = cli([*argv, "--config", cfg])
    seconds = time.perf_counter() - t
    if profile is not None:
        import pstats

        profile.disable()
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    rss = peak_rss_mib()
    text = out.getvalue()
    result = {"seconds": seconds, "rss_mib": rss, "code": code, "lines": text.count("\n")}
    if command == "reconcile":
        result["enqueued"] = sum(int(w) for w in re.findall(r"re-queued (\d+)", text))
    return result


def peak_rss_mib() -> float:
    """This process's peak RSS since exec (``VmHWM``; ``ru_maxrss`` would also count the
    parent's pages copied at fork, the synthetic ledger's builder)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(command: str, cfg: Path, run_id: str, extra: list[str] | None = None) -> dict:
    """:func:`one` in a fresh interpreter, as the operator's shell would run it."""
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--one", command, str(cfg), run_id, *(extra or [])],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{proc.stderr[-3000:]}")
    if os.environ.get("BENCH_PROFILE"):
        print(proc.stderr[-6000:], file=sys.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t  # what the operator waits, imports included
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        command, cfg, run_id, *extra = args.one
        print(json.dumps(one(command, cfg, run_id, extra)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    return run(sizes)


def run(sizes: list[int]) -> int:
    from l2cache.gcp.bigtable import bigtable_instance
    from l2cache.store.cache import create_cache_table
    from l2cache.store.ledger import create_runs_table
    from l2cache_tools.local.emulators import free_port, start_bigtable_emulator, wait_for_port

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        emu = start_bigtable_emulator(log_dir=tmp)
        os.environ.update(emu.env)
        port = free_port()
        tasks = subprocess.Popen(
            [sys.executable, "-m", "l2cache_tools.local.tasks_emulator", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, 30, tasks)
            os.environ["L2CACHE_TASKS_EMULATOR_HOST"] = f"127.0.0.1:{port}"
            instance = bigtable_instance("bench", "bench", admin=True)
            results: dict[int, dict[str, dict]] = {}
            for n in sizes:
                cfg = dataset_map(tmp, n, f"127.0.0.1:{port}")
                create_runs_table(instance, f"runs_{n}")
                create_cache_table(instance, f"cache_{n}")
                _queue(cfg)
                t = time.perf_counter()
                run_id = synthesize(cfg, n)
                empty = synthesize_empty(cfg)
                write_s = time.perf_counter() - t
                cache_rows(cfg, CACHE_ROWS if n == sizes[-1] else 10_000)
                print(f"# {n:,} chunks: synthetic run {run_id} written in {write_s:.0f}s")
                res = results[n] = {}
                res["status"] = measure("status", cfg, run_id)
                res["inspect"] = measure("inspect", cfg, run_id)
                res["list"] = measure("list", cfg, run_id)
                page = ROOT / "build" / "bench" / f"dashboard_{n}.html"  # kept to look at
                res["dashboard"] = measure("dashboard", cfg, run_id, [str(page)])
                res["dashboard"]["bytes"] = page.stat().st_size
                res["reconcile"] = measure("reconcile", cfg, run_id)
                res["rollback (empty run)"] = measure("rollback", cfg, empty)
                res["QC of 1,000-chunk region"] = measure("qc", cfg, run_id, ["0,0,0,10,10,10"])
                for name, r in res.items():
                    extra = f" page {r['bytes'] / 1e6:.2f} MB" if "bytes" in r else ""
                    extra += f" {r['enqueued']:,} chunks enqueued" if "enqueued" in r else ""
                    print(
                        f"  {name:26} {r['seconds']:7.2f} s {r['rss_mib']:7.0f} MiB "
                        f"(process {r['process_s']:.1f} s){extra}"
                    )
            _table(results, sizes)
        finally:
            tasks.terminate()
            emu.stop()
    return 0


def synthesize_empty(cfg_path: Path) -> str:
    """A run recorded but never started: what a rollback of nothing costs."""
    from l2cache.compute import dataset_context
    from l2cache.config import load_config
    from l2cache.store.ledger import new_run

    ctx = dataset_context(load_config(cfg_path), DATASET)
    run = new_run("region_reprocess", ctx.dataset, [0, 0, 0, 2, 2, 2], 8)
    ctx.ledger.create_run(run)
    return run.run_id


def _queue(cfg_path: Path) -> None:
    """The map's queue, paused: reconcile's tasks are enqueued and counted, not run."""
    from google.cloud import tasks_v2

    from l2cache.config import load_config
    from l2cache.gcp.tasks import ensure_queue, queue_path, tasks_client

    cfg = load_config(cfg_path)
    client = tasks_client()
    with contextlib.suppress(Exception):
        ensure_queue(client, cfg.tasks)
    client.pause_queue(name=queue_path(client, cfg.tasks))
    del tasks_v2


def _table(results: dict[int, dict[str, dict]], sizes: list[int]) -> None:
    print()
    print("| command | " + " | ".join(f"{n:,} chunks" for n in sizes) + " | growth |")
    print("|---|" + "---|" * len(sizes) + "---|")
    for name in results[sizes[0]]:
        cells = []
        for n in sizes:
            r = results[n][name]
            extra = f", {r['bytes'] / 1e6:.2f} MB" if "bytes" in r else ""
            extra += f", {r['enqueued']:,} chunks" if "enqueued" in r else ""
            cells.append(f"{r['seconds']:.2f} s / {r['rss_mib']:.0f} MiB{extra}")
        first, last = results[sizes[0]][name]["seconds"], results[sizes[-1]][name]["seconds"]
        print(f"| {name} | " + " | ".join(cells) + f" | x{last / first:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
