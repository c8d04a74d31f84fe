"""Serve a function folder with functions-framework on 127.0.0.1, as Cloud Functions would.

The same ``main.py`` that is deployed runs here as a separate process (own process
group, stopped with it), so tests and the local stack exercise the real HTTP path.
By default it runs from the repository with this interpreter; with a
:class:`FunctionRuntime` it runs as deployed: from an unpacked archive, with that
archive's own venv, exactly the given environment and read-only paths.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .emulators import HOST, Emulator, free_port, ready

REPO_ROOT = Path(__file__).resolve().parents[3]
FUNCTIONS_DIR = REPO_ROOT / "functions"


@dataclass(frozen=True)
class FunctionRuntime:
    """Run a function as deployed instead of from the repository.

    ``source`` holds ``main.py`` (the unpacked archive; also the working directory, as
    /workspace is in Cloud Functions), ``python`` is the interpreter of the venv built
    from that archive's requirements (its ``functions-framework`` is used), ``env`` is
    the whole environment (the caller's is not inherited), and ``readonly`` paths are
    mounted read-only and ``hidden`` ones emptied for the process (see
    :func:`readonly_command`).
    """

    source: Path
    python: Path
    env: Mapping[str, str]
    readonly: tuple[Path, ...] = field(default=())
    hidden: tuple[Path, ...] = field(default=())


def readonly_command(
    cmd: Sequence[str], paths: Sequence[Path], hidden: Sequence[Path] = ()
) -> list[str]:
    """``cmd`` in a private mount namespace where ``paths`` are read-only filesystems and
    ``hidden`` directories are replaced by an empty read-only tmpfs.

    A read-only *filesystem* (EROFS), as in Cloud Functions, not just missing write
    bits: root ignores those, and some libraries catch only PermissionError (CloudVolume
    creating ``~/.cloudvolume``), so only a real read-only mount reproduces the cloud.
    Hiding the repository proves nothing is found through repository paths.
    Needs util-linux ``unshare`` (root, or unprivileged user namespaces otherwise).
    """
    if not paths and not hidden:
        return list(cmd)
    tools = {t: shutil.which(t) for t in ("unshare", "mount", "sh")}
    missing = [t for t, path in tools.items() if not path]
    if missing:
        raise FileNotFoundError(f"read-only function sandbox needs {', '.join(missing)}")
    mount = tools["mount"]
    steps = ["set -e"]
    for path in paths:
        q = shlex.quote(str(path))
        steps.append(f"{mount} --bind {q} {q}; {mount} -o remount,bind,ro {q}")
    for path in hidden:
        steps.append(f"{mount} -t tmpfs -o ro,size=4k l2cache-hidden {shlex.quote(str(path))}")
    steps.append('exec "$@"')
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    return [tools["unshare"], *flags, tools["sh"], "-c", "; ".join(steps), "sh", *cmd]


def start_function(
    name: str,
    env: dict[str, str],
    signature_type: str = "http",
    port: int | None = None,
    log_dir: Path | None = None,
    target: str | None = None,
    runtime: FunctionRuntime | None = None,
) -> Emulator:
    """Start ``functions/<name>/main.py`` (target ``name`` unless given) on a free port.

    With ``runtime``, ``<runtime.source>/main.py`` under the runtime's interpreter, with
    ``{**runtime.env, **env}`` only (``env`` then carries just the emulator endpoints).
    """
    folder = runtime.source if runtime else FUNCTIONS_DIR / name
    source = folder / "main.py"
    if not source.exists():
        raise FileNotFoundError(source)
    port = port or free_port()
    python = Path(runtime.python) if runtime else Path(sys.executable)
    binary = python.with_name("functions-framework")  # not resolved: the venv's own
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
    if runtime:
        cmd = readonly_command(cmd, runtime.readonly, runtime.hidden)
    proc = subprocess.Popen(
        cmd,
        env={**runtime.env, **env} if runtime else {**os.environ, **env},
        cwd=runtime.source if runtime else None,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return ready(Emulator(f"function:{name}", port, proc, {}, log_path), 60)
