"""Rollback cost: proportional to what a run touched vs the whole-table lineage scan.

    .venv/bin/python bench/rollback_scale.py [--rows 400000] [--chunks 1000] [--no-full-scan]

On the Bigtable emulator: a synthetic cache table of ``--rows`` rows (one base run, 1,000
rows per chunk, every attribute and lineage column as a worker writes them) with its
ledger rows, then two runs to roll back:

- ``idle``: a run that wrote nothing (its ledger has no started chunk);
- ``wide``: a run that wrote ``--chunks`` chunks (10 rows each, over the base run's
  chunks and beyond), each with a done ledger row.

Each is rolled back by :func:`l2cache_ops.rollback.rollback_run_touched` (dry run, then
for real) and, side by side, selected by the old whole-table scan
(:func:`l2cache_ops.rollback.run_versions`'s read alone, with a 30 min deadline instead of
60 s: what ``runs rollback`` cost before). The figures are wall times of this process on the emulator; the scale bench
(``bench/scale.py``) calls :func:`build_table` and :func:`measure` the same way.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for sub in ("shared", "ops", "tools"):
    sys.path.insert(0, str(ROOT / sub))

from l2cache.config import DatasetConfig, parse_config  # noqa: E402
from l2cache.domain import ids  # noqa: E402
from l2cache.domain.attributes import ATTRIBUTES, FEATURE_FAMILY, LINEAGE_FAMILY  # noqa: E402
from l2cache.gcp.bigtable import CellFilter, RowReader  # noqa: E402
from l2cache.gcp.bigtable_write import Row, write_rows  # noqa: E402
from l2cache.store.ledger import LEDGER_FAMILY, RunLedger, RunRecord, new_run  # noqa: E402
from l2cache_ops.rollback import rollback_run_touched  # noqa: E402

BENCH_DATASET = {
    "segmentation": "file:///nonexistent",
    "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "rbbench"},
    "cache_table_id": "cache_rbbench",
    "resolution": [8, 8, 40],
    "chunk_size": [256, 256, 512],
    "voxel_offset": [0, 0, 0],
    "volume_size": [65536, 65536, 16384],
    "spatial_bits": {1: 10, 2: 10, 3: 9},
}


def bench_dataset() -> DatasetConfig:
    """The synthetic dataset's geometry (no segmentation is read)."""
    cfg = {"bigtable": {"project": "p", "instance": "i"}, "datasets": {"rbbench": BENCH_DATASET}}
    return parse_config(cfg).dataset("rbbench")


def _chunk_coords(i: int) -> tuple[int, int, int]:
    return (i % 64, (i // 64) % 64, i // 4096)


def write_run(
    cache_table: Any,
    ledger: RunLedger,
    ds: DatasetConfig,
    run: RunRecord,
    chunks: range,
    rows_per_chunk: int,
) -> int:
    """Write ``rows_per_chunk`` rows of ``run`` in each chunk index of ``chunks`` (cache
    cells at the run's timestamp and a done ledger row per chunk); returns rows written."""
    at = datetime.fromtimestamp(run.cell_timestamp_ms / 1000, tz=UTC)
    segs = np.arange(1, rows_per_chunk + 1, dtype=np.uint64)
    lineage = ((b"run", run.run_id.encode()), (b"params", b"p"), (b"code", b"c"), (b"input", b"i"))
    value = b"\x00" * 12
    written, rows, marks = 0, [], []
    for i in chunks:
        coords = _chunk_coords(i)
        cid = int(ids.chunk_id_from_coords(2, np.asarray([coords]), ds.spatial_bits)[0])
        for node in ids.encode_ids(2, np.tile(coords, (rows_per_chunk, 1)), segs, ds.spatial_bits):
            row = Row(b"%020d" % int(node))
            for a in ATTRIBUTES:
                row.set_cell(FEATURE_FAMILY, a.key, value, at)
            for col, v in lineage:
                row.set_cell(LINEAGE_FAMILY, col, v, at)
            rows.append(row)
        mark = Row(b"chunk:%s:%020d" % (run.run_id.encode(), cid))
        mark.set_cell(LEDGER_FAMILY, b"status", b"done")
        mark.set_cell(LEDGER_FAMILY, b"attempts", struct.pack(">q", 1))
        mark.set_cell(LEDGER_FAMILY, b"l2_count", json.dumps(rows_per_chunk).encode())
        marks.append(mark)
        if len(rows) >= 20_000:
            written += write_rows(cache_table, rows, "bench")
            write_rows(ledger.table, marks, "bench")
            rows, marks = [], []
    written += write_rows(cache_table, rows, "bench")
    write_rows(ledger.table, marks, "bench")
    return written


def build_table(
    cache_table: Any, ledger: RunLedger, ds: DatasetConfig, rows: int, wide_chunks: int
) -> dict[str, RunRecord]:
    """A cache table of ``rows`` base rows (1,000 per chunk) plus the ``idle`` run (wrote
    nothing) and the ``wide`` run (``wide_chunks`` chunks of 10 rows, a later version
    over the base run's chunks and beyond). Returns the three runs by name."""
    base = new_run("bulk_ingest", ds, [0, 0, 0, 64, 64, 4], rows // 1000)
    base.cell_timestamp_ms -= 60_000
    idle = new_run("bulk_ingest", ds, [0, 0, 0, 64, 64, 4], 0)
    wide = new_run("region_reprocess", ds, [0, 0, 0, 64, 64, 4], wide_chunks)
    wide.cell_timestamp_ms += 1_000
    for run in (base, idle, wide):
        ledger.create_run(run)
    write_run(cache_table, ledger, ds, base, range(rows // 1000), 1000)
    write_run(cache_table, ledger, ds, wide, range(wide_chunks), 10)
    return {"base": base, "idle": idle, "wide": wide}


def measure(
    cache_table: Any,
    ledger: RunLedger,
    ds: DatasetConfig,
    run: RunRecord,
    full_scan: bool = True,
) -> dict[str, Any]:
    """Time the proportional rollback of ``run`` (dry, then real) and, with ``full_scan``,
    the old whole-table selection of the same versions (the read alone)."""
    out: dict[str, Any] = {"run": run.run_id}
    for dry in (True, False):
        t = time.perf_counter()
        done = rollback_run_touched(
            cache_table, ledger, run, ds.spatial_bits, dry_run=dry, fan_out_chunks=10**9
        )
        name = "dry_run" if dry else "rollback"
        out[f"{name}_s"] = round(time.perf_counter() - t, 3)
        out[f"{name}_versions"] = done.deleted.versions_deleted
        out[f"{name}_ledger_reads"] = done.ledger_requests
        out[f"{name}_ranges"] = done.deleted.ranges
    if full_scan:
        # run_versions' read with a long deadline: on a loaded emulator a scan that
        # returns nothing for 60 s fails with DEADLINE_EXCEEDED (no progress to resume)
        cells = CellFilter(
            columns={LINEAGE_FAMILY: [b"run"]}, values=[run.run_id.encode()], strip_values=True
        )
        t = time.perf_counter()
        found = RowReader(cache_table, deadline_s=1800).versions(cells=cells)
        out["full_scan_s"] = round(time.perf_counter() - t, 3)
        out["full_scan_rows"] = len(found)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--chunks", type=int, default=1_000)
    parser.add_argument("--no-full-scan", action="store_true")
    args = parser.parse_args()

    from l2cache.gcp.bigtable import bigtable_instance
    from l2cache.store.cache import create_cache_table
    from l2cache.store.ledger import create_runs_table
    from l2cache_tools.local.emulators import start_bigtable_emulator

    emu = start_bigtable_emulator()
    try:
        import os

        os.environ.update(emu.env)
        instance = bigtable_instance("p", "i", admin=True)
        cache = create_cache_table(instance, "cache_rbbench")
        ledger = RunLedger(create_runs_table(instance, "runs_rbbench"))
        ds = bench_dataset()
        t = time.perf_counter()
        runs = build_table(cache, ledger, ds, args.rows, args.chunks)
        print(
            f"built {args.rows} base rows + {args.chunks} chunks x 10 rows in "
            f"{time.perf_counter() - t:.1f}s"
        )
        for name in ("idle", "wide"):
            result = measure(cache, ledger, ds, runs[name], not args.no_full_scan)
            print(name, json.dumps(result))
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
