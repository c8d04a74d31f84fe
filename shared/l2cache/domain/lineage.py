"""What every stored feature row says about where it came from.

A row's ``lineage`` family holds the run id (required: the store refuses a write
without one) and, next to it, the parameter-set hash, code revision and the checksum
of the chunk input the values were computed from. When that input had orphan or ghost
supervoxels (background, see ``l2cache.compute``), the ``input`` value carries their
counts after the checksum: ``<checksum>;orphan_sv=1,orphan_voxels=1,ghost_sv=0``
(:func:`parse_input`); a clean chunk's value is the bare checksum, as before. The run's own row (see
``l2cache.store.ledger``) holds the rest: source paths, graph timestamp, region, trigger.

Cell versions: every cell of one run is written at the run's own timestamp, so a
retried task overwrites the same version (idempotent, byte-identical) and a bad run
can be rolled back by deleting exactly that version.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

# Bumped whenever the feature semantics change: part of the parameter-set hash, so
# values from different algorithms are never mistaken for each other.
FEATURE_ALGORITHM_VERSION = "features-v1"


@dataclass(frozen=True)
class Lineage:
    """Lineage columns written with every feature row (family ``lineage``)."""

    run_id: str
    params_hash: str = ""
    code_revision: str = ""
    input_checksum: str = ""
    cell_timestamp: datetime | None = None
    input_counts: tuple[tuple[str, int], ...] = ()  # orphan/ghost counts of the input

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ValueError("a feature write needs a run id (lineage.run)")

    def columns(self) -> dict[bytes, bytes]:
        """Column qualifier -> value for the lineage family; empty values omitted."""
        cols = {
            b"run": self.run_id.encode(),
            b"params": self.params_hash.encode(),
            b"code": self.code_revision.encode(),
            b"input": input_value(self.input_checksum, dict(self.input_counts)).encode(),
        }
        return {k: v for k, v in cols.items() if v}


def input_value(checksum: str, counts: dict[str, int]) -> str:
    """The ``lineage:input`` text: the checksum, then the counts when any is non-zero
    (no new column per row: one value a few bytes longer, only for imperfect input)."""
    if not checksum or not any(counts.values()):
        return checksum
    return checksum + ";" + ",".join(f"{k}={int(v)}" for k, v in counts.items())


def parse_input(value: str) -> tuple[str, dict[str, int]]:
    """(checksum, counts) of a ``lineage:input`` value; counts empty for a clean input."""
    checksum, _, rest = value.partition(";")
    counts = {}
    for item in filter(None, rest.split(",")):
        key, _, number = item.partition("=")
        counts[key] = int(number)
    return checksum, counts


def params_hash(params: dict[str, Any]) -> str:
    """Stable short hash of a parameter set (canonical JSON, sorted keys)."""
    canonical = json.dumps(
        {"algorithm": FEATURE_ALGORITHM_VERSION, **params}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


REVISION_FILE = "REVISION"  # written into the package by the deploy archive builder
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # l2cache/, where the archive puts it


@lru_cache(maxsize=1)
def code_revision() -> str:
    """The revision of the code running here: what every cell's ``lineage:code`` records.

    A deployed function reads the ``REVISION`` file the archive builder wrote into the
    package (the commit it was built from, and whether the tree had uncommitted
    changes); a checkout asks git. Never an environment variable: a value set by hand
    (or a stack name) could credit cells to code that did not compute them.
    Format: 12 hex digits of the commit, ``-dirty`` appended for uncommitted changes.
    """
    packaged = PACKAGE_ROOT / REVISION_FILE
    if packaged.exists():
        info = json.loads(packaged.read_text())
        return format_revision(info["commit"], bool(info.get("dirty")))
    commit, dirty = git_revision(PACKAGE_ROOT)
    return format_revision(commit, dirty) if commit else "unknown"


def format_revision(commit: str, dirty: bool) -> str:
    """The ``lineage:code`` form: 12 hex digits, ``-dirty`` for uncommitted changes."""
    return f"{commit[:12]}{'-dirty' if dirty else ''}"


def git_revision(path: Path, paths: tuple[str, ...] = ()) -> tuple[str | None, bool]:
    """(commit, dirty) of the git checkout holding ``path``; (None, False) outside one.

    ``dirty`` is true when tracked files (under ``paths``, if given) differ from the
    commit: the code that runs is then not exactly the commit's.
    """

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=path, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    except (OSError, subprocess.SubprocessError):
        return None, False
    return (commit or None), bool(status)


def utc_now() -> datetime:
    """Timezone-aware now; Bigtable cell timestamps have millisecond precision."""
    now = datetime.now(UTC)
    return now.replace(microsecond=(now.microsecond // 1000) * 1000)
