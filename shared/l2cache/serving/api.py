"""The lookup API, framework-free: request in, status + body + headers out.

A drop-in for the existing L2 cache service (PCGL2Cache, ``/l2cache/api/v1/...``):
same routes, same JSON values and types (:mod:`l2cache.store.rowformat`), same open and
guarded routes, so caveclient's ``L2CacheClient`` and browser clients work unchanged.
The HTTP function (functions/lookup/main.py via :mod:`l2cache.handlers.lookup`) adapts a
Flask request, CORS and CAVE auth around :meth:`LookupService.handle`.

Failure contract: every bad request gets a 4xx JSON ``{"code", "message"}`` saying what
to fix (nothing a client sends can make it a 5xx); overload (the instance's ids in
flight, its slots for ``?wait=`` requests (:mod:`l2cache.serving.wait`), Bigtable
throttling with RESOURCE_EXHAUSTED) a 429 with ``Retry-After``; a
server-side failure (Bigtable down) a 503 with ``Retry-After`` so clients retry.
Request bodies are read and decompressed within a bound derived from the id cap
before memory is spent; responses are compressed (brotli or gzip) when the client
accepts it. Attribute answers are built window by window and streamed (chunked) once
past :data:`~l2cache.serving.respond.SPILL_BYTES`, so no answer meets Cloud Run's 32 MiB
limit on declared lengths (:mod:`l2cache.serving.respond`); answers kept whole carry a
weak ``ETag`` and honour ``If-None-Match`` (304). ``Accept: application/x-npz`` gets
the binary answer. Publishing missing ids waits at most ``PUBLISH_WAIT_S``.

Missing ids are queued for recompute only within budgets (:mod:`l2cache.serving.missing`):
ids the graph lacks are remembered and never queued, ids already queued are not queued
again, and a request and a caller queue a bounded number of chunks; the body answers
every missing id ``{}`` whatever was queued.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import itertools
import json
import logging
import os
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from l2cache import __version__
from l2cache.config import DatasetConfig, L2CacheConfig, UnknownDatasetError, load_config
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import ATTRIBUTE_NAMES
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.gcp.pubsub import publish_missing_ids_async, publisher
from l2cache.serving import wait  # opt-in per-id state and bounded wait
from l2cache.serving.missing import headers as missing_headers
from l2cache.serving.missing import note_published, plan_missing
from l2cache.serving.respond import (
    IDS_IN_FLIGHT,
    JSON_MEDIA_TYPE,
    NPZ_MEDIA_TYPE,
    READ_AHEAD,
    RETRY_AFTER_S,
    SPILL_BYTES,
    THROTTLED_RETRY_AFTER_S,
    WINDOW_IDS,
    Admission,
    Compressor,
    NpzBuilder,
    StreamBody,
    accepts_json,
    accepts_npz,
    etag,
    if_none_match,
    q_values,
    serving_identity,
)
from l2cache.store.cache import CacheStore
from l2cache.store.missing_guard import MissingIdGuard
from l2cache.support import logs
from l2cache.support.gc_defer import gc_deferred

log = logging.getLogger(__name__)

API_VERSIONS = [1]
PREFIX = "/l2cache/api"
_ATTRIBUTES_ROUTE = re.compile(r"^/l2cache/api/v1/table/(?P<table>[^/]+)/attributes$")
_DIGITS = re.compile(r"[0-9]{1,20}")  # ASCII only: "²".isdigit() is True
GZIP_MIN_BYTES = 1024
# Answers depend on both: compressed or not, and JSON or .npz (``Accept``), so a cache
# must key on each.
VARY = "Accept-Encoding, Accept"
# Cloud Run refuses responses over 32 MiB; keep room for headers.
RESPONSE_LIMIT_BYTES = 32 * 2**20 - 64 * 2**10
# Longest JSON spelling of one id: 20 digits, quotes, comma and a space, with slack.
BODY_BYTES_PER_ID = 32
MIN_BODY_LIMIT = 64 * 2**10
PUBLISH_WAIT_S = 0.1

# attribute_metadata as the existing service answers it: str(serializer.basetype) of
# each kvdbclient attribute (pcgl2cache/core/attributes.py).
ATTRIBUTE_METADATA = {
    "size_nm3": "<class 'numpy.uint32'>",
    "area_nm2": "<class 'numpy.uint32'>",
    "max_dt_nm": "<class 'numpy.uint16'>",
    "mean_dt_nm": "<class 'numpy.float16'>",
    "rep_coord_nm": "<class 'numpy.uint16'>",
    "chunk_intersect_count": "<class 'numpy.uint16'>",
    "pca": "<class 'numpy.float16'>",
    "pca_val": "<class 'numpy.float32'>",
}

# (table id or None, permission or None) -> None to go on, or the refusal to send.
Authorizer = Callable[[str | None, str | None, str | None], "Response | None"]
# (limit in bytes) -> the raw body; raises ApiError(413) past the limit.
BodyReader = Callable[[int], bytes]
# (ids, graph table id, cache table id) -> a future of the publish, or None.
Publisher = Callable[[np.ndarray, str, str], "Future | None"]
# Who is asking, for the per-caller budget (called once authorization has run).
Caller = Callable[[], str]
ANONYMOUS = "anonymous"


# Ids answered at once by this instance (the memory bound; 429 past it). The
# environment may lower it (a test's overload, a smaller instance).
IDS_IN_FLIGHT_ENV = "L2CACHE_LOOKUP_IDS_IN_FLIGHT"


class ApiError(Exception):
    """An error with the HTTP status, message (and headers) the client should see."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Response:
    """What the lookup answers, independent of the HTTP framework serving it.

    ``stream``, when set, is the body instead of ``body``: already encoded (its
    ``Content-Encoding`` header says how), sent with chunked transfer, and closed by
    whoever sends it (that releases the request's admission)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    stream: StreamBody | None = None

    def content(self) -> bytes:
        """The whole body as sent (a stream read to its end): for in-process callers."""
        return self.stream.read_all() if self.stream is not None else self.body


def _truthy(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, f"expected true or false, got {value!r}")


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    # Trailing newline as the existing service's jsonify_with_kwargs writes it.
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
    return Response(status, body, {"Content-Type": "application/json", **(headers or {})})


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The one error body every client error and failure uses: ``{code, message}``."""
    return _json(status, {"code": status, "message": message}, headers)


def _throttled(exc: BaseException) -> bool:
    """Whether Bigtable (or any Google API under the lookup) said RESOURCE_EXHAUSTED:
    overload, to be answered 429, not a failure of the cache."""
    import grpc
    from google.api_core import exceptions as api

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, api.TooManyRequests | api.ResourceExhausted):
            return True
        if isinstance(seen, grpc.Call) and seen.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return True
        seen = seen.__cause__
    return False


def _ids_in_flight() -> int:
    raw = os.environ.get(IDS_IN_FLIGHT_ENV, "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else IDS_IN_FLIGHT


# One per process: a dataset map reload builds a new service, not a second budget.
ADMISSION = Admission(_ids_in_flight())


def _bytes_body(body: bytes) -> BodyReader:
    def read(limit: int) -> bytes:
        if len(body) > limit:
            raise ApiError(413, f"request body of {len(body)} bytes is over the {limit} limit")
        return body

    return read


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress gzip (all members) without ever holding more than ``limit`` bytes.

    A gzip bomb stops at ``limit + 1`` output bytes with a 413, whatever its ratio.
    """
    out = bytearray()
    while data:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += d.decompress(data, limit + 1 - len(out))
        except zlib.error:
            raise ApiError(400, "Content-Encoding is gzip but the body is not gzip") from None
        if len(out) > limit:
            raise ApiError(413, f"the decompressed body is over the {limit}-byte limit")
        if not d.eof:
            raise ApiError(400, "Content-Encoding is gzip but the gzip body is truncated")
        data = d.unused_data
        if not data.strip(b"\x00"):  # trailing zero padding, as gzip.decompress allows
            break
    return bytes(out)


def parse_l2_ids(body: bytes, content_type: str) -> np.ndarray:
    """Ids from a JSON ``{"l2_ids": [...]}`` body or a raw little-endian uint64 body."""
    if "application/octet-stream" in content_type.lower():
        if len(body) % 8:
            raise ApiError(
                400,
                f"a binary body must be little-endian uint64 ids: {len(body)} bytes "
                "is not a multiple of 8",
            )
        return np.frombuffer(body, dtype="<u8").astype(np.uint64)
    try:
        # stdlib json keeps integers exact at any size (orjson turns > 2**64 into floats),
        # so an out-of-range id is reported as such.
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ApiError(400, f"the body is not valid JSON ({reason})") from None
    if not isinstance(payload, dict) or "l2_ids" not in payload:
        raise ApiError(400, 'the body must be a JSON object {"l2_ids": [...]}')
    raw = payload["l2_ids"]
    if not isinstance(raw, list):
        raise ApiError(400, "l2_ids must be a list of integer ids")
    values = []
    for v in raw:
        if isinstance(v, str) and _DIGITS.fullmatch(v.strip()):
            v = int(v.strip())
        if isinstance(v, bool) or not isinstance(v, int):
            raise ApiError(400, f"l2_ids must be integers, got {_short(v)}")
        if v < 0 or v >= 2**64:
            raise ApiError(400, f"l2 id {_short(v)} is outside 0..2**64-1")
        values.append(v)
    return np.array(values, dtype=np.uint64)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) else str(value)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} chars)"


# (start, ids, found rows, their stamps, phase seconds, fallback placeholders to heal)
_Window = tuple[
    int, np.ndarray, dict[int, dict[str, Any]], dict[int, int], dict[str, float], list[int]
]


@dataclass(frozen=True)
class AttributeQuery:
    """One attributes request as parsed: what every stage of its answer (admission,
    state, wait, reading, encoding) takes, passed as one value."""

    ds: DatasetConfig
    l2ids: np.ndarray  # distinct, ascending
    names: list[str] | None
    int64_as_str: bool
    update_cache: bool
    headers: Mapping[str, str]
    timings: dict[str, float]


def _coding_header(coding: str | None) -> dict[str, str]:
    return {"Content-Encoding": coding} if coding else {}


def _compressed_slices(body: bytes, coding: str | None, step: int = 2**20) -> Iterator[bytes]:
    """``body`` compressed incrementally, ``step`` bytes of it at a time."""
    compressor = Compressor(coding)
    view = memoryview(body)
    for i in range(0, len(body), step):
        out = compressor.feed(bytes(view[i : i + step]))
        if out:
            yield out
    yield compressor.finish()


class LookupService:
    """Routes, validation and response shaping for the lookup function."""

    def __init__(
        self,
        config: L2CacheConfig,
        store_factory: Callable[[str], CacheStore],
        publish_missing: Publisher | None = None,
        guard: MissingIdGuard | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config
        self._store_factory = store_factory
        self._stores: dict[str, CacheStore] = {}
        self._publish_missing = publish_missing
        self._guard = guard
        self.admission = admission or ADMISSION

    @classmethod
    def from_env(cls) -> LookupService:
        """Build from ``L2CACHE_CONFIG`` with real Bigtable and Pub/Sub clients."""

        config = load_config()
        instance = bigtable_instance(config.bigtable.project, config.bigtable.instance)

        def store_factory(name: str) -> CacheStore:
            ds = config.dataset(name)
            return CacheStore(instance.table(ds.cache_table_id), ds)

        publish = guard = None
        if config.pubsub and config.pubsub.missing_ids_topic:
            client = publisher()
            topic = client.topic_path(config.pubsub.project, config.pubsub.missing_ids_topic)

            def publish(l2ids: np.ndarray, table_id: str, l2_cache_id: str) -> Future:
                return publish_missing_ids_async(client, topic, l2ids, table_id, l2_cache_id)

            policy = config.missing_ids
            guard = MissingIdGuard(instance.table(policy.guard_table_id), policy)

        return cls(config, store_factory, publish, guard)

    @property
    def body_limit(self) -> int:
        """Largest request body (raw or decompressed) a request within the id cap needs."""
        return max(MIN_BODY_LIMIT, self.config.max_ids_per_request * BODY_BYTES_PER_ID)

    def store(self, dataset: str) -> CacheStore:
        if dataset not in self._stores:
            self._stores[dataset] = self._store_factory(dataset)
        return self._stores[dataset]

    @logs.lookup
    def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes | BodyReader,
        authorize: Authorizer | None = None,
        caller: Caller | None = None,
    ) -> Response:
        """Answer one request. ``authorize`` enforces CAVE auth where upstream does;
        ``caller`` names who is asking (after authorization), for the per-caller budget."""
        reader = _bytes_body(body) if isinstance(body, bytes | bytearray) else body
        timings: dict[str, float] = {}
        try:
            with gc_deferred():  # decoding rows to API values allocates, in no cycle
                response = self._route(
                    method, path, query, headers, reader, authorize, timings, caller
                )
        except ApiError as exc:
            response = error_response(exc.status, exc.message, exc.headers)
        except Exception as exc:  # server-side failure: 5xx (503: clients retry)
            from l2cache.domain.failures import PERMANENT, classify

            if _throttled(exc):  # overload, not failure: the client should slow down
                log.warning("lookup throttled by Bigtable: %r", exc)
                response = error_response(
                    429,
                    "the cache is throttling reads right now (RESOURCE_EXHAUSTED); "
                    f"retry after {THROTTLED_RETRY_AFTER_S} s",
                    {"Retry-After": str(THROTTLED_RETRY_AFTER_S)},
                )
            elif classify(exc) == PERMANENT:  # a missing table: no retry can help
                log.exception("lookup failed")
                response = error_response(500, f"the cache cannot be read: {exc}"[:500])
            else:
                log.exception("lookup failed")
                response = error_response(
                    503,
                    f"the cache could not be read right now: {type(exc).__name__}",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
        t0 = time.perf_counter()
        response = self._encode(response, headers)
        if timings:
            timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t0
            response.headers["Server-Timing"] = server_timing(timings)
        return response

    def _route(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        reader: BodyReader,
        authorize: Authorizer | None,
        timings: dict[str, float],
        caller: Caller | None = None,
    ) -> Response:
        path = path.rstrip("/") or "/"
        if method == "OPTIONS":  # CORS preflight (answered by the HTTP layer normally)
            return Response(200, b"", {"Allow": "GET, POST, OPTIONS"})
        if path in ("/l2cache", "/l2cache/index"):  # open, as upstream
            return self._text(method, f"l2cache v{__version__} (PCGL2Cache API v1)")
        if path in (f"{PREFIX}/v1", f"{PREFIX}/v1/index"):  # upstream: auth_required
            refusal = authorize(None, None, None) if authorize else None
            return refusal or self._text(method, f"l2cache v{__version__} (PCGL2Cache API v1)")
        if path == f"{PREFIX}/versions":
            self._only(method, "GET")
            return _json(200, API_VERSIONS)
        if path == f"{PREFIX}/v1/attribute_metadata":
            self._only(method, "GET")
            return _json(200, ATTRIBUTE_METADATA)
        if path == f"{PREFIX}/v1/table_mapping":
            self._only(method, "GET")
            return _json(200, self._table_mapping())
        match = _ATTRIBUTES_ROUTE.match(path)
        if match:
            self._only(method, "POST")
            table = match["table"]
            if authorize is not None:
                refusal = authorize(table, "view", self._auth_dataset(table))
                if refusal is not None:
                    return refusal
            return self._attributes(table, query, headers, reader, timings, caller)
        raise ApiError(404, f"no such endpoint: {method} {path[:200]}")

    @staticmethod
    def _only(method: str, allowed: str) -> None:
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            raise ApiError(405, f"use {allowed} for this endpoint, not {method[:20]}")

    @staticmethod
    def _text(method: str, text: str) -> Response:
        LookupService._only(method, "GET")
        return Response(200, text.encode(), {"Content-Type": "text/html; charset=utf-8"})

    def _auth_dataset(self, table: str) -> str | None:
        """The configured CAVE dataset of a real table; aliases ask the auth service."""
        ds = self.config.datasets.get(table)
        return ds.auth_dataset if ds else None

    def _table_mapping(self) -> dict[str, Any]:
        """What upstream's read_l2cache_config() returns: graph table -> cv_path, l2cache_id."""
        return {
            name: {"cv_path": ds.segmentation, "l2cache_id": ds.cache_table_id}
            for name, ds in sorted(self.config.datasets.items())
        }

    def _attributes(
        self,
        table: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        reader: BodyReader,
        timings: dict[str, float],
        caller: Caller | None = None,
    ) -> Response:
        try:
            ds = self.config.resolve_table(table)
        except UnknownDatasetError as exc:
            raise ApiError(404, str(exc)) from None
        names = None
        if query.get("attribute_names"):
            names = [n.strip() for n in query["attribute_names"].split(",") if n.strip()]
            unknown = [n for n in names if n not in ATTRIBUTE_NAMES]
            if unknown:
                raise ApiError(
                    400,
                    f"unknown attribute(s) {[_short(n) for n in unknown[:5]]}; "
                    f"known: {list(ATTRIBUTE_NAMES)}",
                )
        int64_as_str = _truthy(query.get("int64_as_str"), False)
        update_cache = _truthy(query.get("update_cache"), True)
        opts = None
        if "state" in query or "wait" in query:  # checked before anything is read
            try:
                opts = wait.options(query, self.config)
            except wait.WaitError as exc:
                raise ApiError(400, str(exc)) from None
            accept = headers.get("Accept")
            if opts.with_state and accepts_npz(accept) and not accepts_json(accept):
                raise ApiError(
                    406,
                    "state=true is answered as JSON only (per-id states have no .npz "
                    f"layout); accept {JSON_MEDIA_TYPE}, or ask without state (wait alone "
                    f"answers {NPZ_MEDIA_TYPE})",
                )
        body = self._decompress(reader(self.body_limit), headers)
        l2ids = parse_l2_ids(body, headers.get("Content-Type", "") or "")
        if l2ids.size > self.config.max_ids_per_request:
            raise ApiError(
                413,
                f"{l2ids.size} ids in one request; the limit is "
                f"{self.config.max_ids_per_request} (split the request)",
            )
        l2ids = np.unique(l2ids)  # upstream answers each id once, in id order
        q = AttributeQuery(ds, l2ids, names, int64_as_str, update_cache, headers, timings)
        if opts is None:
            return self._answer(q, caller)
        return self._answer_state(q, caller, opts)

    def _answer_state(
        self,
        q: AttributeQuery,
        caller: Caller | None,
        opts: wait.Options,
    ) -> Response:
        """The answer to a request with ``state`` or ``wait`` (:mod:`l2cache.serving.wait`).

        Bounded before any read, cheapest refusal first: more than
        ``lookup_wait.max_ids`` ids is a 400; a wait when this instance (or this
        caller) already runs its share of waits is a 429 + ``Retry-After``
        (:func:`wait.wait_slot`: waits hold request threads, plain lookups must keep
        some); then the ids-in-flight admission as for every answer (429). The slot
        and the admission are held until the answer is built (it is built whole).
        """
        l2ids = q.l2ids
        limit = wait.max_ids(self.config)
        if l2ids.size > limit:
            raise ApiError(
                400,
                f"state and wait take at most {limit} ids per request, not {l2ids.size} "
                "(split the request; without them any size is answered)",
            )
        who = (caller() if caller is not None else None) or ANONYMOUS
        n = int(l2ids.size)
        with contextlib.ExitStack() as held:
            if opts.seconds > 0:
                try:
                    held.enter_context(wait.wait_slot(self.config, who))
                except wait.WaitBusy as exc:
                    retry = {"Retry-After": str(wait.BUSY_RETRY_AFTER_S)}
                    raise ApiError(429, exc.message, retry) from None
            self._admit(n)
            held.callback(self.admission.release, n)
            return self._state_admitted(q, who, opts)

    def _state_admitted(
        self,
        q: AttributeQuery,
        who: str,
        opts: wait.Options,
    ) -> Response:
        ds, l2ids, names, int64_as_str = q.ds, q.l2ids, q.names, q.int64_as_str
        update_cache, headers, timings = q.update_cache, q.headers, q.timings
        is_l2 = idlib.get_layer(l2ids) == 2 if l2ids.size else np.zeros(0, bool)
        heal: list[int] = []
        found = self.store(ds.name).read_features(
            l2ids[is_l2], names, int64_as_str, timings, heal=heal
        )
        headers_out = {"X-L2Cache-Non-L2-Ids": str(int((~is_l2).sum()))}
        candidates = l2ids[is_l2]
        missing = candidates[[n not in found for n in candidates.tolist()]]
        headers_out.update(self._account_missing(ds, missing, update_cache, who, heal))
        binary = accepts_npz(headers.get("Accept")) and not opts.with_state
        body, out = wait.answer(
            self, ds, l2ids, found, names, int64_as_str, opts, headers_out, timings, binary
        )
        return Response(200, body, out)

    def _answer(
        self,
        q: AttributeQuery,
        caller: Caller | None,
    ) -> Response:
        """The attributes of ``l2ids`` (distinct, ascending), JSON or ``.npz``, read and
        encoded window by window (:mod:`l2cache.serving.respond`).

        Admitted against the instance's ids in flight first (429 + ``Retry-After``
        past it). An answer that stays under ``SPILL_BYTES`` is kept whole: the
        missing-id headers, an ``ETag`` and ``If-None-Match`` apply. A longer JSON
        answer is streamed: its bytes are the same, but what is only known at its end
        (missing ids, the tag) is not in its headers; its missing ids are still queued,
        once the last window is read.
        """
        l2ids = q.l2ids
        n = int(l2ids.size)
        self._admit(n)
        streaming = False
        try:
            response = self._answer_admitted(q, caller)
            streaming = response.stream is not None
            return response
        finally:
            if not streaming:
                self.admission.release(n)

    def _admit(self, n: int) -> None:
        """Take ``n`` ids in flight on this instance (the memory bound every attribute
        answer passes, default, state or wait alike), or refuse with 429 +
        ``Retry-After`` before anything is read. The caller releases them."""
        if not self.admission.admit(n):
            raise ApiError(
                429,
                f"this instance is answering {self.admission.in_flight} ids already; "
                f"{n} more would pass its {self.admission.limit} (retry after "
                f"{RETRY_AFTER_S} s)",
                {"Retry-After": str(RETRY_AFTER_S)},
            )

    def _answer_admitted(
        self,
        q: AttributeQuery,
        caller: Caller | None,
    ) -> Response:
        ds, l2ids, names, int64_as_str = q.ds, q.l2ids, q.names, q.int64_as_str
        update_cache, headers, timings = q.update_cache, q.headers, q.timings
        n = int(l2ids.size)
        is_l2 = idlib.get_layer(l2ids) == 2 if n else np.zeros(0, bool)
        binary = accepts_npz(headers.get("Accept"))
        wanted = list(names) if names else list(ATTRIBUTE_NAMES)
        npz = NpzBuilder(l2ids, wanted, ds.integral_resolution) if binary else None
        stamps = np.zeros(n, dtype=np.uint64)
        missing: list[np.ndarray] = []
        healing: list[int] = []  # fallback placeholders: served, and queued for this table
        tagged = [True]  # every found row has a timestamp (a fallback row may not)
        encode_s = [0.0]

        def take(window: _Window) -> bytes:
            """Account one window (missing ids, stamps, timings); its JSON fragment."""
            start, ids, found, row_stamps, spent, heal = window
            if heal:
                healing.extend(heal)
            for phase, seconds in spent.items():
                timings[phase] = timings.get(phase, 0.0) + seconds
            ids_list = ids.tolist()
            stamps[start : start + ids.size] = [row_stamps.get(v, 0) for v in ids_list]
            if any(v not in row_stamps for v in found):
                tagged[0] = False
            candidates = ids[is_l2[start : start + ids.size]]
            if candidates.size:
                missing.append(candidates[[v not in found for v in candidates.tolist()]])
            t0 = time.perf_counter()
            if npz is not None:
                npz.fill(start, ids, found)
                piece = b""
            else:
                frag = orjson.dumps(
                    {str(v): found.get(v, {}) for v in ids_list}, option=orjson.OPT_SERIALIZE_NUMPY
                )
                piece = (b"," if start else b"") + frag[1:-1]
            encode_s[0] += time.perf_counter() - t0
            return piece

        windows = self._windows(ds, l2ids, is_l2, names, int64_as_str)
        pieces = [b"{"]
        size = 1
        headers_out = {"X-L2Cache-Non-L2-Ids": str(int((~is_l2).sum()))}
        for window in windows:
            piece = take(window)
            pieces.append(piece)
            size += len(piece)
            if npz is None and size > SPILL_BYTES:
                coding = response_coding(headers.get("Accept-Encoding", "") or "")
                who = (caller() if caller is not None else None) or ANONYMOUS  # needs the request

                def rest(coding: str | None = coding, who: str = who) -> Iterator[bytes]:
                    """What was kept, then each window as it is read, compressed as it
                    goes; the missing ids are queued once the last window is read."""
                    compressor = Compressor(coding)
                    try:
                        head = compressor.feed(b"".join(pieces))
                        pieces.clear()
                        if head:
                            yield head
                        for later in windows:
                            with gc_deferred():
                                out = compressor.feed(take(later))
                            if out:
                                yield out
                        tail = compressor.feed(b"}\n") + compressor.finish()
                        lost = np.concatenate(missing) if missing else np.zeros(0, np.uint64)
                        account = self._account_missing(ds, lost, update_cache, who, healing)
                        log.info("streamed lookup of %d ids: %s", n, account)
                        yield tail
                    finally:
                        windows.close()

                headers_out.update({"Content-Type": JSON_MEDIA_TYPE, **_coding_header(coding)})
                release = functools.partial(self.admission.release, n)
                return Response(200, b"", headers_out, StreamBody(rest(), release))
        lost = np.concatenate(missing) if missing else np.zeros(0, np.uint64)
        who = None
        if (lost.size or healing) and update_cache and not ds.existing_cache_table:
            who = (caller() if caller is not None else None) or ANONYMOUS
        headers_out.update(self._account_missing(ds, lost, update_cache, who, healing))
        t0 = time.perf_counter()
        if npz is not None:
            body, kind = npz.to_bytes(), NPZ_MEDIA_TYPE
        else:
            pieces.append(b"}\n")
            body, kind = b"".join(pieces), JSON_MEDIA_TYPE
        pieces.clear()
        timings["encode"] = encode_s[0] + time.perf_counter() - t0
        tag = None
        if tagged[0]:
            shape = (",".join(sorted(wanted)), str(int64_as_str), ds.name, ds.cache_table_id)
            tag = etag(kind, l2ids, stamps, (*shape, *serving_identity(ds)))
            headers_out["ETag"] = tag
            headers_out["Cache-Control"] = "no-cache"  # may be kept, always revalidated
        if if_none_match(headers.get("If-None-Match"), tag):
            return Response(304, b"", headers_out)
        if len(body) > SPILL_BYTES:  # a long .npz: streamed, so no 32 MiB limit applies
            coding = response_coding(headers.get("Accept-Encoding", "") or "")
            headers_out.update({"Content-Type": kind, **_coding_header(coding)})
            release = functools.partial(self.admission.release, n)
            return Response(
                200, b"", headers_out, StreamBody(_compressed_slices(body, coding), release)
            )
        return Response(200, body, {"Content-Type": kind, **headers_out})

    def _windows(
        self,
        ds: DatasetConfig,
        l2ids: np.ndarray,
        is_l2: np.ndarray,
        names: list[str] | None,
        int64_as_str: bool,
    ) -> Iterator[_Window]:
        """The rows of ``l2ids`` in windows of ``WINDOW_IDS``, in id order, with up to
        ``READ_AHEAD`` windows read concurrently ahead of the one being consumed (the
        read is I/O-bound: this keeps the 4 Bigtable streams of the whole read)."""
        store = self.store(ds.name)

        def read(start: int) -> _Window:
            ids = l2ids[start : start + WINDOW_IDS]
            layer2 = ids[is_l2[start : start + WINDOW_IDS]]
            spent: dict[str, float] = {}
            stamps: dict[int, int] = {}
            found: dict[int, dict[str, Any]] = {}
            heal: list[int] = []
            if layer2.size:
                with gc_deferred():  # decoding rows to API values allocates, in no cycle
                    found = store.read_features(
                        layer2, names, int64_as_str, timings=spent, stamps=stamps, heal=heal
                    )
            return start, ids, found, stamps, spent, heal

        starts = range(0, int(l2ids.size), WINDOW_IDS)
        if len(starts) <= 1:
            yield from map(read, starts)
            return
        pool = ThreadPoolExecutor(min(READ_AHEAD, len(starts)), thread_name_prefix="l2-window")
        try:
            ahead = iter(starts)
            pending = deque(pool.submit(read, s) for s in itertools.islice(ahead, READ_AHEAD))
            while pending:
                window = pending.popleft().result()
                following = next(ahead, None)
                if following is not None:
                    pending.append(pool.submit(read, following))
                yield window
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _account_missing(
        self,
        ds: DatasetConfig,
        missing: np.ndarray,
        update_cache: bool,
        who: str | None,
        heal: Sequence[int] = (),
    ) -> dict[str, str]:
        """The missing-id headers, queueing what the budgets allow
        (:meth:`_queue_missing`) unless the request or the table says not to.

        ``heal``: ids answered from the fallback table with the existing worker's
        placeholder (it could not compute them). They are answered as it answers them
        and queued like missing ids, so the switch-over fills them into the new table
        (the children path computes any id that ever existed)."""
        out = {"X-L2Cache-Missing-Ids": str(missing.size)}
        if heal:
            out["X-L2Cache-Fallback-Placeholder-Ids"] = str(len(heal))
            missing = np.union1d(missing, np.asarray(heal, dtype=np.uint64))
        if ds.existing_cache_table:  # another service owns that table: nothing to queue
            update_cache = False
        if update_cache and missing.size and self._publish_missing is not None:
            out.update(self._queue_missing(missing, ds, who or ANONYMOUS))
        return out

    def _queue_missing(self, missing: np.ndarray, ds: DatasetConfig, caller: str) -> dict:
        """Hand the missing ids worth queueing (:func:`plan_missing`) to Pub/Sub,
        waiting at most ``PUBLISH_WAIT_S`` for the ack.

        A lookup never fails or stalls because the recompute queue or its guard does:
        a guard that cannot be read or written queues nothing ("failed"), and a publish
        still pending after the wait completes (or logs its failure) in the background.
        """
        failed = {"X-L2Cache-Queued-Ids": "0", "X-L2Cache-Queue": "failed"}
        try:
            plan = plan_missing(ds, missing, caller, self.config.missing_ids, self._guard)
        except Exception:
            log.exception("missing-id guard failed: queueing none of %d ids", missing.size)
            return failed
        accounted = missing_headers(plan)
        if plan.publish.size == 0:
            return {**accounted, "X-L2Cache-Queued-Ids": "0", "X-L2Cache-Queue": "none"}
        queued = plan.publish
        try:
            future = self._publish_missing(queued, ds.name, ds.cache_table_id)
            if future is not None:  # its message id goes into the ids' pending marks
                note_published(self._guard, ds, plan, future)
        except Exception:
            log.exception("could not queue %d missing ids", queued.size)
            return {**accounted, **failed}
        state = "pending"
        if future is not None:
            try:
                future.result(timeout=PUBLISH_WAIT_S)
                state = "published"
            except TimeoutError:
                state = "pending"
            except Exception:
                log.exception("could not queue %d missing ids", queued.size)
                return {**accounted, **failed}
        return {**accounted, "X-L2Cache-Queued-Ids": str(queued.size), "X-L2Cache-Queue": state}

    def _decompress(self, body: bytes, headers: Mapping[str, str]) -> bytes:
        encoding = (headers.get("Content-Encoding", "") or "").strip().lower()
        if "gzip" in encoding:
            return gunzip_bounded(body, self.body_limit)
        if encoding not in ("", "identity"):
            raise ApiError(415, f"unsupported Content-Encoding {_short(encoding)}; use gzip")
        return body

    @staticmethod
    def _encode(response: Response, headers: Mapping[str, str]) -> Response:
        """Compress when the client accepts it (brotli, else gzip); refuse what Cloud
        Run could not send. A streamed answer is encoded as it is made; a 304 has no
        body."""
        if response.stream is not None or response.status == 304:
            response.headers["Vary"] = VARY
            return response
        coding = response_coding(headers.get("Accept-Encoding", "") or "")
        size = len(response.body)
        varies = 200 <= response.status < 300  # compressed or not, it depended on the header
        if varies and coding and size >= GZIP_MIN_BYTES:
            response.body = RESPONSE_CODINGS[coding](response.body)
            response.headers["Content-Encoding"] = coding
        if len(response.body) > RESPONSE_LIMIT_BYTES:
            how = "even compressed" if coding else "(send Accept-Encoding: gzip, or"
            tail = "; split the request" if coding else " split the request)"
            response = error_response(
                413,
                f"the response would be {size / 2**20:.1f} MiB, over the 32 MiB a "
                f"response may have {how}{tail}",
            )
        if varies:
            response.headers["Vary"] = VARY
        return response


def server_timing(timings: Mapping[str, float]) -> str:
    """A ``Server-Timing`` header value (milliseconds): where a lookup's time went, shown
    by browsers' developer tools and read by ``bench/lookup.py``."""
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in timings.items())


def response_coding(header: str) -> str | None:
    """The first of our :data:`RESPONSE_CODINGS` an ``Accept-Encoding`` header allows.

    ``q=0`` refuses a coding; ``*`` (q > 0) allows every coding the header does not
    name. Among the allowed ones the server's preference order decides (RFC 9110 lets
    it), not the client's q ranking. ``None``: send the body as it is.
    """
    q_of = dict(q_values(header))
    star = q_of.get("*", 0.0)
    return next((c for c in RESPONSE_CODINGS if q_of.get(c, star) > 0), None)


def _brotli(body: bytes) -> bytes:
    import brotli

    return brotli.compress(body, quality=0)


# Preferred first. Brotli at quality 0 is twice as fast as gzip at level 1 on a 4.2 MB
# answer (0.019 s vs 0.038 s) at the same size; requests sends "br" when brotli is
# installed, browsers always.
RESPONSE_CODINGS: dict[str, Callable[[bytes], bytes]] = {
    "br": _brotli,
    "gzip": lambda body: gzip.compress(body, compresslevel=1, mtime=0),
}
