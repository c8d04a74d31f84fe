"""``qc --verify``: the deep check the workers' figures cannot replace, for a bounded box.

The L2 ids the graph has in each chunk at the run's snapshot (one key-range read of the
supervoxel rows per chunk: the supervoxels of a chunk are contiguous in ``%020d`` key
order) against the rows the run wrote (one key-range read of the cache per chunk, at the
run's cell version); missing, extra and malformed rows, and chunks whose rows differ
from what the worker recorded (rows lost after they were written). It re-reads every
row it checks, so QC runs it on a region of at most ``VERIFY_MAX_CHUNKS`` chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from l2cache.compute import DatasetContext, load_chunk_l2
from l2cache.config import DatasetConfig
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import BY_NAME, FEATURE_FAMILY
from l2cache.domain.ids import SpatialBits
from l2cache.engine.chunk_qc import all_edges, series_values
from l2cache.gcp.bigtable import CellFilter, RowReader, read_rows
from l2cache.inputs.graph import GRAPH_FAMILY, PARENTS
from l2cache.store import lineage_rows
from l2cache.store.ledger import RunRecord
from l2cache_ops.qc_reports import chunk_ids_of
from l2cache_ops.qc_summary import MAX_EXAMPLES, Coverage, Distribution, chunk_figures
from l2cache_ops.rollback import chunk_key_ranges

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.table import Table

READ_CHUNKS = 64  # chunks per key-range read (one RowSet, one range per chunk)


class Verifier:
    """The deep check of a bounded box: the graph's L2 ids against the cache rows the run
    wrote, per chunk, and the rows against what the worker recorded."""

    def __init__(self, ctx: DatasetContext, run: RunRecord) -> None:
        self.ctx, self.run = ctx, run
        self.edges = all_edges(ctx.dataset)
        self.reads = {"cache_rows": 0, "graph_chunks": 0, "recorded_mismatch": 0}

    def check(
        self,
        coords: np.ndarray,
        cids: np.ndarray,
        ledger_rows: Mapping[int, Mapping[str, Any]],
        cov: Coverage,
        dists: Mapping[str, Distribution],
    ) -> None:
        ds = self.ctx.dataset
        for start in range(0, cids.size, READ_CHUNKS):
            part_ids = cids[start : start + READ_CHUNKS]
            part_coords = coords[start : start + READ_CHUNKS]
            expected = graph_l2_ids(self.ctx, part_coords, self.run.snapshot)
            written = run_rows(self.ctx.store.table, self.run, part_ids, ds.spatial_bits)
            self.reads["graph_chunks"] += int(part_ids.size)
            for cid, c in zip(part_ids.tolist(), part_coords.tolist(), strict=True):
                rows = written.get(cid, {})
                self.reads["cache_rows"] += len(rows)
                want = expected.get(cid, np.zeros(0, np.uint64))
                have = np.fromiter(rows, dtype=np.uint64, count=len(rows))
                row = ledger_rows.get(cid) or {}
                done = row.get("status") == "done"
                # a chunk not done was already counted; its graph ids are still missing
                missing, extra = np.setdiff1d(want, have), np.setdiff1d(have, want)
                cov.expected += int(want.size)
                cov.rows += int(have.size)
                cov.missing += int(missing.size)
                cov.extra += int(extra.size)
                room = MAX_EXAMPLES - len(cov.missing_examples)
                cov.missing_examples += [str(v) for v in missing[: max(room, 0)].tolist()]
                room = MAX_EXAMPLES - len(cov.extra_examples)
                cov.extra_examples += [str(v) for v in extra[: max(room, 0)].tolist()]
                feats, bad = decode_feature_rows(list(rows.values()), ds)
                cov.malformed += int(bad.sum())
                values = series_values(feats, ds)
                cov.pca_empty += int(np.isnan(values["pca_val_0"]).sum())
                cov.covered_voxels += int(np.asarray(feats["size_nm3"], dtype=np.int64).sum())
                for name, dist in dists.items():
                    dist.add(values[name])
                if done and isinstance(row.get("qc"), dict):  # what the worker counted
                    cov.add_inputs(c, row["qc"])
                recorded = chunk_figures(row) if done else None
                if recorded is not None and recorded["nodes"] != int(have.size):
                    self.reads["recorded_mismatch"] += 1
                    if len(cov.chunk_examples) < MAX_EXAMPLES:
                        cov.chunk_examples.append(
                            {"chunk": c, "recorded_rows": recorded["nodes"], "rows": int(have.size),
                             "graph_l2": int(want.size)}
                        )  # fmt: skip


def decode_feature_rows(
    cells: list[dict[bytes, bytes]], dataset: DatasetConfig
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The rows' stored features as the engine's arrays (the dict ``compute_features``
    returns, without ``l2id``), and a mask of malformed rows (left out of the arrays).

    ``cells`` holds each row's family-``0`` cells. A row missing a fixed-size attribute,
    or with a cell of the wrong length, is malformed; an empty PCA cell is a node too
    small for PCA (NaN, as the engine has it).
    """
    n = len(cells)
    bad = np.zeros(n, dtype=bool)
    raw: dict[str, np.ndarray] = {}
    for name, attr in BY_NAME.items():
        blobs = [c.get(attr.key) for c in cells]
        lengths = np.array([-1 if b is None else len(b) for b in blobs], dtype=np.int64)
        ok = lengths == attr.nbytes
        empty = (lengths == 0) if attr.may_be_empty else np.zeros(n, bool)
        bad |= ~(ok | empty)
        width = max(1, attr.nbytes // attr.dtype.itemsize)
        flat = np.full((n, width), np.nan)
        idx = np.flatnonzero(ok)
        if idx.size:
            joined = b"".join(blobs[i] for i in idx.tolist())
            flat[idx] = np.frombuffer(joined, dtype=attr.dtype).reshape(idx.size, -1)
        raw[name] = flat.reshape((n, *attr.shape))
    good = ~bad
    return {k: v[good] for k, v in raw.items()}, bad


def graph_l2_ids(
    ctx: DatasetContext, coords: np.ndarray, timestamp: datetime
) -> dict[int, np.ndarray]:
    """Layer-2 chunk id -> the L2 ids the graph has in that chunk at ``timestamp``.

    PCG's Bigtable: one read of the chunks' supervoxel key ranges (layer-1 ids of a
    chunk are contiguous too), newest ``parents`` cell at or before ``timestamp``; the
    distinct parents are the chunk's L2 ids. A graphene server has no such query, so
    each chunk is read and relabelled as the worker does (``load_chunk_l2``).
    """
    bits = ctx.dataset.spatial_bits
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    l2_cids = chunk_ids_of(coords, bits).tolist()
    g = ctx.dataset.graph
    if g.kind != "bigtable":
        return {
            cid: load_chunk_l2(ctx, c.tolist(), timestamp).l2_ids
            for cid, c in zip(l2_cids, coords, strict=True)
        }
    table = f"projects/{g.project}/instances/{g.instance}/tables/{g.table_id}"
    cells = CellFilter(
        columns={GRAPH_FAMILY: [PARENTS]},
        end_micros=(_ms(timestamp) + 1) * 1000,  # the newest parent at or before it
        per_column=1,
    )
    ranges = chunk_key_ranges(chunk_ids_of(coords, bits, layer=1), bits)
    svs, parents = [], []
    for key, row in read_rows(table, ranges=ranges, cells=cells).items():
        parent = row.get(GRAPH_FAMILY, {}).get(PARENTS)
        if parent is not None:
            svs.append(int(key))
            parents.append(parent)
    out = {cid: np.zeros(0, dtype=np.uint64) for cid in l2_cids}
    if not svs:
        return out
    parent_ids = np.frombuffer(b"".join(parents), dtype="<u8").astype(np.uint64)
    sv_chunk = chunk_ids_of(idlib.get_chunk_coords(np.asarray(svs, np.uint64), bits), bits)
    keep = parent_ids != 0
    for cid in np.unique(sv_chunk[keep]).tolist():
        if cid in out:
            out[cid] = np.unique(parent_ids[keep & (sv_chunk == cid)])
    return out


def run_rows(
    table: Table | str, run: RunRecord, chunk_ids: np.ndarray, spatial_bits: SpatialBits
) -> dict[int, dict[int, dict[bytes, bytes]]]:
    """Layer-2 chunk id -> {l2 id: family-0 cells} of the rows ``run`` wrote there.

    Cells at exactly the run's timestamp (a bulk or region run writes every cell at
    it), in rows its lineage names: the chunks' lineage rows of the run at that
    timestamp (and, for rows written before lineage rows, a row's own ``lineage:run``).
    One read of the lineage and one of the feature rows named.
    """
    start = run.cell_timestamp_ms * 1000
    ranges = chunk_key_ranges(chunk_ids, spatial_bits)
    out: dict[int, dict[int, dict[bytes, bytes]]] = {
        int(c): {} for c in np.asarray(chunk_ids).tolist()
    }
    found = lineage_rows.run_versions(
        RowReader(table), [run.run_id], ranges, start_micros=start, end_micros=start + 1000
    )
    if not found.rows:
        return out
    cells = CellFilter(
        columns={FEATURE_FAMILY: None}, start_micros=start, end_micros=start + 1000, per_column=1
    )
    keys, rows = [], []
    for key, row in read_rows(table, keys=sorted(found.rows), cells=cells).items():
        keys.append(int(key))
        rows.append(dict(row.get(FEATURE_FAMILY, {})))
    if keys:
        cids = idlib.get_chunk_id(np.asarray(keys, dtype=np.uint64), spatial_bits).tolist()
        for key, cid, cells_ in zip(keys, cids, rows, strict=True):
            out.setdefault(cid, {})[key] = cells_
    return out


def _ms(ts: datetime) -> int:
    """Milliseconds since the epoch (Bigtable's cell granularity); naive means UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return int(ts.timestamp() * 1000)


# the bin layout is the engine's: a report names it so a reader can tell
