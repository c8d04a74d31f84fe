"""The dataset map: valid files load, bad ones say exactly what is wrong, info fills gaps."""

import numpy as np
import pytest
import yaml
from cloudvolume import CloudVolume

from l2cache.config import ConfigError, UnknownDatasetError, load_config, parse_config

BASE = {
    "bigtable": {"project": "p", "instance": "i"},
    "datasets": {
        "ds": {
            "segmentation": "file:///x",
            "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "ds"},
            "cache_table_id": "cache_ds",
            "resolution": [8, 8, 40],
            "voxel_offset": [1, 2, 3],
            "chunk_size": [256, 256, 512],
            "spatial_bits": {"1": 10, "2": 10},
        }
    },
}


def with_dataset(**changes):
    entry = {**BASE["datasets"]["ds"], **changes}
    return {**BASE, "datasets": {"ds": entry}}


def test_valid_map_loads_from_env(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    monkeypatch.setenv("L2CACHE_CONFIG", str(path))
    cfg = load_config()
    ds = cfg.dataset("ds")
    assert ds.resolution == (8.0, 8.0, 40.0) and ds.chunk_size == (256, 256, 512)
    assert ds.spatial_bits.table[2] == 10 and ds.voxel_volume_nm3 == 2560
    assert cfg.table_mapping() == {"ds": "cache_ds"}
    with pytest.raises(UnknownDatasetError, match="known: ds"):
        cfg.dataset("other")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"datasets": BASE["datasets"]}, "missing section 'bigtable'"),
        ({**BASE, "datasets": ["ds"]}, "'datasets' must map"),
        (with_dataset(graph={"kind": "sql"}), "graph.kind"),
        (with_dataset(graph={"kind": "graphene"}), "needs url"),
        (with_dataset(resolution=[8, 8]), "resolution must be a list of 3"),
        (with_dataset(resolution=[8, 0, 40]), "resolution must be positive"),
        (with_dataset(spatial_bits={"1": 10}), "no entry for layer 2"),
        (with_dataset(spatial_bits={"2": 30}), "spatial_bits"),
        ({**BASE, "max_ids_per_request": 0}, "max_ids_per_request"),
    ],
)
def test_bad_maps_are_explained(raw, words):
    with pytest.raises(ConfigError, match=words):
        parse_config(raw)


def test_missing_file_and_bad_yaml(tmp_path, monkeypatch):
    monkeypatch.delenv("L2CACHE_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="L2CACHE_CONFIG"):
        load_config()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_geometry_is_read_from_the_segmentation_info(tmp_path):
    info = CloudVolume.create_new_info(
        num_channels=1,
        layer_type="segmentation",
        data_type="uint64",
        encoding="raw",
        resolution=[16, 16, 40],
        voxel_offset=[10, 20, 30],
        volume_size=[64, 64, 32],
        chunk_size=[32, 32, 16],
    )
    info["graph"] = {"chunk_size": [32, 32, 16], "spatial_bit_masks": {"1": 10, "2": 10}}
    cv = CloudVolume(f"file://{tmp_path}/seg", info=info)
    cv.commit_info()
    cv[10:74, 20:84, 30:62] = np.zeros((64, 64, 32), dtype=np.uint64)
    entry = {
        k: v
        for k, v in BASE["datasets"]["ds"].items()
        if k not in ("resolution", "voxel_offset", "chunk_size", "spatial_bits")
    }
    entry["segmentation"] = f"file://{tmp_path}/seg"
    ds = parse_config({**BASE, "datasets": {"ds": entry}}).dataset("ds")
    assert ds.resolution == (16.0, 16.0, 40.0)
    assert ds.voxel_offset == (10, 20, 30)
    assert ds.chunk_size == (32, 32, 16)
    assert ds.volume_size == (64, 64, 32)
    assert ds.spatial_bits.table[2] == 10
