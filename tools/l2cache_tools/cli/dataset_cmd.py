"""``l2cache dataset build|edit``: a local PCG-shaped dataset and edits on it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

if TYPE_CHECKING:  # the builder (numba, cc3d) loads only when a dataset is built
    from l2cache_tools.dataset import BuildResult

from .common import add_config_arg, config_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dataset build|edit``: a PCG-shaped dataset and PCG-style edits on this
    machine, so ingest, lookups and on_edit can be exercised without a real PCG."""
    p = sub.add_parser("dataset", help="build a local PCG dataset / apply edits")
    s = p.add_subparsers(dest="dataset_command", required=True)
    b = s.add_parser("build", help="labelled volume -> precomputed svs + PCG graph table")
    add_config_arg(b)
    b.add_argument("volume", help=".ckl/.ckl.gz (crackle) or .npz with 'labels'")
    b.add_argument("--name", required=True, help="dataset (PCG graph table) name")
    b.add_argument("--out", required=True, help="directory for the precomputed volume")
    b.add_argument("--resolution", default="16,16,40", metavar="X,Y,Z", help="nm per voxel")
    b.add_argument(
        "--chunk-size", default="128,128,128", metavar="X,Y,Z", help="voxels per atomic chunk"
    )
    b.set_defaults(func=build)
    e = s.add_parser("edit", help="apply a merge or split and publish it like PCG")
    add_config_arg(e)
    e.add_argument("kind", choices=["merge", "split"], help="the edit to apply")
    e.add_argument("--dataset", required=True, help="dataset name in the map")
    e.add_argument(
        "--chunk",
        default="0,0,0",
        metavar="X,Y,Z",
        help="chunk coordinates to edit in (its nodes are picked automatically)",
    )
    e.set_defaults(func=edit)


def load_labels(path: str) -> np.ndarray:
    """The volume to build from, as either format a cutout comes in: ``.npz`` (numpy
    only) or crackle, which is imported only when it is needed."""
    if path.endswith(".npz"):
        with np.load(path) as z:
            return z["labels"]
    import crackle

    return crackle.load(path)


def build_into_config(
    config_path: Path,
    name: str,
    volume: np.ndarray,
    out_dir: Path,
    resolution: Sequence[float],
    chunk_size: Sequence[int],
) -> BuildResult:
    """Build the dataset and add its entry (and cache table) to the dataset map."""
    from l2cache.config import load_config
    from l2cache.gcp.bigtable import bigtable_instance
    from l2cache.store.cache import create_cache_table
    from l2cache_tools.dataset import build_dataset

    cfg = load_config(config_path)
    bt = cfg.bigtable
    instance = bigtable_instance(bt.project, bt.instance, admin=True)
    built = build_dataset(
        volume, f"file://{Path(out_dir).resolve()}", resolution, chunk_size, instance, name
    )
    cache_table = f"l2cache_{name}_v1"
    create_cache_table(instance, cache_table)
    raw = yaml.safe_load(Path(config_path).read_text())
    raw.setdefault("datasets", {})[name] = {
        "segmentation": built.segmentation,
        "graph": {
            "kind": "bigtable",
            "project": bt.project,
            "instance": bt.instance,
            "table_id": name,
        },
        "cache_table_id": cache_table,
    }
    Path(config_path).write_text(yaml.safe_dump(raw))
    return built


def build(args: argparse.Namespace) -> int:
    """``dataset build``: the map is taken as a path (``--config`` or
    ``$L2CACHE_CONFIG``), not a loaded map, because the new entry is written back into
    that file."""
    import os

    config_path = Path(args.config or os.environ["L2CACHE_CONFIG"])
    res = [float(v) for v in args.resolution.split(",")]
    cs = [int(v) for v in args.chunk_size.split(",")]
    built = build_into_config(
        config_path, args.name, load_labels(args.volume), Path(args.out), res, cs
    )
    print(
        f"built {args.name}: {built.n_chunks} chunks {built.grid}, {built.n_l2} L2 nodes, "
        f"{built.n_sv} supervoxels -> {built.segmentation}"
    )
    return 0


def edit(args: argparse.Namespace) -> int:
    """``dataset edit``: change the graph and publish the edit as PCG does, so on_edit
    recomputes the new L2 nodes exactly as it would in production."""
    from google.cloud import pubsub_v1

    from l2cache.gcp.bigtable import bigtable_instance
    from l2cache_tools.dataset import apply_merge, apply_split, publish_edit
    from l2cache_tools.dataset.edits import pick_merge, pick_split

    cfg = config_from(args)
    ds = cfg.dataset(args.dataset)
    table = bigtable_instance(ds.graph.project, ds.graph.instance).table(ds.graph.table_id)
    chunk = [int(v) for v in args.chunk.split(",")]
    if args.kind == "merge":
        a, b = pick_merge(ds, table, chunk)
        result = apply_merge(table, ds, a, b)
    else:
        result = apply_split(table, ds, pick_split(ds, table, chunk))
    pub = pubsub_v1.PublisherClient()
    publish_edit(pub, pub.topic_path(cfg.pubsub.project, cfg.pubsub.edits_topic), ds.name, result)
    print(
        f"{result.kind} op {result.operation_id}: {result.old_l2_ids.tolist()} -> "
        f"{result.new_l2_ids.tolist()} (published)"
    )
    return 0
