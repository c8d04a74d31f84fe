"""The missing-id guard on the real Bigtable emulator: expiry of negative entries and
pending marks, claims under contention, the caller's window, the map's section, and
a lookup whose guard table is missing (it answers, and queues nothing)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from l2cache.config import ConfigError, MissingIdPolicy, parse_config
from l2cache.domain import ids as idlib
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.serving.api import LookupService
from l2cache.serving.missing import plan_missing
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache.store.missing_guard import MissingIdGuard, create_guard_table

PROJECT = "guard-test"
CFG = {
    "bigtable": {"project": PROJECT, "instance": "inst"},
    "pubsub": {"project": PROJECT, "missing_ids_topic": "missing"},
    "missing_ids": {"max_chunks_per_request": 3, "max_chunks_per_caller": 5},
    "datasets": {
        "ds": {
            "segmentation": "file:///nowhere/sv",
            "graph": {"kind": "graphene", "url": "https://pcg.invalid/segmentation/table/ds"},
            "cache_table_id": "guard_cache",
            "resolution": [16, 16, 40],
            "voxel_offset": [0, 0, 0],
            "chunk_size": [96, 96, 48],
            "spatial_bits": {1: 10, 2: 10, 3: 9},
        }
    },
}
CONFIG = parse_config(CFG)
DS = CONFIG.dataset("ds")


class Clock:
    """A settable clock: expiry tested without sleeping."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ids_in(n_chunks: int, per_chunk: int = 1, segment: int = 1) -> np.ndarray:
    coords = np.array([[i, 0, 0] for i in range(n_chunks) for _ in range(per_chunk)])
    segs = np.array([segment + j for _ in range(n_chunks) for j in range(per_chunk)])
    return idlib.encode_ids(2, coords, segs.astype(np.uint64), DS.spatial_bits)


@pytest.fixture(scope="module")
def instance(bigtable_emulator):
    inst = bigtable_instance(PROJECT, "inst", admin=True)
    create_guard_table(inst, "guard_t")
    create_guard_table(inst, "guard_t")  # idempotent
    return inst


@pytest.fixture
def guard(instance, request):
    policy = MissingIdPolicy(
        max_chunks_per_request=3, max_chunks_per_caller=5, negative_ttl_s=60, pending_ttl_s=30
    )
    return MissingIdGuard(instance.table("guard_t"), policy, clock=Clock())


def test_negative_entries_expire_after_their_ttl(guard):
    ids = ids_in(3, segment=101)
    chunks = idlib.get_chunk_id(ids, DS.spatial_bits)
    guard.remember_absent("ds", ids[:2].tolist(), "not in the graph")
    negative, pending = guard.known("ds", ids, chunks)
    assert negative.tolist() == [True, True, False] and not pending.any()
    guard.clock.now += 59
    assert guard.known("ds", ids, chunks)[0].tolist() == [True, True, False]
    guard.clock.now += 2  # past negative_ttl_s: asked again (the id may exist by now)
    assert not guard.known("ds", ids, chunks)[0].any()


def test_a_claim_is_won_once_then_expires(guard):
    ids = ids_in(1, per_chunk=3, segment=201)
    chunk = int(idlib.get_chunk_id(ids[:1], DS.spatial_bits)[0])
    with ThreadPoolExecutor(16) as pool:
        won = list(pool.map(lambda _: guard.claim("ds", chunk, ids.tolist()), range(32)))
    assert won.count(True) == 1
    chunks = np.full(ids.size, chunk, dtype=np.uint64)
    assert guard.known("ds", ids, chunks)[1].all()
    guard.clock.now += 31  # past pending_ttl_s: never computed? queue it again
    assert not guard.known("ds", ids, chunks)[1].any()
    assert guard.claim("ds", chunk, ids.tolist())


def test_the_callers_window_counts_chunks_and_resets(guard):
    guard.clock.now = 1_800_000_000 // 60 * 60 + 1.0
    assert guard.charge("user:7", 3) == 3
    assert guard.charge("user:7", 3) == 2  # 5 per window
    assert guard.charge("user:7", 3) == 0
    assert guard.charge("user:8", 3) == 3  # per caller
    guard.clock.now += 60  # the next window
    assert guard.charge("user:7", 3) == 3


def test_plan_for_a_graph_that_cannot_be_checked(guard):
    """A graphene graph: no existence check; the request's budget, then the caller's,
    then pending marks bound what is queued."""
    ids = ids_in(7, segment=301)
    plan = plan_missing(DS, ids, "user:9", CONFIG.missing_ids, guard)
    assert plan.graph == "skipped" and plan.chunks == 3 and plan.deferred == 4
    again = plan_missing(DS, ids, "user:9", CONFIG.missing_ids, guard)
    assert again.pending == 3 and again.chunks == 2 and again.deferred == 2  # caller: 5
    third = plan_missing(DS, ids, "user:9", CONFIG.missing_ids, guard)
    assert third.chunks == 0 and third.publish.size == 0 and third.pending == 5


def test_without_a_guard_only_the_request_budget_applies():
    plan = plan_missing(DS, ids_in(7, segment=401), "x", CONFIG.missing_ids, None)
    assert plan.chunks == 3 and plan.publish.size == 3 and plan.deferred == 4


def test_a_missing_guard_table_queues_nothing_and_still_answers(instance):
    """NotFound on the guard table is a misconfiguration: the lookup answers 200 with
    the features it has and ``X-L2Cache-Queue: failed``; nothing is published."""
    cache = create_cache_table(instance, "guard_cache")
    published = []
    service = LookupService(
        CONFIG,
        lambda name: CacheStore(cache, CONFIG.dataset(name)),
        lambda l2ids, table_id, cache_id: published.append(l2ids),
        MissingIdGuard(instance.table("no_such_guard"), CONFIG.missing_ids),
    )
    body = json.dumps({"l2_ids": ids_in(2, segment=501).tolist()}).encode()
    r = service.handle("POST", "/l2cache/api/v1/table/ds/attributes", {}, {}, body)
    assert r.status == 200 and all(v == {} for v in json.loads(r.body).values())
    assert r.headers["X-L2Cache-Queue"] == "failed" and r.headers["X-L2Cache-Queued-Ids"] == "0"
    assert published == []


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"max_chunks_per_request": 0}, "positive integer"),
        ({"caller_window_s": "60"}, "positive integer"),
        ({"max_chunks": 5}, "unknown keys"),
        ({"guard_table_id": ""}, "non-empty string"),
    ],
)
def test_the_maps_missing_ids_section_is_checked(section, words):
    with pytest.raises(ConfigError, match=words):
        parse_config({**CFG, "missing_ids": section})


def test_the_defaults_are_stated():
    policy = parse_config({k: v for k, v in CFG.items() if k != "missing_ids"}).missing_ids
    assert policy == MissingIdPolicy()
    assert (policy.max_chunks_per_request, policy.max_chunks_per_caller) == (100, 600)
    assert (policy.caller_window_s, policy.negative_ttl_s, policy.pending_ttl_s) == (60, 86400, 900)
