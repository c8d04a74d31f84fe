"""The cache table on the real Bigtable emulator: exact bytes, lineage, API units, legacy rows."""

from datetime import UTC, datetime

import numpy as np
import pytest
from kvdbclient.serializers import NumPyArray, NumPyValue

from l2cache.config import parse_config
from l2cache.domain import ids
from l2cache.domain.attributes import ATTRIBUTE_NAMES, BY_NAME
from l2cache.domain.lineage import Lineage
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.store.cache import CacheStore, create_cache_table

RES = (16.0, 16.0, 40.0)
CONFIG = {
    "bigtable": {"project": "test-project", "instance": "test-instance"},
    "datasets": {
        "ds": {
            "segmentation": "file:///nonexistent",
            "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "ds"},
            "cache_table_id": "cache_ds",
            "resolution": list(RES),
            "voxel_offset": [100, 200, 300],
            "chunk_size": [64, 64, 32],
            "spatial_bits": {1: 10, 2: 10, 3: 9},
        }
    },
}
DATASET = parse_config(CONFIG).dataset("ds")
TS = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def chunk_features(chunk_xyz=(3, 4, 5), seed=0):
    """Real engine output for a synthetic chunk whose ids are real layer-2 PCG ids."""
    rng = np.random.default_rng(seed)
    segs = np.arange(1, 9, dtype=np.uint64)
    l2 = ids.encode_ids(2, np.tile(chunk_xyz, (8, 1)), segs, DATASET.spatial_bits)
    labels = np.zeros((64, 64, 32), dtype=np.uint64)
    for i, node in enumerate(l2):
        x0, y0 = (i % 4) * 16, (i // 4) * 32
        labels[x0 : x0 + 14, y0 : y0 + 30, 2 : 2 + 4 * (i + 1)] = node
    labels[rng.random(labels.shape) < 0.01] = 0
    return compute_features(labels, RES)


@pytest.fixture(scope="module")
def store(bigtable_emulator):
    instance = bigtable_instance("test-project", "test-instance", admin=True)
    table = create_cache_table(instance, f"cache_{np.random.default_rng().integers(1e9)}")
    return CacheStore(table, DATASET)


def test_rows_hold_exact_bytes_and_lineage(store):
    feats = chunk_features()
    lineage = Lineage("run-1", params_hash="abc", code_revision="r1", cell_timestamp=TS)
    assert store.write_features(feats, lineage) == len(feats["l2id"])
    raw = store.read_raw(feats["l2id"])
    assert sorted(raw) == feats["l2id"].tolist()
    for i, node in enumerate(feats["l2id"].tolist()):
        row = raw[node]
        for name in ATTRIBUTE_NAMES:
            expected = feats[name][i].astype(BY_NAME[name].dtype).tobytes()
            if name in ("pca", "pca_val") and np.isnan(feats[name][i]).any():
                expected = b""
            assert row["0"][name.encode()] == expected, name
        assert set(row) == {"0"}  # family 0 only: what the existing service's rows hold
    lineage_cols = store.read_lineage(feats["l2id"])
    assert sorted(lineage_cols) == feats["l2id"].tolist()
    assert all(
        v == {b"run": b"run-1", b"params": b"abc", b"code": b"r1"} for v in lineage_cols.values()
    )


def test_rewrite_is_idempotent_same_version(store):
    feats = chunk_features(seed=1, chunk_xyz=(1, 1, 1))
    lineage = Lineage("run-2", cell_timestamp=TS)
    store.write_features(feats, lineage)
    first = store.read_raw(feats["l2id"])
    store.write_features(feats, lineage)
    assert store.read_raw(feats["l2id"]) == first
    key = ids.row_key(feats["l2id"][0])
    row = store.table.read_row(key)
    assert len(row.cells["0"][b"size_nm3"]) == 1  # one version, not two


def test_write_without_run_id_is_refused(store):
    with pytest.raises(ValueError, match="run id"):
        store.write_features(chunk_features(), Lineage(""))
    with pytest.raises(ValueError):
        store.write_features(chunk_features(), None)


def test_read_features_api_units(store):
    chunk = (3, 4, 5)
    feats = chunk_features(chunk_xyz=chunk, seed=2)
    store.write_features(feats, Lineage("run-3", cell_timestamp=TS))
    got = store.read_features(feats["l2id"])
    voxel = 16 * 16 * 40
    origin = np.array([100, 200, 300]) + np.array(chunk) * np.array([64, 64, 32])
    for i, node in enumerate(feats["l2id"].tolist()):
        entry = got[node]
        assert entry["size_nm3"] == int(feats["size_nm3"][i]) * voxel
        assert entry["area_nm2"] == int(feats["area_nm2"][i])
        assert entry["max_dt_nm"] == int(feats["max_dt_nm"][i])
        assert entry["mean_dt_nm"] == float(feats["mean_dt_nm"][i])
        expected_rep = ((feats["rep_coord_nm"][i] + origin) * np.array(RES)).tolist()
        assert entry["rep_coord_nm"] == expected_rep
        assert entry["chunk_intersect_count"] == feats["chunk_intersect_count"][i].tolist()
        if np.isnan(feats["pca_val"][i]).any():
            assert "pca" not in entry and "pca_val" not in entry
        else:
            assert entry["pca"] == feats["pca"][i].astype(np.float32).tolist()
            assert np.allclose(entry["pca_val"], feats["pca_val"][i])


def test_attribute_subset_missing_and_non_l2_ids(store):
    feats = chunk_features(chunk_xyz=(7, 7, 7), seed=3)
    store.write_features(feats, Lineage("run-4", cell_timestamp=TS))
    missing = int(ids.encode_ids(2, [[7, 7, 7]], 999, DATASET.spatial_bits)[0])
    layer3 = int(ids.encode_ids(3, [[1, 1, 1]], 5, DATASET.spatial_bits)[0])
    query = [*feats["l2id"].tolist(), missing, layer3]
    got = store.read_features(query, ["size_nm3", "max_dt_nm"])
    assert set(got) == set(feats["l2id"].tolist())
    assert all(set(v) == {"size_nm3", "max_dt_nm"} for v in got.values())
    with pytest.raises(KeyError):
        store.read_features(query, ["volume"])


def test_many_ids_are_read_in_concurrent_batches(store):
    spatial = DATASET.spatial_bits
    n = 12_000  # more than one read batch
    l2 = ids.encode_ids(2, np.tile([9, 9, 9], (n, 1)), np.arange(1, n + 1), spatial)
    feats = {"l2id": l2}
    for attr in BY_NAME.values():
        feats[attr.name] = np.ones((n, *attr.shape), dtype=attr.dtype)
    store.write_features(feats, Lineage("run-5", cell_timestamp=TS))
    got = store.read_features(l2, ["size_nm3"])
    assert len(got) == n
    assert {v["size_nm3"] for v in got.values()} == {16 * 16 * 40}


def test_pre_2022_rows_are_served_as_stored_only_where_the_map_says_legacy_nm(store):
    """Rows in the pre-2022 format (nm^3, absolute u64 nm), kvdbclient serializers, no
    lineage: served as stored by a ``row_format: legacy_nm`` dataset, while rows l2cache
    wrote into the same table (with lineage) keep the current format."""
    legacy_cfg = {
        **CONFIG,
        "datasets": {"ds": {**CONFIG["datasets"]["ds"], "row_format": "legacy_nm"}},
    }
    legacy = CacheStore(store.table, parse_config(legacy_cfg).dataset("ds"))
    u4, u2, f2, f4, u8 = (np.dtype(t).newbyteorder("L") for t in ("u4", "u2", "f2", "f4", "u8"))
    serializers = {
        "size_nm3": NumPyValue(dtype=u4),
        "area_nm2": NumPyValue(dtype=u4),
        "max_dt_nm": NumPyValue(dtype=u2),
        "mean_dt_nm": NumPyValue(dtype=f2),
        "rep_coord_nm": NumPyArray(dtype=u8),
        "chunk_intersect_count": NumPyArray(dtype=u2, shape=(-1, 3)),
        "pca": NumPyArray(dtype=f2, shape=(-1, 3)),
        "pca_val": NumPyArray(dtype=f4, shape=(-1,)),
    }
    node = int(ids.encode_ids(2, [[2, 2, 2]], 42, DATASET.spatial_bits)[0])
    values = {
        "size_nm3": np.uint32(4_096_000),  # the old service stored nm^3 already
        "area_nm2": np.uint32(123_456),
        "max_dt_nm": np.uint16(321),
        "mean_dt_nm": np.float16(87.5),
        "rep_coord_nm": np.array([1600, 3200, 4000], dtype=np.uint64),  # absolute nm
        "chunk_intersect_count": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint16),
        "pca": np.eye(3, dtype=np.float16),
        "pca_val": np.array([30.0, 20.0, 10.0], dtype=np.float32),
    }
    row = store.table.direct_row(ids.row_key(node))
    for name, value in values.items():
        row.set_cell("0", name.encode(), serializers[name].serialize(value))
    row.commit()
    got = legacy.read_features([node])[node]
    assert got["size_nm3"] == 4_096_000
    assert got["area_nm2"] == 123_456
    assert got["max_dt_nm"] == 321
    assert got["mean_dt_nm"] == 87.5
    assert got["rep_coord_nm"] == [1600, 3200, 4000]
    assert got["chunk_intersect_count"] == [[1, 2, 3], [4, 5, 6]]
    assert got["pca"] == np.eye(3).tolist()
    assert got["pca_val"] == [30.0, 20.0, 10.0]
    assert legacy.read_features([node], int64_as_str=True)[node]["rep_coord_nm"] == [
        "1600",
        "3200",
        "4000",
    ]
    # the same bytes in a current-format table: the 24-byte rep_coord is not a u16[3]
    assert "rep_coord_nm" not in store.read_features([node])[node]
    ours = chunk_features(chunk_xyz=(2, 2, 3), seed=7)
    store.write_features(ours, Lineage("run-legacy", cell_timestamp=TS))
    assert legacy.read_features(ours["l2id"]) == store.read_features(ours["l2id"])


def test_create_cache_table_sets_families_and_gc(bigtable_emulator):
    instance = bigtable_instance("test-project", "test-instance", admin=True)
    table = create_cache_table(instance, "cache_gc_check", max_versions=3)
    create_cache_table(instance, "cache_gc_check", max_versions=3)  # idempotent
    families = table.list_column_families()
    assert set(families) == {"0", "lineage"}
    assert families["0"].gc_rule.max_num_versions == 3
