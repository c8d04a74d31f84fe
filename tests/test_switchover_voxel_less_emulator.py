"""A switch-over heals the existing worker's placeholder for a voxel-less id once
(issue 20 review, item 1), on the real Bigtable and Pub/Sub emulators.

An L2 id whose ``children`` supervoxels have no voxel in the segmentation is what the
existing worker answers with its placeholder (``{size_nm3: np.uint64(0)}``). During a
switch-over the lookup serves the fallback table's placeholder and queues the id into
the new table; the children path then writes the same placeholder there (with its
lineage), so the id is served ``{"size_nm3": 0}`` from the new table, its state is
``empty``, and it is never queued again (before, nothing was written and every
``pending_ttl_s`` the id cost another publish, chunk read and engine run).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
from google.cloud import pubsub_v1
from lookup_support import lookup_client, write_placeholder

from l2cache.compute import dataset_context
from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.domain.lineage import utc_now
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import create_runs_table
from l2cache.store.missing_guard import create_guard_table
from l2cache_tools.dataset import build_dataset
from l2cache_tools.dataset.edits import _new_l2_ids, _write

PROJECT, INSTANCE, DS = "switchvoxless", "inst", "swvl"
OLD, NEW = "pcgl2cache_swvl", "l2cache_swvl_v1"
RES = (16.0, 16.0, 40.0)
CHUNK = (48, 48, 24)
CROP = Path(__file__).resolve().parent / "data" / "pinky40_crop_96x96x48.npz"
URL = f"/l2cache/api/v1/table/{DS}/attributes"
ON_EDIT = Path(__file__).resolve().parents[1] / "functions" / "on_edit" / "main.py"
PENDING_TTL_S = 1  # the smallest the map allows: a second lookup after it may queue again


@pytest.fixture(scope="module")
def env(bigtable_emulator, pubsub_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swvl")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    built = build_dataset(np.load(CROP)["labels"], f"file://{tmp}/sv", RES, CHUNK, instance, DS)
    old = create_cache_table(instance, OLD)
    create_cache_table(instance, NEW)
    create_runs_table(instance, "l2cache_runs")
    create_guard_table(instance, "l2cache_lookup_guard")
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, "missing")
    publisher.create_topic(name=topic)
    sub = subscriber.subscription_path(PROJECT, "missing-pull")
    subscriber.create_subscription(name=sub, topic=topic)
    graph = {"kind": "bigtable", "project": PROJECT, "instance": INSTANCE, "table_id": DS}
    config = {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "pubsub": {"project": PROJECT, "missing_ids_topic": "missing"},
        "missing_ids": {"pending_ttl_s": PENDING_TTL_S},
        "datasets": {
            DS: {
                "segmentation": built.segmentation,
                "graph": graph,
                "cache_table_id": NEW,
                "fallback_table_id": OLD,
            }
        },
    }
    ctx = dataset_context(parse_config(config), DS)
    with lookup_client(config, tmp, extra_env=pubsub_emulator.env) as client:
        yield {
            "client": client,
            "ctx": ctx,
            "instance": instance,
            "old": old,
            "subscriber": subscriber,
            "sub": sub,
        }


def lookup(env, l2ids, **params):
    r = env["client"].post(
        URL, data=json.dumps({"l2_ids": [int(v) for v in l2ids]}), query_string=params
    )
    assert r.status_code == 200, r.get_data()
    return r


def pull_all(env) -> list:
    """Every message waiting on the subscription (acknowledged); [] when none."""
    resp = env["subscriber"].pull(subscription=env["sub"], max_messages=10, timeout=10)
    if resp.received_messages:
        env["subscriber"].acknowledge(
            subscription=env["sub"], ack_ids=[m.ack_id for m in resp.received_messages]
        )
    return [m.message for m in resp.received_messages]


def push_to_on_edit(message) -> int:
    """POST ``message`` to on_edit's function (functions-framework's own app) as a push
    subscription delivers it."""
    import functions_framework

    app = functions_framework.create_app("on_edit", str(ON_EDIT), "cloudevent")
    body = {
        "message": {
            "data": base64.b64encode(message.data).decode(),
            "attributes": dict(message.attributes),
            "messageId": message.message_id,
            "publishTime": message.publish_time.isoformat(),
        },
        "subscription": f"projects/{PROJECT}/subscriptions/missing-push",
    }
    return app.test_client().post(f"/projects/{PROJECT}/topics/missing", json=body).status_code


def test_a_voxel_less_fallback_placeholder_is_queued_once_and_healed(env):
    ctx, coords = env["ctx"], (1, 1, 0)
    bits = ctx.dataset.spatial_bits
    graph = env["instance"].table(DS)
    seg = int(idlib.get_segment_id(ctx.graph.chunk_supervoxels(coords, bits), bits).max()) + 1000
    ghost = idlib.encode_ids(1, np.array([coords]), np.array([seg]), bits)
    (node,) = _new_l2_ids(graph, coords, 1, bits).tolist()
    _write(graph, {node: ghost}, utc_now())  # a children row whose supervoxel has no voxel
    write_placeholder(env["old"], node)  # what the existing worker wrote for it
    first = lookup(env, [node])
    assert first.get_json()[str(node)] == {"size_nm3": 0}
    assert first.headers["X-L2Cache-Fallback-Placeholder-Ids"] == "1"
    assert first.headers["X-L2Cache-Queued-Ids"] == "1"
    (message,) = pull_all(env)
    assert np.frombuffer(message.data, "<u8").tolist() == [node]
    assert push_to_on_edit(message) == 200
    # the children path wrote the existing worker's placeholder into the new table
    assert ctx.store.read_raw([node])[node]["0"] == {b"size_nm3": bytes(8)}
    assert ctx.store.read_lineage([node])[node][b"run"]  # named by the write's lineage row
    time.sleep(PENDING_TTL_S + 0.5)  # past the pending mark: only a missing id is queued
    again = lookup(env, [node])
    assert again.get_json()[str(node)] == {"size_nm3": 0}
    assert again.headers.get("X-L2Cache-Fallback-Placeholder-Ids") is None
    assert again.headers.get("X-L2Cache-Queued-Ids", "0") == "0"
    assert pull_all(env) == []  # one publish in all
    state = lookup(env, [node], state="true", update_cache="false")
    assert state.get_json()["state"][str(node)]["state"] == "empty"
