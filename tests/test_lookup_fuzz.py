"""Property-based fuzz of the lookup API (hypothesis, fixed budget, derandomized).

Random methods, paths, query strings, bodies, content types and encodings go through
the real lookup function (functions-framework's Flask app, real Bigtable emulator).
Properties: never a 5xx; every error body is JSON with ``code`` and ``message``.
"""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lookup_support import PROJECT, dataset_entry, lookup_client

from l2cache.domain import ids
from l2cache.domain.ids import SpatialBits
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.store.cache import create_cache_table

BITS = SpatialBits.from_mapping({1: 10, 2: 10, 3: 9})
MAX_EXAMPLES = 250
TRIED: list[tuple[str, str, int]] = []

L2 = [int(v) for v in ids.encode_ids(2, [[1, 2, 3]] * 4, [1, 2, 3, 4], BITS)]
PATHS = [
    "/l2cache/api/v1/table/pinky/attributes",
    "/l2cache/api/v1/table/pinky_public/attributes",
    "/l2cache/api/v1/table/nope/attributes",
    "/l2cache/api/v1/table_mapping",
    "/l2cache/api/v1/attribute_metadata",
    "/l2cache/api/versions",
    "/l2cache/api/v1/",
    "/l2cache/",
    "/",
]
texts = st.text(max_size=30)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.sampled_from(L2)
    | texts,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)


@st.composite
def bodies(draw):
    kind = draw(st.sampled_from(["ids", "json", "bytes", "deep", "digits", "binary"]))
    if kind == "ids":
        ids_ = draw(st.lists(st.sampled_from(L2) | st.integers(0, 2**64 - 1), max_size=20))
        body = json.dumps({"l2_ids": ids_}).encode()
    elif kind == "json":
        body = json.dumps({"l2_ids": draw(json_values)}, allow_nan=True).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "deep":
        n = draw(st.integers(1, 200_000))
        body = b'{"l2_ids": ' + b"[" * n + b"]" * draw(st.integers(0, n)) + b"}"
    elif kind == "digits":
        digits = draw(st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6000))
        quoted = draw(st.booleans())
        body = ('{"l2_ids": [' + (f'"{digits}"' if quoted else digits) + "]}").encode()
    else:
        body = draw(st.binary(max_size=80))
    if draw(st.booleans()) and kind != "binary":
        body = gzip.compress(body) if draw(st.booleans()) else body  # declared, maybe lying
        return body, "gzip"
    return body, draw(st.sampled_from(["", "identity", "br", "deflate, gzip", "x-\u00e9"]))


@st.composite
def requests_(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    path = draw(st.sampled_from(PATHS))
    if draw(st.integers(0, 4)) == 0:  # a mangled path
        path = path + draw(st.text(max_size=20)).replace("?", "").replace("#", "")
    query = draw(
        st.dictionaries(
            st.sampled_from(["attribute_names", "int64_as_str", "update_cache", "x", "\u00b2"])
            | texts,
            texts | st.sampled_from(["true", "false", "size_nm3,pca", "size_nm3,\u00b2", ""]),
            max_size=3,
        )
    )
    body, encoding = draw(bodies())
    content_type = draw(
        st.sampled_from(
            [
                "",
                "application/json",
                "application/octet-stream",
                "text/plain",
                "multipart/form-data",
            ]
        )
    )
    headers = {"Content-Type": content_type} if content_type else {}
    if encoding:
        headers["Content-Encoding"] = encoding
    if draw(st.booleans()):
        headers["Accept-Encoding"] = draw(st.sampled_from(["gzip", "identity", "*", "br"]))
    return method, path, query, body, headers


@pytest.fixture(scope="module")
def client(bigtable_emulator, tmp_path_factory):
    instance = bigtable_instance(PROJECT, "inst", admin=True)
    create_cache_table(instance, "fuzz_cache")
    cfg = {
        "bigtable": {"project": PROJECT, "instance": "inst"},
        "max_ids_per_request": 1000,
        "virtual_tables": {"pinky_public": "pinky"},
        "datasets": {"pinky": dataset_entry("fuzz_cache")},
    }
    with lookup_client(cfg, tmp_path_factory.mktemp("fuzz")) as c:
        yield c
    fivexx = [t for t in TRIED if t[2] >= 500]
    errors = sum(1 for t in TRIED if t[2] >= 400)
    print(f"\nfuzz: {len(TRIED)} requests, {errors} answered 4xx, {len(fivexx)} answered 5xx")


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests_())
def test_no_request_gets_a_5xx_and_errors_are_json(client, request):
    method, path, query, body, headers = request
    r = client.open(path, method=method, query_string=query, data=body, headers=headers)
    TRIED.append((method, path, r.status_code))
    assert r.status_code < 500, (method, path, query, body[:100], headers, r.get_data()[:300])
    if r.status_code >= 400 and method != "HEAD":
        payload = json.loads(r.get_data())
        assert isinstance(payload, dict) and payload["code"] == r.status_code
        assert isinstance(payload["message"], str) and payload["message"]
