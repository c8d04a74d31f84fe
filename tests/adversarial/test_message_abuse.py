"""Hostile Pub/Sub messages: none can cost more than it should, crash-loop on_edit, or
make a real edit report ok while its ids are never written (docs/design.md, "Edit
messages").

The real on_edit function under functions-framework, against the Bigtable emulator (a
PCG-style graph built from the pinky40 crop, 2 x 2 x 2 chunks, the cache and runs tables)
and the Pub/Sub emulator (the dead-letter topic the function publishes to, pulled back
here). Each case of the table is one message pushed to the function exactly as a Pub/Sub
push subscription delivers it (the JSON push envelope), and must be answered 2xx (0 5xx,
so no redelivery loop) within its time bound and either be dead-lettered once with its
reason, the dead letter's payload being the message as it came or the validated ids, or
be processed. Memory is bounded twice: decoding each case in this process under
tracemalloc (peak per message), and the function process's peak RSS over all cases.
A few cases also go through a real topic with a push subscription (the emulator's push).
"""

from __future__ import annotations

import base64
import os
import pickle
import struct
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import yaml
from google.cloud import pubsub_v1
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport
from google.pubsub_v1.types import PushConfig
from numpy._core.multiarray import _reconstruct

from l2cache.config import load_config
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.handlers.on_edit import (
    MAX_DEAD_LETTER_BYTES,
    MAX_IDS,
    PoisonMessage,
    decode_message,
)
from l2cache.store.cache import create_cache_table
from l2cache.store.ledger import RunLedger, create_runs_table
from l2cache_ops.ledger import events, list_runs
from l2cache_ops.runstate import read_counts
from l2cache_tools.dataset import build_dataset
from l2cache_tools.dataset.edits import apply_merge, edit_message, pick_merge, pick_split
from l2cache_tools.local.functions import start_function

pytestmark = pytest.mark.integration

PROJECT = "msgabuse"
INSTANCE = "inst"
DS = "msgabuse"
CACHE = "msgabuse_cache"
RUNS = "msgabuse_runs"
DEAD = "msgabuse-dead"
EDITS = "msgabuse-edits"
CHUNK = (48, 48, 24)
RES = (16.0, 16.0, 40.0)
CROP = Path(__file__).resolve().parents[1] / "data" / "pinky40_crop_96x96x48.npz"
L2 = 2 << 56  # a layer-2 id of chunk (0, 0, 0), segment 0
MAX_SECONDS = 10.0  # per message, the function's answer (2 shared cores, loaded)
MAX_DECODE_MB = 120  # per message, tracemalloc peak of decoding in this process
MAX_RSS_MB = 700  # the function process (and its workers), peak over every case
TRACED_BYTES = 200_000


# -- hostile payloads -------------------------------------------------------------------
class _Reduce:
    """Pickles as a call of ``func(*args)``: what every reduce gadget looks like."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _edit(ids, op: object = 7, **extra) -> bytes:
    return pickle.dumps({"operation_id": op, "new_lvl2_ids": ids, "new_root_ids": [], **extra})


def _nested(depth: int) -> bytes:
    """[[[...]]] ``depth`` deep, as the new_lvl2_ids of an edit (opcodes by hand)."""
    body = b"\x80\x04}\x8c\x0cnew_lvl2_ids" + b"]" * depth + b"a" * (depth - 1) + b"s."
    return body


def _raw(*ops: bytes) -> bytes:
    return b"\x80\x04" + b"".join(ops) + b"."


def _many_small_ints(n: int) -> bytes:
    """An edit of ``n`` ids as BININT opcodes (5 bytes each): the slow path, no fast run."""
    ints = b"".join(b"J" + struct.pack("<i", 1000 + i % 1000) for i in range(n))
    return b"\x80\x04}\x8c\x0cnew_lvl2_ids](" + ints + b"es."


def _marker(tmp: Path) -> Path:
    return tmp / "pwned"


@dataclass
class Case:
    """One message and what must become of it."""

    name: str
    data: bytes | str  # str: the envelope's data field as is (not base64 of it)
    attributes: dict[str, str]
    reason: str | None  # a substring of the dead-letter reason; None: not dead-lettered
    payload: bytes | None = None  # the dead letter's payload, if not the message as sent


def hostile_cases(tmp: Path) -> list[Case]:
    marker = str(_marker(tmp))
    ds = {"table_id": DS}
    missing = {"table_id": DS, "l2_cache_id": CACHE}
    big_ids = [L2 + i for i in range(MAX_IDS + 1)]
    np_empty = _Reduce(np.empty, (150_000_000,), np.uint64)
    reconstruct = _Reduce(_reconstruct, np.ndarray, (150_000_000,), np.dtype("<u8"))
    return [
        # code and object gadgets: refused at the first global, nothing called
        Case("os.system", _edit([_Reduce(os.system, f"touch {marker}")]), ds, "not allowed"),
        Case("eval", _edit(_Reduce(eval, f"open({marker!r}, 'w')")), ds, "builtins.eval"),
        Case("getattr", pickle.dumps(_Reduce(getattr, [], "append")), ds, "builtins.getattr"),
        Case("numpy empty 1.2 GB", _edit(np_empty), ds, "numpy.empty"),
        Case("numpy _reconstruct", pickle.dumps({"new_lvl2_ids": reconstruct}), ds, "not allowed"),
        Case("numpy array", _edit(np.array([L2], dtype=np.uint64)), ds, "not allowed"),
        Case("numpy scalar op", _edit([L2], op=np.uint64(7)), ds, "not allowed"),
        Case("GLOBAL opcode", b"\x80\x02cos\nsystem\n.", ds, "os.system"),
        Case("BUILD/INST", _raw(b"}", b"}", b"b"), ds, "BUILD is not allowed"),
        Case("ext registry", _raw(b"\x82\x01"), ds, "EXT1 is not allowed"),
        Case("persistent id", _raw(b"\x8c\x01x", b"Q"), ds, "BINPERSID"),
        Case("out-of-band buffer", _raw(b"\x97"), ds, "NEXT_BUFFER"),
        # memory from a few bytes
        Case("memo index 2**31", _raw(b"]", b"r\xff\xff\xff\x7f"), ds, "no new_lvl2_ids"),
        Case("str of 2**62", _raw(b"\x8d" + struct.pack("<Q", 2**62)), ds, "exceeds the limit"),
        Case("bytes of 4 GB", _raw(b"B\xff\xff\xff\xff"), ds, "exceeds the limit"),
        Case("long of 2**31 bytes", _raw(b"\x8b\xff\xff\xff\x7f"), ds, "exceeds 64 bits"),
        Case("frame of 2**60", _raw(b"\x95" + struct.pack("<Q", 2**60)), ds, "overruns"),
        Case("deep nesting", _nested(5000), ds, "nesting deeper than"),
        Case("20k containers", _raw(b"]" * 20_000), ds, "containers"),
        Case("20k strings", _raw(b"\x8c\x02ab" * 20_000), ds, "str/bytes objects"),
        Case("1.2 M opcodes", _raw(b"N" * 1_200_000), ds, "pickle opcodes"),
        Case("1 M + 1 ids", _many_small_ints(MAX_IDS + 1), ds, "ids exceed the limit"),
        Case("10 MB of ids", _edit(big_ids), ds, "ids exceed the limit"),
        Case("11 MB", _edit(big_ids + big_ids[:100_000]), ds, "bytes exceeds"),
        Case("raw ids 1 M + 1", np.zeros(MAX_IDS + 1, "<u8").tobytes(), missing, "exceed"),
        # structure that no pickler emits
        Case("cycle", _raw(b"]\x94", b"h\x00", b"a"), ds, "inside itself"),
        Case(
            "mutated after nesting",
            _raw(
                b"}\x94",
                b"\x8c\x0cnew_lvl2_ids",
                b"]\x94",
                b"s",
                b"h\x01",
                b"J\x01\x00\x00\x00",
                b"a",
            ),
            ds,
            "modified after being nested",
        ),
        Case("list as dict key", _raw(b"}", b"]", b"N", b"s"), ds, "dict key of type list"),
        Case("truncated", _edit([L2, L2 + 1])[:-9], ds, "not a decodable pickle"),
        Case("bytes after STOP", _edit([L2]) + b"junk", ds, "after STOP"),
        Case("protocol 0", pickle.dumps({"new_lvl2_ids": [L2]}, protocol=0), ds, "protocol 2"),
        Case("garbage", b"\x00garbage", ds, "not a decodable pickle"),
        Case("empty data", b"", ds, "not a decodable pickle"),
        Case("not base64", "%%% not base64 %%%", ds, "not base64"),
        # wrong types and values
        Case("payload a list", pickle.dumps([L2]), ds, "no new_lvl2_ids"),
        Case("ids a dict", _edit({"a": L2}), ds, "a dict, not a list"),
        Case("ids a str", _edit("123"), ds, "a str, not a list"),
        Case("ids of str", _edit(["x"]), ds, "holds a str"),
        Case("ids of float", _edit([1.5]), ds, "holds a float"),
        Case("ids of bool", _edit([True]), ds, "holds a bool"),
        Case("nested ids", _edit([[L2]]), ds, "holds a list"),
        Case("negative id", _edit([-1]), ds, "outside [0, 2**64)"),
        Case("id of 2**64", _edit([2**64]), ds, "outside [0, 2**64)"),
        Case("operation id a str", _edit([L2], op="7"), ds, "operation_id is not a uint64"),
        Case("operation id negative", _edit([L2], op=-7), ds, "operation_id is not a uint64"),
        Case("no ids", _edit([]), ds, "names no L2 ids"),
        # wrong attributes
        Case("no table_id", _edit([L2]), {"user_id": "u"}, "no table_id"),
        Case("table_id of spaces", _edit([L2]), {"table_id": "a b"}, "not a graph table id"),
        Case("table_id of 300", _edit([L2]), {"table_id": "t" * 300}, "not a graph table id"),
        Case(
            "other cache table",
            np.array([L2], "<u8").tobytes(),
            {**missing, "l2_cache_id": "x"},
            "not the cache table",
        ),
        Case("raw ids of 7 bytes", b"\x01" * 7, missing, "not uint64 ids"),
        # not layer 2: decoded, then the validated ids are what is dead-lettered
        Case(
            "layer-1 ids",
            _edit([5, 6]),
            ds,
            "not layer-2",
            payload=np.array([5, 6], "<u8").tobytes(),
        ),
        Case("uncached table", _edit([L2]), {"table_id": "someone_else"}, None),
    ]


# -- the stack --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(bigtable_emulator, pubsub_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("msgabuse")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    volume = np.load(CROP)["labels"]
    built = build_dataset(volume, f"file://{tmp}/sv", RES, CHUNK, instance, DS)
    create_cache_table(instance, CACHE)
    create_runs_table(instance, RUNS)
    config = {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "pubsub": {
            "project": PROJECT,
            "edits_topic": EDITS,
            "dead_letter_topic": DEAD,
            "max_delivery_attempts": 3,
        },
        "runs_table_id": RUNS,
        "datasets": {
            DS: {
                "segmentation": built.segmentation,
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": INSTANCE,
                    "table_id": DS,
                },
                "cache_table_id": CACHE,
            }
        },
    }
    path = tmp / "l2cache.yaml"
    path.write_text(yaml.safe_dump(config))
    publisher = pubsub_v1.PublisherClient()
    # dead letters of up to 10 MB: more than gRPC's default 4 MB receive limit
    channel = grpc.insecure_channel(
        os.environ["PUBSUB_EMULATOR_HOST"], options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    subscriber = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
    dead_topic = publisher.topic_path(PROJECT, DEAD)
    publisher.create_topic(name=dead_topic)
    dead_sub = subscriber.subscription_path(PROJECT, "dead-inspect")
    subscriber.create_subscription(name=dead_sub, topic=dead_topic)
    fn = start_function(
        "on_edit",
        {
            "L2CACHE_CONFIG": str(path),
            "WORKERS": "1",
            "THREADS": "2",
            **bigtable_emulator.env,
            **pubsub_emulator.env,
        },
        signature_type="cloudevent",
        log_dir=tmp,
    )
    os.environ["L2CACHE_CONFIG"] = str(path)
    yield {
        "tmp": tmp,
        "url": f"http://{fn.host}/projects/{PROJECT}/topics/{EDITS}",
        "fn": fn,
        "instance": instance,
        "config": load_config(path),
        "publisher": publisher,
        "subscriber": subscriber,
        "dead_sub": dead_sub,
        "letters": {},
    }
    fn.stop()


stamps: dict[str, str] = {}  # publish time per message id: a redelivery keeps its own


def push(
    stack, data: bytes | str, attributes: dict[str, str], message_id: str
) -> tuple[int, float]:
    """POST one message as a Pub/Sub push subscription delivers it; (status, seconds)."""
    encoded = base64.b64encode(data).decode() if isinstance(data, bytes) else data
    body = {
        "message": {
            "data": encoded,
            "attributes": attributes,
            "messageId": message_id,
            "publishTime": stamps.setdefault(message_id, datetime.now(UTC).isoformat()),
        },
        "subscription": f"projects/{PROJECT}/subscriptions/abuse",
    }
    start = time.monotonic()
    r = requests.post(stack["url"], json=body, timeout=60)
    return r.status_code, time.monotonic() - start


def dead_letter(stack, message_id: str, timeout: float = 20.0):
    """The dead letter of ``message_id`` (payload, attributes), pulled from the real
    dead-letter topic; every letter pulled meanwhile is kept by its original id."""
    letters = stack["letters"]
    deadline = time.monotonic() + timeout
    while message_id not in letters and time.monotonic() < deadline:
        resp = stack["subscriber"].pull(subscription=stack["dead_sub"], max_messages=100, timeout=5)
        for m in resp.received_messages:
            attrs = dict(m.message.attributes)
            letters.setdefault(attrs.get("original_message_id"), []).append((m.message.data, attrs))
        if resp.received_messages:
            stack["subscriber"].acknowledge(
                subscription=stack["dead_sub"], ack_ids=[m.ack_id for m in resp.received_messages]
            )
    return letters.get(message_id)


def peak_rss_mb(pid: int) -> float:
    """The largest peak RSS (VmHWM) of ``pid`` and its descendants (gunicorn workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    best, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return best


def decode_peak_mb(data: bytes | str, attributes: dict[str, str]) -> tuple[float, float]:
    """tracemalloc peak (MB) and seconds of decoding one message in this process; for
    messages over TRACED_BYTES (tracemalloc slows decoding ~20x) the peak is NaN and the
    function's own peak RSS bounds them instead."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > TRACED_BYTES:
        return float("nan"), 0.0
    tracemalloc.start()
    start = time.monotonic()
    try:
        decode_message(raw, attributes)
    except PoisonMessage:
        pass
    seconds = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak, seconds


# -- the table ------------------------------------------------------------------------
def test_hostile_messages_are_dead_lettered_with_a_reason_within_bounds(stack, capsys):
    cases = hostile_cases(stack["tmp"])
    report = []
    for i, case in enumerate(cases):
        message_id = f"abuse-{i}"
        peak_mb, decode_s = decode_peak_mb(case.data, case.attributes)
        status, seconds = push(stack, case.data, case.attributes, message_id)
        assert 200 <= status < 300, (case.name, status)  # never a 5xx: no redelivery loop
        assert seconds < MAX_SECONDS, (case.name, seconds)
        assert not peak_mb >= MAX_DECODE_MB, (case.name, peak_mb)
        rss = peak_rss_mb(stack["fn"].process.pid)
        report.append((case.name, len(case.data), seconds, decode_s, peak_mb, rss))
        if os.environ.get("ABUSE_VERBOSE"):
            with capsys.disabled():
                print(
                    f"{case.name:28s} {len(case.data):>10d} B  answered {seconds:5.2f} s  "
                    f"decode {peak_mb:6.1f} MB  function peak RSS {rss:5.0f} MB"
                )
        if case.reason is None:
            continue
        letters = dead_letter(stack, message_id)
        assert letters and len(letters) == 1, (case.name, letters)
        payload, attributes = letters[0]
        assert case.reason in attributes["dead_letter_reason"], (case.name, attributes)
        sent = case.data.encode() if isinstance(case.data, str) else case.data
        if len(sent) > MAX_DEAD_LETTER_BYTES:  # larger than Pub/Sub carries: cut, said so
            assert attributes["dead_letter_truncated_from"] == str(len(sent))
            sent = sent[:MAX_DEAD_LETTER_BYTES]
        assert payload == (case.payload if case.payload is not None else sent), case.name
    assert not _marker(stack["tmp"]).exists(), "a gadget was executed"
    rss = peak_rss_mb(stack["fn"].process.pid)
    assert rss < MAX_RSS_MB, rss
    with capsys.disabled():
        worst_t = max(report, key=lambda r: r[2])
        traced = [r for r in report if r[4] == r[4]]
        worst_m = max(traced, key=lambda r: r[4])
        print(
            f"\n{len(report)} hostile messages: 0 5xx; slowest {worst_t[0]!r} "
            f"{worst_t[2]:.2f} s answered; largest traced decode {worst_m[0]!r} "
            f"{worst_m[4]:.1f} MB peak; function peak RSS {rss:.0f} MB"
        )


def _event_rows(stack) -> dict[str, dict]:
    ledger = RunLedger(stack["instance"].table(RUNS))
    out = {}
    for run in list_runs(ledger):
        if run.dataset == DS and run.kind == "edit_stream":
            out.update({e["key"]: {**e, "run_id": run.run_id} for e in events(ledger, run.run_id)})
    return out


def _cached(stack, ids) -> set[int]:
    table = stack["instance"].table(CACHE)
    from l2cache.domain import ids as idlib

    return {
        int(k)
        for k in (idlib.parse_row_key(r.row_key) for r in table.read_rows() if r.row_key.isdigit())
        if k in set(ids)
    }


def test_a_reused_operation_id_with_new_content_is_processed_and_reported(stack):
    """PCG's real edit message, its redelivery (idempotent: one event, the chunk
    skipped), then the same operation id with other ids of the same chunk: processed as
    its own event (its ids written, not skipped as a redelivery), flagged and counted."""
    graph = stack["instance"].table(DS)
    dataset = stack["config"].dataset(DS)
    merge = apply_merge(graph, dataset, *pick_merge(dataset, graph, (0, 0, 0)))
    data, attributes = edit_message(DS, merge)
    for _ in range(2):  # a redelivery: same message id, same content
        status, _ = push(stack, data, attributes, "reuse-1")
        assert status == 200
    (node,) = merge.new_l2_ids.tolist()
    assert _cached(stack, [node]) == {node}
    one = pick_split(dataset, graph, (0, 0, 0), exclude=[node])  # same chunk, not cached
    other = [one, pick_split(dataset, graph, (0, 0, 0), exclude=[node, one])]
    assert not _cached(stack, other)
    reused = pickle.dumps(
        {"operation_id": merge.operation_id, "new_lvl2_ids": list(other), "new_root_ids": []}
    )
    status, _ = push(stack, reused, attributes, "reuse-2")
    assert status == 200
    assert _cached(stack, other) == set(other)  # written, not taken for a redelivery
    rows = _event_rows(stack)
    first = rows[f"op-{merge.operation_id}"]
    assert first["deliveries"] == 2 and first["status"] == "ok" and first["chunks_skipped"] == 1
    (second,) = [e for k, e in rows.items() if k.startswith(f"op-{merge.operation_id}-")]
    assert second["reused_operation_id"] is True
    assert second["reused_from"] == f"op-{merge.operation_id}"
    assert second["status"] == "ok" and second["written"] == 2
    ledger = RunLedger(stack["instance"].table(RUNS))
    assert read_counts(ledger, first["run_id"])["events.reused_op"] == 1
    # the reused content redelivered: the same event again, nothing counted twice
    status, _ = push(stack, reused, attributes, "reuse-2")
    assert status == 200
    again = _event_rows(stack)
    assert len([k for k in again if k.startswith(f"op-{merge.operation_id}")]) == 2
    assert read_counts(ledger, first["run_id"])["events.reused_op"] == 1


def test_hostile_messages_through_a_real_push_subscription(stack):
    """The emulator pushes to the function: each hostile message is dead-lettered once
    with our reason (a 5xx would be redelivered, and forwarded without one)."""
    publisher, subscriber = stack["publisher"], stack["subscriber"]
    topic = publisher.topic_path(PROJECT, f"{EDITS}-real")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(
        request={
            "name": subscriber.subscription_path(PROJECT, "on-edit-push"),
            "topic": topic,
            "push_config": PushConfig(push_endpoint=stack["url"]),
            "ack_deadline_seconds": 30,
        }
    )
    cases = [
        (_edit(_Reduce(np.empty, (150_000_000,), np.uint64)), "numpy.empty"),
        (_raw(b"]", b"r\xff\xff\xff\x7f"), "no new_lvl2_ids"),
        (_nested(5000), "nesting deeper than"),
        (_edit([L2 + i for i in range(300_000)])[:-50], "not a decodable pickle"),
    ]
    ids = []
    for data, _ in cases:
        ids.append(publisher.publish(topic, data, table_id=DS, marker=uuid.uuid4().hex).result(30))
    for message_id, (data, reason) in zip(ids, cases, strict=True):
        letters = dead_letter(stack, message_id, timeout=60)
        assert letters and len(letters) == 1, (reason, letters)
        payload, attributes = letters[0]
        assert reason in attributes["dead_letter_reason"]
        assert payload == data
