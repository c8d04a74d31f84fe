"""The lookup API, framework-free: request in, status + body + headers out.

API-compatible with the existing L2 cache (``/l2cache/api/v1/...``) so caveclient's
``L2CacheClient`` works unchanged. The HTTP function (functions/lookup/main.py) only
adapts a Flask request to :meth:`LookupService.handle`.

Every bad request gets a 4xx JSON ``{"code", "message"}`` that says what to fix;
a server-side failure (Bigtable down) gets a 5xx so clients retry. Ids that are not
layer 2 are answered with ``{}`` and counted in the ``X-L2Cache-Non-L2-Ids`` header.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from . import ids as idlib
from .attributes import ATTRIBUTE_NAMES
from .config import L2CacheConfig, UnknownDatasetError, load_config
from .store import CacheStore

log = logging.getLogger(__name__)

API_VERSIONS = [1]
PREFIX = "/l2cache/api"
_ATTRIBUTES_ROUTE = re.compile(r"^/l2cache/api/v1/table/(?P<dataset>[^/]+)/attributes/?$")
GZIP_MIN_BYTES = 1024

# What the existing service answers for attribute_metadata: the numpy type of each
# value as the API returns it (rep_coord in nm, hence uint64 there as here).
ATTRIBUTE_METADATA = {
    "size_nm3": "<class 'numpy.uint32'>",
    "area_nm2": "<class 'numpy.uint32'>",
    "max_dt_nm": "<class 'numpy.uint16'>",
    "mean_dt_nm": "<class 'numpy.float16'>",
    "rep_coord_nm": "<class 'numpy.uint64'>",
    "chunk_intersect_count": "<class 'numpy.uint16'>",
    "pca": "<class 'numpy.float16'>",
    "pca_val": "<class 'numpy.float32'>",
}


class ApiError(Exception):
    """An error with the HTTP status and message the client should see."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


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
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(status, body, {"Content-Type": "application/json", **(headers or {})})


def _error(status: int, message: str) -> Response:
    return _json(status, {"code": status, "message": message})


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
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or "l2_ids" not in payload:
        raise ApiError(400, 'the body must be a JSON object {"l2_ids": [...]}')
    raw = payload["l2_ids"]
    if not isinstance(raw, list):
        raise ApiError(400, "l2_ids must be a list of integer ids")
    values = []
    for v in raw:
        if isinstance(v, bool):
            raise ApiError(400, f"l2_ids must be integers, got {v!r}")
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if not isinstance(v, int):
            raise ApiError(400, f"l2_ids must be integers, got {v!r}")
        if v < 0 or v >= 2**64:
            raise ApiError(400, f"l2 id {v} is outside 0..2**64-1")
        values.append(v)
    return np.array(values, dtype=np.uint64)


class LookupService:
    """Routes, validation and response shaping for the lookup function."""

    def __init__(
        self,
        config: L2CacheConfig,
        store_factory: Callable[[str], CacheStore],
        publish_missing: Callable[[np.ndarray, str, str], None] | None = None,
    ) -> None:
        self.config = config
        self._store_factory = store_factory
        self._stores: dict[str, CacheStore] = {}
        self._publish_missing = publish_missing

    @classmethod
    def from_env(cls) -> LookupService:
        """Build from ``L2CACHE_CONFIG`` with real Bigtable and Pub/Sub clients."""
        from .bigtable_client import bigtable_instance
        from .pubsub_client import publish_missing_ids, publisher

        config = load_config()
        instance = bigtable_instance(config.bigtable.project, config.bigtable.instance)

        def store_factory(name: str) -> CacheStore:
            ds = config.dataset(name)
            return CacheStore(instance.table(ds.cache_table_id), ds)

        publish = None
        if config.pubsub and config.pubsub.missing_ids_topic:
            client = publisher()
            topic = client.topic_path(config.pubsub.project, config.pubsub.missing_ids_topic)

            def publish(l2ids: np.ndarray, table_id: str, l2_cache_id: str) -> None:
                publish_missing_ids(client, topic, l2ids, table_id, l2_cache_id)

        return cls(config, store_factory, publish)

    def store(self, dataset: str) -> CacheStore:
        if dataset not in self._stores:
            self._stores[dataset] = self._store_factory(dataset)
        return self._stores[dataset]

    def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        try:
            response = self._route(method, path.rstrip("/") or "/", query, headers, body)
        except ApiError as exc:
            response = _error(exc.status, exc.message)
        except Exception as exc:  # server-side failure: 5xx so clients retry
            log.exception("lookup failed")
            response = _error(503, f"the cache could not be read right now: {type(exc).__name__}")
        return self._maybe_gzip(response, headers)

    def _route(self, method, path, query, headers, body) -> Response:
        if path == f"{PREFIX}/versions":
            return _json(200, API_VERSIONS)
        if path == f"{PREFIX}/v1/attribute_metadata":
            return _json(200, ATTRIBUTE_METADATA)
        if path == f"{PREFIX}/v1/table_mapping":
            return _json(200, self._table_mapping())
        match = _ATTRIBUTES_ROUTE.match(path)
        if match:
            if method != "POST":
                raise ApiError(405, "use POST with a body of l2_ids")
            return self._attributes(match["dataset"], query, headers, body)
        raise ApiError(404, f"no such endpoint: {method} {path}")

    def _table_mapping(self) -> dict[str, Any]:
        return {
            name: {
                "l2cache_id": ds.cache_table_id,
                "cv_path": ds.segmentation,
                **ds.public_mapping(),
            }
            for name, ds in sorted(self.config.datasets.items())
        }

    def _attributes(self, dataset: str, query, headers, body: bytes) -> Response:
        try:
            ds = self.config.dataset(dataset)
        except UnknownDatasetError as exc:
            raise ApiError(404, str(exc)) from None
        names = None
        if query.get("attribute_names"):
            names = [n.strip() for n in query["attribute_names"].split(",") if n.strip()]
            unknown = [n for n in names if n not in ATTRIBUTE_NAMES]
            if unknown:
                raise ApiError(
                    400, f"unknown attribute(s) {unknown}; known: {list(ATTRIBUTE_NAMES)}"
                )
        int64_as_str = _truthy(query.get("int64_as_str"), False)
        update_cache = _truthy(query.get("update_cache"), True)
        body = self._decompress(body, headers)
        l2ids = parse_l2_ids(body, headers.get("Content-Type", ""))
        if l2ids.size > self.config.max_ids_per_request:
            raise ApiError(
                413,
                f"{l2ids.size} ids in one request; the limit is "
                f"{self.config.max_ids_per_request} (split the request)",
            )
        is_l2 = idlib.get_layer(l2ids) == 2 if l2ids.size else np.zeros(0, bool)
        found = self.store(dataset).read_features(l2ids[is_l2], names)
        result: dict[str, Any] = {}
        for node in l2ids.tolist():
            entry = found.get(node, {})
            if int64_as_str and "rep_coord_nm" in entry:
                entry = {**entry, "rep_coord_nm": [str(v) for v in entry["rep_coord_nm"]]}
            result[str(node)] = entry
        headers_out = {"X-L2Cache-Non-L2-Ids": str(int((~is_l2).sum()))}
        missing = np.unique(l2ids[is_l2][[n not in found for n in l2ids[is_l2].tolist()]])
        headers_out["X-L2Cache-Missing-Ids"] = str(missing.size)
        if update_cache and missing.size and self._publish_missing is not None:
            try:
                self._publish_missing(missing, ds.name, ds.cache_table_id)
                headers_out["X-L2Cache-Queued-Ids"] = str(missing.size)
            except Exception:  # a lookup never fails because the recompute queue did
                log.exception("could not queue %d missing ids", missing.size)
                headers_out["X-L2Cache-Queued-Ids"] = "0"
        return _json(200, result, headers_out)

    @staticmethod
    def _decompress(body: bytes, headers: Mapping[str, str]) -> bytes:
        if "gzip" in headers.get("Content-Encoding", "").lower():
            try:
                return gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                raise ApiError(400, "Content-Encoding is gzip but the body is not gzip") from None
        return body

    @staticmethod
    def _maybe_gzip(response: Response, headers: Mapping[str, str]) -> Response:
        if (
            "gzip" in headers.get("Accept-Encoding", "").lower()
            and len(response.body) >= GZIP_MIN_BYTES
        ):
            response.body = gzip.compress(response.body, compresslevel=1, mtime=0)
            response.headers["Content-Encoding"] = "gzip"
            response.headers["Vary"] = "Accept-Encoding"
        return response
