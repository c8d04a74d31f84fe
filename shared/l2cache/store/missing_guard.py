"""The lookup's guard table: negative entries, pending marks and callers' budgets.

What makes a missing id cost what it is worth (docs/design.md, "Missing ids"), kept in
one small Bigtable table that every lookup instance shares (an in-memory cache per
instance would let each of up to ``max_instances`` instances enqueue the same work, and
forget it on every cold start). Three key ranges, one family each:

- ``neg/<dataset>/<%020d id>``, family ``neg``: the graph has no such L2 node (or its
  chunk lies outside the volume). Answered as missing without recompute until the
  cell is older than ``negative_ttl_s`` (PCG allocates new ids by counter, so a made-up
  id may exist later: the entry expires rather than lasting for good).
- ``pend/<dataset>/<%020d chunk id>``, family ``pend``, one column per id: ids queued
  for recompute by some lookup less than ``pending_ttl_s`` ago. A chunk's ids are
  claimed with one CheckAndMutateRow, so of 100 concurrent lookups of the same missing
  ids exactly one publishes them. The cell's timestamp is when it was queued; its value
  is empty until the publish is acknowledged, then the Pub/Sub message id that carries
  the id (:meth:`MissingIdGuard.note_source`, rewritten at the claim's own timestamp),
  which is how an id's state finds its event in the ledger (l2cache.serving.id_state).
- ``rate/<caller digest>/<window start>``, family ``rate``: chunks a caller queued in
  the window, one ReadModifyWriteRow per request.

Freshness is decided at read time from the cell timestamps (the table's GC rules only
reclaim space, whenever Bigtable gets to it). Every write's status is checked: a
failure raises, and the lookup then queues nothing (it never 5xxs for this table).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
from google.cloud.bigtable import column_family

from l2cache.config import MissingIdPolicy
from l2cache.domain import ids as idlib
from l2cache.gcp.bigtable import CellFilter, RowReader
from l2cache.gcp.bigtable_write import Row, check_and_mutate, increment, write_rows

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.instance import Instance
    from google.cloud.bigtable.table import Table

NEGATIVE_FAMILY = "neg"
PENDING_FAMILY = "pend"
RATE_FAMILY = "rate"
FAMILIES = (NEGATIVE_FAMILY, PENDING_FAMILY, RATE_FAMILY)
# GC only reclaims space; freshness is read from timestamps (infra: GUARD_GC_MAX_AGE).
GC_MAX_AGE = timedelta(days=7)
# A chunk's claim is decided on at most this many of its ids: identical concurrent
# requests share them all (one wins); requests that overlap only partly may both
# publish the overlap, which is idempotent work and bounded by the budgets.
CLAIM_PREDICATE_IDS = 32
# How far back an id's state looks for an expired pending mark (to say it was queued and
# how that ended); GC keeps the marks for GC_MAX_AGE.
CLAIM_LOOKBACK = timedelta(days=1)
# PCG's graph table (l2cache.inputs.graph, not imported: it needs zstandard, which the
# lookup does not ship): an L2 node exists when its row has a ``children`` cell.
GRAPH_FAMILY = "0"
GRAPH_CHILDREN = b"children"

Clock = Callable[[], float]


def create_guard_table(instance: Instance, table_id: str) -> Table:
    """Create the guard table (or add a missing family): one version per cell, cells
    older than :data:`GC_MAX_AGE` collected."""
    table = instance.table(table_id)
    gc = column_family.GCRuleUnion(
        [column_family.MaxVersionsGCRule(1), column_family.MaxAgeGCRule(GC_MAX_AGE)]
    )
    if not table.exists():
        table.create(column_families=dict.fromkeys(FAMILIES, gc))
    else:
        existing = table.list_column_families()
        for fam in FAMILIES:
            if fam not in existing:
                table.column_family(fam, gc).create()
    return table


def negative_key(dataset: str, l2id: int) -> bytes:
    """Row key of one id's negative entry."""
    return f"neg/{dataset}/{int(l2id):020d}".encode()


def pending_key(dataset: str, chunk_id: int) -> bytes:
    """Row key of one chunk's pending marks."""
    return f"pend/{dataset}/{int(chunk_id):020d}".encode()


def caller_digest(caller: str) -> str:
    """A caller's key as stored: fixed length, no user text in row keys."""
    return hashlib.sha256(caller.encode("utf-8", "replace")).hexdigest()[:20]


class MissingIdGuard:
    """Reads and writes of the guard table for one lookup instance (thread-safe: it
    holds no state between calls)."""

    def __init__(
        self,
        table: Table | str,
        policy: MissingIdPolicy,
        clock: Clock = time.time,
        reader: RowReader | None = None,
    ) -> None:
        self.table = table
        self.policy = policy
        self.clock = clock
        self.reader = reader or RowReader(table)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def known(
        self, dataset: str, l2ids: np.ndarray, chunk_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(negative, pending) masks over ``l2ids`` (``chunk_ids`` are their chunks'),
        from one ReadRows of the ids' negative rows and their chunks' pending rows."""
        n = l2ids.size
        negative = np.zeros(n, dtype=bool)
        pending = np.zeros(n, dtype=bool)
        if n == 0:
            return negative, pending
        now = self._now_ms()
        neg_since = (now - self.policy.negative_ttl_s * 1000) * 1000
        pend_since = (now - self.policy.pending_ttl_s * 1000) * 1000
        ids = l2ids.tolist()
        chunks = chunk_ids.tolist()
        neg_keys = [negative_key(dataset, i) for i in ids]
        pend_keys = sorted({pending_key(dataset, c) for c in chunks})
        rows = self.reader.versions(
            keys=[*neg_keys, *pend_keys],
            cells=CellFilter(start_micros=min(neg_since, pend_since), per_column=1),
        )
        for i, key in enumerate(neg_keys):
            cells = rows.get(key, {}).get(NEGATIVE_FAMILY, {})
            negative[i] = any(ts >= neg_since for versions in cells.values() for ts, _ in versions)
        fresh: dict[bytes, set[bytes]] = {}
        for key in pend_keys:
            cells = rows.get(key, {}).get(PENDING_FAMILY, {})
            fresh[key] = {q for q, versions in cells.items() if versions[0][0] >= pend_since}
        for i, (l2id, chunk) in enumerate(zip(ids, chunks, strict=True)):
            pending[i] = idlib.row_key(l2id) in fresh[pending_key(dataset, chunk)]
        return negative, pending

    def remember_absent(self, dataset: str, l2ids: Sequence[int], reason: str) -> int:
        """Write negative entries (one blind MutateRows, explicit timestamps: a repeat
        rewrites the same cells)."""
        if not len(l2ids):
            return 0
        when = datetime.fromtimestamp(self._now_ms() / 1000, UTC)
        rows = [
            Row(negative_key(dataset, i)).set_cell(NEGATIVE_FAMILY, b"why", reason.encode(), when)
            for i in l2ids
        ]
        return write_rows(self.table, rows, "lookup guard")

    def charge(self, caller: str, chunks: int) -> int:
        """Count ``chunks`` against the caller's window; returns how many of them fit
        (0..chunks). One atomic increment, so concurrent requests of one caller never
        both get the last of the budget."""
        if chunks <= 0:
            return 0
        window = self.policy.caller_window_s
        start = int(self.clock()) // window * window
        key = f"rate/{caller_digest(caller)}/{start:010d}".encode()
        total = increment(self.table, key, RATE_FAMILY, b"chunks", chunks, what="lookup guard")
        before = total - chunks
        return max(0, min(chunks, self.policy.max_chunks_per_caller - before))

    def claim(
        self, dataset: str, chunk_id: int, l2ids: Sequence[int], at_ms: int | None = None
    ) -> bool:
        """Mark ``l2ids`` of one chunk pending unless another lookup just did; True when
        this call made the mark (and so should publish them). ``at_ms`` is the mark's
        time (default now): a request claims all its chunks at one time, so it can
        later name the message that carries them (:meth:`note_source`)."""
        now = self._now_ms() if at_ms is None else at_ms
        since = (now - self.policy.pending_ttl_s * 1000) * 1000
        quals = [idlib.row_key(i) for i in sorted(l2ids)]
        when = datetime.fromtimestamp(now / 1000, UTC)
        row = Row(pending_key(dataset, chunk_id))
        for q in quals:
            row.set_cell(PENDING_FAMILY, q, b"", when)
        predicate = CellFilter(
            columns={PENDING_FAMILY: quals[:CLAIM_PREDICATE_IDS]},
            start_micros=since,
            per_row=1,
            strip_values=True,
        )
        return not check_and_mutate(self.table, row, predicate, what="lookup guard")

    def note_source(
        self, dataset: str, claims: Sequence[tuple[int, Sequence[int]]], at_ms: int, source: str
    ) -> int:
        """Record what carries the claimed ids (the Pub/Sub message id) in their pending
        cells, at the claim's own timestamp: the cell is replaced, so its time still says
        since when the id is queued. One blind MutateRows."""
        when = datetime.fromtimestamp(at_ms / 1000, UTC)
        rows = []
        for chunk_id, l2ids in claims:
            row = Row(pending_key(dataset, chunk_id))
            for l2id in l2ids:
                row.set_cell(PENDING_FAMILY, idlib.row_key(l2id), source.encode(), when)
            rows.append(row)
        return write_rows(self.table, rows, "lookup guard") if rows else 0

    def entries(
        self, dataset: str, l2ids: Sequence[int], chunk_ids: Sequence[int]
    ) -> tuple[dict[int, tuple[int, str]], dict[int, tuple[int, str, bool]]]:
        """``(negative, claims)`` of ``l2ids`` (``chunk_ids`` their chunks'): fresh
        negative entries as ``{id: (written ms, reason)}`` and pending marks of the last
        :data:`CLAIM_LOOKBACK` as ``{id: (queued ms, source, fresh)}`` (source: the
        message id, or "" before the publish was acknowledged; fresh: younger than
        ``pending_ttl_s``, so not queued again). One ReadRows of the ids' negative rows
        and their chunks' pending rows, as :meth:`known` reads, with the values."""
        negative: dict[int, tuple[int, str]] = {}
        claims: dict[int, tuple[int, str, bool]] = {}
        if not len(l2ids):
            return negative, claims
        now = self._now_ms()
        neg_since = (now - self.policy.negative_ttl_s * 1000) * 1000
        pend_since = (now - self.policy.pending_ttl_s * 1000) * 1000
        lookback = int(max(CLAIM_LOOKBACK.total_seconds(), self.policy.pending_ttl_s))
        seen_since = (now - lookback * 1000) * 1000
        neg_keys = {negative_key(dataset, i): int(i) for i in l2ids}
        pend_keys = sorted({pending_key(dataset, c) for c in chunk_ids})
        rows = self.reader.versions(
            keys=[*neg_keys, *pend_keys],
            cells=CellFilter(start_micros=min(neg_since, seen_since), per_column=1),
        )
        for key, l2id in neg_keys.items():
            for versions in rows.get(key, {}).get(NEGATIVE_FAMILY, {}).values():
                ts, value = versions[0]
                if ts >= neg_since:
                    negative[l2id] = (ts // 1000, value.decode("utf-8", "replace"))
        wanted = {idlib.row_key(i): int(i) for i in l2ids}
        for key in pend_keys:
            for qualifier, versions in rows.get(key, {}).get(PENDING_FAMILY, {}).items():
                ts, value = versions[0]
                if ts >= seen_since and qualifier in wanted:
                    source = value.decode("utf-8", "replace")
                    claims[wanted[qualifier]] = (ts // 1000, source, ts >= pend_since)
        return negative, claims


def graph_absent(
    graph_table: str, l2ids: np.ndarray, reader: RowReader | None = None
) -> np.ndarray:
    """Mask of ``l2ids`` that have no node in PCG's graph table: one keys-only ReadRows
    of their rows' ``children`` cells (the cost of a cache read of the same ids)."""
    if l2ids.size == 0:
        return np.zeros(0, dtype=bool)
    reader = reader or RowReader(graph_table)
    keys = idlib.row_keys(l2ids)
    found = reader.rows(
        keys=keys,
        cells=CellFilter(columns={GRAPH_FAMILY: [GRAPH_CHILDREN]}, per_row=1, strip_values=True),
    )
    return np.array([k not in found for k in keys], dtype=bool)
