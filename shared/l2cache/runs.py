"""The runs table: one row per run, one ledger row per chunk, one per edit message.

Every write to the cache belongs to a run (bulk ingest, region reprocess, edit stream,
missing-id recompute). The run row records what produced the values (code revision,
parameter set and hash, segmentation, graph and its snapshot time, region, trigger);
the ledger rows record what happened to each chunk (done / failed, attempts, error,
L2 count, input checksum, duration). Status, resume, reconcile, rollback and cost
estimates all read this table and nothing else.

Row keys: ``run:<run_id>``, ``chunk:<run_id>:<chunk_id %020d>``,
``event:<run_id>:<message id>``.
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.cloud.bigtable import column_family
from google.cloud.bigtable.row_set import RowSet

from .lineage import Lineage, code_revision, params_hash, utc_now

RUN_FAMILY = "run"
LEDGER_FAMILY = "ledger"
DEFAULT_RUNS_TABLE = "l2cache_runs"


@dataclass
class RunRecord:
    """What a run is: enough to reproduce or roll back everything it wrote."""

    run_id: str
    kind: str  # bulk_ingest | region_reprocess | edit_stream | missing_ids
    dataset: str
    segmentation: str
    graph: str
    snapshot_timestamp: str  # ISO time the graph is read at ("now" for edit streams)
    cell_timestamp_ms: int  # every cell this run writes carries this version
    params: dict[str, Any]
    params_hash: str
    code_revision: str
    region: list[int] | None = None  # chunk box x0,y0,z0,x1,y1,z1 (exclusive end)
    n_chunks: int = 0
    trigger: str = "cli"
    created_at: str = field(default_factory=lambda: utc_now().isoformat())

    def lineage(self, input_checksum: str = "", cell_timestamp: datetime | None = None) -> Lineage:
        ts = cell_timestamp or datetime.fromtimestamp(self.cell_timestamp_ms / 1000, tz=UTC)
        return Lineage(self.run_id, self.params_hash, self.code_revision, input_checksum, ts)

    @property
    def snapshot(self) -> datetime:
        return datetime.fromisoformat(self.snapshot_timestamp)


def new_run(kind: str, dataset, region=None, n_chunks=0, trigger="cli", snapshot=None) -> RunRecord:
    """A run record for ``dataset`` (a DatasetConfig) with a fresh id and timestamps."""
    now = utc_now()
    params = {
        "resolution": list(dataset.resolution),
        "chunk_size": list(dataset.chunk_size),
        "voxel_offset": list(dataset.voxel_offset),
    }
    g = dataset.graph
    return RunRecord(
        run_id=f"{kind.split('_')[0]}-{now.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}",
        kind=kind,
        dataset=dataset.name,
        segmentation=dataset.segmentation,
        graph=g.table_id if g.kind == "bigtable" else (g.url or ""),
        snapshot_timestamp=(snapshot or now).isoformat(),
        cell_timestamp_ms=int(now.timestamp() * 1000),
        params=params,
        params_hash=params_hash(params),
        code_revision=code_revision(),
        region=list(region) if region is not None else None,
        n_chunks=n_chunks,
        trigger=trigger,
    )


def create_runs_table(instance, table_id: str = DEFAULT_RUNS_TABLE):
    table = instance.table(table_id)
    if not table.exists():
        gc = column_family.MaxVersionsGCRule(1)
        table.create(column_families={RUN_FAMILY: gc, LEDGER_FAMILY: gc})
    return table


def _prefix_rows(table, prefix: bytes):
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    rs = RowSet()
    rs.add_row_range_from_keys(start_key=prefix, end_key=end)
    return table.read_rows(row_set=rs)


def _cells(row, family: str) -> dict[str, bytes]:
    return {k.decode(): v[0].value for k, v in row.cells.get(family, {}).items()}


class RunLedger:
    """Reads and writes of the runs table."""

    def __init__(self, table) -> None:
        self.table = table

    # runs ----------------------------------------------------------------------
    def create_run(self, run: RunRecord) -> None:
        row = self.table.direct_row(f"run:{run.run_id}".encode())
        row.set_cell(RUN_FAMILY, b"meta", json.dumps(asdict(run), sort_keys=True).encode())
        row.commit()

    def get_run(self, run_id: str) -> RunRecord:
        row = self.table.read_row(f"run:{run_id}".encode())
        if row is None:
            raise KeyError(f"no run {run_id!r}")
        return RunRecord(**json.loads(_cells(row, RUN_FAMILY)["meta"]))

    def ensure_run(self, run: RunRecord) -> RunRecord:
        """The stored run with this id, creating it from ``run`` if absent."""
        try:
            return self.get_run(run.run_id)
        except KeyError:
            self.create_run(run)
            return run

    def list_runs(self) -> list[RunRecord]:
        return [
            RunRecord(**json.loads(_cells(r, RUN_FAMILY)["meta"]))
            for r in _prefix_rows(self.table, b"run:")
        ]

    # chunks ----------------------------------------------------------------------
    def _chunk_key(self, run_id: str, chunk_id: int) -> bytes:
        return b"chunk:%s:%020d" % (run_id.encode(), chunk_id)

    def chunk_started(self, run_id: str, chunk_id: int) -> int:
        """Count one more attempt; returns the attempt number."""
        row = self.table.append_row(self._chunk_key(run_id, chunk_id))
        row.increment_cell_value(LEDGER_FAMILY, b"attempts", 1)
        cells = row.commit()
        return struct.unpack(">q", cells[LEDGER_FAMILY][b"attempts"][0][0])[0]

    def chunk_finished(
        self, run_id: str, chunk_id: int, coords, status: str, **fields: Any
    ) -> None:
        row = self.table.direct_row(self._chunk_key(run_id, chunk_id))
        row.set_cell(LEDGER_FAMILY, b"status", status.encode())
        row.set_cell(LEDGER_FAMILY, b"coords", json.dumps([int(c) for c in coords]).encode())
        row.set_cell(LEDGER_FAMILY, b"finished_at", utc_now().isoformat().encode())
        for key, value in fields.items():
            row.set_cell(LEDGER_FAMILY, key.encode(), json.dumps(value).encode())
        row.commit()

    def chunk_rows(self, run_id: str) -> list[dict[str, Any]]:
        out = []
        for r in _prefix_rows(self.table, f"chunk:{run_id}:".encode()):
            cells = _cells(r, LEDGER_FAMILY)
            entry: dict[str, Any] = {"chunk_id": int(r.row_key.rsplit(b":", 1)[1])}
            for k, v in cells.items():
                if k == "attempts":
                    entry[k] = struct.unpack(">q", v)[0]
                elif k in ("status", "finished_at"):
                    entry[k] = v.decode()
                else:
                    entry[k] = json.loads(v)
            entry.setdefault("status", "running")
            out.append(entry)
        return out

    def done_chunks(self, run_id: str) -> set[int]:
        return {r["chunk_id"] for r in self.chunk_rows(run_id) if r["status"] == "done"}

    def done_among(self, run_id: str, chunk_ids: list[int]) -> set[int]:
        """Which of ``chunk_ids`` are done: reads only their rows, not the run's ledger.

        A leaf task asks this for its own few chunks, so resume costs O(batch) reads
        per task instead of a scan of a ledger that may hold millions of rows.
        """
        rs = RowSet()
        for cid in chunk_ids:
            rs.add_row_key(self._chunk_key(run_id, cid))
        done = set()
        for row in self.table.read_rows(row_set=rs):
            if _cells(row, LEDGER_FAMILY).get("status") == b"done":
                done.add(int(row.row_key.rsplit(b":", 1)[1]))
        return done

    # edit-stream events --------------------------------------------------------------
    def record_event(self, run_id: str, message_id: str, **fields: Any) -> None:
        row = self.table.direct_row(f"event:{run_id}:{message_id}".encode())
        for key, value in fields.items():
            row.set_cell(LEDGER_FAMILY, key.encode(), json.dumps(value).encode())
        row.commit()

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return [
            {k: json.loads(v) for k, v in _cells(r, LEDGER_FAMILY).items()}
            for r in _prefix_rows(self.table, f"event:{run_id}:".encode())
        ]
