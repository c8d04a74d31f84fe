"""Cold start of each function as deployed: process start -> first successful response.

    .venv/bin/python bench/cold_start.py [--repeat 3]

Each function runs from its deploy archive (infra's ``build_archive``), unpacked
read-only, with the venv built from that archive's lock and exactly infra's environment
(``tests/deployed/deployment.py``, the deployed-mode test's own setup), against the
local stack's emulators on the vendored pinky40 crop. A fresh process is started for
every sample and the clock runs from ``Popen`` until the first 200 answer to a real
request: lookup ``POST .../attributes`` (100 ids), compute_chunk one chunk task of a new
run (computed and written), on_edit one missing-ids CloudEvent (one chunk recomputed).

The workers' feature kernels are numba-compiled on first use and cached in
``NUMBA_CACHE_DIR`` (``/tmp/numba`` in the cloud, per instance): "compiled" starts with
an empty cache directory (every new Cloud Functions instance), "loaded" with the cache
the previous sample wrote. Also prints each venv's installed size (``du``).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "pipeline"))

from deployed.deployment import deploy, make_writable  # noqa: E402
from stackutil import add_dataset, crop_volume, wait_for  # noqa: E402

from l2cache.compute import dataset_context, load_chunk_l2  # noqa: E402
from l2cache.config import load_config  # noqa: E402
from l2cache.domain.lineage import utc_now  # noqa: E402
from l2cache.gcp.pubsub import missing_ids_message  # noqa: E402
from l2cache.store.ledger import new_run  # noqa: E402
from l2cache_ops.ingest import start_ingest  # noqa: E402
from l2cache_ops.status import run_status  # noqa: E402
from l2cache_tools.local.functions import start_function  # noqa: E402
from l2cache_tools.local.stack import LocalStack  # noqa: E402

DATASET = "pinky_cold"
NAMES = ("lookup", "compute_chunk", "on_edit")


def with_tmp(runtime, tmp: Path):
    """The runtime with its writable directory (/tmp in the cloud) moved to ``tmp``."""
    old = runtime.env["TMPDIR"]
    env = {
        k: (str(tmp) + v[len(old) :] if v.startswith(old) else v) for k, v in runtime.env.items()
    }
    return dataclasses.replace(runtime, env=env)


def first_ok(send, deadline_s: float = 300) -> None:
    """Call ``send`` until it answers 200 (a refused or failing call is retried)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            r = send()
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.ConnectionError as exc:
            last = str(exc)
        if time.monotonic() > end:
            raise RuntimeError(f"no successful answer in {deadline_s:.0f}s: {last}")
        time.sleep(0.02)


def sample(name: str, runtime, endpoints: dict, request, log_dir: Path) -> float:
    signature = "cloudevent" if name == "on_edit" else "http"
    t0 = time.perf_counter()
    fn = start_function(name, endpoints, signature_type=signature, log_dir=log_dir, runtime=runtime)
    try:
        first_ok(lambda: request(f"http://{fn.host}"))
        return time.perf_counter() - t0
    finally:
        fn.stop()


def requests_for(ctx, config, l2ids: np.ndarray, chunk_ids: np.ndarray) -> dict:
    def lookup(base):
        url = f"{base}/l2cache/api/v1/table/{DATASET}/attributes"
        body = {"l2_ids": [int(v) for v in l2ids[:100]]}
        return requests.post(url, json=body, params={"update_cache": "false"}, timeout=120)

    def compute_chunk(base):
        run = new_run("region_reprocess", ctx.dataset, [1, 0, 1, 2, 1, 2], 1)
        ctx.ledger.create_run(run)
        body = {"dataset": DATASET, "run_id": run.run_id, "region": [1, 0, 1, 2, 1, 2]}
        r = requests.post(base, json=body, timeout=300)
        if r.status_code == 200 and r.json()["chunks"][0]["status"] != "done":
            raise RuntimeError(f"compute_chunk answered {r.text[:300]}")
        return r

    def on_edit(base):
        data, attrs = missing_ids_message(chunk_ids, DATASET, ctx.dataset.cache_table_id)
        msg_id = uuid.uuid4().hex
        envelope = {
            "message": {
                "data": base64.b64encode(data).decode(),
                "attributes": attrs,
                "messageId": msg_id,
                "publishTime": utc_now().isoformat().replace("+00:00", "Z"),
            },
            "subscription": "projects/l2cache-local/subscriptions/bench",
        }
        headers = {
            "ce-id": msg_id,
            "ce-specversion": "1.0",
            "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
            "ce-source": "//pubsub.googleapis.com/projects/l2cache-local/topics/missing",
        }
        return requests.post(base, json=envelope, headers=headers, timeout=300)

    return {"lookup": lookup, "compute_chunk": compute_chunk, "on_edit": on_edit}


def du_mib(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    saved = dict(os.environ)
    work = Path(tempfile.mkdtemp(prefix="l2cache-cold-"))
    deployed: dict = {}

    def runtimes(stack):
        deployed["added"] = add_dataset(stack, DATASET, crop_volume(), work / "data")
        for name in NAMES:
            deployed[name] = deploy(name, stack.config_path, work)
        return {name: deployed[name].runtime for name in NAMES}

    try:
        with LocalStack(work / "stack", compute_workers=2, runtimes=runtimes) as stack:
            config = load_config(stack.config_path)
            ctx = dataset_context(config, DATASET)
            run = start_ingest(config, DATASET, batch=2)  # rows for lookup to serve
            wait_for(lambda: run_status(ctx.ledger, run.run_id).finished, 300, "the ingest")
            chunk = load_chunk_l2(ctx, (1, 0, 1), None)
            l2ids = np.unique(chunk.labels[chunk.labels > 0])
            send = requests_for(ctx, config, l2ids, l2ids[:5])
            endpoints = {k: v for k, v in stack.env.items() if k != "L2CACHE_CONFIG"}
            logs = work / "logs"
            logs.mkdir()
            print(f"# cold start: process start -> first 200, median of {args.repeat}")
            print(f"{'function':<14} {'kernels':<9} {'median_s':>8} {'min_s':>6} {'max_s':>6}")
            for name in NAMES:
                d = deployed[name]
                modes = ("compiled", "loaded") if name != "lookup" else ("-",)
                times: dict[str, list[float]] = {m: [] for m in modes}
                for i in range(args.repeat):
                    tmp = work / "cold" / f"{name}-{i}"
                    tmp.mkdir(parents=True)
                    rt = with_tmp(d.runtime, tmp)  # empty /tmp: a new instance
                    for mode in modes:  # "loaded" reuses what "compiled" cached
                        times[mode].append(sample(name, rt, endpoints, send[name], logs))
                for mode, ts in times.items():
                    print(
                        f"{name:<14} {mode:<9} {statistics.median(ts):>8.2f} "
                        f"{min(ts):>6.2f} {max(ts):>6.2f}"
                    )
            print("\n# deployed install per function (uv venv from the archive's lock)")
            print(f"{'function':<14} {'venv_MiB':>8} {'packages':>8} {'archive_KiB':>11}")
            for name in NAMES:
                d = deployed[name]
                n = len(list((d.venv.path / "lib").glob("python3*/site-packages/*.dist-info")))
                print(
                    f"{name:<14} {du_mib(d.venv.path):>8.0f} {n:>8} "
                    f"{d.archive.stat().st_size / 1024:>11.0f}"
                )
    finally:
        os.environ.clear()
        os.environ.update(saved)
        make_writable(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
