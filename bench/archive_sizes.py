"""Deploy archive sizes of a checkout: zip bytes and the core modules each function carries.

Usage: ``.venv/bin/python bench/archive_sizes.py [REPO]`` (default: this checkout). For
an older commit: ``git worktree add /tmp/old REV`` and pass that path; the checkout's
own ``infra/archive.py`` and core are imported, so each commit is measured as it built.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import tempfile
import zipfile

FUNCTIONS = ("lookup", "compute_chunk", "on_edit")


def main() -> None:
    here = pathlib.Path(__file__).resolve().parents[1]
    repo = pathlib.Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else here
    sys.path[:0] = [str(repo / d) for d in ("infra", "shared", "ops", "tools")] + [str(repo)]
    for name in [m for m in sys.modules if m.startswith(("l2cache", "tests", "archive"))]:
        del sys.modules[name]
    archive = importlib.import_module("archive")
    datasets_yaml = importlib.import_module("tests.infra.harness").DATASETS_YAML
    tmp = pathlib.Path(tempfile.mkdtemp())
    datasets = tmp / "datasets.yaml"
    datasets.write_text(datasets_yaml)
    print(f"{'function':14s} {'zip_bytes':>10s} {'core_files':>10s} {'core_py_bytes':>13s}")
    for name in FUNCTIONS:
        path, _ = archive.build_archive(name, datasets, tmp / "out")
        core = [
            i
            for i in zipfile.ZipFile(path).infolist()
            if i.filename.startswith("l2cache/") and i.filename.endswith(".py")
        ]
        size = sum(i.file_size for i in core)
        print(f"{name:14s} {path.stat().st_size:>10,} {len(core):>10d} {size:>13,}")


if __name__ == "__main__":
    main()
