"""compute_chunk HTTP function, called by Cloud Tasks with one task per region/batch.

Thin by design: parse, let ``l2cache.handlers.compute_chunk`` do the work, answer with its status.
"""

from __future__ import annotations

import json

import flask
import functions_framework

from l2cache.config import ReloadingMap
from l2cache.gcp.pubsub import dead_letter_publisher
from l2cache.handlers.compute_chunk import handle_task
from l2cache.serving import http_guard

# Cloud Tasks bodies are at most 1 MiB; JSON errors for framing (docs/design.md)
http_guard.install(http_guard.Limits(body_bytes=2**20, deadline_s=30.0))
_map = ReloadingMap()  # a dataset added to the map is known without a restart
_state: dict = {}


@functions_framework.http
def compute_chunk(request: flask.Request) -> tuple[str, int, dict[str, str]]:
    """One Cloud Tasks delivery: the task's JSON summary with the status the failure
    contract gives it (2xx done or permanent, 503 retry)."""
    config = _map.get()
    if _state.get("config") is not config:
        _state["config"] = config
        _state["dead_letter"] = dead_letter_publisher(config)
    status, summary = handle_task(
        _state["config"], request.get_data(), request.headers, dead_letter=_state["dead_letter"]
    )
    return json.dumps(summary), status, {"Content-Type": "application/json"}
