"""Supervoxel -> L2 parents and L2 -> supervoxel children, from PCG.

Two readers behind one small interface (:class:`GraphReader`):

- :class:`BigtableGraphReader` reads PCG's graph table directly: row key ``%020d``,
  family ``0``; ``parents`` is one little-endian uint64 per cell, and the parent at
  time T is the newest cell with timestamp <= T; ``children`` is a little-endian
  uint64 array, zstd-compressed when it starts with the zstd magic ``28 B5 2F FD``.
- :class:`GrapheneGraphReader` asks a PCG server through CloudVolume's graphene
  client (``get_roots(stop_layer=2)``, ``get_leaves``), for deployments without
  direct Bigtable access.

Atomic cross-chunk edges (what the geometry check compares a chunk's faces with) are
PCG's ``Connectivity.AtomicCrossChunkEdge``: family ``3``, column
``atomic_cross_edges_<layer>`` on each L2 row, a zstd-compressed little-endian uint64
array of ``[supervoxel of this L2 node, partner supervoxel in another chunk]`` pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import numpy as np
import zstandard

from l2cache.domain import ids as idlib
from l2cache.gcp.bigtable import CellFilter, RowReader

if TYPE_CHECKING:  # annotations only
    from l2cache.config import DatasetConfig

GRAPH_FAMILY = "0"
PARENTS = b"parents"
CHILDREN = b"children"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_BATCH = 5_000
CROSS_EDGE_FAMILY = "3"
CROSS_EDGE_PREFIX = b"atomic_cross_edges_"


class GraphReader(Protocol):
    """What computing a chunk needs of a graph (L2 parents, and the checks for lost
    input), so the workers run unchanged on PCG's Bigtable, a PCG server or a test
    double."""

    def l2_parents(self, sv_ids: np.ndarray, timestamp: datetime | None = None) -> np.ndarray:
        """L2 parent of each supervoxel at ``timestamp`` (now if None); 0 = unknown."""

    def l2_children(self, l2_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Supervoxel children of each L2 node that exists."""

    def has_supervoxels(
        self, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits
    ) -> bool | None:
        """Whether the graph has any supervoxel in this atomic chunk (None: cannot tell).

        Asked only when the chunk's segmentation file is missing, to decide between
        "empty chunk" and "lost input".
        """

    def chunk_supervoxels(
        self, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits
    ) -> np.ndarray | None:
        """Every supervoxel the graph has in this chunk (None: cannot tell), so a chunk
        whose segmentation lost some of them is caught before it is written."""

    def chunk_cross_edges(
        self, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits
    ) -> np.ndarray | None:
        """``(n, 2)`` atomic cross-chunk edges ``[supervoxel here, partner elsewhere]``
        the graph holds for this chunk (None: cannot tell), so a chunk whose geometry
        does not match its graph (mirrored, transposed) is caught before it is written."""


def decode_children(cell: bytes) -> np.ndarray:
    """A ``children`` cell: raw or zstd-compressed little-endian uint64 array."""
    if cell[:4] == ZSTD_MAGIC:
        cell = zstandard.ZstdDecompressor().decompress(cell)
    return np.frombuffer(cell, dtype="<u8").astype(np.uint64)


def decode_edges(cell: bytes) -> np.ndarray:
    """An ``atomic_cross_edges_<layer>`` cell: ``(n, 2)`` uint64 pairs, zstd-compressed
    (PCG writes level 22) or raw; a cell whose length is not whole pairs is refused."""
    raw = decode_children(cell)
    if raw.size % 2:
        raise ValueError(f"cross-edge cell of {raw.size} ids is not whole pairs")
    return raw.reshape(-1, 2)


def encode_edges(edges: np.ndarray) -> bytes:
    """A cross-edge cell as PCG writes it (zstd): the inverse of :func:`decode_edges`."""
    raw = np.asarray(edges, dtype="<u8").reshape(-1, 2).tobytes()
    return zstandard.ZstdCompressor(level=3).compress(raw)


def encode_children(children: np.ndarray, compress: bool) -> bytes:
    """A ``children`` cell as PCG writes it, raw or zstd-compressed: the inverse of
    :func:`decode_children`, for the tools that build and edit a local graph table."""
    raw = np.asarray(children, dtype="<u8").tobytes()
    return zstandard.ZstdCompressor(level=3).compress(raw) if compress else raw


def to_micros(timestamp: datetime | None) -> int | None:
    """Millisecond-aligned microseconds (Bigtable's cell granularity)."""
    if timestamp is None:
        return None
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return int(timestamp.timestamp() * 1000) * 1000


class BigtableGraphReader:
    """PCG's graph table, read with the fast raw ReadRows reader."""

    def __init__(self, table_name: str, reader: RowReader | None = None) -> None:
        self.reader = reader or RowReader(table_name)

    def l2_parents(self, sv_ids: np.ndarray, timestamp: datetime | None = None) -> np.ndarray:
        """The newest ``parents`` cell at or before ``timestamp`` of each supervoxel row,
        read :data:`READ_BATCH` keys per request; a supervoxel without one gets 0."""
        sv_ids = idlib.as_uint64(sv_ids)
        out = np.zeros(sv_ids.size, dtype=np.uint64)
        if sv_ids.size == 0:
            return out
        keys = idlib.row_keys(sv_ids)
        until = to_micros(timestamp)
        found: dict[bytes, bytes] = {}
        for start in range(0, len(keys), READ_BATCH):
            rows = self.reader.read(
                keys[start : start + READ_BATCH], [GRAPH_FAMILY], {GRAPH_FAMILY: [PARENTS]}, until
            )
            for key, row in rows.items():
                cell = row.get(GRAPH_FAMILY, {}).get(PARENTS)
                if cell is not None:
                    found[key] = cell
        if found:
            index = {k: i for i, k in enumerate(keys)}
            pos = np.fromiter((index[k] for k in found), dtype=np.int64, count=len(found))
            values = np.frombuffer(b"".join(found.values()), dtype="<u8")
            out[pos] = values
        return out

    def l2_children(self, l2_ids: np.ndarray) -> dict[int, np.ndarray]:
        """The newest ``children`` cell of each L2 row, decoded; ids without a row are
        left out, so a caller can tell a missing node from an empty one."""
        l2_ids = idlib.as_uint64(l2_ids)
        out: dict[int, np.ndarray] = {}
        keys = idlib.row_keys(l2_ids)
        for start in range(0, len(keys), READ_BATCH):
            rows = self.reader.read(
                keys[start : start + READ_BATCH], [GRAPH_FAMILY], {GRAPH_FAMILY: [CHILDREN]}
            )
            for key, row in rows.items():
                cell = row.get(GRAPH_FAMILY, {}).get(CHILDREN)
                if cell is not None:
                    out[int(key)] = decode_children(cell)
        return out

    def has_supervoxels(self, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits) -> bool:
        """Any row in the key range of the chunk's layer-1 ids (one row read at most).

        Supervoxel ids of a chunk share its layer-1 chunk id in their high bits, so
        their ``%020d`` keys form one contiguous range.
        """
        return self.reader.any_in_range(*_layer1_range(chunk_coords, spatial_bits))

    def chunk_supervoxels(
        self, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits
    ) -> np.ndarray:
        """Every supervoxel id the graph has in this atomic chunk (a keys-only range read)."""
        keys = self.reader.keys_in_range(*_layer1_range(chunk_coords, spatial_bits))
        return np.array([int(k) for k in keys], dtype=np.uint64)

    def chunk_cross_edges(
        self, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits
    ) -> np.ndarray:
        """The atomic cross edges of the chunk's L2 rows as the chunk's ingest wrote
        them (one range read of family ``3``, every version with its timestamp).

        Only cells at the earliest timestamp of the chunk are kept: PCG writes a whole
        atomic chunk at one timestamp, and those edges are contacts across a face. An
        edit writes new L2 rows later, and a merge's edge joins two supervoxels the user
        picked, which need not touch; the ingest rows an edit supersedes stay in the
        table (PCG never rewrites them), so nothing ingest knew is lost by this cut.
        ``(0, 2)`` when the graph holds no cross edges for the chunk.
        """
        rows = self.reader.versions(
            ranges=[_chunk_range(2, chunk_coords, spatial_bits)],
            cells=CellFilter({CROSS_EDGE_FAMILY: None}),
        )
        cells = [
            (stamp, value)
            for row in rows.values()
            for qualifier, versions in row.get(CROSS_EDGE_FAMILY, {}).items()
            if qualifier.startswith(CROSS_EDGE_PREFIX)
            for stamp, value in versions
        ]
        if not cells:
            return np.zeros((0, 2), dtype=np.uint64)
        first = min(stamp for stamp, _ in cells)
        return np.concatenate([decode_edges(v) for stamp, v in cells if stamp == first])


def _chunk_range(
    layer: int, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits
) -> tuple[bytes, bytes]:
    """Row-key range of a chunk's nodes of ``layer``: they share its chunk id."""
    first = int(idlib.chunk_id_from_coords(layer, np.asarray(chunk_coords)[None], spatial_bits)[0])
    seg_bits = 64 - 8 - 3 * int(spatial_bits.bits_for(np.array([layer]))[0])
    return idlib.row_key(first), idlib.row_key(first + (1 << seg_bits))


def _layer1_range(
    chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits
) -> tuple[bytes, bytes]:
    """Row-key range of a chunk's supervoxels: they share its layer-1 chunk id."""
    return _chunk_range(1, chunk_coords, spatial_bits)


class GrapheneGraphReader:
    """A PCG server through CloudVolume's graphene client.

    The CAVE token comes from ``token`` or CloudVolume's usual secret files
    (``~/.cloudvolume/secrets/cave-secret.json``).
    """

    def __init__(self, url: str, token: str | None = None) -> None:
        from cloudvolume import CloudVolume

        self.cv = CloudVolume(url, progress=False, use_https=True, secrets=token)

    def l2_parents(self, sv_ids: np.ndarray, timestamp: datetime | None = None) -> np.ndarray:
        """``get_roots(stop_layer=2)`` at ``timestamp``: the server answers the same
        question the graph table does (an empty query is not sent)."""
        sv_ids = idlib.as_uint64(sv_ids)
        if sv_ids.size == 0:
            return np.zeros(0, dtype=np.uint64)
        ts = None if timestamp is None else timestamp.timestamp()
        return np.asarray(self.cv.get_roots(sv_ids, stop_layer=2, timestamp=ts), dtype=np.uint64)

    def has_supervoxels(self, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits) -> None:
        """A PCG server offers no cheap "is this chunk empty" query: cannot tell."""
        return None

    def chunk_supervoxels(
        self, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits
    ) -> None:
        """Nor a list of a chunk's supervoxels: the graph-side check is skipped."""
        return None

    def chunk_cross_edges(
        self, chunk_coords: Sequence[int], spatial_bits: idlib.SpatialBits
    ) -> None:
        """Nor a chunk's cross edges in one query: the geometry check is skipped."""
        return None

    def l2_children(self, l2_ids: np.ndarray) -> dict[int, np.ndarray]:
        """The supervoxels of each L2 node: one ``get_leaves`` request per node, within
        the volume's bounds."""
        return {
            int(node): np.asarray(self.cv.get_leaves(int(node), self.cv.bounds, 0), np.uint64)
            for node in idlib.as_uint64(l2_ids).tolist()
        }


def make_graph_reader(dataset: DatasetConfig) -> GraphReader:
    """The reader a dataset's ``graph`` entry names."""
    g = dataset.graph
    if g.kind == "bigtable":
        return BigtableGraphReader(
            f"projects/{g.project}/instances/{g.instance}/tables/{g.table_id}"
        )
    if g.kind == "graphene":
        return GrapheneGraphReader(g.url)
    raise ValueError(f"unknown graph kind {g.kind!r}")
