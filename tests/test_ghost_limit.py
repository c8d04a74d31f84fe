"""The per-chunk ghost limit (compute.ghosts_over_limit): one ghost never fails a chunk,
a chunk that lost a real share of its supervoxels does (issue 20 review, item 1)."""

from dataclasses import replace

import pytest

from l2cache.compute import ghosts_over_limit
from l2cache.config import parse_config

BASE = {
    "bigtable": {"project": "p", "instance": "i"},
    "datasets": {
        "ds": {
            "segmentation": "file:///x",
            "graph": {"kind": "bigtable", "project": "p", "instance": "i", "table_id": "ds"},
            "cache_table_id": "cache_ds",
            "resolution": [8, 8, 40],
            "voxel_offset": [0, 0, 0],
            "chunk_size": [256, 256, 512],
            "spatial_bits": {"1": 10, "2": 10},
        }
    },
}


@pytest.mark.parametrize(
    ("ghosts", "graph_sv", "over"),
    [
        (1, 1, False),  # one ghost: never, even a chunk of one supervoxel
        (5, 10, False),  # within the allowance (a handful)
        (6, 100, True),  # over the allowance and over 5 % of the chunk
        (6, 200, False),  # over the allowance, 3 % of a big chunk
        (14, 69, True),  # a fifth of the chunk lost
        (6, None, True),  # the graph cannot say how many: the allowance alone
    ],
)
def test_the_limit_needs_both_the_allowance_and_the_fraction(ghosts, graph_sv, over):
    ds = parse_config(BASE).dataset("ds")
    assert ghosts_over_limit(ds, ghosts, graph_sv) is over


def test_the_map_moves_the_limit():
    ds = replace(parse_config(BASE).dataset("ds"), ghost_sv_allowance=0, max_ghost_sv_fraction=0)
    assert ghosts_over_limit(ds, 1, 1000)
    assert not ghosts_over_limit(ds, 0, 1000)
