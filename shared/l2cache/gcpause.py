"""Pause Python's cyclic garbage collector around allocation-heavy, cycle-free work.

Reading 10,000 rows builds ~100,000 dicts, lists and floats, none of them in a
reference cycle, so reference counting frees them all; yet each 700 allocations start
a collection, and the older generations' passes walk every live object of the process.
Measured on a lookup of 10,000 rows: decoding to API values took 0.105 s with the
collector running and 0.037 s paused. The pause is process-wide (``gc.disable``) and
counted, so overlapping requests on several threads resume collection only when the
last one leaves.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off (as it was after the last one leaves)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
