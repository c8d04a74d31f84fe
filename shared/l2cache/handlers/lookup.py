"""The lookup as a Flask view: CORS, CAVE auth and bounded body reading around serve.

functions-framework hands every request of the lookup function to :func:`handle`
(functions/lookup/main.py stays a one-liner). CORS is flask-cors configured as the
existing service configures it (``CORS(app, expose_headers="WWW-Authenticate")``):
preflights answered, ``Access-Control-Allow-Origin`` on every response.
"""

from __future__ import annotations

import threading

import flask
from flask_cors import cross_origin

from l2cache.config import ReloadingMap
from l2cache.serving.api import ANONYMOUS, ApiError, BodyReader, LookupService, error_response
from l2cache.serving.cave_auth import CaveAuth

_DRAIN_CHUNK = 64 * 2**10
_lock = threading.Lock()
_built: dict[str, object] = {}
_map = ReloadingMap()


def _components() -> tuple[LookupService, object | None]:
    """The service and its authorizer, built on first use and again when the dataset
    map's file changed (a dataset added to a running local stack is served)."""
    config = _map.get()
    with _lock:
        if "service" not in _built or _built.get("map") is not config:
            _built["map"] = config
            service = LookupService.from_env()
            authorizer = None
            if service.config.auth is not None:
                authorizer = CaveAuth(service.config.auth)
            _built["authorizer"] = authorizer
            _built["service"] = service
    return _built["service"], _built["authorizer"]  # type: ignore[return-value]


def _read_body(request: flask.Request) -> BodyReader:
    """A reader that takes at most ``limit`` bytes of the body into memory."""

    def read(limit: int) -> bytes:
        length = request.content_length
        if length is not None and length > limit:
            raise ApiError(413, f"request body of {length} bytes is over the {limit}-byte limit")
        data = request.stream.read(limit + 1)
        if len(data) > limit:
            raise ApiError(413, f"request body is over the {limit}-byte limit")
        return data

    return read


def _drain(request: flask.Request) -> None:
    """Discard an unread body in small pieces (functions-framework reads it whole after)."""
    stream = request.stream
    while stream.read(_DRAIN_CHUNK):
        pass


def caller_of(request: flask.Request) -> str:
    """Who is asking, for the per-caller budget of recompute work.

    The CAVE user once CAVE auth has passed (middle-auth-client's ``flask.g.auth_user``;
    id 0 is its anonymous public reader); otherwise the client address the front end
    reports (the last ``X-Forwarded-For`` hop, which the client cannot write; behind
    the optional load balancer that is the balancer's, so such a deployment should use
    CAVE auth), else the peer address.
    """
    user = flask.g.get("auth_user") if flask.has_app_context() else None
    if isinstance(user, dict) and user.get("id"):
        return f"user:{user['id']}"
    forwarded = request.headers.get("X-Forwarded-For", "")
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    address = hops[-1] if hops else request.remote_addr
    return f"addr:{address}" if address else ANONYMOUS


EXPOSED_HEADERS = [
    "WWW-Authenticate",
    "X-L2Cache-Missing-Ids",
    "X-L2Cache-Queue",
    "X-L2Cache-Queued-Ids",
    "X-L2Cache-Unknown-Ids",
    "X-L2Cache-Pending-Ids",
    "X-L2Cache-Deferred-Ids",
    "X-L2Cache-Queued-Chunks",
    "ETag",
    "Retry-After",
    "X-L2Cache-Wait",
    "X-L2Cache-Waited-Ms",
    "X-L2Cache-Wait-Reads",
    "X-L2Cache-State-Reads",
]


@cross_origin(expose_headers=EXPOSED_HEADERS)
def handle(request: flask.Request) -> flask.Response:
    """The lookup function: one HTTP request in, the API's answer out (CORS by the
    decorator, CAVE auth when the map configures it)."""
    try:
        service, authorizer = _components()
    except Exception as exc:  # misconfigured instance: a server fault, said plainly
        r = error_response(500, f"the lookup is misconfigured: {exc}")
    else:
        r = service.handle(
            request.method,
            request.path,
            request.args,
            request.headers,
            _read_body(request),
            authorizer,
            lambda: caller_of(request),
        )
    _drain(request)
    if r.stream is not None:  # no Content-Length: sent chunked, whatever its size
        return flask.Response(r.stream, r.status, r.headers, direct_passthrough=True)
    return flask.Response(r.body, r.status, r.headers)


def reset() -> None:
    """Forget the built service, so the next request reads ``L2CACHE_CONFIG`` again.

    For in-process tests that serve several dataset maps from one interpreter.
    """
    with _lock:
        _built.clear()
