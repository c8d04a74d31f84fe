"""A run's state, kept incrementally by the workers as chunks change state.

At 11.6 million chunks no operator command may read a run's ledger to learn where the
run stands. So every state change of a chunk also moves a few counters, and the chunks
an operator has to look at one by one (failing, retrying, in flight) live in key ranges
of their own. Status, the dashboard and ``runs inspect`` read those and nothing else.

Row keys in the runs table (counters in the ``sum`` family: int64 sum aggregates that
a worker adds to with one blind AddToCell, merged by the server into one cell; the
other rows in ``ledger``):

- ``stat:<run>:<cell %04d>``: 64-bit counters of one box of the run's
  :class:`~l2cache.domain.statgrid.StatGrid` (``done``, ``failed``, ``retrying``,
  ``l2``, ``compute_ms``, ``voxels``, ``attempts``, ``inflight``). Their sum is the run; each row is
  one box of the map of where chunks are done or failing. A run has at most
  :data:`~l2cache.domain.statgrid.MAX_CELLS` of them, so no row is hot and reading all
  is O(1) in the run's size.
- ``hist:<run>:<minute %010d>:<shard %02d>``: what happened in one minute (``done``,
  ``failed``, ``retried``, ``l2``, ``compute_ms``; edit streams ``events`` and
  ``lat.<bin>`` latency bins), sharded so a busy minute is not one hot row. Throughput,
  failures over time and edit latency are read from here.
- ``fail:<run>:<chunk %020d>``: a chunk whose last outcome was failed or retrying, with
  the error; deleted when the chunk is done. O(failures).
- ``live:<run>:<chunk %020d>``: a chunk queued, running or awaiting its next attempt
  (retrying); deleted when it is done or failed. O(chunks in flight), bounded by the
  queue's concurrency and retry backlog; a row that stays silent past the attempt
  deadline is an attempt whose worker died, or a retry the queue never made. A chunk
  counts once in the ``inflight`` counter while its mark says ``running`` (the mark
  changes by CheckAndMutateRow), so a worker that died leaks no count: status reads
  running from the counter and subtracts the silent marks.

Counters are sharded by a hash of the chunk id (never ``chunk_id % n``: a chunk id's
low bits are the segment part, always zero).

Exactness: a chunk's state (``state`` cell of its ``chunk:`` row: none, ``r``etrying,
``f``ailed, ``d``one) changes by one CheckAndMutateRow conditioned on the state read just
before, so of two concurrent deliveries exactly one moves the counters. The counters are
added after that transition; a worker killed between the two leaves a counter one
short, which ``runs recount`` (a streaming recount of the ledger) repairs.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from l2cache.domain.statgrid import StatGrid
from l2cache.gcp.bigtable import CellFilter, read_row
from l2cache.gcp.bigtable_write import Row, WriteError, check_and_mutate, write_rows

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.table import Table

FAMILY = "ledger"  # the runs table's ledger family (store.ledger.LEDGER_FAMILY)
SUM_FAMILY = "sum"  # its int64 sum aggregate family (store.ledger.SUM_FAMILY): counters
HIST_SHARDS = 8
QC_SHARDS = 16
UNGRIDDED_CELLS = 16  # counter rows of a run recorded without a grid (older runs, tests)
STATE = b"state"
STATE_COUNTER = {b"r": b"retrying", b"f": b"failed", b"d": b"done"}
STATE_OF = {"retrying": b"r", "failed": b"f", "done": b"d"}
TRANSITION_TRIES = 8
# The box counters a chunk's ledger row determines (what ``runs recount`` rebuilds);
# the event counters (``events``, ``lat.<bin>``) come from event rows and are not.
COUNTED = (
    "done", "failed", "retrying", "l2", "compute_ms", "voxels", "attempts", "started", "retried",
)  # fmt: skip
# Attempts in flight (+1 at a chunk's start, -1 at its finish; ``inflight_retry``: those
# that are not a chunk's first attempt): status reads running from these, not from the
# ``live:`` rows, and ``runs recount`` rebuilds them from the live rows.
INFLIGHT = ("inflight", "inflight_retry")
# Edit latency bins (seconds, upper edges): the stream SLO's percentiles are read off
# these; the last bin is open-ended.
LATENCY_EDGES_S = (
    0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600,
)  # fmt: skip


def stat_key(run_id: str, cell: int) -> bytes:
    """The counter row of box ``cell`` of the run."""
    return b"stat:%s:%04d" % (run_id.encode(), cell)


def hist_key(run_id: str, minute: int, shard: int) -> bytes:
    """The counter row of one minute (minutes since the epoch) and shard."""
    return b"hist:%s:%010d:%02d" % (run_id.encode(), minute, shard)


def fail_key(run_id: str, chunk_id: int) -> bytes:
    """The row of a failed or retrying chunk."""
    return b"fail:%s:%020d" % (run_id.encode(), chunk_id)


def live_key(run_id: str, chunk_id: int) -> bytes:
    """The row of a chunk queued or running."""
    return b"live:%s:%020d" % (run_id.encode(), chunk_id)


def qc_key(run_id: str, shard: int) -> bytes:
    """A shard of the run's QC histogram counters (one column per feature bin)."""
    return b"qchist:%s:%02d" % (run_id.encode(), shard)


def minute_of(when: datetime) -> int:
    """Minutes since the epoch: the hist rows' time bucket."""
    return int(when.timestamp() // 60)


def latency_bin(seconds: float) -> int:
    """Index of the latency bin ``seconds`` falls in (edges are inclusive upper bounds)."""
    for i, edge in enumerate(LATENCY_EDGES_S):
        if seconds <= edge:
            return i
    return len(LATENCY_EDGES_S)


def cell_of(grid: StatGrid | None, coords: Sequence[int], chunk_id: int) -> int:
    """The counter row a chunk counts into: its box of the run's grid, or (a run with
    no grid) a shard of its id, which spreads the writes but maps nothing."""
    if grid is None:
        return shard_of(chunk_id, UNGRIDDED_CELLS)
    return grid.cell_of(coords)


def read_state(table: Table | str, chunk_key: bytes) -> bytes | None:
    """The chunk's state (``r``, ``f``, ``d``) or None when it has none yet."""
    row = read_row(table, chunk_key, CellFilter(columns={FAMILY: [STATE]}, per_column=1))
    return None if row is None else row.get(FAMILY, {}).get(STATE)


def transition(
    table: Table | str, chunk_key: bytes, new: bytes, cells: Mapping[bytes, bytes]
) -> bytes | None | bool:
    """Move the chunk to state ``new`` writing ``cells`` with it, atomically against
    any concurrent delivery; returns the state it left (None: it had none), or False
    when it did not move: a done chunk never leaves done, and done -> done rewrites
    nothing (the first delivery's record stands).

    Optimistic: read the state, then one CheckAndMutateRow conditioned on it; a
    concurrent change makes the condition fail and the read is repeated.
    """
    for _ in range(TRANSITION_TRIES):
        old = read_state(table, chunk_key)
        if old == b"d":
            return False
        row = Row(chunk_key)
        row.set_cell(FAMILY, STATE, new)
        for column, value in cells.items():
            row.set_cell(FAMILY, column, value)
        if old is None:
            moved = not check_and_mutate(
                table, row, CellFilter(columns={FAMILY: [STATE]}), what="ledger"
            )
        else:
            moved = check_and_mutate(
                table,
                row,
                CellFilter(columns={FAMILY: [STATE]}, per_column=1, values=[old]),
                if_matched=True,
                what="ledger",
            )
        if moved:
            return old
    raise WriteError(
        "ledger", {chunk_key: f"state changed {TRANSITION_TRIES} times during one transition"}
    )


def state_deltas(old: bytes | None, new: bytes) -> dict[bytes, int]:
    """Counter changes of one transition: the state left loses one, the new one gains."""
    deltas: dict[bytes, int] = {}
    if old == new:
        return deltas
    if old in STATE_COUNTER:
        deltas[STATE_COUNTER[old]] = -1
    deltas[STATE_COUNTER[new]] = 1
    return deltas


def shard_of(chunk_id: int, n: int) -> int:
    """A shard in ``[0, n)`` for a chunk: hashed, because a chunk id's low bits (the
    segment part) are all zero, so ``chunk_id % n`` would put every chunk in shard 0."""
    return zlib.crc32(chunk_id.to_bytes(8, "big")) % n


def counts_row(key: bytes, amounts: Mapping[bytes, int]) -> Row | None:
    """A row adding ``amounts`` to the counters at ``key`` (None when all are zero)."""
    row = Row(key)
    for qualifier, amount in sorted(amounts.items()):
        if amount:
            row.add_to_cell(SUM_FAMILY, qualifier, int(amount))
    return row if row.mutations else None


def add_counts(
    table: Table | str, key: bytes, amounts: Mapping[bytes, int], what: str = "ledger"
) -> None:
    """Add to the counters of one row (zero amounts are left out)."""
    add_many(table, {key: amounts}, what)


def add_many(
    table: Table | str,
    counts: Mapping[bytes, Mapping[bytes, int]],
    what: str = "ledger",
    extra: Sequence[Row] = (),
) -> None:
    """Add to the counters of several rows in one MutateRows request: blind AddToCell
    writes into the sum family (no read, no version per add), each row's status
    checked, sent once (an add repeated would count twice). ``extra`` rows (sent-once
    marks of the same state change) ride in the same request."""
    rows = [r for key, amounts in counts.items() if (r := counts_row(key, amounts)) is not None]
    rows.extend(extra)
    if rows:
        write_rows(table, rows, what)


def failure_row(
    run_id: str, chunk_id: int, status: str, coords: Sequence[int], at: str, fields: Mapping
) -> Row:
    """The ``fail:`` row of a chunk whose attempt failed: what ``runs inspect`` pages
    through and reconcile re-queues."""
    row = Row(fail_key(run_id, chunk_id))
    row.set_cell(FAMILY, b"status", status.encode())
    row.set_cell(FAMILY, b"coords", json.dumps([int(c) for c in coords]).encode())
    row.set_cell(FAMILY, b"at", at.encode())
    for name in ("error", "attempts", "permanent"):
        if name in fields:
            row.set_cell(FAMILY, name.encode(), json.dumps(fields[name]).encode())
    return row


def live_row(
    run_id: str, chunk_id: int, status: str, coords: Sequence[int], at: str, attempt: int
) -> Row:
    """The ``live:`` row of a chunk queued by a task attempt (``queued``), started by a
    worker (``running``) or whose attempt failed transiently (``retrying``: awaiting the
    next one). Its time stamp is what status measures silence from."""
    stamp, count = {
        "running": (b"started_at", b"attempts"),
        "queued": (b"queued_at", b"task_attempt"),
        "retrying": (b"finished_at", b"attempts"),
    }[status]
    row = Row(live_key(run_id, chunk_id))
    row.set_cell(FAMILY, b"status", status.encode())
    row.set_cell(FAMILY, b"coords", json.dumps([int(c) for c in coords]).encode())
    row.set_cell(FAMILY, stamp, at.encode())
    row.set_cell(FAMILY, count, json.dumps(attempt).encode())
    return row
