"""The ids path's labels: each id's own ``children`` vs the chunk's parents at a time.

    .venv/bin/python bench/ids_children.py [--repeat 5] [--ks 1,5,20,100]

On real pinky40 data built into a PCG-layout dataset with 256x256x512 chunks (the
production chunk size) in the real Bigtable emulator, k new L2 ids are made in chunk
(1, 0, 0) by real PCG-style splits, then one process measures, in paired rounds (old
then new, each figure's median over the rounds) so machine noise hits both alike:

- ``old``: what the ids path did before issue 20: the L2 parents of every supervoxel of
  the chunk at a time (``graph.l2_parents``), and :func:`labels_from_supervoxels`
  (dense index, voxel hash, remap to the whole chunk's L2 labels).
- ``new``: the requested ids' ``children`` cells (``graph.l2_children(ids)``), and
  :func:`labels_from_children` (dense index, voxel hash + children mapping in a thread,
  disjoint groups) plus one label volume per group (:meth:`IdLabels.group_labels`, the
  last in place), the hash awaited.

Both get the same supervoxel array (the chunk read, identical for both, is outside the
timings), and the features of the requested ids are checked byte-identical between the
two. Also the end-to-end load + engine of both (``load_chunk_l2`` + ``compute_features(
only=ids)`` vs :func:`load_chunk_ids` + :func:`features_of_ids`), integrity checks included.
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
NAME = "pinky40_ids"
RES = (16.0, 16.0, 40.0)
CHUNK = (256, 256, 512)
COORDS = [1, 0, 0]


def measure(ctx, ids: np.ndarray, repeat: int) -> dict[str, float]:
    """Median-round seconds of each part, old and new, for ``ids`` of chunk COORDS."""
    from l2cache.compute import features_of_ids, load_chunk_ids, load_chunk_l2
    from l2cache.engine.chunk_labels import labels_from_children, labels_from_supervoxels
    from l2cache.engine.features import compute_features
    from l2cache.inputs.volume import read_chunk

    sv = read_chunk(ctx.dataset, COORDS)
    rounds = []
    for _ in range(repeat):
        r: dict[str, float] = {}
        laps: dict[str, float] = {}
        t = time.perf_counter()
        old = labels_from_supervoxels(sv, lambda v: ctx.graph.l2_parents(v, None), laps)
        total = time.perf_counter() - t
        r["old_graph"] = laps["graph"]  # the parents of every supervoxel of the chunk
        r["old_labels"] = total - laps["graph"]
        r["sv"] = int(old.sv_ids.size)
        t = time.perf_counter()
        children = ctx.graph.l2_children(ids)
        r["new_graph"] = time.perf_counter() - t
        t = time.perf_counter()
        new = labels_from_children(sv, children)
        last = len(new.groups) - 1
        groups = [new.group_labels(i, consume=i == last) for i in range(last + 1)]
        assert len(new.checksum) == 16  # the hash (in a thread) is part of the cost
        r["new_labels"] = time.perf_counter() - t
        r["groups"] = len(groups)
        del groups
        t = time.perf_counter()
        chunk = load_chunk_l2(ctx, COORDS, None)
        want = compute_features(chunk.dense, RES, only=ids)
        r["old_e2e"] = time.perf_counter() - t
        del chunk
        t = time.perf_counter()
        got = features_of_ids(load_chunk_ids(ctx, COORDS, ids).labels, RES)
        r["new_e2e"] = time.perf_counter() - t
        assert got["l2id"].tolist() == sorted(ids.tolist()), "every id computed"
        for key in want:
            assert got[key].tobytes() == want[key].tobytes(), key
        del old, new
        rounds.append(r)
    # each figure's median over the rounds (the machine is shared: one slow round
    # should move one figure, not pick the whole row)
    return {key: float(np.median([r[key] for r in rounds])) for key in rounds[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ks", default="1,5,20,100")
    args = parser.parse_args()
    ks = [int(v) for v in args.ks.split(",")]

    import crackle
    import yaml

    from l2cache.compute import dataset_context
    from l2cache.config import load_config
    from l2cache.gcp.bigtable import bigtable_instance
    from l2cache.store.ledger import create_runs_table
    from l2cache_tools.cli.dataset_cmd import build_into_config
    from l2cache_tools.dataset.edits import split_for_new_ids
    from l2cache_tools.local.emulators import start_bigtable_emulator
    from l2cache_tools.local.stack import INSTANCE, PROJECT

    with tempfile.TemporaryDirectory() as tmp:
        emu = start_bigtable_emulator(log_dir=Path(tmp))
        try:
            os.environ.update(emu.env)
            config_path = Path(tmp) / "l2cache.yaml"
            config_path.write_text(
                yaml.safe_dump(
                    {
                        "bigtable": {"project": PROJECT, "instance": INSTANCE},
                        "runs_table_id": "l2cache_runs",
                        "datasets": {},
                    }
                )
            )
            os.environ["L2CACHE_CONFIG"] = str(config_path)
            instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
            create_runs_table(instance, "l2cache_runs")
            volume = crackle.load(str(VOLUME))
            build_into_config(config_path, NAME, volume, Path(tmp) / "sv", RES, CHUNK)
            del volume
            ctx = dataset_context(load_config(config_path), NAME)
            graph = instance.table(NAME)
            print(
                f"# ids path labels, chunk {COORDS} of pinky40 {RES} nm, 256x256x512 chunks, "
                f"Bigtable emulator; median of {args.repeat} paired rounds per figure; seconds"
            )
            print(
                f"{'k':>4} {'sv':>6} {'groups':>6} {'old_graph':>9} {'old_labels':>10} "
                f"{'new_graph':>9} {'new_labels':>10} {'new/old':>8} "
                f"{'old_e2e':>8} {'new_e2e':>8} {'e2e':>6}"
            )
            used: set[int] = set()
            made: list[int] = []
            for k in ks:
                more, _ = split_for_new_ids(graph, ctx.dataset, COORDS, k - len(made), used)
                made.extend(more.tolist())
                ids = np.array(made[:k], dtype=np.uint64)
                r = measure(ctx, ids, args.repeat)
                old = r["old_graph"] + r["old_labels"]
                new = r["new_graph"] + r["new_labels"]
                print(
                    f"{k:>4} {int(r['sv']):>6} {int(r['groups']):>6} "
                    f"{r['old_graph']:>9.4f} {r['old_labels']:>10.4f} "
                    f"{r['new_graph']:>9.4f} {r['new_labels']:>10.4f} {new / old:>8.2f} "
                    f"{r['old_e2e']:>8.3f} {r['new_e2e']:>8.3f} {r['new_e2e'] / r['old_e2e']:>6.2f}"
                )
        finally:
            emu.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
