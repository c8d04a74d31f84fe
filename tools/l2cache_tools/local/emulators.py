"""Start and stop the real Bigtable and Pub/Sub emulators on 127.0.0.1.

Each emulator runs in its own process group (``start_new_session``) and is stopped by
killing the group: the gcloud wrapper otherwise leaves its Java child behind. Ports are
free ports chosen at start, so parallel test sessions never collide. A missing
emulator raises :class:`EmulatorNotFound` with the install command: tests that need
one fail loudly instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
INSTALL_HINT = (
    "install the Google Cloud CLI emulators: apt-get install google-cloud-cli "
    "google-cloud-cli-bigtable-emulator google-cloud-cli-pubsub-emulator default-jre-headless "
    "(or: gcloud components install bigtable pubsub-emulator)"
)


class EmulatorNotFound(RuntimeError):
    """An emulator binary is not installed on this machine."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until ``127.0.0.1:port`` accepts connections (or fail with the reason)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {HOST}:{port} after {timeout:.0f}s")


@dataclass
class Emulator:
    """A running emulator process group and how clients reach it."""

    name: str
    port: int
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def host(self) -> str:
        """``host:port`` as the emulator environment variables and clients take it."""
        return f"{HOST}:{self.port}"

    def stop(self) -> None:
        """Terminate the whole process group; escalate to SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ready(emu: Emulator, timeout: float) -> Emulator:
    """Wait until ``emu`` listens; stop its process group if it never does."""
    try:
        wait_for_port(emu.port, timeout, emu.process)
    except Exception:
        emu.stop()
        raise
    return emu


def sdk_root() -> Path:
    """Root of the Google Cloud SDK (where the emulator components live)."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise EmulatorNotFound(f"gcloud is not on PATH; {INSTALL_HINT}")
    out = subprocess.run(
        [gcloud, "info", "--format=value(installation.sdk_root)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    root = out.stdout.strip()
    if out.returncode != 0 or not root:
        raise EmulatorNotFound(f"`gcloud info` failed: {out.stderr.strip()}; {INSTALL_HINT}")
    return Path(root)


def _spawn(cmd: list[str], log_path: Path | None) -> subprocess.Popen:
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )


def start_bigtable_emulator(log_dir: Path | None = None, port: int | None = None) -> Emulator:
    """Start ``cbtemulator`` directly (not through the gcloud wrapper: no orphan)."""
    binary = sdk_root() / "platform" / "bigtable-emulator" / "cbtemulator"
    if not binary.exists():
        raise EmulatorNotFound(f"{binary} is missing; {INSTALL_HINT}")
    port = port or free_port()
    log_path = Path(log_dir) / "bigtable-emulator.log" if log_dir else None
    proc = _spawn([str(binary), "-host", HOST, "-port", str(port)], log_path)
    emu = Emulator("bigtable", port, proc, {"BIGTABLE_EMULATOR_HOST": f"{HOST}:{port}"}, log_path)
    return ready(emu, 30)


def start_pubsub_emulator(
    data_dir: Path, log_dir: Path | None = None, port: int | None = None
) -> Emulator:
    """Start the Pub/Sub emulator (Java; ready in a few seconds)."""
    root = sdk_root()
    if not (root / "platform" / "pubsub-emulator").is_dir():
        raise EmulatorNotFound(f"the Pub/Sub emulator is not installed; {INSTALL_HINT}")
    if shutil.which("java") is None:
        raise EmulatorNotFound(
            f"java is not on PATH (the Pub/Sub emulator needs it); {INSTALL_HINT}"
        )
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = Path(log_dir) / "pubsub-emulator.log" if log_dir else None
    cmd = [
        shutil.which("gcloud") or "gcloud",
        "beta",
        "emulators",
        "pubsub",
        "start",
        f"--host-port={HOST}:{port}",
        f"--data-dir={data_dir}",
        "--quiet",
    ]
    proc = _spawn(cmd, log_path)
    emu = Emulator("pubsub", port, proc, {"PUBSUB_EMULATOR_HOST": f"{HOST}:{port}"}, log_path)
    return ready(emu, 90)
