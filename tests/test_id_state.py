"""Per-id state and the bounded wait, through the real lookup function (functions-framework)
against the Bigtable and Pub/Sub emulators (issue 20, item 3).

A PCG-style graph table, the cache table, the guard table and the runs table. Each state is
produced the way it happens in production: rows written by the store (computed) or by the
existing worker's placeholder writer (empty), ids queued by a real lookup (pending, with the
message id read back from Pub/Sub), a recompute that fails in the real on_edit handler
(failed, with the ledger's reason), layer-3 ids and chunks outside the volume (not_l2), ids the
graph lacks and ids nobody queued (unknown), a node the graph made a moment ago (pending by
an edit). The default answer stays the existing service's, byte for byte.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
import requests
import yaml
from google.cloud import pubsub_v1
from lookup_support import upstream_json, write_placeholder

from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.domain.lineage import Lineage
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache.store.ledger import INDEX_FAMILY, create_runs_table, message_key
from l2cache.store.missing_guard import create_guard_table
from l2cache_tools.local.functions import start_function

PROJECT = "idstate"
INSTANCE = "inst"
GRID = 4  # the volume is 4 x 4 x 4 chunks
BITS = {1: 10, 2: 10, 3: 9}
RES = (16.0, 16.0, 40.0)
CAP_S = 3  # lookup_wait.max_s


def _config(tmp) -> dict:
    return {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "pubsub": {
            "project": PROJECT,
            "missing_ids_topic": "missing",
            "max_delivery_attempts": 1,  # the first failure is the last: recorded failed
        },
        "runs_table_id": "idstate_runs",
        "lookup_wait": {"max_s": CAP_S, "max_ids": 50},
        "missing_ids": {"guard_table_id": "idstate_guard"},
        "datasets": {
            "pinky": {
                "segmentation": f"file://{tmp}/no-such-segmentation",
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": INSTANCE,
                    "table_id": "idstate_graph",
                },
                "cache_table_id": "idstate_cache",
                "resolution": list(RES),
                "voxel_offset": [0, 0, 0],
                "chunk_size": [96, 96, 48],
                "volume_size": [96 * GRID, 96 * GRID, 48 * GRID],
                "spatial_bits": BITS,
            }
        },
    }


SPATIAL = parse_config(_config("/x")).dataset("pinky").spatial_bits


def l2(chunk, seg: int, layer: int = 2) -> int:
    return int(idlib.encode_ids(layer, np.array([chunk]), np.array([seg]), SPATIAL)[0])


# who is what (chunk, segment); the graph has every id here except UNKNOWN
COMPUTED = [l2((1, 1, 1), s) for s in (1, 2, 3)]
EMPTY = l2((1, 1, 1), 4)
PENDING = l2((2, 1, 1), 5)
NOT_QUEUED = l2((3, 1, 1), 6)
EDITED = l2((3, 2, 1), 7)  # made "now" by an edit
EARLY = l2((2, 2, 2), 8)  # written by a "worker" thread during a wait
NEVER = l2((2, 3, 1), 9)  # queued, never computed
FAILS = l2((0, 3, 3), 10)  # queued; its recompute fails (no segmentation)
UNKNOWN = l2((1, 1, 1), 99)
LAYER3 = l2((0, 0, 0), 1, layer=3)
OUTSIDE = l2((GRID + 1, 0, 0), 1)
IN_GRAPH_OLD = [EMPTY, PENDING, NOT_QUEUED, EARLY, NEVER, FAILS, *COMPUTED]


def children_of(node: int) -> bytes:
    """A ``children`` cell in PCG's layout: one supervoxel of the node's chunk."""
    chunk = idlib.get_chunk_coords(np.array([node], dtype=np.uint64), SPATIAL)
    seg = int(node) & 0xFFFF
    return idlib.encode_ids(1, chunk, np.array([seg]), SPATIAL).astype("<u8").tobytes()


def features_of(nodes: list[int]) -> dict[str, np.ndarray]:
    labels = np.zeros((24, 24, 12), dtype=np.uint64)
    for i, node in enumerate(nodes):
        labels[i * 6 : i * 6 + 5, 2:20, 1:11] = node
    return compute_features(labels, RES)


@pytest.fixture(scope="module")
def stack(bigtable_emulator, pubsub_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idstate")
    cfg = _config(tmp)
    (tmp / "l2cache.yaml").write_text(yaml.safe_dump(cfg))
    config = parse_config(cfg)
    dataset = config.dataset("pinky")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    cache = create_cache_table(instance, "idstate_cache")
    create_guard_table(instance, "idstate_guard")
    create_runs_table(instance, "idstate_runs")
    graph = instance.table("idstate_graph")
    if not graph.exists():
        graph.create(column_families={"0": None})
    old = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        Row(idlib.row_key(n)).set_cell("0", b"children", children_of(n), old) for n in IN_GRAPH_OLD
    ]
    rows.append(
        Row(idlib.row_key(EDITED)).set_cell("0", b"children", b"\x01" + bytes(7), datetime.now(UTC))
    )
    write_rows(graph, rows)
    store = CacheStore(cache, dataset)
    store.write_features(features_of(COMPUTED), Lineage("run-idstate", cell_timestamp=old))
    write_placeholder(cache, EMPTY)

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, "missing")
    publisher.create_topic(name=topic)
    sub = subscriber.subscription_path(PROJECT, "missing-pull")
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
    yield {
        "url": f"http://{fn.host}/l2cache/api/v1/table/pinky/attributes",
        "config": config,
        "dataset": dataset,
        "store": store,
        "cache": cache,
        "subscriber": subscriber,
        "sub": sub,
    }
    fn.stop()


def post(stack, l2ids, **params) -> requests.Response:
    r = requests.post(stack["url"], json={"l2_ids": list(l2ids)}, params=params, timeout=60)
    assert r.status_code == 200, r.text
    return r


def pull(stack, want: int, timeout: float = 30) -> list:
    """Missing-id messages published so far (at least ``want``), acknowledged."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            resp = stack["subscriber"].pull(subscription=stack["sub"], max_messages=50, timeout=5)
        except Exception:  # an empty long-poll may end in DEADLINE_EXCEEDED
            continue
        if resp.received_messages:
            stack["subscriber"].acknowledge(
                subscription=stack["sub"], ack_ids=[m.ack_id for m in resp.received_messages]
            )
            got.extend(m.message for m in resp.received_messages)
    assert len(got) >= want, f"{len(got)} of {want} messages"
    return got


def ids_of(message) -> list[int]:
    return np.frombuffer(message.data, dtype="<u8").tolist()


def test_computed_empty_not_l2_unknown_and_an_edit_in_flight(stack):
    asked = [*COMPUTED, EMPTY, LAYER3, OUTSIDE, UNKNOWN, NOT_QUEUED, EDITED]
    r = post(stack, asked, state="true", update_cache="false")
    body = r.json()
    st = body["state"]
    for node in COMPUTED:
        assert st[str(node)] == {"state": "computed"}
        assert body["attributes"][str(node)]["size_nm3"] > 0
    assert st[str(EMPTY)] == {"state": "empty"}
    assert body["attributes"][str(EMPTY)] == {"size_nm3": 0}  # served as upstream serves it
    assert st[str(LAYER3)] == {"state": "not_l2", "reason": "layer 3, not 2"}
    assert st[str(OUTSIDE)]["state"] == "not_l2"
    assert "outside the volume" in st[str(OUTSIDE)]["reason"]
    assert st[str(UNKNOWN)] == {"state": "unknown", "reason": "not in the graph"}
    assert st[str(NOT_QUEUED)]["state"] == "unknown"
    assert st[str(NOT_QUEUED)]["reason"] == "not queued"
    assert st[str(NOT_QUEUED)]["in_graph"] is True
    assert st[str(NOT_QUEUED)]["created_at"].startswith("2026-01-01T00:00:00")
    assert st[str(EDITED)]["state"] == "pending"
    assert st[str(EDITED)]["by"]["queue"] == "edit"
    assert body["summary"] == {
        "computed": 3,
        "empty": 1,
        "pending": 1,
        "failed": 0,
        "not_l2": 2,
        "unknown": 2,
    }
    # update_cache=false: nothing was queued, so nothing to pull; the guard was read once,
    # the runs table's index rows once (l2edit:, chunkfail:), the graph once: by key
    assert int(r.headers["X-L2Cache-State-Reads"]) == 3
    assert st[str(EDITED)]["by"]["received"] is False  # no l2edit row: the graph's guess
    assert r.headers["X-L2Cache-Wait"] == "none"


def test_the_default_answer_is_unchanged_byte_for_byte(stack):
    asked = [*COMPUTED, EMPTY, LAYER3, UNKNOWN]
    plain = post(stack, asked, update_cache="false")
    explicit = post(stack, asked, update_cache="false", state="false", wait="0")
    with_state = post(stack, asked, update_cache="false", state="true")
    assert plain.content == explicit.content
    assert json.loads(plain.content) == with_state.json()["attributes"]
    # and it is what the existing service's frontend answers for these cells
    raw = stack["store"].read_raw(asked)
    cells = {n: row["0"] for n, row in raw.items()}
    ds = stack["dataset"]
    oracle = upstream_json(
        cells, asked, list(ds.resolution), list(ds.voxel_offset), list(ds.chunk_size), 10
    )
    assert json.loads(plain.content) == json.loads(json.dumps(oracle))
    assert "X-L2Cache-Wait" not in plain.headers
    assert "state" not in plain.json()


def test_a_queued_id_is_pending_since_its_claim_by_its_message(stack):
    before = datetime.now(UTC)
    first = post(stack, [PENDING], state="true")
    assert first.headers["X-L2Cache-Queued-Ids"] == "1"
    st = first.json()["state"][str(PENDING)]
    assert st["state"] == "pending"
    assert st["by"]["queue"] == "missing_ids"
    since = datetime.fromisoformat(st["since"].replace("Z", "+00:00"))
    assert before.timestamp() - 1 <= since.timestamp() <= datetime.now(UTC).timestamp()
    (message,) = [m for m in pull(stack, 1) if PENDING in ids_of(m)]
    again = post(stack, [PENDING], state="true", update_cache="false")
    st2 = again.json()["state"][str(PENDING)]
    assert st2["state"] == "pending"
    assert st2["since"] == st["since"]  # the claim's time, not re-queued
    assert st2["by"]["message_id"] == message.message_id


def test_a_recompute_that_fails_is_failed_with_the_ledgers_reason(stack):
    from l2cache.handlers.on_edit import handle_message

    post(stack, [FAILS])  # queued by a lookup
    (message,) = [m for m in pull(stack, 1) if FAILS in ids_of(m)]
    # on_edit's own handler, as the push subscription would run it
    result = handle_message(
        stack["config"], message.data, dict(message.attributes), message.message_id
    )
    assert result["status"] in ("dead_lettered", "partial", "failed"), result
    r = post(stack, [FAILS], state="true", update_cache="false")
    st = r.json()["state"][str(FAILS)]
    assert st["state"] == "failed", st
    # the ledger's reason: on_edit's only delivery (max_delivery_attempts 1) could not
    # read the segmentation
    assert st["reason"].startswith("gave up after 1 attempts")
    assert "No info file was found" in st["reason"]
    assert st["by"]["message_id"] == message.message_id
    assert st["by"]["event"] == f"msg-{message.message_id}"
    assert st["by"]["run"].startswith("missing_ids-pinky-")
    # the message's index row lives in the idx family, which Bigtable GCs by age
    table = bigtable_instance(PROJECT, INSTANCE).table("idstate_runs")
    index = table.read_row(message_key(message.message_id))
    assert set(index.cells) == {INDEX_FAMILY}
    # a wait on a failed id does not wait: it is not pending
    w = post(stack, [FAILS], state="true", wait="3", update_cache="false")
    assert w.headers["X-L2Cache-Wait"] == "none"
    assert w.headers["X-L2Cache-Wait-Reads"] == "0"


def test_the_wait_returns_once_the_queued_id_is_written(stack):
    feats = features_of([EARLY])
    written = threading.Event()

    def worker():  # what the worker does once it computed the id
        time.sleep(1.0)
        stack["store"].write_features(feats, Lineage("run-worker"))
        written.set()

    thread = threading.Thread(target=worker)
    thread.start()
    r = post(stack, [EARLY], state="true", wait=str(CAP_S))
    thread.join()
    body = r.json()
    assert written.is_set()
    assert r.headers["X-L2Cache-Wait"] == "ready"
    assert body["state"][str(EARLY)] == {"state": "computed"}
    assert body["attributes"][str(EARLY)]["size_nm3"] == int(feats["size_nm3"][0]) * 16 * 16 * 40
    assert r.headers["X-L2Cache-Missing-Ids"] == "0"
    # the row appeared after ~1 s: polls at 0.1, 0.3, 0.7, 1.5 s (4 reads), no state check
    # (the first comes at 2 s); at the cap it would have been 6 polls and a check
    assert 1 <= int(r.headers["X-L2Cache-Wait-Reads"]) <= 5
    (message,) = [m for m in pull(stack, 1) if EARLY in ids_of(m)]
    assert message


def test_the_wait_ends_at_the_cap_and_answers_the_states(stack):
    r = post(stack, [NEVER, *COMPUTED], state="true", wait="100")  # cut to CAP_S
    assert r.headers["X-L2Cache-Wait"] == "cap"
    body = r.json()
    assert body["state"][str(NEVER)]["state"] == "pending"
    assert body["attributes"][str(NEVER)] == {}
    assert int(r.headers["X-L2Cache-Waited-Ms"]) >= CAP_S * 1000
    # polls at 0.1, 0.3, 0.7, 1.5, 2.5, 3.0 s, one state check at 2.5 s (guard + runs table)
    reads = int(r.headers["X-L2Cache-Wait-Reads"])
    assert 3 <= reads <= 9, reads
    # without state the body is the default shape, the ids still missing are {}
    plain = post(stack, [NEVER], wait="0.5", update_cache="false")
    assert plain.json() == {str(NEVER): {}}
    assert plain.headers["X-L2Cache-Wait"] == "cap"
    pull(stack, 1)


@pytest.mark.parametrize("params", [{"wait": "soon"}, {"wait": "-1"}, {"state": "maybe"}])
def test_bad_wait_or_state_values_are_a_400(stack, params):
    r = requests.post(stack["url"], json={"l2_ids": COMPUTED}, params=params, timeout=30)
    assert r.status_code == 400
    assert r.json()["code"] == 400


def test_state_and_wait_keep_a_per_request_id_cap(stack):
    many = [l2((0, 0, 0), s) for s in range(1, 52)]  # 51 > lookup_wait.max_ids
    r = requests.post(
        stack["url"], json={"l2_ids": many}, params={"state": "true", "update_cache": "false"}
    )
    assert r.status_code == 400
    assert "at most 50 ids" in r.json()["message"]
    ok = post(stack, many[:50], state="true", update_cache="false")
    assert len(ok.json()["state"]) == 50
    plain = post(stack, many, update_cache="false")  # the default answer: any size
    assert len(plain.json()) == 51


def test_an_expired_queue_mark_is_said_and_the_id_queued_again(stack):
    from l2cache.store.missing_guard import MissingIdGuard

    config, ds = stack["config"], stack["dataset"]
    node = l2((3, 3, 1), 11)
    graph = bigtable_instance(PROJECT, INSTANCE).table("idstate_graph")
    old = datetime(2026, 1, 1, tzinfo=UTC)
    write_rows(graph, [Row(idlib.row_key(node)).set_cell("0", b"children", b"\x01", old)])
    guard = MissingIdGuard(
        bigtable_instance(PROJECT, INSTANCE).table("idstate_guard"), config.missing_ids
    )
    chunk = int(idlib.get_chunk_id(np.array([node], dtype=np.uint64), ds.spatial_bits)[0])
    expired_ms = int(time.time() * 1000) - (config.missing_ids.pending_ttl_s + 60) * 1000
    assert guard.claim(ds.name, chunk, [node], at_ms=expired_ms)  # a lookup long ago
    r = post(stack, [node], state="true", update_cache="false")
    st = r.json()["state"][str(node)]
    assert st["state"] == "unknown"
    assert "expired" in st["reason"]
    assert st["queued_at"] == datetime.fromtimestamp(expired_ms / 1000, UTC).isoformat().replace(
        "+00:00", "Z"
    )
    again = post(stack, [node], state="true")  # update_cache: queued again
    assert again.headers["X-L2Cache-Queued-Ids"] == "1"
    st2 = again.json()["state"][str(node)]
    assert st2["state"] == "pending"
    assert st2["since"] > st["queued_at"]
    pull(stack, 1)


def test_reads_of_a_wait_counted_at_the_bigtable_reader(stack, monkeypatch, tmp_path):
    """The wait's own account of its reads, checked against every ReadRows the lookup
    actually made (counted in the reader all reads go through)."""
    from l2cache.gcp import bigtable
    from l2cache.serving.api import LookupService

    node = l2((1, 2, 3), 12)
    graph = bigtable_instance(PROJECT, INSTANCE).table("idstate_graph")
    old = datetime(2026, 1, 1, tzinfo=UTC)
    write_rows(graph, [Row(idlib.row_key(node)).set_cell("0", b"children", b"\x01", old)])
    post(stack, [node])  # queued (over HTTP), never computed
    pull(stack, 1)
    path = tmp_path / "l2cache.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path)))
    monkeypatch.setenv("L2CACHE_CONFIG", str(path))
    service = LookupService.from_env()
    calls: list[str] = []
    real = bigtable.RowReader._read

    def counted(self, *args, **kwargs):
        calls.append(self.table_name.rsplit("/", 1)[-1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(bigtable.RowReader, "_read", counted)
    r = service.handle(
        "POST",
        "/l2cache/api/v1/table/pinky/attributes",
        {"wait": "2.5", "state": "true", "update_cache": "false"},
        {"Content-Type": "application/json"},
        json.dumps({"l2_ids": [node]}).encode(),
    )
    assert r.status == 200
    assert r.headers["X-L2Cache-Wait"] == "cap"
    polls = int(r.headers["X-L2Cache-Wait-Reads"])
    state_reads = int(r.headers["X-L2Cache-State-Reads"])
    # the lookup's one cache read + every read the states and the wait said they made
    cache_polls = calls.count("idstate_cache") - 1
    assert len(calls) == 1 + cache_polls + state_reads, calls
    # polls at 0.1, 0.3, 0.7, 1.5, 2.5 s: 5 cache reads; one state check at 2 s: the
    # guard and the runs table's msg index (nobody processed the message: no event to
    # read); the states before and after the wait read the same two each
    assert cache_polls == 5, calls
    assert polls == cache_polls + 2, (polls, calls)
    assert state_reads == 3 * 2, calls
    assert len(calls) <= 15, calls
    assert set(calls) <= {"idstate_cache", "idstate_guard", "idstate_runs", "idstate_graph"}
    assert json.loads(r.body)["state"][str(node)]["state"] == "pending"


def test_the_readme_caveclient_example_works(stack):
    """README's example: caveclient's own L2CacheClient session and URL, with the two
    parameters it does not know; get_l2data itself is unchanged."""
    from caveclient.auth import AuthClient
    from caveclient.l2cache import L2CacheClient

    base = stack["url"].split("/l2cache/")[0]
    l2cache = L2CacheClient(
        server_address=base, table_name="pinky", auth_client=AuthClient(token="t"), api_version=1
    )
    ids = [*COMPUTED, UNKNOWN]
    # -- as in README.md ---------------------------------------------------------------
    url = l2cache._endpoints["l2cache_data"].format_map(l2cache.default_url_mapping)
    r = l2cache.session.post(
        url,
        data=json.dumps({"l2_ids": [int(i) for i in ids]}),
        params={"state": "true", "wait": "2", "update_cache": "false"},
    )
    r.raise_for_status()
    answer = r.json()
    features, states = answer["attributes"], answer["state"]
    # ----------------------------------------------------------------------------------
    assert url == stack["url"]
    assert features == {str(k): v for k, v in l2cache.get_l2data(ids).items()}
    assert [states[str(i)]["state"] for i in ids] == ["computed"] * 3 + ["unknown"]
    assert answer["summary"]["computed"] == 3
    assert r.headers["X-L2Cache-Wait"] == "none"  # nothing pending: no wait at all


def test_a_full_length_wait_makes_a_bounded_number_of_reads(stack, monkeypatch):
    """The default 30 s cap on a clock the test advances (no real 30 s): every read is a
    real ReadRows of the emulator, counted where all reads go through."""
    from l2cache.gcp import bigtable
    from l2cache.serving.id_state import StateContext
    from l2cache.serving.wait import runs_reader, wait_for_rows
    from l2cache.store.missing_guard import MissingIdGuard

    config, ds = stack["config"], stack["dataset"]
    node = l2((3, 0, 2), 13)
    graph = bigtable_instance(PROJECT, INSTANCE).table("idstate_graph")
    old = datetime(2026, 1, 1, tzinfo=UTC)
    write_rows(graph, [Row(idlib.row_key(node)).set_cell("0", b"children", b"\x01", old)])
    post(stack, [node])  # queued, never computed
    pull(stack, 1)
    guard = MissingIdGuard(
        bigtable_instance(PROJECT, INSTANCE).table("idstate_guard"), config.missing_ids
    )
    ctx = StateContext(config, stack["store"], guard, runs_reader(config))
    now = [1000.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    calls: list[str] = []
    real = bigtable.RowReader._read

    def counted(self, *args, **kwargs):
        calls.append(self.table_name.rsplit("/", 1)[-1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(bigtable.RowReader, "_read", counted)
    outcome, polls = wait_for_rows(
        ctx, ds, [node], {}, None, False, 30.0, clock=lambda: now[0], sleep=sleep
    )
    assert outcome == "cap"
    assert sum(sleeps) == pytest.approx(30.0)
    # polls after 0.1, 0.3, 0.7, 1.5 s, then every 1 s to 29.5 s, and one at 30 s
    assert polls == calls.count("idstate_cache") == 33
    # state checks after 2.5, 6.5, 14.5 and 22.5 s (2, 4, 8, 8 s apart): guard + msg index
    assert ctx.reads == 4 * 2
    assert len(calls) == 33 + 8
