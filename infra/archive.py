"""Deterministic deploy archives: what a function runs, and nothing else.

Layout at the archive root (what the Python buildpack of Cloud Functions gen2 expects):

- ``main.py``: the function's entry point (``functions/<name>/main.py``);
- ``requirements.txt``: the function's lock (``make lock``: every package pinned, with
  hashes), so the deployed build installs exactly what the deployed-mode test installs;
- ``l2cache/``: the modules of the cloud core (``shared/l2cache``) that this function
  imports, found by following its imports from ``main.py`` (module level and inside
  functions), with their packages' ``__init__.py`` and ``py.typed``: the lookup's archive
  has no feature engine, and no archive has the operations package (``ops/``) or the dev
  tools (``tools/``);
- ``l2cache/REVISION``: ``{"commit", "dirty"}`` of the checkout it was built from, which
  ``l2cache.domain.lineage.code_revision()`` reads: every cell the function writes names this code;
- ``datasets.yaml``: the dataset map with every dataset's geometry resolved here, at build
  time (resolution, voxel offset, chunk size, volume size, spatial bits), so a function
  never reads a segmentation's info at start (lookup has no segmentation access).

Entries are sorted and timestamped 1980-01-01, so the archive's hash changes only when
content does (a new commit changes ``REVISION``, hence every archive: each commit's code
is deployed as itself).
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import yaml

from l2cache.config import DatasetConfig, load_config, parse_config
from l2cache.domain.lineage import REVISION_FILE, git_revision
from l2cache_ops.settings import check_sections

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = REPO / "functions"
PACKAGE = REPO / "shared" / "l2cache"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
REVISION_PATHS = ("shared", "functions")  # what the archives are built from


class ArchiveError(RuntimeError):
    """The archive cannot name or describe the code it would deploy."""


# A dataset's geometry as the YAML values written into the archived map.
Geometry = dict[str, list[int] | list[float] | dict[int, int]]


def function_names() -> list[str]:
    """The functions there is code to archive: every folder under ``functions/`` with a
    ``main.py``. The tests compare it with the functions the program declares, so a new
    function folder that no component deploys is caught before a deploy."""
    return sorted(p.name for p in FUNCTIONS.iterdir() if (p / "main.py").exists())


def _imported_names(path: Path) -> set[str]:
    """Every ``l2cache...`` module name ``path`` imports, at module level or inside a
    function (``from l2cache.a import b`` names both ``l2cache.a`` and ``l2cache.a.b``;
    only one of them is a module, which :func:`_module_file` decides)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "l2cache" or n.startswith("l2cache.")}


def _module_file(name: str) -> Path | None:
    """The source file of core module ``name`` (a package's ``__init__.py``), if any."""
    base = PACKAGE.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def package_files(main: Path) -> list[Path]:
    """The core files a function needs: every module reachable from its ``main.py``
    through imports, the ``__init__.py`` of each package on the way, and ``py.typed``."""
    seen: set[Path] = set()
    todo = [main]
    while todo:
        for name in _imported_names(todo.pop()):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # parent packages are imported first
                path = _module_file(".".join(parts[:depth]))
                if path is not None and path not in seen:
                    seen.add(path)
                    todo.append(path)
    return sorted(seen) + [PACKAGE / "py.typed"]


def revision(files: list[Path]) -> dict[str, str | bool]:
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


def _geometry(ds: DatasetConfig) -> Geometry:
    """A dataset's resolved geometry as YAML values: ints stay ints (the resolution's
    YAML type is what ``integral_resolution`` is derived from)."""
    number = int if ds.integral_resolution else float
    out: Geometry = {
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
    check_sections(cfg)  # the functions never read qc:/slo:, so they are checked here
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
    files = package_files(fn / "main.py")
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
    entries = archive_entries(name, datasets_file)  # refuses a bad map before any file
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in sorted(entries.items()):
            info = zipfile.ZipInfo(arcname, date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()
