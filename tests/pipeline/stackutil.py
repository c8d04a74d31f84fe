"""Helpers shared by the local-stack test modules: a built dataset, waits, lookups, pulls."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import requests
import yaml
from google.cloud import pubsub_v1

from l2cache.gcp.bigtable import bigtable_instance
from l2cache.store.cache import create_cache_table
from l2cache_ops.ledger import events, list_runs
from l2cache_tools.dataset import build_dataset
from l2cache_tools.local.stack import INSTANCE, PROJECT

CHUNK = (48, 48, 24)
RES = (16.0, 16.0, 40.0)
CROP = Path(__file__).resolve().parents[1] / "data" / "pinky40_crop_96x96x48.npz"


def crop_volume() -> np.ndarray:
    return np.load(CROP)["labels"]


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    """Poll ``predicate`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def add_dataset(stack, name: str, volume: np.ndarray, directory: Path) -> dict:
    """Build ``volume`` as a PCG dataset in the stack's emulators and add it to the map."""
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    built = build_dataset(volume, f"file://{directory}/{name}-sv", RES, CHUNK, instance, name)
    cache_table = f"l2cache_{name}_v1"
    cfg = yaml.safe_load(stack.config_path.read_text())
    cfg["datasets"][name] = {
        "segmentation": built.segmentation,
        "graph": {"kind": "bigtable", "project": PROJECT, "instance": INSTANCE, "table_id": name},
        "cache_table_id": cache_table,
    }
    stack.config_path.write_text(yaml.safe_dump(cfg))
    create_cache_table(instance, cache_table)
    return {"built": built, "instance": instance, "cache_table": cache_table}


def expected_cells(ctx, run, coords, res=RES) -> dict[int, dict[bytes, bytes]]:
    """The cache cells a run must have written for one chunk: a direct computation on
    the chunk as read at the run's snapshot, encoded as the store encodes it."""
    from l2cache.compute import load_chunk_l2
    from l2cache.domain.attributes import ATTRIBUTES, encode_column
    from l2cache.engine.features import compute_features

    chunk = load_chunk_l2(ctx, coords, run.snapshot)
    feats = compute_features(chunk.labels, res)
    cells = {a.name: encode_column(a, feats[a.name]) for a in ATTRIBUTES}
    return {
        int(n): {a.key: cells[a.name][i] for a in ATTRIBUTES}
        for i, n in enumerate(feats["l2id"].tolist())
    }


def lookup(stack, dataset: str, l2ids) -> dict[int, dict]:
    url = f"{stack.urls['lookup']}/l2cache/api/v1/table/{dataset}/attributes"
    r = requests.post(
        url, json={"l2_ids": [int(v) for v in l2ids]}, params={"update_cache": "false"}, timeout=30
    )
    r.raise_for_status()
    return {int(k): v for k, v in r.json().items()}


def pull_dead_letters(count: int, timeout: float = 120, settle: float = 0.0, keep=None) -> list:
    """Pull the dead-letter inspection subscription until ``count`` distinct messages
    (those ``keep`` accepts, when given; then keep pulling ``settle`` seconds, to catch
    any unexpected extra one)."""
    sub = pubsub_v1.SubscriberClient()
    path = sub.subscription_path(PROJECT, "dead-letter-inspect")
    got: dict[str, object] = {}

    def poll():
        try:
            resp = sub.pull(subscription=path, max_messages=10, timeout=5)
        except Exception:  # an empty long-poll may end in DEADLINE_EXCEEDED
            return None
        if resp.received_messages:
            sub.acknowledge(subscription=path, ack_ids=[m.ack_id for m in resp.received_messages])
            for m in resp.received_messages:
                if keep is None or keep(m.message):
                    got[m.message.message_id] = m.message
        return len(got) >= count

    wait_for(poll, timeout, f"{count} dead-lettered messages")
    end = time.monotonic() + settle
    while time.monotonic() < end:
        poll()
        time.sleep(0.2)
    return list(got.values())


def find_event(ledger, dataset: str, kind: str, key: str):
    """(run, event) of a stream event, whatever code revision the function runs."""
    for run in list_runs(ledger):
        if run.dataset == dataset and run.kind == kind:
            for event in events(ledger, run.run_id):
                if event["key"] == key:
                    return run, event
    return None
