"""Deterministic deploy archives: ``functions/<name>`` + the vendored ``l2cache`` package.

Layout at the archive root (what the Python buildpack of Cloud Functions gen2 expects):
``main.py``, ``requirements.txt`` (third-party pins only), ``l2cache/`` (the shared
package, vendored so ``import l2cache`` works without installing the repo), and
``datasets.yaml`` (the dataset map; ``L2CACHE_CONFIG`` points at it). Entries are
sorted and timestamped 1980-01-01, so the archive's hash changes only when content does
and an unchanged function is not redeployed.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = REPO / "functions"
PACKAGE = REPO / "shared" / "l2cache"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def function_names() -> list[str]:
    return sorted(p.name for p in FUNCTIONS.iterdir() if (p / "main.py").exists())


def archive_entries(name: str, datasets_file: Path) -> dict[str, bytes]:
    """Archive path -> bytes for one function."""
    fn = FUNCTIONS / name
    entries = {
        "main.py": (fn / "main.py").read_bytes(),
        "requirements.txt": (fn / "requirements.txt").read_bytes(),
        "datasets.yaml": Path(datasets_file).read_bytes(),
    }
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".typed"):
            entries[f"l2cache/{path.relative_to(PACKAGE).as_posix()}"] = path.read_bytes()
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
