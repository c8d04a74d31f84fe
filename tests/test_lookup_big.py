"""Big lookups over HTTP (functions-framework) against the Bigtable emulator (issue 20,
items 4 and 6): 500,000 ids in one request, streamed with chunked transfer and
byte-identical to the whole-body JSON; 429 + Retry-After past the instance's ids in
flight; ETag / If-None-Match; the ``.npz`` answer; caveclient and requests decoding a
streamed answer.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import time
from datetime import UTC, datetime

import brotli
import grpc
import numpy as np
import orjson
import pytest
import requests
import yaml
from caveclient.auth import AuthClient
from caveclient.l2cache import L2CacheClient
from lookup_support import assert_same_json, upstream_json

from l2cache.config import parse_config
from l2cache.domain import ids
from l2cache.domain.lineage import Lineage, code_revision
from l2cache.gcp.bigtable import RowReader, bigtable_instance
from l2cache.serving.api import LookupService
from l2cache.serving.respond import SPILL_BYTES, Admission, etag, serving_identity
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache_tools.local.functions import start_function

PROJECT = "lookup-big"
RES = [16, 16, 40]
OFFSET = [0, 0, 0]
CHUNK = [96, 96, 48]
BITS = {1: 10, 2: 10, 3: 9}
TOTAL = 500_000  # ids in the big request: the old cap was 75,000
IN_FLIGHT = 600_000  # the instance's admission bound in this test
URL_TAIL = "/l2cache/api/v1/table/big/attributes"


def synthetic(l2ids: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Feature columns of realistic ranges; a tenth of the nodes without PCA (tiny)."""
    rng = np.random.default_rng(seed)
    n = l2ids.size
    pca = rng.normal(size=(n, 3, 3)).astype(np.float16)
    pca_val = rng.uniform(1, 1e5, size=(n, 3)).astype(np.float32)
    tiny = rng.random(n) < 0.1
    pca[tiny] = np.nan
    pca_val[tiny] = np.nan
    return {
        "l2id": l2ids,
        "size_nm3": rng.integers(1, 2**22, n).astype(np.uint32),
        "area_nm2": rng.integers(1, 2**30, n).astype(np.uint32),
        "max_dt_nm": rng.integers(0, 3000, n).astype(np.uint16),
        "mean_dt_nm": rng.uniform(0, 800, n).astype(np.float16),
        "rep_coord_nm": rng.integers(0, 48, (n, 3)).astype(np.uint16),
        "chunk_intersect_count": rng.integers(0, 900, (n, 2, 3)).astype(np.uint16),
        "pca": pca,
        "pca_val": pca_val,
    }


@pytest.fixture(scope="module")
def big(bigtable_emulator, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("big")
    cfg = {
        "bigtable": {"project": PROJECT, "instance": "inst"},
        # no max_ids_per_request: the default cap must take 500,000 ids
        "datasets": {
            "big": {
                "segmentation": "file:///nowhere/sv",
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": "inst",
                    "table_id": "g",
                },
                "cache_table_id": "cache_big",
                "resolution": RES,
                "voxel_offset": OFFSET,
                "chunk_size": CHUNK,
                "spatial_bits": BITS,
            },
            "doomed": {  # a table deleted while its answer streams
                "segmentation": "file:///nowhere/sv",
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": "inst",
                    "table_id": "g",
                },
                "cache_table_id": "cache_doomed",
                "resolution": RES,
                "voxel_offset": OFFSET,
                "chunk_size": CHUNK,
                "spatial_bits": BITS,
            },
        },
    }
    (tmp / "l2cache.yaml").write_text(yaml.safe_dump(cfg))
    config = parse_config(cfg)
    dataset = config.dataset("big")
    n_l2 = TOTAL - 100
    coords = np.stack(
        np.meshgrid(np.arange(1, 51), np.arange(1, 11), [1], indexing="ij"), -1
    ).reshape(-1, 3)
    per_chunk = -(-n_l2 // len(coords))
    chunk_of = np.repeat(coords, per_chunk, axis=0)[:n_l2]
    segment = np.tile(np.arange(1, per_chunk + 1), len(coords))[:n_l2]
    l2 = ids.encode_ids(2, chunk_of, segment, dataset.spatial_bits)
    written = l2[np.arange(n_l2) % 100 != 0]  # every 100th id is missing
    layer1 = ids.encode_ids(
        1, np.tile([1, 1, 1], (100, 1)), np.arange(1, 101), dataset.spatial_bits
    )
    every = np.unique(np.concatenate([l2, layer1]))
    assert every.size == TOTAL
    instance = bigtable_instance(PROJECT, "inst", admin=True)
    store = CacheStore(create_cache_table(instance, "cache_big"), dataset)
    store.write_features(
        synthetic(written), Lineage("run-big", cell_timestamp=datetime(2026, 1, 1, tzinfo=UTC))
    )
    fn = start_function(
        "lookup",
        {
            "L2CACHE_CONFIG": str(tmp / "l2cache.yaml"),
            "L2CACHE_LOOKUP_IDS_IN_FLIGHT": str(IN_FLIGHT),
            **bigtable_emulator.env,
        },
        log_dir=tmp,
    )
    yield {
        "base": f"http://{fn.host}",
        "url": f"http://{fn.host}{URL_TAIL}",
        "store": store,
        "every": every,
        "written": np.sort(written),
        "missing": np.setdiff1d(l2, written),
        "layer1": layer1,
        "config": config,
    }
    fn.stop()


def post(big, l2ids, headers=None, params=None, stream=False):
    body = np.asarray(l2ids, dtype="<u8").tobytes()
    return requests.post(
        big["url"],
        data=body,
        params=params or {},
        headers={"Content-Type": "application/octet-stream", **(headers or {})},
        timeout=600,
        stream=stream,
    )


def whole_body_json(store: CacheStore, l2ids: np.ndarray, **kw) -> bytes:
    """What the lookup answered before streaming: one orjson document of every id."""
    found = store.read_features(l2ids, **kw)
    payload = {str(v): found.get(v, {}) for v in np.unique(l2ids).tolist()}
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def oracle(store: CacheStore, sample: np.ndarray) -> dict:
    """The existing service's frontend on the same cells (tests/lookup_support.py)."""
    raw = store.read_raw(sample)
    cells = {k: v.get("0", {}) for k, v in raw.items()}
    return upstream_json(cells, sample.tolist(), RES, OFFSET, CHUNK, BITS[2])


def test_500k_ids_streamed_chunked_and_identical_to_the_whole_body(big):
    """Half a million ids (missing and non-L2 ones among them) in one request: 200,
    chunked (no Content-Length, so no 32 MiB limit applies), and the decompressed bytes
    are exactly the whole-body JSON; a sample matches the existing service's frontend."""
    every = big["every"]
    r = post(big, every, headers={"Accept-Encoding": "br"}, stream=True)
    assert r.status_code == 200, r.text[:300]
    assert r.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in r.headers and "ETag" not in r.headers
    assert r.headers["Content-Encoding"] == "br"
    assert r.headers["X-L2Cache-Non-L2-Ids"] == "100"
    sent = r.raw.read(decode_content=False)
    got = brotli.decompress(sent)
    del sent
    expected = whole_body_json(big["store"], every)
    assert len(got) > 32 * 2**20  # over Cloud Run's limit on a declared length
    assert got == expected
    del got
    rng = np.random.default_rng(1)
    sample = np.sort(
        np.concatenate(
            [rng.choice(big["written"], 1500, replace=False), big["missing"][:20], big["layer1"]]
        )
    )
    mine = json.loads(whole_body_json(big["store"], sample))
    assert_same_json(mine, {str(k): v for k, v in oracle(big["store"], sample).items()})


def test_streamed_gzip_and_identity_decode_with_requests(big):
    """Past the spill size, gzip and identity answers stream too; requests decodes them."""
    part = big["every"][:60_000]
    expected = whole_body_json(big["store"], part)
    assert len(expected) > SPILL_BYTES
    for accept in ("gzip", "identity"):
        r = post(big, part, headers={"Accept-Encoding": accept})
        assert r.status_code == 200 and r.headers.get("Transfer-Encoding") == "chunked"
        assert r.headers.get("Content-Encoding") == (None if accept == "identity" else accept)
        assert r.content == expected  # requests un-gzips a chunked body as it comes


def test_caveclient_decodes_a_streamed_answer(big):
    auth = AuthClient(token="not-a-real-token")
    client = L2CacheClient(
        server_address=big["base"], table_name="big", auth_client=auth, api_version=1
    )
    l2 = big["every"][100:120_100].tolist()
    data = client.get_l2data(l2, attributes=["size_nm3", "rep_coord_nm", "pca_val"])
    found = big["store"].read_features(l2, ["size_nm3", "rep_coord_nm", "pca_val"])
    assert len(data) == len(l2)
    assert {int(k): v for k, v in data.items() if v} == found


def test_small_answers_keep_their_length_headers_and_etag(big):
    part = big["every"][:2000]
    r = post(big, part, headers={"Accept-Encoding": "gzip"}, stream=True)
    assert r.status_code == 200
    assert "Content-Length" in r.headers and "Transfer-Encoding" not in r.headers
    assert gzip.decompress(r.raw.read(decode_content=False)) == whole_body_json(big["store"], part)
    assert r.headers["ETag"].startswith('W/"') and r.headers["X-L2Cache-Missing-Ids"] == "19"


def test_etag_and_if_none_match(big):
    """Same rows, same tag: 304 without a body; another attribute set or format, another
    tag; a row rewritten (a new cell timestamp) or a missing id computed, a new tag."""
    written = big["written"]
    ids_ = np.concatenate([written[:50], big["missing"][-2:]])
    first = post(big, ids_)
    tag = first.headers["ETag"]
    again = post(big, ids_, headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["ETag"] == tag
    assert post(big, ids_, headers={"If-None-Match": 'W/"other", ' + tag}).status_code == 304
    assert post(big, ids_, headers={"If-None-Match": '"other"'}).status_code == 200
    subset = post(big, ids_, params={"attribute_names": "size_nm3"})
    assert subset.headers["ETag"] != tag
    npz = post(big, ids_, headers={"Accept": "application/x-npz"})
    assert npz.headers["ETag"] not in (tag, subset.headers["ETag"])
    store = big["store"]
    later = Lineage("run-big-2", cell_timestamp=datetime(2026, 2, 1, tzinfo=UTC))
    store.write_features(synthetic(written[:1], seed=7), later)
    changed = post(big, ids_, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag
    tag2 = changed.headers["ETag"]
    store.write_features(synthetic(big["missing"][-1:], seed=8), later)  # computed now
    computed = post(big, ids_, headers={"If-None-Match": tag2})
    assert computed.status_code == 200 and computed.headers["ETag"] != tag2
    assert computed.json()[str(big["missing"][-1])] != {}


def test_etag_names_the_code_and_the_maps_serving_fields(big):
    """Cells unchanged but decoded differently (a corrected row_format, another
    geometry or fallback table, a new lookup revision): another tag, never a 304 with
    the old values."""
    ds = big["config"].dataset("big")
    ids_ = np.sort(big["written"][:5])
    stamps = np.arange(1, 6, dtype=np.uint64)

    def tag(d):
        return etag("application/json", ids_, stamps, serving_identity(d))

    assert tag(ds) == tag(dataclasses.replace(ds))  # a map read again: same tag
    others = [
        dataclasses.replace(ds, row_format="legacy_nm"),
        dataclasses.replace(ds, voxel_offset=(1, 0, 0)),
        dataclasses.replace(ds, resolution=(4.0, 4.0, 40.0)),
        dataclasses.replace(ds, fallback_table_id="pcgl2cache_old"),
    ]
    tags = {tag(d) for d in others}
    assert len(tags) == len(others) and tag(ds) not in tags
    assert serving_identity(ds)[0] == code_revision()


def npz_of(response: requests.Response) -> dict[str, np.ndarray]:
    assert response.headers["Content-Type"] == "application/x-npz"
    with np.load(io.BytesIO(response.content), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_npz_answer_carries_the_json_values(big):
    """Every value of the JSON answer is in the .npz, in its dtype, with validity."""
    ids_ = np.concatenate([big["written"][:3000], big["missing"][10:15], big["layer1"][:5]])
    js = post(big, ids_).json()
    arrays = npz_of(post(big, ids_, headers={"Accept": "application/x-npz"}))
    order = np.unique(ids_)
    assert arrays["l2id"].dtype == np.uint64 and (arrays["l2id"] == order).all()
    assert arrays["found"].tolist() == [bool(js[str(v)]) for v in order.tolist()]
    dtypes = {
        "size_nm3": "int64",
        "area_nm2": "uint32",
        "max_dt_nm": "uint16",
        "mean_dt_nm": "float16",
        "rep_coord_nm": "float64",
        "chunk_intersect_count": "uint16",
        "pca": "float16",
        "pca_val": "float32",
    }
    for name, dtype in dtypes.items():
        values, valid = arrays[name], arrays[f"{name}_valid"]
        assert values.dtype == np.dtype(dtype) and values.shape[0] == order.size
        for i, v in enumerate(order.tolist()):
            entry = js[str(v)]
            assert valid[i] == (name in entry)
            if name in entry:
                assert values[i].tolist() == entry[name], (name, v)
    assert not arrays["pca_valid"].all() and arrays["size_nm3_valid"].sum() == 3000


def test_npz_of_a_big_request_streams(big):
    """120,000 ids as .npz are past the spill size: streamed, decoded whole."""
    part = big["every"][:120_000]
    r = post(big, part, headers={"Accept": "application/x-npz", "Accept-Encoding": "br"})
    assert r.status_code == 200 and r.headers.get("Transfer-Encoding") == "chunked"
    arrays = npz_of(r)
    assert (arrays["l2id"] == part).all()
    assert arrays["found"].sum() == np.isin(part, big["written"]).sum()


def test_bigtable_throttling_is_429_not_5xx(big):
    """RESOURCE_EXHAUSTED from Bigtable is overload: 429 + Retry-After, never a 5xx.

    Raised for real by gRPC: the reader's channel to the emulator refuses messages over
    64 bytes, which gRPC reports as RESOURCE_EXHAUSTED, as Bigtable reports throttling.
    """
    config = big["config"]
    store = CacheStore(big["store"].table, config.dataset("big"))
    target = bigtable_emulator_host()
    small = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64)])
    store._reader = RowReader(store.table.name, channel=small)  # noqa: SLF001
    service = LookupService(config, lambda name: store, admission=Admission(10**6))
    body = np.asarray(big["written"][:20], dtype="<u8").tobytes()
    r = service.handle("POST", URL_TAIL, {}, {"Content-Type": "application/octet-stream"}, body)
    assert r.status == 429, r.body
    assert r.headers["Retry-After"] == "5"
    assert json.loads(r.body)["code"] == 429
    assert service.admission.in_flight == 0  # released though the read failed
    small.close()


def bigtable_emulator_host() -> str:
    import os

    return os.environ["BIGTABLE_EMULATOR_HOST"]


def test_a_failure_mid_stream_breaks_the_answer_it_never_shortens_it(big):
    """The cache table vanishes while a streamed answer is being sent: the client gets a
    broken chunked stream (an error), never a short answer that parses, and the
    instance's admission is given back (a full-cap request is admitted after)."""
    instance = bigtable_instance(PROJECT, "inst", admin=True)
    table = create_cache_table(instance, "cache_doomed")
    doomed = big["written"][:300_000]
    CacheStore(table, big["config"].dataset("doomed")).write_features(
        synthetic(doomed, seed=3),
        Lineage("run-doomed", cell_timestamp=datetime(2026, 1, 1, tzinfo=UTC)),
    )
    r = requests.post(
        big["url"].replace("/table/big/", "/table/doomed/"),
        data=doomed.astype("<u8").tobytes(),
        headers={"Content-Type": "application/octet-stream", "Accept-Encoding": "identity"},
        timeout=600,
        stream=True,
    )
    assert r.status_code == 200 and r.headers.get("Transfer-Encoding") == "chunked"
    first = r.raw.read(2**20)  # the server is now blocked on a full socket, mid-answer
    assert first.startswith(b'{"')
    table.delete()
    received = len(first)
    with pytest.raises(requests.exceptions.RequestException):
        for piece in r.iter_content(2**20):
            received += len(piece)
    assert received < 300_000 * 300  # far short of the whole answer: it was cut
    assert post(big, big["every"][: IN_FLIGHT - 1_000]).status_code == 200  # released


def test_overload_is_429_with_retry_after_and_clears(big):
    """While a 500,000-id answer streams (its reader paused), another big request passes
    the instance's ids in flight: 429 + Retry-After, a JSON error. Small ones still fit;
    once the first answer is closed, big ones are admitted again."""
    first = post(big, big["every"], headers={"Accept-Encoding": "identity"}, stream=True)
    assert first.status_code == 200  # headers sent: its ids are in flight
    try:
        second = post(big, big["every"][:200_000])
        assert second.status_code == 429
        assert int(second.headers["Retry-After"]) >= 1
        assert second.json()["code"] == 429 and "retry" in second.json()["message"]
        assert post(big, big["every"][:50_000]).status_code == 200  # fits beside it
    finally:
        first.close()
    for _ in range(100):  # the server notices the closed connection on its next write
        again = post(big, big["every"][:200_000], headers={"Accept-Encoding": "br"})
        if again.status_code != 429:
            break
        time.sleep(0.2)
    assert again.status_code == 200


def test_a_streamed_answer_queues_its_missing_ids_at_the_end(big):
    """Missing ids of a streamed answer are queued once its last window is read (the
    headers went out before they were known)."""
    config = big["config"]
    queued: list[list[int]] = []
    service = LookupService(
        config,
        lambda name: CacheStore(big["store"].table, config.dataset(name)),
        lambda l2ids, table_id, cache_id: queued.append(l2ids.tolist()),
        admission=Admission(10**6),
    )
    part = big["every"][100:40_100]  # past the spill size, no layer-1 ids
    body = part.astype("<u8").tobytes()
    r = service.handle("POST", URL_TAIL, {}, {"Content-Type": "application/octet-stream"}, body)
    assert r.status == 200 and r.stream is not None
    assert "X-L2Cache-Missing-Ids" not in r.headers and queued == []
    answer = json.loads(r.content())
    expected = sorted(int(k) for k, v in answer.items() if v == {})
    assert expected and queued and sorted(v for q in queued for v in q) == expected
    assert service.admission.in_flight == 0
