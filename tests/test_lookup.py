"""The lookup function over HTTP (functions-framework) against the real emulators."""

from __future__ import annotations

import gzip
import json
import time
from datetime import UTC, datetime

import brotli
import numpy as np
import pytest
import requests
import yaml
from caveclient.auth import AuthClient
from caveclient.l2cache import L2CacheClient
from google.cloud import pubsub_v1

from l2cache.config import parse_config
from l2cache.domain import ids
from l2cache.domain.lineage import Lineage
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache.store.missing_guard import create_guard_table
from l2cache_tools.local.functions import start_function

PROJECT = "lookup-test"
RES = (16.0, 16.0, 40.0)
MAX_IDS = 5000


def config_dict(cache_table: str) -> dict:
    return {
        "bigtable": {"project": PROJECT, "instance": "inst"},
        "pubsub": {"project": PROJECT, "missing_ids_topic": "missing"},
        "max_ids_per_request": MAX_IDS,
        "datasets": {
            "pinky_test": {
                "segmentation": "file:///nowhere/sv",
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": "inst",
                    "table_id": "pinky_test",
                },
                "cache_table_id": cache_table,
                "resolution": list(RES),
                "voxel_offset": [0, 0, 0],
                "chunk_size": [96, 96, 48],
                "spatial_bits": {1: 10, 2: 10, 3: 9},
            }
        },
    }


@pytest.fixture(scope="module")
def stack(bigtable_emulator, pubsub_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lookup")
    cfg = config_dict("cache_lookup")
    (tmp / "l2cache.yaml").write_text(yaml.safe_dump(cfg))
    dataset = parse_config(cfg).dataset("pinky_test")

    # Real features of the real crop, with its segment ids turned into layer-2 ids.
    labels = np.load("tests/data/pinky40_crop_96x96x48.npz")["labels"].astype(np.uint64)
    segs = np.unique(labels)[1:]
    l2 = ids.encode_ids(
        2, np.tile([1, 2, 3], (segs.size, 1)), np.arange(1, segs.size + 1), dataset.spatial_bits
    )
    table = dict(zip(segs.tolist(), l2.tolist(), strict=True))
    l2_labels = np.vectorize(lambda v: table.get(v, 0), otypes=[np.uint64])(labels)
    feats = compute_features(l2_labels, RES)
    instance = bigtable_instance(PROJECT, "inst", admin=True)
    store = CacheStore(create_cache_table(instance, "cache_lookup"), dataset)
    create_guard_table(instance, "l2cache_lookup_guard")
    store.write_features(
        feats, Lineage("run-lookup", cell_timestamp=datetime(2026, 1, 1, tzinfo=UTC))
    )

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, "missing")
    publisher.create_topic(name=topic)
    sub = subscriber.subscription_path(PROJECT, "missing-check")
    subscriber.create_subscription(name=sub, topic=topic)

    fn = start_function(
        "lookup",
        {
            "L2CACHE_CONFIG": str(tmp / "l2cache.yaml"),
            **bigtable_emulator.env,
            **pubsub_emulator.env,
        },
        log_dir=tmp,
    )
    url = f"http://{fn.host}/l2cache/api/v1"
    yield {
        "url": url,
        "base": f"http://{fn.host}",
        "feats": feats,
        "store": store,
        "dataset": dataset,
        "subscriber": subscriber,
        "sub": sub,
    }
    fn.stop()


def post(stack, body, params=None, headers=None, dataset="pinky_test", stream=False):
    return requests.post(
        f"{stack['url']}/table/{dataset}/attributes",
        data=body,
        params=params or {},
        headers=headers or {},
        timeout=30,
        stream=stream,
    )


def test_versions_metadata_mapping(stack):
    assert requests.get(f"{stack['base']}/l2cache/api/versions", timeout=10).json() == [1]
    meta = requests.get(f"{stack['url']}/attribute_metadata", timeout=10).json()
    assert sorted(meta) == sorted(
        [
            "size_nm3",
            "area_nm2",
            "max_dt_nm",
            "mean_dt_nm",
            "rep_coord_nm",
            "chunk_intersect_count",
            "pca",
            "pca_val",
        ]
    )
    mapping = requests.get(f"{stack['url']}/table_mapping", timeout=10).json()
    assert mapping["pinky_test"]["l2cache_id"] == "cache_lookup"


def test_json_lookup_answers_each_id_once_in_id_order(stack):
    """As upstream (np.unique of the request): duplicates collapse, keys ascend."""
    l2 = stack["feats"]["l2id"][::-1][:20].tolist()
    r = post(stack, json.dumps({"l2_ids": l2 + l2[:3]}))
    assert r.status_code == 200
    data = r.json()
    assert list(data) == [str(v) for v in sorted(l2)]
    expected = stack["store"].read_features(l2)
    assert {int(k): v for k, v in data.items()} == expected
    i = stack["feats"]["l2id"].tolist().index(l2[0])
    assert data[str(l2[0])]["size_nm3"] == int(stack["feats"]["size_nm3"][i]) * 16 * 16 * 40


def test_binary_and_gzip_bodies_and_gzip_response(stack):
    l2 = stack["feats"]["l2id"][:30]
    raw = post(
        stack, l2.astype("<u8").tobytes(), headers={"Content-Type": "application/octet-stream"}
    )
    js = post(
        stack,
        gzip.compress(json.dumps({"l2_ids": l2.tolist()}).encode()),
        headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
    )
    assert raw.status_code == js.status_code == 200
    assert js.headers.get("Content-Encoding") == "gzip"
    assert raw.json() == js.json()  # requests transparently gunzips


@pytest.mark.parametrize(
    "accept, coding",
    [
        ("gzip, deflate, br", "br"),  # requests with brotli installed, browsers
        ("gzip", "gzip"),
        ("br;q=0, gzip", "gzip"),
        ("gzip;q=0", None),
        ("identity", None),
        ("*", "br"),  # any coding
        ("br;q=0, *;q=0.5", "gzip"),  # any but brotli
        ("*;q=0, identity", None),
    ],
)
def test_response_coding_follows_accept_encoding(stack, accept, coding):
    """The same JSON bytes whichever coding the client accepts; a refused one (q=0) is
    never sent."""
    l2 = stack["feats"]["l2id"][:200]
    body = json.dumps({"l2_ids": l2.tolist()})
    plain = post(stack, body, headers={"Accept-Encoding": "identity"}, stream=True)
    r = post(stack, body, headers={"Accept-Encoding": accept}, stream=True)
    assert r.status_code == plain.status_code == 200
    assert r.headers.get("Content-Encoding") == coding
    assert r.headers.get("Vary") == "Accept-Encoding, Accept"  # caches key on both
    sent = r.raw.read(decode_content=False)
    decoders = {"br": brotli.decompress, "gzip": gzip.decompress, None: bytes}
    assert decoders[coding](sent) == plain.raw.read(decode_content=False)
    phases = dict(p.strip().split(";dur=") for p in r.headers["Server-Timing"].split(","))
    assert set(phases) == {"read", "decode", "encode"} and all(
        float(v) >= 0 for v in phases.values()
    )


def test_attribute_subset_and_missing_ids_are_published(stack):
    present = int(stack["feats"]["l2id"][0])
    missing = int(ids.encode_ids(2, [[1, 2, 3]], 99_999, stack["dataset"].spatial_bits)[0])
    layer1 = int(ids.encode_ids(1, [[1, 2, 3]], 5, stack["dataset"].spatial_bits)[0])
    r = post(
        stack,
        json.dumps({"l2_ids": [present, missing, layer1]}),
        params={"attribute_names": "size_nm3,pca_val"},
    )
    assert r.status_code == 200
    data = r.json()
    assert set(data[str(present)]) <= {"size_nm3", "pca_val"} and "size_nm3" in data[str(present)]
    assert data[str(missing)] == {} and data[str(layer1)] == {}
    assert r.headers["X-L2Cache-Non-L2-Ids"] == "1"
    assert r.headers["X-L2Cache-Queued-Ids"] == "1"
    assert r.headers["X-L2Cache-Queue"] in ("published", "pending")
    deadline = time.monotonic() + 20
    received = []
    while time.monotonic() < deadline and not received:
        resp = stack["subscriber"].pull(subscription=stack["sub"], max_messages=10, timeout=5)
        received = resp.received_messages
    assert received, "the missing id was not published"
    msg = received[0].message
    assert np.frombuffer(msg.data, dtype="<u8").tolist() == [missing]
    assert dict(msg.attributes) == {"table_id": "pinky_test", "l2_cache_id": "cache_lookup"}
    stack["subscriber"].acknowledge(subscription=stack["sub"], ack_ids=[m.ack_id for m in received])


def test_update_cache_false_publishes_nothing(stack):
    missing = int(ids.encode_ids(2, [[1, 2, 3]], 88_888, stack["dataset"].spatial_bits)[0])
    r = post(stack, json.dumps({"l2_ids": [missing]}), params={"update_cache": "false"})
    assert r.status_code == 200 and "X-L2Cache-Queued-Ids" not in r.headers


@pytest.mark.parametrize(
    ("body", "params", "headers", "status", "words"),
    [
        (b"{not json", None, None, 400, "not valid JSON"),
        (b'{"ids": [1]}', None, None, 400, "l2_ids"),
        (b'{"l2_ids": [1.5]}', None, None, 400, "integers"),
        (b'{"l2_ids": ["abc"]}', None, None, 400, "integers"),
        (b'{"l2_ids": [-3]}', None, None, 400, "outside"),
        (b'{"l2_ids": [18446744073709551616]}', None, None, 400, "outside"),
        (b"\x01\x02\x03", None, {"Content-Type": "application/octet-stream"}, 400, "multiple of 8"),
        (
            b'{"l2_ids": [1]}',
            {"attribute_names": "size_nm3,volume"},
            None,
            400,
            "unknown attribute",
        ),
        (b"plain", None, {"Content-Encoding": "gzip"}, 400, "gzip"),
        (b'{"l2_ids": [1]}', {"update_cache": "maybe"}, None, 400, "true or false"),
    ],
)
def test_bad_input_gets_a_clear_4xx(stack, body, params, headers, status, words):
    r = post(stack, body, params=params, headers=headers)
    assert r.status_code == status
    assert words in r.json()["message"]


def test_unknown_dataset_404_and_too_many_ids_413(stack):
    r = post(stack, b'{"l2_ids": [1]}', dataset="nope")
    assert r.status_code == 404 and "unknown dataset" in r.json()["message"]
    big = np.arange(MAX_IDS + 1, dtype="<u8").tobytes()
    r = post(stack, big, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 413 and "limit" in r.json()["message"]
    r = requests.get(f"{stack['url']}/nothing-here", timeout=10)
    assert r.status_code == 404


def test_caveclient_l2cache_client_works_unchanged(stack):
    auth = AuthClient(token="not-a-real-token")
    client = L2CacheClient(
        server_address=stack["base"], table_name="pinky_test", auth_client=auth, api_version=1
    )
    assert client.table_mapping()["pinky_test"]["l2cache_id"] == "cache_lookup"
    assert set(client.attributes) == set(client.cache_metadata())
    assert "rep_coord_nm" in client.attributes
    l2 = stack["feats"]["l2id"][:10].tolist()
    data = client.get_l2data(l2)
    assert {int(k): v for k, v in data.items()} == stack["store"].read_features(l2)
    table = client.get_l2data_table(l2)
    assert sorted(table.index.tolist()) == sorted(l2)
    i = stack["feats"]["l2id"].tolist().index(l2[0])
    assert table.loc[l2[0], "size_nm3"] == int(stack["feats"]["size_nm3"][i]) * 16 * 16 * 40
    assert "rep_coord_nm_x" in table.columns and "chunk_intersect_count_z_top" in table.columns


def test_an_existing_cache_table_is_served_but_never_queued(stack):
    """A table another service owns: l2cache serves it and leaves its gaps to that service."""
    from l2cache.serving.api import LookupService

    cfg = config_dict("cache_lookup")
    cfg["datasets"]["pinky_test"]["existing_cache_table"] = True
    config = parse_config(cfg)
    queued = []
    service = LookupService(
        config,
        lambda name: CacheStore(stack["store"].table, config.dataset(name)),
        lambda l2ids, table_id, cache_id: queued.append(l2ids.tolist()),
    )
    present = int(stack["feats"]["l2id"][0])
    missing = int(ids.encode_ids(2, [[1, 2, 3]], 77_777, stack["dataset"].spatial_bits)[0])
    body = json.dumps({"l2_ids": [present, missing]}).encode()
    r = service.handle(
        "POST",
        "/l2cache/api/v1/table/pinky_test/attributes",
        {},
        {"Content-Type": "application/json"},
        body,
    )
    data = json.loads(r.body)
    assert r.status == 200 and data[str(present)] and data[str(missing)] == {}
    assert r.headers["X-L2Cache-Missing-Ids"] == "1" and queued == []
