"""Dispatch sized for a connectome: the keyed permutation, span planning, scattered task
names, the warm-up ramp, the derived queue settings and the span task's validation.
(The span fan-out end to end, against the emulators: tests/pipeline/test_dispatch_stack.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from l2cache.config import ConfigError, parse_config
from l2cache.domain.permutation import permutation_key, permute
from l2cache.domain.spans import (
    Ramp,
    linear_to_coords,
    plan_span,
    ramp_cumulative,
    ramp_offset_s,
    span_chunks,
    span_tree_size,
)
from l2cache.gcp.tasks import span_task_id, task_id
from l2cache.handlers.compute_chunk import BadTask, parse_task
from l2cache_ops.sizing import (
    DISPATCH_TARGET_S,
    MINNIE65_CHUNKS,
    dispatch_seconds,
    plan_dispatch,
    queue_concurrency,
)

SIZES = [1, 2, 3, 5, 7, 16, 17, 100, 255, 256, 257, 1000, 4097, 65_537, 123_457]


@pytest.mark.parametrize("n", SIZES)
def test_permutation_is_a_bijection_of_0_to_n(n):
    for run in ("bulk-1", "bulk-2"):
        out = permute(np.arange(n), n, permutation_key(run))
        assert out.dtype == np.int64 and out.shape == (n,)
        assert np.array_equal(np.sort(out), np.arange(n))


def test_permutation_is_deterministic_keyed_and_scattered():
    n = 10_007
    a = permute(np.arange(n), n, permutation_key("run-a"))
    assert np.array_equal(a, permute(np.arange(n), n, permutation_key("run-a")))
    # any subset of positions maps as the whole order does (what a leaf task computes)
    pos = np.array([5, 0, 9_999, 4_321])
    assert np.array_equal(permute(pos, n, permutation_key("run-a")), a[pos])
    b = permute(np.arange(n), n, permutation_key("run-b"))
    assert (a != b).mean() > 0.99  # another run, another order
    # scattered: consecutive positions land far apart, not in x-major runs
    assert np.median(np.abs(np.diff(a))) > n / 10
    assert (np.diff(a) == 1).mean() < 0.01


def test_permutation_refuses_positions_outside():
    with pytest.raises(ValueError):
        permute([3], 3, permutation_key("r"))
    with pytest.raises(ValueError):
        permute([0], 0, permutation_key("r"))


@pytest.mark.parametrize("n,batch,fan_out", [(1, 4, 16), (8, 2, 16), (100, 4, 16), (12_345, 3, 5)])
def test_span_tree_tiles_the_run_once_and_counts_exactly(n, batch, fan_out):
    leaves, splits, stack = [], 0, [(0, n)]
    while stack:
        kind, parts = plan_span(*stack.pop(), batch, fan_out)
        if kind == "compute":
            leaves += parts
            continue
        splits += 1
        assert 2 <= len(parts) <= fan_out
        stack += parts
    leaves.sort()
    assert leaves[0][0] == 0 and leaves[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(leaves, leaves[1:], strict=False))
    # leaves are exactly the batches [i*batch, (i+1)*batch): the ramp's leaf index
    assert all(a == i * batch and b == min(n, a + batch) for i, (a, b) in enumerate(leaves))
    assert span_tree_size(n, batch, fan_out) == (len(leaves), splits)


def test_span_chunks_cover_the_region_exactly_once():
    region = [2, 3, 1, 7, 6, 5]  # 5 x 3 x 4 = 60 chunks
    keys = permutation_key("bulk-x")
    got = []
    for a in range(0, 60, 7):
        got += span_chunks(region, keys, a, min(60, a + 7))
    assert len(got) == 60
    assert sorted(map(tuple, got)) == sorted(
        (x, y, z) for x in range(2, 7) for y in range(3, 6) for z in range(1, 5)
    )
    assert linear_to_coords(region, np.array([0, 59])).tolist() == [[2, 3, 1], [6, 5, 4]]


def test_task_names_are_scattered_and_deterministic():
    spans = [span_task_id("bulk-20240101T000000-abcdef", a, a + 4, 0) for a in range(0, 400, 4)]
    assert len(set(spans)) == len(spans)
    assert len({s[0] for s in spans}) > 10  # first characters differ: no shared prefix
    assert len({s[:2] for s in spans}) > 50
    assert span_task_id("bulk-20240101T000000-abcdef", 0, 4, 0) == spans[0]
    assert span_task_id("bulk-20240101T000000-abcdef", 0, 4, "resume1") != spans[0]
    assert all(len(s) <= 500 and s.replace("-", "").replace("_", "").isalnum() for s in spans)
    regions = [task_id("run-1", [x, 0, 0, x + 1, 1, 1]) for x in range(50)]
    assert len({r[0] for r in regions}) > 5
    assert regions[0].endswith("run-1-g0-0-0-0-1-1-1")  # readable after the hash


def test_ramp_is_monotone_and_its_cumulative_inverts_the_offsets():
    ramp = Ramp(start_per_s=5, growth=1.5, step_s=300, max_per_s=500)
    leaves = np.arange(0, 3_000_000, 331)
    t = ramp_offset_s(leaves, ramp)
    assert t[0] == 0 and np.all(np.diff(t) > 0)
    assert np.allclose(ramp_cumulative(t, ramp), leaves, rtol=0, atol=1e-6 * leaves.max())
    # the rule itself: 5/s for the first 5 min, then x1.5 per step, capped at 500/s
    assert ramp_cumulative(300.0, ramp) == pytest.approx(1500)
    assert ramp_cumulative(600.0, ramp) == pytest.approx(1500 + 2250)
    steps = math.ceil(math.log(100) / math.log(1.5))  # 12 steps of 5 min to reach 500/s
    c_end = ramp_cumulative(steps * 300.0, ramp)
    assert ramp_cumulative(steps * 300.0 + 10, ramp) - c_end == pytest.approx(5000)
    # boundaries: leaf 1500 is the first of step 1
    assert ramp_offset_s(1500, ramp) == pytest.approx(300)
    assert float(ramp_offset_s(10**6, Ramp(start_per_s=0))) == 0.0  # off: all due at once
    assert np.allclose(ramp_offset_s([0, 600], Ramp(start_per_s=600, max_per_s=500)), [0, 1.2])


def test_minnie65_dispatch_is_projected_within_3_hours():
    plan = plan_dispatch(MINNIE65_CHUNKS, max_instances=50)
    assert plan.batch == 4 and plan.max_dispatches_per_second == 500
    assert plan.leaves == 2_900_000 and plan.splits < plan.leaves / 14
    assert plan.dispatch_s <= DISPATCH_TARGET_S
    assert (plan.max_concurrent_dispatches, plan.edits_max_concurrent) == (45, 5)
    # the baseline: 4.34 M region tasks at 20/s were >= 60 h
    assert dispatch_seconds(MINNIE65_CHUNKS, 4, 16, 20.0, None) > 40 * 3600
    small = plan_dispatch(10_000, max_instances=50)
    assert small.max_dispatches_per_second == 20 and small.dispatch_s < 3600
    assert "dispatch of 11,600,000 chunks" in plan.summary()


def test_edits_keep_a_share_of_the_workers():
    assert queue_concurrency(50) == (45, 5)
    assert queue_concurrency(3) == (2, 1)
    assert queue_concurrency(1) == (1, 1)
    assert sum(queue_concurrency(100_000)) <= 100_000


def test_map_dispatch_settings_default_and_checked():
    base = {
        "bigtable": {"project": "p", "instance": "i"},
        "tasks": {"project": "p", "location": "l", "queue": "q", "compute_url": "http://x"},
        "datasets": {},
    }
    tasks = parse_config(base).tasks
    assert tasks.edits_queue_name == "q-edits" and tasks.fan_out == 16
    assert tasks.ramp == Ramp()
    custom = {**base["tasks"], "edits_queue": "e", "fan_out": 8, "ramp": {"start_per_s": 0}}
    tasks = parse_config({**base, "tasks": custom}).tasks
    assert (tasks.edits_queue_name, tasks.fan_out, tasks.ramp.enabled) == ("e", 8, False)
    for bad in ({"fan_out": 1}, {"ramp": {"growth": 1}}, {"ramp": {"rate": 3}}, {"edits_queue": 3}):
        with pytest.raises(ConfigError):
            parse_config({**base, "tasks": {**base["tasks"], **bad}})


SPAN = {"kind": "span", "dataset": "d", "run_id": "r", "start": 0, "stop": 8, "batch": 2}


@pytest.mark.parametrize(
    "change",
    [
        {"start": True},
        {"stop": 8.0},
        {"start": -1},
        {"start": 8},
        {"stop": "8"},
        {"batch": 0},
        {"batch": False},
        {"generation": [1]},
        {"t0_ms": -5},
        {"run_id": 7},
    ],
)
def test_malformed_span_bodies_are_bad_tasks(change):
    with pytest.raises(BadTask):
        parse_task(json.dumps({**SPAN, **change}).encode())


def test_a_span_body_lacking_a_key_is_a_bad_task():
    for key in ("start", "stop", "batch", "dataset"):
        body = {k: v for k, v in SPAN.items() if k != key}
        with pytest.raises(BadTask):
            parse_task(json.dumps(body).encode())
    assert parse_task(json.dumps(SPAN).encode())["generation"] == 0


@pytest.mark.parametrize("n", [3, 257, 65_537, 11_600_000])
def test_the_few_positions_path_gives_the_vectorized_bits(n):
    keys = permutation_key("bulk-scalar")
    pos = np.unique(np.linspace(0, n - 1, 500).astype(np.int64))
    whole = permute(pos, n, keys)  # > 64 positions: numpy
    pieces = np.concatenate([permute(pos[i : i + 4], n, keys) for i in range(0, len(pos), 4)])
    assert np.array_equal(whole, pieces)
