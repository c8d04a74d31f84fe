"""Helpers shared by the local-stack test modules: a built dataset, waits, lookups, pulls,
and proofs that the Cloud Tasks emulator has moved on (instead of fixed sleeps)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import requests
import yaml
from google.cloud import pubsub_v1

from l2cache.config import TasksConfig
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.gcp.tasks import enqueue, ensure_queue, tasks_client
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


@contextlib.contextmanager
def crop_stack(directory: Path, name: str) -> Iterator[dict]:
    """A local stack (2 compute workers) serving the vendored crop as dataset ``name``:
    the stack, its map, the dataset's context and lookup URL, and what
    :func:`add_dataset` made. The process environment the stack set is restored after."""
    from l2cache.compute import dataset_context
    from l2cache.config import load_config
    from l2cache_tools.local.stack import LocalStack

    saved = dict(os.environ)
    try:
        with LocalStack(directory, compute_workers=2) as stack:
            made = add_dataset(stack, name, crop_volume(), directory)
            config = load_config(stack.config_path)
            yield {
                "stack": stack,
                "config": config,
                "ctx": dataset_context(config, name),
                "url": f"{stack.urls['lookup']}/l2cache/api/v1/table/{name}/attributes",
                **made,
            }
    finally:
        os.environ.clear()
        os.environ.update(saved)


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


def wait_tasks_gone(names, timeout: float = 60) -> None:
    """Until the Cloud Tasks emulator holds none of the tasks ``names`` (full task names):
    GetTask is NOT_FOUND once a task succeeded or was dropped after its last attempt, so
    no attempt of any of them can still come (bounded; fails loudly)."""
    from google.api_core.exceptions import NotFound

    client = tasks_client()
    left = list(names)

    def gone() -> bool:
        while left:
            try:
                client.get_task(name=left[0])
            except NotFound:
                left.pop(0)
            else:
                return False
        return True

    wait_for(gone, timeout, f"{len(left)} tasks to leave the queue (first: {left[:1]})", 0.02)


class _Recorder(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.cond:
            self.server.seen.add(self.path)
            self.server.cond.notify_all()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class DispatchProbe:
    """Shows that the Cloud Tasks emulator's dispatcher has moved past a point in time.

    A queue of its own (running) in the emulator named by ``L2CACHE_TASKS_EMULATOR_HOST``,
    whose tasks go to a loopback recorder. :meth:`passed` returns once two sentinel tasks,
    enqueued one after the other, were dispatched. The dispatcher visits every queue in
    turn, one round after another (``ConcurrentProcessor.run``); the second sentinel is
    taken in a later round than the first, so that round began after :meth:`passed` was
    called and looked at every queue: anything enqueued before the call that it may
    dispatch has been taken by then. A test that wants "nothing was dispatched" checks
    after ``passed()``, not after a sleep.
    """

    def __init__(self, project: str, location: str, queue: str = "dispatch-probe") -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        self.server.cond = threading.Condition()
        self.server.seen = set()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.cfg = TasksConfig(project=project, location=location, queue=queue, compute_url=url)
        self.client = tasks_client()
        ensure_queue(self.client, self.cfg, max_concurrent=1)

    def passed(self, timeout: float = 30) -> None:
        for _ in range(2):
            path = f"/sentinel-{uuid.uuid4().hex}"
            cfg = TasksConfig(
                self.cfg.project, self.cfg.location, self.cfg.queue, self.cfg.compute_url + path
            )
            enqueue(self.client, cfg, {"sentinel": path})
            with self.server.cond:
                if not self.server.cond.wait_for(lambda p=path: p in self.server.seen, timeout):
                    raise AssertionError(f"sentinel task {path} not dispatched in {timeout:.0f}s")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> DispatchProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
