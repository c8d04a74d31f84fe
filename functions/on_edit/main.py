"""on_edit: Pub/Sub CloudEvent function for PCG edit and missing-id messages.

Thin by design: unwrap the Pub/Sub envelope, let ``l2cache.handlers.on_edit`` do the work.
"""

from __future__ import annotations

import base64
import logging

import functions_framework

from l2cache.config import load_config
from l2cache.gcp.pubsub import dead_letter_publisher
from l2cache.handlers.on_edit import handle_message, parse_publish_time

_state: dict = {}


def _dead_letter():
    if "dead_letter" not in _state:
        _state["dead_letter"] = dead_letter_publisher(_state["config"])
    return _state["dead_letter"]


@functions_framework.cloud_event
def on_edit(cloud_event):
    if "config" not in _state:
        _state["config"] = load_config()
    envelope = cloud_event.data if isinstance(cloud_event.data, dict) else {}
    message = envelope.get("message") if isinstance(envelope.get("message"), dict) else {}
    try:
        data = base64.b64decode(message.get("data") or "", validate=False)
    except (ValueError, TypeError):
        data = b""  # undecodable: handle_message dead-letters it as having no ids
    raw_attributes = message.get("attributes")
    attributes = (
        {str(k): str(v) for k, v in raw_attributes.items()}
        if isinstance(raw_attributes, dict)
        else {}
    )
    message_id = str(message.get("messageId") or message.get("message_id") or cloud_event.get("id"))
    published = parse_publish_time(message.get("publishTime") or cloud_event.get("time"))
    # a transient failure raises: functions-framework answers 500 and Pub/Sub redelivers
    result = handle_message(
        _state["config"], data, attributes, message_id, _dead_letter(), published
    )
    logging.info("on_edit %s: %s", message_id, result)
