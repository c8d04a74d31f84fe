"""``l2cache demo``: the whole product on a laptop, on real data, start to finish.

Starts the local stack, builds a PCG-shaped dataset from the vendored pinky40 cutout,
runs a bulk ingest through Cloud Tasks with a live progress bar, looks nodes up over
HTTP, applies a merge and a split, waits for on_edit to recompute them, shows the
new nodes, and stops everything.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import requests
from google.cloud.bigtable.table import Table

from l2cache.compute import DatasetContext
from l2cache.config import L2CacheConfig

from .common import print_features, print_status

REPO = Path(__file__).resolve().parents[3]
VOLUME = REPO / "data" / "pinky40" / "pinky40_512.ckl.gz"
NAME = "pinky40_demo"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``: the one command that shows every part working together on real
    data, without a cloud project."""
    p = sub.add_parser("demo", help="local stack end to end on the vendored real data")
    p.add_argument("--dir", default="var/demo", help="working directory (recreated)")
    p.add_argument(
        "--chunk-size", default="128,128,128", metavar="X,Y,Z", help="voxels per atomic chunk"
    )
    p.add_argument("--workers", type=int, default=2, help="compute_chunk worker processes")
    p.set_defaults(func=run)


def step(text: str) -> None:
    """A visible heading per stage (flushed: the stages take seconds, and a piped
    output should still show where the demo is)."""
    print(f"\n== {text}", flush=True)


def lookup(url: str, ids: np.ndarray) -> dict[int, dict]:
    """Features of ``ids`` through the lookup function over HTTP, as caveclient asks;
    ``update_cache=false`` so a node not in the cache is not queued for recomputation
    and the demo sees only what ingest and on_edit wrote."""
    r = requests.post(
        f"{url}/l2cache/api/v1/table/{NAME}/attributes",
        json={"l2_ids": [int(v) for v in ids]},
        params={"update_cache": "false"},
        timeout=60,
    )
    r.raise_for_status()
    return {int(k): v for k, v in r.json().items()}


def lookup_waiting(url: str, ids: np.ndarray, seconds: int) -> tuple[dict[int, dict], dict, str]:
    """Features of ``ids`` with their per-id states, the lookup holding the request up to
    ``seconds`` until the pending ones are computed (``?state=true&wait=S``): what a
    proofreading tool asks right after an edit instead of sleeping and retrying.
    Returns the features, the states' summary and how the wait ended."""
    r = requests.post(
        f"{url}/l2cache/api/v1/table/{NAME}/attributes",
        json={"l2_ids": [int(v) for v in ids]},
        params={"update_cache": "false", "state": "true", "wait": str(seconds)},
        timeout=seconds + 60,
    )
    r.raise_for_status()
    body = r.json()
    found = {int(k): v for k, v in body["attributes"].items()}
    return found, body["summary"], r.headers.get("X-L2Cache-Wait", "?")


def run(args: argparse.Namespace) -> int:
    """The demo, stage by stage; exit 1 at the first stage whose result is wrong (a
    failed chunk, an edit not recomputed in time, QC failed), so it doubles as a check."""
    import crackle
    from google.cloud import pubsub_v1

    from l2cache.compute import dataset_context, load_chunk_l2
    from l2cache.config import load_config
    from l2cache_ops.ingest import start_ingest
    from l2cache_tools.dataset import apply_merge, apply_split, publish_edit
    from l2cache_tools.dataset.edits import pick_merge, pick_split
    from l2cache_tools.local.stack import LocalStack

    from .dataset_cmd import build_into_config
    from .ingest_cmd import watch

    directory = Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)
    t0 = time.perf_counter()
    step("starting the local stack (Bigtable, Pub/Sub, Cloud Tasks emulators + 3 functions)")
    with LocalStack(directory, compute_workers=args.workers) as stack:
        for name, url in stack.urls.items():
            print(f"  {name:14} {url}")
        step(f"building dataset {NAME} from {VOLUME.relative_to(REPO)} (real pinky40 data)")
        volume = crackle.load(str(VOLUME))
        cs = [int(v) for v in args.chunk_size.split(",")]
        built = build_into_config(
            stack.config_path, NAME, volume, directory / "sv", (16, 16, 40), cs
        )
        del volume
        print(
            f"  {built.n_chunks} chunks {built.grid}, {built.n_l2} L2 nodes, "
            f"{built.n_sv} supervoxels"
        )
        config = load_config(stack.config_path)
        ctx = dataset_context(config, NAME)

        step("bulk ingest through Cloud Tasks (split tasks fan out to compute_chunk)")
        run = start_ingest(config, NAME, batch=2, trigger="demo")
        status = watch(ctx.ledger, run.run_id, interval=0.3, timeout=900)
        print_status(status)
        if status.failed:
            return 1

        step("looking up L2 nodes through the lookup function (HTTP, caveclient's API)")
        center = [g // 2 for g in built.grid]
        chunk = load_chunk_l2(ctx, center, None)
        labels = chunk.labels  # builds the uint64 L2 volume: once
        nodes, counts = np.unique(labels[labels > 0], return_counts=True)
        top = nodes[np.argsort(-counts, kind="stable")[:6]]
        print_features(lookup(stack.urls["lookup"], top), f"  largest nodes of chunk {center}:")

        step("applying a merge and a split in that chunk, published like PCG does")
        graph = stack_graph_table(config, ctx)
        a, b = pick_merge(ctx.dataset, graph, center)
        target = pick_split(ctx.dataset, graph, center, exclude=(a, b))
        merge = apply_merge(graph, ctx.dataset, a, b)
        split = apply_split(graph, ctx.dataset, target)
        pub = pubsub_v1.PublisherClient()
        topic = pub.topic_path(config.pubsub.project, config.pubsub.edits_topic)
        t_pub = time.perf_counter()
        for result in (merge, split):
            publish_edit(pub, topic, NAME, result)
            print(f"  {result.kind}: {result.old_l2_ids.tolist()} -> {result.new_l2_ids.tolist()}")
        new_ids = np.concatenate([merge.new_l2_ids, split.new_l2_ids])
        deadline = time.monotonic() + 120
        while True:  # the lookup waits for them (?wait=): no sleep-and-retry of our own
            found, summary, how = lookup_waiting(stack.urls["lookup"], new_ids, 30)
            if all(found.values()):
                break
            if time.monotonic() > deadline:
                print(f"  on_edit did not write the new nodes in time: {summary}")
                return 1
            if how != "ready":
                time.sleep(0.2)  # not pending yet (on_edit has not taken the edit)
        print(
            f"  recomputed by on_edit {time.perf_counter() - t_pub:.1f}s after publishing; "
            f"one lookup with ?state=true&wait=30 waited for them (wait: {how}; states: "
            + ", ".join(f"{n} {k}" for k, n in summary.items() if n)
            + ")"
        )
        print_features(found, "  the new nodes:")
        print_features(
            lookup(stack.urls["lookup"], merge.old_l2_ids),
            "  the merged nodes' old rows stay readable (history):",
        )

        # QC and release: check the bulk run, promote it, show the verdict
        step("QC of the bulk run against the graph at its snapshot; promoted as a release")
        if not qc_and_release(config, ctx, run.run_id, directory):
            return 1

        # operating the run: SLOs and cost from the ledger, the dashboard
        step("SLOs and cost of the bulk run; the dashboard (one self-contained HTML page)")
        operations(stack.config_path, run.run_id, directory)
    step(f"stack stopped; demo took {time.perf_counter() - t0:.0f}s")
    return 0


def qc_and_release(
    config: L2CacheConfig, ctx: DatasetContext, run_id: str, directory: Path
) -> bool:
    """QC the run (report stored, JSON and HTML written), promote it when it passes."""
    from l2cache_ops.qc import run_qc
    from l2cache_ops.qc_reports import save_report
    from l2cache_ops.releases import promote
    from l2cache_ops.settings import qc_thresholds

    from .qc_cmd import print_report, write_outputs

    t = time.perf_counter()
    report = run_qc(ctx, run_id, qc_thresholds(config, NAME))
    save_report(ctx.ledger, report)
    print_report(report)
    print(f"  QC took {time.perf_counter() - t:.1f}s")
    write_outputs(report, str(directory / "qc.json"), str(directory / "qc.html"))
    if not report["passed"]:
        return False
    release = promote(ctx.ledger, NAME, run_id)
    print(f"  run {run_id} is release {release['release']} of {NAME}")
    return True


# demo targets for the dataset map's ``slo:`` section (a deployment sets its own)
DEMO_SLO = {
    "throughput_chunks_per_h": 1000,
    "max_failure_rate": 0.01,
    "max_retry_rate": 0.05,
    "max_recover_s": 600,
    "edit_p50_s": 10,
    "edit_p95_s": 30,
    "qc_pass": True,
    "max_usd_per_mm3": 5000,
}


def operations(config_path: Path, run_id: str, directory: Path) -> Path:
    """Put SLO targets in the map, print the run's cost and SLO verdicts, write the
    dashboard and print its path."""
    import yaml

    from l2cache.compute import dataset_context
    from l2cache.config import load_config
    from l2cache_ops.settings import slo_targets
    from l2cache_ops.slo import run_slos
    from l2cache_tools.dashboard import write_dashboard

    from .ingest_cmd import _prices, current_status, print_cost, print_slos

    raw = yaml.safe_load(config_path.read_text())
    raw["slo"] = DEMO_SLO
    config_path.write_text(yaml.safe_dump(raw))
    config = load_config(config_path)
    ctx = dataset_context(config, NAME)
    prices = _prices(ctx)
    st = current_status(ctx.ledger, run_id, config, prices)
    print_cost(st.cost)
    print_slos(run_slos(ctx.ledger, ctx.dataset, slo_targets(config, NAME), run_id, st))
    path = write_dashboard(config, NAME, directory / "dashboard.html").resolve()
    print(f"  dashboard: {path}")
    return path


def stack_graph_table(config: L2CacheConfig, ctx: DatasetContext) -> Table:
    """The dataset's PCG graph table itself: the demo edits it directly, as PCG would,
    since there is no PCG server in the local stack."""
    from l2cache.gcp.bigtable import bigtable_instance

    g = ctx.dataset.graph
    return bigtable_instance(g.project, g.instance).table(g.table_id)
