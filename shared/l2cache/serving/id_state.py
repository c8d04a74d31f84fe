"""Where each requested id stands: the lookup's opt-in ``state`` answer.

The existing service answers ``{}`` for an id that is missing, queued or has no voxels
alike. With ``?state=true`` the lookup answers, per requested id, one of:

- ``computed``: the cache has its row (features served as always);
- ``empty``: the row is the placeholder the existing worker writes for an id with no
  voxels (only ``size_nm3``, zero: :mod:`l2cache.store.rowformat`);
- ``pending``: queued and not computed yet: ``since`` (ISO time) and ``by``: a lookup's
  missing-id message (``{"queue": "missing_ids", "message_id", "run", "event"}``; run
  and event once on_edit recorded the message) or an edit (``{"queue": "edit"}``: the
  graph created the node less than ``pending_ttl_s`` ago and no row exists yet);
- ``failed``: its recompute ended without a row: ``reason`` (the ledger's error), ``at``
  and ``by`` (run, event);
- ``not_l2``: not a layer-2 id, or its chunk lies outside the volume;
- ``unknown``: the graph has no such node (``reason``), or it has it (``in_graph``) but
  nobody queued it (over a budget, ``update_cache=false``, or its queue mark expired).

Every read is by key and bounded by the request: the cache rows the lookup already
read (plus, when ``attribute_names`` leaves out ``size_nm3``, the raw rows of the ids
without the requested columns, to tell a placeholder), one ReadRows of the guard table
(negative entries, pending marks with their message ids), one keys-only ReadRows of
PCG's graph (the ``children`` cell's time: does the node exist, when was it made), one
ReadRows of the runs table's ``msg:<message id>`` rows and one of the events' and their
chunks' rows (``event:<run>:<key>``, ``evchunk:<run>:<key>:<chunk>``). Each is skipped
when nothing needs it; none grows with a table.

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
from l2cache.store.ledger import LEDGER_FAMILY, message_key
from l2cache.store.missing_guard import GRAPH_CHILDREN, GRAPH_FAMILY, MissingIdGuard

log = logging.getLogger(__name__)

STATES = ("computed", "empty", "pending", "failed", "not_l2", "unknown")
# Events on_edit records once it is finished with a message (fanned_out: the chunks'
# own rows say the rest).
_FAILED_EVENTS = ("failed", "dead_lettered", "partial")
_SIZE = b"size_nm3"


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
    raw = ctx.store.read_raw(missing)
    ctx.reads += 1
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
    """States of ids without a row: guard marks, then the graph, then the ledger."""
    negative: dict[int, tuple[int, str]] = {}
    claims: dict[int, tuple[int, str, bool]] = {}
    if ctx.guard is not None:
        try:
            negative, claims = ctx.guard.entries(ds.name, missing, [chunk_of[n] for n in missing])
            ctx.reads += 1
        except Exception as exc:  # noqa: BLE001 - said in the answer
            log.warning("guard read for states failed: %r", exc)
    fresh = {n for n, claim in claims.items() if claim[2]}
    unclaimed = [n for n in missing if n not in fresh and n not in negative]
    for node, (ms, why) in negative.items():
        if node not in fresh:
            out[node] = {"state": "unknown", "reason": why or "not in the graph", "at": iso_ms(ms)}
    created = _created(ctx, ds, unclaimed)
    window_ms = ctx.config.missing_ids.pending_ttl_s * 1000
    now_ms = int(ctx.clock() * 1000)
    for node in unclaimed:
        made = created.get(node) if created is not None else None
        if created is not None and made is None:
            out[node] = {"state": "unknown", "reason": "not in the graph"}
        elif made is not None and now_ms - made < window_ms:
            out[node] = {
                "state": "pending",
                "since": iso_ms(made),
                "by": {"queue": "edit", "created_at": iso_ms(made)},
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
        _claimed_states(ctx, ds, claims, chunk_of, found, names, int64_as_str, out)


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
    ctx: StateContext,
    ds: DatasetConfig,
    claims: Mapping[int, tuple[int, str, bool]],
    chunk_of: Mapping[int, int],
    found: dict[int, dict[str, Any]],
    names: Sequence[str] | None,
    int64_as_str: bool,
    out: dict[int, dict[str, Any]],
) -> None:
    """Ids a lookup queued: pending until the ledger says their event ended without
    their row (failed, with the reason). A mark older than ``pending_ttl_s`` (expired:
    the next request with ``update_cache`` queues the id again) only turns the state
    the caller already set into ``failed`` when its event failed."""
    sources = sorted({src for _, src, _ in claims.values() if src})
    events = _events(ctx, sources)
    outcome_keys: list[bytes] = []
    for run, key in events.values():
        outcome_keys.append(f"event:{run}:{key}".encode())
    for node, (_, src, _) in claims.items():
        if src in events:
            run, key = events[src]
            outcome_keys.append(
                b"evchunk:%s:%s:%020d" % (run.encode(), key.encode(), chunk_of[node])
            )
    outcomes = _ledger_rows(ctx, sorted(set(outcome_keys)))
    ended: dict[int, dict[str, Any]] = {}
    for node, (ms, src, fresh) in claims.items():
        by: dict[str, Any] = {"queue": "missing_ids", "message_id": src or None}
        where = events.get(src)
        verdict = None
        if where is not None:
            run, key = where
            by.update(run=run, event=key)
            event = outcomes.get(f"event:{run}:{key}".encode(), {})
            chunk = outcomes.get(
                b"evchunk:%s:%s:%020d" % (run.encode(), key.encode(), chunk_of[node]), {}
            )
            verdict = _verdict(event, chunk)
        if verdict is None:
            if fresh:
                out[node] = {"state": "pending", "since": iso_ms(ms), "by": by}
        else:
            ended[node] = {"state": "failed", **verdict, "by": by, "queued_at": iso_ms(ms)}
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


def _events(ctx: StateContext, sources: list[str]) -> dict[str, tuple[str, str]]:
    """``{message id: (run, event key)}`` of the messages on_edit has recorded."""
    if not sources or ctx.runs is None:
        return {}
    keys = [message_key(s) for s in sources]
    try:
        rows = ctx.runs.rows(keys=keys, cells=CellFilter(columns={LEDGER_FAMILY: [b"event"]}))
        ctx.reads += 1
    except Exception as exc:  # noqa: BLE001 - pending stays pending
        log.warning("runs-table read for states failed: %r", exc)
        return {}
    out = {}
    for src, key in zip(sources, keys, strict=True):
        cell = rows.get(key, {}).get(LEDGER_FAMILY, {}).get(b"event")
        if cell:
            where = json.loads(cell)
            out[src] = (str(where["run"]), str(where["key"]))
    return out


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
            "reason": "its recompute finished without this node (not found in the "
            "segmentation at the message's time)",
            "at": event.get("recorded_at"),
        }
    if status in _FAILED_EVENTS:
        errors = event.get("errors") or [event.get("error") or event.get("reason") or status]
        return {"reason": "; ".join(str(e) for e in errors)[:1000], "at": event.get("recorded_at")}
    if status == "ok":
        return {
            "reason": "its recompute finished without this node (not found in the "
            "segmentation at the message's time)",
            "at": event.get("recorded_at"),
        }
    return None  # in flight, or fanned out and its chunk not finished yet


def summary(by_id: Mapping[int, Mapping[str, Any]]) -> dict[str, int]:
    """How many ids are in each state (every state named, zeros included)."""
    counts = dict.fromkeys(STATES, 0)
    for state in by_id.values():
        counts[state["state"]] += 1
    return counts
