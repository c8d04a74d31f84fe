"""Pub/Sub publishing shared by the lookup (missing ids) and the pipeline.

``google.cloud.pubsub_v1`` honours ``PUBSUB_EMULATOR_HOST`` by itself; this module
only fixes the message formats so producer and consumer cannot drift apart.
"""

from __future__ import annotations

import numpy as np
from google.cloud import pubsub_v1

PUBLISH_TIMEOUT_S = 10.0


def publisher() -> pubsub_v1.PublisherClient:
    return pubsub_v1.PublisherClient()


def missing_ids_message(l2ids: np.ndarray, table_id: str, l2_cache_id: str) -> tuple[bytes, dict]:
    """The existing service's missing-id message: raw little-endian uint64 + attributes."""
    data = np.asarray(l2ids, dtype="<u8").tobytes()
    return data, {"table_id": table_id, "l2_cache_id": l2_cache_id}


def publish_missing_ids(
    client: pubsub_v1.PublisherClient, topic_path: str, l2ids, table_id: str, l2_cache_id: str
) -> str:
    """Publish one missing-id message and wait for its id (raises on failure)."""
    data, attrs = missing_ids_message(l2ids, table_id, l2_cache_id)
    return client.publish(topic_path, data, **attrs).result(timeout=PUBLISH_TIMEOUT_S)
