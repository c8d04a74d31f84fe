"""What every stored feature row says about where it came from.

A row's ``lineage`` family holds the run id (required: the store refuses a write
without one) and, next to it, the parameter-set hash, code revision and the checksum
of the chunk input the values were computed from. The run's own row (see
``l2cache.runs``) holds the rest: source paths, graph timestamp, region, trigger.

Cell versions: every cell of one run is written at the run's own timestamp, so a
retried task overwrites the same version (idempotent, byte-identical) and a bad run
can be rolled back by deleting exactly that version.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
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

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ValueError("a feature write needs a run id (lineage.run)")

    def columns(self) -> dict[bytes, bytes]:
        """Column qualifier -> value for the lineage family; empty values omitted."""
        cols = {
            b"run": self.run_id.encode(),
            b"params": self.params_hash.encode(),
            b"code": self.code_revision.encode(),
            b"input": self.input_checksum.encode(),
        }
        return {k: v for k, v in cols.items() if v}


def params_hash(params: dict[str, Any]) -> str:
    """Stable short hash of a parameter set (canonical JSON, sorted keys)."""
    canonical = json.dumps(
        {"algorithm": FEATURE_ALGORITHM_VERSION, **params}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def code_revision() -> str:
    """Code revision: ``L2CACHE_REVISION`` (set at deploy time) or the git HEAD here."""
    env = os.environ.get("L2CACHE_REVISION")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> datetime:
    """Timezone-aware now; Bigtable cell timestamps have millisecond precision."""
    now = datetime.now(UTC)
    return now.replace(microsecond=(now.microsecond // 1000) * 1000)
