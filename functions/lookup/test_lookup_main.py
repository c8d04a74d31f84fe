"""The lookup entry point: a Flask request in, the API's answer out.

What the entry point decides before (or without) reading features: the open routes
(API versions, attribute metadata, table mapping), 404 for unknown routes, 4xx JSON for
bad requests, CORS, and a plain 500 when the instance is misconfigured. The service
builds its Bigtable client on first use, so these tests run against the real Bigtable
emulator (an empty cache table: one test reads through it).
"""

from __future__ import annotations

import json

import flask
import numpy as np
import pytest

from l2cache.config import parse_config
from l2cache.domain import ids as idlib
from l2cache.handlers import lookup as lookup_handler

API = "/l2cache/api/v1"
ATTRIBUTES = f"{API}/table/ds/attributes"


@pytest.fixture
def main(load_main, config_path, bigtable):
    lookup_handler.reset()  # the service is built once per instance: read this map
    yield load_main("lookup")
    lookup_handler.reset()


def call(main, path: str, method: str = "GET", data=None, headers=None) -> flask.Response:
    app = flask.Flask(__name__)
    with app.test_request_context(path, method=method, data=data, headers=headers or {}):
        return main.lookup(flask.request)


def body(response: flask.Response):
    assert response.headers["Content-Type"] == "application/json"
    return json.loads(response.get_data())


def test_api_versions(main):
    r = call(main, "/l2cache/api/versions")
    assert r.status_code == 200 and body(r) == [1]


def test_attribute_metadata_lists_every_attribute_with_its_type(main):
    r = call(main, f"{API}/attribute_metadata")
    assert r.status_code == 200
    assert body(r) == {
        "size_nm3": "<class 'numpy.uint32'>",
        "area_nm2": "<class 'numpy.uint32'>",
        "max_dt_nm": "<class 'numpy.uint16'>",
        "mean_dt_nm": "<class 'numpy.float16'>",
        "rep_coord_nm": "<class 'numpy.uint16'>",
        "chunk_intersect_count": "<class 'numpy.uint16'>",
        "pca": "<class 'numpy.float16'>",
        "pca_val": "<class 'numpy.float32'>",
    }


def test_table_mapping_names_each_dataset_segmentation_and_cache_table(main):
    r = call(main, f"{API}/table_mapping")
    assert r.status_code == 200
    assert body(r) == {
        "ds": {"cv_path": "file:///nowhere/sv", "l2cache_id": "cache_ds"},
        "theirs": {"cv_path": "file:///nowhere/sv", "l2cache_id": "their_cache"},
    }


def test_index_pages_are_text(main):
    for path in ("/l2cache", f"{API}/"):
        r = call(main, path)
        assert r.status_code == 200, path
        assert r.headers["Content-Type"].startswith("text/html")
        assert b"PCGL2Cache API v1" in r.get_data()


@pytest.mark.parametrize(
    ("method", "path", "status", "words"),
    [
        ("GET", f"{API}/nothing-here", 404, "no such endpoint: GET /l2cache/api/v1/nothing-here"),
        ("GET", "/", 404, "no such endpoint"),
        ("POST", f"{API}/table_mapping", 405, "use GET for this endpoint, not POST"),
        ("GET", ATTRIBUTES, 405, "use POST for this endpoint, not GET"),
        ("POST", f"{API}/table/nope/attributes", 404, "unknown dataset"),
    ],
)
def test_wrong_routes_and_methods_get_a_json_error(main, method, path, status, words):
    r = call(main, path, method=method, data=b'{"l2_ids": [1]}')
    assert r.status_code == status
    error = body(r)
    assert error["code"] == status and words in error["message"]


@pytest.mark.parametrize(
    ("data", "headers", "query", "status", "words"),
    [
        (b"{not json", {}, "", 400, "not valid JSON"),
        (b"", {}, "", 400, '{"l2_ids": [...]}'),
        (b'{"ids": [1]}', {}, "", 400, "l2_ids"),
        (b'{"l2_ids": 5}', {}, "", 400, "must be a list"),
        (b'{"l2_ids": [1.5]}', {}, "", 400, "must be integers"),
        (b'{"l2_ids": [true]}', {}, "", 400, "must be integers"),
        (b'{"l2_ids": [-1]}', {}, "", 400, "outside 0..2**64-1"),
        (b'{"l2_ids": [18446744073709551616]}', {}, "", 400, "outside 0..2**64-1"),
        (b"\x01" * 9, {"Content-Type": "application/octet-stream"}, "", 400, "multiple of 8"),
        (b"plain", {"Content-Encoding": "gzip"}, "", 400, "not gzip"),
        (b'{"l2_ids": [1]}', {"Content-Encoding": "zstd"}, "", 415, "unsupported"),
        (b'{"l2_ids": [1]}', {}, "?attribute_names=size_nm3,volume", 400, "unknown attribute"),
        (b'{"l2_ids": [1]}', {}, "?int64_as_str=perhaps", 400, "true or false"),
        (json.dumps({"l2_ids": list(range(101))}).encode(), {}, "", 413, "the limit is 100"),
        (b" " * (70 * 1024), {}, "", 413, "over the"),
    ],
)
def test_malformed_requests_get_a_clear_4xx(main, data, headers, query, status, words):
    r = call(main, ATTRIBUTES + query, method="POST", data=data, headers=headers)
    assert r.status_code == status
    error = body(r)
    assert error["code"] == status and words in error["message"], error


def test_ids_absent_from_the_cache_are_answered_empty_and_counted(main, fn_map):
    """Read through to Bigtable (an empty cache table): every id is answered once, in id
    order; no missing-id topic is configured, so nothing is queued."""
    bits = parse_config(fn_map).dataset("ds").spatial_bits
    l2 = idlib.encode_ids(2, np.tile([1, 2, 3], (2, 1)), np.array([9, 4]), bits).tolist()
    layer1 = int(idlib.encode_ids(1, [[1, 2, 3]], 5, bits)[0])
    ask = [l2[0], layer1, l2[1], l2[0]]
    r = call(main, ATTRIBUTES, method="POST", data=json.dumps({"l2_ids": ask}))
    assert r.status_code == 200
    answer = body(r)
    assert list(answer) == [str(v) for v in sorted({*l2, layer1})]
    assert all(v == {} for v in answer.values())
    assert r.headers["X-L2Cache-Missing-Ids"] == "2"
    assert r.headers["X-L2Cache-Non-L2-Ids"] == "1"
    assert "X-L2Cache-Queue" not in r.headers
    assert {p.split(";")[0].strip() for p in r.headers["Server-Timing"].split(",")} >= {"encode"}


def test_cors_preflight_and_simple_requests(main):
    origin = "https://neuroglancer.example"
    pre = call(
        main,
        ATTRIBUTES,
        method="OPTIONS",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["Access-Control-Allow-Origin"] in ("*", origin)
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")
    }
    r = call(main, f"{API}/table_mapping", headers={"Origin": origin})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] in ("*", origin)
    if r.headers["Access-Control-Allow-Origin"] == origin:  # reflected: caches must key on it
        assert "Origin" in r.headers.getlist("Vary")
    exposed = {h.strip() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"WWW-Authenticate", "X-L2Cache-Missing-Ids", "X-L2Cache-Queue"} <= exposed
    # a browser tool reads the revalidation tag, the back-off and the wait's outcome too
    assert {"ETag", "Retry-After", "X-L2Cache-Wait", "X-L2Cache-Wait-Reads"} <= exposed
    error = call(main, f"{API}/nothing-here", headers={"Origin": origin})  # errors too
    assert error.status_code == 404 and "Access-Control-Allow-Origin" in error.headers


def test_a_misconfigured_instance_answers_500_saying_so(load_main, use_map, tmp_path):
    use_map({"datasets": {}})  # no bigtable section
    lookup_handler.reset()
    try:
        r = call(load_main("lookup"), f"{API}/table_mapping")
    finally:
        lookup_handler.reset()
    assert r.status_code == 500
    error = body(r)
    assert error["message"].startswith("the lookup is misconfigured:")
    assert "bigtable" in error["message"]
