"""Where QC reports live: small summary rows of the runs table, never per-chunk tables.

A run's report (the one ``release promote`` reads) is JSON in column ``report`` of the
row ``qc:<run>``; a region's report in ``qcregion:<run>:<x0-y0-z0-x1-y1-z1>``, so checking
a region never passes for a whole run. A report is a bounded summary (counts,
distributions, verdicts, a few examples: :data:`MAX_REPORT_BYTES` at most); the per-chunk
figures stay where the worker wrote them, in each chunk's ledger row (column ``qc``), and
the run's histogram in its ``qchist:`` counter rows. Reports stored before this layout
also have ``chunks:<part>`` cells: they are never read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from l2cache.domain import ids as idlib
from l2cache.domain.ids import SpatialBits
from l2cache.gcp.bigtable import CellFilter, read_row
from l2cache.store.ledger import RUN_FAMILY, RunLedger
from l2cache_ops.ledger import put_record

BATCH_KINDS = ("bulk_ingest", "region_reprocess")  # the run kinds QC checks and releases hold
QC_PREFIX = "qc:"
REGION_PREFIX = "qcregion:"
MAX_REPORT_BYTES = 512 * 1024  # a report is a summary: far below any cell or row limit


def chunk_ids_of(coords: np.ndarray, spatial_bits: SpatialBits, layer: int = 2) -> np.ndarray:
    """The chunk ids of ``coords`` (rows of x, y, z) at ``layer``."""
    return idlib.chunk_id_from_coords(layer, np.asarray(coords, dtype=np.int64), spatial_bits)


def report_key(run_id: str, region: Sequence[int] | None = None) -> str:
    """The row of a run's report, or of a region report (``region``: its chunk box)."""
    if region is None:
        return f"{QC_PREFIX}{run_id}"
    return f"{REGION_PREFIX}{run_id}:{'-'.join(str(int(v)) for v in region)}"


def save_report(ledger: RunLedger, report: dict[str, Any]) -> str:
    """Store a report (run scope under ``qc:<run>``, region scope under ``qcregion:``);
    returns the row key. Refuses a report over :data:`MAX_REPORT_BYTES`: that would be a
    per-chunk table, which belongs in the chunk rows."""
    scope = report.get("scope") or {"kind": "run"}
    key = report_key(report["run_id"], None if scope["kind"] == "run" else scope["region"])
    body = json.dumps(report).encode()
    if len(body) > MAX_REPORT_BYTES:
        raise ValueError(
            f"QC report of {report['run_id']} is {len(body)} bytes (limit {MAX_REPORT_BYTES}): "
            "a report is a summary, per-chunk figures stay in the chunk rows"
        )
    put_record(ledger, key, {"report": body})
    return key


def load_report(
    ledger: RunLedger,
    run_id: str,
    with_chunks: bool = False,
    region: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """The stored QC report of a run (or of one of its regions), None if there is none.

    Reads only the ``report`` cell. ``with_chunks`` is accepted for older callers and
    ignored: reports no longer carry a per-chunk table.
    """
    del with_chunks
    cells = CellFilter(columns={RUN_FAMILY: [b"report"]}, per_column=1)
    row = read_row(ledger.table, report_key(run_id, region).encode(), cells)
    body = None if row is None else row.get(RUN_FAMILY, {}).get(b"report")
    if body is None:
        return None
    report = json.loads(body)
    report.pop("chunk_parts", None)  # a report stored by the per-chunk-table layout
    return report
