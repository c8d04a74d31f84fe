"""Serve a function folder with functions-framework on 127.0.0.1, as Cloud Functions would.

The same ``main.py`` that is deployed runs here as a separate process (own process
group, stopped with it), so tests and the local stack exercise the real HTTP path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .emulators import HOST, Emulator, free_port, ready

REPO_ROOT = Path(__file__).resolve().parents[3]
FUNCTIONS_DIR = REPO_ROOT / "functions"


def start_function(
    name: str,
    env: dict[str, str],
    signature_type: str = "http",
    port: int | None = None,
    log_dir: Path | None = None,
    target: str | None = None,
) -> Emulator:
    """Start ``functions/<name>/main.py`` (target ``name`` unless given) on a free port."""
    source = FUNCTIONS_DIR / name / "main.py"
    if not source.exists():
        raise FileNotFoundError(source)
    port = port or free_port()
    binary = Path(sys.executable).with_name("functions-framework")
    cmd = [
        str(binary),
        "--target",
        target or name,
        "--source",
        str(source),
        "--signature-type",
        signature_type,
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    log_path = Path(log_dir) / f"function-{name}.log" if log_dir else None
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return ready(Emulator(f"function:{name}", port, proc, {}, log_path), 60)
