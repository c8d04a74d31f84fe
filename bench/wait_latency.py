"""The lookup's bounded wait at the production chunk size, on the local stack.

    .venv/bin/python bench/wait_latency.py [--rounds 3]

Real pinky40 (data/pinky40) built into a PCG-layout dataset with 256x256x512 chunks
(2 x 2 x 1) in the Bigtable emulator; the lookup, on_edit and compute_chunk under
functions-framework with the Pub/Sub emulator and the local Cloud Tasks dispatcher
(``LocalStack``), nothing ingested. Measured from the client, per round:

- ``missing``: 3 ids of a chunk nobody computed, asked with ``state=true&wait=30``: the
  lookup queues them, on_edit reads and computes the chunk (ids path), the wait answers
  once their rows exist. The first round includes on_edit's cold start.
- ``edit``: a PCG-style merge in a chunk, its edit message published (the time starts
  before the publish), then the new id asked with ``update_cache=false&state=true&wait=30``
  (only on_edit computes it).

Each line gives the seconds to the answer with the ids computed, ``X-L2Cache-Waited-Ms``
(the part spent waiting), and the reads the wait made.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOLUME = ROOT / "data" / "pinky40" / "pinky40_512.ckl.gz"
NAME = "pinky40_wait"
RES = (16.0, 16.0, 40.0)
CHUNK = (256, 256, 512)
CHUNKS = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import crackle
    import requests
    import yaml
    from google.cloud import pubsub_v1

    from l2cache.compute import dataset_context, load_chunk_l2
    from l2cache.config import load_config
    from l2cache.gcp.bigtable import bigtable_instance
    from l2cache.store.cache import create_cache_table
    from l2cache_tools.dataset import apply_merge, build_dataset, publish_edit
    from l2cache_tools.dataset.edits import pick_merge
    from l2cache_tools.local.stack import EDITS_TOPIC, INSTANCE, PROJECT, LocalStack

    saved = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp), compute_workers=2) as st:
        instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
        volume = crackle.load(str(VOLUME))
        built = build_dataset(volume, f"file://{tmp}/sv", RES, CHUNK, instance, NAME)
        del volume
        cfg = yaml.safe_load(st.config_path.read_text())
        cfg["datasets"][NAME] = {
            "segmentation": built.segmentation,
            "graph": {
                "kind": "bigtable",
                "project": PROJECT,
                "instance": INSTANCE,
                "table_id": NAME,
            },
            "cache_table_id": f"l2cache_{NAME}",
        }
        st.config_path.write_text(yaml.safe_dump(cfg))
        create_cache_table(instance, f"l2cache_{NAME}")
        ctx = dataset_context(load_config(st.config_path), NAME)
        url = f"{st.urls['lookup']}/l2cache/api/v1/table/{NAME}/attributes"
        publisher = pubsub_v1.PublisherClient()
        topic = publisher.topic_path(PROJECT, EDITS_TOPIC)
        graph = instance.table(NAME)

        def ask(ids: np.ndarray, **params: str) -> requests.Response:
            r = requests.post(
                url, json={"l2_ids": [int(i) for i in ids]}, params=params, timeout=120
            )
            r.raise_for_status()
            return r

        def report(kind: str, i: int, seconds: float, r: requests.Response) -> None:
            states = {s["state"] for s in r.json()["state"].values()}
            print(
                f"{kind:8s} round {i}: {seconds:6.2f} s to the answer, waited "
                f"{int(r.headers['X-L2Cache-Waited-Ms']) / 1000:6.2f} s, "
                f"{r.headers['X-L2Cache-Wait-Reads']:>2s} wait reads, "
                f"outcome {r.headers['X-L2Cache-Wait']}, states {sorted(states)}",
                flush=True,
            )

        print(f"# wait latency, pinky40 {RES} nm, chunks {CHUNK}, local stack", flush=True)
        for i in range(args.rounds):
            ids = load_chunk_l2(ctx, CHUNKS[i % len(CHUNKS)], None).l2_ids[i * 3 : i * 3 + 3]
            t0 = time.monotonic()
            r = ask(ids, state="true", wait="30")
            report("missing", i, time.monotonic() - t0, r)
        for i in range(args.rounds):
            merge = apply_merge(graph, ctx.dataset, *pick_merge(ctx.dataset, graph, CHUNKS[i]))
            t0 = time.monotonic()
            publish_edit(publisher, topic, NAME, merge)
            r = ask(merge.new_l2_ids, state="true", wait="30", update_cache="false")
            report("edit", i, time.monotonic() - t0, r)
    os.environ.clear()
    os.environ.update(saved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
