"""Hostile lookups: no request, and no caller, can queue more recompute work than its
budget (docs/design.md, "Missing ids").

The real lookup function under functions-framework, against the Bigtable emulator
(a PCG-style graph table, the cache table, the guard table) and the Pub/Sub emulator
(every missing-id message published is pulled back and counted). Two datasets:

- ``pinky``: a ``bigtable`` graph with segments 1..SEGMENTS in every chunk of a 10^3
  chunk volume: made-up ids are found absent in the graph and never queued.
- ``blind``: its graph table does not exist (as for a graph nobody can check cheaply):
  only the pending marks and the budgets stand between a request and the queue.

Each case is a row of a table: requests (sequential or concurrent), then the bounds on
what reached the topic. Every answer must be a 200 or a 4xx: 0 5xx.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pytest
import requests
import yaml
from google.cloud import pubsub_v1

from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.store.cache import create_cache_table
from l2cache.store.missing_guard import create_guard_table
from l2cache_tools.local.functions import start_function

PROJECT = "abuse"
INSTANCE = "inst"
SEGMENTS = 4  # segments 1..4 of every chunk exist in pinky's graph
GRID = 10  # the volume is 10 x 10 x 10 chunks
MAX_IDS = 20_000
PER_REQUEST = 8  # max_chunks_per_request
PER_CALLER = 20  # max_chunks_per_caller per window
WINDOW_S = 3600
BITS = {1: 10, 2: 10, 3: 9}


def _dataset(graph_table: str, cache_table: str) -> dict:
    return {
        "segmentation": "file:///nowhere/sv",
        "graph": {
            "kind": "bigtable",
            "project": PROJECT,
            "instance": INSTANCE,
            "table_id": graph_table,
        },
        "cache_table_id": cache_table,
        "resolution": [16, 16, 40],
        "voxel_offset": [0, 0, 0],
        "chunk_size": [96, 96, 48],
        "volume_size": [96 * GRID, 96 * GRID, 48 * GRID],
        "spatial_bits": BITS,
    }


CONFIG = {
    "bigtable": {"project": PROJECT, "instance": INSTANCE},
    "pubsub": {"project": PROJECT, "missing_ids_topic": "missing"},
    "max_ids_per_request": MAX_IDS,
    "missing_ids": {
        "max_chunks_per_request": PER_REQUEST,
        "max_chunks_per_caller": PER_CALLER,
        "caller_window_s": WINDOW_S,
        "guard_table_id": "abuse_guard",
    },
    "datasets": {
        "pinky": _dataset("abuse_graph", "abuse_cache"),
        "blind": _dataset("no_such_graph", "abuse_cache_blind"),
    },
}
SPATIAL = parse_config(CONFIG).dataset("pinky").spatial_bits


def l2(coords, segments) -> list[int]:
    """Layer-2 ids of ``segments`` (one per coordinate row, or one for all)."""
    coords = np.atleast_2d(np.asarray(coords, dtype=np.int64))
    segs = np.broadcast_to(np.asarray(segments, dtype=np.uint64), (coords.shape[0],))
    return idlib.encode_ids(2, coords, segs, SPATIAL).tolist()


def chunks(n: int, start: int = 0) -> np.ndarray:
    """``n`` distinct chunk coordinates inside the volume, from the ``start``-th."""
    flat = np.arange(start, start + n) % GRID**3
    return np.stack([flat % GRID, flat // GRID % GRID, flat // GRID**2], axis=1)


@pytest.fixture(scope="module")
def stack(bigtable_emulator, pubsub_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abuse")
    (tmp / "l2cache.yaml").write_text(yaml.safe_dump(CONFIG))
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    create_cache_table(instance, "abuse_cache")
    create_cache_table(instance, "abuse_cache_blind")
    create_guard_table(instance, "abuse_guard")
    graph = instance.table("abuse_graph")
    if not graph.exists():
        graph.create(column_families={"0": None})
    when = datetime(2026, 1, 1, tzinfo=UTC)
    every = chunks(GRID**3)
    rows = [
        Row(idlib.row_key(node)).set_cell("0", b"children", b"\x01" + bytes(7), when)
        for seg in range(1, SEGMENTS + 1)
        for node in l2(every, seg)
    ]
    write_rows(graph, rows)

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, "missing")
    publisher.create_topic(name=topic)
    sub = subscriber.subscription_path(PROJECT, "missing-count")
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
    yield {"url": f"http://{fn.host}/l2cache/api/v1", "subscriber": subscriber, "sub": sub}
    fn.stop()


def drain(stack, settle_s: float = 0.8) -> list[np.ndarray]:
    """Every missing-id message published so far (ids per message), acknowledged."""
    out: list[np.ndarray] = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle_s:
        resp = stack["subscriber"].pull(
            subscription=stack["sub"], max_messages=500, timeout=settle_s
        )
        if resp.received_messages:
            out.extend(np.frombuffer(m.message.data, "<u8") for m in resp.received_messages)
            stack["subscriber"].acknowledge(
                subscription=stack["sub"], ack_ids=[m.ack_id for m in resp.received_messages]
            )
            quiet_since = time.monotonic()
    return out


def lookup(stack, dataset: str, ids: list[int], caller: str) -> requests.Response:
    return requests.post(
        f"{stack['url']}/table/{dataset}/attributes",
        data=json.dumps({"l2_ids": ids}),
        headers={"Content-Type": "application/json", "X-Forwarded-For": caller},
        timeout=60,
    )


def chunks_of(messages: list[np.ndarray]) -> int:
    """Distinct chunks the published ids lie in: the recompute work queued."""
    if not messages:
        return 0
    ids = np.concatenate(messages).astype(np.uint64)
    return int(np.unique(idlib.get_chunk_id(ids, SPATIAL)).size)


@dataclass
class Case:
    """Requests of one attack and the bounds on what they may queue."""

    name: str
    dataset: str
    requests: list[list[int]]  # bodies, sent in order (or all at once if concurrent)
    concurrent: bool = False
    max_messages: int | None = None  # missing-id messages on the topic, all requests
    max_chunks: int | None = None  # distinct chunks of the published ids, all requests
    last_publishes_nothing: bool = False  # the final request queued nothing
    statuses: set[int] = field(default_factory=lambda: {200})
    headers: dict[str, str] = field(default_factory=dict)  # expected on every 200


MADE_UP = l2(chunks(64, 0), 9_999)  # valid chunk coordinates, segments nobody allocated
CASES = [
    Case(
        "64 made-up ids, repeated: the graph says absent, nothing is ever queued",
        "pinky",
        [MADE_UP] * 3,
        max_messages=0,
        max_chunks=0,
        last_publishes_nothing=True,
        headers={"X-L2Cache-Unknown-Ids": "64", "X-L2Cache-Queued-Ids": "0"},
    ),
    Case(
        "made-up ids where the graph cannot be checked, repeated: queued once",
        "blind",
        [MADE_UP[:PER_REQUEST]] * 3,
        max_messages=1,
        max_chunks=PER_REQUEST,
        last_publishes_nothing=True,
        headers={"X-L2Cache-Unknown-Ids": "0"},
    ),
    Case(
        "64 made-up unchecked ids, repeated: each repeat within the request's and the "
        "caller's budget",
        "blind",
        [MADE_UP] * 4,
        max_messages=3,
        max_chunks=PER_CALLER,
        last_publishes_nothing=True,
    ),
    Case(
        "real graph ids over 200 chunks: the request's budget holds",
        "pinky",
        [l2(chunks(200, 0), 1)],
        max_messages=1,
        max_chunks=PER_REQUEST,
        headers={"X-L2Cache-Deferred-Ids": str(200 - PER_REQUEST)},
    ),
    Case(
        "40 concurrent identical lookups of missing ids: published once",
        "pinky",
        [l2(chunks(4, 300), 2)] * 40,
        concurrent=True,
        max_messages=4,  # each chunk claimed by exactly one of them
        max_chunks=4,
    ),
    Case(
        "ids of other layers (0, 1, 3, 255): never queued",
        "pinky",
        [
            [
                *idlib.encode_ids(1, chunks(5), np.uint64(3), SPATIAL).tolist(),
                *idlib.encode_ids(3, chunks(5), np.uint64(3), SPATIAL).tolist(),
                0,
                1,
                2**64 - 1,
            ]
        ],
        max_messages=0,
        headers={"X-L2Cache-Non-L2-Ids": "13", "X-L2Cache-Missing-Ids": "0"},
    ),
    Case(
        "coordinates outside the volume: unknown without a read, never queued",
        "blind",
        [l2([[GRID, 0, 0], [0, GRID, 0], [0, 0, GRID], [1023, 1023, 1023], [500, 3, 3]], 1)] * 2,
        max_messages=0,
        headers={"X-L2Cache-Unknown-Ids": "5", "X-L2Cache-Queued-Ids": "0"},
    ),
    Case(
        "the id cap of made-up ids over every chunk: one request's budget",
        "blind",
        [l2(chunks(MAX_IDS, 0), 1_000 + np.arange(MAX_IDS))],
        max_messages=1,
        max_chunks=PER_REQUEST,
    ),
    Case(
        "over the id cap: refused before any work",
        "blind",
        [l2(chunks(MAX_IDS + 1, 0), 30_000 + np.arange(MAX_IDS + 1))],
        statuses={413},
        max_messages=0,
    ),
    Case(
        "one caller, fresh real ids each time: the caller's budget per window holds",
        "pinky",
        [l2(chunks(PER_REQUEST, 400 + PER_REQUEST * i), 3) for i in range(6)],
        max_chunks=PER_CALLER,
        last_publishes_nothing=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_lookups_queue_bounded_work(stack, case: Case):
    caller = f"10.9.{CASES.index(case)}.1"
    window = int(time.time()) // WINDOW_S
    if case.concurrent:
        with ThreadPoolExecutor(len(case.requests)) as pool:
            answers = list(
                pool.map(lambda b: lookup(stack, case.dataset, b, caller), case.requests)
            )
    else:
        answers = []
        for body in case.requests:
            answers.append(lookup(stack, case.dataset, body, caller))
            if case.last_publishes_nothing:
                time.sleep(0.2)  # the previous publish is on the topic before the next
    windows = int(time.time()) // WINDOW_S - window + 1
    messages = drain(stack)
    statuses = [a.status_code for a in answers]
    assert all(s < 500 for s in statuses), statuses  # 0 5xx
    assert set(statuses) <= case.statuses, [a.text[:200] for a in answers]
    for a in answers:
        if a.status_code != 200:
            assert a.json()["code"] == a.status_code
            continue
        body = a.json()
        assert all(v == {} for v in body.values())  # missing ids: exactly the old shape
        for name, value in case.headers.items():
            assert a.headers[name] == value, (name, dict(a.headers))
    if case.max_messages is not None:
        assert len(messages) <= case.max_messages, [m.size for m in messages]
    if case.max_chunks is not None:
        assert chunks_of(messages) <= case.max_chunks * windows
    if case.last_publishes_nothing:
        assert answers[-1].headers["X-L2Cache-Queued-Ids"] == "0"
    published = np.concatenate(messages) if messages else np.zeros(0, np.uint64)
    assert np.unique(published).size == published.size  # no id queued twice
    queued = sum(int(a.headers.get("X-L2Cache-Queued-Ids", "0")) for a in answers)
    assert queued == sum(m.size for m in messages)  # the headers tell the truth


def test_a_second_caller_is_not_starved_by_the_first(stack):
    """Budgets are per caller: one caller exhausting its own leaves others theirs."""
    for i in range(4):  # exhaust caller A
        lookup(stack, "pinky", l2(chunks(PER_REQUEST, 600 + PER_REQUEST * i), 4), "10.8.0.1")
    r = lookup(stack, "pinky", l2(chunks(PER_REQUEST, 700), 4), "10.8.0.2")
    assert r.status_code == 200 and r.headers["X-L2Cache-Queued-Chunks"] == str(PER_REQUEST)
    drain(stack)
