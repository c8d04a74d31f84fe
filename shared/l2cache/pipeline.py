"""Compute and store features: a whole chunk (ingest) or chosen L2 ids (edits).

Both paths read a chunk once (supervoxels via CloudVolume, their L2 parents at the
run's graph time), remap it to L2 labels and run the engine; the edit path passes
``only=`` so the rest of the chunk still shapes the EDT and the faces. Errors are
split into permanent (bad input: recorded, never retried) and transient (anything
else: the caller answers 5xx so Cloud Tasks / Pub/Sub retry).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from . import ids as idlib
from .chunk_labels import labels_from_supervoxels
from .config import DatasetConfig, L2CacheConfig
from .features import compute_features
from .graph import GraphReader, make_graph_reader
from .runs import RunLedger, RunRecord
from .store import CacheStore
from .volume import read_chunk


class PermanentError(ValueError):
    """Retrying cannot help (chunk outside the volume, corrupt input, ...)."""


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
        from .bigtable_client import bigtable_instance

        ds = config.dataset(name)
        instance = bigtable_instance(config.bigtable.project, config.bigtable.instance)
        _contexts[key] = DatasetContext(
            ds,
            CacheStore(instance.table(ds.cache_table_id), ds),
            make_graph_reader(ds),
            RunLedger(instance.table(config.runs_table_id)),
        )
    return _contexts[key]


@dataclass(frozen=True)
class ChunkL2:
    """One chunk read and remapped to L2 labels."""

    labels: np.ndarray
    checksum: str


def load_chunk_l2(ctx: DatasetContext, coords, timestamp: datetime | None) -> ChunkL2:
    try:
        sv = read_chunk(ctx.dataset, coords)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
    chunk = labels_from_supervoxels(sv, lambda ids: ctx.graph.l2_parents(ids, timestamp))
    return ChunkL2(chunk.labels, chunk.checksum)


def chunk_id(ctx: DatasetContext, coords) -> int:
    return int(idlib.chunk_id_from_coords(2, np.asarray(coords)[None], ctx.dataset.spatial_bits)[0])


def compute_chunk(ctx: DatasetContext, run: RunRecord, coords) -> dict:
    """Compute and write every L2 node of one chunk; record it in the ledger."""
    cid = chunk_id(ctx, coords)
    attempt = ctx.ledger.chunk_started(run.run_id, cid)
    t0 = time.perf_counter()
    try:
        chunk = load_chunk_l2(ctx, coords, run.snapshot)
        feats = compute_features(chunk.labels, ctx.dataset.resolution)
        feats = _in_chunk(ctx, feats, coords)
        written = ctx.store.write_features(feats, run.lineage(chunk.checksum))
    except PermanentError as exc:
        ctx.ledger.chunk_finished(run.run_id, cid, coords, "failed", error=str(exc), permanent=True)
        return {"chunk": list(coords), "status": "failed", "error": str(exc), "attempt": attempt}
    except Exception as exc:
        ctx.ledger.chunk_finished(
            run.run_id, cid, coords, "retrying", error=f"{type(exc).__name__}: {exc}"
        )
        raise
    duration = time.perf_counter() - t0
    ctx.ledger.chunk_finished(
        run.run_id,
        cid,
        coords,
        "done",
        l2_count=written,
        input_checksum=chunk.checksum,
        duration_s=round(duration, 4),
        voxels=int(chunk.labels.size),
    )
    return {"chunk": list(coords), "status": "done", "l2_count": written, "attempt": attempt}


def _in_chunk(ctx: DatasetContext, feats: dict, coords) -> dict:
    """Keep only L2 ids that belong to this chunk (a stray id would be misplaced)."""
    if feats["l2id"].size == 0:
        return feats
    own = (
        idlib.get_chunk_coords(feats["l2id"], ctx.dataset.spatial_bits) == np.asarray(coords)
    ).all(1)
    if own.all():
        return feats
    return {k: v[own] for k, v in feats.items()}


def compute_l2_ids(
    ctx: DatasetContext,
    l2ids: np.ndarray,
    timestamp: datetime | None,
    run: RunRecord,
    cell_timestamp: datetime | None = None,
) -> dict:
    """Recompute the given L2 ids: grouped by chunk, each chunk read once."""
    l2ids = np.unique(idlib.as_uint64(l2ids))
    valid = l2ids[idlib.get_layer(l2ids) == 2]
    coords = idlib.get_chunk_coords(valid, ctx.dataset.spatial_bits)
    written, not_found, chunks = 0, [], 0
    for chunk in np.unique(coords, axis=0):
        members = valid[(coords == chunk).all(1)]
        data = load_chunk_l2(ctx, chunk.tolist(), timestamp)
        feats = compute_features(data.labels, ctx.dataset.resolution, only=members)
        not_found.extend(sorted(set(members.tolist()) - set(feats["l2id"].tolist())))
        written += ctx.store.write_features(feats, run.lineage(data.checksum, cell_timestamp))
        chunks += 1
    return {
        "written": written,
        "chunks_read": chunks,
        "not_layer2": int(l2ids.size - valid.size),
        "not_found": not_found,
    }
