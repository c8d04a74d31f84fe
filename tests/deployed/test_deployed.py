"""What is deployed is what is tested: the three archives, run as Cloud Functions runs them.

Each function's archive is built by infra's own code (the bytes ``pulumi up`` uploads),
unpacked read-only, given a venv from its ``requirements.txt`` only and exactly infra's
environment (see ``deployment.py``), with HOME read-only and the repository hidden,
and served by functions-framework from that venv. The stack around them is the real
one (Bigtable, Pub/Sub and the extended Cloud Tasks emulator, endpoints as the local
stack configures): a bulk ingest through Cloud Tasks to the deployed compute_chunk, a
lookup through the deployed lookup, and PCG edits published to the edits topic and
recomputed by the deployed on_edit.

The first run builds the three venvs (cached by lock hash under
``${XDG_CACHE_HOME:-~/.cache}/l2cache/deploy-venvs``); later runs reuse them.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from google.cloud import pubsub_v1

from l2cache.compute import dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.engine.features import compute_features
from l2cache_ops.ingest import start_ingest
from l2cache_ops.status import run_status
from l2cache_tools.dataset import apply_merge, apply_split, publish_edit
from l2cache_tools.dataset.edits import pick_merge, pick_split
from l2cache_tools.local.functions import readonly_command
from l2cache_tools.local.stack import EDITS_TOPIC, PROJECT, LocalStack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from stackutil import RES, add_dataset, crop_volume, expected_cells, wait_for  # noqa: E402

from .deployment import REPO, deploy, make_writable  # noqa: E402
from .locks import normalize, parse  # noqa: E402

DATASET = "pinky_deployed"
NAMES = ("compute_chunk", "lookup", "on_edit")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    saved = dict(os.environ)
    work = tmp_path_factory.mktemp("deployed")
    prepared: dict = {}

    def runtimes(stack):
        # the dataset exists before the archives: its map (with the stack's compute URL)
        # is what infra resolves into each archive's datasets.yaml
        prepared["added"] = add_dataset(stack, DATASET, crop_volume(), work / "data")
        for name in NAMES:
            prepared[name] = deploy(name, stack.config_path, work)
        return {name: prepared[name].runtime for name in NAMES}

    try:
        with LocalStack(work / "stack", compute_workers=2, runtimes=runtimes) as stack:
            config = load_config(stack.config_path)
            yield {
                "stack": stack,
                "config": config,
                "ctx": dataset_context(config, DATASET),
                **prepared,
            }
    finally:
        os.environ.clear()
        os.environ.update(saved)
        make_writable(work)


PROBE = r"""
import errno, importlib.metadata as md, json, os, sys
out = {}
for what, path in (("home", os.environ["HOME"]), ("source", os.getcwd())):
    try:
        open(os.path.join(path, "probe"), "w").close()
        out[what] = "written"
    except OSError as exc:
        out[what] = exc.errno
tmp = os.path.join(os.environ["TMPDIR"], "probe")
open(tmp, "w").close(); os.remove(tmp)
out["repo"] = os.listdir(sys.argv[1])
import l2cache, l2cache.domain.lineage
out["l2cache"] = l2cache.__file__
out["revision"] = l2cache.domain.lineage.code_revision()
try:
    import l2cache_tools  # noqa: F401
    out["tools"] = True
except ImportError:
    out["tools"] = False
out["dists"] = {d.metadata["Name"]: d.version for d in md.distributions()}
print(json.dumps(out))
"""


@pytest.mark.parametrize("name", NAMES)
def test_the_function_sees_only_its_archive_and_venv(deployed, name):
    """The sandbox holds: HOME and the archive are read-only filesystems, /tmp is
    writable, the repository is invisible, and the venv is exactly the lock."""
    d = deployed[name]
    cmd = readonly_command(
        [str(d.venv.python), "-c", PROBE, str(REPO)], d.runtime.readonly, d.runtime.hidden
    )
    out = subprocess.run(
        cmd, env=dict(d.runtime.env), cwd=d.source, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout)
    assert probe["home"] == errno.EROFS and probe["source"] == errno.EROFS
    assert probe["repo"] == []
    assert probe["l2cache"] == str(d.source / "l2cache" / "__init__.py")
    assert probe["tools"] is False
    assert probe["revision"] == d.revision
    lock = {pkg: v for pkg, (_, v, _) in parse((d.source / "requirements.txt").read_text()).items()}
    installed = {normalize(k): v for k, v in probe["dists"].items()}
    assert installed == lock, set(installed.items()) ^ set(lock.items())
    # what infra sets, with /workspace and /tmp mapped; nothing from the test's environment
    env = d.runtime.env
    assert env["L2CACHE_CONFIG"] == str(d.source / "datasets.yaml")
    assert env["CLOUD_VOLUME_DIR"] == str(d.tmp / "cloudvolume")
    assert env["NUMBA_CACHE_DIR"] == str(d.tmp / "numba")
    assert "L2CACHE_REVISION" not in env and "VIRTUAL_ENV" not in env


@pytest.fixture(scope="module")
def ingested(deployed):
    revision = deployed["compute_chunk"].revision
    # pinned: a worker running any other code would fail every chunk permanently
    run = start_ingest(deployed["config"], DATASET, batch=2, pinned_revision=revision)
    status = wait_for(
        lambda: (s := run_status(deployed["ctx"].ledger, run.run_id)).finished and s,
        180,
        "the ingest through the deployed compute_chunk",
    )
    return run, status


def test_bulk_ingest_by_the_deployed_worker_equals_direct_computation(deployed, ingested):
    run, status = ingested
    assert (status.total, status.done, status.failed) == (8, 8, 0)
    ctx = deployed["ctx"]
    expected = {}
    for x in range(2):
        for y in range(2):
            for z in range(2):
                expected.update(expected_cells(ctx, run, (x, y, z)))
    assert len(expected) == deployed["added"]["built"].n_l2
    raw = ctx.store.read_raw(np.array(list(expected), dtype=np.uint64))
    assert set(raw) == set(expected)
    revision = deployed["compute_chunk"].revision.encode()
    lineage = ctx.store.read_lineage(np.array(list(expected), dtype=np.uint64))
    for node, cells in expected.items():
        assert raw[node]["0"] == cells, node
        assert lineage[node][b"run"] == run.run_id.encode()
        assert lineage[node][b"code"] == revision  # the archive's REVISION


def lookup(deployed, l2ids) -> dict[int, dict]:
    url = f"{deployed['stack'].urls['lookup']}/l2cache/api/v1/table/{DATASET}/attributes"
    r = requests.post(
        url, json={"l2_ids": [int(v) for v in l2ids]}, params={"update_cache": "false"}, timeout=60
    )
    r.raise_for_status()
    return {int(k): v for k, v in r.json().items()}


def test_lookup_serves_the_ingested_rows_from_the_archived_map(deployed, ingested):
    run, _ = ingested
    ctx = deployed["ctx"]
    chunk = load_chunk_l2(ctx, (1, 0, 1), run.snapshot)
    direct = compute_features(chunk.labels, RES)
    ids = direct["l2id"][:50]
    got = lookup(deployed, ids)
    assert set(got) == set(ids.tolist())
    for i, node in enumerate(ids.tolist()):
        assert got[node]["size_nm3"] == int(direct["size_nm3"][i]) * 16 * 16 * 40
        assert got[node]["area_nm2"] == int(direct["area_nm2"][i])
    # the geometry the function serves is the one infra resolved into the archive
    r = requests.get(f"{deployed['stack'].urls['lookup']}/l2cache/api/v1/table_mapping", timeout=30)
    assert r.status_code == 200 and DATASET in json.dumps(r.json())


def test_edits_are_recomputed_by_the_deployed_on_edit(deployed, ingested):
    ctx = deployed["ctx"]
    instance = deployed["added"]["instance"]
    cache = instance.table(deployed["added"]["cache_table"])
    before = {int(r.row_key) for r in cache.read_rows() if r.row_key.isdigit()}
    graph = instance.table(DATASET)
    a, b = pick_merge(ctx.dataset, graph, (0, 0, 0))
    merge = apply_merge(graph, ctx.dataset, a, b)
    split = apply_split(graph, ctx.dataset, pick_split(ctx.dataset, graph, (1, 0, 0)))
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(PROJECT, EDITS_TOPIC)
    for result in (merge, split):
        publish_edit(publisher, topic, DATASET, result)
    new_ids = set(merge.new_l2_ids.tolist()) | set(split.new_l2_ids.tolist())
    found = wait_for(
        lambda: (d := lookup(deployed, new_ids)) and all(d.values()) and d,
        120,
        "the deployed on_edit to write the new L2 nodes",
    )
    assert {int(r.row_key) for r in cache.read_rows() if r.row_key.isdigit()} - before == new_ids
    chunk = load_chunk_l2(ctx, (0, 0, 0), None)
    direct = compute_features(chunk.labels, RES, only=merge.new_l2_ids)
    (node,) = merge.new_l2_ids.tolist()
    assert found[node]["size_nm3"] == int(direct["size_nm3"][0]) * 16 * 16 * 40
    lineage = ctx.store.read_lineage(np.array(sorted(new_ids), dtype=np.uint64))
    revision = deployed["on_edit"].revision.encode()
    assert all(lineage[n][b"code"] == revision for n in new_ids)
