"""Span tasks: a bulk run's fan-out over positions of its scattered chunk order, and the
warm-up ramp their leaves are scheduled by.

A run over a region of ``n`` chunks is started with ONE span task ``[0, n)``. A span
wider than ``batch`` positions splits into up to ``fan_out`` child spans (cut on
multiples of ``batch`` from its start, so the root's leaves are exactly
``[i * batch, (i + 1) * batch)``); a span of at most ``batch`` positions computes the
chunks at those positions of the run's keyed permutation
(:mod:`l2cache.domain.permutation`). So no process enqueues more than ``fan_out``
tasks, the tree has ``ceil(log_F(n / batch))`` levels, and the chunks computed at any
moment are scattered over the volume instead of sitting in one corner.

The ramp: a cold Bigtable table has one tablet and splits as load grows, so the leaves
are *scheduled* (Cloud Tasks ``schedule_time``) by their leaf index ``i = start //
batch``: leaf ``i`` is due at ``t0 + offset(i)`` where the due rate starts at
``start_per_s`` and grows by ``growth`` every ``step_s`` up to ``max_per_s`` (Google's
"500/50/5" rule of ramping up traffic to a new key range: start low, +50 % every 5
minutes). :func:`ramp_offset_s` is the closed-form inverse of :func:`ramp_cumulative`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from l2cache.domain.permutation import permute

DEFAULT_FAN_OUT = 16


def plan_span(
    start: int, stop: int, batch: int, fan_out: int = DEFAULT_FAN_OUT
) -> tuple[str, list[tuple[int, int]]]:
    """``("compute", [(start, stop)])`` for a span of at most ``batch`` positions, else
    ``("split", children)``: up to ``fan_out`` contiguous spans that tile it.

    Children are ``fan_out**d`` batches wide (the largest such width that still needs
    at least two children; the last child takes the rest), so every level but the last
    is full and the tree has ``~leaves / (fan_out - 1)`` split tasks. (Cutting each span
    into ``fan_out`` equal parts instead leaves the level above the leaves with ~3
    children per task: 1.1 M split tasks instead of 0.19 M at 11.6 M chunks.)
    """
    if not 0 <= start < stop or batch < 1 or fan_out < 2:
        raise ValueError(f"bad span [{start}, {stop}) batch {batch} fan-out {fan_out}")
    if stop - start <= batch:
        return "compute", [(start, stop)]
    width = _child_width(-(-(stop - start) // batch), fan_out) * batch
    cuts = [*range(start, stop, width), stop]
    return "split", [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]


def _child_width(batches: int, fan_out: int) -> int:
    """Width in batches of the children of a span ``batches`` wide (> 1): the largest
    power of ``fan_out`` below it, so at most ``fan_out`` children."""
    width = 1
    while width * fan_out < batches:
        width *= fan_out
    return width


def is_leaf(start: int, stop: int, batch: int) -> bool:
    """A span that computes its chunks itself (no split)."""
    return stop - start <= batch


def span_tree_size(n: int, batch: int, fan_out: int = DEFAULT_FAN_OUT) -> tuple[int, int]:
    """(leaf tasks, split tasks) of the span tree over ``[0, n)``: exact, in O(levels)
    (each level has at most two widths: full children and one remainder)."""
    if n < 1:
        return 0, 0
    leaves = splits = 0
    level = {-(-n // batch): 1}  # width in batches -> spans of that width
    while level:
        nxt: dict[int, int] = {}
        for width, count in level.items():
            if width <= 1:
                leaves += count
                continue
            splits += count
            child = _child_width(width, fan_out)
            full, rest = divmod(width, child)
            nxt[child] = nxt.get(child, 0) + count * full
            if rest:
                nxt[rest] = nxt.get(rest, 0) + count
        level = nxt
    return leaves, splits


def linear_to_coords(region: Sequence[int], linear: np.ndarray) -> np.ndarray:
    """Chunk coordinates (k x 3) of x-major linear indices inside ``region`` (the order
    :func:`l2cache.domain.regions.region_chunks` lists a box in)."""
    x0, y0, z0, x1, y1, z1 = (int(v) for v in region)
    dy, dz = y1 - y0, z1 - z0
    li = np.asarray(linear, dtype=np.int64)
    return np.stack([x0 + li // (dy * dz), y0 + (li // dz) % dy, z0 + li % dz], axis=-1)


def span_chunks(
    region: Sequence[int], keys: tuple[int, ...], start: int, stop: int
) -> list[list[int]]:
    """The chunks at positions ``[start, stop)`` of the run's keyed order of ``region``."""
    x0, y0, z0, x1, y1, z1 = (int(v) for v in region)
    n = (x1 - x0) * (y1 - y0) * (z1 - z0)
    linear = permute(np.arange(start, stop, dtype=np.int64), n, keys)
    return linear_to_coords(region, linear).tolist()


# -- the warm-up ramp --------------------------------------------------------------------
@dataclass(frozen=True)
class Ramp:
    """Leaf tasks due per second: ``start_per_s`` growing x``growth`` every ``step_s``
    up to ``max_per_s``. ``start_per_s == 0`` turns the ramp off (every leaf due at once)."""

    start_per_s: float = 5.0
    growth: float = 1.5
    step_s: float = 300.0
    max_per_s: float = 500.0

    @property
    def enabled(self) -> bool:
        """Whether leaves are scheduled at all."""
        return self.start_per_s > 0

    def _steps(self) -> int:
        """Steps before the rate reaches ``max_per_s`` (its first capped step)."""
        if self.start_per_s >= self.max_per_s:
            return 0
        return math.ceil(math.log(self.max_per_s / self.start_per_s) / math.log(self.growth))

    def _before(self, k: np.ndarray | int) -> np.ndarray:
        """Leaves due before step ``k`` starts (k <= steps): a geometric series."""
        g = self.growth
        return self.start_per_s * self.step_s * (np.power(g, k) - 1.0) / (g - 1.0)


def ramp_cumulative(t: np.ndarray | float, ramp: Ramp) -> np.ndarray:
    """Leaves due by ``t`` seconds after the run's start (real-valued; leaf ``i`` is due
    once this reaches ``i``)."""
    t = np.maximum(np.asarray(t, dtype=np.float64), 0.0)
    steps = ramp._steps()
    k = np.minimum(np.floor(t / ramp.step_s), steps)
    rate = np.where(k < steps, ramp.start_per_s * np.power(ramp.growth, k), ramp.max_per_s)
    return ramp._before(k) + rate * (t - k * ramp.step_s)


def ramp_offset_s(leaf: np.ndarray | int, ramp: Ramp) -> np.ndarray:
    """Seconds after the run's start at which leaf ``leaf`` is due: the inverse of
    :func:`ramp_cumulative`, in closed form (0 for every leaf when the ramp is off).

    Inside the ramp, step ``k = floor(log_g(1 + i (g - 1) / (r0 S)))`` and the offset is
    ``k S + (i - C_k) / (r0 g^k)``; past it, ``K S + (i - C_K) / max``.
    """
    i = np.asarray(leaf, dtype=np.float64)
    if not ramp.enabled:
        return np.zeros_like(i)
    steps = ramp._steps()
    total_ramp = ramp._before(steps)
    g, r0, s = ramp.growth, ramp.start_per_s, ramp.step_s
    k = np.floor(np.log1p(np.maximum(i, 0.0) * (g - 1.0) / (r0 * s)) / math.log(g))
    k = np.clip(k, 0, max(steps - 1, 0))
    k = np.where(ramp._before(k + 1) <= i, k + 1, k)  # float rounding at a step's edge
    k = np.where(ramp._before(k) > i, k - 1, k)
    k = np.clip(k, 0, max(steps - 1, 0))
    inside = k * s + (i - ramp._before(k)) / (r0 * np.power(g, k))
    after = steps * s + (i - total_ramp) / ramp.max_per_s
    return np.where(i < total_ramp, inside, after)
