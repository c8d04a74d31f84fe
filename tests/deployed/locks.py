"""Read the per-function locks (``functions/<name>/requirements.txt``) without installing.

Shared by the lock test and the deployed-mode test: a lock is the file the deploy archive
ships, so what it pins is exactly what a deployed function runs.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FUNCTIONS = REPO / "functions"
_REQ = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(==|===|>=|<=|~=|!=|>|<)?\s*([^\s;\\]*)"
)


def normalize(name: str) -> str:
    """PEP 503 name normalization (``cloud_volume`` == ``cloud-volume``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def logical_lines(text: str) -> list[str]:
    """Requirement lines with ``\\`` continuations joined and comments dropped."""
    joined = text.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def parse(text: str) -> dict[str, tuple[str, str, list[str]]]:
    """normalized name -> (operator, version, hashes) of every requirement."""
    reqs = {}
    for line in logical_lines(text):
        m = _REQ.match(line)
        if not m:
            raise ValueError(f"unparseable requirement line: {line!r}")
        hashes = re.findall(r"--hash=(\S+)", line)
        reqs[normalize(m.group(1))] = (m.group(3) or "", m.group(4), hashes)
    return reqs


def lock(name: str) -> dict[str, tuple[str, str, list[str]]]:
    return parse((FUNCTIONS / name / "requirements.txt").read_text())


def function_names() -> list[str]:
    return sorted(p.name for p in FUNCTIONS.iterdir() if (p / "main.py").exists())


def requirements_of(package: str, version: str) -> set[str]:
    """Normalized names ``package`` requires at ``version`` with no extras on this platform
    (Linux, Python 3.11, as deployed): what ``pip install`` resolves for it and ``pip check``
    demands. Read from the installed metadata of the repository's venv, whose pins the locks
    share (``test_lock_agrees_with_the_repository_pins``); a different installed version is
    an error, not a guess."""
    from importlib import metadata

    from packaging.requirements import Requirement

    dist = metadata.distribution(package)
    if normalize(dist.metadata["Name"]) != package or dist.version != version:
        raise LookupError(f"{package}=={version} is not what .venv has ({dist.version})")
    out = set()
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.add(normalize(req.name))
    return out
