"""on_edit: Pub/Sub CloudEvent function for PCG edit and missing-id messages.

Thin by design: unwrap the Pub/Sub envelope, let ``l2cache.handlers.on_edit`` do the work.
"""

from __future__ import annotations

import logging

import functions_framework
from cloudevents.http import CloudEvent

from l2cache.config import ReloadingMap
from l2cache.gcp.pubsub import dead_letter_publisher
from l2cache.handlers.on_edit import DeadLetter, handle_message, unwrap_cloud_event
from l2cache.serving import http_guard

# a push of Pub/Sub's largest message (10 MB, base64 in a JSON envelope) fits; JSON errors
http_guard.install(http_guard.Limits(body_bytes=14 * 2**20, deadline_s=30.0))
_map = ReloadingMap()  # a dataset added to the map is known without a restart
_state: dict = {}


def _dead_letter() -> DeadLetter | None:
    if "dead_letter" not in _state:
        _state["dead_letter"] = dead_letter_publisher(_state["config"])
    return _state["dead_letter"]


@functions_framework.cloud_event
def on_edit(cloud_event: CloudEvent) -> None:
    """One Pub/Sub delivery: returns to acknowledge (done, ignored or dead-lettered),
    raises to have it redelivered (a transient failure)."""
    config = _map.get()
    if _state.get("config") is not config:
        if "config" in _state:  # the map changed: its dead-letter topic may have
            _state.pop("dead_letter", None)
        _state["config"] = config
    message = unwrap_cloud_event(cloud_event.data, cloud_event.get("id"), cloud_event.get("time"))
    # a transient failure raises: functions-framework answers 500 and Pub/Sub redelivers
    result = handle_message(
        _state["config"],
        message.data,
        message.attributes,
        message.message_id,
        _dead_letter(),
        message.published,
        unreadable=message.problem,
    )
    logging.info("on_edit %s: %s", message.message_id, result)
