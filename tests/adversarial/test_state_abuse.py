"""Hostile ``?state=`` and ``?wait=`` lookups: each costs what it is worth, and waits
never take every request thread from plain lookups (docs/design.md, "Per-id state and
the bounded wait").

The real lookup function under functions-framework (gunicorn, ``THREADS=4``: the
lookup's 1 vCPU in the cloud), against the Bigtable emulator (a PCG-style graph table,
the cache table, the guard and runs tables) and the Pub/Sub emulator (every missing-id
message published is pulled back and counted). The function runs from a wrapper
``main.py`` that executes the deployed one and only records, in an events file, what
the lookup did: every ReadRows the process made (table and keys, at the reader all
reads go through), every wait slot taken and given back, every entry into and exit
from the wait's polling. Nothing is faked: the wrapper counts, it does not answer.

Work is asserted, never wall time: a refused request read no row and published no
message; at most ``max_concurrent`` waits held a thread at once (the slots' own peak);
plain lookups were answered while the waits still held theirs (the events file shows
no slot given back before their answers arrived). Every answer is a 200, 304 or 4xx:
0 5xx.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from google.cloud import pubsub_v1

from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.domain.lineage import Lineage
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache.store.ledger import create_runs_table
from l2cache.store.missing_guard import create_guard_table, negative_key, pending_key
from l2cache_tools.local.functions import FUNCTIONS_DIR, FunctionRuntime, start_function

PROJECT = "stateabuse"
INSTANCE = "inst"
GRID = 4  # the volume is 4 x 4 x 4 chunks
BITS = {1: 10, 2: 10, 3: 9}
RES = (16.0, 16.0, 40.0)
CAP_S = 6  # lookup_wait.max_s: what an admitted wait on an id that never comes holds
MAX_IDS = 50  # lookup_wait.max_ids
MAX_IDS_PER_REQUEST = 200
THREADS = 4  # functions-framework's gthread pool on the lookup's 1 vCPU
IDS_IN_FLIGHT = 80  # L2CACHE_LOOKUP_IDS_IN_FLIGHT
# the defaults under test: max_concurrent = THREADS // 2, max_per_caller = that // 2
SLOTS = THREADS // 2
PER_CALLER = SLOTS // 2


def _config(tmp: Path, lookup_wait: dict | None = None) -> dict:
    return {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "pubsub": {"project": PROJECT, "missing_ids_topic": "missing"},
        "runs_table_id": "sa_runs",
        "max_ids_per_request": MAX_IDS_PER_REQUEST,
        "lookup_wait": {"max_s": CAP_S, "max_ids": MAX_IDS, **(lookup_wait or {})},
        "missing_ids": {"guard_table_id": "sa_guard", "max_chunks_per_caller": 10_000},
        "datasets": {
            "pinky": {
                "segmentation": f"file://{tmp}/no-such-segmentation",
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": INSTANCE,
                    "table_id": "sa_graph",
                },
                "cache_table_id": "sa_cache",
                "resolution": list(RES),
                "voxel_offset": [0, 0, 0],
                "chunk_size": [96, 96, 48],
                "volume_size": [96 * GRID, 96 * GRID, 48 * GRID],
                "spatial_bits": BITS,
            }
        },
    }


SPATIAL = parse_config(_config(Path("/x"))).dataset("pinky").spatial_bits


def l2(chunk, seg: int, layer: int = 2) -> int:
    return int(idlib.encode_ids(layer, np.array([chunk]), np.array([seg]), SPATIAL)[0])


def chunk_of(node: int) -> int:
    return int(idlib.get_chunk_id(np.array([node], dtype=np.uint64), SPATIAL)[0])


def grid_chunk(i: int) -> tuple[int, int, int]:
    return (i % GRID, i // GRID % GRID, i // GRID**2)


COMPUTED = [l2((1, 1, 1), s) for s in (1, 2, 3)]
# In the graph (made long ago), never computed: queued by the first request that asks,
# then pending until the mark expires; one per chunk, so each request's keys are its own.
NEVER = [l2(grid_chunk(i), 40 + i) for i in range(2, 40)]
UNKNOWN = [l2(grid_chunk(50 + i), 99) for i in range(4)]  # not in the graph
OTHER_LAYERS = [
    l2((0, 0, 0), 1, layer=1),
    l2((0, 0, 0), 1, layer=3),
    (7 << 56) | 5,  # layer 7, a layer the dataset does not define
    0,
    2**64 - 1,
]
OUTSIDE = [l2((GRID, 0, 0), 1), l2((0, 0, GRID + 3), 1), l2((1023, 1023, 511), 1)]

# The wrapper main.py: the deployed lookup, with the process's work written down.
WRAPPER = """
import os, runpy, threading
from l2cache.gcp import bigtable
from l2cache.serving import wait

_fd = os.open(os.environ["SA_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_lock = threading.Lock()
_in_wait = [0]


def _note(*parts):
    os.write(_fd, ("\\t".join(map(str, parts)) + "\\n").encode())


_read = bigtable.RowReader._read


def _counted(self, keys, ranges, prefix, *args, **kwargs):
    if keys or ranges or prefix is not None:  # an empty selection reads nothing
        listed = ",".join(k.hex() for k in keys or ())
        _note("read", self.table_name.rsplit("/", 1)[-1], listed, len(ranges or ()))
    return _read(self, keys, ranges, prefix, *args, **kwargs)


bigtable.RowReader._read = _counted
_take, _give = wait.SLOTS.take, wait.SLOTS.give_back


def _take_noted(caller, total, per_caller):
    refused = _take(caller, total, per_caller)
    _note("busy" if refused else "slot+", caller, wait.SLOTS.peak, total, per_caller)
    return refused


def _give_noted(caller):
    _give(caller)
    _note("slot-", caller)


wait.SLOTS.take, wait.SLOTS.give_back = _take_noted, _give_noted
_poll = wait.wait_for_rows


def _polling(*args, **kwargs):
    with _lock:
        _in_wait[0] += 1
        _note("wait+", _in_wait[0])
    try:
        return _poll(*args, **kwargs)
    finally:
        with _lock:
            _in_wait[0] -= 1
            _note("wait-", _in_wait[0])


wait.wait_for_rows = _polling
globals().update(runpy.run_path(os.environ["SA_REAL_MAIN"]))
"""


def features_of(nodes: list[int]) -> dict[str, np.ndarray]:
    labels = np.zeros((24, 24, 12), dtype=np.uint64)
    for i, node in enumerate(nodes):
        labels[i * 6 : i * 6 + 5, 2:20, 1:11] = node
    return compute_features(labels, RES)


@pytest.fixture(scope="module")
def stack(bigtable_emulator, pubsub_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stateabuse")
    map_path = tmp / "l2cache.yaml"
    map_path.write_text(yaml.safe_dump(_config(tmp)))
    dataset = parse_config(_config(tmp)).dataset("pinky")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    cache = create_cache_table(instance, "sa_cache")
    create_guard_table(instance, "sa_guard")
    create_runs_table(instance, "sa_runs")
    graph = instance.table("sa_graph")
    if not graph.exists():
        graph.create(column_families={"0": None})
    old = datetime(2026, 1, 1, tzinfo=UTC)
    write_rows(
        graph,
        [
            Row(idlib.row_key(n)).set_cell("0", b"children", b"\x01" + bytes(7), old)
            for n in [*COMPUTED, *NEVER]
        ],
    )
    CacheStore(cache, dataset).write_features(
        features_of(COMPUTED), Lineage("run-stateabuse", cell_timestamp=old)
    )
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, "missing")
    publisher.create_topic(name=topic)
    sub = subscriber.subscription_path(PROJECT, "missing-count")
    subscriber.create_subscription(name=sub, topic=topic)

    source = tmp / "counted"
    source.mkdir()
    (source / "main.py").write_text(WRAPPER)
    events = tmp / "events.tsv"
    events.touch()
    env = {
        **os.environ,
        "L2CACHE_CONFIG": str(map_path),
        "L2CACHE_LOOKUP_IDS_IN_FLIGHT": str(IDS_IN_FLIGHT),
        "THREADS": str(THREADS),
        "SA_EVENTS": str(events),
        "SA_REAL_MAIN": str(FUNCTIONS_DIR / "lookup" / "main.py"),
        **bigtable_emulator.env,
        **pubsub_emulator.env,
    }
    runtime = FunctionRuntime(source=source, python=Path(sys.executable), env=env)
    fn = start_function("lookup", {}, runtime=runtime, log_dir=tmp)
    yield {
        "url": f"http://{fn.host}/l2cache/api/v1/table/pinky/attributes",
        "events": events,
        "map": map_path,
        "tmp": tmp,
        "subscriber": subscriber,
        "sub": sub,
        "statuses": [],
        "costs": [],  # (case, status, ReadRows made, ids published) of each one-request case
    }
    fn.stop()


# -- helpers -------------------------------------------------------------------------------


def post(stack, ids, params=None, caller="10.0.0.1", headers=None, data=None) -> requests.Response:
    r = requests.post(
        stack["url"],
        data=data if data is not None else json.dumps({"l2_ids": [int(i) for i in ids]}),
        params=params or {},
        headers={"Content-Type": "application/json", "X-Forwarded-For": caller, **(headers or {})},
        timeout=120,
    )
    stack["statuses"].append(r.status_code)
    return r


def events(stack) -> list[list[str]]:
    return [line.split("\t") for line in stack["events"].read_text().splitlines()]


def mark(stack) -> int:
    return len(events(stack))


def since(stack, start: int) -> list[list[str]]:
    return events(stack)[start:]


def reads(evs: list[list[str]]) -> list[list[str]]:
    return [e for e in evs if e[0] == "read"]


def keys_read(evs: list[list[str]]) -> set[bytes]:
    out: set[bytes] = set()
    for e in reads(evs):
        out.update(bytes.fromhex(k) for k in e[2].split(",") if k)
    return out


def keys_of(node: int) -> set[bytes]:
    """Every row key a request for ``node`` could make the lookup read."""
    keys = {idlib.row_key(node), negative_key("pinky", node)}
    if idlib.get_layer(np.array([node], np.uint64))[0] == 2:
        keys.add(pending_key("pinky", chunk_of(node)))
    return keys


def published(stack, settle_s: float = 0.8) -> list[int]:
    """Ids of every missing-id message published since the last call, acknowledged."""
    out: list[int] = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle_s:
        try:
            resp = stack["subscriber"].pull(
                subscription=stack["sub"], max_messages=500, timeout=settle_s
            )
        except Exception:  # an empty long-poll may end in DEADLINE_EXCEEDED
            continue
        if resp.received_messages:
            for m in resp.received_messages:
                out.extend(np.frombuffer(m.message.data, "<u8").tolist())
            stack["subscriber"].acknowledge(
                subscription=stack["sub"], ack_ids=[m.ack_id for m in resp.received_messages]
            )
            quiet_since = time.monotonic()
    return out


def until(predicate, what: str, limit_s: float = 60.0) -> None:
    """Wait for a condition of the events file (a bound on a hung test, not a timing)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def is_error(r: requests.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["code"] == status


# -- one request each: the values, asserted by the work they caused --------------------------


@dataclass
class Case:
    """One request and what it may cost."""

    name: str
    ids: list[int]
    params: dict | list  # a list of pairs repeats a parameter
    status: int = 200
    message: str = ""  # in the error's message
    headers: dict[str, str] = field(default_factory=dict)  # expected on the answer
    accept: str | None = None
    shape: str = "default"  # default | state | npz (on a 200)


FEW = [*COMPUTED, UNKNOWN[0]]
NO_QUEUE = {"update_cache": "false"}
CASES = [
    Case("wait=-1", FEW, {"wait": "-1"}, 400, "non-negative"),
    Case("wait=-0.001", FEW, {"wait": "-0.001"}, 400, "non-negative"),
    Case("wait=nan", FEW, {"wait": "nan"}, 400, "number of seconds"),
    Case("wait=NaN", FEW, {"wait": "NaN"}, 400, "number of seconds"),
    Case("wait=inf", FEW, {"wait": "inf"}, 400, "number of seconds"),
    Case("wait=-inf", FEW, {"wait": "-inf"}, 400, "number of seconds"),
    Case("wait=Infinity", FEW, {"wait": "Infinity"}, 400, "number of seconds"),
    Case("wait=abc", FEW, {"wait": "abc"}, 400, "number of seconds"),
    Case("wait=5_0 (Python's float would take it)", FEW, {"wait": "5_0"}, 400, "number"),
    Case("wait in non-ASCII digits", FEW, {"wait": "\u0661\u0662"}, 400, "number"),
    Case("wait=0x10", FEW, {"wait": "0x10"}, 400, "number of seconds"),
    Case("wait=1,2", FEW, {"wait": "1,2"}, 400, "number of seconds"),
    Case("wait=true", FEW, {"wait": "true"}, 400, "number of seconds"),
    Case("wait=--1", FEW, {"wait": "--1"}, 400, "number of seconds"),
    Case("wait of 10,000 characters", FEW, {"wait": "9" * 10_000}, 400, "number"),
    Case("wait twice", FEW, [("wait", "1"), ("wait", "2")], 400, "given 2 times"),
    Case("state twice", FEW, [("state", "true"), ("state", "false")], 400, "given 2 times"),
    Case("state=maybe", FEW, {"state": "maybe"}, 400, "true or false"),
    Case("state=2", FEW, {"state": "2"}, 400, "true or false"),
    Case("bad state beside a good wait", FEW, {"state": "x", "wait": "1"}, 400, "state"),
    Case(
        f"state on the id cap + 1 ({MAX_IDS + 1})",
        [l2(grid_chunk(60), s) for s in range(1, MAX_IDS + 2)],
        {"state": "true"},
        400,
        f"at most {MAX_IDS} ids",
    ),
    Case(
        f"wait on the id cap + 1 ({MAX_IDS + 1})",
        [l2(grid_chunk(60), s) for s in range(1, MAX_IDS + 2)],
        {"wait": "5"},
        400,
        f"at most {MAX_IDS} ids",
    ),
    Case(
        f"state over max_ids_per_request ({MAX_IDS_PER_REQUEST + 1})",
        [l2(grid_chunk(61), s) for s in range(1, MAX_IDS_PER_REQUEST + 2)],
        {"state": "true"},
        413,
        "the limit is",
    ),
    Case(
        "state with an .npz-only Accept",
        FEW,
        {"state": "true"},
        406,
        "JSON only",
        accept="application/x-npz",
    ),
    Case(
        "state, Accept .npz and JSON refused by q=0",
        FEW,
        {"state": "true"},
        406,
        "JSON only",
        accept="application/x-npz, application/json;q=0",
    ),
    # -- answered -------------------------------------------------------------------------
    Case("wait=0", FEW, {"wait": "0", **NO_QUEUE}, headers={"X-L2Cache-Wait": "none"}),
    Case("wait= (empty)", FEW, {"wait": "", **NO_QUEUE}, headers={"X-L2Cache-Wait": "none"}),
    Case(
        "wait=' 2 ' (spaces)",
        FEW,
        {"wait": " 2 ", **NO_QUEUE},
        headers={"X-L2Cache-Wait": "none", "X-L2Cache-Wait-Reads": "0"},
    ),
    Case(
        "wait=1e9 on computed and unknown ids: nothing to wait for",
        FEW,
        {"wait": "1e9", **NO_QUEUE},
        headers={"X-L2Cache-Wait": "none", "X-L2Cache-Wait-Reads": "0"},
    ),
    Case(
        "wait=1e999 (overflows to inf): the cap, nothing to wait for",
        FEW,
        {"wait": "1e999", **NO_QUEUE},
        headers={"X-L2Cache-Wait": "none"},
    ),
    Case("state=TRUE", FEW, {"state": "TRUE", **NO_QUEUE}, shape="state"),
    Case("state=on", FEW, {"state": "on", **NO_QUEUE}, shape="state"),
    Case(
        "state=0: the default body",
        FEW,
        {"state": "0", **NO_QUEUE},
        headers={"X-L2Cache-Wait": "none"},
    ),
    Case("state= (empty): the default body", FEW, {"state": "", **NO_QUEUE}),
    Case(
        f"state on the id cap ({MAX_IDS})",
        [*COMPUTED, *[l2(grid_chunk(62), s) for s in range(1, MAX_IDS - 2)]],
        {"state": "true", **NO_QUEUE},
        shape="state",
    ),
    Case(
        "ids of other layers, with wait: not_l2, answered at once",
        OTHER_LAYERS,
        {"state": "true", "wait": "1e9"},
        headers={
            "X-L2Cache-Wait": "none",
            "X-L2Cache-Non-L2-Ids": "5",
            "X-L2Cache-Missing-Ids": "0",
        },
        shape="state",
    ),
    Case(
        "chunks outside the volume, with wait: not_l2, answered at once",
        OUTSIDE,
        {"state": "true", "wait": "1e9"},
        headers={"X-L2Cache-Wait": "none", "X-L2Cache-Wait-Reads": "0"},
        shape="state",
    ),
    Case(
        "unknown ids, with wait: nothing to wait for, answered at once",
        UNKNOWN,
        {"state": "true", "wait": "30"},
        headers={
            "X-L2Cache-Wait": "none",
            "X-L2Cache-Wait-Reads": "0",
            "X-L2Cache-Queued-Ids": "0",
        },
        shape="state",
    ),
    Case(
        "wait with an .npz Accept: the .npz answer",
        FEW,
        {"wait": "2", **NO_QUEUE},
        accept="application/x-npz",
        shape="npz",
        headers={"X-L2Cache-Wait": "none"},
    ),
    Case(
        "state, Accept .npz or JSON: JSON",
        FEW,
        {"state": "true", **NO_QUEUE},
        accept="application/x-npz, application/json;q=0.5",
        shape="state",
    ),
    Case(
        "state, Accept .npz or */*: JSON",
        FEW,
        {"state": "true", **NO_QUEUE},
        accept="application/x-npz, */*;q=0.1",
        shape="state",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_state_and_wait_values_cost_what_they_are_worth(stack, case: Case):
    start = mark(stack)
    r = post(
        stack,
        case.ids,
        params=case.params,
        caller=f"10.1.{CASES.index(case)}.1",
        headers={"Accept": case.accept} if case.accept else None,
    )
    evs = since(stack, start)
    queued = published(stack, settle_s=0.3)
    stack["costs"].append((case.name, r.status_code, len(reads(evs)), len(queued)))
    assert r.status_code < 500, r.text[:300]
    if case.status != 200:
        is_error(r, case.status)
        assert case.message in r.json()["message"], r.json()
        assert reads(evs) == [], evs  # refused before a single row was read
        assert queued == []  # ... or a message published
        assert [e for e in evs if e[0] in ("slot+", "busy")] == []  # ... or a slot taken
        return
    assert r.status_code == 200, r.text[:300]
    for name, value in case.headers.items():
        assert r.headers[name] == value, (name, dict(r.headers))
    assert [e for e in evs if e[0] == "wait+"] == []  # nothing here is waited for
    asked = sorted(set(case.ids))
    if case.shape == "npz":
        assert r.headers["Content-Type"] == "application/x-npz"
        with np.load(io.BytesIO(r.content), allow_pickle=False) as npz:
            assert npz["l2id"].tolist() == asked
            assert npz["found"].tolist() == [n in COMPUTED for n in asked]
            plain = post(stack, case.ids, {"update_cache": "false"}).json()
            size = [plain[str(n)].get("size_nm3", 0) for n in asked]
            assert npz["size_nm3"].tolist() == size
        return
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    if case.shape == "state":
        assert set(body) == {"attributes", "state", "summary"}
        assert list(body["state"]) == [str(n) for n in asked]
        assert sum(body["summary"].values()) == len(asked)
        answer = body["attributes"]
    else:
        answer = body
    assert list(answer) == [str(n) for n in asked]
    assert all((answer[str(n)] != {}) == (n in COMPUTED) for n in asked)
    # what the answer says it read is what the reader saw: the lookup's one read of the
    # layer-2 ids, the states' reads (no wait ran, so no poll)
    state_reads = int(r.headers.get("X-L2Cache-State-Reads", "0"))
    layer2 = [n for n in asked if idlib.get_layer(np.array([n], np.uint64))[0] == 2]
    queue_reads = len(reads(evs)) - (1 if layer2 else 0) - state_reads
    params = dict(case.params)
    if params.get("update_cache") == "false":
        assert queue_reads == 0, evs
    else:
        assert 0 <= queue_reads <= 2, evs  # the guard's marks, the graph's existence check
    if set(asked) <= set(OTHER_LAYERS):  # none of them has a row anywhere: none is read
        assert not keys_read(evs) & set().union(*(keys_of(n) for n in asked)), evs
    if set(asked) <= set(OTHER_LAYERS) | set(OUTSIDE) | set(UNKNOWN):
        assert queued == []  # nothing that can never be computed is queued


# -- many waits at once ----------------------------------------------------------------------


def test_many_concurrent_waits_the_bound_holds_and_plain_lookups_are_answered(stack):
    """12 callers each ask ``wait=1e9`` (cut to the cap) for an id that never comes, at
    once: ``SLOTS`` of them wait, the rest are 429 + Retry-After having read and queued
    nothing; while the waits hold their threads, plain lookups are answered (no slot was
    given back before their answers)."""
    ids = NEVER[:12]
    start = mark(stack)
    with ThreadPoolExecutor(len(ids)) as pool:
        futures = [
            pool.submit(post, stack, [node], {"wait": "1e9"}, f"10.2.{i}.1")
            for i, node in enumerate(ids)
        ]
        until(
            lambda: (
                sum(e[0] == "slot+" for e in since(stack, start)) == SLOTS
                and sum(e[0] == "busy" for e in since(stack, start)) == len(ids) - SLOTS
            ),
            "the waits placed",
        )
        plain_at = mark(stack)
        with ThreadPoolExecutor(4) as plain_pool:
            plain = list(
                plain_pool.map(
                    lambda i: post(stack, COMPUTED, {"update_cache": "false"}, f"10.3.{i}.1"),
                    range(8),
                )
            )
        during = since(stack, start)
        answers = [f.result() for f in futures]
    evs = since(stack, start)
    queued = published(stack)

    assert all(p.status_code == 200 for p in plain), [p.text[:200] for p in plain]
    assert all(all(v != {} for v in p.json().values()) for p in plain)
    # answered while both waits still held their threads
    assert not [e for e in during if e[0] == "slot-"], during[plain_at - start :]
    assert sum(e[0] == "slot+" for e in during) == SLOTS
    assert sum(e[0] == "wait+" for e in evs) == SLOTS  # both polled (then ended at the cap)

    admitted = [r for r in answers if r.status_code == 200]
    refused = [(node, r) for node, r in zip(ids, answers, strict=True) if r.status_code != 200]
    assert len(admitted) == SLOTS and len(refused) == len(ids) - SLOTS
    for r in admitted:
        assert r.headers["X-L2Cache-Wait"] == "cap"
    for _node, r in refused:
        is_error(r, 429)
        assert r.headers["Retry-After"] == "2"
        assert "waiting requests" in r.json()["message"]
    refused_keys = set().union(*(keys_of(node) for node, _ in refused))
    assert not keys_read(evs) & refused_keys  # a refused wait read nothing of its own
    assert not set(queued) & {node for node, _ in refused}  # ... and queued nothing
    assert sorted(queued) == sorted(n for n in ids if n not in {m for m, _ in refused})
    peaks = [int(e[2]) for e in evs if e[0] in ("slot+", "busy")]
    assert max(peaks) == SLOTS  # never more waits at once than the bound
    assert max(int(e[1]) for e in evs if e[0] == "wait+") == SLOTS
    assert sum(e[0] == "slot-" for e in evs) == SLOTS  # every slot given back
    assert all(s < 500 for s in stack["statuses"])


def test_one_caller_holds_at_most_its_share_of_the_waits(stack):
    """One caller asking 4 waits at once gets ``PER_CALLER``; another caller still gets
    a wait beside it."""
    ids = NEVER[12:17]
    start = mark(stack)
    with ThreadPoolExecutor(len(ids)) as pool:
        mine = [pool.submit(post, stack, [n], {"wait": "1e9"}, "10.4.0.1") for n in ids[:4]]
        until(
            lambda: sum(e[0] in ("slot+", "busy") for e in since(stack, start)) == 4,
            "the one caller's waits placed",
        )
        other = post(stack, [ids[4]], {"wait": "0.5"}, "10.4.0.2")
        answers = [f.result() for f in mine]
    evs = since(stack, start)
    published(stack)
    assert other.status_code == 200, other.text[:300]
    assert other.headers["X-L2Cache-Wait"] == "cap"
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * PER_CALLER + [429] * (4 - PER_CALLER), statuses
    for r in answers:
        if r.status_code == 429:
            assert "this caller has" in r.json()["message"]
            assert r.headers["Retry-After"] == "2"
    per_caller = {e[1] for e in evs if e[0] == "slot+"}
    assert per_caller == {"addr:10.4.0.1", "addr:10.4.0.2"}


def test_state_and_wait_requests_pass_the_ids_in_flight_admission(stack):
    """A wait of ``MAX_IDS`` ids holds them in flight for its length: a state request,
    or a plain lookup, that would pass ``IDS_IN_FLIGHT`` beside it is a 429 with nothing
    read; a small one is answered."""
    held = [NEVER[17], *[l2(grid_chunk(17 + 2), s) for s in range(100, 100 + MAX_IDS - 1)]]
    big = [l2(grid_chunk(63), s) for s in range(1, IDS_IN_FLIGHT - MAX_IDS + 2)]  # 31 ids
    start = mark(stack)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, stack, held, {"wait": "1e9"}, "10.5.0.1")
        until(lambda: any(e[0] == "wait+" for e in since(stack, start)), "the big wait started")
        before_refusals = mark(stack)
        state = post(stack, big, {"state": "true"}, "10.5.0.2")
        plain = post(stack, big, {}, "10.5.0.3")
        refusal_events = since(stack, before_refusals)
        small = post(stack, COMPUTED, {"state": "true", "update_cache": "false"}, "10.5.0.4")
        answer = waiting.result()
    published(stack)
    for r in (state, plain):
        is_error(r, 429)
        assert r.headers["Retry-After"] == "1"
        assert f"its {IDS_IN_FLIGHT}" in r.json()["message"]
    big_keys = set().union(*(keys_of(n) for n in big))
    assert not keys_read(refusal_events) & big_keys
    assert small.status_code == 200 and small.json()["summary"]["computed"] == 3
    assert answer.status_code == 200 and answer.headers["X-L2Cache-Wait"] == "cap"
    # the admission was given back: the same big state request is answered now
    again = post(stack, big, {"state": "true", "update_cache": "false"}, "10.5.0.2")
    assert again.status_code == 200, again.text[:300]


def test_without_the_bound_waits_starve_plain_lookups(stack):
    """The control: ``max_concurrent`` set to the instance's threads, ``THREADS`` waits
    take every thread, and a plain lookup is answered only after a wait gave its thread
    back (at the cap). What the default bound prevents."""
    stack["map"].write_text(
        yaml.safe_dump(
            _config(stack["tmp"], {"max_concurrent": THREADS, "max_per_caller": THREADS})
        )
    )
    try:
        ids = NEVER[20 : 20 + THREADS]
        post(stack, COMPUTED, {"update_cache": "false"})  # the map is read again
        start = mark(stack)
        with ThreadPoolExecutor(len(ids)) as pool:
            futures = [
                pool.submit(post, stack, [n], {"wait": "1e9"}, f"10.6.{i}.1")
                for i, n in enumerate(ids)
            ]
            until(
                lambda: sum(e[0] == "wait+" for e in since(stack, start)) == THREADS,
                "every thread waiting",
            )
            plain = post(stack, COMPUTED, {"update_cache": "false"}, "10.6.9.1")
            seen = since(stack, start)
            answers = [f.result() for f in futures]
        published(stack)
        assert plain.status_code == 200
        assert all(r.status_code == 200 for r in answers)
        # the plain lookup got a thread only once a wait had ended at the cap
        assert any(e[0] == "slot-" for e in seen), seen
    finally:
        stack["map"].write_text(yaml.safe_dump(_config(stack["tmp"])))
        post(stack, COMPUTED, {"update_cache": "false"})


def test_no_answer_was_a_5xx(stack):
    """Every answer of this module's requests: 200, 4xx; never a 5xx."""
    assert stack["statuses"], "no request was made"
    assert all(s < 500 for s in stack["statuses"]), sorted(set(stack["statuses"]))
    print(f"\n{len(stack['statuses'])} answers: {sorted(set(stack['statuses']))}")
    for name, status, read, queued in stack["costs"]:
        print(f"{status}  {read:2d} reads  {queued} queued  {name}")
