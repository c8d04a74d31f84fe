"""Session fixtures: the real Bigtable and Pub/Sub emulators on free loopback ports.

Started once per test session and stopped (process group) at the end. When an
emulator is not installed the fixture raises: the tests that need it fail loudly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_features.py etc.

from l2cache_tools.local.emulators import start_bigtable_emulator, start_pubsub_emulator  # noqa: E402


def _serve(emu):
    """Expose ``emu`` through its environment variables for the session, then restore."""
    saved = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)
    try:
        yield emu
    finally:
        emu.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory):
    yield from _serve(start_bigtable_emulator(log_dir=tmp_path_factory.mktemp("bigtable-log")))


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    yield from _serve(
        start_pubsub_emulator(
            tmp_path_factory.mktemp("pubsub-data"), log_dir=tmp_path_factory.mktemp("pubsub-log")
        )
    )
