"""Atomic cross-chunk edges read from PCG's layout on the Bigtable emulator.

Family ``3``, column ``atomic_cross_edges_<layer>`` on L2 rows, zstd (PCG writes level
22) or raw uint64 pairs. Only the chunk's earliest write counts: an edit's new L2 row
(later timestamp) may carry a merge edge between supervoxels that do not touch.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import zstandard

from l2cache.domain import ids
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.inputs import graph
from l2cache_tools.dataset.build import create_graph_table

BITS = ids.SpatialBits.from_mapping({1: 10, 2: 10})
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
HERE = [3, 2, 1]


def sv(coords, seg):
    return int(ids.encode_ids(1, np.asarray([coords]), seg, BITS)[0])


def l2(coords, seg):
    return int(ids.encode_ids(2, np.asarray([coords]), seg, BITS)[0])


@pytest.fixture(scope="module")
def table(bigtable_emulator):
    instance = bigtable_instance("cross-test", "inst", admin=True)
    return create_graph_table(instance, "pcg_cross")


def test_the_ingest_edges_of_a_chunk_are_read_and_an_edits_are_not(table):
    ingest_a = np.array([[sv(HERE, 1), sv([4, 2, 1], 5)], [sv(HERE, 2), sv([4, 2, 1], 6)]])
    ingest_b = np.array([[sv(HERE, 3), sv([3, 1, 1], 9)]])
    merge = np.array([[sv(HERE, 4), sv([2, 2, 1], 7)]])  # an edit's, maybe not touching
    rows = []
    for node, cells, ts in (
        (
            l2(HERE, 1),
            {2: zstandard.ZstdCompressor(level=22).compress(ingest_a.astype("<u8").tobytes())},
            T0,
        ),
        (l2(HERE, 2), {3: ingest_b.astype("<u8").tobytes()}, T0),  # raw, another layer
        (l2(HERE, 3), {2: graph.encode_edges(np.concatenate([ingest_a, merge]))}, T1),
        (l2([4, 2, 1], 1), {2: graph.encode_edges(ingest_a[:, ::-1])}, T0),  # the neighbour's
    ):
        r = table.direct_row(ids.row_key(node))
        for layer, value in cells.items():
            r.set_cell("3", b"atomic_cross_edges_%d" % layer, value, timestamp=ts)
        r.set_cell("0", b"children", b"", timestamp=ts)  # another family: not read
        rows.append(r)
    assert all(s.code == 0 for s in table.mutate_rows(rows))
    reader = graph.BigtableGraphReader(table.name)
    edges = reader.chunk_cross_edges(HERE, BITS)
    expected = np.concatenate([ingest_a, ingest_b]).astype(np.uint64)
    assert sorted(map(tuple, edges.tolist())) == sorted(map(tuple, expected.tolist()))
    assert reader.chunk_cross_edges([0, 0, 0], BITS).shape == (0, 2)  # nothing stored


def test_a_cell_that_is_not_whole_pairs_is_refused():
    with pytest.raises(ValueError, match="not whole pairs"):
        graph.decode_edges(np.arange(3, dtype="<u8").tobytes())
    pairs = np.arange(6, dtype=np.uint64).reshape(3, 2)
    assert np.array_equal(graph.decode_edges(graph.encode_edges(pairs)), pairs)
