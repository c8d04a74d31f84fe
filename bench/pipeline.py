"""Local-stack ingest throughput and edit recompute cost, each against its in-process baseline.

    .venv/bin/python bench/pipeline.py [--workers 2] [--rounds 3]

1. Ingest: the single-process rate (read chunk + graph + engine + write, one chunk after
   another in this process) against the local stack's rate through Cloud Tasks and
   ``workers`` compute_chunk processes, on the same 64 chunks of real pinky40 data.
2. Edits: recomputing k = 1, 5, 20 new L2 ids of one chunk (one chunk read, ``only=``)
   against computing that whole chunk, in process; and the end-to-end latency from
   publishing PCG's edit message to the rows being readable through the lookup.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import crackle
import numpy as np
import requests
from google.cloud import pubsub_v1

from l2cache.compute import compute_chunk, compute_l2_ids, dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.domain.regions import region_chunks
from l2cache.engine.features import compute_features
from l2cache.store.ledger import new_run
from l2cache_ops.ingest import start_ingest
from l2cache_ops.ledger import chunk_rows
from l2cache_ops.status import run_status
from l2cache_tools.cli.dataset_cmd import build_into_config
from l2cache_tools.dataset.edits import edit_message, split_for_new_ids
from l2cache_tools.local.stack import EDITS_TOPIC, PROJECT, LocalStack

ROOT = Path(__file__).resolve().parents[1]
NAME = "pinky40_bench"


def wait(pred, timeout, poll=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(poll)
    raise TimeoutError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="paired single/stack rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp), args.workers) as stack:
        volume = crackle.load(str(ROOT / "data" / "pinky40" / "pinky40_512.ckl.gz"))
        build_into_config(
            stack.config_path, NAME, volume, Path(tmp) / "sv", (16, 16, 40), (128, 128, 128)
        )
        del volume
        config = load_config(stack.config_path)
        ctx = dataset_context(config, NAME)
        chunks = region_chunks([0, 0, 0, 4, 4, 4])

        # 1. single process (in this process, sequential) vs 2. the local stack through
        # Cloud Tasks, in paired rounds so the machine's load hits both sides of a ratio
        # alike (the first stack run only warms the workers). The stack's end is the
        # last chunk's finished_at in the ledger, polled every half second: a tight
        # status loop would take CPU from the workers it measures.
        def single_rate() -> float:
            run = new_run("region_reprocess", ctx.dataset, [0, 0, 0, 4, 4, 4], len(chunks))
            ctx.ledger.create_run(run)
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its JSON log lines
                for c in chunks:
                    compute_chunk(ctx, run, c)
            return len(chunks) / (time.perf_counter() - t)

        def stack_rate() -> float:
            started = datetime.now(UTC)
            run = start_ingest(config, NAME, batch=2)
            wait(lambda r=run: run_status(ctx.ledger, r.run_id).finished, 600, poll=0.5)
            rows = chunk_rows(ctx.ledger, run.run_id)
            assert sum(r["status"] == "done" for r in rows) == len(chunks)
            last = max(datetime.fromisoformat(r["finished_at"]) for r in rows)
            return len(chunks) / (last - started).total_seconds()

        warm = new_run("region_reprocess", ctx.dataset, [0, 0, 0, 1, 1, 1], 1)
        ctx.ledger.create_run(warm)
        with contextlib.redirect_stdout(io.StringIO()):
            compute_chunk(ctx, warm, chunks[0])  # warm this process's kernels
        cold = stack_rate()
        rounds = []
        for _ in range(args.rounds):
            single, stacked = single_rate(), stack_rate()
            rounds.append((stacked / (args.workers * single), single, stacked))
        rounds.sort()
        ratio, single, stacked = rounds[len(rounds) // 2]
        voxels = 512**3
        print(
            f"# ingest: 64 chunks of 128^3 voxels, real pinky40 data, batch 2; paired rounds "
            f"(single then stack), median of {args.rounds}"
        )
        print(
            f"single process (in-process, sequential): {single:.2f} chunks/s "
            f"({single * voxels / len(chunks) / 1e6:.1f} Mvoxel/s)"
        )
        print(
            f"local stack, {args.workers} workers via Cloud Tasks: {stacked:.2f} chunks/s "
            f"({stacked * voxels / len(chunks) / 1e6:.1f} Mvoxel/s); cold first run "
            f"{cold:.2f} chunks/s"
        )
        print(
            f"ratio stack / (workers x single) = {ratio:.2f} (rounds: "
            f"{', '.join(f'{r[0]:.2f}' for r in rounds)})"
        )

        # 3. edits: k new ids in one chunk
        chunk = [1, 2, 1]
        graph = stack_graph(ctx)
        edits = new_run("edit_stream", ctx.dataset)
        ctx.ledger.create_run(edits)
        pub = pubsub_v1.PublisherClient()
        topic = pub.topic_path(PROJECT, EDITS_TOPIC)
        lookup = f"{stack.urls['lookup']}/l2cache/api/v1/table/{NAME}/attributes"
        print("\n# edit recompute: k new L2 ids in one chunk (128^3)")
        print(
            f"{'k':>3} {'ids_s':>7} {'chunk_s':>8} {'ratio':>6} {'reads':>6} {'publish->readable_s':>20}"
        )
        used: set[int] = set()
        warm = load_chunk_l2(ctx, chunk, None).labels
        compute_l2_ids(ctx, np.unique(warm[warm > 0])[:1], None, edits)  # warm the only= path
        for k in (1, 5, 20):
            new_ids, result = split_for_new_ids(graph, ctx.dataset, chunk, k, used)
            # end to end: PCG's message naming the k new ids -> rows readable via lookup
            payload, attrs = edit_message(NAME, replace(result, new_l2_ids=new_ids))
            t = time.perf_counter()
            pub.publish(topic, payload, **attrs).result(timeout=30)
            wait(
                lambda ids=new_ids: all(
                    requests.post(
                        lookup,
                        json={"l2_ids": ids.tolist()},
                        params={"update_cache": "false"},
                        timeout=30,
                    )
                    .json()
                    .values()
                ),
                60,
            )
            latency = time.perf_counter() - t
            # in process: the k ids (one chunk read, only=) vs the whole chunk
            t = time.perf_counter()
            res = compute_l2_ids(ctx, new_ids, None, edits)
            part = time.perf_counter() - t
            t = time.perf_counter()
            data = load_chunk_l2(ctx, chunk, None)
            full = compute_features(data.dense, ctx.dataset.resolution)
            ctx.store.write_features(full, edits.lineage(data.checksum))
            whole = time.perf_counter() - t
            print(
                f"{k:>3} {part:>7.3f} {whole:>8.3f} {part / whole:>6.2f} "
                f"{res['chunks_read']:>6} {latency:>20.2f}"
            )
    return 0


def stack_graph(ctx):
    from l2cache.gcp.bigtable import bigtable_instance

    g = ctx.dataset.graph
    return bigtable_instance(g.project, g.instance).table(g.table_id)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
