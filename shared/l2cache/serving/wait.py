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
  {id: {...}}, "summary": {state: count}}`` (:mod:`l2cache.serving.id_state`), JSON
  only: with an ``Accept`` that allows ``.npz`` and not JSON it is a 406. ``wait``
  alone answers ``.npz`` by ``Accept`` as the default answer does.

What a request costs is settled before anything is read (:func:`options`, then the
lookup's dispatch): a bad, repeated or non-ASCII ``wait`` / ``state`` value, or too
many ids, is a 400 with no read, no publish and no slot. A request with a wait takes a
slot (:class:`WaitSlots`, one per process) for its whole length: at most
``lookup_wait.max_concurrent`` per instance (default half its request threads: 2 of
the 4 functions-framework runs on 1 vCPU) and ``max_per_caller`` per caller (default
half of that: 1), else 429 with ``Retry-After: 2``. A 429 and not an immediate answer
marked busy: a client that asked to wait has no sleep of its own in its loop (the wait
is its sleep), so an immediate answer would turn that loop into back-to-back full
lookups, while a 429 costs no read and every HTTP client knows to back off on it.
Then the ids-in-flight admission of every lookup answer (429, ``Retry-After: 1``).

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
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

from l2cache.config import DatasetConfig, L2CacheConfig
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import ATTRIBUTE_NAMES
from l2cache.gcp.bigtable import RowReader
from l2cache.serving.id_state import StateContext, states, summary
from l2cache.serving.respond import JSON_MEDIA_TYPE, NPZ_MEDIA_TYPE, NpzBuilder
from l2cache.store.cache import CacheStore

# A refused wait (every wait slot taken) is told to come back after about a chunk's
# compute (1.5-3 s at 256x256x512), the usual length of a wait that ends ``ready``.
BUSY_RETRY_AFTER_S = 2
# A number of seconds as clients write it (``5``, ``2.5``, ``1e9``): ASCII only, so
# Python's ``float`` extras (``nan``, ``inf``, ``5_0``, non-ASCII digits) are refused.
_SECONDS = re.compile(r"[0-9.eE+-]{1,40}")
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
    """The map's ``lookup_wait.max_s`` (default 30 s, at most 60 s: checked when the map
    is read; a held request holds one of the instance's threads)."""
    return config.lookup_wait.max_s


def max_ids(config: L2CacheConfig) -> int:
    """The map's ``lookup_wait.max_ids`` (default 75,000, the cap the lookup had before
    its answers streamed): ids per request with ``state`` or ``wait``."""
    return config.lookup_wait.max_ids


def instance_threads() -> int:
    """The request threads of this instance, as functions-framework sizes its gunicorn
    gthread pool (``THREADS``, else 4 per CPU: 4 on the lookup's 1 vCPU). These, not
    Cloud Run's concurrency of 8, are what requests hold: a ninth is queued inside."""
    raw = os.environ.get("THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else (os.cpu_count() or 1) * 4


def wait_limits(config: L2CacheConfig) -> tuple[int, int]:
    """(waits at once on this instance, waits at once of one caller): the map's
    ``lookup_wait.max_concurrent`` (default half the instance's threads, at least 1:
    2 of the 4, so plain lookups always keep the other half) and ``max_per_caller``
    (default half of that, at least 1: one caller cannot take every wait slot)."""
    policy = config.lookup_wait
    total = policy.max_concurrent or max(1, instance_threads() // 2)
    per_caller = policy.max_per_caller or max(1, total // 2)
    return total, min(per_caller, total)


@dataclass(frozen=True)
class Options:
    """What a request asked of this module, parsed before any body is read or any row
    is: a bad value costs a 400 and nothing else."""

    seconds: float  # 0: no wait
    with_state: bool


def _single(query: Mapping[str, str], name: str) -> str | None:
    """``query[name]``, refusing a parameter given twice (which one would win differs
    between servers and proxies; the client must say one)."""
    getlist = getattr(query, "getlist", None)
    if getlist is not None and len(getlist(name)) > 1:
        raise WaitError(f"{name} is given {len(getlist(name))} times; give it once")
    return query.get(name)


def options(query: Mapping[str, str], config: L2CacheConfig) -> Options:
    """The request's ``wait`` and ``state``; raises :class:`WaitError` for a bad one."""
    return Options(
        seconds=parse_wait(_single(query, "wait"), max_wait_s(config)),
        with_state=parse_state(_single(query, "state")),
    )


def parse_wait(value: str | None, cap: float) -> float:
    """Seconds to wait at most (0: no wait), the client's ``wait`` cut to ``cap``."""
    if value is None or value.strip() == "":
        return 0.0
    text = value.strip()
    seconds = math.nan
    if _SECONDS.fullmatch(text):
        try:
            seconds = float(text)
        except ValueError:
            pass
    if math.isnan(seconds):
        raise WaitError(f"wait must be a number of seconds, got {value[:40]!r}")
    if seconds < 0:
        raise WaitError(f"wait must be a non-negative number of seconds, got {value[:40]!r}")
    return min(seconds, cap)  # a huge (or overflowing: inf) value is the cap


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


class WaitSlots:
    """Requests with a wait running on this instance, in all and per caller.

    A waiting request holds a request thread for up to the cap while it does almost
    nothing (a read a second), so without a bound a few callers asking ``wait=30``
    would hold every thread and plain lookups would queue behind them. One per process
    (a map reload does not make a second count); the limits are read per request from
    the current map. Thread-safe.
    """

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.by_caller: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, caller: str, total: int, per_caller: int) -> str | None:
        """Take a slot for ``caller``: ``None`` when taken, else why not (then nothing
        was taken)."""
        with self._lock:
            mine = self.by_caller.get(caller, 0)
            if self.running >= total:
                return f"this instance is running its {total} waiting requests already"
            if mine >= per_caller:
                return f"this caller has {mine} waiting requests on this instance already"
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.by_caller[caller] = mine + 1
            return None

    def give_back(self, caller: str) -> None:
        """Return what :meth:`take` took, exactly once per successful take."""
        with self._lock:
            self.running -= 1
            left = self.by_caller.get(caller, 1) - 1
            if left > 0:
                self.by_caller[caller] = left
            else:
                self.by_caller.pop(caller, None)


SLOTS = WaitSlots()


class WaitBusy(Exception):
    """Every wait slot this request could use is taken: the lookup answers 429."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@contextmanager
def wait_slot(config: L2CacheConfig, caller: str, slots: WaitSlots = SLOTS) -> Iterator[None]:
    """Hold a wait slot for the body of the ``with`` (raises :class:`WaitBusy` when
    none is free; nothing is read before that)."""
    total, per_caller = wait_limits(config)
    refusal = slots.take(caller, total, per_caller)
    if refusal is not None:
        raise WaitBusy(
            f"{refusal} (at most {total} per instance, {per_caller} per caller); "
            f"retry after {BUSY_RETRY_AFTER_S} s, or ask without wait"
        )
    try:
        yield
    finally:
        slots.give_back(caller)


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
    opts: Options,
    headers: dict[str, str],
    timings: dict[str, float],
    binary: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """The lookup's answer (body, headers) when ``wait`` or ``state`` is asked, after
    the normal lookup read ``found`` and queued what it queues (``opts`` parsed and
    the ids counted against ``lookup_wait.max_ids`` before that, by the caller).

    ``binary``: the ``.npz`` answer (:class:`~l2cache.serving.respond.NpzBuilder`'s
    layout, the default answer's): a wait changes when the answer comes, not what it
    is. A ``state`` answer is JSON only (the caller refuses ``.npz`` with a 406 first).
    """
    ctx = StateContext(
        config=service.config,
        store=service.store(ds.name),
        guard=getattr(service, "_guard", None),
        runs=runs_reader(service.config),
    )
    t0 = time.perf_counter()
    outcome, wait_reads = "none", 0
    missing = [n for n in l2ids.tolist() if n not in found]
    if opts.seconds > 0 and missing:
        first = states(ctx, ds, np.array(missing, dtype=np.uint64), found, names, int64_as_str)
        waiting = [n for n in missing if first[n]["state"] == "pending" and n not in found]
        if waiting:
            before = ctx.reads
            outcome, polls = wait_for_rows(
                ctx, ds, waiting, found, names, int64_as_str, opts.seconds
            )
            wait_reads = polls + ctx.reads - before
    waited = time.perf_counter() - t0
    body: Any = None
    if opts.with_state:
        by_id = states(ctx, ds, l2ids, found, names, int64_as_str)
        body = {
            "attributes": {str(node): found.get(node, {}) for node in l2ids.tolist()},
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
        "Content-Type": JSON_MEDIA_TYPE,
    }
    t1 = time.perf_counter()
    if binary and body is None:
        wanted = list(names) if names else list(ATTRIBUTE_NAMES)
        npz = NpzBuilder(l2ids, wanted, ds.integral_resolution)
        npz.fill(0, l2ids, found)
        payload = npz.to_bytes()
        out_headers["Content-Type"] = NPZ_MEDIA_TYPE
    else:
        if body is None:
            body = {str(node): found.get(node, {}) for node in l2ids.tolist()}
        payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
    timings["encode"] = time.perf_counter() - t1
    return payload, out_headers
