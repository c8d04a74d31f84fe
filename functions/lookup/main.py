"""Lookup HTTP function: the L2 cache API (``/l2cache/api/v1/...``).

Thin by design: ``l2cache.handlers.lookup`` adds CORS and CAVE auth, ``l2cache.serving.api``
does the work.
"""

from __future__ import annotations

import flask
import functions_framework

from l2cache.handlers.lookup import handle


@functions_framework.http
def lookup(request: flask.Request) -> flask.Response:
    """One request to the L2 cache API (``/l2cache/api/v1/...``)."""
    return handle(request)
