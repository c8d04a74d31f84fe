"""The lookup's opt-in extras: per-id ``state`` and a bounded ``wait`` for queued ids.

``POST /l2cache/api/v1/table/<table>/attributes?wait=S&state=true`` (either or both):

- ``wait=S`` (seconds, at most ``lookup_wait.max_s`` of the dataset map, default 30;
  a larger value is cut to it): after the normal lookup (which queues missing ids as
  always), the ids that are *pending* (queued by this or an earlier request, or made by
  an edit less than ``pending_ttl_s`` ago) are waited for: their cache rows, and only
  theirs, are read again with backoff (0.1 s, doubling, at most 1 s apart), and every
  2, 4, 8 s their state is checked so an id whose recompute failed stops the wait.
  The answer comes as soon as none is pending, or at the cap. Ids that are unknown,
  deferred or not layer 2 are never waited for. Without ``state`` the body is the
  default one (the features, ``{}`` for what is still missing).
- either takes at most ``lookup_wait.max_ids`` ids (default 75,000; the answer is
  built whole, where the default one streams); more is a 400.
- ``state=true``: the body becomes ``{"attributes": <the default body>, "state":
  {id: {...}}, "summary": {state: count}}`` (:mod:`l2cache.serving.id_state`).

Headers: ``X-L2Cache-Wait`` (``none``: nothing to wait for or not asked; ``ready``:
every waited id has its row; ``settled``: none is pending any more, some failed or
went unknown; ``cap``: the cap came first), ``X-L2Cache-Waited-Ms``,
``X-L2Cache-Wait-Reads`` (Bigtable reads the wait made), ``X-L2Cache-State-Reads``
(reads made for states, the wait's checks included) and ``X-L2Cache-Missing-Ids``
updated to what is still missing.

Reads are bounded by the time, not the load: at the 30 s cap 33 cache reads of the
waited ids and 4 state checks (after 2.5, 6.5, 14.5, 22.5 s) of at most 6 reads each
(tests/test_id_state.py counts them). At most 1 s between polls: a 256x256x512 chunk
computes in ~1.5-3 s, and at 2 s apart the answer came up to 1.6 s after the write
(bench/wait_latency.py); a read of a few keys a second per waiting request is nothing
to a Bigtable node.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import orjson

from l2cache.config import DatasetConfig, L2CacheConfig
from l2cache.domain import ids as idlib
from l2cache.gcp.bigtable import RowReader
from l2cache.serving.id_state import StateContext, states, summary
from l2cache.store.cache import CacheStore

DEFAULT_MAX_WAIT_S = 30.0
# Ids a request with ``state`` or ``wait`` may name: its answer is built whole in memory
# (the default answer streams), so it keeps the old per-request cap.
DEFAULT_MAX_IDS = 75_000
HARD_MAX_WAIT_S = 60.0  # half the lookup function's 120 s timeout
FIRST_POLL_S = 0.1
MAX_POLL_S = 1.0
FIRST_CHECK_S = 2.0
MAX_CHECK_S = 8.0
_runs_readers: dict[str, RowReader] = {}


class Service(Protocol):
    """What :func:`answer` uses of the lookup service (l2cache.serving.api's, which
    calls this module; typed here so neither imports the other back)."""

    config: L2CacheConfig

    def store(self, dataset: str) -> CacheStore:
        """The dataset's cache store."""
        ...


class WaitError(ValueError):
    """A ``wait`` or ``state`` value the client must fix (the lookup answers 400)."""


def max_wait_s(config: L2CacheConfig) -> float:
    """The map's ``lookup_wait: {max_s}`` (default 30 s, at most 60 s: the lookup
    function's timeout is 120 s, and a held request holds one of its threads)."""
    section = config.raw.get("lookup_wait") or {}
    value = section.get("max_s", DEFAULT_MAX_WAIT_S) if isinstance(section, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value:
        raise ValueError(f"lookup_wait.max_s must be a number of seconds, got {value!r}")
    return float(min(value, HARD_MAX_WAIT_S))


def max_ids(config: L2CacheConfig) -> int:
    """The map's ``lookup_wait: {max_ids}`` (default 75,000, the cap the lookup had
    before its answers streamed): ids per request with ``state`` or ``wait``."""
    section = config.raw.get("lookup_wait") or {}
    value = section.get("max_ids", DEFAULT_MAX_IDS) if isinstance(section, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"lookup_wait.max_ids must be a positive integer, got {value!r}")
    return value


def parse_wait(value: str | None, cap: float) -> float:
    """Seconds to wait at most (0: no wait), the client's ``wait`` cut to ``cap``."""
    if value is None or value.strip() == "":
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        raise WaitError(f"wait must be a number of seconds, got {value[:40]!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise WaitError(f"wait must be a non-negative number of seconds, got {value[:40]!r}")
    return min(seconds, cap)


def parse_state(value: str | None) -> bool:
    """``state=true|false`` (1/0, yes/no, on/off)."""
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on", ""):
        return v != ""
    if v in ("0", "false", "no", "off"):
        return False
    raise WaitError(f"state must be true or false, got {value[:40]!r}")


def runs_reader(config: L2CacheConfig) -> RowReader:
    """A reader of the runs table (one per process): the ledger rows states read."""
    name = (
        f"projects/{config.bigtable.project}/instances/{config.bigtable.instance}"
        f"/tables/{config.runs_table_id}"
    )
    if name not in _runs_readers:
        _runs_readers[name] = RowReader(name)
    return _runs_readers[name]


def wait_for_rows(
    ctx: StateContext,
    ds: DatasetConfig,
    waiting: list[int],
    found: dict[int, dict[str, Any]],
    names: Sequence[str] | None,
    int64_as_str: bool,
    seconds: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, int]:
    """Poll the cache rows of ``waiting`` until each has one, or has stopped being
    pending, or ``seconds`` passed; rows found are added to ``found``. Returns
    (``ready`` | ``settled`` | ``cap``, cache reads made).

    Why polling: the worker writes the cache table and nothing tells a lookup instance
    (a Pub/Sub subscription per instance would cost more than a read per second, and
    the row is the truth anyway). Backoff keeps it at 1 read per second once it is slow.
    """
    start = clock()
    deadline = start + seconds
    delay, check_every = FIRST_POLL_S, FIRST_CHECK_S
    next_check = start + check_every
    reads = 0
    ended = False
    while waiting:
        now = clock()
        if now >= deadline:
            return "cap", reads
        sleep(min(delay, deadline - now))
        got = ctx.store.read_features(waiting, names, int64_as_str)
        reads += 1
        found.update(got)
        waiting = [n for n in waiting if n not in got]
        if waiting and clock() >= next_check:
            st = states(ctx, ds, np.array(waiting, dtype=np.uint64), found, names, int64_as_str)
            still = [n for n in waiting if st[n]["state"] == "pending"]
            ended = ended or len(still) < len(waiting)
            waiting = still
            check_every = min(check_every * 2, MAX_CHECK_S)
            next_check = clock() + check_every
        delay = min(delay * 2, MAX_POLL_S)
    return ("settled" if ended else "ready"), reads


def answer(
    service: Service,
    ds: DatasetConfig,
    l2ids: np.ndarray,
    found: dict[int, dict[str, Any]],
    names: Sequence[str] | None,
    int64_as_str: bool,
    query: Mapping[str, str],
    headers: dict[str, str],
    timings: dict[str, float],
) -> tuple[bytes, dict[str, str]]:
    """The lookup's answer (body, headers) when ``wait`` or ``state`` is asked, after
    the normal lookup read ``found`` and queued what it queues. Raises
    :class:`WaitError` for a bad ``wait`` or ``state`` value."""
    seconds = parse_wait(query.get("wait"), max_wait_s(service.config))
    with_state = parse_state(query.get("state"))
    limit = max_ids(service.config)
    if l2ids.size > limit:
        raise WaitError(
            f"state and wait take at most {limit} ids per request, not {l2ids.size} "
            "(split the request; without them any size is answered)"
        )
    ctx = StateContext(
        config=service.config,
        store=service.store(ds.name),
        guard=getattr(service, "_guard", None),
        runs=runs_reader(service.config),
    )
    t0 = time.perf_counter()
    outcome, wait_reads = "none", 0
    missing = [n for n in l2ids.tolist() if n not in found]
    if seconds > 0 and missing:
        first = states(ctx, ds, np.array(missing, dtype=np.uint64), found, names, int64_as_str)
        waiting = [n for n in missing if first[n]["state"] == "pending" and n not in found]
        if waiting:
            before = ctx.reads
            outcome, polls = wait_for_rows(ctx, ds, waiting, found, names, int64_as_str, seconds)
            wait_reads = polls + ctx.reads - before
    waited = time.perf_counter() - t0
    result = {str(node): found.get(node, {}) for node in l2ids.tolist()}
    body: Any = result
    if with_state:
        by_id = states(ctx, ds, l2ids, found, names, int64_as_str)
        result = {str(node): found.get(node, {}) for node in l2ids.tolist()}  # late rows
        body = {
            "attributes": result,
            "state": {str(n): by_id[n] for n in l2ids.tolist()},
            "summary": summary(by_id),
        }
    timings["wait"] = waited
    layer2 = l2ids[idlib.get_layer(l2ids) == 2].tolist() if l2ids.size else []
    still = sum(1 for n in layer2 if n not in found)
    out_headers = {
        **headers,
        "X-L2Cache-Missing-Ids": str(still),
        "X-L2Cache-Wait": outcome,
        "X-L2Cache-Waited-Ms": str(round(waited * 1000)),
        "X-L2Cache-Wait-Reads": str(wait_reads),
        "X-L2Cache-State-Reads": str(ctx.reads),
        "Content-Type": "application/json",
    }
    t1 = time.perf_counter()
    payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
    timings["encode"] = time.perf_counter() - t1
    return payload, out_headers
