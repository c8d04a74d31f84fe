"""Turn infra's archives into functions that run as Cloud Functions would run them.

Shared by the deployed-mode test and ``bench/cold_start.py``. For each function:
infra's own ``build_archive`` (the bytes ``pulumi up`` uploads), unzipped into a
directory that is then read-only; a venv built from that archive's ``requirements.txt``
alone, installed as Cloud Functions' Python buildpack installs it (``pip install`` with
the buildpack's flags, so hash-checking mode, then its ``pip check``; cached by the lock's
hash, so repeated runs skip the install); and exactly infra's ``function_env()``, with
the cloud's fixed paths mapped to local ones:

- ``/workspace`` (where Cloud Functions unpacks the source) -> the unpack directory;
- ``/tmp`` (the only writable path there) -> a per-function writable directory, also
  ``TMPDIR``: a shared host /tmp would mix caches between runs and engineers;
- ``HOME`` -> an empty read-only directory; ``PATH`` -> the system's.

The local stack adds only what stands in for the cloud around the function: the emulator
endpoints (``*_EMULATOR_HOST``), ``PYTHONUNBUFFERED`` (logs) and, for the workers,
functions-framework's ``WORKERS``/``THREADS`` (processes x threads, in place of Cloud
Run's instances x per-instance concurrency).

The process sees the archive, its venv and HOME as read-only filesystems and the
repository as an empty directory (``FunctionRuntime.hidden``), so a write outside /tmp
or a read through a repository path fails as it would in the cloud.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from l2cache.domain.lineage import format_revision
from l2cache_tools.local.functions import FunctionRuntime

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def infra():
    """infra's ``archive`` and ``functions`` modules, imported as the Pulumi program
    imports them (infra/ on sys.path, as tests/infra does)."""
    if str(INFRA) not in sys.path:
        sys.path.insert(0, str(INFRA))
    import archive

    import functions as infra_functions

    if not hasattr(infra_functions, "function_env"):
        raise ImportError(f"'functions' resolved to {infra_functions!r}, not infra/functions.py")
    return archive, infra_functions


# The Cloud Functions Python buildpack's install of requirements.txt, flag for flag
# (GoogleCloudPlatform/buildpacks pkg/python/python.go: basePipInstallArgs, then
# compileBytecode, then CheckIncompatibleDependencies). A lock with ``--hash`` lines puts
# pip in hash-checking mode: every package pip resolves, dependencies included, must be in
# the file with ``==`` and a hash, or the build fails; and a dependency left out is a
# ``pip check`` failure, which fails the build too. uv is laxer on both (it installs an
# unlisted dependency unhashed), so the deployed-mode test installs with pip.
BUILDPACK_PIP_INSTALL = (
    "install",
    "--upgrade",
    "--upgrade-strategy",
    "only-if-needed",
    "--no-warn-script-location",
    "--no-warn-conflicts",
    "--force-reinstall",
    "--no-compile",
    "--disable-pip-version-check",
)
INSTALLER = "pip-buildpack-1"  # part of the venv cache key: a new recipe, a new venv


def install_as_the_buildpack(python: Path, requirements: Path) -> None:
    """Install ``requirements`` into the environment of ``python`` as the buildpack does.

    pip runs from this interpreter against ``python`` (``pip --python``), so the venv
    holds exactly the lock: no pip, no setuptools. Raises CalledProcessError (pip's
    output on stderr) when the buildpack would fail the build."""
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(
        [*pip, *BUILDPACK_PIP_INSTALL, "-q", "--requirement", str(requirements)], check=True
    )
    # deterministic, unchecked hash-based pycs, as the buildpack compiles them
    subprocess.run(
        [str(python), "-m", "compileall", "--invalidation-mode", "unchecked-hash", "-qq"]
        + [str(Path(python).parents[1])],
        check=False,  # exit 1 on a file that does not compile (test data in some wheels)
    )
    subprocess.run([*pip, "check"], check=True, stdout=subprocess.DEVNULL)


def venv_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "l2cache" / "deploy-venvs"


@dataclass(frozen=True)
class Venv:
    path: Path
    installed_now: bool
    seconds: float  # time spent creating it here (0 when reused)

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def function_venv(name: str, requirements: Path) -> Venv:
    """The venv for ``requirements`` (a lock): built once per lock content, interpreter
    and install recipe, under the user's cache, reused afterwards. A file lock serialises
    concurrent builders; a marker written last means a venv is complete."""
    lock = requirements.read_bytes()
    salt = (platform.python_version() + INSTALLER).encode()
    key = hashlib.sha256(lock + salt).hexdigest()[:16]
    venv = venv_cache_root() / f"{name}-{key}"
    marker = venv / ".l2cache-complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if marker.exists():
            return Venv(venv, False, 0.0)
        start = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
        install_as_the_buildpack(venv / "bin" / "python", requirements)
        marker.write_text(json.dumps({"lock_sha256": hashlib.sha256(lock).hexdigest()}))
        return Venv(venv, True, time.monotonic() - start)


def make_read_only(path: Path) -> None:
    """chmod -R a-w (the mount makes it a read-only filesystem as well)."""
    for root, dirs, files in os.walk(path):
        for entry in [*dirs, *files]:
            p = Path(root) / entry
            p.chmod(p.stat().st_mode & ~0o222)
    path.chmod(path.stat().st_mode & ~0o222)


def make_writable(path: Path) -> None:
    """Undo :func:`make_read_only` so the directory can be removed."""
    for root, dirs, _ in os.walk(path):
        Path(root).chmod(Path(root).stat().st_mode | 0o700)
        for d in dirs:
            (Path(root) / d).chmod((Path(root) / d).stat().st_mode | 0o700)


def sandbox_env(cloud_env: dict[str, str], source: Path, tmp: Path, home: Path) -> dict[str, str]:
    """infra's environment with /workspace and /tmp mapped to local directories."""
    _, infra_functions = infra()

    def local(value: str) -> str:
        for cloud, here in (
            (infra_functions.SOURCE_DIR, source),
            (infra_functions.WRITABLE_DIR, tmp),
        ):
            if value == cloud or value.startswith(cloud + "/"):
                return str(here) + value[len(cloud) :]
        return value

    return {
        **{k: local(v) for k, v in cloud_env.items()},
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "PATH": SYSTEM_PATH,
    }


@dataclass(frozen=True)
class Deployed:
    """One function as deployed: its archive, unpacked source, venv and runtime."""

    name: str
    archive: Path
    source: Path
    venv: Venv
    tmp: Path
    runtime: FunctionRuntime

    @property
    def revision(self) -> str:
        """What ``lineage:code`` of every cell this function writes must say."""
        info = json.loads((self.source / "l2cache" / "REVISION").read_text())
        return format_revision(info["commit"], bool(info["dirty"]))


def deploy(name: str, datasets_file: Path, work: Path) -> Deployed:
    """Build ``name``'s archive with infra's code and prepare it to run (see module doc)."""
    archive, infra_functions = infra()
    zip_path, _ = archive.build_archive(name, datasets_file, work / "archives")
    source = work / "workspace" / name
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(source)
    make_read_only(source)
    venv = function_venv(name, source / "requirements.txt")
    home = work / "home"
    if not home.exists():
        home.mkdir(parents=True)
        make_read_only(home)
    tmp = work / "tmp" / name
    tmp.mkdir(parents=True)
    env = sandbox_env(infra_functions.function_env(), source, tmp, home)
    runtime = FunctionRuntime(
        source=source,
        python=venv.python,
        env=env,
        readonly=(source, home, venv.path),
        hidden=(REPO,),
    )
    return Deployed(name, zip_path, source, venv, tmp, runtime)
