"""Dispatch: the cost of the scattered order and the span fan-out, and the projected
dispatch time of a connectome.

    .venv/bin/python bench/dispatch.py [--repeat 3] [--quick]

At 10k, 100k, 1M and 11.6M chunks (minnie65), in one process:

- ``permute``: the keyed Feistel permutation of the whole order ``[0, n)``
  (:func:`l2cache.domain.permutation.permute`), the median of ``--repeat`` rounds; no
  task ever permutes more than its own batch, so this is the bound, not the cost.
- ``leaf``: one leaf's work before it computes: the chunks at its ``batch`` positions
  (:func:`l2cache.domain.spans.span_chunks`), mean over 2,000 leaves spread over the run.
- ``tree``: every split task's planning (:func:`plan_span`) over the whole tree, summed
  (what all workers together spend deciding their children), and the tree's size.
- ``ramp``: the schedule offsets of every leaf (:func:`ramp_offset_s`, vectorized).

Then the projection (:func:`l2cache_ops.sizing.plan_dispatch`) for minnie65's 11.6 M
chunks with the default 50 worker instances and with the ~3,000 needed to also compute
within 3 h: tasks, the derived rate, the ramp, dispatch hours; and the previous
dispatch (region tree of the issue, 4.34 M tasks at 20/s) for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
sys.path.insert(0, str(ROOT / "ops"))

from l2cache.domain.permutation import permutation_key, permute  # noqa: E402
from l2cache.domain.regions import DEFAULT_BATCH  # noqa: E402
from l2cache.domain.spans import (  # noqa: E402
    DEFAULT_FAN_OUT,
    Ramp,
    plan_span,
    ramp_offset_s,
    span_chunks,
    span_tree_size,
)
from l2cache_ops.sizing import MINNIE65_CHUNKS, dispatch_seconds, plan_dispatch  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000, MINNIE65_CHUNKS)
RUN = "bulk-20250101T000000-bench0"
OLD_TASKS, OLD_RATE = 4_340_000, 20.0  # issue 18: 11.52 M chunks as region tasks, 20/s


def region_for(n: int) -> list[int]:
    """A box of exactly ``n`` chunks (n = a x b x c, as flat as it must be)."""
    for z in range(int(round(n ** (1 / 3))), 0, -1):
        if n % z == 0:
            rest = n // z
            for y in range(int(rest**0.5), 0, -1):
                if rest % y == 0:
                    return [0, 0, 0, rest // y, y, z]
    return [0, 0, 0, n, 1, 1]


def timed(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def walk_tree(n: int, batch: int, fan_out: int) -> tuple[int, int, float]:
    """Plan every split of the tree over ``[0, n)`` as the workers would: (leaves, splits,
    seconds spent in plan_span)."""
    stack, leaves, splits, spent = [(0, n)], 0, 0, 0.0
    while stack:
        start, stop = stack.pop()
        if stop - start <= batch:
            leaves += 1
            continue
        t = time.perf_counter()
        _, children = plan_span(start, stop, batch, fan_out)
        spent += time.perf_counter() - t
        splits += 1
        stack.extend(children)
    return leaves, splits, spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip 11.6M (the projection stays)")
    args = ap.parse_args()
    keys = permutation_key(RUN)
    batch, fan_out, ramp = DEFAULT_BATCH, DEFAULT_FAN_OUT, Ramp()
    sizes = SIZES[:-1] if args.quick else SIZES
    print(f"batch {batch}, fan-out {fan_out}, ramp {ramp}")
    header = (
        f"{'chunks':>11} | {'permute all':>11} | {'ns/chunk':>8} | {'leaf (us)':>9} | "
        f"{'tasks':>10} | {'splits':>9} | {'plan all (s)':>12} | {'ramp all (ms)':>13}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        positions = np.arange(n, dtype=np.int64)
        repeat = args.repeat if n < MINNIE65_CHUNKS else max(1, args.repeat - 1)
        perm_s = timed(lambda n=n, positions=positions: permute(positions, n, keys), repeat)
        region = region_for(n)
        leaves_total = -(-n // batch)
        picks = np.linspace(0, leaves_total - 1, min(2000, leaves_total)).astype(np.int64)
        t = time.perf_counter()
        for leaf in picks.tolist():
            span_chunks(region, keys, leaf * batch, min(n, leaf * batch + batch))
        leaf_us = (time.perf_counter() - t) / len(picks) * 1e6
        leaves, splits, plan_s = walk_tree(n, batch, fan_out)
        assert (leaves, splits) == span_tree_size(n, batch, fan_out)
        ramp_s = timed(lambda leaves=leaves: ramp_offset_s(np.arange(leaves), ramp), repeat)
        print(
            f"{n:>11,} | {perm_s:>9.3f} s | {perm_s / n * 1e9:>8.0f} | {leaf_us:>9.1f} | "
            f"{leaves + splits:>10,} | {splits:>9,} | {plan_s:>12.2f} | {ramp_s * 1e3:>13.1f}"
        )
    print()
    for instances in (50, 3000):
        plan = plan_dispatch(MINNIE65_CHUNKS, instances)
        print(f"minnie65, {instances} worker instances: {plan.summary()}")
    no_ramp = dispatch_seconds(MINNIE65_CHUNKS, batch, fan_out, 500.0, None)
    print(
        f"  without the ramp at 500/s: {no_ramp / 3600:.2f} h; before (region tree, "
        f"{OLD_TASKS:,} tasks at {OLD_RATE:g}/s): {OLD_TASKS / OLD_RATE / 3600:.1f} h"
    )
    plan = plan_dispatch(MINNIE65_CHUNKS, 50)
    ok = plan.dispatch_s <= 3 * 3600
    print(f"target: dispatch of 11.6 M chunks <= 3 h: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
