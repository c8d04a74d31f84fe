"""Request framing abuse, on raw sockets, against the real functions-framework servers.

The three functions run as deployed (functions-framework, gunicorn gthread workers, 8
threads) on 127.0.0.1, with a 2 s body deadline (``L2CACHE_BODY_DEADLINE_S``). Every
case is bytes on a socket, as an attacker would send them: malformed chunked bodies,
gzip with many members, gzip bombs, slow bodies, huge declared lengths, bad headers,
unsupported methods and Expect variants. Each must answer a 4xx (or the 2xx of a good
request) with the JSON error body ``{"code", "message"}``, never a 5xx, within its time
bound; the server's CPU per case is measured and bounded. Then the concurrency case:
eight bodies held open (every worker thread) while a normal lookup is still answered.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from l2cache.gcp.bigtable import bigtable_instance
from l2cache.serving import http_guard
from l2cache.store.cache import create_cache_table
from l2cache_tools.local.functions import start_function

pytestmark = pytest.mark.integration

PROJECT = "framing"
MAX_IDS = 5000
LIMIT = MAX_IDS * 32  # the lookup's body limit (serving.api.BODY_BYTES_PER_ID)
DEADLINE_S = 2.0
THREADS = 8
CPU_BOUND_S = 1.5  # per request, server side, the worst case allowed
ATTR = "/l2cache/api/v1/table/ds/attributes"


def _config() -> dict:
    return {
        "bigtable": {"project": PROJECT, "instance": "inst"},
        "max_ids_per_request": MAX_IDS,
        "datasets": {
            "ds": {
                "segmentation": "file:///nowhere/sv",
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": "inst",
                    "table_id": "ds",
                },
                "cache_table_id": "cache_framing",
                "resolution": [16, 16, 40],
                "voxel_offset": [0, 0, 0],
                "chunk_size": [96, 96, 48],
                "spatial_bits": {1: 10, 2: 10, 3: 9},
            }
        },
    }


@pytest.fixture(scope="module")
def servers(bigtable_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("framing")
    path = tmp / "l2cache.yaml"
    path.write_text(yaml.safe_dump(_config()))
    create_cache_table(bigtable_instance(PROJECT, "inst", admin=True), "cache_framing")
    env = {
        "L2CACHE_CONFIG": str(path),
        "L2CACHE_BODY_DEADLINE_S": str(DEADLINE_S),
        "THREADS": str(THREADS),
        **bigtable_emulator.env,
    }
    started = {
        "lookup": start_function("lookup", env, log_dir=tmp),
        "compute_chunk": start_function("compute_chunk", env, log_dir=tmp),
        "on_edit": start_function("on_edit", env, signature_type="cloudevent", log_dir=tmp),
    }
    yield {name: fn.port for name, fn in started.items()} | {
        f"{name}_pid": fn.process.pid for name, fn in started.items()
    }
    for fn in started.values():
        fn.stop()


# --- raw HTTP ------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float
    interim: list[int] = field(default_factory=list)

    def json(self) -> dict:
        return json.loads(self.body)


def _read_answer(sock: socket.socket, t0: float) -> Answer:
    buf = b""
    interim: list[int] = []
    while True:
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before a response: {buf[:200]!r}")
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            interim.append(status)
            continue
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
        return Answer(status, headers, buf[:length], time.monotonic() - t0, interim)


def exchange(port: int, parts: list, timeout: float = 15.0) -> Answer:
    """Send ``parts`` (bytes, or a float: sleep that long; ``"shutdown"``: half-close)
    and read one response. A peer reset after the response counts as the response."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for part in parts:
                if isinstance(part, float | int) and not isinstance(part, bool):
                    time.sleep(part)
                elif part == "shutdown":
                    sock.shutdown(socket.SHUT_WR)
                else:
                    sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body: read the answer
        return _read_answer(sock, t0)


def request(method: str, path: str, headers: list[tuple[str, str]], version: str = "1.1") -> bytes:
    lines = [
        f"{method} {path} HTTP/{version}",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its children (the gunicorn worker)."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                pids.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


IDS = json.dumps({"l2_ids": [1, 2, 3]}).encode()
JSON = ("Content-Type", "application/json")


def post(path: str, body: bytes, *headers: tuple[str, str], te: str | None = None) -> bytes:
    hs = [JSON, *headers]
    hs.append(("Transfer-Encoding", te) if te else ("Content-Length", str(len(body))))
    return request("POST", path, hs) + body


def gz_members(n: int, payload: bytes) -> bytes:
    """``payload`` split into ``n`` gzip members (valid: gunzip gives it back)."""
    step = max(1, len(payload) // n)
    pieces = [payload[i : i + step] for i in range(0, len(payload), step)]
    return b"".join(gzip.compress(p, mtime=0) for p in pieces)


BIG_IDS = json.dumps({"l2_ids": list(range(1, 200))}).encode()
BOMB = gzip.compress(b" " * (150 * 2**20), compresslevel=9)  # 150 MiB of spaces, ~150 KiB
DEFLATED = zlib.compress(IDS)
_RAW = zlib.compressobj(wbits=-15)
RAW_DEFLATED = _RAW.compress(IDS) + _RAW.flush()


# (name, function, parts, allowed statuses, time bound in seconds)
CASES = [
    # chunked framing
    ("chunked ok", "lookup", [post(ATTR, b"", te="chunked") + chunked(IDS[:7], IDS[7:])], {200}, 3),
    (
        "chunk size not hex",
        "lookup",
        [post(ATTR, b"", te="chunked") + b"zz\r\nhello\r\n0\r\n\r\n"],
        {400},
        3,
    ),
    (
        "chunk without CRLF",
        "lookup",
        [post(ATTR, b"", te="chunked") + b"5\r\nhelloXX0\r\n\r\n"],
        {400},
        3,
    ),
    (
        "chunk size overflow",
        "lookup",
        [post(ATTR, b"", te="chunked") + b"f" * 40 + b"\r\n"],
        {400, 408, 413},
        DEADLINE_S + 1.5,
    ),
    (
        "chunk extension junk",
        "lookup",
        [post(ATTR, b"", te="chunked") + b"5;\x00=1\r\nhello\r\n0\r\n\r\n"],
        {400},
        3,
    ),
    (
        "chunked cut, half-closed",
        "lookup",
        [post(ATTR, b"", te="chunked") + b"10\r\nabc", "shutdown"],
        {400},
        3,
    ),
    (
        "chunked over the limit",
        "lookup",
        [post(ATTR, b"", te="chunked") + chunked(*[b"x" * 60000] * 4)],
        {413},
        3,
    ),
    (
        "1-byte chunks",
        "lookup",
        [post(ATTR, b"", te="chunked") + chunked(*[b" "] * 60000 + [IDS])],
        {200, 413},
        5,
    ),
    ("te gzip (unsupported)", "lookup", [post(ATTR, b"", te="gzip") + b"abc"], {400}, 3),
    (
        "te chunked twice",
        "lookup",
        [post(ATTR, b"", te="chunked, chunked") + chunked(IDS)],
        {400},
        3,
    ),
    (
        "te and content-length",
        "lookup",
        [
            request("POST", ATTR, [JSON, ("Content-Length", "5"), ("Transfer-Encoding", "chunked")])
            + chunked(IDS)
        ],
        {400},
        3,
    ),
    # declared sizes
    (
        "huge content-length, no body",
        "lookup",
        [request("POST", ATTR, [JSON, ("Content-Length", str(10**12))])],
        {413},
        1,
    ),
    (
        "huge content-length, sending",
        "lookup",
        [request("POST", ATTR, [JSON, ("Content-Length", str(10**9))]) + b"x" * 2**20],
        {413},
        2,
    ),
    (
        "content-length not a number",
        "lookup",
        [request("POST", ATTR, [JSON, ("Content-Length", "12abc")]) + IDS],
        {400},
        3,
    ),
    (
        "content-length negative",
        "lookup",
        [request("POST", ATTR, [JSON, ("Content-Length", "-1")])],
        {400},
        3,
    ),
    (
        "content-length twice, differing",
        "lookup",
        [request("POST", ATTR, [JSON, ("Content-Length", "3"), ("Content-Length", "4")]) + b"abcd"],
        {400},
        3,
    ),
    (
        "body shorter than declared, half-closed",
        "lookup",
        [request("POST", ATTR, [JSON, ("Content-Length", "100")]) + b"{}", "shutdown"],
        {400},
        3,
    ),
    (
        "compute_chunk huge content-length",
        "compute_chunk",
        [request("POST", "/", [JSON, ("Content-Length", str(10**10))])],
        {413},
        1,
    ),
    (
        "on_edit huge content-length",
        "on_edit",
        [request("POST", "/", [JSON, ("Content-Length", str(10**10))])],
        {413},
        1,
    ),
    # slow bodies (the deadline is 2 s)
    (
        "slow body: stalls",
        "lookup",
        [request("POST", ATTR, [JSON, ("Content-Length", "100")]) + b'{"l2_ids":'],
        {408},
        DEADLINE_S + 1.5,
    ),
    (
        "slow body: trickles",
        "lookup",
        [request("POST", ATTR, [JSON, ("Content-Length", "100")]), *[b" ", 0.25] * 12],
        {408},
        DEADLINE_S + 1.5,
    ),
    (
        "slow chunked body",
        "lookup",
        [post(ATTR, b"", te="chunked") + b'4\r\n{"l2'],
        {408},
        DEADLINE_S + 1.5,
    ),
    (
        "slow body: compute_chunk",
        "compute_chunk",
        [request("POST", "/", [JSON, ("Content-Length", "100")]) + b"{"],
        {408},
        DEADLINE_S + 1.5,
    ),
    # content encodings
    ("gzip ok", "lookup", [post(ATTR, gzip.compress(IDS), ("Content-Encoding", "gzip"))], {200}, 3),
    (
        "gzip 3 members ok",
        "lookup",
        [post(ATTR, gz_members(3, IDS), ("Content-Encoding", "gzip"))],
        {200},
        3,
    ),
    (
        "gzip 5,000 members",
        "lookup",
        [post(ATTR, gz_members(5000, b" " * 5000 + IDS), ("Content-Encoding", "gzip"))],
        {400},
        3,
    ),
    ("gzip bomb (150 MiB)", "lookup", [post(ATTR, BOMB, ("Content-Encoding", "gzip"))], {413}, 3),
    (
        "gzip not gzip",
        "lookup",
        [post(ATTR, b"not gzip at all", ("Content-Encoding", "gzip"))],
        {400},
        3,
    ),
    (
        "gzip truncated",
        "lookup",
        [post(ATTR, gzip.compress(BIG_IDS)[:-12], ("Content-Encoding", "gzip"))],
        {400},
        3,
    ),
    (
        "gzip zero padding",
        "lookup",
        [post(ATTR, gzip.compress(IDS) + b"\0" * 100, ("Content-Encoding", "gzip"))],
        {200},
        3,
    ),
    (
        "deflate (zlib) ok",
        "lookup",
        [post(ATTR, DEFLATED, ("Content-Encoding", "deflate"))],
        {200},
        3,
    ),
    (
        "deflate (raw) ok",
        "lookup",
        [post(ATTR, RAW_DEFLATED, ("Content-Encoding", "deflate"))],
        {200},
        3,
    ),
    ("brotli refused", "lookup", [post(ATTR, IDS, ("Content-Encoding", "br"))], {415}, 3),
    (
        "gzip twice refused",
        "lookup",
        [post(ATTR, IDS, ("Content-Encoding", "gzip, gzip"))],
        {415},
        3,
    ),
    # headers and request lines
    (
        "header without colon",
        "lookup",
        [b"GET /l2cache/api/versions HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n"],
        {400},
        3,
    ),
    (
        "space in header name",
        "lookup",
        [b"GET /l2cache/api/versions HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n"],
        {400},
        3,
    ),
    (
        "NUL in header value",
        "lookup",
        [b"GET /l2cache/api/versions HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"],
        {400},
        3,
    ),
    (
        "underscore header",
        "lookup",
        [b"GET /l2cache/api/versions HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 1\r\n\r\n"],
        {200, 400},
        3,
    ),
    (
        "obsolete line folding",
        "lookup",
        [b"GET /l2cache/api/versions HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"],
        {400},
        3,
    ),
    (
        "two Host headers",
        "lookup",
        [b"GET /l2cache/api/versions HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"],
        {400},
        3,
    ),
    (
        "header field of 64 KiB (431)",
        "lookup",
        [request("GET", "/l2cache/api/versions", [("X-Big", "a" * 65536)])],
        {400, 431},
        3,
    ),
    (
        "1,000 headers (431)",
        "lookup",
        [request("GET", "/l2cache/api/versions", [(f"X-H{i}", "v") for i in range(1000)])],
        {400, 431},
        3,
    ),
    (
        "request line of 2 MiB",
        "lookup",
        [b"GET /" + b"a" * 2**21 + b" HTTP/1.1\r\nHost: x\r\n\r\n"],
        {414},
        5,
    ),
    ("bad HTTP version", "lookup", [b"GET / HTTP/9.9\r\nHost: x\r\n\r\n"], {400}, 3),
    ("garbage request line", "lookup", [b"HELLO THERE\r\n\r\n"], {400}, 3),
    ("bad bytes in path", "lookup", [b"GET /\x01\x02 HTTP/1.1\r\nHost: x\r\n\r\n"], {400, 404}, 3),
    # methods
    ("lowercase method", "lookup", [request("get", "/l2cache/api/versions", [])], {400, 405}, 3),
    ("method FOO", "lookup", [request("FOO", "/l2cache/api/versions", [])], {405}, 3),
    (
        "PUT with a body",
        "lookup",
        [request("PUT", ATTR, [JSON, ("Content-Length", str(len(IDS)))]) + IDS],
        {405},
        3,
    ),
    ("TRACE", "lookup", [request("TRACE", "/", [])], {405}, 3),
    ("DELETE on compute_chunk", "compute_chunk", [request("DELETE", "/", [])], {405}, 3),
    ("GET on compute_chunk", "compute_chunk", [request("GET", "/", [])], {405}, 3),
    ("GET on on_edit", "on_edit", [request("GET", "/", [])], {405}, 3),
    ("on_edit not a CloudEvent", "on_edit", [post("/", b"{}")], {400}, 3),
    ("GET robots.txt", "lookup", [request("GET", "/robots.txt", [])], {404}, 3),
    # Expect
    ("expect 100-continue ok", "lookup", [post(ATTR, IDS, ("Expect", "100-continue"))], {200}, 3),
    (
        "expect 100-continue, too large",
        "lookup",
        [request("POST", ATTR, [JSON, ("Expect", "100-continue"), ("Content-Length", str(10**9))])],
        {413},
        1,
    ),
    (
        "expect 100-continue, HTTP/1.0",
        "lookup",
        [
            request(
                "POST",
                ATTR,
                [JSON, ("Expect", "100-continue"), ("Content-Length", str(len(IDS)))],
                "1.0",
            )
            + IDS
        ],
        {200},
        3,
    ),
    ("expect something else (417)", "lookup", [post(ATTR, IDS, ("Expect", "200-ok"))], {417}, 3),
    (
        "expect 100-continue, body never sent",
        "lookup",
        [request("POST", ATTR, [JSON, ("Expect", "100-continue"), ("Content-Length", "40")])],
        {408},
        DEADLINE_S + 1.5,
    ),
]


@pytest.mark.parametrize(
    ("name", "function", "parts", "statuses", "bound"), CASES, ids=[c[0] for c in CASES]
)
def test_framing_case(servers, name, function, parts, statuses, bound):
    cpu0 = cpu_seconds(servers[f"{function}_pid"])
    answer = exchange(servers[function], parts)
    time.sleep(0.05)  # let the worker finish the connection before reading its CPU
    cpu = cpu_seconds(servers[f"{function}_pid"]) - cpu0
    print(f"\n{name}: {answer.status} in {answer.seconds:.3f} s, server CPU {cpu:.3f} s")
    assert answer.status < 500, (name, answer.status, answer.body[:300])
    assert answer.status in statuses, (name, answer.status, answer.body[:300])
    assert answer.seconds <= bound, (name, answer.seconds)
    assert cpu <= CPU_BOUND_S, (name, cpu)
    if answer.status >= 400:
        assert answer.headers.get("content-type") == "application/json", answer.headers
        error = answer.json()
        assert error["code"] == answer.status and error["message"], error
    elif function == "lookup" and b"/attributes" in parts[0][:200]:
        assert answer.json() == {"1": {}, "2": {}, "3": {}}  # the ids, none cached


def test_slow_bodies_do_not_hold_the_instance(servers):
    """Every worker thread held by a slow body: a normal lookup is still answered within
    the body deadline, and the slow ones get 408 JSON."""
    port = servers["lookup"]
    results: list[Answer | Exception] = []

    def slow() -> None:
        head = request("POST", ATTR, [JSON, ("Content-Length", "1000")])
        try:
            results.append(exchange(port, [head + b"{", *[b" ", 0.2] * 40]))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=slow) for _ in range(THREADS)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all eight are in their bodies now
    normal = exchange(port, [post(ATTR, IDS)])
    for t in threads:
        t.join(30)
    print(f"\nnormal lookup under {THREADS} slow bodies: {normal.status} in {normal.seconds:.2f} s")
    assert normal.status == 200 and normal.json() == {"1": {}, "2": {}, "3": {}}
    assert normal.seconds <= DEADLINE_S + 1.5
    assert len(results) == THREADS
    for r in results:
        assert isinstance(r, Answer), r
        assert r.status == 408 and r.json()["code"] == 408
        assert r.seconds <= DEADLINE_S + 1.5


# --- the bounds themselves, in process (no server) -----------------------------------------


def test_decoding_cost_is_bounded_whatever_the_members(monkeypatch):
    """The 6.1 MiB many-member body that cost 43 s of CPU before: refused after at most
    ``MAX_GZIP_MEMBERS`` members; a bomb stops at the limit. Work is counted (inflaters
    made, bytes put out), not timed: a timed bound fails on a busy machine."""
    made: list[object] = []
    real = zlib.decompressobj

    def counting(*args: object) -> object:
        d = real(*args)
        made.append(d)
        return d

    monkeypatch.setattr(http_guard.zlib, "decompressobj", counting)
    many = gz_members(300_000, b" " * 6 * 2**20)  # ~6 MiB of 21-byte members
    with pytest.raises(http_guard.FramingError) as err:
        http_guard.decode_body(many, "gzip", 8 * 2**20, http_guard.MAX_GZIP_MEMBERS)
    assert err.value.status == 400
    assert len(made) <= http_guard.MAX_GZIP_MEMBERS  # of 300,000 members, that many read
    made.clear()
    bomb = gzip.compress(b"\0" * (64 * 2**20))
    with pytest.raises(http_guard.FramingError) as err:
        http_guard.decode_body(bomb, "gzip", 2**20, http_guard.MAX_GZIP_MEMBERS)
    assert err.value.status == 413 and len(made) == 1
    payload = os.urandom(2**20)
    assert http_guard.decode_body(gz_members(16, payload), "gzip", 2**20, 16) == payload


class _Trickle:
    """A body stream that costs CPU per byte, like a body of 1-byte chunks."""

    def read(self, n: int) -> bytes:
        end = time.thread_time() + 0.01
        while time.thread_time() < end:
            pass
        return b" "


def test_reading_stops_at_the_cpu_budget_and_the_deadline():
    environ = {"wsgi.input": _Trickle(), "HTTP_TRANSFER_ENCODING": "chunked"}
    t0 = time.monotonic()
    with pytest.raises(http_guard.FramingError) as err:
        http_guard.read_body(environ, 10**6, deadline_s=30, cpu_s=0.2)
    assert err.value.status == 413 and time.monotonic() - t0 < 1
    with pytest.raises(http_guard.FramingError) as err:
        http_guard.read_body(environ, 10**6, deadline_s=0.2, cpu_s=30)
    assert err.value.status == 408


def test_werkzeug_dev_server_errors_are_json():
    """functions-framework --debug serves with werkzeug: its own refusals are JSON too."""
    from werkzeug.serving import make_server

    http_guard.install_server_errors()
    server = make_server("127.0.0.1", 0, lambda environ, start: [])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        many = request("GET", "/", [(f"X-H{i}", "v") for i in range(200)])
        answer = exchange(server.server_port, [many])
    finally:
        server.shutdown()
    assert 400 <= answer.status < 500 and answer.headers["content-type"] == "application/json"
    assert answer.json()["code"] == answer.status
