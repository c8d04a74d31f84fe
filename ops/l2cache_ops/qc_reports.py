"""Where QC reports live: the runs table's ``qc:<run>`` record.

The summary is JSON in ``report``; the per-chunk table is columnar JSON, zstd, in
``chunks:<part>`` cells of at most :data:`CHUNKS_PER_CELL` chunks each.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import zstandard

from l2cache.domain import ids as idlib
from l2cache.domain.ids import SpatialBits
from l2cache.store.ledger import RunLedger
from l2cache_ops.ledger import get_record, put_record

BATCH_KINDS = ("bulk_ingest", "region_reprocess")  # the run kinds QC checks and releases hold
QC_PREFIX = "qc:"
CHUNKS_PER_CELL = 20_000


def chunk_ids_of(coords: np.ndarray, spatial_bits: SpatialBits, layer: int = 2) -> np.ndarray:
    """The chunk ids of ``coords`` (rows of x, y, z) at ``layer``."""
    return idlib.chunk_id_from_coords(layer, np.asarray(coords, dtype=np.int64), spatial_bits)


def save_report(ledger: RunLedger, report: dict[str, Any]) -> None:
    """Store a report under ``qc:<run>`` (summary JSON + per-chunk table in parts)."""
    chunks = report["chunks"]
    n = len(chunks["chunk_id"])
    starts = range(0, max(n, 1), CHUNKS_PER_CELL)
    summary = {k: v for k, v in report.items() if k != "chunks"}
    columns = {"report": json.dumps({**summary, "chunk_parts": len(starts)}).encode()}
    cctx = zstandard.ZstdCompressor(level=6)
    for part, start in enumerate(starts):
        piece = {k: v[start : start + CHUNKS_PER_CELL] for k, v in chunks.items()}
        columns[f"chunks:{part:06d}"] = cctx.compress(json.dumps(piece).encode())
    put_record(ledger, f"{QC_PREFIX}{report['run_id']}", columns)


def load_report(ledger: RunLedger, run_id: str, with_chunks: bool = True) -> dict[str, Any] | None:
    """The stored QC report of a run (JSON-able), None if QC never ran for it."""
    cells = get_record(ledger, f"{QC_PREFIX}{run_id}")
    if not cells or "report" not in cells:
        return None
    report = json.loads(cells["report"])
    parts = report.pop("chunk_parts", 0)
    if with_chunks:
        dctx = zstandard.ZstdDecompressor()
        table: dict[str, list[Any]] = {}
        for part in range(parts):
            for key, values in json.loads(dctx.decompress(cells[f"chunks:{part:06d}"])).items():
                table.setdefault(key, []).extend(values)
        report["chunks"] = table
    return report
