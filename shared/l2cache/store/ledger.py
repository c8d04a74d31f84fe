"""The runs table: one row per run, one ledger row per chunk, one per edit message.

Every write to the cache belongs to a run (bulk ingest, region reprocess, edit stream,
missing-id recompute). The run row records what produced the values (code revision,
parameter set and hash, segmentation, graph and its snapshot time, region, trigger);
the ledger rows record what happened to each chunk (done / failed, attempts, error,
L2 count, input checksum, duration). Status, resume, reconcile, rollback and cost
estimates all read this table and nothing else.

Row keys: ``run:<run_id>``, ``chunk:<run_id>:<chunk_id %020d>``,
``task:<run_id>:<region>`` (split tasks that gave up), ``event:<run_id>:<event key>``
(one per PCG operation or missing-id message), ``evchunk:<run_id>:<event key>:<chunk>``
(chunks of an event already written, so a redelivery computes each chunk once) and
``ignored:<table_id>`` (edits for tables without a cache, counted),
``msg:<message id>`` (the run and event a missing-id message became),
``l2edit:<dataset>:<L2 id %020d>`` (family ``idx``, GC'd after :data:`INDEX_MAX_AGE`:
the edit event that made the id, written when on_edit accepts the edit) and
``chunkfail:<dataset>:<chunk id %020d>`` (the run whose chunk failed for good, with the
reason; deleted when a later run computes the chunk). The last two are what the lookup's
per-id state reads by key (l2cache.serving.id_state); they point at the event, chunk and
``fail:`` rows, which hold the rest.

Every read goes through :mod:`l2cache.gcp.bigtable`'s one read path and every write
through :mod:`l2cache.gcp.bigtable_write`: plain rows with ``write_rows`` (each row's
status checked), the "unless done" and "only once" marks with ``check_and_mutate``, the
attempt and delivery counters with ``increment``; all with one deadline and their
failures classified the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from google.cloud.bigtable import column_family

from l2cache.domain.failures import RevisionMismatch, RunClosed
from l2cache.domain.lineage import Lineage, code_revision, params_hash, utc_now
from l2cache.domain.regions import region_from_bbox
from l2cache.domain.statgrid import StatGrid
from l2cache.gcp.bigtable import CellFilter, RowCells, read_row, read_rows
from l2cache.gcp.bigtable_write import Row, check_and_mutate, increment, write_rows
from l2cache.store import runstate

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.instance import Instance
    from google.cloud.bigtable.table import Table

    from l2cache.config import DatasetConfig

RUN_FAMILY = "run"
LEDGER_FAMILY = "ledger"
SUM_FAMILY = "sum"  # the run's counters (l2cache.store.runstate): int64 sum aggregates
# Per-id pointers to edit events (``l2edit:`` rows): one version, collected after
# INDEX_MAX_AGE (infra/storage.py: RUNS_INDEX_GC_MAX_AGE), so they never accumulate.
INDEX_FAMILY = "idx"
INDEX_MAX_AGE = timedelta(days=30)
# An edit names tens of new ids; a message naming more (PCG's manual remesh, operation
# 0) indexes only this many: the others read as an edit l2cache has no record of.
INDEX_MAX_IDS = 10_000
# A region task that gave up gets per-chunk failure rows only up to this many chunks.
REGION_INDEX_MAX_CHUNKS = 1024
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
    # When set, only workers running exactly this revision may write for the run.
    pinned_revision: str | None = None
    # The boxes the run's counters are kept per (l2cache.domain.statgrid); None for runs
    # recorded before counters had a grid.
    grid: dict[str, list[int]] | None = None
    # The fence (``runs rollback`` closed the run: at, by, reason), read from the run
    # row's own ``closed`` column, never from ``meta``: no rewrite of the record reopens it.
    closed: dict[str, Any] | None = None

    @property
    def stat_grid(self) -> StatGrid | None:
        """The run's counter grid (None: counters sharded by chunk id, no map)."""
        return StatGrid.from_json(self.grid)

    def lineage(
        self,
        input_checksum: str = "",
        cell_timestamp: datetime | None = None,
        input_counts: Mapping[str, int] | None = None,
    ) -> Lineage:
        """Lineage of cells computed *here*: the code revision is this process's own
        (``code_revision`` of the run is where it was started), so every cell names the
        code that computed it. ``input_counts`` (the chunk's orphan and ghost counts)
        go with the input checksum, so each row says what its input lacked."""
        ts = cell_timestamp or datetime.fromtimestamp(self.cell_timestamp_ms / 1000, tz=UTC)
        counts = tuple((k, int(v)) for k, v in (input_counts or {}).items())
        return Lineage(self.run_id, self.params_hash, code_revision(), input_checksum, ts, counts)

    def provenance(self) -> dict[str, Any]:
        """What QC reports and releases record of the run that produced the values."""
        return {
            "code_revision": self.code_revision,
            "params_hash": self.params_hash,
            "segmentation": self.segmentation,
            "graph": self.graph,
            "snapshot": self.snapshot_timestamp,
            "cell_timestamp_ms": self.cell_timestamp_ms,
        }

    def check_revision(self) -> None:
        """Refuse to compute for a run pinned to another revision (permanent)."""
        here = code_revision()
        if self.pinned_revision and self.pinned_revision != here:
            raise RevisionMismatch(
                f"run {self.run_id} is pinned to revision {self.pinned_revision}; "
                f"this worker runs {here}"
            )

    @property
    def snapshot(self) -> datetime:
        """The graph time as a datetime; the record keeps it as ISO text so it stays JSON."""
        return datetime.fromisoformat(self.snapshot_timestamp)


def new_run(
    kind: str,
    dataset: DatasetConfig,
    region: Sequence[int] | None = None,
    n_chunks: int = 0,
    trigger: str = "cli",
    snapshot: datetime | None = None,
    pinned_revision: str | None = None,
) -> RunRecord:
    """A run record for ``dataset`` with a fresh id and timestamps."""
    now = utc_now()
    params = {
        "resolution": list(dataset.resolution),
        "chunk_size": list(dataset.chunk_size),
        "voxel_offset": list(dataset.voxel_offset),
    }
    g = dataset.graph
    if region is not None:
        grid = StatGrid.for_region(region).to_json()
    elif dataset.volume_size is not None:  # an edit stream: the map covers the volume
        grid = StatGrid.for_region(region_from_bbox(dataset, None)).to_json()
    else:
        grid = None
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
        pinned_revision=pinned_revision,
        grid=grid,
    )


def create_runs_table(instance: Instance, table_id: str = DEFAULT_RUNS_TABLE) -> Table:
    """Create the runs table if it is missing; give an existing one the counters' family.

    GC keeps one version per cell: run and chunk rows are rewritten in place as they
    progress (status, attempts) and only their newest state is ever read. The run's
    counters live in :data:`SUM_FAMILY`, an int64 sum aggregate family: a worker adds
    with one blind AddToCell and the server merges every add into one cell.
    """
    table = instance.table(table_id)
    index_gc = column_family.GCRuleUnion(
        [column_family.MaxVersionsGCRule(1), column_family.MaxAgeGCRule(INDEX_MAX_AGE)]
    )
    if not table.exists():
        gc = column_family.MaxVersionsGCRule(1)
        table.create(column_families={RUN_FAMILY: gc, LEDGER_FAMILY: gc, INDEX_FAMILY: index_gc})
    families = table.list_column_families()
    if INDEX_FAMILY not in families:
        table.column_family(INDEX_FAMILY, index_gc).create()
    if SUM_FAMILY not in families:
        _add_sum_family(table)
    return table


def _add_sum_family(table: Table) -> None:
    """Add the int64 sum aggregate family (the handwritten admin client cannot type a
    family, so the generated one does)."""
    from google.cloud.bigtable_admin_v2.types import ColumnFamily, ModifyColumnFamiliesRequest
    from google.cloud.bigtable_admin_v2.types import Type as ValueType

    int64 = ValueType(
        int64_type=ValueType.Int64(
            encoding=ValueType.Int64.Encoding(
                big_endian_bytes=ValueType.Int64.Encoding.BigEndianBytes()
            )
        )
    )
    family = ColumnFamily(
        value_type=ValueType(
            aggregate_type=ValueType.Aggregate(input_type=int64, sum=ValueType.Aggregate.Sum())
        )
    )
    modification = ModifyColumnFamiliesRequest.Modification(id=SUM_FAMILY, create=family)
    table._instance._client.table_admin_client.modify_column_families(  # noqa: SLF001
        name=table.name, modifications=[modification]
    )


CLOSED = b"closed"  # run row column: the fence a rollback sets before deleting
MAX_REASON = 500  # characters of a refused task's reason kept in the ledger
SUCCESSORS = 64  # stream runs tried after a closed one (``<run>.2``, ``<run>.3``, ...)

# Ledger marks that must never undo a done chunk, and the one that is stamped only once.
UNLESS_DONE = CellFilter(columns={LEDGER_FAMILY: [b"status"]}, values=[b"done"])
# A live mark of an attempt counted in flight (written only where it is absent).
RUNNING = CellFilter(columns={LEDGER_FAMILY: [b"status"]}, per_column=1, values=[b"running"])
FIRST_FAILED = CellFilter(columns={LEDGER_FAMILY: [b"first_failed_at"]})


def message_key(message_id: str) -> bytes:
    """Row ``msg:<Pub/Sub message id>``: which run and event a missing-id message became
    (family :data:`INDEX_FAMILY`, GC'd after :data:`INDEX_MAX_AGE`; column ``event``,
    ``{"run", "key"}``), written with the event's record; the lookup's per-id state
    reads it by key (l2cache.serving.id_state). Rows written before the family held
    them carry the cell in the ledger family, and are read there too."""
    return f"msg:{message_id}".encode()


def edit_index_key(dataset: str, l2id: int) -> bytes:
    """Row ``l2edit:<dataset>:<L2 id>``: the edit event that made the id (family
    :data:`INDEX_FAMILY`, column ``event``: ``{"run", "key", "op", "msg", "at"}``)."""
    return b"l2edit:%s:%020d" % (dataset.encode(), int(l2id))


def chunk_failure_key(dataset: str, chunk_id: int) -> bytes:
    """Row ``chunkfail:<dataset>:<chunk id>``: the last run that failed the chunk for
    good (columns ``run``, ``error``, ``at``, ``snapshot_ms``, ``permanent``), deleted
    when a run computes the chunk."""
    return b"chunkfail:%s:%020d" % (dataset.encode(), int(chunk_id))


def prefix_rows(table: Table | str, prefix: bytes) -> dict[bytes, RowCells]:
    """Every row whose key starts with ``prefix``, newest cells, in key order."""
    return read_rows(table, prefix=prefix)


def row_cells(row: RowCells, family: str) -> dict[str, bytes]:
    """One family's newest cells of a row read by :func:`prefix_rows`, by column name."""
    return {k.decode(): v for k, v in row.get(family, {}).items()}


def _run_id(run: RunRecord | str) -> str:
    return run if isinstance(run, str) else run.run_id


def _grid(run: RunRecord | str) -> StatGrid | None:
    """A run's counter grid; a bare run id (older callers, tests) counts ungridded."""
    return None if isinstance(run, str) else run.stat_grid


def _failure_index(
    run: RunRecord | str, chunk_id: int, status: str, at: str, fields: Mapping[str, Any]
) -> Row | None:
    """The chunk's ``chunkfail:`` row for a chunk state change: set when it failed for
    good, deleted when it is done; None for a retry, or a bare run id (no dataset).

    Sent once with the writes the transition makes anyway (the ``fail:`` row, the
    counters), so it costs no request of its own: a done chunk's deletion is one more
    mutation in the counters' MutateRows (a chunk that never failed has no row; the
    delete is then a no-op)."""
    if isinstance(run, str) or status not in ("done", "failed"):
        return None
    row = Row(chunk_failure_key(run.dataset, chunk_id))
    if status == "done":
        row.delete_row()
        row.idempotent = False  # rides in the counters' request (sent once) instead of its own
        return row
    snapshot_ms = int(run.snapshot.timestamp() * 1000)
    values = {
        "run": run.run_id,
        "kind": run.kind,
        "error": str(fields.get("error", "failed"))[:MAX_REASON],
        "at": at,
        "snapshot_ms": snapshot_ms,
        "permanent": bool(fields.get("permanent", False)),
    }
    for name, value in values.items():
        row.set_cell(LEDGER_FAMILY, name.encode(), json.dumps(value).encode())
    return row


class RunLedger:
    """Reads and writes of the runs table."""

    def __init__(self, table: Table) -> None:
        self.table = table

    # runs ----------------------------------------------------------------------
    def create_run(self, run: RunRecord) -> None:
        """Store the whole record as JSON in one cell, so every worker and operator
        reads the same definition of the run."""
        meta = asdict(run)
        meta.pop("closed")  # the fence is its own column (close_run), never the record's
        row = Row(f"run:{run.run_id}".encode())
        row.set_cell(RUN_FAMILY, b"meta", json.dumps(meta, sort_keys=True).encode())
        write_rows(self.table, [row], "run")

    def get_run(self, run_id: str) -> RunRecord:
        """The run's record with its fence, if closed; ``KeyError`` if it has none
        (``NotFound``: no runs table, permanent)."""
        row = read_row(self.table, f"run:{run_id}".encode())
        if row is None or "meta" not in row_cells(row, RUN_FAMILY):
            raise KeyError(f"no run {run_id!r}")
        cells = row_cells(row, RUN_FAMILY)
        meta = json.loads(cells["meta"])
        meta.pop("closed", None)
        record = RunRecord(**meta)
        if CLOSED.decode() in cells:
            record.closed = json.loads(cells[CLOSED.decode()])
        return record

    def ensure_run(self, run: RunRecord) -> RunRecord:
        """The stored run with this id, creating it from ``run`` if absent.

        A stream run is named per (dataset, kind, revision, params), so once a rollback
        has closed it every later message would be refused: instead the next open
        successor (``<run>.2``, ``<run>.3``, ...) takes the stream's new writes.
        """
        base = run.run_id
        for n in range(1, SUCCESSORS + 1):
            run.run_id = base if n == 1 else f"{base}.{n}"
            try:
                stored = self.get_run(run.run_id)
            except KeyError:
                self.create_run(run)
                return run
            if stored.closed is None or stored.kind not in ("edit_stream", "missing_ids"):
                return stored
        raise RunClosed(f"run {base} and its {SUCCESSORS - 1} successors are all closed")

    # the fence -----------------------------------------------------------------------
    def close_run(self, run_id: str, by: str, reason: str) -> dict[str, Any]:
        """Close the run (the fence ``runs rollback`` sets first): every worker checks
        it right before writing cells of the run (:meth:`check_open`) and refuses for
        good once it is set. Stamped once (a second close keeps the first mark);
        returns the mark in force."""
        if self.get_run(run_id).closed is not None:
            return self.get_run(run_id).closed or {}
        mark = {"at": utc_now().isoformat(), "by": by, "reason": reason}
        row = Row(f"run:{run_id}".encode())
        row.set_cell(RUN_FAMILY, CLOSED, json.dumps(mark, sort_keys=True).encode())
        check_and_mutate(self.table, row, CellFilter(columns={RUN_FAMILY: [CLOSED]}), what="run")
        return self.get_run(run_id).closed or mark

    def check_open(self, run: RunRecord | str) -> None:
        """Raise :class:`RunClosed` (permanent) when the run has been closed: one read of
        the run row's fence column, made after the writer's in-flight mark is stored
        (``live:`` or ``writing:``) and before its cells are, so a rollback that waits
        for those marks never misses a late write."""
        run_id = _run_id(run)
        row = read_row(
            self.table, f"run:{run_id}".encode(), CellFilter(columns={RUN_FAMILY: [CLOSED]})
        )
        cell = (row or {}).get(RUN_FAMILY, {}).get(CLOSED)
        if cell:
            mark = json.loads(cell)
            raise RunClosed(
                f"run {run_id} was closed at {mark.get('at')} by {mark.get('by')} "
                f"({mark.get('reason')}): late write refused"
            )

    def writing_started(self, run_id: str, chunk_id: int, event_key: str) -> bytes:
        """Mark a stream write in flight (``writing:<run>:<chunk>:<event digest>``): a
        stream chunk has no ``live:`` row, yet a rollback must wait for it. Returns the
        key for :meth:`writing_ended`."""
        digest = hashlib.sha256(event_key.encode()).hexdigest()[:16]
        key = b"writing:%s:%020d:%s" % (run_id.encode(), chunk_id, digest.encode())
        row = Row(key)
        row.set_cell(LEDGER_FAMILY, b"at", utc_now().isoformat().encode())
        write_rows(self.table, [row], "ledger")
        return key

    def writing_ended(self, key: bytes) -> None:
        """Clear a stream write's in-flight mark (written or failed)."""
        write_rows(self.table, [Row(key).delete_row()], "ledger")

    # refused tasks -------------------------------------------------------------------
    def task_refused(self, run_id: str, reason: str, body: bytes) -> bool:
        """A task of this run refused before anything was written (forged or wrong body,
        or a late task of a closed run): counted once per distinct body and kept as the
        run's latest refusal, never as a mark that the run is broken. Returns whether
        it was new (a repeat of the same body counts nothing).

        Bounded: ``refused:<run>:<digest>`` (one small row per distinct body, written by
        one check-and-mutate) and ``refusals:<run>`` (the count in the ``sum`` family
        and the latest reason): status reads only the latter, O(1) however many came.
        """
        digest = hashlib.sha256(body).hexdigest()[:32]
        at = utc_now().isoformat()
        reason = reason[:MAX_REASON]
        mark = Row(f"refused:{run_id}:{digest}".encode())
        mark.set_cell(LEDGER_FAMILY, b"at", at.encode())
        mark.set_cell(LEDGER_FAMILY, b"error", json.dumps(reason).encode())
        seen = CellFilter(columns={LEDGER_FAMILY: [b"at"]})
        if check_and_mutate(self.table, mark, seen, what="ledger"):
            return False
        latest = Row(f"refusals:{run_id}".encode())
        latest.set_cell(LEDGER_FAMILY, b"latest", json.dumps(reason).encode())
        latest.set_cell(LEDGER_FAMILY, b"at", at.encode())
        write_rows(self.table, [latest], "ledger")
        runstate.add_counts(self.table, f"refusals:{run_id}".encode(), {b"refused": 1})
        return True

    # chunks ----------------------------------------------------------------------
    def _chunk_key(self, run_id: str, chunk_id: int) -> bytes:
        return b"chunk:%s:%020d" % (run_id.encode(), chunk_id)

    def chunk_started(
        self, run: RunRecord | str, chunk_id: int, coords: Sequence[int] | None = None
    ) -> int:
        """Count one more attempt and mark the chunk running; returns the attempt number.

        The increment is a read-modify-write (it raises on failure); ``started_at`` lets
        status tell an attempt in flight from one whose worker died without a word. The
        ``live:`` row is what status reads instead of the chunk row, and the attempt
        is added to the run's counters (every attempt is a dispatch to pay for).
        """
        run_id = _run_id(run)
        key = self._chunk_key(run_id, chunk_id)
        attempt = increment(self.table, key, LEDGER_FAMILY, b"attempts", what="ledger")
        now = utc_now().isoformat()
        mark = Row(key)
        mark.set_cell(LEDGER_FAMILY, b"status", b"running")
        mark.set_cell(LEDGER_FAMILY, b"started_at", now.encode())
        if coords is not None:
            mark.set_cell(LEDGER_FAMILY, b"coords", json.dumps([int(c) for c in coords]).encode())
        self._unless_done(mark)
        if coords is not None:
            # counted in flight once per chunk: a mark already "running" is an attempt
            # whose worker died (its count stands until this attempt ends)
            live = runstate.live_row(run_id, chunk_id, "running", coords, now, attempt)
            fresh = not check_and_mutate(self.table, live, RUNNING, what="ledger")
            if not fresh:
                write_rows(self.table, [live], "ledger")  # refresh its time and attempt
            cell = runstate.cell_of(_grid(run), coords, chunk_id)
            started = {
                b"attempts": 1,
                b"started": attempt == 1,
                b"retried": attempt == 2,
                b"inflight": int(fresh),  # an attempt running: chunk_finished takes it back
                b"inflight_retry": int(fresh and attempt > 1),
            }
            runstate.add_counts(self.table, runstate.stat_key(run_id, cell), started)  # type: ignore[arg-type]
        return attempt

    def _unless_done(self, row: Row) -> bool:
        """Write ``row`` only while the chunk is not done (one CheckAndMutateRow): a late
        or duplicate attempt never turns a done chunk back into running, retrying or
        failed. Returns whether it wrote."""
        return not check_and_mutate(self.table, row, UNLESS_DONE, what="ledger")

    def chunks_queued(
        self, run: RunRecord | str, chunks: Iterable[tuple[int, Sequence[int]]], task_attempt: int
    ) -> None:
        """Mark every not-done chunk of a leaf task as queued by this task attempt.

        A worker that dies on the batch's first chunk never reaches the others; with
        this mark (and their ``live:`` rows) they carry the task's attempt and time, so
        status can presume them failed after the last attempt instead of leaving them
        pending forever.
        """
        run_id = _run_id(run)
        now = utc_now().isoformat()
        for chunk_id, coords in chunks:
            row = Row(self._chunk_key(run_id, chunk_id))
            row.set_cell(LEDGER_FAMILY, b"queued_at", now.encode())
            row.set_cell(LEDGER_FAMILY, b"task_attempt", json.dumps(task_attempt).encode())
            row.set_cell(LEDGER_FAMILY, b"coords", json.dumps([int(c) for c in coords]).encode())
            if self._unless_done(row):
                queued = runstate.live_row(run_id, chunk_id, "queued", coords, now, task_attempt)
                # never over a "running" mark: that attempt's in-flight count needs it
                check_and_mutate(self.table, queued, RUNNING, what="ledger")

    def task_rejected(self, run_id: str, reason: str) -> None:
        """Work of this run was lost where no chunk row can record it (a split span that
        gave up, a task of the run's own dataset that this deployment's map lacks): the
        run cannot be completed as planned, and status reports it broken. Forged or
        wrong task bodies are :meth:`task_refused` instead: they never break a run."""
        digest = hashlib.sha256(reason.encode()).hexdigest()[:16]
        row = Row(f"rejected:{run_id}:{digest}".encode())
        row.set_cell(LEDGER_FAMILY, b"error", json.dumps(reason).encode())
        row.set_cell(LEDGER_FAMILY, b"at", utc_now().isoformat().encode())
        write_rows(self.table, [row], "ledger")

    def chunk_finished(
        self,
        run: RunRecord | str,
        chunk_id: int,
        coords: Sequence[int],
        status: str,
        qc_bins: Mapping[bytes, int] | None = None,
        attempt: int | None = None,
        started: bool = True,
        **fields: Any,
    ) -> bool:
        """Record an attempt's outcome; returns whether the chunk changed state.

        The chunk's state moves by one conditioned write (:func:`runstate.transition`):
        a done chunk never goes back (a duplicate delivery's late failure must not hide
        data that another delivery already wrote), and a second done rewrites nothing.
        Only the delivery that moved the state moves the run's counters (``stat:`` box
        row, ``hist:`` minute row, the QC histogram bins ``qc_bins`` of a done chunk)
        and its ``fail:`` row. A retrying chunk keeps a ``live:`` mark (it awaits its
        next attempt: status presumes it failed if none comes); done and failed clear it.
        ``attempt`` is the attempt that reports (for the failure's record, and the
        in-flight counters its start added: every call ends one attempt, except a
        verdict recorded for chunks no attempt ``started``, e.g. a lost span's).
        """
        run_id = _run_id(run)
        key = self._chunk_key(run_id, chunk_id)
        now = utc_now()
        cells = {
            b"status": status.encode(),
            b"coords": json.dumps([int(c) for c in coords]).encode(),
            b"finished_at": now.isoformat().encode(),
            **{k.encode(): json.dumps(v).encode() for k, v in fields.items()},
        }
        new = runstate.STATE_OF[status]
        old = runstate.transition(self.table, key, new, cells)
        at = now.isoformat()
        if status == "retrying" and old is not False:  # awaits its next attempt
            mark = runstate.live_row(run_id, chunk_id, "retrying", coords, at, attempt or 0)
        else:
            mark = Row(runstate.live_key(run_id, chunk_id)).delete_row()
        # the attempt leaves flight only if its "running" mark counted it (one per chunk)
        was_running = check_and_mutate(self.table, mark, RUNNING, if_matched=True, what="ledger")
        if not was_running:
            write_rows(self.table, [mark], "ledger")
        ended = (
            {b"inflight": -1, b"inflight_retry": -int((attempt or 1) > 1)}
            if was_running and started
            else {}
        )
        if old is False:
            cell = runstate.cell_of(_grid(run), coords, chunk_id)
            runstate.add_counts(self.table, runstate.stat_key(run_id, cell), ended)
            return False
        if status != "done":
            self._first_failure(run_id, chunk_id)
        index = _failure_index(run, chunk_id, status, at, fields)
        cleared = [index] if index is not None and status == "done" else []
        self._count(run, chunk_id, coords, old, new, now, qc_bins, fields, ended, cleared)
        marks = []
        if status == "done":
            if old is not None:
                marks.append(Row(runstate.fail_key(run_id, chunk_id)).delete_row())
        else:
            record = {**fields, "attempts": attempt} if attempt else fields
            marks.append(runstate.failure_row(run_id, chunk_id, status, coords, at, record))
            if index is not None and status == "failed":
                marks.append(index)
        if marks:
            write_rows(self.table, marks, "ledger")
        return True

    def _count(
        self,
        run: RunRecord | str,
        chunk_id: int,
        coords: Sequence[int],
        old: bytes | None,
        new: bytes,
        now: datetime,
        qc_bins: Mapping[bytes, int] | None,
        fields: Mapping[str, Any],
        ended: Mapping[bytes, int],
        extra: Sequence[Row] = (),
    ) -> None:
        """Move the run's counters for one transition of one chunk (``ended``: the
        attempt's in-flight counts taken back, in the same request; ``extra``: rows
        sent with them, e.g. the deletion of the chunk's ``chunkfail:`` row)."""
        run_id = _run_id(run)
        cell = runstate.cell_of(_grid(run), coords, chunk_id)
        box = {**runstate.state_deltas(old, new), **ended}
        minute: dict[bytes, int] = {}
        if new == b"d":
            work = {
                b"l2": int(fields.get("l2_count", 0) or 0),
                b"compute_ms": round(float(fields.get("duration_s", 0) or 0) * 1000),
                b"voxels": int(fields.get("voxels", 0) or 0),
            }
            box.update(work)
            minute.update(work)
            minute[b"done"] = 1
        else:
            minute[b"failed" if new == b"f" else b"retried"] = 1
        if new == b"d" and old is not None:  # recovered: how long it took, binned
            box[b"recovered"] = 1
            box[
                b"rec.%d" % runstate.latency_bin(self._since_first_failure(run_id, chunk_id, now))
            ] = 1
        counts = {
            runstate.stat_key(run_id, cell): box,
            runstate.hist_key(
                run_id, runstate.minute_of(now), runstate.shard_of(chunk_id, runstate.HIST_SHARDS)
            ): minute,
        }
        if new == b"d" and qc_bins:
            qc = runstate.qc_key(run_id, runstate.shard_of(chunk_id, runstate.QC_SHARDS))
            counts[qc] = qc_bins
        runstate.add_many(self.table, counts, extra=extra)

    def _since_first_failure(self, run_id: str, chunk_id: int, now: datetime) -> float:
        """Seconds since the chunk first failed (0 when no failure was stamped)."""
        row = read_row(
            self.table,
            self._chunk_key(run_id, chunk_id),
            CellFilter(columns={LEDGER_FAMILY: [b"first_failed_at"]}, per_column=1),
        )
        stamp = (row or {}).get(LEDGER_FAMILY, {}).get(b"first_failed_at")
        if not stamp:
            return 0.0
        return max((now - datetime.fromisoformat(stamp.decode())).total_seconds(), 0.0)

    def _first_failure(self, run_id: str, chunk_id: int) -> None:
        """Stamp ``first_failed_at`` once (check-and-mutate: only when absent), so the
        time to recover a failed chunk survives the rewrites of later attempts."""
        row = Row(self._chunk_key(run_id, chunk_id))
        row.set_cell(LEDGER_FAMILY, b"first_failed_at", utc_now().isoformat().encode())
        check_and_mutate(self.table, row, FIRST_FAILED, what="ledger")

    def task_gave_up(self, run_id: str, region: Sequence[int], reason: str, attempts: int) -> None:
        """A split task's last attempt failed: its region's unstarted chunks are failed."""
        key = "task:{}:{}".format(run_id, "-".join(str(int(v)) for v in region)).encode()
        row = Row(key)
        row.set_cell(LEDGER_FAMILY, b"status", b"failed")
        row.set_cell(LEDGER_FAMILY, b"region", json.dumps([int(v) for v in region]).encode())
        row.set_cell(LEDGER_FAMILY, b"error", json.dumps(reason).encode())
        row.set_cell(LEDGER_FAMILY, b"attempts", json.dumps(attempts).encode())
        write_rows(self.table, [row], "ledger")

    def region_gave_up(self, run: RunRecord, chunk_ids: Sequence[int], reason: str) -> int:
        """``chunkfail:`` rows for the chunks of a region whose task gave up (the
        ``task:`` row is per region, which the lookup cannot find from an id), except
        the run's chunks already done: one read of their rows, one MutateRows. Only for
        a few chunks (at most :data:`REGION_INDEX_MAX_CHUNKS`, a leaf's batch; a split's
        region may span a dataset): returns how many were indexed (0 above the cap)."""
        if not chunk_ids or len(chunk_ids) > REGION_INDEX_MAX_CHUNKS:
            return 0
        done = self.done_among(run.run_id, list(chunk_ids))
        at = utc_now().isoformat()
        rows = [
            row
            for cid in chunk_ids
            if cid not in done
            and (row := _failure_index(run, cid, "failed", at, {"error": reason})) is not None
        ]
        if rows:
            write_rows(self.table, rows, "ledger")
        return len(rows)

    def done_among(self, run_id: str, chunk_ids: list[int]) -> set[int]:
        """Which of ``chunk_ids`` are done: reads only their rows, not the run's ledger.

        A leaf task asks this for its own few chunks, so resume costs O(batch) reads
        per task instead of a scan of a ledger that may hold millions of rows.
        """
        keys = [self._chunk_key(run_id, cid) for cid in chunk_ids]
        return {
            int(key.rsplit(b":", 1)[1])
            for key, row in read_rows(self.table, keys=keys).items()
            if row_cells(row, LEDGER_FAMILY).get("status") == b"done"
        }

    # edit-stream events --------------------------------------------------------------
    def _event_key(self, run_id: str, event_key: str) -> bytes:
        return f"event:{run_id}:{event_key}".encode()

    def record_event(self, run_id: str, event_key: str, **fields: Any) -> None:
        """One row per event (PCG operation or missing-id message); rewritten, not added,
        when the same event is delivered again."""
        row = Row(self._event_key(run_id, event_key))
        for key, value in fields.items():
            row.set_cell(LEDGER_FAMILY, key.encode(), json.dumps(value).encode())
        write_rows(self.table, [row], "event")
        if fields.get("kind") == "missing_ids" and fields.get("message_id"):
            self._index_message(str(fields["message_id"]), run_id, event_key)
        self._count_event(run_id, event_key, fields)

    def _index_message(self, message_id: str, run_id: str, event_key: str) -> None:
        """The lookup knows a queued id's message, not the run: ``msg:<id>`` (family idx,
        GC'd after INDEX_MAX_AGE) points it at the event. Best effort, apart from the
        event's own record: a runs table without the family (deployed before it, not yet
        ``pulumi up``) or a failed write costs the per-id state its ``run``/``event``
        (it still says pending by the message), never the event's record or count."""
        where = json.dumps({"run": run_id, "key": event_key}).encode()
        try:
            write_rows(
                self.table,
                [Row(message_key(message_id)).set_cell(INDEX_FAMILY, b"event", where)],
                "event index",
            )
        except Exception as exc:  # noqa: BLE001 - owned here: logged, the record stands
            log.warning(
                "msg:%s index not written (per-id state loses its run and event): %r",
                message_id,
                exc,
            )

    def _count_event(self, run_id: str, event_key: str, fields: Mapping[str, Any]) -> None:
        """Count an event once (its first record marks ``counted`` by a conditioned
        write) into the run's counters, with its edit-to-available latency bin when its
        values were written: the stream SLO and the dashboard read these, never the
        event rows."""
        mark = Row(self._event_key(run_id, event_key))
        mark.set_cell(LEDGER_FAMILY, b"counted", b"1")
        predicate = CellFilter(columns={LEDGER_FAMILY: [b"counted"]})
        if check_and_mutate(self.table, mark, predicate, what="event"):
            return  # an earlier record of this event was counted
        amounts = {b"events": 1, b"events." + str(fields.get("status", "")).encode(): 1}
        if fields.get("reused_operation_id"):  # PCG's operation id, with other content
            amounts[b"events.reused_op"] = 1
        published, recorded = fields.get("published_at"), fields.get("recorded_at")
        if fields.get("kind") == "edit" and fields.get("status") in ("ok", "partial"):
            if published and recorded:
                seconds = (
                    datetime.fromisoformat(recorded) - datetime.fromisoformat(published)
                ).total_seconds()
                amounts[b"lat.%d" % runstate.latency_bin(seconds)] = 1
        cell = zlib.crc32(event_key.encode()) % runstate.UNGRIDDED_CELLS
        minute = runstate.minute_of(utc_now())
        hist = runstate.hist_key(run_id, minute, cell % runstate.HIST_SHARDS)
        runstate.add_many(self.table, {runstate.stat_key(run_id, cell): amounts, hist: amounts})

    def edit_received(
        self,
        run_id: str,
        event_key: str,
        dataset: str,
        l2ids: Sequence[int],
        operation_id: int | None,
        message_id: str,
        published: datetime,
    ) -> int:
        """Record that on_edit accepted an edit: ``received_at`` on the event row and,
        per new L2 id (at most :data:`INDEX_MAX_IDS`), an ``l2edit:`` row naming the
        event, in one MutateRows. Every cell carries the message's publish time, so a
        redelivery rewrites the same bytes at the same version (the rows are retried,
        never doubled) and the index's GC age counts from the edit. Returns the number
        of ids indexed.

        What the lookup's per-id state reads: from an id to its event (run, key), whose
        ``event:`` and ``evchunk:`` rows say whether it is still in flight or failed and
        why, instead of guessing an edit from the age of the graph's ``children`` cell.
        """
        ids = sorted({int(i) for i in l2ids})[:INDEX_MAX_IDS]
        at = published.astimezone(UTC).isoformat().replace("+00:00", "Z")
        pointer = json.dumps(
            {"run": run_id, "key": event_key, "op": operation_id, "msg": message_id, "at": at},
            separators=(",", ":"),
        ).encode()
        event = Row(self._event_key(run_id, event_key))
        event.set_cell(LEDGER_FAMILY, b"received_at", json.dumps(at).encode(), published)
        rows = [event]
        for l2id in ids:
            rows.append(
                Row(edit_index_key(dataset, l2id)).set_cell(
                    INDEX_FAMILY, b"event", pointer, published
                )
            )
        write_rows(self.table, rows, "event")
        return len(ids)

    def claim_event_content(self, run_id: str, event_key: str, digest: str) -> str | None:
        """Record ``digest`` as the content of an event unless one is recorded (one
        CheckAndMutateRow, so of two contents one wins); returns the one recorded
        before, or None when this call recorded it."""
        key = self._event_key(run_id, event_key)
        row = Row(key)
        row.set_cell(LEDGER_FAMILY, b"content", json.dumps(digest).encode())
        content = CellFilter(columns={LEDGER_FAMILY: [b"content"]})
        if not check_and_mutate(self.table, row, content, what="event"):
            return None
        stored = read_row(self.table, key, content)
        return json.loads(row_cells(stored, LEDGER_FAMILY)["content"]) if stored else None

    def event_delivered(self, run_id: str, event_key: str) -> int:
        """Count one more delivery of an event; returns the delivery number (1-based)."""
        key = self._event_key(run_id, event_key)
        return increment(self.table, key, LEDGER_FAMILY, b"delivery_count", what="event")

    def event_chunk_done(self, run_id: str, event_key: str, chunk_id: int, **fields: Any) -> None:
        """A chunk of a fanned-out event written, with its counts: a redelivery of the
        event skips it."""
        self._event_chunk(run_id, event_key, chunk_id, "done", **fields)

    def event_chunk_failed(
        self, run_id: str, event_key: str, chunk_id: int, error: str, n_ids: int
    ) -> None:
        """A chunk of a fanned-out event that could not be computed, with the reason."""
        self._event_chunk(run_id, event_key, chunk_id, "failed", error=error, failed_ids=n_ids)

    def _event_chunk(
        self, run_id: str, event_key: str, chunk_id: int, status: str, **fields: Any
    ) -> None:
        key = b"evchunk:%s:%s:%020d" % (run_id.encode(), event_key.encode(), chunk_id)
        row = Row(key)
        row.set_cell(LEDGER_FAMILY, b"status", status.encode())
        for name, value in fields.items():
            row.set_cell(LEDGER_FAMILY, name.encode(), json.dumps(value).encode())
        write_rows(self.table, [row], "event")

    def event_chunks(self, run_id: str, event_key: str) -> dict[int, dict[str, Any]]:
        """Every recorded chunk of an event (done or failed) with its fields."""
        prefix = f"evchunk:{run_id}:{event_key}:".encode()
        return {
            int(key.rsplit(b":", 1)[1]): {
                k: v.decode() if k == "status" else json.loads(v)
                for k, v in row_cells(row, LEDGER_FAMILY).items()
            }
            for key, row in prefix_rows(self.table, prefix).items()
        }

    def event_chunks_done(self, run_id: str, event_key: str) -> dict[int, dict[str, Any]]:
        """Chunks of an event already written (by an earlier delivery), with their counts."""
        return {
            cid: fields
            for cid, fields in self.event_chunks(run_id, event_key).items()
            if fields.get("status") == "done"
        }

    # edits for tables without a cache -------------------------------------------------
    def count_ignored(self, table_id: str) -> int:
        """Count one more edit for a graph table l2cache does not cache; returns the total."""
        key = f"ignored:{table_id}".encode()
        return increment(self.table, key, LEDGER_FAMILY, b"count", what="ledger")
