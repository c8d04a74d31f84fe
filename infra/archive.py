"""Deterministic deploy archives: what a function runs, and nothing else.

Layout at the archive root (what the Python buildpack of Cloud Functions gen2 expects):

- ``main.py``: the function's entry point (``functions/<name>/main.py``);
- ``requirements.txt``: the function's lock (``make lock``: every package pinned, with
  hashes), so the deployed build installs exactly what the deployed-mode test installs;
- ``l2cache/``: the production core (``shared/l2cache``, ``*.py`` and ``py.typed``), vendored
  so ``import l2cache`` works without installing the repository; the CLI, local stack and
  dataset builder (``tools/``) are not in it;
- ``l2cache/REVISION``: ``{"commit", "dirty"}`` of the checkout it was built from, which
  ``l2cache.lineage.code_revision()`` reads: every cell the function writes names this code;
- ``datasets.yaml``: the dataset map with every dataset's geometry resolved here, at build
  time (resolution, voxel offset, chunk size, volume size, spatial bits), so a function
  never reads a segmentation's info at start (lookup has no segmentation access).

Entries are sorted and timestamped 1980-01-01, so the archive's hash changes only when
content does (a new commit changes ``REVISION``, hence every archive: each commit's code
is deployed as itself).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import yaml

from l2cache.config import load_config, parse_config
from l2cache.lineage import REVISION_FILE, git_revision

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = REPO / "functions"
PACKAGE = REPO / "shared" / "l2cache"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
REVISION_PATHS = ("shared", "functions")  # what the archives are built from


class ArchiveError(RuntimeError):
    """The archive cannot name or describe the code it would deploy."""


def function_names() -> list[str]:
    return sorted(p.name for p in FUNCTIONS.iterdir() if (p / "main.py").exists())


def package_files() -> list[Path]:
    """The core package's source files (no caches, no compiled kernels)."""
    return [
        p
        for p in sorted(PACKAGE.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed")
    ]


def revision(files: list[Path]) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the checkout: dirty when tracked files under shared/ or
    functions/ differ from the commit, or when a file going into the archive is not
    tracked at all (its content is in no commit)."""
    commit, dirty = git_revision(REPO, REVISION_PATHS)
    if not commit:
        raise ArchiveError(f"{REPO} is not a git checkout: the archive could not name its code")
    tracked = set(
        subprocess.run(
            ["git", "ls-files", "-z", "--", *REVISION_PATHS],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout.split(b"\0")
    )
    untracked = [f for f in files if f.relative_to(REPO).as_posix().encode() not in tracked]
    return {"commit": commit, "dirty": bool(dirty or untracked)}


def _geometry(ds) -> dict[str, Any]:
    """A dataset's resolved geometry as YAML values: ints stay ints (the resolution's
    YAML type is what ``integral_resolution`` is derived from)."""
    number = int if ds.integral_resolution else float
    out: dict[str, Any] = {
        "resolution": [number(v) for v in ds.resolution],
        "voxel_offset": [int(v) for v in ds.voxel_offset],
        "chunk_size": [int(v) for v in ds.chunk_size],
        "spatial_bits": {int(k): int(v) for k, v in ds.spatial_bits.to_mapping().items()},
    }
    if ds.volume_size is not None:
        out["volume_size"] = [int(v) for v in ds.volume_size]
    return out


def resolved_dataset_map(datasets_file: Path) -> bytes:
    """The dataset map with full geometry for every dataset, read (where the map leaves
    it out) from the segmentation info now, by the deployer, who can read it."""
    datasets_file = Path(datasets_file)
    raw = yaml.safe_load(datasets_file.read_text())
    cfg = load_config(datasets_file)  # reads missing geometry from the segmentation info
    for name, ds in cfg.datasets.items():
        raw["datasets"][name] = {**raw["datasets"][name], **_geometry(ds)}
    text = yaml.safe_dump(raw, sort_keys=True)
    again = parse_config(yaml.safe_load(text), source=f"{datasets_file} (resolved)")
    if again.datasets != cfg.datasets:  # the function must see exactly what was resolved
        raise ArchiveError(f"{datasets_file}: resolved dataset map does not round-trip")
    return text.encode()


def archive_entries(name: str, datasets_file: Path) -> dict[str, bytes]:
    """Archive path -> bytes for one function."""
    fn = FUNCTIONS / name
    files = package_files()
    entries = {
        "main.py": (fn / "main.py").read_bytes(),
        "requirements.txt": (fn / "requirements.txt").read_bytes(),
        "datasets.yaml": resolved_dataset_map(datasets_file),
    }
    for path in files:
        entries[f"l2cache/{path.relative_to(PACKAGE).as_posix()}"] = path.read_bytes()
    rev = revision([fn / "main.py", fn / "requirements.txt", *files])
    entries[f"l2cache/{REVISION_FILE}"] = json.dumps(rev, sort_keys=True).encode()
    return entries


def build_archive(name: str, datasets_file: Path, out_dir: Path) -> tuple[Path, str]:
    """Write ``<out_dir>/<name>.zip``; returns its path and sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in sorted(archive_entries(name, datasets_file).items()):
            info = zipfile.ZipInfo(arcname, date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()
