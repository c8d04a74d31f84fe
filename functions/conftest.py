"""Fixtures for the unit tests beside each function entry point.

The three entry points are all called ``main.py``: the ``load_main`` fixture loads one
under a unique module name. The dataset map is a small YAML file with explicit geometry, so no
segmentation is read. Paths that reach Bigtable use the real Bigtable emulator
(``cbtemulator``, started once per session on a free loopback port, ~1 s), never a fake.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import yaml

PROJECT = "fn-test"
INSTANCE = "inst"
CACHE_TABLE = "cache_ds"
THEIR_CACHE_TABLE = "their_cache"
MAX_ATTEMPTS = 3
MAX_DELIVERIES = 4


def _load_main(function: str) -> ModuleType:
    path = Path(__file__).parent / function / "main.py"
    spec = importlib.util.spec_from_file_location(f"l2cache_function_{function}_main", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(table_id: str, cache_table_id: str, **extra) -> dict:
    return {
        "segmentation": "file:///nowhere/sv",
        "graph": {
            "kind": "bigtable",
            "project": PROJECT,
            "instance": INSTANCE,
            "table_id": table_id,
        },
        "cache_table_id": cache_table_id,
        "resolution": [16, 16, 40],
        "voxel_offset": [0, 0, 0],
        "chunk_size": [96, 96, 48],
        "spatial_bits": {1: 10, 2: 10, 3: 9},
        **extra,
    }


@pytest.fixture
def fn_map() -> dict:
    """A fresh dataset map (tests may change it, then write it with ``use_map``).

    Two datasets: ``ds`` (l2cache's own cache table) and ``theirs`` (an existing
    cache table another service owns: served, never written)."""
    return {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "tasks": {
            "project": PROJECT,
            "location": "here",
            "queue": "compute",
            "compute_url": "http://127.0.0.1:9/",  # nothing a test here enqueues
            "max_attempts": MAX_ATTEMPTS,
        },
        "pubsub": {"project": PROJECT, "max_delivery_attempts": MAX_DELIVERIES},
        "max_ids_per_request": 100,
        "datasets": {
            "ds": _dataset("ds", CACHE_TABLE),
            "theirs": _dataset("theirs", THEIR_CACHE_TABLE, existing_cache_table=True),
        },
    }


@pytest.fixture
def load_main():
    """``load_main("lookup")``: ``functions/lookup/main.py`` loaded afresh as a module of
    its own (the three entry points share a file name; a fresh load has empty state)."""
    return _load_main


@pytest.fixture
def use_map(tmp_path, monkeypatch):
    """``use_map(cfg)``: write ``cfg`` to ``tmp_path`` and name it by ``L2CACHE_CONFIG``
    for this test; returns the path."""

    def write(cfg: dict, name: str = "l2cache.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        monkeypatch.setenv("L2CACHE_CONFIG", str(path))
        return path

    return write


@pytest.fixture
def config_path(fn_map, use_map) -> Path:
    """The map of :func:`fn_map`, written and named by ``L2CACHE_CONFIG``."""
    return use_map(fn_map)


@pytest.fixture(scope="session")
def bigtable(bigtable_emulator):
    """The session's real Bigtable emulator with the runs table and ``ds``'s (empty)
    cache table; yields an admin instance handle."""
    from l2cache.gcp.bigtable import bigtable_instance
    from l2cache.store.cache import create_cache_table
    from l2cache.store.ledger import create_runs_table

    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    create_runs_table(instance)
    create_cache_table(instance, CACHE_TABLE)
    return instance
