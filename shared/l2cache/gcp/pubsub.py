"""Pub/Sub publishing shared by the lookup (missing ids) and the pipeline.

``google.cloud.pubsub_v1`` honours ``PUBSUB_EMULATOR_HOST`` by itself; this module
only fixes the message formats so producer and consumer cannot drift apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
from google.cloud import pubsub_v1

from l2cache.config import L2CacheConfig

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0


def publisher() -> pubsub_v1.PublisherClient:
    """A client (it honours ``PUBSUB_EMULATOR_HOST`` by itself)."""
    return pubsub_v1.PublisherClient()


def missing_ids_message(l2ids: np.ndarray, table_id: str, l2_cache_id: str) -> tuple[bytes, dict]:
    """The existing service's missing-id message: raw little-endian uint64 + attributes."""
    data = np.asarray(l2ids, dtype="<u8").tobytes()
    return data, {"table_id": table_id, "l2_cache_id": l2_cache_id}


def publish_missing_ids_async(
    client: pubsub_v1.PublisherClient,
    topic_path: str,
    l2ids: np.ndarray,
    table_id: str,
    l2_cache_id: str,
) -> Future:
    """Publish one missing-id message without waiting; a failure is logged when it happens.

    ``publish`` only enqueues (the client batches and sends from its own thread), so the
    caller decides how long, if at all, to wait on the returned future.
    """
    data, attrs = missing_ids_message(l2ids, table_id, l2_cache_id)
    future = client.publish(topic_path, data, **attrs)
    n = int(np.asarray(l2ids).size)

    def report(done: Future) -> None:
        exc = done.exception()
        if exc is not None:
            log.error("publishing %d missing ids of %s failed: %r", n, table_id, exc)

    future.add_done_callback(report)
    return future


def dead_letter_publisher(config: L2CacheConfig) -> Callable[[bytes, dict[str, str]], str] | None:
    """``publish(data, attributes)`` to the map's dead-letter topic (waits for the ack,
    raises on failure: an unrecorded dead letter must not be acknowledged), or None
    when the map names no dead-letter topic."""
    ps = config.pubsub
    if not (ps and ps.dead_letter_topic):
        return None
    client = publisher()
    topic = client.topic_path(ps.project, ps.dead_letter_topic)

    def publish(data: bytes, attributes: dict[str, str]) -> str:
        return client.publish(topic, data, **attributes).result(timeout=PUBLISH_TIMEOUT_S)

    return publish
