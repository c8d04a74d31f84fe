"""Releases: QC-passed runs promoted to a dataset's current state, with region rollback.

Every run writes straight into the served cache table (the lookup serves the newest
version of each row), so a release does not move data: it records that a run passed
QC and is the state the dataset is expected to be in, with the run's lineage. What it
buys is a point to return to: rolling back the current release (or a region of it)
deletes, in that region only, every cell version written by bulk or region runs after
the release each chunk had before (the previous release covering that chunk), so the
previous release's bytes are current again there. Versions written by edit streams
and missing-id runs are kept: they are new L2 ids the previous release never had.

Rows of the runs table: ``release:<dataset>:<%010d seq>`` (one per release, JSON in
``meta``: release number, run, region, promoted_at, QC verdict, lineage, rollbacks) and
``release:<dataset>`` (the atomic release counter). A rollback walks the region's
chunks one at a time and reads, a bounded batch at a time, only the key ranges of the
chunks some later bulk or region run's region holds
(:func:`l2cache.handlers.rollback_task.rollback_chunks`), never the whole table; above
:data:`l2cache_ops.rollback.FAN_OUT_CHUNKS` chunks it enqueues ``rollback`` tasks (one
run each, at that run's own timestamp) instead. It records on the release what it read,
deleted or enqueued and how long it took; ``dry_run`` writes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from itertools import product
from typing import TYPE_CHECKING, Any

import numpy as np

from l2cache.domain.ids import SpatialBits, chunk_id_from_coords
from l2cache.domain.lineage import utc_now
from l2cache.domain.regions import region_from_bbox, region_size
from l2cache.handlers.rollback_task import BATCH_CHUNKS, ChunkRollback, record_key, rollback_chunks
from l2cache.store.ledger import RunLedger
from l2cache_ops.ledger import list_runs, next_sequence, put_record, records
from l2cache_ops.qc_reports import BATCH_KINDS, load_report
from l2cache_ops.rollback import FAN_OUT_CHUNKS, TASK_CHUNKS, Enqueue

if TYPE_CHECKING:  # annotations only: l2cache.compute loads the feature engine (numba)
    from l2cache.compute import DatasetContext

PREFIX = "release:"


class ReleaseRefused(ValueError):
    """A promotion or rollback that would break the release contract; says why."""


def _key(dataset: str, seq: int | None = None) -> str:
    """A release's record key (zero-padded, so key order is release order), or the
    dataset's release counter without ``seq``."""
    return f"{PREFIX}{dataset}" if seq is None else f"{PREFIX}{dataset}:{seq:010d}"


def release_history(ledger: RunLedger, dataset: str) -> list[dict[str, Any]]:
    """Every release of ``dataset``, oldest first, with lineage and rollbacks."""
    out = []
    for _, cells in records(ledger, f"{PREFIX}{dataset}:"):
        if "meta" in cells:
            out.append(json.loads(cells["meta"]))
    return sorted(out, key=lambda r: r["release"])


def current_release(ledger: RunLedger, dataset: str) -> dict[str, Any] | None:
    """The newest release not wholly rolled back (a region rollback keeps it current
    outside that region); None when the dataset has none."""
    live = [r for r in release_history(ledger, dataset) if not r["rolled_back"]]
    return live[-1] if live else None


def release_state(ledger: RunLedger, dataset: str) -> str:
    """Changes whenever a release is promoted or rolled back: a QC report records it,
    and promotion refuses a report whose diff was taken against another state."""
    history = release_history(ledger, dataset)
    last = history[-1]["release"] if history else 0
    return f"{last}:{sum(len(r['rollbacks']) for r in history)}"


def _in_box(coords: Sequence[int], box: Sequence[int]) -> bool:
    """Whether chunk ``coords`` lies in ``box`` ``[x0, y0, z0, x1, y1, z1)``."""
    return all(box[a] <= coords[a] < box[a + 3] for a in range(3))


def covers(release: dict[str, Any], coords: Sequence[int]) -> bool:
    """Whether ``release`` is what chunk ``coords`` should hold (in its region, not rolled back)."""
    if release["rolled_back"] or not _in_box(coords, release["region"]):
        return False
    return not any(_in_box(coords, rb["region"]) for rb in release["rollbacks"])


def promote(ledger: RunLedger, dataset: str, run_id: str) -> dict[str, Any]:
    """Make a QC-passed run the dataset's current release; refuses with the reason otherwise."""
    run = ledger.get_run(run_id)
    if run.dataset != dataset:
        raise ReleaseRefused(f"run {run_id} belongs to dataset {run.dataset!r}, not {dataset!r}")
    report = load_report(ledger, run_id, with_chunks=False)
    if report is None:
        raise ReleaseRefused(
            f"run {run_id} has no QC report: run `l2cache qc {dataset} {run_id}` first"
        )
    if not report["passed"]:
        raise ReleaseRefused(f"run {run_id} failed QC: {'; '.join(report['reasons'])}")
    history = release_history(ledger, dataset)
    for r in history:
        if r["run_id"] == run_id:
            state = "was rolled back" if r["rolled_back"] or r["rollbacks"] else "is current"
            raise ReleaseRefused(f"run {run_id} is already release {r['release']} ({state})")
    now_state = release_state(ledger, dataset)
    if report["release_state"] != now_state:
        raise ReleaseRefused(
            f"the QC of run {run_id} was diffed against another release state "
            f"({report['release_state']}, now {now_state}): run `l2cache qc {dataset} {run_id}` again"
        )
    seq = next_sequence(ledger, _key(dataset))
    record = {
        "release": seq,
        "dataset": dataset,
        "run_id": run_id,
        "kind": run.kind,
        "region": run.region,
        "promoted_at": utc_now().isoformat(),
        "qc_passed": True,
        "qc_created_at": report["created_at"],
        "coverage": report["coverage"]["ratio"],
        "lineage": run.provenance(),
        "rolled_back": False,
        "rolled_back_at": None,
        "rollbacks": [],
    }
    _write(ledger, record)
    return record


def _write(ledger: RunLedger, record: dict[str, Any]) -> None:
    """Store (replace) a release's record: promotion and each rollback rewrite it whole."""
    put_record(
        ledger, _key(record["dataset"], record["release"]), {"meta": json.dumps(record).encode()}
    )


def _intersect(a: Sequence[int], b: Sequence[int]) -> list[int] | None:
    """The overlap of two boxes ``[x0, y0, z0, x1, y1, z1)``; None when they do not meet."""
    lo = [max(a[i], b[i]) for i in range(3)]
    hi = [min(a[i + 3], b[i + 3]) for i in range(3)]
    return None if any(h <= low for low, h in zip(lo, hi, strict=True)) else [*lo, *hi]


def chunk_id_of(coords: Sequence[int], bits: SpatialBits) -> int:
    """The layer-2 chunk id of chunk ``coords`` (the cache's key range of that chunk)."""
    return int(chunk_id_from_coords(2, np.asarray([coords]), bits)[0])


def _box_chunks(box: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """The chunks of ``box``, one at a time (a whole release may hold millions)."""
    x0, y0, z0, x1, y1, z1 = box
    return product(range(x0, x1), range(y0, y1), range(z0, z1))


def rollback_release(
    ctx: DatasetContext,
    bbox_voxels: Sequence[int] | None = None,
    *,
    dry_run: bool = False,
    enqueue: Enqueue | None = None,
    fan_out_chunks: int = FAN_OUT_CHUNKS,
    task_chunks: int = TASK_CHUNKS,
    batch_chunks: int = BATCH_CHUNKS,
) -> dict[str, Any]:
    """Roll the current release back in a region (voxel box; default its whole region).

    Per chunk, the cut-off is the cell timestamp of the previous release covering the
    chunk (none: the rolled-back release's own timestamp, inclusive); every version
    newer than it written by a bulk or region run of the dataset whose region holds
    the chunk is deleted, within the chunk's key range only. Chunks are walked one at
    a time and read and deleted ``batch_chunks`` at a time (chunks with the same runs
    to undo share a read), so memory is bounded whatever the region's size; above
    ``fan_out_chunks`` chunks, with ``enqueue``, one ``rollback`` task per run and
    ``task_chunks`` chunks is enqueued instead (each deletes only that run's versions
    at its own timestamp). ``dry_run`` writes nothing: up to the threshold it counts
    exactly, beyond it reports the chunks and runs (and tasks) only. Returns what was
    read, deleted (or would be) and how long it took; a real rollback is recorded on
    the release.
    """
    ledger, ds, table = ctx.ledger, ctx.dataset, ctx.store.table
    history = release_history(ledger, ds.name)
    live = [r for r in history if not r["rolled_back"]]
    if not live:
        raise ReleaseRefused(f"dataset {ds.name} has no current release to roll back")
    current = live[-1]
    whole = bbox_voxels is None
    box = (
        current["region"]
        if whole
        else _intersect(current["region"], region_from_bbox(ds, bbox_voxels))
    )
    if box is None:
        raise ReleaseRefused(
            f"region {list(bbox_voxels)} does not overlap release {current['release']}'s "
            f"region (chunks {current['region']})"
        )
    t0 = time.perf_counter()
    now = utc_now()
    at_ms = int(now.timestamp() * 1000)
    earlier = list(reversed(live[:-1]))  # newest first
    own_ms = current["lineage"]["cell_timestamp_ms"]
    # every bulk or region run of the dataset; per chunk, those newer than its cut-off
    runs = [r for r in list_runs(ledger) if r.dataset == ds.name and r.kind in BATCH_KINDS]
    stamp_of = {r.run_id: r.cell_timestamp_ms for r in runs}
    n_chunks = region_size(box)
    if n_chunks > fan_out_chunks:
        mode = "queued" if enqueue is not None else "estimate" if dry_run else "inline"
    else:
        mode = "inline"
    size = task_chunks if mode == "queued" else batch_chunks
    bits = ds.spatial_bits
    totals = ChunkRollback()
    tasks: dict[str, int] = {}  # run id -> tasks (queued, or that would be)
    restored: set[int] = set()  # the earlier releases whose values show again
    chunks_to_undo = 0
    groups: dict[tuple[str, ...], list[int]] = {}  # runs to undo -> chunk ids waiting

    def flush(run_ids: tuple[str, ...], chunk_ids: list[int]) -> None:
        if mode == "inline":
            stamps = [stamp_of[r] for r in run_ids]
            totals.add(
                rollback_chunks(table, run_ids, chunk_ids, bits, stamps, dry_run, batch_chunks)
            )
        elif mode == "queued":
            for run_id in run_ids:
                tasks[run_id] = tasks.get(run_id, 0) + 1
                if not dry_run and enqueue is not None:
                    enqueue(run_id, chunk_ids, record_key(ds.name, at_ms, run_id))
        else:
            for run_id in run_ids:
                tasks[run_id] = tasks.get(run_id, 0)

    for coords in _box_chunks(box):
        # a chunk rolled back before is done again: runs since may have written it
        prev = next((r for r in earlier if covers(r, coords)), None)
        cutoff = prev["lineage"]["cell_timestamp_ms"] if prev else own_ms - 1
        if prev:
            restored.add(prev["release"])
        undo = tuple(
            r.run_id
            for r in runs
            if r.cell_timestamp_ms > cutoff and (r.region is None or _in_box(coords, r.region))
        )
        if not undo:
            continue
        chunks_to_undo += 1
        waiting = groups.setdefault(undo, [])
        waiting.append(chunk_id_of(coords, bits))
        if len(waiting) >= size:
            flush(undo, waiting)
            groups[undo] = []
    for undo, waiting in groups.items():
        if waiting:
            flush(undo, waiting)
    seconds = time.perf_counter() - t0
    per_run = totals.runs if mode == "inline" else {r: 0 for r in tasks}
    event = {
        "at": now.isoformat(),
        "region": box,
        "whole": whole,
        "chunks": n_chunks,
        "chunks_to_undo": chunks_to_undo,
        "mode": mode,
        "tasks": sum(tasks.values()),
        "ranges": totals.ranges,
        "rows_scanned": totals.rows_scanned,
        "rows_touched": totals.rows_touched,
        "versions_deleted": totals.versions_deleted,
        "runs": per_run,
        "seconds": round(seconds, 4),
    }
    out = {"release": current["release"], "restored": sorted(restored), "dry_run": dry_run}
    if dry_run:
        return {**out, **event}
    current["rollbacks"].append(event)
    if whole:
        current["rolled_back"] = True
        current["rolled_back_at"] = event["at"]
    _write(ledger, current)
    for run_id, n in tasks.items():  # the fanned-out tasks count their progress here
        record = {"release": current["release"], "run_id": run_id, "mode": mode, "tasks": n}
        record.update(at=event["at"], dataset=ds.name, dry_run=False)
        put_record(
            ledger, record_key(ds.name, at_ms, run_id), {"meta": json.dumps(record).encode()}
        )
    return {**out, **event}
