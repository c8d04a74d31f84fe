"""Where each requested id stands: the lookup's opt-in ``state`` answer.

The existing service answers ``{}`` for an id that is missing, queued or has no voxels
alike. With ``?state=true`` the lookup answers, per requested id, one of:

- ``computed``: the cache has its row (features served as always);
- ``empty``: the row is the placeholder the existing worker writes for an id with no
  voxels (only ``size_nm3``, zero: :mod:`l2cache.store.rowformat`);
- ``pending``: queued and not computed yet: ``since`` (ISO time) and ``by``: a lookup's
  missing-id message (``{"queue": "missing_ids", "message_id", "run", "event"}``; run
  and event once on_edit recorded the message) or an edit on_edit accepted
  (``{"queue": "edit", "operation_id", "message_id", "run", "event"}``, since its
  publish time, found by the id's ``l2edit:`` row) while that event is unfinished. An
  edit l2cache has no record of (not received yet, or over the index's cap) is guessed
  from the graph: a ``children`` cell younger than ``pending_ttl_s`` reads pending
  ``{"queue": "edit", "received": false, "created_at"}``;
- ``failed``: its recompute ended without a row: ``reason`` (the ledger's error), ``at``
  and ``by`` (the queue's or the edit's run and event), or a bulk or region run failed
  its chunk for good and no later run computed it (``chunkfail:`` row: ``by`` names
  the run, its kind and the chunk; only for ids the graph made before that run's
  snapshot);
- ``not_l2``: not a layer-2 id, or its chunk lies outside the volume;
- ``unknown``: the graph has no such node (``reason``), or it has it (``in_graph``) but
  nobody queued it (over a budget, ``update_cache=false``, or its queue mark expired),
  or its edit was received :data:`EDIT_OUTCOME_WINDOW_S` ago and recorded no outcome.

Every read is by key and bounded by the request: the cache rows the lookup already
read (plus, when ``attribute_names`` leaves out ``size_nm3``, the raw rows of the ids
without the requested columns, to tell a placeholder), one ReadRows of the guard table
(negative entries, pending marks with their message ids), one ReadRows of the runs
table's index rows (``msg:<message id>`` of the marks, ``l2edit:<dataset>:<id>`` and
``chunkfail:<dataset>:<chunk>`` of the ids without a fresh mark), one keys-only
ReadRows of PCG's graph for the ids no index row placed (the ``children`` cell's time:
does the node exist, when was it made), one ReadRows of the events' and their chunks'
rows (``event:<run>:<key>``, ``evchunk:<run>:<key>:<chunk>``) and, when an event says
it ended without the row, one re-read of those cache rows. Each is skipped when nothing
needs it; none grows with a table: at most 6 reads (5 without an attribute filter;
7 with a fallback table, read beside the raw rows).

The state is computed after this request queued what it queues, so an id the request
itself queued reads ``pending`` (by this request's message).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from l2cache.config import DatasetConfig, L2CacheConfig
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import FEATURE_FAMILY
from l2cache.gcp.bigtable import CellFilter, RowReader
from l2cache.inputs.volume import in_volume
from l2cache.serving.missing import graph_table_name
from l2cache.store.cache import CacheStore
from l2cache.store.ledger import (
    INDEX_FAMILY,
    LEDGER_FAMILY,
    chunk_failure_key,
    edit_index_key,
    message_key,
)
from l2cache.store.missing_guard import GRAPH_CHILDREN, GRAPH_FAMILY, MissingIdGuard

log = logging.getLogger(__name__)

STATES = ("computed", "empty", "pending", "failed", "not_l2", "unknown")
# Events on_edit records once it is finished with a message (fanned_out: the chunks'
# own rows say the rest).
_FAILED_EVENTS = ("failed", "dead_lettered", "partial")
_SIZE = b"size_nm3"
# An edit on_edit accepted is pending until its event records an outcome; one that has
# none this long after the edit (Pub/Sub stopped redelivering a message whose every
# delivery timed out, so on_edit's last-attempt record never ran) reads unknown.
EDIT_OUTCOME_WINDOW_S = 6 * 3600


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC (what the state answer carries)."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def is_placeholder_value(value: Mapping[str, Any]) -> bool:
    """Whether served features are the existing worker's placeholder: ``size_nm3`` 0
    (a real node has at least one voxel) and nothing else."""
    size = value.get("size_nm3")
    return size is not None and str(size) in ("0", "0.0") and len(value) == 1


@dataclass
class StateContext:
    """What the state needs beyond the request: readers of the tables it reads."""

    config: L2CacheConfig
    store: CacheStore
    guard: MissingIdGuard | None
    runs: RowReader | None
    graph_reader: Callable[[str], RowReader] = RowReader
    clock: Callable[[], float] = field(default=lambda: datetime.now(UTC).timestamp())
    reads: int = 0  # Bigtable reads made for states (the cache's first read excluded)


def states(
    ctx: StateContext,
    ds: DatasetConfig,
    l2ids: np.ndarray,
    found: dict[int, dict[str, Any]],
    names: Sequence[str] | None,
    int64_as_str: bool = False,
) -> dict[int, dict[str, Any]]:
    """``{id: state}`` for the distinct ``l2ids`` of a request.

    ``found`` is what the lookup read; ids whose row shows up while the state is made
    (a late write, noticed when an event says done) are added to it, so the answer's
    features and states agree.
    """
    out: dict[int, dict[str, Any]] = {}
    ids = idlib.as_uint64(l2ids)
    if ids.size == 0:
        return out
    layers = idlib.get_layer(ids)
    for node, layer in zip(ids[layers != 2].tolist(), layers[layers != 2].tolist(), strict=True):
        out[node] = {"state": "not_l2", "reason": f"layer {layer}, not 2"}
    l2 = ids[layers == 2]
    coords = idlib.get_chunk_coords(l2, ds.spatial_bits)
    chunk_ids = idlib.get_chunk_id(l2, ds.spatial_bits).tolist()
    inside_of: dict[int, bool] = {}
    missing: list[int] = []
    chunk_of: dict[int, int] = {}
    for i, node in enumerate(l2.tolist()):
        cid = chunk_ids[i]
        if cid not in inside_of:
            inside_of[cid] = in_volume(ds, coords[i].tolist())
        if not inside_of[cid]:
            out[node] = {
                "state": "not_l2",
                "reason": f"its chunk {coords[i].tolist()} lies outside the volume",
            }
        elif node in found:
            out[node] = {"state": "empty" if is_placeholder_value(found[node]) else "computed"}
        else:
            missing.append(node)
            chunk_of[node] = cid
    if missing and names and "size_nm3" not in names:
        missing = _rows_without_requested_columns(ctx, missing, out)
    if missing:
        _missing_states(ctx, ds, missing, chunk_of, found, names, int64_as_str, out)
    return out


def _rows_without_requested_columns(
    ctx: StateContext, missing: list[int], out: dict[int, dict[str, Any]]
) -> list[int]:
    """Under an ``attribute_names`` filter a row without those columns is served ``{}``
    (as upstream); its raw row still says computed or placeholder. Returns the ids with
    no row at all."""
    raw = ctx.store.read_raw(missing, with_fallback=True)  # as the lookup serves them
    ctx.reads += 1 if ctx.store.fallback is None or len(raw) == len(set(missing)) else 2
    left = []
    for node in missing:
        row = raw.get(node)
        cells = (row or {}).get(FEATURE_FAMILY, {})
        if not cells:
            left.append(node)
        elif set(cells) == {_SIZE} and not any(cells[_SIZE]):
            out[node] = {"state": "empty"}
        else:
            out[node] = {"state": "computed"}
    return left


def _missing_states(
    ctx: StateContext,
    ds: DatasetConfig,
    missing: list[int],
    chunk_of: Mapping[int, int],
    found: dict[int, dict[str, Any]],
    names: Sequence[str] | None,
    int64_as_str: bool,
    out: dict[int, dict[str, Any]],
) -> None:
    """States of ids without a row, from recorded facts, in this order: a lookup's
    fresh queue mark (pending, or failed once its event failed), the edit that made the
    id (``l2edit:``: pending while its event is unfinished, failed with its reason), a
    negative entry (unknown), the graph (not in it: unknown), a run that failed the
    id's chunk for good (``chunkfail:``: failed), an edit l2cache has no record of (the
    ``children`` cell younger than ``pending_ttl_s``: pending), else unknown. An
    expired queue mark whose event failed turns the state into that failure."""
    negative: dict[int, tuple[int, str]] = {}
    claims: dict[int, tuple[int, str, bool]] = {}
    if ctx.guard is not None:
        try:
            negative, claims = ctx.guard.entries(ds.name, missing, [chunk_of[n] for n in missing])
            ctx.reads += 1
        except Exception as exc:  # noqa: BLE001 - said in the answer
            log.warning("guard read for states failed: %r", exc)
    fresh = {n for n, claim in claims.items() if claim[2]}
    rest = [n for n in missing if n not in fresh]
    sources = sorted({src for _, src, _ in claims.values() if src})
    index = _index(ctx, ds, sources, rest, chunk_of)
    events, edits, chunk_fails = index.events, index.edits, index.chunk_fails
    outcome_keys: set[bytes] = set()
    for node, (_, src, _) in claims.items():
        if src in events:
            outcome_keys.update(_outcome_keys(*events[src], chunk_of[node]))
    for node, pointer in edits.items():
        outcome_keys.update(_outcome_keys(str(pointer["run"]), str(pointer["key"]), chunk_of[node]))
    outcomes = _ledger_rows(ctx, sorted(outcome_keys))
    ended: dict[int, dict[str, Any]] = {}
    now_ms = int(ctx.clock() * 1000)
    for node, pointer in edits.items():
        _edit_state(node, pointer, outcomes, chunk_of[node], now_ms, out, ended)
    unclaimed = [n for n in rest if n not in negative and n not in edits]
    for node, (ms, why) in negative.items():
        if node not in fresh and node not in edits:
            out[node] = {"state": "unknown", "reason": why or "not in the graph", "at": iso_ms(ms)}
    created = _created(ctx, ds, unclaimed)
    window_ms = ctx.config.missing_ids.pending_ttl_s * 1000
    for node in unclaimed:
        made = created.get(node) if created is not None else None
        failure = chunk_fails.get(chunk_of[node])
        if created is not None and made is None:
            out[node] = {"state": "unknown", "reason": "not in the graph"}
        elif (
            failure is not None and made is not None and made <= int(failure.get("snapshot_ms", 0))
        ):
            out[node] = _chunk_failed(failure, chunk_of[node])
        elif failure is not None and made is None:  # the graph cannot say when it was made
            state = _chunk_failed(failure, chunk_of[node])
            out[node] = {
                "state": "unknown",
                "reason": f"its chunk failed in run {failure.get('run')} "
                f"({state['reason']}); the graph cannot tell whether the node predates "
                "that run's snapshot",
                "in_graph": None,
                "chunk_failure": state,
            }
        elif made is not None and now_ms - made < window_ms:
            out[node] = {  # an edit l2cache has not received (yet): no l2edit row
                "state": "pending",
                "since": iso_ms(made),
                "by": {"queue": "edit", "received": False, "created_at": iso_ms(made)},
            }
        else:
            state: dict[str, Any] = {"state": "unknown", "reason": "not queued"}
            state["in_graph"] = None if created is None else True
            if made is not None:
                state["created_at"] = iso_ms(made)
            if node in claims:  # queued before, and the mark expired without a row
                state["reason"] = "not queued: its queue mark expired without a row"
                state["queued_at"] = iso_ms(claims[node][0])
            out[node] = state
    if claims:
        _claimed_states(claims, chunk_of, events, outcomes, out, ended)
    if not ended:
        return
    # "done" and the row is missing: it may have been written after the lookup's read
    late = ctx.store.read_features(list(ended), names, int64_as_str)
    ctx.reads += 1
    for node, state in ended.items():
        if node in late:
            found[node] = late[node]
            out[node] = {"state": "empty" if is_placeholder_value(late[node]) else "computed"}
        else:
            out[node] = state


def _outcome_keys(run: str, key: str, chunk_id: int) -> tuple[bytes, bytes]:
    """The ledger rows that say how an event ended for one chunk: the event's own row
    (inline events) and its chunk's ``evchunk`` row (fanned-out ones)."""
    return (
        f"event:{run}:{key}".encode(),
        b"evchunk:%s:%s:%020d" % (run.encode(), key.encode(), chunk_id),
    )


def _edit_state(
    node: int,
    pointer: Mapping[str, Any],
    outcomes: Mapping[bytes, dict[str, Any]],
    chunk_id: int,
    now_ms: int,
    out: dict[int, dict[str, Any]],
    ended: dict[int, dict[str, Any]],
) -> None:
    """An id an accepted edit made: pending since the edit while its event is
    unfinished, else failed with the event's (or its chunk's) reason. An event with no
    outcome :data:`EDIT_OUTCOME_WINDOW_S` after the edit (every delivery timed out or
    crashed before on_edit could record anything) is not pending for ever: unknown."""
    run, key = str(pointer["run"]), str(pointer["key"])
    by = {
        "queue": "edit",
        "operation_id": pointer.get("op"),
        "message_id": pointer.get("msg"),
        "run": run,
        "event": key,
    }
    event_key, chunk_key = _outcome_keys(run, key, chunk_id)
    verdict = _verdict(outcomes.get(event_key, {}), outcomes.get(chunk_key, {}))
    since = str(pointer.get("at") or "")
    if verdict is None and _age_s(since, now_ms) > EDIT_OUTCOME_WINDOW_S:
        out[node] = {  # received, never finished: a caller's retry loop must end
            "state": "unknown",
            "reason": "its edit was received but recorded no outcome within "
            f"{EDIT_OUTCOME_WINDOW_S // 3600} h (its deliveries stopped unanswered)",
            "by": by,
            "received_at": since,
        }
    elif verdict is None:
        out[node] = {"state": "pending", "since": since, "by": by}
    else:
        ended[node] = {"state": "failed", **verdict, "by": by}


def _age_s(iso: str, now_ms: int) -> float:
    """Seconds from an ISO time to ``now_ms`` (0 when the time cannot be read)."""
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return now_ms / 1000 - then.timestamp()


def _chunk_failed(failure: Mapping[str, Any], chunk_id: int) -> dict[str, Any]:
    """The state of an id whose chunk a run failed for good (its ``chunkfail:`` row)."""
    by = {"run": failure.get("run"), "kind": failure.get("kind"), "chunk": chunk_id}
    return {
        "state": "failed",
        "reason": str(failure.get("error")),
        "at": failure.get("at"),
        "by": by,
    }


@dataclass
class _Index:
    """What one by-key read of the runs table's index rows found for a request."""

    events: dict[str, tuple[str, str]]  # missing-id message id -> (run, event key)
    edits: dict[int, dict[str, Any]]  # L2 id -> its edit event (l2edit: row)
    chunk_fails: dict[int, dict[str, Any]]  # chunk id -> its chunkfail: row


def _index(
    ctx: StateContext,
    ds: DatasetConfig,
    sources: list[str],
    nodes: list[int],
    chunk_of: Mapping[int, int],
) -> _Index:
    """One ReadRows of the runs table by key: ``msg:<message id>`` of the queue marks'
    messages, ``l2edit:<dataset>:<id>`` of the ids and ``chunkfail:<dataset>:<chunk>``
    of their chunks (absent rows are simply not returned)."""
    found = _Index({}, {}, {})
    if ctx.runs is None or not (sources or nodes):
        return found
    msg_keys = {message_key(s): s for s in sources}
    edit_keys = {edit_index_key(ds.name, n): n for n in nodes}
    fail_keys = {chunk_failure_key(ds.name, chunk_of[n]): chunk_of[n] for n in nodes}
    keys = sorted({*msg_keys, *edit_keys, *fail_keys})
    try:
        rows = ctx.runs.rows(
            keys=keys,
            cells=CellFilter(columns={LEDGER_FAMILY: None, INDEX_FAMILY: None}, per_column=1),
        )
        ctx.reads += 1
    except Exception as exc:  # noqa: BLE001 - pending stays pending
        log.warning("runs-table read for states failed: %r", exc)
        return found
    for key, row in rows.items():
        try:
            if key in msg_keys:
                cell = row.get(INDEX_FAMILY, {}).get(b"event")  # older rows: ledger family
                where = json.loads(
                    cell if cell is not None else row.get(LEDGER_FAMILY, {})[b"event"]
                )
                found.events[msg_keys[key]] = (str(where["run"]), str(where["key"]))
            elif key in edit_keys:
                found.edits[edit_keys[key]] = json.loads(row.get(INDEX_FAMILY, {})[b"event"])
            elif key in fail_keys:
                cells = row.get(LEDGER_FAMILY, {})
                found.chunk_fails[fail_keys[key]] = {
                    k.decode(): json.loads(v) for k, v in cells.items()
                }
        except (KeyError, ValueError) as exc:  # a row of another shape: not an answer
            log.warning("runs-table row %r unreadable for states: %r", key, exc)
    return found


def _created(ctx: StateContext, ds: DatasetConfig, nodes: list[int]) -> dict[int, int] | None:
    """``{id: ms}`` of the nodes PCG's graph has (time of their ``children`` cell: when
    the node was made), one keys-only ReadRows; None when the graph cannot tell (a
    graphene server, an unreadable table)."""
    table = graph_table_name(ds)
    if table is None or not nodes:
        return None if table is None else {}
    try:
        rows = ctx.graph_reader(table).versions(
            keys=[idlib.row_key(n) for n in nodes],
            cells=CellFilter(
                columns={GRAPH_FAMILY: [GRAPH_CHILDREN]}, per_column=1, strip_values=True
            ),
        )
        ctx.reads += 1
    except Exception as exc:  # noqa: BLE001 - "cannot tell" is an answer
        log.warning("graph read for states failed: %r", exc)
        return None
    made: dict[int, int] = {}
    for key, row in rows.items():
        versions = row.get(GRAPH_FAMILY, {}).get(GRAPH_CHILDREN, [])
        if versions:
            made[int(key)] = versions[0][0] // 1000
    return made


def _claimed_states(
    claims: Mapping[int, tuple[int, str, bool]],
    chunk_of: Mapping[int, int],
    events: Mapping[str, tuple[str, str]],
    outcomes: Mapping[bytes, dict[str, Any]],
    out: dict[int, dict[str, Any]],
    ended: dict[int, dict[str, Any]],
) -> None:
    """Ids a lookup queued: pending until the ledger says their event ended without
    their row (failed, with the reason). A mark older than ``pending_ttl_s`` (expired:
    the next request with ``update_cache`` queues the id again) only turns the state
    already set into ``failed`` when its event failed."""
    for node, (ms, src, fresh) in claims.items():
        by: dict[str, Any] = {"queue": "missing_ids", "message_id": src or None}
        where = events.get(src)
        verdict = None
        if where is not None:
            run, key = where
            by.update(run=run, event=key)
            event_key, chunk_key = _outcome_keys(run, key, chunk_of[node])
            verdict = _verdict(outcomes.get(event_key, {}), outcomes.get(chunk_key, {}))
        if verdict is None:
            if fresh:
                out[node] = {"state": "pending", "since": iso_ms(ms), "by": by}
        else:
            ended[node] = {"state": "failed", **verdict, "by": by, "queued_at": iso_ms(ms)}


def _ledger_rows(ctx: StateContext, keys: list[bytes]) -> dict[bytes, dict[str, Any]]:
    """Ledger rows by key, each column JSON-decoded (``status`` of evchunk rows is text)."""
    if not keys or ctx.runs is None:
        return {}
    try:
        rows = ctx.runs.rows(keys=keys, cells=CellFilter(columns={LEDGER_FAMILY: None}))
        ctx.reads += 1
    except Exception as exc:  # noqa: BLE001 - pending stays pending
        log.warning("runs-table read for states failed: %r", exc)
        return {}
    out: dict[bytes, dict[str, Any]] = {}
    for key, row in rows.items():
        fields: dict[str, Any] = {}
        for col, value in row.get(LEDGER_FAMILY, {}).items():
            try:
                fields[col.decode()] = json.loads(value)
            except ValueError:
                fields[col.decode()] = value.decode("utf-8", "replace")
        out[key] = fields
    return out


def _verdict(event: Mapping[str, Any], chunk: Mapping[str, Any]) -> dict[str, Any] | None:
    """How an id's event ended when its row is still missing (None: not ended yet).

    Inline events (one chunk, computed by on_edit itself) say it on their event row;
    fanned-out ones on the chunk's ``evchunk`` row, written by its compute task.
    """
    status = event.get("status")
    if "chunks_enqueued" in event and not chunk:  # fanned out, its chunk not finished
        return None
    if chunk.get("status") == "failed":
        return {"reason": str(chunk.get("error", "failed")), "at": event.get("recorded_at")}
    if chunk.get("status") == "done":
        return {
            "reason": "its recompute finished without this node (the graph has no "
            "children for it, or none of its supervoxels has voxels in the chunk)",
            "at": event.get("recorded_at"),
        }
    if status in _FAILED_EVENTS:
        errors = event.get("errors") or [event.get("error") or event.get("reason") or status]
        return {"reason": "; ".join(str(e) for e in errors)[:1000], "at": event.get("recorded_at")}
    if status == "ok":
        return {
            "reason": "its recompute finished without this node (the graph has no "
            "children for it, or none of its supervoxels has voxels in the chunk)",
            "at": event.get("recorded_at"),
        }
    return None  # in flight, or fanned out and its chunk not finished yet


def summary(by_id: Mapping[int, Mapping[str, Any]]) -> dict[str, int]:
    """How many ids are in each state (every state named, zeros included)."""
    counts = dict.fromkeys(STATES, 0)
    for state in by_id.values():
        counts[state["state"]] += 1
    return counts
