"""Lookup HTTP function: the L2 cache API (``/l2cache/api/v1/...``).

Thin by design: ``l2cache.handlers.lookup`` adds CORS and CAVE auth, ``l2cache.serving.api``
does the work.
"""

from __future__ import annotations

import flask
import functions_framework

from l2cache.config import ReloadingMap
from l2cache.handlers.lookup import handle
from l2cache.serving import http_guard
from l2cache.serving.api import BODY_BYTES_PER_ID, MIN_BODY_LIMIT

_map = ReloadingMap()


def _body_limit() -> int:
    """The service's own body limit (``LookupService.body_limit``), from the id cap."""
    return max(MIN_BODY_LIMIT, _map.get().max_ids_per_request * BODY_BYTES_PER_ID)


# bounded body reading, JSON for framing and server errors (docs/design.md, "Request framing")
http_guard.install(
    http_guard.Limits(
        body_bytes=_body_limit, methods=frozenset({"GET", "HEAD", "POST", "OPTIONS"}), cors=True
    )
)


@functions_framework.http
def lookup(request: flask.Request) -> flask.Response:
    """One request to the L2 cache API (``/l2cache/api/v1/...``)."""
    return handle(request)
