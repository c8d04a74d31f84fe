"""The local dataset builder produces a PCG-shaped dataset that keeps every voxel."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest

from l2cache.config import parse_config
from l2cache.domain import ids
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.inputs.graph import BigtableGraphReader
from l2cache.inputs.volume import read_chunk
from l2cache_tools.dataset import build_dataset
from l2cache_tools.dataset.remap import remap_to_l2

CHUNK = (48, 48, 24)


@pytest.fixture(scope="module")
def built(bigtable_emulator, tmp_path_factory):
    volume = np.load("tests/data/pinky40_crop_96x96x48.npz")["labels"]
    out = tmp_path_factory.mktemp("seg")
    instance = bigtable_instance("build-test", "inst", admin=True)
    result = build_dataset(volume, f"file://{out}", (16, 16, 40), CHUNK, instance, "g")
    cfg = parse_config(
        {
            "bigtable": {"project": "build-test", "instance": "inst"},
            "datasets": {
                "g": {
                    "segmentation": result.segmentation,
                    "graph": {
                        "kind": "bigtable",
                        "project": "build-test",
                        "instance": "inst",
                        "table_id": "g",
                    },
                    "cache_table_id": "c",
                }
            },
        }
    )
    reader = BigtableGraphReader(instance.table("g").name)
    return volume, result, cfg.dataset("g"), reader


def test_every_voxel_kept_and_l2_nodes_are_connected_pieces_of_one_object(built):
    volume, result, ds, reader = built
    assert result.n_chunks == 8 and result.grid == (2, 2, 2)
    seen_l2 = set()
    for coords in np.ndindex(*result.grid):
        sv = read_chunk(ds, coords)
        lo = np.array(coords) * CHUNK
        orig = volume[lo[0] : lo[0] + CHUNK[0], lo[1] : lo[1] + CHUNK[1], lo[2] : lo[2] + CHUNK[2]]
        assert ((sv != 0) == (orig != 0)).all()  # no voxel lost or invented
        svs = np.unique(sv[sv != 0])
        parents = reader.l2_parents(svs)
        assert (parents != 0).all()  # every supervoxel has exactly one L2 parent
        assert (ids.get_layer(svs) == 1).all() and (ids.get_layer(parents) == 2).all()
        assert (ids.get_chunk_coords(svs, ds.spatial_bits) == coords).all()
        assert (ids.get_chunk_coords(parents, ds.spatial_bits) == coords).all()
        l2 = remap_to_l2(sv, svs, parents)
        nodes = np.unique(l2[l2 != 0])
        assert not seen_l2 & set(nodes.tolist())  # L2 nodes never cross chunk borders
        seen_l2 |= set(nodes.tolist())
        # each L2 node is one 6-connected piece of one original object
        pieces = cc3d.connected_components(l2, connectivity=6)
        assert np.unique(pieces[pieces != 0]).size == nodes.size
        pairs = np.unique(np.stack([l2[l2 != 0], orig[l2 != 0]]), axis=1)
        assert pairs.shape[1] == nodes.size
        children = reader.l2_children(nodes)
        assert sorted(np.concatenate(list(children.values())).tolist()) == sorted(svs.tolist())
    assert len(seen_l2) == result.n_l2
    assert result.n_sv > result.n_l2  # some L2 nodes have several supervoxels
