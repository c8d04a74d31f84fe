"""Build a supervoxel volume and a PCG-layout graph table from a labelled volume.

Per atomic chunk: each 6-connected piece of an object becomes an L2 node (so L2 nodes
never cross chunk borders, as in PCG); each piece is cut by the chunk's octants into
supervoxels, so large pieces get several supervoxels and the sv -> L2 mapping is
exercised for real. Ids are real PCG ids (layer, chunk coordinates, segment).
Graph rows: supervoxels get ``parents``, L2 nodes ``children`` (zstd-compressed when
they have >= 4 children, raw otherwise, so both encodings occur), all at the build
timestamp. A counter row per chunk holds the highest L2 segment id for later edits.
Atomic cross-chunk edges as PCG's ingest writes them (family ``3``, column
``atomic_cross_edges_<layer>`` on each L2 row, ``[own sv, partner sv]`` pairs): two
supervoxels in face-adjacent chunks that touch across the face and belong to the same
object (PCG keeps only the agglomeration's active edges), stored on both sides, at the
build timestamp. The geometry check (``l2cache.inputs.geometry_check``) reads them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import cc3d
import fastremap
import numpy as np

from l2cache.domain import ids as idlib
from l2cache.domain.lineage import utc_now
from l2cache.gcp.bigtable_write import Row, write_rows
from l2cache.inputs.graph import (
    CHILDREN,
    CROSS_EDGE_FAMILY,
    CROSS_EDGE_PREFIX,
    GRAPH_FAMILY,
    PARENTS,
    encode_children,
    encode_edges,
)

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.instance import Instance
    from google.cloud.bigtable.table import Table

SPATIAL_BITS = {1: 10, 2: 10, 3: 9, 4: 8, 5: 7, 6: 6}
COMPRESS_FROM = 4  # children lists at least this long are stored zstd-compressed
COUNTER_FAMILY = "counters"


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_dataset` made, so the caller can write the dataset's map entry
    (segmentation path, graph table) and report its size."""

    segmentation: str
    graph_table_id: str
    timestamp: datetime
    n_chunks: int
    n_l2: int
    n_sv: int
    grid: tuple[int, int, int]


def counter_key(chunk_id: int) -> bytes:
    """The row of a chunk's L2 segment counter: edits draw new ids from it, as PCG does,
    so they never reuse an id the build gave out."""
    return b"counter:%020d" % chunk_id


def create_graph_table(instance: Instance, table_id: str) -> Table:
    """Graph table with family ``0`` (every version kept), the cross-edge family ``3``
    and the counter family."""
    table = instance.table(table_id)
    if not table.exists():
        table.create(
            column_families={GRAPH_FAMILY: None, CROSS_EDGE_FAMILY: None, COUNTER_FAMILY: None}
        )
    return table


def chunk_supervoxels(sub: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Local supervoxel labels (0 = background), the L2 piece of each sv, piece count."""
    pieces, n_pieces = cc3d.connected_components(sub, connectivity=6, return_N=True)
    pieces = pieces.astype(np.uint64)
    octant = np.zeros(sub.shape, dtype=np.uint64)
    for axis in range(3):
        half = sub.shape[axis] // 2
        shape = [1, 1, 1]
        shape[axis] = sub.shape[axis]
        octant += (np.arange(sub.shape[axis]) >= half).astype(np.uint64).reshape(
            shape
        ) << np.uint64(axis)
    key = pieces * np.uint64(8) + octant
    key[pieces == 0] = 0
    local, mapping = fastremap.renumber(key, preserve_zero=True, in_place=True)
    n_sv = len(mapping) - (1 if 0 in mapping else 0)
    piece_of_sv = np.zeros(n_sv + 1, dtype=np.uint64)
    for k, v in mapping.items():
        if v:
            piece_of_sv[v] = k // 8
    return local.astype(np.uint64), piece_of_sv, int(n_pieces)


def cross_edge_layer(a: Sequence[int], b: Sequence[int]) -> int:
    """PCG's layer of an edge between chunks ``a`` and ``b`` (fan-out 2): 1 within a chunk,
    else one more per halving until both chunks share a parent chunk."""
    a, b, layer = np.asarray(a), np.asarray(b), 1
    while (a != b).any():
        a, b, layer = a // 2, b // 2, layer + 1
    return layer


def face_contacts(
    low_sv: np.ndarray, low_obj: np.ndarray, high_sv: np.ndarray, high_obj: np.ndarray
) -> np.ndarray:
    """Distinct ``[low sv, high sv]`` pairs touching across a face: the two facing
    planes (supervoxel ids and original object labels), same object, both non-zero."""
    touch = (low_obj == high_obj) & (low_obj != 0) & (low_sv != 0) & (high_sv != 0)
    pairs = np.stack([low_sv[touch], high_sv[touch]], axis=1).astype(np.uint64)
    return np.unique(pairs, axis=0) if pairs.size else np.zeros((0, 2), np.uint64)


def _cross_edge_rows(edges: dict[int, dict[int, list[np.ndarray]]], ts: datetime) -> list[Row]:
    """One row per L2 node with its cross edges, one cell per layer, as PCG stores them."""
    rows = []
    for l2, by_layer in edges.items():
        row = Row(idlib.row_key(l2))
        for layer, parts in sorted(by_layer.items()):
            pairs = np.unique(np.concatenate(parts), axis=0)
            qualifier = CROSS_EDGE_PREFIX + str(layer).encode()
            row.set_cell(CROSS_EDGE_FAMILY, qualifier, encode_edges(pairs), timestamp=ts)
        rows.append(row)
    return rows


def build_dataset(
    volume: np.ndarray,
    segmentation: str,
    resolution: Sequence[float],
    chunk_size: Sequence[int],
    instance: Instance,
    graph_table_id: str,
    timestamp: datetime | None = None,
) -> BuildResult:
    """Write the supervoxel volume and the graph table; returns what was built."""
    from cloudvolume import CloudVolume

    volume = np.asarray(volume)
    shape = np.array(volume.shape)
    cs = np.array(chunk_size)
    grid = tuple(int(v) for v in -(-shape // cs))
    bits = idlib.SpatialBits.from_mapping(SPATIAL_BITS)
    ts = timestamp or utc_now()
    info = CloudVolume.create_new_info(
        num_channels=1,
        layer_type="segmentation",
        data_type="uint64",
        encoding="compressed_segmentation",
        resolution=list(resolution),
        voxel_offset=[0, 0, 0],
        volume_size=shape.tolist(),
        chunk_size=[int(min(c, 64)) for c in cs],
    )
    info["graph"] = {"chunk_size": cs.tolist(), "spatial_bit_masks": SPATIAL_BITS}
    cv = CloudVolume(segmentation, info=info, progress=False, compress="gzip")
    cv.commit_info()
    table = create_graph_table(instance, graph_table_id)
    rows, n_l2, n_sv = [], 0, 0
    # each chunk's high planes (sv ids, object labels) and sv -> L2, until its + neighbours
    # are built; cross edges per L2 node and layer, written once the whole volume is done
    planes: dict[tuple[int, ...], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    parent_of: dict[tuple[int, ...], dict[int, int]] = {}
    cross: dict[int, dict[int, list[np.ndarray]]] = {}
    for cx in range(grid[0]):
        for cy in range(grid[1]):
            for cz in range(grid[2]):
                coord = np.array([cx, cy, cz])
                lo = coord * cs
                hi = np.minimum(lo + cs, shape)
                sub = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
                local, piece_of_sv, n_pieces = chunk_supervoxels(sub)
                n = piece_of_sv.size - 1
                sv_ids = np.zeros(n + 1, dtype=np.uint64)
                if n:
                    sv_ids[1:] = idlib.encode_ids(
                        1, np.tile(coord, (n, 1)), np.arange(1, n + 1), bits
                    )
                l2_ids = (
                    idlib.encode_ids(
                        2, np.tile(coord, (n_pieces, 1)), np.arange(1, n_pieces + 1), bits
                    )
                    if n_pieces
                    else np.zeros(0, np.uint64)
                )
                global_sv = sv_ids[local]
                cv[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = np.asfortranarray(global_sv)
                parent_l2 = np.zeros(n + 1, dtype=np.uint64)
                if n:
                    parent_l2[1:] = l2_ids[(piece_of_sv[1:] - 1).astype(np.int64)]
                key = (cx, cy, cz)
                parent_of[key] = dict(zip(sv_ids[1:].tolist(), parent_l2[1:].tolist(), strict=True))
                planes[key] = {
                    a: (_plane(global_sv, a, -1).copy(), _plane(sub, a, -1).copy())
                    for a in range(3)
                }
                _add_cross_edges(key, global_sv, sub, planes, parent_of, cross)
                for sv, parent in zip(sv_ids[1:].tolist(), parent_l2[1:].tolist(), strict=True):
                    row = Row(idlib.row_key(sv))
                    row.set_cell(GRAPH_FAMILY, PARENTS, struct.pack("<Q", parent), timestamp=ts)
                    rows.append(row)
                order = np.argsort(parent_l2[1:], kind="stable")
                sorted_parents = parent_l2[1:][order]
                sorted_svs = sv_ids[1:][order]
                bounds = np.flatnonzero(np.diff(sorted_parents)) + 1
                for parent, children in zip(
                    np.split(sorted_parents, bounds), np.split(sorted_svs, bounds), strict=True
                ):
                    if parent.size == 0:
                        continue
                    row = Row(idlib.row_key(parent[0]))
                    row.set_cell(
                        GRAPH_FAMILY,
                        CHILDREN,
                        encode_children(children, compress=children.size >= COMPRESS_FROM),
                        timestamp=ts,
                    )
                    rows.append(row)
                chunk_id = int(idlib.chunk_id_from_coords(2, coord[None], bits)[0])
                row = Row(counter_key(chunk_id))
                row.set_cell(COUNTER_FAMILY, b"segment", struct.pack(">q", n_pieces))
                rows.append(row)
                n_l2 += n_pieces
                n_sv += n
                if len(rows) >= 5000:
                    _commit(table, rows)
                    rows = []
    rows.extend(_cross_edge_rows(cross, ts))
    for start in range(0, len(rows), 5000):
        _commit(table, rows[start : start + 5000])
    return BuildResult(segmentation, graph_table_id, ts, int(np.prod(grid)), n_l2, n_sv, grid)


def _plane(a: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One plane of ``a`` across ``axis``, a view (``np.take(axis=)`` copies all of ``a``)."""
    at: list[int | slice] = [slice(None)] * 3
    at[axis] = index
    return a[tuple(at)]


def _add_cross_edges(
    key: tuple[int, ...],
    global_sv: np.ndarray,
    sub: np.ndarray,
    planes: dict,
    parent_of: dict,
    cross: dict[int, dict[int, list[np.ndarray]]],
) -> None:
    """The edges between chunk ``key`` and its three low neighbours (built before it),
    added on both sides; a neighbour's planes are dropped once its last + neighbour
    has used them (the x neighbour is the last: chunks are built x, y, z nested)."""
    for axis in range(3):
        if key[axis] == 0:
            continue
        low = tuple(k - (i == axis) for i, k in enumerate(key))
        low_sv, low_obj = planes[low][axis]
        pairs = face_contacts(low_sv, low_obj, _plane(global_sv, axis, 0), _plane(sub, axis, 0))
        if not pairs.size:
            continue
        layer = cross_edge_layer(low, key)
        for here, there, chunk in ((0, 1, low), (1, 0, key)):
            parents = np.array([parent_of[chunk][int(s)] for s in pairs[:, here]], dtype=np.uint64)
            for l2 in np.unique(parents).tolist():
                mine = pairs[parents == l2][:, [here, there]]
                cross.setdefault(l2, {}).setdefault(layer, []).append(mine)
    low_x = (key[0] - 1, key[1], key[2])
    if low_x in planes:  # its y and z neighbours were built before this chunk
        del planes[low_x], parent_of[low_x]


def _commit(table: Table, rows: list[Row]) -> None:
    """Write a batch of graph rows, every row's status checked."""
    write_rows(table, rows, "graph")
