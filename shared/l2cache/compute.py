"""Compute and store features: a whole chunk (ingest) or chosen L2 ids (edits).

The whole-chunk path reads a chunk once (supervoxels via CloudVolume, their L2 parents
at the run's graph time), remaps it to L2 labels and runs the engine. The ids path
(edits, missing ids, reprocessing of ids) labels the chunk from each requested id's own
``children`` cell instead (:func:`load_chunk_ids`): the id's supervoxels are its voxels,
every other voxel is background, so any L2 id that ever existed can be computed, also
one an edit has since replaced. Both give a node the same features: the engine's
per-node values depend only on the node's own voxels and the chunk (every other label
is, for the EDT and the faces, just "not this node"; tests/test_ids_from_children.py).

Orphans and ghosts (the existing service's behaviour): a segmentation supervoxel the
graph gives no L2 parent (orphan) is background, a graph supervoxel with no voxel
(ghost) is simply absent; both are counted per chunk (ledger row, each written row's
``lineage:input``, QC with the dataset map's ``qc:`` thresholds), and no chunk fails for
them unless the map sets ``input: {strict: true}``, which keeps the old contract (both
are :class:`~l2cache.domain.failures.InconsistentInput`), or the chunk lost a real share
of its supervoxels: ghosts over both ``input.ghost_sv_allowance`` and
``input.max_ghost_sv_fraction`` of the chunk fail it as incomplete input
(:func:`check_input`); the ids path judges each requested id by its own supervoxels
instead (:func:`ids_over_ghost_limit`: that id fails, the others are computed), and
writes the existing worker's placeholder for an id none of whose supervoxels has a
voxel. A region reprocess also recomputes
the chunk's superseded ids that have rows (:func:`with_superseded`). A supervoxel whose L2 parent
belongs to another chunk or layer (a "stray" parent; for the ids path, a child outside
the id's chunk) is graph/segmentation disagreement and always fails the chunk, as does
a chunk whose faces do not match the graph's cross-chunk edges (mirrored, transposed:
its subclass ``GeometryMismatch``, :mod:`l2cache.inputs.geometry_check`). Errors follow
the one failure contract of :mod:`l2cache.domain.failures`: permanent ones are recorded
and not retried, transient ones propagate (the caller answers 5xx) until the last
attempt, which records "gave up after N attempts".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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
from l2cache.engine.chunk_labels import (
    ChunkLabels,
    IdLabels,
    disjoint_groups,
    labels_from_children,
    labels_from_supervoxels,
)
from l2cache.engine.chunk_qc import chunk_qc
from l2cache.engine.features import compute_features, empty_features
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
    "load_chunk_ids",
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
    """Read, relabel and check one chunk; raises a PermanentError for bad input.

    Orphans are background and ghosts counted (``ghost_sv`` of the result) within the
    map's per-chunk limits (:func:`check_input`); the result also carries the graph's own
    count of the chunk's supervoxels and L2 nodes (``graph_sv``, ``graph_l2``), which QC
    compares the written rows with."""
    coords = [int(c) for c in coords]
    sv = read_chunk(
        ctx.dataset,
        coords,
        lambda: ctx.graph.has_supervoxels(coords, ctx.dataset.spatial_bits),
    )
    faces = chunk_faces(sv)  # for check_geometry, before the supervoxels are relabelled
    chunk = labels_from_supervoxels(sv, lambda ids: ctx.graph.l2_parents(ids, timestamp))
    check_consistency(ctx, chunk, coords, timestamp)
    chunk = check_complete(ctx, chunk, coords, timestamp)
    check_geometry(ctx.graph, faces, coords, ctx.dataset.spatial_bits)
    return chunk


def input_counts(chunk: ChunkLabels) -> dict[str, int]:
    """A chunk's orphan and ghost counts, as the ledger, the lineage and QC record them."""
    return {
        "orphan_sv": int(chunk.unmapped_sv),
        "orphan_voxels": int(chunk.orphan_voxels),
        "ghost_sv": int(chunk.ghost_sv),
    }


def ghosts_over_limit(dataset: DatasetConfig, ghosts: int, graph_sv: int | None) -> bool:
    """Whether a chunk's ghosts mean lost input: more than ``input.ghost_sv_allowance``
    (a handful, what the existing service meets: supervoxels without a voxel) *and* more
    than ``input.max_ghost_sv_fraction`` of the graph's supervoxels in the chunk. So one
    ghost never fails a chunk, and a chunk that lost a real share of its supervoxels
    (a file that decodes but lost its inside, which the geometry check cannot see) does.
    """
    if ghosts <= dataset.ghost_sv_allowance:
        return False
    return not graph_sv or ghosts > dataset.max_ghost_sv_fraction * graph_sv


def check_input(
    ctx: DatasetContext,
    coords: Sequence[int],
    *,
    supervoxels: int,
    orphans: np.ndarray,
    orphan_voxels: int,
    orphans_are: str,
    ghosts: np.ndarray,
    graph_sv: int | None,
) -> None:
    """The one verdict on a chunk's orphans and ghosts, for the whole-chunk and ids paths.

    Orphans (segmentation supervoxels the graph does not map) fail the chunk only with
    strict input; ghosts (graph supervoxels without a voxel) fail it with strict input or
    when :func:`ghosts_over_limit`. Either failure is :class:`InconsistentInput` with the
    counts (the ledger row keeps them), so lost input is a permanent, named failure.
    """
    ds = ctx.dataset
    where = f"chunk {tuple(int(c) for c in coords)}"
    counts = {
        "orphan_sv": int(orphans.size),
        "orphan_voxels": int(orphan_voxels),
        "ghost_sv": int(ghosts.size),
    }
    if ds.strict_input and orphans.size:
        raise InconsistentInput(
            f"{where}: {orphans.size} of {supervoxels} supervoxels {orphans_are} "
            f"(e.g. {orphans[:3].tolist()})",
            **counts,
        )
    if not ghosts.size:
        return
    over = ghosts_over_limit(ds, int(ghosts.size), graph_sv)
    if ds.strict_input or over:
        why = (
            f" (over input.ghost_sv_allowance {ds.ghost_sv_allowance} and "
            f"input.max_ghost_sv_fraction {ds.max_ghost_sv_fraction:g} of the chunk)"
            if over and not ds.strict_input
            else ""
        )
        raise InconsistentInput(
            f"{where}: {ghosts.size} of the graph's {graph_sv} supervoxels are absent from "
            f"the segmentation (e.g. {ghosts[:3].tolist()}); the input is incomplete{why}",
            **counts,
            graph_sv=int(graph_sv or 0),
        )


def check_complete(
    ctx: DatasetContext, chunk: ChunkLabels, coords: Sequence[int], timestamp: datetime | None
) -> ChunkLabels:
    """Ghosts (supervoxels the graph has in the chunk that its segmentation lacks) and the
    graph's own count of the chunk's L2 nodes; :func:`check_input` judges them.

    Returns ``chunk`` with ``ghost_sv``, ``graph_sv`` and ``graph_l2`` set (left at 0 /
    None when the graph cannot list the chunk). ``graph_l2`` is the segmentation's L2
    parents plus the ghosts' parents at ``timestamp`` (one read of the ghosts' rows,
    usually none or a handful), so a node all of whose supervoxels were lost counts as
    missing in QC's coverage instead of vanishing from both sides of it.
    """
    bits = ctx.dataset.spatial_bits
    expected = ctx.graph.chunk_supervoxels(coords, bits)
    ghosts = (
        np.zeros(0, np.uint64)
        if expected is None
        else np.setdiff1d(expected, chunk.sv_ids, assume_unique=True)
    )
    at = timestamp.isoformat() if timestamp else "now"
    check_input(
        ctx,
        coords,
        supervoxels=int(chunk.sv_ids.size),
        orphans=chunk.sv_ids[chunk.parents == 0],
        orphan_voxels=chunk.orphan_voxels,
        orphans_are=f"have no L2 parent in the graph at {at}",
        ghosts=ghosts,
        graph_sv=None if expected is None else int(expected.size),
    )
    if expected is None:
        return chunk
    graph_l2 = chunk.l2_ids
    if ghosts.size:
        parents = ctx.graph.l2_parents(ghosts, timestamp)
        mine = parents[parents != 0]
        here = (idlib.get_layer(mine) == 2) & (
            idlib.get_chunk_coords(mine, bits) == np.asarray(coords)
        ).all(1)
        graph_l2 = np.union1d(graph_l2, mine[here])
    return replace(
        chunk, ghost_sv=int(ghosts.size), graph_sv=int(expected.size), graph_l2=int(graph_l2.size)
    )


def check_consistency(
    ctx: DatasetContext, chunk: ChunkLabels, coords: Sequence[int], timestamp: datetime | None
) -> None:
    """Supervoxels and graph must agree: every L2 parent is a layer-2 node of this chunk.

    Orphans (no L2 parent) are judged by :func:`check_input` (background and counted,
    unless strict input is set).
    """
    del timestamp  # the parents were read at it; kept for the callers' signature
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


@dataclass
class ChunkIds:
    """One chunk's input for the ids path: the labels built from the requested ids'
    ``children`` (None when the graph has no children row for any of them), the ids
    without a row (reported not found, never computed), the chunk's input counts, and
    the ids whose own children are lost input (:func:`ids_over_ghost_limit`: taken out
    of the labels, reported failed with ``lost_reason``)."""

    labels: IdLabels | None
    no_row: list[int]
    counts: dict[str, int]
    lost: list[int] = field(default_factory=list)
    lost_reason: str = ""

    @property
    def empty(self) -> list[int]:
        """Ids with a children row none of whose supervoxels has a voxel here (all
        ghosts, within the limit): the existing worker writes its placeholder for them."""
        if self.labels is None:
            return []
        present = self.labels.sv_ids
        return [
            node
            for node, kids in sorted(self.labels.children.items())
            if not np.isin(kids, present, assume_unique=True).any()
        ]


def ids_over_ghost_limit(
    dataset: DatasetConfig, children: dict[int, np.ndarray], present: np.ndarray
) -> dict[int, tuple[int, int]]:
    """The requested ids whose own children are lost input: ``{id: (ghosts, children)}``.

    The ids path judges each id by its own supervoxels only (:func:`ghosts_over_limit`
    with the id's children as the denominator): a chunk that lost all of node A's
    supervoxels fails A, not an edit's new node B beside it whose children are all
    there. An id with a few children, all ghosts (within ``input.ghost_sv_allowance``),
    is not lost input but an id without voxels (the existing worker's placeholder).
    """
    out: dict[int, tuple[int, int]] = {}
    for node, kids in children.items():
        ghosts = int(kids.size - np.isin(kids, present, assume_unique=True).sum())
        if ghosts and ghosts_over_limit(dataset, ghosts, int(kids.size)):
            out[node] = (ghosts, int(kids.size))
    return out


def load_chunk_ids(ctx: DatasetContext, coords: Sequence[int], members: np.ndarray) -> ChunkIds:
    """Read the requested ids' ``children`` cells, then the chunk, and label it by them.

    The children are read first: when none of the ids has a row, the chunk is not read
    at all. Checks, as the whole-chunk path has them: every child must be a supervoxel of
    this chunk (else the graph disagrees with itself: InconsistentInput); orphans (here:
    supervoxels of the segmentation without a graph row) and ghosts (graph supervoxels
    without a voxel) are counted chunk-wide, or fail the chunk with strict input (ghosts:
    those among the requested ids' children); the geometry check. Without strict input
    the ghost limit is judged per requested id on its own children
    (:func:`ids_over_ghost_limit`): ids over it are taken out of the labels and returned
    in ``lost``, so the chunk's other ids are still computed.
    """
    coords = [int(c) for c in coords]
    bits = ctx.dataset.spatial_bits
    members = idlib.as_uint64(members)
    children = ctx.graph.l2_children(members)
    no_row = sorted(set(members.tolist()) - set(children))
    counts = {"orphan_sv": 0, "orphan_voxels": 0, "ghost_sv": 0}
    if not children:
        return ChunkIds(None, no_row, counts)
    kids = np.concatenate([np.asarray(v, np.uint64) for v in children.values()])
    if kids.size:
        wrong = (idlib.get_layer(kids) != 1) | (
            idlib.get_chunk_coords(kids, bits) != np.asarray(coords)
        ).any(1)
        if wrong.any():
            raise InconsistentInput(
                f"chunk {tuple(coords)}: {int(wrong.sum())} children of the requested L2 ids "
                f"are not supervoxels of this chunk (e.g. {kids[wrong][:3].tolist()}); the "
                "graph disagrees with itself",
                stray_ids=int(wrong.sum()),
            )
    sv = read_chunk(ctx.dataset, coords, lambda: ctx.graph.has_supervoxels(coords, bits))
    faces = chunk_faces(sv)
    labels = labels_from_children(sv, children)
    del sv
    expected = ctx.graph.chunk_supervoxels(coords, bits)
    if expected is not None:
        orphans = np.setdiff1d(labels.sv_ids, expected, assume_unique=True)
        ghosts = np.setdiff1d(expected, labels.sv_ids, assume_unique=True)
        counts = {
            "orphan_sv": int(orphans.size),
            "orphan_voxels": labels.voxels_of(orphans),
            "ghost_sv": int(ghosts.size),  # the chunk's, as the ledger counts them
        }
        # only the requested ids' own ghosts are judged: the chunk's others change no
        # row this path writes (strict input: any of them fails the chunk, as before)
        mine = np.setdiff1d(np.unique(kids), labels.sv_ids) if kids.size else kids
        check_input(
            ctx,
            coords,
            supervoxels=int(labels.sv_ids.size),
            orphans=orphans,
            orphan_voxels=counts["orphan_voxels"],
            orphans_are="have no row in the graph",
            ghosts=mine if ctx.dataset.strict_input else np.zeros(0, np.uint64),
            graph_sv=int(np.unique(kids).size),
        )
    check_geometry(ctx.graph, faces, coords, bits)
    out = ChunkIds(labels, no_row, counts)
    lost = (
        {}
        if ctx.dataset.strict_input
        else ids_over_ghost_limit(ctx.dataset, labels.children, labels.sv_ids)
    )
    if lost:  # taken out of the labels: the other ids are computed
        ds = ctx.dataset
        out.lost = sorted(lost)
        out.lost_reason = (
            f"chunk {tuple(coords)}: "
            + ", ".join(f"L2 id {n}: {g} of its {c} supervoxels" for n, (g, c) in lost.items())
            + " absent from the segmentation; the input is incomplete (over "
            f"input.ghost_sv_allowance {ds.ghost_sv_allowance} and "
            f"input.max_ghost_sv_fraction {ds.max_ghost_sv_fraction:g} of the id's "
            "supervoxels)"
        )
        for node in lost:
            del labels.children[node]
        labels.groups = disjoint_groups(labels.children)
    return out


def features_of_ids(labels: IdLabels, resolution: Sequence[float]) -> dict[str, np.ndarray]:
    """The engine once per group of ids with disjoint children, rows merged by id.

    Each id's label volume holds only its own voxels (other ids of its group are other
    labels, which the engine treats exactly as background for this id), so an id that
    shares supervoxels with another requested id still gets the features of its voxels.
    """
    last = len(labels.groups) - 1
    parts = [  # the last group takes the shared index over: one full-size array less
        compute_features(labels.group_labels(i, consume=i == last), resolution, only=members)
        for i, members in enumerate(labels.groups)
    ]
    if not parts:
        return empty_features()
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    order = np.argsort(merged["l2id"], kind="stable")
    return {key: value[order] for key, value in merged.items()}


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
        counts = input_counts(chunk)
        qc = chunk_qc(
            feats,
            ctx.dataset,
            graph_l2=int(chunk.l2_ids.size if chunk.graph_l2 is None else chunk.graph_l2),
            inputs={**counts, "supervoxels": int(chunk.sv_ids.size)},
        )
        superseded: dict[str, int] = {}
        if run.kind in REPROCESS_KINDS:  # with the chunk's rows, written in the same write
            chunk_facts = (chunk.checksum, int(chunk.dense.size), int(chunk.sv_ids.size))
            l2_now = chunk.l2_ids
            del chunk  # the ids path reads the chunk again: one volume in memory at a time
            until = run.cell_timestamp_ms * 1000  # rows newer than the run's version: skipped
            feats, superseded = with_superseded(ctx, coords, l2_now, feats, until)
            checksum, voxels, supervoxels = chunk_facts
        else:
            checksum, voxels, supervoxels = (
                chunk.checksum,
                int(chunk.dense.size),
                int(chunk.sv_ids.size),
            )
        ctx.ledger.check_open(run)  # the fence: after the live mark, before any cell
        written = ctx.store.write_features(feats, run.lineage(checksum, input_counts=counts))
        current = written - superseded.get("superseded", 0)  # the chunk's own nodes
    except Exception as exc:
        permanent = classify(exc) == PERMANENT
        if permanent or last_attempt:
            reason = describe(exc) if permanent else gave_up(task_attempt or attempt, exc)
            counts = getattr(exc, "counts", {})  # orphan / stray / ghost supervoxels
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
        l2_count=current,
        input_checksum=checksum,
        duration_s=round(duration, 4),
        voxels=voxels,
        supervoxels=supervoxels,
        **counts,
        **superseded,
        stray_ids=0,
        code_revision=run.lineage().code_revision,
        qc=qc.summary,
        qc_bins=qc.bins,
    )
    out = {"chunk": list(coords), "status": "done", "l2_count": current, "attempt": attempt}
    return {**out, **superseded}


# A reprocess also recomputes the ids an edit or missing-id request computed in the chunk
# that the graph has since replaced (their rows would keep old-parameter values, which
# pcg_skel still reads at past timestamps). At most this many per chunk, the newest ids
# (highest segment ids: PCG allocates them increasing) first, in at most this many engine
# passes (ids whose children overlap, as a merged node and its split parts, need one pass
# each: ~0.5x the chunk's engine per pass; the passes are filled newest id first, so an
# id is left only for newer ones it overlaps); the rest are counted
# (``superseded_left``) and keep their values. Ids whose row is newer than the run's
# version (an edit during the run) are not superseded at the run's time: their recomputed
# version would never be served, so they are skipped (``superseded_newer``).
REPROCESS_KINDS = ("region_reprocess",)
SUPERSEDED_MAX_IDS = 1_000
SUPERSEDED_MAX_PASSES = 4


def with_superseded(
    ctx: DatasetContext,
    coords: Sequence[int],
    current: np.ndarray,
    feats: dict[str, np.ndarray],
    until_micros: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The chunk's features plus those of its superseded ids, and the counts for the ledger.

    Superseded: ids with a row in the cache table's chunk range (one keys-only range
    read) that are not among the chunk's current L2 nodes. They go through the ids path
    (:func:`load_chunk_ids`: their ``children`` cells, a second read of the chunk, one
    engine pass per group of ids with disjoint children, at most
    :data:`SUPERSEDED_MAX_PASSES`), and are written with the
    chunk's rows in one write: the run's timestamp and lineage row, so a rollback of the
    run takes them back too. Counts: ``superseded`` (written), ``superseded_passes``
    (engine passes spent on them), ``superseded_left`` (over :data:`SUPERSEDED_MAX_IDS`
    or the passes, not recomputed), ``superseded_not_found`` (no children row, no
    voxel here, or its own supervoxels lost), ``superseded_newer`` (a row newer than
    ``until_micros``, the run's version: an id an edit made after the run began, whose
    recomputation at the run's earlier version would never be served; not recomputed).
    """
    old = np.setdiff1d(ctx.store.chunk_row_ids(coords), current, assume_unique=True)
    newer = 0
    if old.size and until_micros is not None:
        stamps = ctx.store.row_stamps(old)
        keep = np.array([stamps.get(int(n), 0) <= until_micros for n in old.tolist()], bool)
        newer = int((~keep).sum())
        old = old[keep]
    if old.size == 0:
        return feats, {"superseded": 0, **({"superseded_newer": newer} if newer else {})}
    take = old[-SUPERSEDED_MAX_IDS:]
    data = load_chunk_ids(ctx, coords, take)
    counts = {"superseded": 0, "superseded_passes": 0}
    if newer:
        counts["superseded_newer"] = newer
    left = int(old.size - take.size)
    if data.labels is None:
        counts["superseded_not_found"] = len(data.no_row)
        if left:
            counts["superseded_left"] = left
        return feats, counts
    data.labels.groups = disjoint_groups(data.labels.children, newest_first=True)
    groups = data.labels.groups
    if len(groups) > SUPERSEDED_MAX_PASSES:  # the groups past the cap keep their values
        left += sum(int(g.size) for g in groups[SUPERSEDED_MAX_PASSES:])
        data.labels.groups = groups[:SUPERSEDED_MAX_PASSES]
    tried = sum(int(g.size) for g in data.labels.groups)
    extra = features_of_ids(data.labels, ctx.dataset.resolution)
    counts["superseded"] = int(extra["l2id"].size)
    counts["superseded_passes"] = len(data.labels.groups)
    if left:
        counts["superseded_left"] = left
    missed = len(data.no_row) + len(data.lost) + tried - counts["superseded"]
    if missed:
        counts["superseded_not_found"] = missed
    merged = {key: np.concatenate([feats[key], extra[key]]) for key in feats}
    order = np.argsort(merged["l2id"], kind="stable")
    return {key: value[order] for key, value in merged.items()}, counts


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

    Each id is computed from its own ``children`` cell (:func:`load_chunk_ids`), so the
    result does not depend on ``timestamp`` (kept for the callers' record: the message
    time) and an id an edit has since replaced is still computed. Ids the graph has no
    children row for are ``not_found`` (nothing is written for them). Ids with a row
    none of whose supervoxels has a voxel in the chunk (all ghosts) are ``empty``: the
    existing worker's placeholder is written for them (``{size_nm3: 0}``, with the
    write's lineage), so the lookup serves them as the existing service does and never
    queues them again. An id whose own children are mostly ghosts
    (:func:`ids_over_ghost_limit`) is reported in ``failed`` on its own; the chunk's
    other ids are computed.

    Per chunk: a permanent failure (outside the volume, missing/corrupt/inconsistent
    input) is reported in ``failed`` and the other chunks still run; a transient one
    propagates. With ``event_key``, each written chunk is recorded, so a redelivered
    message skips the chunks an earlier delivery already wrote.
    """
    del timestamp  # the labels come from the ids' own children, not the parents at a time
    not_layer2, groups = group_by_chunk(ctx.dataset, l2ids)
    done = ctx.ledger.event_chunks_done(run.run_id, event_key) if event_key else {}
    written, not_found, chunks, failed, skipped = 0, [], 0, [], 0
    empty: list[int] = []
    for chunk, members in groups:
        chunk = np.asarray(chunk)
        cid = chunk_id(ctx, chunk)
        if cid in done:
            written += int(done[cid].get("written", 0))
            skipped += 1
            continue
        try:
            data = load_chunk_ids(ctx, chunk.tolist(), members)
        except PermanentError as exc:
            failed.append({"chunk": chunk.tolist(), "ids": members.tolist(), "error": str(exc)})
            continue
        if data.labels is None:  # no id of the chunk has a children row: nothing to read
            not_found.extend(data.no_row)
            if event_key:
                ctx.ledger.event_chunk_done(
                    run.run_id, event_key, cid, written=0, not_found=len(data.no_row)
                )
            continue
        chunks += 1
        if data.lost:  # ids whose own children are lost input: failed, the rest computed
            failed.append({"chunk": chunk.tolist(), "ids": data.lost, "error": data.lost_reason})
        not_found.extend(data.no_row)
        holes = data.empty  # a children row, no voxel: the existing worker's placeholder
        empty.extend(holes)
        feats = features_of_ids(data.labels, ctx.dataset.resolution)
        lineage = run.lineage(data.labels.checksum, cell_timestamp, input_counts=data.counts)
        mark = ctx.ledger.writing_started(run.run_id, cid, event_key or "")
        try:  # the fence, checked once the in-flight mark a rollback waits on is stored
            ctx.ledger.check_open(run)
            n = ctx.store.write_features(feats, lineage, placeholders=holes)
        finally:
            ctx.ledger.writing_ended(mark)
        written += n
        if event_key:
            extra = {"empty": len(holes)} if holes else {}
            if data.lost:
                extra["failed_ids"] = len(data.lost)
            ctx.ledger.event_chunk_done(
                run.run_id,
                event_key,
                cid,
                written=n,
                not_found=len(data.no_row),
                **extra,
                **data.counts,
            )
    return {
        "written": written,
        "chunks_read": chunks,
        "chunks_skipped": skipped,
        "not_layer2": not_layer2,
        "not_found": not_found,
        "empty": empty,
        "failed": failed,
    }
