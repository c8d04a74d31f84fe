"""Deploy archives: exactly what a function runs, byte-reproducible, geometry resolved.

The deployed-mode test (tests/deployed) runs these archives; this one checks their
contents without installing anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from l2cache.config import ConfigError, parse_config

from .harness import INFRA, stack_config

REPO = INFRA.parent


def loaded_core_files(name: str) -> set[str]:
    """The core files a fresh interpreter loads when it imports the function's main.py:
    the archive must hold exactly these (the core has no imports inside functions)."""
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('main', {str(REPO / 'functions' / name / 'main.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None) or ''\n"
        "    if m.__name__.split('.')[0] == 'l2cache': print(f)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    pkg = REPO / "shared" / "l2cache"
    return {f"l2cache/{Path(f).relative_to(pkg).as_posix()}" for f in out} | {"l2cache/py.typed"}


def test_each_archive_is_main_lock_core_revision_and_map(tmp_path):
    from archive import build_archive, function_names

    cfg = stack_config(tmp_path)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    for name in function_names():
        path, digest = build_archive(name, cfg.datasets_file, tmp_path / "a")
        again, digest2 = build_archive(name, cfg.datasets_file, tmp_path / "b")
        assert digest == digest2, "archives must be byte-reproducible"
        assert path.read_bytes() == again.read_bytes()
        zf = zipfile.ZipFile(path)
        names = set(zf.namelist())
        expected = {"main.py", "requirements.txt", "datasets.yaml", "l2cache/REVISION"}
        core = loaded_core_files(name)
        assert names == expected | core, names ^ (expected | core)
        engine = "l2cache/engine/features.py" in names
        assert engine is (name != "lookup"), "only the workers carry the feature engine"
        assert ("l2cache/serving/api.py" in names) is (name == "lookup")
        assert f"l2cache/handlers/{name}.py" in names
        assert not any(
            n.startswith(("l2cache_ops", "l2cache_tools")) or "__pycache__" in n for n in names
        )
        assert zf.read("main.py") == (REPO / "functions" / name / "main.py").read_bytes()
        # the lock, not a hand list: what the deployed-mode test installs
        lock = (REPO / "functions" / name / "requirements.txt").read_bytes()
        assert zf.read("requirements.txt") == lock
        assert b"pulumi" not in lock
        rev = json.loads(zf.read("l2cache/REVISION"))
        assert set(rev) == {"commit", "dirty"} and rev["commit"] == head
        assert isinstance(rev["dirty"], bool)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())


def test_archived_map_carries_every_datasets_geometry(tmp_path):
    from archive import build_archive

    cfg = stack_config(tmp_path)
    path, _ = build_archive("lookup", cfg.datasets_file, tmp_path / "a")
    archived = yaml.safe_load(zipfile.ZipFile(path).read("datasets.yaml"))
    minnie, pinky = archived["datasets"]["minnie"], archived["datasets"]["pinky"]
    for key in ("resolution", "voxel_offset", "chunk_size", "spatial_bits"):
        assert key in minnie and key in pinky
    assert minnie["resolution"] == [8, 8, 40] and all(type(v) is int for v in minnie["resolution"])
    assert pinky["resolution"] == [4.0, 4.0, 40.0]
    assert all(type(v) is float for v in pinky["resolution"])
    assert pinky["volume_size"] == [4096, 4096, 1024]
    assert archived["tasks"] == yaml.safe_load(cfg.datasets_file.read_text())["tasks"]
    # gs:// is never read: parsing needs nothing but the map
    parsed = parse_config(archived)
    assert parsed.datasets["minnie"].integral_resolution
    assert not parsed.datasets["pinky"].integral_resolution


def write_info(directory, resolution) -> str:
    directory.mkdir(parents=True)
    info = {
        "type": "segmentation",
        "data_type": "uint64",
        "num_channels": 1,
        "scales": [
            {
                "key": "s0",
                "resolution": resolution,
                "voxel_offset": [64, 128, 8],
                "size": [1024, 2048, 256],
                "chunk_sizes": [[64, 64, 64]],
                "encoding": "raw",
            }
        ],
        "graph": {"chunk_size": [128, 128, 64], "spatial_bit_masks": {"1": 10, "2": 10, "3": 9}},
    }
    (directory / "info").write_text(json.dumps(info))
    return f"file://{directory}"


MAP = """\
bigtable: {{project: proj, instance: l2cache}}
datasets:
  minnie:
    segmentation: {seg}
    graph: {{kind: bigtable, project: proj, instance: pcg, table_id: minnie}}
    cache_table_id: l2cache_minnie_v1
    row_format: legacy_nm
"""


@pytest.mark.parametrize("resolution", [[8, 8, 40], [7.5, 7.5, 40.0]])
def test_geometry_missing_from_the_map_is_read_from_the_info_at_build_time(tmp_path, resolution):
    from archive import build_archive

    seg = write_info(tmp_path / "seg", resolution)
    datasets_file = tmp_path / "datasets.yaml"
    datasets_file.write_text(MAP.format(seg=seg))
    path, _ = build_archive("lookup", datasets_file, tmp_path / "a")
    shutil.rmtree(tmp_path / "seg")  # a function has no segmentation access at start
    archived = yaml.safe_load(zipfile.ZipFile(path).read("datasets.yaml"))
    entry = archived["datasets"]["minnie"]
    assert entry["resolution"] == resolution
    assert [type(v) for v in entry["resolution"]] == [type(v) for v in resolution]
    assert entry["voxel_offset"] == [64, 128, 8]
    assert entry["volume_size"] == [1024, 2048, 256]
    assert entry["chunk_size"] == [128, 128, 64]
    assert entry["spatial_bits"] == {1: 10, 2: 10, 3: 9}
    assert entry["row_format"] == "legacy_nm"  # the rest of the entry is kept
    ds = parse_config(archived).datasets["minnie"]  # no info left to read
    assert ds.integral_resolution is all(type(v) is int for v in resolution)
    assert ds.spatial_bits.to_mapping() == {1: 10, 2: 10, 3: 9}


def test_unresolvable_geometry_stops_the_build(tmp_path):
    from archive import build_archive

    datasets_file = tmp_path / "datasets.yaml"
    datasets_file.write_text(MAP.format(seg=f"file://{tmp_path}/nothing-here"))
    with pytest.raises(ConfigError, match="segmentation info"):
        build_archive("lookup", datasets_file, tmp_path / "a")


def test_a_bad_operator_section_stops_the_build(tmp_path):
    """No function reads ``qc:``/``slo:``, so the deploy checks them: a typo is refused
    before any archive exists, not found later by the first QC run."""
    from archive import build_archive

    seg = write_info(tmp_path / "seg", [8, 8, 40])
    datasets_file = tmp_path / "datasets.yaml"
    datasets_file.write_text(MAP.format(seg=seg) + "qc: {min_coverage: 2}\n")
    with pytest.raises(ConfigError, match="min_coverage is a fraction"):
        build_archive("lookup", datasets_file, tmp_path / "a")
    assert not (tmp_path / "a").exists()
