"""Session fixtures shared by every test folder (``tests/`` and the tests beside each
function in ``functions/``): the real Bigtable and Pub/Sub emulators on free loopback
ports, started once per session and stopped (process group) at the end. When an
emulator is not installed the fixture raises: the tests that need it fail loudly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from l2cache_tools.local.emulators import Emulator, start_bigtable_emulator, start_pubsub_emulator


def _serve(emu: Emulator) -> Iterator[Emulator]:
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
def bigtable_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """The Bigtable emulator, ``BIGTABLE_EMULATOR_HOST`` set for the session."""
    yield from _serve(start_bigtable_emulator(log_dir=tmp_path_factory.mktemp("bigtable-log")))


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """The Pub/Sub emulator, ``PUBSUB_EMULATOR_HOST`` set for the session."""
    yield from _serve(
        start_pubsub_emulator(
            tmp_path_factory.mktemp("pubsub-data"), log_dir=tmp_path_factory.mktemp("pubsub-log")
        )
    )
