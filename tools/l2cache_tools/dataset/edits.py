"""PCG-style merges and splits on the local graph table, published like PCG does.

An edit writes new L2 rows (``children``) and new ``parents`` cells for the affected
supervoxels at a new timestamp; the old cells stay, so a read at an earlier time
still sees the old graph. New segment ids and operation ids come from counter rows
(read-modify-write increments), as in PCG. The message is PCG's own:
``pickle.dumps({"operation_id", "new_lvl2_ids", "new_root_ids"})`` with attributes
``table_id``, ``user_id``, ``remesh_priority``, ``remesh``.
"""

from __future__ import annotations

import pickle
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from l2cache.config import DatasetConfig
from l2cache.domain import ids as idlib
from l2cache.domain.lineage import utc_now
from l2cache.gcp.bigtable_write import Row, increment, write_rows
from l2cache.inputs.graph import (
    CHILDREN,
    GRAPH_FAMILY,
    PARENTS,
    BigtableGraphReader,
    encode_children,
)
from l2cache.inputs.volume import read_chunk
from l2cache_tools.dataset.remap import remap_to_l2

from .build import COUNTER_FAMILY, counter_key

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.table import Table
    from google.cloud.pubsub_v1 import PublisherClient

OPERATION_COUNTER = b"counter:operations"


@dataclass(frozen=True)
class EditResult:
    """One applied edit: what its PCG message carries (operation id, new L2 ids) and
    what a test or the demo checks afterwards (the replaced ids, the edit's time)."""

    operation_id: int
    timestamp: datetime
    new_l2_ids: np.ndarray
    old_l2_ids: np.ndarray
    kind: str


def _increment(table: Table, key: bytes, by: int = 1) -> int:
    """Atomically advance a counter row by ``by``; returns its new value."""
    return increment(table, key, COUNTER_FAMILY, b"segment", by, what="graph counter")


def _new_l2_ids(
    table: Table, chunk_coord: np.ndarray | Sequence[int], count: int, bits: idlib.SpatialBits
) -> np.ndarray:
    """``count`` L2 ids never used in the chunk, from its segment counter."""
    chunk_id = int(idlib.chunk_id_from_coords(2, np.asarray(chunk_coord)[None], bits)[0])
    last = _increment(table, counter_key(chunk_id), count)
    segs = np.arange(last - count + 1, last + 1)
    return idlib.encode_ids(2, np.tile(chunk_coord, (count, 1)), segs, bits)


def _write(table: Table, new_nodes: dict[int, np.ndarray], ts: datetime) -> None:
    rows = []
    for node, children in new_nodes.items():
        row = Row(idlib.row_key(node))
        row.set_cell(
            GRAPH_FAMILY, CHILDREN, encode_children(children, children.size >= 4), timestamp=ts
        )
        rows.append(row)
        for sv in children.tolist():
            r = Row(idlib.row_key(sv))
            r.set_cell(GRAPH_FAMILY, PARENTS, struct.pack("<Q", node), timestamp=ts)
            rows.append(r)
    write_rows(table, rows, "graph edit")


def _edit_timestamp() -> datetime:
    # strictly after anything written in the same millisecond
    time.sleep(0.002)
    return utc_now()


def _operation_id(table: Table) -> int:
    return _increment(table, OPERATION_COUNTER)


def _l2_volume(
    dataset: DatasetConfig, table: Table, chunk_coord: Sequence[int]
) -> tuple[np.ndarray, BigtableGraphReader]:
    """The chunk's L2 label volume as the graph has it now, and the reader that read it."""
    reader = BigtableGraphReader(table.name)
    sv = read_chunk(dataset, chunk_coord)
    sv_ids = np.unique(sv)
    sv_ids = sv_ids[sv_ids != 0]
    parents = reader.l2_parents(sv_ids, utc_now())
    return remap_to_l2(sv, sv_ids, parents), reader


def pick_merge(dataset: DatasetConfig, table: Table, chunk_coord: Sequence[int]) -> tuple[int, int]:
    """The two L2 nodes of a chunk with the largest contact surface."""
    labels, _ = _l2_volume(dataset, table, chunk_coord)
    pairs = []
    for axis in range(3):
        a = np.take(labels, range(labels.shape[axis] - 1), axis=axis).ravel()
        b = np.take(labels, range(1, labels.shape[axis]), axis=axis).ravel()
        keep = (a != b) & (a != 0) & (b != 0)
        pairs.append(np.stack([np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])], 1))
    allp = np.concatenate(pairs)
    if allp.size == 0:
        raise ValueError(f"no two touching L2 nodes in chunk {tuple(chunk_coord)}")
    uniq, counts = np.unique(allp, axis=0, return_counts=True)
    best = uniq[np.argmax(counts)]
    return int(best[0]), int(best[1])


def pick_split(
    dataset: DatasetConfig, table: Table, chunk_coord: Sequence[int], exclude: Iterable[int] = ()
) -> int:
    """The L2 node of a chunk with the most supervoxels (>= 2), not in ``exclude``."""
    labels, reader = _l2_volume(dataset, table, chunk_coord)
    nodes = np.unique(labels)
    nodes = nodes[(nodes != 0) & ~np.isin(nodes, np.asarray(list(exclude), dtype=np.uint64))]
    children = reader.l2_children(nodes)
    node, kids = max(children.items(), key=lambda kv: (kv[1].size, -kv[0]))
    if kids.size < 2:
        raise ValueError(f"no L2 node with several supervoxels in chunk {tuple(chunk_coord)}")
    return node


def apply_merge(table: Table, dataset: DatasetConfig, a: int, b: int) -> EditResult:
    """Merge two L2 nodes of one chunk into one new L2 node."""
    bits = dataset.spatial_bits
    coords = idlib.get_chunk_coords(np.array([a, b], dtype=np.uint64), bits)
    if not (coords[0] == coords[1]).all():
        raise ValueError("a merge of L2 nodes must stay inside one chunk")
    reader = BigtableGraphReader(table.name)
    kids = reader.l2_children(np.array([a, b], dtype=np.uint64))
    if len(kids) != 2:
        raise ValueError("both L2 nodes must exist")
    ts = _edit_timestamp()
    (new,) = _new_l2_ids(table, coords[0], 1, bits)
    _write(table, {int(new): np.sort(np.concatenate([kids[a], kids[b]]))}, ts)
    return EditResult(
        _operation_id(table), ts, np.array([new], np.uint64), np.array([a, b], np.uint64), "merge"
    )


def apply_split(table: Table, dataset: DatasetConfig, node: int) -> EditResult:
    """Split an L2 node's supervoxels into two halves, each a new L2 node."""
    bits = dataset.spatial_bits
    reader = BigtableGraphReader(table.name)
    kids = reader.l2_children(np.array([node], dtype=np.uint64)).get(node)
    if kids is None or kids.size < 2:
        raise ValueError(f"L2 node {node} needs at least two supervoxels to split")
    coord = idlib.get_chunk_coords(np.uint64(node), bits)[0]
    ts = _edit_timestamp()
    new = _new_l2_ids(table, coord, 2, bits)
    kids = np.sort(kids)
    half = kids.size // 2
    _write(table, {int(new[0]): kids[:half], int(new[1]): kids[half:]}, ts)
    return EditResult(_operation_id(table), ts, new, np.array([node], np.uint64), "split")


def split_for_new_ids(
    table: Table, dataset: DatasetConfig, chunk_coord: Sequence[int], k: int, used: set[int]
) -> tuple[np.ndarray, EditResult | None]:
    """Apply splits in one chunk until they created at least ``k`` new L2 ids.

    Returns the first ``k`` new ids and the last split's result (None when ``k`` is
    0); ``used`` (nodes split or created so far, updated in place) keeps later calls
    off the same nodes. The benchmarks use it for edits of exactly ``k`` new ids.
    """
    new_ids: list[int] = []
    result: EditResult | None = None
    while len(new_ids) < k:
        target = pick_split(dataset, table, chunk_coord, exclude=used)
        used.add(target)
        result = apply_split(table, dataset, target)
        used.update(result.new_l2_ids.tolist())
        new_ids.extend(result.new_l2_ids.tolist())
    return np.array(new_ids[:k], dtype=np.uint64), result


def edit_message(
    table_id: str, result: EditResult, user_id: str = "l2cache-demo"
) -> tuple[bytes, dict[str, str]]:
    """PCG's edit message for ``result`` (payload bytes, attributes)."""
    payload = {
        "operation_id": int(result.operation_id),
        "new_lvl2_ids": result.new_l2_ids.tolist(),
        "new_root_ids": [],
    }
    attributes = {
        "table_id": table_id,
        "user_id": user_id,
        "remesh_priority": "true",
        "remesh": "true",
    }
    return pickle.dumps(payload), attributes


def publish_edit(
    publisher: PublisherClient, topic_path: str, table_id: str, result: EditResult
) -> str:
    """Publish ``result`` as PCG's edit message and wait for the message id, so on_edit
    receives exactly what a PCG deployment sends (a failed publish raises here)."""
    data, attributes = edit_message(table_id, result)
    return publisher.publish(topic_path, data, **attributes).result(timeout=30)
