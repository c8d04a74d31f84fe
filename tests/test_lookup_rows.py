"""Rows as the existing service writes them, served as its frontend serves them (over HTTP).

Rows are written byte-for-byte with PCGL2Cache's kvdbclient attributes into the real
Bigtable emulator; the lookup function (functions-framework's Flask app) must answer
exactly what PCGL2Cache's frontend computes from the same cells: same values and the
same JSON types, for rows with and without l2cache lineage, placeholders, float
resolutions, ``int64_as_str``, attribute subsets, virtual tables, and the pre-2022
format only where the dataset map says ``row_format: legacy_nm``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
from lookup_support import (
    LAYER_BITS,
    PROJECT,
    UPSTREAM,
    assert_same_json,
    dataset_entry,
    lookup_client,
    upstream_features,
    upstream_json,
    write_placeholder,
    write_upstream_rows,
)

from l2cache.config import parse_config
from l2cache.domain import ids
from l2cache.domain.ids import SpatialBits
from l2cache.domain.lineage import Lineage
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.store.cache import CacheStore, create_cache_table

BITS = SpatialBits.from_mapping({1: 10, 2: LAYER_BITS, 3: 9})
URL = "/l2cache/api/v1/table/{}/attributes"


def crop_features(chunk, first_segment, res=(16, 16, 40)):
    """Real features of the vendored pinky40 crop, its objects renamed to L2 ids of ``chunk``."""
    labels = np.load("tests/data/pinky40_crop_96x96x48.npz")["labels"].astype(np.uint64)
    segs = np.unique(labels)[1:]
    l2 = ids.encode_ids(
        2, np.tile(chunk, (segs.size, 1)), np.arange(first_segment, first_segment + segs.size), BITS
    )
    lut = dict(zip(segs.tolist(), l2.tolist(), strict=True))
    l2_labels = np.vectorize(lambda v: lut.get(v, 0), otypes=[np.uint64])(labels)
    return compute_features(l2_labels, tuple(float(r) for r in res))


@pytest.fixture(scope="module")
def rows(bigtable_emulator, tmp_path_factory):
    instance = bigtable_instance(PROJECT, "inst", admin=True)
    current = create_cache_table(instance, "rows_current")
    legacy = create_cache_table(instance, "rows_legacy")
    config = {
        "bigtable": {"project": PROJECT, "instance": "inst"},
        "virtual_tables": {"pinky_public": {"table_id": "pinky"}},
        "datasets": {
            "pinky": dataset_entry("rows_current"),
            "pinky_float": dataset_entry("rows_current", resolution=[4.5, 4.5, 40.0]),
            "pinky_legacy": dataset_entry("rows_legacy", row_format="legacy_nm"),
        },
    }
    cfg = parse_config(config)

    upstream = crop_features((3, 5, 2), 1)  # written by the existing service's worker
    write_upstream_rows(current, upstream_features(upstream))
    ours = crop_features((4, 5, 2), 1)  # written by l2cache, with lineage
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    CacheStore(current, cfg.dataset("pinky")).write_features(
        ours, Lineage("run-rows", cell_timestamp=ts)
    )
    placeholder = int(ids.encode_ids(2, [[3, 5, 2]], 9_000, BITS)[0])
    placeholder_bytes = write_placeholder(current, placeholder)

    # pre-2022 rows: size already nm^3, rep_coord absolute nm in u64[3]
    old_ids = ids.encode_ids(2, [[7, 1, 1]] * 3, [1, 2, 3], BITS)
    old = {"l2id": old_ids}
    old_values = {
        "size_nm3": [np.uint32(1_024_000), np.uint32(4_096_000), np.uint32(10_240)],
        "area_nm2": [np.uint32(5_000), np.uint32(9_000), np.uint32(300)],
        "max_dt_nm": [np.uint16(40), np.uint16(80), np.uint16(16)],
        "mean_dt_nm": [np.float16(12.5), np.float16(30.25), np.float16(8.0)],
        "chunk_intersect_count": [np.zeros((2, 3), np.uint16)] * 3,
        "pca": [np.eye(3, dtype=np.float16)] * 2 + [np.zeros((0, 3), np.float16)],
        "pca_val": [np.array([3.0, 2.0, 1.0], np.float32)] * 2 + [np.zeros(0, np.float32)],
    }
    old.update(old_values)
    old["rep_coord_nm"] = [np.array([16000, 32000, 12000], np.uint64) + i for i in range(3)]
    legacy_attr = dict(UPSTREAM)
    from kvdbclient.attributes import _Attribute
    from kvdbclient.serializers import NumPyArray

    legacy_attr["rep_coord_nm"] = _Attribute(
        key=b"rep_coord_nm", family_id="0", serializer=NumPyArray(dtype=np.dtype("<u8"))
    )
    batch = []
    for i, node in enumerate(old_ids.tolist()):
        row = legacy.direct_row(b"%020d" % node)
        for name, attr in legacy_attr.items():
            row.set_cell("0", attr.key, attr.serialize(old[name][i]))
        batch.append(row)
    assert all(s.code == 0 for s in legacy.mutate_rows(batch))
    ours_in_legacy = crop_features((6, 1, 1), 1)
    CacheStore(legacy, cfg.dataset("pinky_legacy")).write_features(
        ours_in_legacy, Lineage("run-rows", cell_timestamp=ts)
    )

    with lookup_client(config, tmp_path_factory.mktemp("rows")) as client:
        yield {
            "client": client,
            "upstream": upstream,
            "ours": ours,
            "placeholder": placeholder,
            "placeholder_bytes": placeholder_bytes,
            "old_ids": old_ids,
            "old": old_values,
            "ours_in_legacy": ours_in_legacy,
            "current": CacheStore(current, cfg.dataset("pinky")),
            "legacy": CacheStore(legacy, cfg.dataset("pinky_legacy")),
        }


def lookup(rows, table, l2ids, **params):
    r = rows["client"].post(
        URL.format(table), data=json.dumps({"l2_ids": [int(v) for v in l2ids]}), query_string=params
    )
    assert r.status_code == 200, r.get_data()
    return r


def expected(rows, l2ids, resolution=(16, 16, 40), names=None, int64_as_str=False):
    l2ids = [int(v) for v in l2ids]
    raw = rows["current"].read_raw(l2ids)
    cells = {k: v.get("0", {}) for k, v in raw.items()}
    return upstream_json(
        cells,
        l2ids,
        list(resolution),
        [1000, 2000, 300],
        [96, 96, 48],
        LAYER_BITS,
        attribute_names=names,
        int64_as_str=int64_as_str,
    )


def test_placeholder_is_what_the_existing_worker_writes(rows):
    assert rows["placeholder_bytes"] == b"\x00" * 8  # np.uint64(0) through a u32 serializer


@pytest.mark.parametrize("int64_as_str", [False, True])
def test_every_row_served_as_the_existing_frontend_serves_it(rows, int64_as_str):
    missing = int(ids.encode_ids(2, [[3, 5, 2]], 9_999, BITS)[0])
    query = [*rows["upstream"]["l2id"], *rows["ours"]["l2id"], rows["placeholder"], missing]
    r = lookup(rows, "pinky", query, int64_as_str=str(int64_as_str).lower())
    got = r.get_json()
    assert_same_json(got, expected(rows, query, int64_as_str=int64_as_str))
    # spot checks in plain words: a voxel count times 16*16*40, nm floats for rep_coord
    first = str(int(rows["upstream"]["l2id"][0]))
    size = int(rows["upstream"]["size_nm3"][0]) * 16 * 16 * 40
    assert got[first]["size_nm3"] == (str(size) if int64_as_str else size)
    rep = (rows["upstream"]["rep_coord_nm"][0] + [1000 + 3 * 96, 2000 + 5 * 96, 300 + 2 * 48]) * [
        16,
        16,
        40,
    ]
    assert got[first]["rep_coord_nm"] == [float(v) for v in rep]
    # the placeholder: {"size_nm3": 0}, present, so not counted missing (not re-queued)
    assert got[str(rows["placeholder"])] == {"size_nm3": "0" if int64_as_str else 0}
    assert got[str(missing)] == {}
    assert r.headers["X-L2Cache-Missing-Ids"] == "1"


def test_rows_with_and_without_lineage_are_served_alike(rows):
    """Same features written by the existing worker and by l2cache: same answer."""
    a = lookup(rows, "pinky", rows["upstream"]["l2id"]).get_json()
    b = lookup(rows, "pinky", rows["ours"]["l2id"]).get_json()
    strip = [
        [{k: v for k, v in entry.items() if k != "rep_coord_nm"} for entry in answer.values()]
        for answer in (a, b)
    ]
    assert strip[0] == strip[1]
    assert len(a) == len(b) > 10


def test_attribute_subsets_and_placeholders_under_a_column_filter(rows):
    query = [*rows["upstream"]["l2id"][:5], rows["placeholder"]]
    for names in (["size_nm3"], ["rep_coord_nm", "pca"], ["pca_val", "mean_dt_nm", "area_nm2"]):
        r = lookup(rows, "pinky", query, attribute_names=",".join(names))
        assert_same_json(r.get_json(), expected(rows, query, names=names))
    # upstream reads the placeholder row with a rep_coord filter as absent -> re-queued
    r = lookup(rows, "pinky", [rows["placeholder"]], attribute_names="rep_coord_nm")
    assert r.get_json() == {str(rows["placeholder"]): {}}
    assert r.headers["X-L2Cache-Missing-Ids"] == "1"


def test_float_resolution_gives_float_sizes_as_upstream(rows):
    query = rows["upstream"]["l2id"][:8]
    got = lookup(rows, "pinky_float", query, int64_as_str="true").get_json()
    assert_same_json(got, expected(rows, query, resolution=(4.5, 4.5, 40.0), int64_as_str=True))
    assert all(isinstance(v["size_nm3"], float) for v in got.values())


def test_virtual_table_serves_its_real_table(rows):
    query = rows["upstream"]["l2id"][:6]
    assert lookup(rows, "pinky_public", query).get_json() == lookup(rows, "pinky", query).get_json()


def test_legacy_format_only_where_the_map_says_so(rows):
    old_ids = rows["old_ids"].tolist()
    got = lookup(rows, "pinky_legacy", old_ids, int64_as_str="true").get_json()
    first = got[str(old_ids[0])]
    assert first["size_nm3"] == 1_024_000  # as stored, a uint32: not stringified
    assert first["rep_coord_nm"] == ["16000", "32000", "12000"]  # uint64: stringified
    assert first["mean_dt_nm"] == 12.5 and first["pca_val"] == [3.0, 2.0, 1.0]
    assert "pca" not in got[str(old_ids[2])]  # empty arrays are left out
    plain = lookup(rows, "pinky_legacy", old_ids).get_json()
    assert plain[str(old_ids[1])]["rep_coord_nm"] == [16001, 32001, 12001]
    # rows l2cache wrote into the legacy table are served in the current format
    mine = rows["ours_in_legacy"]["l2id"][:5].tolist()
    in_legacy = lookup(rows, "pinky_legacy", mine).get_json()
    raw = rows["legacy"].read_raw(mine)
    cells = {k: v.get("0", {}) for k, v in raw.items()}
    oracle = upstream_json(cells, mine, [16, 16, 40], [1000, 2000, 300], [96, 96, 48], LAYER_BITS)
    assert_same_json(in_legacy, oracle)


def test_attribute_metadata_and_table_mapping_as_upstream(rows):
    meta = rows["client"].get("/l2cache/api/v1/attribute_metadata").get_json()
    assert meta == {name: str(attr.serializer.basetype) for name, attr in UPSTREAM.items()}
    mapping = rows["client"].get("/l2cache/api/v1/table_mapping").get_json()
    assert mapping == {
        "pinky": {"cv_path": "file:///nowhere/sv", "l2cache_id": "rows_current"},
        "pinky_float": {"cv_path": "file:///nowhere/sv", "l2cache_id": "rows_current"},
        "pinky_legacy": {"cv_path": "file:///nowhere/sv", "l2cache_id": "rows_legacy"},
    }
    for path in ("/l2cache/", "/l2cache/index", "/l2cache/api/v1/", "/l2cache/api/v1/index"):
        r = rows["client"].get(path)
        assert r.status_code == 200 and b"l2cache" in r.get_data()
