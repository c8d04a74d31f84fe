"""ReloadingMap: the functions' dataset map, read again only when its file changes."""

from __future__ import annotations

import logging

import pytest
import yaml

from l2cache.config import ConfigError, ReloadingMap


def _map(*datasets: str) -> dict:
    entry = {
        "segmentation": "file:///nowhere/sv",
        "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "t"},
        "cache_table_id": "c",
        "resolution": [8, 8, 40],
        "voxel_offset": [0, 0, 0],
        "chunk_size": [64, 64, 64],
        "spatial_bits": {1: 10, 2: 10},
    }
    return {
        "bigtable": {"project": "p", "instance": "i"},
        "datasets": dict.fromkeys(datasets, entry),
    }


def test_the_map_is_read_again_when_the_file_changes_and_only_then(tmp_path, monkeypatch):
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(_map("a")))
    monkeypatch.setenv("L2CACHE_CONFIG", str(path))
    maps = ReloadingMap()
    first = maps.get()
    assert maps.get() is first  # unchanged: the same object, nothing parsed again
    path.write_text(yaml.safe_dump(_map("a", "b")))
    assert sorted(maps.get().datasets) == ["a", "b"]


def test_a_broken_edit_keeps_the_last_good_map_until_it_is_fixed(tmp_path, caplog):
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(_map("a")))
    maps = ReloadingMap(path)
    good = maps.get()
    path.write_text("datasets: [unclosed")
    with caplog.at_level(logging.ERROR):
        assert maps.get() is good
    assert "keeping the previous dataset map" in caplog.text
    path.unlink()
    assert maps.get() is good  # gone (being replaced): the last good map still serves
    path.write_text(yaml.safe_dump(_map("a", "c")))
    assert sorted(maps.get().datasets) == ["a", "c"]


def test_the_first_read_fails_as_load_config_does(tmp_path):
    with pytest.raises(ConfigError, match="cannot read dataset map"):
        ReloadingMap(tmp_path / "missing.yaml").get()
