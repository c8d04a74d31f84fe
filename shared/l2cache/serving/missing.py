"""Which of a lookup's missing ids to queue for recompute, within the budgets.

A missing id used to be published as it came: 64 made-up ids (valid chunk
coordinates, unknown segments) started 64 chunk computations on every repeat, and one
request at the id cap could enqueue 75,000 chunk tasks. Now, in order, cheapest first:

1. ids in chunks outside the volume can never exist: answered missing, nothing read;
2. ids with a fresh negative entry (the graph had no such node) and ids another lookup
   queued less than ``pending_ttl_s`` ago are dropped (one ReadRows of the guard table);
3. the rest are checked against PCG's graph (one keys-only ReadRows, ``bigtable``
   graphs only): ids it does not have get negative entries and are not queued;
4. the remaining ids are grouped per chunk, in chunk-id order; the request's budget
   (``max_chunks_per_request``) and then the caller's (``max_chunks_per_caller`` per
   ``caller_window_s``, one atomic increment) cut the list; ids past either are
   answered missing, not queued ("deferred": a later request may queue them);
5. each chunk kept is claimed with one CheckAndMutateRow; only the claimed chunks'
   ids are published, so concurrent identical lookups publish once.

The answer's body is unchanged whatever happens here: a missing id maps to ``{}``, as
in the existing service. Headers say what happened (:func:`headers`).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from l2cache.config import DatasetConfig, MissingIdPolicy
from l2cache.domain import ids as idlib
from l2cache.inputs.volume import in_volume
from l2cache.store.missing_guard import MissingIdGuard, graph_absent

log = logging.getLogger(__name__)

CLAIM_THREADS = 8
# Negative entries written per request at most: ids past it are still answered as
# unknown, and checked against the graph again next time (a keys-only read, no work
# queued), so a request at the id cap writes bounded rows to the guard table.
MAX_NEGATIVE_WRITES = 10_000
# How long the lookup waits for its publish's ack to note the message id in the request
# (the lookup's own wait for the ack comes after and is then instant).
NOTE_WAIT_S = 0.1
_pool: ThreadPoolExecutor | None = None


@dataclass
class MissingPlan:
    """What to publish of a request's missing ids, and why the rest is not."""

    publish: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    chunks: int = 0  # chunks the published ids lie in (the recompute work queued)
    unknown: int = 0  # not in the graph (now or remembered) or outside the volume
    pending: int = 0  # queued by an earlier or concurrent lookup, not yet computed
    deferred: int = 0  # over the request's or the caller's budget
    graph: str = "skipped"  # "checked" | "unavailable" | "skipped"
    # the chunks this request claimed, with their ids, all marked at ``claimed_at_ms``
    claimed: list[tuple[int, list[int]]] = field(default_factory=list)
    claimed_at_ms: int = 0


def _claim_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(CLAIM_THREADS, thread_name_prefix="l2cache-claim")
    return _pool


def graph_table_name(dataset: DatasetConfig) -> str | None:
    """PCG's graph table of a ``bigtable`` graph; None for a graphene server (which
    offers no cheap existence check)."""
    g = dataset.graph
    if g.kind != "bigtable":
        return None
    return f"projects/{g.project}/instances/{g.instance}/tables/{g.table_id}"


def plan_missing(
    dataset: DatasetConfig,
    missing: np.ndarray,
    caller: str,
    policy: MissingIdPolicy,
    guard: MissingIdGuard | None,
) -> MissingPlan:
    """Decide what to publish of ``missing`` (distinct layer-2 ids without features).

    Raises when the guard table cannot be read or written: the caller then publishes
    nothing (an unguarded publish is exactly the amplification this prevents).
    Without a guard (a service built without one) only the request's budget applies.
    """
    plan = MissingPlan()
    ids = idlib.as_uint64(missing)
    if ids.size == 0:
        return plan
    coords = idlib.get_chunk_coords(ids, dataset.spatial_bits)
    chunk_ids = idlib.get_chunk_id(ids, dataset.spatial_bits)
    distinct, first, inverse = np.unique(chunk_ids, return_index=True, return_inverse=True)
    inside_chunk = np.array([in_volume(dataset, coords[i].tolist()) for i in first], dtype=bool)
    keep = inside_chunk[inverse.reshape(-1)]
    plan.unknown = int((~keep).sum())
    ids, chunk_ids = ids[keep], chunk_ids[keep]
    if guard is not None and ids.size:
        negative, pending = guard.known(dataset.name, ids, chunk_ids)
        plan.unknown += int(negative.sum())
        plan.pending = int((pending & ~negative).sum())
        fresh = ~negative & ~pending
        ids, chunk_ids = ids[fresh], chunk_ids[fresh]
        table = graph_table_name(dataset)
        if table is not None and ids.size:
            try:
                absent = graph_absent(table, ids)
                plan.graph = "checked"
            except Exception as exc:  # noqa: BLE001 - cannot tell: the budgets still hold
                log.warning("graph check of %d missing ids failed: %r", ids.size, exc)
                absent = np.zeros(ids.size, dtype=bool)
                plan.graph = "unavailable"
            if absent.any():
                remember = ids[absent][:MAX_NEGATIVE_WRITES].tolist()
                guard.remember_absent(dataset.name, remember, "not in the graph")
                plan.unknown += int(absent.sum())
                ids, chunk_ids = ids[~absent], chunk_ids[~absent]
    if ids.size == 0:
        return plan
    chunks, inverse = np.unique(chunk_ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    take = min(chunks.size, policy.max_chunks_per_request)
    if guard is not None:
        take = guard.charge(caller, take)
    groups = [ids[inverse == i] for i in range(take)]
    plan.deferred = int(ids.size - sum(g.size for g in groups))
    if guard is not None and groups:
        at_ms = int(guard.clock() * 1000)  # one time for the request's claims
        won = list(
            _claim_pool().map(
                lambda i: guard.claim(dataset.name, int(chunks[i]), groups[i].tolist(), at_ms),
                range(len(groups)),
            )
        )
        plan.pending += int(sum(g.size for g, w in zip(groups, won, strict=True) if not w))
        plan.claimed = [(int(chunks[i]), groups[i].tolist()) for i, w in enumerate(won) if w]
        plan.claimed_at_ms = at_ms
        groups = [g for g, w in zip(groups, won, strict=True) if w]
    plan.chunks = len(groups)
    if groups:
        plan.publish = np.sort(np.concatenate(groups))
    return plan


def note_published(
    guard: MissingIdGuard | None, dataset: DatasetConfig, plan: MissingPlan, future: Future
) -> None:
    """Write the message id of ``plan``'s publish into its ids' pending marks.

    The message id is on_edit's event key (``msg-<id>``), so a later state request
    finds the event's outcome (running, done, failed with the reason) by key. Written
    in the request when the publish is acknowledged within :data:`NOTE_WAIT_S` (the
    usual case: Cloud Run gives an instance CPU only while it answers, so work left for
    after the answer may stall), else from the publisher's callback when it is. A
    failed publish leaves the marks empty: the ids read as pending until they expire.
    """
    if guard is None or not plan.claimed:
        return

    def note(f: Future) -> None:
        try:
            message_id = f.result()
            guard.note_source(dataset.name, plan.claimed, plan.claimed_at_ms, str(message_id))
        except Exception as exc:  # noqa: BLE001 - the marks stay, only their source is lost
            log.warning("could not note the message of %d queued chunks: %r", plan.chunks, exc)

    try:
        future.result(timeout=NOTE_WAIT_S)
    except Exception:  # noqa: BLE001 - not acknowledged yet (or failed): the callback says
        future.add_done_callback(note)
        return
    note(future)


def headers(plan: MissingPlan) -> dict[str, str]:
    """The answer's account of the missing ids (the body stays the existing service's)."""
    return {
        "X-L2Cache-Unknown-Ids": str(plan.unknown),
        "X-L2Cache-Pending-Ids": str(plan.pending),
        "X-L2Cache-Deferred-Ids": str(plan.deferred),
        "X-L2Cache-Queued-Chunks": str(plan.chunks),
    }
