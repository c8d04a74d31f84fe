"""The collector is deferred, never off: overlapping blocks on threads restore it once."""

from __future__ import annotations

import gc
import threading

from l2cache.support.gc_defer import DEFERRED_GEN0, gc_deferred


def test_collections_still_run_inside_a_long_deferred_block():
    before = gc.get_stats()[0]["collections"]
    with gc_deferred():
        assert gc.isenabled()
        assert gc.get_threshold()[0] == max(DEFERRED_GEN0, gc.get_threshold()[0])
        for _ in range(3 * DEFERRED_GEN0):
            cycle: list = []
            cycle.append(cycle)  # garbage only the cyclic collector frees
            del cycle
    assert gc.get_stats()[0]["collections"] > before


def test_overlapping_blocks_restore_the_threshold_when_the_last_one_leaves():
    original = gc.get_threshold()
    entered, release_first, first_left = threading.Event(), threading.Event(), threading.Event()

    def first():
        with gc_deferred():
            entered.set()
            release_first.wait(10)
        first_left.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(10)
    with gc_deferred():
        release_first.set()
        assert first_left.wait(10)
        assert gc.get_threshold()[0] == max(DEFERRED_GEN0, original[0])  # still deferred
    thread.join(10)
    assert gc.get_threshold() == original
    try:
        with gc_deferred():
            raise RuntimeError("a failing block")
    except RuntimeError:
        pass
    assert gc.get_threshold() == original and gc.isenabled()
