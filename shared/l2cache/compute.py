"""Compute and store features: a whole chunk (ingest) or chosen L2 ids (edits).

Both paths read a chunk once (supervoxels via CloudVolume, their L2 parents at the
run's graph time), remap it to L2 labels and run the engine; the edit path passes
``only=`` so the rest of the chunk still shapes the EDT and the faces.

Input integrity comes before any write: a chunk whose supervoxels have no L2 parent,
or whose parents belong to another chunk, is :class:`~l2cache.domain.failures.InconsistentInput`
and is never written as done with partial features; one whose faces do not match the
graph's cross-chunk edges (mirrored, transposed) is its subclass ``GeometryMismatch``
(:mod:`l2cache.inputs.geometry_check`). Errors follow the one failure
contract of :mod:`l2cache.domain.failures`: permanent ones are recorded and not retried,
transient ones propagate (the caller answers 5xx) until the last attempt, which
records "gave up after N attempts".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from l2cache.config import DatasetConfig, L2CacheConfig
from l2cache.domain import ids as idlib
from l2cache.domain.failures import (
    PERMANENT,
    InconsistentInput,
    PermanentError,
    classify,
    describe,
    gave_up,
)
from l2cache.engine.chunk_labels import ChunkLabels, labels_from_supervoxels
from l2cache.engine.chunk_qc import chunk_qc
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.inputs.geometry_check import check_geometry, chunk_faces
from l2cache.inputs.graph import GraphReader, make_graph_reader
from l2cache.inputs.volume import read_chunk
from l2cache.store.cache import CacheStore
from l2cache.store.ledger import RunLedger, RunRecord
from l2cache.support import logs

__all__ = [
    "PermanentError",
    "compute_chunk",
    "compute_chunks",
    "compute_l2_ids",
    "dataset_context",
    "load_chunk_l2",
]


@dataclass
class DatasetContext:
    """Everything a worker needs for one dataset, built once per process."""

    dataset: DatasetConfig
    store: CacheStore
    graph: GraphReader
    ledger: RunLedger


_contexts: dict[tuple[str, str], DatasetContext] = {}


def dataset_context(config: L2CacheConfig, name: str) -> DatasetContext:
    """Cached per process: Cloud Functions reuse an instance across requests."""
    key = (config.source, name)
    if key not in _contexts:
        ds = config.dataset(name)
        instance = bigtable_instance(config.bigtable.project, config.bigtable.instance)
        _contexts[key] = DatasetContext(
            ds,
            CacheStore(instance.table(ds.cache_table_id), ds),
            make_graph_reader(ds),
            RunLedger(instance.table(config.runs_table_id)),
        )
    return _contexts[key]


def load_chunk_l2(
    ctx: DatasetContext, coords: Sequence[int], timestamp: datetime | None
) -> ChunkLabels:
    """Read, relabel and check one chunk; raises a PermanentError for bad input."""
    coords = [int(c) for c in coords]
    sv = read_chunk(
        ctx.dataset,
        coords,
        lambda: ctx.graph.has_supervoxels(coords, ctx.dataset.spatial_bits),
    )
    faces = chunk_faces(sv)  # for check_geometry, before the supervoxels are relabelled
    chunk = labels_from_supervoxels(sv, lambda ids: ctx.graph.l2_parents(ids, timestamp))
    check_consistency(ctx, chunk, coords, timestamp)
    check_complete(ctx, chunk, coords)
    check_geometry(ctx.graph, faces, coords, ctx.dataset.spatial_bits)
    return chunk


def check_complete(ctx: DatasetContext, chunk: ChunkLabels, coords: Sequence[int]) -> None:
    """Every supervoxel the graph has in the chunk must be in its segmentation: a file
    that decodes but lost part of its content (zeroed, truncated rewrite) would
    otherwise be written as done with partial features."""
    expected = ctx.graph.chunk_supervoxels(coords, ctx.dataset.spatial_bits)
    if expected is None:
        return
    absent = np.setdiff1d(expected, chunk.sv_ids, assume_unique=True)
    if absent.size:
        raise InconsistentInput(
            f"chunk {tuple(coords)}: {absent.size} of the graph's {expected.size} supervoxels "
            f"are absent from the segmentation (e.g. {absent[:3].tolist()}); the input is "
            "incomplete",
            missing_sv=int(absent.size),
        )


def check_consistency(
    ctx: DatasetContext, chunk: ChunkLabels, coords: Sequence[int], timestamp: datetime | None
) -> None:
    """Supervoxels and graph must agree: every supervoxel has an L2 parent in this chunk."""
    at = timestamp.isoformat() if timestamp else "now"
    if chunk.unmapped_sv:
        sample = chunk.sv_ids[chunk.parents == 0][:3].tolist()
        raise InconsistentInput(
            f"chunk {tuple(coords)}: {chunk.unmapped_sv} of {chunk.sv_ids.size} supervoxels "
            f"have no L2 parent in the graph at {at} (e.g. {sample})",
            unmapped_sv=chunk.unmapped_sv,
        )
    l2 = chunk.l2_ids
    if l2.size == 0:
        return
    wrong_layer = idlib.get_layer(l2) != 2
    elsewhere = (idlib.get_chunk_coords(l2, ctx.dataset.spatial_bits) != np.asarray(coords)).any(1)
    stray = l2[wrong_layer | elsewhere]
    if stray.size:
        raise InconsistentInput(
            f"chunk {tuple(coords)}: {stray.size} L2 parents are not layer-2 nodes of this "
            f"chunk (e.g. {stray[:3].tolist()}); the graph and the segmentation disagree",
            stray_ids=int(stray.size),
        )


def chunk_id(ctx: DatasetContext, coords: Sequence[int]) -> int:
    """The layer-2 chunk id of chunk ``coords``: the ledger's key for the chunk."""
    return int(idlib.chunk_id_from_coords(2, np.asarray(coords)[None], ctx.dataset.spatial_bits)[0])


@logs.chunk
def compute_chunk(
    ctx: DatasetContext,
    run: RunRecord,
    coords: Sequence[int],
    last_attempt: bool = False,
    task_attempt: int | None = None,
    load: Callable[[], ChunkLabels] | None = None,
) -> dict:
    """Compute and write every L2 node of one chunk; record the outcome in the ledger.

    Returns the outcome for a permanent failure, or a transient one on the task's last
    attempt (``last_attempt``, from the transport; ``task_attempt`` is its number);
    re-raises any other transient failure after recording it as ``retrying``.
    ``load`` replaces :func:`load_chunk_l2` (a batch passes its read-ahead); whatever
    it raises is classified exactly as a direct read's failure would be.
    """
    cid = chunk_id(ctx, coords)
    attempt = ctx.ledger.chunk_started(run, cid, coords)
    t0 = time.perf_counter()
    try:
        run.check_revision()
        chunk = load() if load is not None else load_chunk_l2(ctx, coords, run.snapshot)
        feats = compute_features(chunk.dense, ctx.dataset.resolution)
        # QC statistics while the features are in hand: QC then merges them, never re-reads
        qc = chunk_qc(feats, ctx.dataset, graph_l2=int(chunk.l2_ids.size))
        ctx.ledger.check_open(run)  # the fence: after the live mark, before any cell
        written = ctx.store.write_features(feats, run.lineage(chunk.checksum))
    except Exception as exc:
        permanent = classify(exc) == PERMANENT
        if permanent or last_attempt:
            reason = describe(exc) if permanent else gave_up(task_attempt or attempt, exc)
            counts = getattr(exc, "counts", {})  # unmapped / stray / missing supervoxels
            ctx.ledger.chunk_finished(
                run,
                cid,
                coords,
                "failed",
                attempt=attempt,
                error=reason,
                permanent=permanent,
                **counts,
            )
            return {"chunk": list(coords), "status": "failed", "error": reason, "attempt": attempt}
        ctx.ledger.chunk_finished(
            run, cid, coords, "retrying", attempt=attempt, error=describe(exc)
        )
        raise
    duration = time.perf_counter() - t0
    ctx.ledger.chunk_finished(
        run,
        cid,
        coords,
        "done",
        attempt=attempt,
        l2_count=written,
        input_checksum=chunk.checksum,
        duration_s=round(duration, 4),
        voxels=int(chunk.dense.size),
        supervoxels=int(chunk.sv_ids.size),
        unmapped_sv=chunk.unmapped_sv,
        stray_ids=0,
        missing_sv=0,
        code_revision=run.lineage().code_revision,
        qc=qc.summary,
        qc_bins=qc.bins,
    )
    return {"chunk": list(coords), "status": "done", "l2_count": written, "attempt": attempt}


def compute_chunks(
    ctx: DatasetContext,
    run: RunRecord,
    chunks: Sequence[Sequence[int]],
    last_attempt: bool = False,
    task_attempt: int | None = None,
    read_ahead: bool = False,
) -> list[dict]:
    """:func:`compute_chunk` for each chunk of a batch, in order; optionally reading ahead.

    With ``read_ahead`` a thread loads chunk i+1 (storage read and decode, graph
    parents, checksum, integrity checks) while chunk i computes and writes. What it can
    hide is bounded by the GIL: the engine's numba passes and the waits on Bigtable
    release it, but ``edt.edt`` (edt 3.1.2 calls its C++ without releasing the GIL)
    does not, so the read overlaps ~1/4 of a chunk's compute, and only with a second
    vCPU (BENCHMARKS.md, "Worker path": 1.41 -> 1.32x the EDT per chunk of a 4-chunk
    batch on 2 cores, nothing beyond noise on 1, +190 MiB peak). Hence off unless the map's ``tasks.read_ahead`` says
    so (infra then sizes the worker for it).

    Memory stays bounded: the next load starts only once the current chunk is loaded
    (its uint64 supervoxels already freed), so at most one read is in flight next to
    one engine. Outcomes are exactly the sequential ones: a read-ahead's exception is
    raised where :func:`compute_chunk` would have read, and a chunk that raises
    (transient, not the last attempt) stops the batch as before, after the one read
    in flight has finished.
    """
    chunks = [[int(c) for c in coords] for coords in chunks]
    if not read_ahead or len(chunks) < 2:
        return [compute_chunk(ctx, run, c, last_attempt, task_attempt) for c in chunks]
    results = []
    with ThreadPoolExecutor(1, thread_name_prefix="l2cache-read-ahead") as pool:
        ahead = _ReadAhead(ctx, run, chunks, pool)
        for i, coords in enumerate(chunks):
            try:
                load = ahead.loader(i)
                results.append(
                    compute_chunk(ctx, run, coords, last_attempt, task_attempt, load=load)
                )
            finally:
                ahead.drop(i)  # a chunk that failed before loading leaves no read behind
    return results


class _ReadAhead:
    """Chunk i's load: the future started while chunk i-1 computed, else a direct read;
    either way chunk i+1's load is started as soon as chunk i's has ended."""

    def __init__(
        self, ctx: DatasetContext, run: RunRecord, chunks: list, pool: ThreadPoolExecutor
    ) -> None:
        self.ctx, self.run, self.chunks, self.pool = ctx, run, chunks, pool
        self.pending: dict[int, Future] = {}

    def drop(self, i: int) -> None:
        """Forget chunk i's read if it was never taken (cancelled when not started)."""
        future = self.pending.pop(i, None)
        if future is not None:
            future.cancel()

    def _read(self, i: int) -> ChunkLabels:
        return load_chunk_l2(self.ctx, self.chunks[i], self.run.snapshot)

    def loader(self, i: int) -> Callable[[], ChunkLabels]:
        def load() -> ChunkLabels:
            future = self.pending.pop(i, None)
            try:
                return future.result() if future is not None else self._read(i)
            finally:
                if i + 1 < len(self.chunks):
                    self.pending[i + 1] = self.pool.submit(self._read, i + 1)

        return load


def group_by_chunk(
    dataset: DatasetConfig, l2ids: np.ndarray | Sequence[int]
) -> tuple[int, list[tuple[list[int], np.ndarray]]]:
    """(number of ids that are not layer 2, [(chunk coords, its ids)]) for distinct ids."""
    l2ids = np.unique(idlib.as_uint64(l2ids))
    valid = l2ids[idlib.get_layer(l2ids) == 2]
    coords = idlib.get_chunk_coords(valid, dataset.spatial_bits)
    groups = [
        (chunk.tolist(), valid[(coords == chunk).all(1)]) for chunk in np.unique(coords, axis=0)
    ]
    return int(l2ids.size - valid.size), groups


def compute_l2_ids(
    ctx: DatasetContext,
    l2ids: np.ndarray,
    timestamp: datetime | None,
    run: RunRecord,
    cell_timestamp: datetime | None = None,
    event_key: str | None = None,
) -> dict:
    """Recompute the given L2 ids: grouped by chunk, each chunk read once.

    Per chunk: a permanent failure (outside the volume, missing/corrupt/inconsistent
    input) is reported in ``failed`` and the other chunks still run; a transient one
    propagates. With ``event_key``, each written chunk is recorded, so a redelivered
    message skips the chunks an earlier delivery already wrote.
    """
    not_layer2, groups = group_by_chunk(ctx.dataset, l2ids)
    done = ctx.ledger.event_chunks_done(run.run_id, event_key) if event_key else {}
    written, not_found, chunks, failed, skipped = 0, [], 0, [], 0
    for chunk, members in groups:
        chunk = np.asarray(chunk)
        cid = chunk_id(ctx, chunk)
        if cid in done:
            written += int(done[cid].get("written", 0))
            skipped += 1
            continue
        try:
            data = load_chunk_l2(ctx, chunk.tolist(), timestamp)
        except PermanentError as exc:
            failed.append({"chunk": chunk.tolist(), "ids": members.tolist(), "error": str(exc)})
            continue
        chunks += 1
        feats = compute_features(data.dense, ctx.dataset.resolution, only=members)
        absent = sorted(set(members.tolist()) - set(feats["l2id"].tolist()))
        not_found.extend(absent)
        mark = ctx.ledger.writing_started(run.run_id, cid, event_key or "")
        try:  # the fence, checked once the in-flight mark a rollback waits on is stored
            ctx.ledger.check_open(run)
            n = ctx.store.write_features(feats, run.lineage(data.checksum, cell_timestamp))
        finally:
            ctx.ledger.writing_ended(mark)
        written += n
        if event_key:
            ctx.ledger.event_chunk_done(
                run.run_id, event_key, cid, written=n, not_found=len(absent)
            )
    return {
        "written": written,
        "chunks_read": chunks,
        "chunks_skipped": skipped,
        "not_layer2": not_layer2,
        "not_found": not_found,
        "failed": failed,
    }
