"""PyChunkedGraph node ids, decoded and encoded as whole uint64 arrays.

A PCG node id is 64 bits::

    | layer: 8 | x: b | y: b | z: b | segment: 64 - 8 - 3b |

where ``b`` is the number of spatial bits of that id's layer. ``b`` belongs to the
dataset (graphene info ``graph.spatial_bit_masks`` or the graph's own meta), so every
function here takes it explicitly as a :class:`SpatialBits` table; nothing is
hard-coded. All functions accept scalars or arrays and never loop in Python: a lookup
of 100,000 ids is decoded in a handful of numpy passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

LAYER_BITS = 8
ID_BITS = 64
MAX_LAYER = (1 << LAYER_BITS) - 1

_U64 = np.uint64


@dataclass(frozen=True)
class SpatialBits:
    """Spatial bits per layer of one dataset.

    ``table[layer]`` is ``b`` for that layer; layers absent from the mapping given to
    :meth:`from_mapping` are marked invalid, so an id of an unknown layer raises
    instead of decoding to garbage.
    """

    table: tuple[int, ...]

    def __repr__(self) -> str:
        return f"SpatialBits({self.to_mapping()})"

    @classmethod
    def from_mapping(cls, bits_per_layer: Mapping[int | str, int]) -> SpatialBits:
        """Build from ``{layer: bits}`` (keys may be strings, as in JSON info files)."""
        table = [-1] * (MAX_LAYER + 1)
        for layer, bits in bits_per_layer.items():
            layer_i, bits_i = int(layer), int(bits)
            if not 0 <= layer_i <= MAX_LAYER:
                raise ValueError(f"layer {layer_i} outside 0..{MAX_LAYER}")
            if not 0 <= bits_i or LAYER_BITS + 3 * bits_i >= ID_BITS:
                raise ValueError(f"layer {layer_i}: {bits_i} spatial bits leave no segment bits")
            table[layer_i] = bits_i
        return cls(tuple(table))

    def bits_for(self, layers: np.ndarray) -> np.ndarray:
        """Spatial bits of each layer in ``layers``; raises on a layer the dataset lacks."""
        lookup = np.asarray(self.table, dtype=np.int64)
        bits = lookup[np.asarray(layers, dtype=np.int64)]
        if np.any(bits < 0):
            bad = np.unique(np.asarray(layers)[bits < 0])
            raise ValueError(f"layer(s) {bad.tolist()} not defined for this dataset")
        return bits

    def to_mapping(self) -> dict[int, int]:
        return {layer: bits for layer, bits in enumerate(self.table) if bits >= 0}


def as_uint64(ids: Iterable[int] | np.ndarray | int) -> np.ndarray:
    """Ids as a 1-D uint64 array, refusing values that do not fit (no silent wrap)."""
    arr = np.asarray(ids)
    if arr.dtype == np.uint64:
        return arr.reshape(-1)
    if arr.dtype.kind in "iu":
        if arr.size and arr.min() < 0:
            raise ValueError("node ids must be non-negative")
        return arr.astype(np.uint64).reshape(-1)
    if arr.dtype == object or arr.dtype.kind in "SU":
        values = [int(v) for v in arr.reshape(-1)]
        if any(v < 0 or v >= 1 << ID_BITS for v in values):
            raise ValueError("node ids must be integers in 0..2**64-1")
        return np.array(values, dtype=np.uint64)
    raise TypeError(f"node ids must be integers, got dtype {arr.dtype}")


def get_layer(ids: np.ndarray | int) -> np.ndarray:
    """Layer of each id (the top 8 bits)."""
    return (as_uint64(ids) >> _U64(ID_BITS - LAYER_BITS)).astype(np.uint8)


def _segment_bits(bits: np.ndarray) -> np.ndarray:
    return (ID_BITS - LAYER_BITS - 3 * bits).astype(np.uint64)


def get_chunk_coords(ids: np.ndarray | int, spatial_bits: SpatialBits) -> np.ndarray:
    """Chunk coordinates (x, y, z) of each id, shape (N, 3), int64."""
    ids = as_uint64(ids)
    bits = spatial_bits.bits_for(get_layer(ids)).astype(np.uint64)
    mask = (np.uint64(1) << bits) - np.uint64(1)
    x_shift = np.uint64(ID_BITS - LAYER_BITS) - bits
    x = (ids >> x_shift) & mask
    y = (ids >> (x_shift - bits)) & mask
    z = (ids >> (x_shift - 2 * bits)) & mask
    return np.stack([x, y, z], axis=1).astype(np.int64)


def get_segment_id(ids: np.ndarray | int, spatial_bits: SpatialBits) -> np.ndarray:
    """Segment id (the low bits after layer and chunk coordinates) of each id."""
    ids = as_uint64(ids)
    seg_bits = _segment_bits(spatial_bits.bits_for(get_layer(ids)))
    return ids & ((np.uint64(1) << seg_bits) - np.uint64(1))


def get_chunk_id(ids: np.ndarray | int, spatial_bits: SpatialBits) -> np.ndarray:
    """Chunk id of each id: the id with its segment bits cleared."""
    ids = as_uint64(ids)
    seg_bits = _segment_bits(spatial_bits.bits_for(get_layer(ids)))
    return (ids >> seg_bits) << seg_bits


def encode_ids(
    layer: int | np.ndarray,
    chunk_coords: np.ndarray,
    segment_ids: np.ndarray | int,
    spatial_bits: SpatialBits,
) -> np.ndarray:
    """Compose ids from layer, chunk coordinates (N, 3) and segment ids.

    Raises when a coordinate or segment id does not fit its bit field, because a
    silently truncated id would name another node.
    """
    coords = np.atleast_2d(np.asarray(chunk_coords, dtype=np.int64))
    n = coords.shape[0]
    layers = np.broadcast_to(np.asarray(layer, dtype=np.int64), (n,))
    segs = np.broadcast_to(as_uint64(segment_ids), (n,))
    if np.any((layers < 0) | (layers > MAX_LAYER)):
        raise ValueError("layer outside 0..255")
    bits = spatial_bits.bits_for(layers)
    if np.any(coords < 0) or np.any(coords >= (np.int64(1) << bits)[:, None]):
        raise ValueError("chunk coordinate does not fit the layer's spatial bits")
    seg_bits = _segment_bits(bits)
    if np.any(segs >= (np.uint64(1) << seg_bits)):
        raise ValueError("segment id does not fit the layer's segment bits")
    b = bits.astype(np.uint64)
    out = layers.astype(np.uint64) << np.uint64(ID_BITS - LAYER_BITS)
    x_shift = np.uint64(ID_BITS - LAYER_BITS) - b
    out |= coords[:, 0].astype(np.uint64) << x_shift
    out |= coords[:, 1].astype(np.uint64) << (x_shift - b)
    out |= coords[:, 2].astype(np.uint64) << (x_shift - 2 * b)
    out |= segs
    return out


def chunk_id_from_coords(
    layer: int, chunk_coords: np.ndarray, spatial_bits: SpatialBits
) -> np.ndarray:
    """Chunk id(s) of the chunk(s) at ``chunk_coords`` (N, 3) of ``layer``."""
    return encode_ids(layer, chunk_coords, 0, spatial_bits)


def row_key(node_id: int | np.integer) -> bytes:
    """Bigtable row key PCG and the L2 cache use: the id as 20 zero-padded digits."""
    return b"%020d" % int(node_id)


def row_keys(ids: np.ndarray) -> list[bytes]:
    """Row keys of many ids (``%020d``), built without a per-id format call on numpy ints."""
    return [b"%020d" % v for v in as_uint64(ids).tolist()]


def parse_row_key(key: bytes) -> int:
    """Inverse of :func:`row_key`."""
    return int(key)
