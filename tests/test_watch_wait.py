"""``status --watch`` says when it waits on Bigtable instead of sitting silent."""

from __future__ import annotations

import time

import pytest

from l2cache_tools.cli.ingest_cmd import patiently


def test_a_slow_read_is_said_to_wait_on_bigtable_and_its_value_returned():
    said: list[str] = []

    def slow() -> int:
        time.sleep(0.5)
        return 7

    assert patiently(slow, said.append, notice_after_s=0.1, every_s=0.15) == 7
    assert said and all(s.startswith("waiting on Bigtable for ") for s in said)
    assert 2 <= len(said) <= 4  # at 0.1 s, then every 0.15 s until the read ended


def test_a_fast_read_says_nothing_and_a_failed_read_raises_its_error():
    said: list[str] = []
    assert patiently(lambda: "ok", said.append) == "ok" and said == []

    def broken() -> None:
        raise TimeoutError("deadline exceeded")

    with pytest.raises(TimeoutError, match="deadline exceeded"):
        patiently(broken, said.append)
