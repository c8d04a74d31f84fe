"""Lookup under hostile or unlucky conditions, over HTTP in-process.

Every client error is a 4xx JSON ``{"code", "message"}``; bodies are bounded before
they are decompressed; responses over Cloud Run's 32 MiB are gzip-encoded or refused;
a dead Pub/Sub never stalls a lookup.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
import tracemalloc
import zlib
from datetime import UTC, datetime

import numpy as np
import pytest
from lookup_support import PROJECT, dataset_entry, lookup_client
from test_lookup_rows import BITS, crop_features

from l2cache.config import DEFAULT_MAX_IDS, parse_config
from l2cache.domain import ids
from l2cache.domain.lineage import Lineage
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.serving import api as serve
from l2cache.serving.respond import SPILL_BYTES, WINDOW_IDS
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache.store.missing_guard import create_guard_table

URL = "/l2cache/api/v1/table/pinky/attributes"
MAX_IDS = 5_000
N_ROWS = 2_000


def config(**top) -> dict:
    return {
        "bigtable": {"project": PROJECT, "instance": "inst"},
        "max_ids_per_request": MAX_IDS,
        "datasets": {"pinky": dataset_entry("hard_cache")},
        **top,
    }


@pytest.fixture(scope="module")
def full_rows(bigtable_emulator):
    """N_ROWS rows with every attribute: the crop's real features under many ids."""
    instance = bigtable_instance(PROJECT, "inst", admin=True)
    table = create_cache_table(instance, "hard_cache")
    create_guard_table(instance, "l2cache_lookup_guard")  # the missing-id guard's default
    base = crop_features((2, 2, 2), 1)
    big = base["pca_val"][:, 0] > 0  # nodes with PCA: the largest rows
    n = int(big.sum())
    reps = -(-N_ROWS // n)
    feats = {k: np.concatenate([v[big]] * reps)[:N_ROWS] for k, v in base.items()}
    chunks = np.stack([np.arange(N_ROWS) % 50 + 1, np.full(N_ROWS, 900), np.full(N_ROWS, 400)], 1)
    feats["l2id"] = ids.encode_ids(2, chunks, np.arange(1, N_ROWS + 1) + 10**6, BITS)
    dataset = parse_config(config()).dataset("pinky")
    CacheStore(table, dataset).write_features(
        feats, Lineage("run-hard", cell_timestamp=datetime(2026, 1, 1, tzinfo=UTC))
    )
    return feats["l2id"]


@pytest.fixture(scope="module")
def client(full_rows, tmp_path_factory):
    with lookup_client(config(), tmp_path_factory.mktemp("hard")) as c:
        yield c


def post(client, body, headers=None, **params):
    return client.post(URL, data=body, headers=headers or {}, query_string=params)


def deep(n: int) -> bytes:
    return b'{"l2_ids": ' + b"[" * n + b"]" * n + b"}"


MALFORMED = [
    ("superscript digit in a string id", b'{"l2_ids": ["\xc2\xb2"]}', {}),
    ("superscript digit as a number", b'{"l2_ids": [\xc2\xb2]}', {}),
    ("Arabic-Indic digits", '{"l2_ids": ["١٢٣"]}'.encode(), {}),
    ("5,000-digit number", b'{"l2_ids": [' + b"9" * 5000 + b"]}", {}),
    ("5,000-digit string", b'{"l2_ids": ["' + b"9" * 5000 + b'"]}', {}),
    ("JSON nested 100,000 deep", deep(100_000), {}),
    ("nested ids", b'{"l2_ids": [[1, 2]]}', {}),
    ("object ids", b'{"l2_ids": {"a": 1}}', {}),
    ("null body", b"null", {}),
    ("empty body", b"", {}),
    ("invalid UTF-8", b'{"l2_ids": ["\xff\xfe"]}', {}),
    ("NaN id", b'{"l2_ids": [NaN]}', {}),
    ("negative id", b'{"l2_ids": [-1]}', {}),
    ("2**64", b'{"l2_ids": [18446744073709551616]}', {}),
    ("odd binary body", b"\x01" * 9, {"Content-Type": "application/octet-stream"}),
    ("truncated gzip", gzip.compress(b'{"l2_ids": [1]}')[:-6], {"Content-Encoding": "gzip"}),
    ("not gzip", b'{"l2_ids": [1]}', {"Content-Encoding": "gzip"}),
    ("unsupported encoding", b'{"l2_ids": [1]}', {"Content-Encoding": "br"}),
    ("too many ids", json.dumps({"l2_ids": list(range(MAX_IDS + 1))}).encode(), {}),
]


@pytest.mark.parametrize(("what", "body", "headers"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_every_client_error_is_a_4xx_json_error(client, what, body, headers):
    r = post(client, body, headers)
    assert 400 <= r.status_code < 500, (what, r.status_code, r.get_data()[:200])
    payload = r.get_json()
    assert payload["code"] == r.status_code and payload["message"]


def test_bad_query_values_and_methods_are_4xx(client):
    ok = json.dumps({"l2_ids": [1]})
    for params in ({"int64_as_str": "perhaps"}, {"attribute_names": "size_nm3,\u00b2"}):
        r = post(client, ok, **params)
        assert r.status_code == 400 and r.get_json()["code"] == 400
    r = client.get(URL)
    assert r.status_code == 405 and "POST" in r.get_json()["message"]
    r = client.post("/l2cache/api/v1/table_mapping")
    assert r.status_code == 405


def test_a_body_over_the_limit_is_refused_before_it_is_read(client):
    limit = MAX_IDS * serve.BODY_BYTES_PER_ID
    r = post(client, b" " * (limit + 1))
    assert r.status_code == 413 and "limit" in r.get_json()["message"]


def test_gzip_bomb_is_stopped_before_memory_is_spent(full_rows, tmp_path):
    """1 MB of gzip that inflates to 1 GiB: 413 after at most the body limit.

    With the default id cap, so the 1 MB body itself is within the raw-body limit.
    """
    cfg = config()
    del cfg["max_ids_per_request"]
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b" " * 2**20
    bomb = comp.compress(b'{"l2_ids": [') + b"".join(comp.compress(block) for _ in range(1024))
    bomb += comp.flush()
    assert len(bomb) < 1.1 * 2**20
    with lookup_client(cfg, tmp_path) as client:
        assert post(client, b'{"l2_ids": []}').status_code == 200  # built before measuring
        tracemalloc.start()
        try:
            r = post(client, bomb, {"Content-Encoding": "gzip"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert r.status_code == 413 and "decompressed" in r.get_json()["message"]
    print(f"gzip bomb: {len(bomb) / 2**20:.2f} MiB body, peak {peak / 2**20:.1f} MiB traced")
    assert peak < 32 * 2**20  # the body, the bounded output and bookkeeping, never ~1 GiB


def test_a_body_kept_whole_fits_a_response_uncompressed(client, full_rows):
    """Measure JSON bytes per id with every attribute. An answer is kept whole (with a
    Content-Length) only up to the spill size plus the window that passed it; longer ones
    stream, so that bound, not the id cap, must fit Cloud Run's 32 MiB."""
    r = post(
        client, full_rows.astype("<u8").tobytes(), {"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 200 and len(r.get_json()) == N_ROWS
    per_id = len(r.get_data()) / N_ROWS
    print(
        f"{per_id:.0f} bytes of JSON per id; default cap {DEFAULT_MAX_IDS:,} -> "
        f"{per_id * DEFAULT_MAX_IDS / 2**20:.1f} MiB (streamed past {SPILL_BYTES / 2**20:.0f} MiB)"
    )
    assert all(len(v) == 8 for v in r.get_json().values())
    # 5% headroom for longer numbers (larger coordinates and sizes than this crop's)
    assert SPILL_BYTES + per_id * 1.05 * WINDOW_IDS < serve.RESPONSE_LIMIT_BYTES


def test_oversized_responses_gzip_or_413(client, full_rows, monkeypatch):
    """With the limit lowered below one answer: compressed when accepted, else a clear 413."""
    body = full_rows[:500].astype("<u8").tobytes()
    octet = {"Content-Type": "application/octet-stream"}
    plain = post(client, body, octet)
    assert plain.status_code == 200
    monkeypatch.setattr(serve, "RESPONSE_LIMIT_BYTES", len(plain.get_data()) - 1)
    r = post(client, body, octet)
    assert r.status_code == 413 and "Accept-Encoding: gzip" in r.get_json()["message"]
    r = post(client, body, {**octet, "Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(r.get_data())) == plain.get_json()
    monkeypatch.setattr(serve, "RESPONSE_LIMIT_BYTES", 100)
    r = post(client, body, {**octet, "Accept-Encoding": "gzip"})
    assert r.status_code == 413 and "even compressed" in r.get_json()["message"]


def test_pubsub_down_does_not_stall_a_lookup(full_rows, tmp_path):
    """Pub/Sub at a closed port: the lookup answers, the publish stays in the background."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: connections are refused
        cfg = config(pubsub={"project": PROJECT, "missing_ids_topic": "missing"})
        with lookup_client(cfg, tmp_path, {"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{closed}"}) as c:
            present = full_rows[:2]
            timings = []
            for i in range(3):  # new missing ids each time: repeats would be pending already
                missing = ids.encode_ids(2, [[9, 9, 9 + i]] * 3, [1, 2, 3], BITS)
                body = json.dumps({"l2_ids": [*missing.tolist(), *present.tolist()]})
                t0 = time.perf_counter()
                r = c.post(URL, data=body)
                timings.append(time.perf_counter() - t0)
                assert r.status_code == 200
                assert r.headers["X-L2Cache-Missing-Ids"] == "3"
                assert r.headers["X-L2Cache-Queue"] == "pending"  # not waited for
            print("lookups with Pub/Sub down took", ", ".join(f"{t:.3f} s" for t in timings))
