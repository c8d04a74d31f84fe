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

from l2cache.local.emulators import start_bigtable_emulator, start_pubsub_emulator  # noqa: E402


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory):
    emu = start_bigtable_emulator(log_dir=tmp_path_factory.mktemp("bigtable-log"))
    old = os.environ.get("BIGTABLE_EMULATOR_HOST")
    os.environ.update(emu.env)
    yield emu
    emu.stop()
    if old is None:
        os.environ.pop("BIGTABLE_EMULATOR_HOST", None)
    else:
        os.environ["BIGTABLE_EMULATOR_HOST"] = old


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    emu = start_pubsub_emulator(
        tmp_path_factory.mktemp("pubsub-data"), log_dir=tmp_path_factory.mktemp("pubsub-log")
    )
    old = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ.update(emu.env)
    yield emu
    emu.stop()
    if old is None:
        os.environ.pop("PUBSUB_EMULATOR_HOST", None)
    else:
        os.environ["PUBSUB_EMULATOR_HOST"] = old
