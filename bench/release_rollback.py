"""Region rollback of a release against the ingest of that region, and QC's cost.

    .venv/bin/python bench/release_rollback.py

On the Bigtable emulator with the vendored pinky40 512^3 cutout in 128^3 chunks (64
chunks, ~12,000 L2 nodes): two bulk runs computed in this process (the worker's own
``compute_chunk``: read chunk + graph + engine + write, timed per chunk), each QC'd and
promoted (releases 1 and 2). Then release 2 is rolled back in three disjoint regions
(1, 8 and 16 chunks): each rollback is timed end to end (release history, the key-range
scan of the region's chunks, the deletes, the release record) and compared with the
ingest time of the same chunks. For scale, the whole-table lineage scan that
``runs rollback`` uses (every row of the table read through the value filter) is timed
once as well.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import crackle
import numpy as np
import yaml

from l2cache.compute import compute_chunk, dataset_context
from l2cache.config import load_config
from l2cache.domain.regions import region_chunks
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import create_runs_table, new_run
from l2cache_ops.qc import run_qc
from l2cache_ops.qc_reports import chunk_ids_of, save_report
from l2cache_ops.releases import promote, rollback_release
from l2cache_ops.rollback import chunk_key_ranges, run_versions, versions_in_ranges
from l2cache_ops.settings import qc_thresholds
from l2cache_tools.dataset import build_dataset
from l2cache_tools.local.emulators import start_bigtable_emulator

ROOT = Path(__file__).resolve().parents[1]
NAME = "pinky40_rb"
CHUNK = (128, 128, 128)
RES = (16.0, 16.0, 40.0)
REGIONS = {  # chunk boxes, disjoint
    "1 chunk": [0, 0, 0, 1, 1, 1],
    "8 chunks": [2, 2, 2, 4, 4, 4],
    "16 chunks": [0, 0, 2, 4, 2, 4],
}


def bulk(ctx):
    run = new_run("bulk_ingest", ctx.dataset, [0, 0, 0, 4, 4, 4], 64)
    ctx.ledger.create_run(run)
    seconds = {}
    for c in region_chunks(run.region):
        t = time.perf_counter()
        assert compute_chunk(ctx, run, c)["status"] == "done"
        seconds[tuple(c)] = time.perf_counter() - t
    time.sleep(0.002)
    return run, seconds


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        emu = start_bigtable_emulator(log_dir=Path(tmp))
        os.environ.update(emu.env)
        try:
            return run(Path(tmp))
        finally:
            emu.stop()


def run(tmp: Path) -> int:
    instance = bigtable_instance("bench", "bench", admin=True)
    volume = crackle.load(str(ROOT / "data" / "pinky40" / "pinky40_512.ckl.gz"))
    built = build_dataset(volume, f"file://{tmp}/sv", RES, CHUNK, instance, NAME)
    del volume
    create_cache_table(instance, f"l2cache_{NAME}")
    create_runs_table(instance, "runs")
    path = tmp / "datasets.yaml"
    graph = {"kind": "bigtable", "project": "bench", "instance": "bench", "table_id": NAME}
    path.write_text(
        yaml.safe_dump(
            {
                "bigtable": {"project": "bench", "instance": "bench"},
                "runs_table_id": "runs",
                "datasets": {
                    NAME: {
                        "segmentation": built.segmentation,
                        "graph": graph,
                        "cache_table_id": f"l2cache_{NAME}",
                    }
                },
            }
        )
    )
    config = load_config(path)
    ctx = dataset_context(config, NAME)
    compute_chunk(ctx, new_run("bulk_ingest", ctx.dataset, [0, 0, 0, 1, 1, 1], 1), [0, 0, 0])
    print(f"# {built.n_chunks} chunks of {CHUNK}, {built.n_l2} L2 nodes (pinky40, emulator)")
    ingest = {}
    for label in ("A", "B"):
        r, ingest[label] = bulk(ctx)
        t = time.perf_counter()
        report = run_qc(ctx, r.run_id, qc_thresholds(config, NAME))
        qc_s = time.perf_counter() - t
        save_report(ctx.ledger, report)
        assert report["passed"], report["reasons"]
        rel = promote(ctx.ledger, NAME, r.run_id)["release"]
        print(
            f"run {label}: ingest {sum(ingest[label].values()):.1f}s (64 chunks, one process); "
            f"QC {qc_s:.2f}s ({report['coverage']['rows_written']} rows, coverage "
            f"{report['coverage']['ratio']}); release {rel}"
        )
    run_b = r
    t = time.perf_counter()
    every = run_versions(ctx.store.table, run_b.run_id)
    full_scan = time.perf_counter() - t
    print(
        f"whole-table lineage scan (runs rollback's selection): {len(every)} rows, {full_scan:.3f}s"
    )
    print(
        f"{'region':10} {'rows':>6} {'ranges':>6} {'scan_s':>7} {'rollback_s':>10} "
        f"{'ingest_s':>9} {'ratio':>7}"
    )
    cs, off = np.asarray(CHUNK), np.asarray(ctx.dataset.voxel_offset)
    for name, box in REGIONS.items():
        bbox = [*(off + cs * np.asarray(box[:3])), *(off + cs * np.asarray(box[3:]))]
        bits = ctx.dataset.spatial_bits
        ranges = chunk_key_ranges(chunk_ids_of(np.asarray(region_chunks(box)), bits), bits)
        t = time.perf_counter()
        versions_in_ranges(ctx.store.table, [run_b.run_id], ranges)  # the read alone
        scan_s = time.perf_counter() - t
        t = time.perf_counter()
        done = rollback_release(ctx, [int(v) for v in bbox])
        seconds = time.perf_counter() - t
        ingest_s = sum(ingest["B"][tuple(c)] for c in region_chunks(box))
        print(
            f"{name:10} {done['rows_touched']:>6} {done['ranges']:>6} {scan_s:>7.3f} {seconds:>10.3f} "
            f"{ingest_s:>9.2f} {seconds / ingest_s:>7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
