"""Rollback of a run in named chunks: the ``rollback`` task kind and the deletion it does.

A rollback is proportional to what the run touched: the ledger names its chunks, the
L2 ids of one chunk are one contiguous row-key range of the cache table, so deleting a
run's cells reads only the lineage rows of those chunks whose key names the run (a
server-side row-key filter), expands them by the ids each names, and deletes exactly
those versions (:func:`l2cache.store.lineage_rows.run_versions`; rows written before
lineage rows: their own ``lineage:run`` cells, a scan skipped on a migrated table). The
operator side (:mod:`l2cache_ops.rollback`) streams the ledger; a large rollback is
fanned out through the queue as tasks of this kind, which :func:`handle_rollback_task`
runs inside the compute function::

    {"kind": "rollback", "dataset": "...", "run_id": "...", "chunks": [chunk id, ...],
     "record": "rollback:<dataset>:<at ms>:<run id>"}

The body is validated strictly before anything is read: a malformed task is permanent
(answered 200 and logged, never retried), as every task that no retry can run. What a
task deletes never comes from its body: the versions are those the run's lineage
rows name, and for a bulk or region run only at the run's own cell timestamp (a
stream run writes each message's cells at that message's time, so its versions are
selected by lineage alone). A repeated task finds nothing left and deletes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from l2cache.domain.attributes import ATTRIBUTES, FEATURE_FAMILY, LINEAGE_FAMILY
from l2cache.domain.failures import BadRequest, describe
from l2cache.domain.ids import SpatialBits, get_layer
from l2cache.gcp.bigtable import KeyRange, RowReader
from l2cache.gcp.bigtable_write import Row, increment_many, write_rows
from l2cache.store import lineage_rows
from l2cache.store.ledger import RUN_FAMILY

if TYPE_CHECKING:  # annotations only (l2cache.compute loads the feature engine)
    from google.cloud.bigtable.table import Table
    from google.cloud.tasks_v2 import CloudTasksClient

    from l2cache.compute import DatasetContext
    from l2cache.config import TasksConfig
    from l2cache.store.ledger import RunRecord

log = logging.getLogger(__name__)

KIND = "rollback"
MAX_TASK_CHUNKS = 1_000  # a task's chunks: bounded work (and body) per delivery
BATCH_CHUNKS = 64  # chunks per read + delete round: bounded memory
BULK_KINDS = ("bulk_ingest", "region_reprocess")  # one cell timestamp per run
FEATURE_COLUMNS = [a.key for a in ATTRIBUTES]
LINEAGE_COLUMNS = [b"run", b"params", b"code", b"input"]
# a version's feature cells; its lineage is one row per (chunk, run), not cells per row
# (rows written before lineage rows also held the four LINEAGE_COLUMNS)
CELLS_PER_VERSION = len(FEATURE_COLUMNS)
MS = 1000  # Bigtable cell timestamps are whole milliseconds, in microseconds
MAX_COLLIDED = 1_000  # collided (row, micros) pairs a rollback's record names


class BadRollbackTask(BadRequest):
    """A rollback task no retry can run: permanent (answered 200, logged, not retried)."""


# -- key ranges ----------------------------------------------------------------------
# The L2 ids of one atomic chunk share its chunk id in their high bits, so their
# ``%020d`` row keys are one contiguous range: [chunk_id, chunk_id + 2**segment_bits).


def segment_span(layer: int, spatial_bits: SpatialBits) -> int:
    """How many ids one chunk of ``layer`` holds: the width of its key range."""
    return 1 << (64 - 8 - 3 * int(spatial_bits.bits_for(np.array([layer]))[0]))


def chunk_key_ranges(
    chunk_ids: np.ndarray | Sequence[int], spatial_bits: SpatialBits
) -> list[KeyRange]:
    """``[start, end)`` row-key ranges of the ids in ``chunk_ids`` (chunk ids of one layer:
    layer 2 for cache rows, layer 1 for a graph's supervoxels), adjacent chunks merged."""
    ids = np.unique(np.asarray(chunk_ids, dtype=np.uint64))
    if ids.size == 0:
        return []
    layers = np.unique(get_layer(ids))
    if layers.size != 1:
        raise ValueError("chunk key ranges need chunk ids of one layer")
    span = segment_span(int(layers[0]), spatial_bits)
    ranges: list[list[int]] = []
    for cid in ids.tolist():
        if ranges and ranges[-1][1] == cid:
            ranges[-1][1] = cid + span
        else:
            ranges.append([cid, cid + span])
    return [(b"%020d" % lo, b"%020d" % hi) for lo, hi in ranges]


# -- the deletion -------------------------------------------------------------------


def own_timestamp_ms(run: RunRecord) -> int | None:
    """The one cell timestamp of a bulk or region run; None for a stream run (each
    message's cells carry that message's time)."""
    return run.cell_timestamp_ms if run.kind in BULK_KINDS else None


@dataclass
class ChunkRollback:
    """What a rollback of some chunks read and deleted (or, dry, would delete)."""

    chunks: int = 0  # chunk ids given
    ranges: int = 0  # key ranges read (adjacent chunks merged)
    rows_scanned: int = 0  # rows returned: only rows holding a selected version
    rows_touched: int = 0  # rows mutated (dry run: that would be)
    versions_deleted: int = 0  # (row, timestamp) versions removed (dry run: that would be)
    runs: dict[str, int] = field(default_factory=dict)  # run id -> its versions deleted
    # deleted versions another run's lineage row names too: that run wrote the same cell
    # in the same millisecond, Bigtable kept one of the two values (not recorded which),
    # so the deletion may have removed the other run's value: recompute those ids
    collisions: int = 0
    # the first MAX_COLLIDED of them: [row key, micros, [the other runs]], to recompute
    collided: list[list[Any]] = field(default_factory=list)

    def add(self, other: ChunkRollback) -> None:
        """Fold another batch's counts in."""
        for key, value in asdict(other).items():
            if key == "runs":
                for run_id, n in value.items():
                    self.runs[run_id] = self.runs.get(run_id, 0) + n
            elif key == "collided":
                self.collided.extend(value[: MAX_COLLIDED - len(self.collided)])
            else:
                setattr(self, key, getattr(self, key) + value)


def collided_pairs(
    collisions: dict[tuple[bytes, int], set[str]], room: int = MAX_COLLIDED
) -> list[list[Any]]:
    """The first ``room`` collisions in key order as ``[row key, micros, [other runs]]``
    (JSON-ready): what a rollback's record names, so the ids to recompute are known
    without re-reading lineage that the rollback itself deleted."""
    return [
        [key.decode(), micros, sorted(others)]
        for (key, micros), others in sorted(collisions.items())[: max(room, 0)]
    ]


def report_collisions(runs: str, collisions: dict[tuple[bytes, int], set[str]]) -> None:
    """Log the versions a rollback deletes that another run also wrote in the same
    millisecond (Bigtable kept one of the values, not recorded which): those ids may
    have lost the other run's value and should be recomputed."""
    for (key, micros), others in sorted(collisions.items()):
        log.warning(
            "rollback of %s: version %s of row %s was also written by %s in the same "
            "millisecond; one value was kept, deleted anyway",
            runs,
            micros,
            key.decode(),
            ",".join(sorted(others)),
        )


def rollback_chunks(
    table: Table | str,
    run_ids: Sequence[str],
    chunk_ids: Sequence[int],
    spatial_bits: SpatialBits,
    stamps_ms: Sequence[int] | None = None,
    dry_run: bool = False,
    batch_chunks: int = BATCH_CHUNKS,
    reader: RowReader | None = None,
) -> ChunkRollback:
    """Delete, in the key ranges of ``chunk_ids`` only, every version one of ``run_ids``
    wrote (its chunk's lineage row names the run, or, for rows written before lineage
    rows, the row's own ``lineage:run``; with ``stamps_ms``, only at those timestamps):
    feature cells at exactly those timestamps, so the versions other runs wrote in the
    same rows stay, then the lineage rows that named them. Read and deleted
    ``batch_chunks`` at a time, so memory is bounded by one batch's rows; ``dry_run``
    reads and counts only."""
    reader = reader or RowReader(table)
    window: dict[str, int] = {}
    if stamps_ms:
        window = {"start_micros": min(stamps_ms) * MS, "end_micros": (max(stamps_ms) + 1) * MS}
    stamps_us = None if stamps_ms is None else {s * MS for s in stamps_ms}
    done = ChunkRollback()
    ids = list(chunk_ids)
    for start in range(0, len(ids), batch_chunks):
        batch = ids[start : start + batch_chunks]
        ranges = chunk_key_ranges(batch, spatial_bits)
        found = lineage_rows.run_versions(reader, run_ids, ranges, stamps=stamps_us, **window)
        rows = []
        for key, by_run in found.rows.items():
            row = Row(key)
            for micros in sorted(set().union(*by_run.values())):
                delete_version(row, micros, found.old_layout_read)
            rows.append(row)
            for run_id, micros_set in by_run.items():
                done.versions_deleted += len(micros_set)
                done.runs[run_id] = done.runs.get(run_id, 0) + len(micros_set)
        if not dry_run:
            if rows:
                write_rows(table, rows, "rollback")
            if found.lineage:  # after the versions they name (also when a crash left them)
                write_rows(table, lineage_rows.delete_lineage_rows(found.lineage), "rollback")
        done.chunks += len(batch)
        done.ranges += len(ranges)
        done.rows_scanned += found.scanned
        done.rows_touched += len(rows)
        done.collisions += len(found.collisions)
        done.collided += collided_pairs(found.collisions, MAX_COLLIDED - len(done.collided))
        report_collisions(",".join(run_ids), found.collisions)
    return done


def delete_version(row: Row, micros: int, old_layout: bool) -> None:
    """Delete the feature cells of the version at ``micros``, and with ``old_layout``
    (the table is not marked migrated: :attr:`lineage_rows.Versions.old_layout_read`)
    the row's own lineage cells, which rows written before lineage rows have: 8
    mutations per version on a new-layout table instead of 12."""
    row.delete_cells(FEATURE_FAMILY, FEATURE_COLUMNS, micros, micros + MS)
    if old_layout:
        row.delete_cells(LINEAGE_FAMILY, LINEAGE_COLUMNS, micros, micros + MS)


# -- the task ------------------------------------------------------------------------


def record_key(dataset: str, at_ms: int, run_id: str) -> str:
    """The runs-table key of one rollback's operator record (time order per dataset)."""
    return f"rollback:{dataset}:{at_ms:013d}:{run_id}"


def task_payload(
    dataset: str, run_id: str, chunk_ids: Sequence[int], record: str | None = None
) -> dict[str, Any]:
    """The body of one rollback task (chunk ids sorted: one chunk set, one body)."""
    body: dict[str, Any] = {
        "kind": KIND,
        "dataset": dataset,
        "run_id": run_id,
        "chunks": sorted({int(c) for c in chunk_ids}),
    }
    if record is not None:
        body["record"] = record
    return body


def task_name(run_id: str, chunk_ids: Sequence[int]) -> str:
    """Deterministic name of the task rolling back ``chunk_ids`` of ``run_id``: the same
    chunks give the same name, so a repeated rollback (or a retried enqueue) is dropped
    by the queue as a duplicate. The digest comes first, so names scatter over the
    queue's key space instead of sharing one prefix."""
    chunks = ",".join(str(c) for c in sorted({int(c) for c in chunk_ids}))
    digest = hashlib.sha256(f"{run_id}|{chunks}".encode()).hexdigest()[:24]
    return f"{digest}-rollback-{re.sub(r'[^A-Za-z0-9_-]', '_', run_id)[:400]}"


def enqueue_rollback(
    client: CloudTasksClient,
    cfg: TasksConfig,
    dataset: str,
    run_id: str,
    chunk_ids: Sequence[int],
    record: str | None = None,
) -> str | None:
    """Enqueue one rollback task; None when a task of that name exists (a duplicate)."""
    from l2cache.gcp.tasks import enqueue

    payload = task_payload(dataset, run_id, chunk_ids, record)
    return enqueue(client, cfg, payload, task_name(run_id, chunk_ids))


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_rollback_task(task: dict[str, Any]) -> dict[str, Any]:
    """Validate a rollback task's body (shape only; chunk ids against the dataset in
    :func:`check_chunks`). Raises :class:`BadRollbackTask` for anything unexpected."""
    allowed = {"kind", "dataset", "run_id", "chunks", "record"}
    extra = sorted(set(task) - allowed)
    if extra:
        raise BadRollbackTask(f"rollback task has unknown field(s) {extra}")
    if task.get("kind") != KIND:
        raise BadRollbackTask(f"not a rollback task (kind {task.get('kind')!r})")
    for key in ("dataset", "run_id"):
        if not isinstance(task.get(key), str) or not task[key]:
            raise BadRollbackTask(f"rollback task needs a non-empty string {key!r}")
    chunks = task.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise BadRollbackTask("rollback task needs 'chunks', a non-empty list of chunk ids")
    if len(chunks) > MAX_TASK_CHUNKS:
        raise BadRollbackTask(
            f"rollback task names {len(chunks)} chunks (at most {MAX_TASK_CHUNKS})"
        )
    if not all(_int(c) and 0 < c < 2**64 for c in chunks):
        raise BadRollbackTask("rollback task chunks must be positive uint64 chunk ids")
    record = task.get("record")
    if record is not None:
        prefix = f"rollback:{task['dataset']}:"
        if not (
            isinstance(record, str)
            and record.startswith(prefix)
            and record.endswith(f":{task['run_id']}")
        ):
            raise BadRollbackTask(f"rollback task record must be a {prefix}...:<run_id> key")
    return task


def check_chunks(chunk_ids: Sequence[int], spatial_bits: SpatialBits) -> None:
    """Every id must be a layer-2 *chunk* id (segment bits zero): anything else would
    name a key range that is not one chunk's."""
    ids = np.asarray(chunk_ids, dtype=np.uint64)
    if (get_layer(ids) != 2).any():
        raise BadRollbackTask("rollback task chunks must be layer-2 chunk ids")
    span = np.uint64(segment_span(2, spatial_bits))
    if (ids % span != 0).any():
        raise BadRollbackTask("rollback task chunks must be chunk ids (segment bits zero)")


def handle_rollback_task(
    ctx: DatasetContext, run: RunRecord, task: dict[str, Any], last: bool
) -> tuple[int, dict[str, Any]]:
    """Run one rollback task: (HTTP status, JSON summary) under the failure contract.

    200 when done or permanently bad (logged, not retried); 503 on a transient failure
    (Bigtable hiccup), 200 after logging on the last attempt. The record named by the
    task counts finished tasks and deleted versions, so the operator sees the fan-out
    complete.
    """
    try:
        parse_rollback_task(task)
        if task["dataset"] != run.dataset:
            raise BadRollbackTask(f"run {run.run_id} belongs to dataset {run.dataset!r}")
        check_chunks(task["chunks"], ctx.dataset.spatial_bits)
    except BadRollbackTask as exc:
        log.error("rollback task rejected: %s (permanent, not retried)", exc)
        return 200, {"status": "rejected", "error": str(exc)}
    stamp = own_timestamp_ms(run)
    try:
        done = rollback_chunks(
            ctx.store.table,
            [run.run_id],
            task["chunks"],
            ctx.dataset.spatial_bits,
            None if stamp is None else [stamp],
        )
        if task.get("record"):
            increment_many(
                ctx.ledger.table,
                task["record"].encode(),
                RUN_FAMILY,
                {
                    b"tasks_done": 1,
                    b"versions_deleted": done.versions_deleted,
                    b"rows_touched": done.rows_touched,
                    b"collisions": done.collisions,
                },
                what="record",
            )
            if done.collided:  # one column per task (its first chunk): tasks never race
                row = Row(task["record"].encode())
                column = b"collided:%d" % min(task["chunks"])
                row.set_cell(RUN_FAMILY, column, json.dumps(done.collided).encode())
                write_rows(ctx.ledger.table, [row], "record")
    except Exception as exc:
        if last:
            log.exception("rollback task of run %s gave up", run.run_id)
            return 200, {"status": "failed", "error": describe(exc)}
        log.exception("rollback task failed; Cloud Tasks will retry")
        return 503, {"status": "error", "error": describe(exc)}
    log.info("rollback task of run %s: %s", run.run_id, asdict(done))
    return 200, {"status": "done", **asdict(done)}
