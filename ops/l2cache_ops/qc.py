"""QC of a run: are the values it wrote complete and plausible, before they become a release?

A bulk or region run is checked on three things, each with its reasons when it fails:

- **Coverage**: the L2 ids the graph has in the run's chunks at the run's snapshot
  time (one key-range read of the supervoxel rows per chunk, parents at that time)
  against the rows the run wrote (one key-range read of the cache table per chunk:
  the L2 ids of a chunk are contiguous in ``%020d`` key order, and a bulk or region
  run writes every cell at its own timestamp). Missing ids, rows the graph does not
  have, malformed rows and chunks that are not done are all reasons.
- **Distributions** of every feature, per run (mergeable fixed-bin histograms with
  exact count / min / max / mean, and quantiles read off the histogram) and per chunk
  (node count, covered voxels and each feature's median), so a run of millions of
  chunks is checked in constant memory per feature.
- **Diff** against the previous release of the same region: per chunk, node count
  and covered voxels against the release that currently covers that chunk (read
  from that release's own stored QC report, nothing recomputed), with the thresholds
  of the dataset map's ``qc:`` section.

The report is stored in the runs table under ``qc:<run>``: the summary as JSON in
``report`` and the per-chunk table (columnar JSON, zstd) in ``chunks:<part>`` cells
of at most :data:`CHUNKS_PER_CELL` chunks, so no cell grows past a few MB.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from l2cache.compute import DatasetContext, load_chunk_l2
from l2cache.config import DatasetConfig
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import BY_NAME, FEATURE_FAMILY, LINEAGE_FAMILY
from l2cache.domain.ids import SpatialBits
from l2cache.domain.lineage import utc_now
from l2cache.domain.regions import region_chunks
from l2cache.gcp.bigtable import CellFilter, read_rows
from l2cache.inputs.graph import GRAPH_FAMILY, PARENTS
from l2cache.store.ledger import RunRecord
from l2cache_ops.ledger import chunk_rows
from l2cache_ops.qc_reports import BATCH_KINDS, chunk_ids_of
from l2cache_ops.releases import baseline_for_chunks, release_state
from l2cache_ops.rollback import chunk_key_ranges

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.table import Table

READ_CHUNKS = 64  # chunks per key-range read (one RowSet with one range per chunk)
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
LOG_BINS = 300  # geometric bins: ~3-7% wide over the features' ranges
LINEAR_BINS = 100
MAX_EXAMPLES = 10


@dataclass(frozen=True)
class QcThresholds:
    """When a run fails QC. Changes are relative (0.05 = 5%) per chunk, against the
    release currently covering that chunk; coverage is the fraction of the graph's L2
    ids of the run's chunks that have a row of the run."""

    max_node_count_change: float = 0.05
    max_covered_voxels_change: float = 0.05
    min_coverage: float = 1.0

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], base: QcThresholds | None = None) -> QcThresholds:
        """Thresholds from a ``qc:`` section, key by key over ``base``."""
        values = asdict(base or cls())
        for key, value in (raw or {}).items():
            if key not in values:
                raise ValueError(f"unknown key {key!r} (known: {', '.join(values)})")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{key} must be a non-negative number, got {value!r}")
            values[key] = float(value)
        if values["min_coverage"] > 1:
            raise ValueError("min_coverage is a fraction, at most 1.0")
        return cls(**values)


# -- feature series ---------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One distribution QC tracks: a scalar per node derived from one stored attribute."""

    name: str
    scale: str  # "log": zero bin + geometric bins up to ``hi``; "linear": 0..hi
    unit: str


SERIES: tuple[Series, ...] = (
    Series("size_nm3", "log", "nm^3"),
    Series("area_nm2", "log", "nm^2"),
    Series("max_dt_nm", "log", "nm"),
    Series("mean_dt_nm", "log", "nm"),
    *(Series(f"rep_coord_{a}", "linear", "chunk fraction") for a in "xyz"),
    Series("chunk_intersect_count", "log", "voxels on chunk faces"),
    *(Series(f"pca_major_{a}", "linear", "|component|") for a in "xyz"),
    *(Series(f"pca_val_{i}", "log", "nm") for i in range(3)),
)
BY_SERIES = {s.name: s for s in SERIES}


def series_edges(series: Series, dataset: DatasetConfig) -> np.ndarray:
    """Fixed bin edges of a series for a dataset, so histograms of any runs merge and compare."""
    if series.scale == "linear":
        return np.linspace(0.0, 1.0, LINEAR_BINS + 1)
    chunk_nm3 = float(np.prod(dataset.chunk_size)) * dataset.voxel_volume_nm3
    hi = {
        "size_nm3": chunk_nm3,
        "area_nm2": float(2**32),
        "max_dt_nm": float(2**16),
        "mean_dt_nm": 65504.0,  # float16's max
        "chunk_intersect_count": 6.0 * 2**16,
    }.get(series.name, 1e8)
    return np.concatenate([[0.0], np.geomspace(1.0, hi, LOG_BINS)])


def decode_feature_rows(
    cells: list[dict[bytes, bytes]], dataset: DatasetConfig
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-series arrays of the rows' features, and a mask of malformed rows.

    ``cells`` holds each row's family-``0`` cells. A row missing a fixed-size
    attribute, or with a cell of the wrong length, is malformed (left out of the
    distributions and reported); an empty PCA cell is a node too small for PCA.
    """
    n = len(cells)
    bad = np.zeros(n, dtype=bool)
    raw: dict[str, np.ndarray] = {}
    for name in ("size_nm3", "area_nm2", "max_dt_nm", "mean_dt_nm", "rep_coord_nm",
                 "chunk_intersect_count", "pca", "pca_val"):  # fmt: skip
        attr = BY_NAME[name]
        blobs = [c.get(attr.key) for c in cells]
        lengths = np.array([-1 if b is None else len(b) for b in blobs])
        ok = lengths == attr.nbytes
        empty = (lengths == 0) if attr.may_be_empty else np.zeros(n, bool)
        bad |= ~(ok | empty)
        flat = np.full((n, max(1, attr.nbytes // attr.dtype.itemsize)), np.nan)
        idx = np.flatnonzero(ok)
        if idx.size:
            joined = b"".join(blobs[i] for i in idx.tolist())
            flat[idx] = np.frombuffer(joined, dtype=attr.dtype).reshape(idx.size, -1)
        raw[name] = flat
    good = ~bad
    cs = np.asarray(dataset.chunk_size, dtype=np.float64)
    out = {
        "size_nm3": raw["size_nm3"][:, 0] * dataset.voxel_volume_nm3,
        "area_nm2": raw["area_nm2"][:, 0],
        "max_dt_nm": raw["max_dt_nm"][:, 0],
        "mean_dt_nm": raw["mean_dt_nm"][:, 0],
        "chunk_intersect_count": raw["chunk_intersect_count"].sum(axis=1),
    }
    for a, axis in zip("xyz", range(3), strict=True):
        out[f"rep_coord_{a}"] = raw["rep_coord_nm"][:, axis] / cs[axis]
        out[f"pca_major_{a}"] = np.abs(raw["pca"][:, axis])  # row 0 = the major axis
        out[f"pca_val_{axis}"] = raw["pca_val"][:, axis]
    return {k: v[good] for k, v in out.items()}, bad


class Distribution:
    """A mergeable summary of one series: fixed-bin histogram plus exact count/min/max/mean."""

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = edges
        self.counts = np.zeros(edges.size - 1, dtype=np.int64)
        self.n, self.total = 0, 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` in. Non-finite ones are dropped: a malformed row is reported
        as malformed, and a node too small for PCA has NaN there."""
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        clipped = np.clip(values, self.edges[0], self.edges[-1])
        self.counts += np.histogram(clipped, self.edges)[0]
        self.n += int(values.size)
        self.total += float(values.sum())
        self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))

    def quantiles(self, qs: Iterable[float] = QUANTILES) -> dict[str, float]:
        """Quantiles read off the histogram (linear within a bin, clamped to min/max)."""
        if self.n == 0:
            return {}
        cum = np.cumsum(self.counts)
        out = {}
        for q in qs:
            target = q * self.n
            i = int(np.searchsorted(cum, target, side="left"))
            i = min(i, self.counts.size - 1)
            before = cum[i - 1] if i else 0
            frac = (target - before) / self.counts[i] if self.counts[i] else 0.0
            value = self.edges[i] + frac * (self.edges[i + 1] - self.edges[i])
            out[f"p{round(q * 100):02d}"] = _round(min(max(value, self.lo), self.hi))
        return out

    def summary(self, unit: str = "") -> dict[str, Any]:
        """The report's JSON of the series: exact count/min/max/mean, quantiles, and only
        the occupied span of the histogram (a report stays small however many bins)."""
        nz = np.flatnonzero(self.counts)
        first, last = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        return {
            "unit": unit,
            "count": self.n,
            "min": _round(self.lo) if self.n else None,
            "max": _round(self.hi) if self.n else None,
            "mean": _round(self.total / self.n) if self.n else None,
            "quantiles": self.quantiles(),
            # only the occupied span of bins: edges[first..last], counts[first..last-1]
            "histogram": {
                "edges": [_round(e) for e in self.edges[first : last + 1].tolist()],
                "counts": self.counts[first:last].tolist(),
            },
        }


def _round(value: float) -> float:
    """Five significant digits: enough to compare runs, short in the stored JSON."""
    return float(f"{value:.5g}")


# -- reading ------------------------------------------------------------------------------
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

    One read of the chunks' key ranges, cells at exactly the run's timestamp (a bulk
    or region run writes every cell at it); a row is the run's when its
    ``lineage:run`` at that version names the run.
    """
    start = run.cell_timestamp_ms * 1000
    cells = CellFilter(start_micros=start, end_micros=start + 1000, per_column=1)
    ranges = chunk_key_ranges(chunk_ids, spatial_bits)
    out: dict[int, dict[int, dict[bytes, bytes]]] = {
        int(c): {} for c in np.asarray(chunk_ids).tolist()
    }
    mine = run.run_id.encode()
    keys, rows = [], []
    for key, row in read_rows(table, ranges=ranges, cells=cells).items():
        if row.get(LINEAGE_FAMILY, {}).get(b"run") != mine:
            continue
        keys.append(int(key))
        rows.append(dict(row.get(FEATURE_FAMILY, {})))
    if keys:
        cids = idlib.get_chunk_id(np.asarray(keys, dtype=np.uint64), spatial_bits).tolist()
        for key, cid, cells in zip(keys, cids, rows, strict=True):
            out.setdefault(cid, {})[key] = cells
    return out


def _ms(ts: datetime) -> int:
    """Milliseconds since the epoch (Bigtable's cell granularity); naive means UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return int(ts.timestamp() * 1000)


# -- the check ----------------------------------------------------------------------------
def run_qc(
    ctx: DatasetContext, run_id: str, thresholds: QcThresholds | None = None
) -> dict[str, Any]:
    """Check a bulk or region run; returns the report (not stored: see :func:`save_report`)."""
    thresholds = thresholds or QcThresholds()
    ledger, ds = ctx.ledger, ctx.dataset
    run = ledger.get_run(run_id)
    if run.dataset != ds.name:
        raise ValueError(f"run {run_id} belongs to dataset {run.dataset!r}, not {ds.name!r}")
    if run.kind not in BATCH_KINDS:
        raise ValueError(f"QC checks bulk and region runs; {run_id} is a {run.kind} run")
    bits = ds.spatial_bits
    coords = np.asarray(region_chunks(run.region), dtype=np.int64).reshape(-1, 3)
    cids = chunk_ids_of(coords, bits)
    ledger_rows = {r["chunk_id"]: r for r in chunk_rows(ledger, run_id)}
    dists = {s.name: Distribution(series_edges(s, ds)) for s in SERIES}
    table: dict[str, list[Any]] = {
        k: []
        for k in (
            "chunk_id",
            "coords",
            "status",
            "expected",
            "rows",
            "missing",
            "extra",
            "malformed",
            "covered_voxels",
            *(f"p50.{s.name}" for s in SERIES),
        )  # fmt: skip
    }
    missing_examples: list[str] = []
    extra_examples: list[str] = []
    pca_empty = 0
    for start in range(0, cids.size, READ_CHUNKS):
        part_ids, part_coords = (
            cids[start : start + READ_CHUNKS],
            coords[start : start + READ_CHUNKS],
        )
        expected = graph_l2_ids(ctx, part_coords, run.snapshot)
        written = run_rows(ctx.store.table, run, part_ids, bits)
        for cid, c in zip(part_ids.tolist(), part_coords.tolist(), strict=True):
            rows = written.get(cid, {})
            want = expected.get(cid, np.zeros(0, np.uint64))
            have = np.fromiter(rows, dtype=np.uint64, count=len(rows))
            missing = np.setdiff1d(want, have)
            extra = np.setdiff1d(have, want)
            missing_examples += [str(v) for v in missing[: MAX_EXAMPLES - len(missing_examples)]]
            extra_examples += [str(v) for v in extra[: MAX_EXAMPLES - len(extra_examples)]]
            values, bad = decode_feature_rows(list(rows.values()), ds)
            pca_empty += int(np.isnan(values["pca_val_0"]).sum())
            for name, dist in dists.items():
                dist.add(values[name])
            size = values["size_nm3"]
            status = ledger_rows.get(cid, {}).get("status", "not started")
            for key, value in (
                ("chunk_id", str(cid)),
                ("coords", c),
                ("status", status),
                ("expected", int(want.size)),
                ("rows", int(have.size)),
                ("missing", int(missing.size)),
                ("extra", int(extra.size)),
                ("malformed", int(bad.sum())),
                ("covered_voxels", int(round(size.sum() / ds.voxel_volume_nm3))),
            ):
                table[key].append(value)
            for s in SERIES:
                v = values[s.name]
                v = v[np.isfinite(v)]
                table[f"p50.{s.name}"].append(_round(float(np.median(v))) if v.size else None)

    n_chunks = len(table["chunk_id"])
    expected_total = int(sum(table["expected"]))
    missing_total = int(sum(table["missing"]))
    extra_total = int(sum(table["extra"]))
    malformed_total = int(sum(table["malformed"]))
    matched = expected_total - missing_total
    ratio = 1.0 if expected_total == 0 else matched / expected_total
    not_done = [
        {"chunk": table["coords"][i], "status": table["status"][i],
         "error": ledger_rows.get(int(table["chunk_id"][i]), {}).get("error")}
        for i in range(n_chunks) if table["status"][i] != "done"
    ]  # fmt: skip
    coverage = {
        "ratio": _round(ratio),
        "expected_l2_ids": expected_total,
        "rows_written": int(sum(table["rows"])),
        "matched": matched,
        "missing": missing_total,
        "extra": extra_total,
        "malformed": malformed_total,
        "chunks": n_chunks,
        "chunks_done": n_chunks - len(not_done),
        "chunks_not_done": not_done[:MAX_EXAMPLES],
        "missing_examples": missing_examples,
        "extra_examples": extra_examples,
    }
    baseline = baseline_for_chunks(ledger, ds.name, [int(c) for c in table["chunk_id"]])
    diff = _diff(table, baseline, thresholds)
    reasons = _reasons(coverage, not_done, diff, thresholds)
    per_chunk = {}
    for key in ("expected", "rows", "missing", "covered_voxels"):
        values = np.asarray(table[key], dtype=np.float64)
        per_chunk[key] = _stats(values)
    return {
        "run_id": run.run_id,
        "dataset": ds.name,
        "kind": run.kind,
        "region": run.region,
        "created_at": utc_now().isoformat(),
        "passed": not reasons,
        "reasons": reasons,
        "thresholds": asdict(thresholds),
        "lineage": run.provenance(),
        "release_state": release_state(ledger, ds.name),
        "coverage": coverage,
        "features": {s.name: dists[s.name].summary(s.unit) for s in SERIES},
        "pca_empty": pca_empty,
        "per_chunk": per_chunk,
        "diff": diff,
        "chunks": table,
    }


def _stats(values: np.ndarray) -> dict[str, Any]:
    """Count, min, max, mean and the report's quantiles of a per-chunk column."""
    if values.size == 0:
        return {"count": 0}
    qs = np.quantile(values, QUANTILES)
    return {
        "count": int(values.size),
        "min": _round(values.min()),
        "max": _round(values.max()),
        "mean": _round(values.mean()),
        "quantiles": {
            f"p{round(q * 100):02d}": _round(v) for q, v in zip(QUANTILES, qs, strict=True)
        },
    }


def _change(old: float, new: float) -> float:
    """Relative change; from 0 to anything is the absolute new value (never inf in JSON)."""
    return abs(new - old) / old if old else float(new != 0) * max(1.0, abs(new))


def _diff(
    table: dict[str, list[Any]], baseline: dict[int, dict[str, Any]], th: QcThresholds
) -> dict[str, Any] | None:
    """Per chunk, node count and covered voxels against the release covering the chunk."""
    if not baseline:
        return None
    rows = []
    for i, cid in enumerate(table["chunk_id"]):
        base = baseline.get(int(cid))
        if base is None:
            continue
        new_nodes, new_vox = table["rows"][i], table["covered_voxels"][i]
        rows.append(
            {
                "chunk": table["coords"][i],
                "release": base["release"],
                "nodes": [base["nodes"], new_nodes],
                "covered_voxels": [base["covered_voxels"], new_vox],
                "node_count_change": _round(_change(base["nodes"], new_nodes)),
                "covered_voxels_change": _round(_change(base["covered_voxels"], new_vox)),
            }
        )
    over_nodes = [r for r in rows if r["node_count_change"] > th.max_node_count_change]
    over_vox = [r for r in rows if r["covered_voxels_change"] > th.max_covered_voxels_change]
    worst = sorted(rows, key=lambda r: -max(r["node_count_change"], r["covered_voxels_change"]))
    return {
        "releases": sorted({r["release"] for r in rows}),
        "chunks_compared": len(rows),
        "node_count_change": _stats(np.array([r["node_count_change"] for r in rows])),
        "covered_voxels_change": _stats(np.array([r["covered_voxels_change"] for r in rows])),
        "chunks_over_node_count": len(over_nodes),
        "chunks_over_covered_voxels": len(over_vox),
        "per_chunk": rows,
        "worst": worst[:MAX_EXAMPLES],
    }


def _reasons(
    coverage: dict[str, Any],
    not_done: list[dict[str, Any]],
    diff: dict[str, Any] | None,
    th: QcThresholds,
) -> list[str]:
    """Why the run fails QC, one sentence per failed check with examples; empty: passed."""
    reasons = []
    if not_done:
        sample = "; ".join(f"{d['chunk']} {d['status']}" for d in not_done[:3])
        reasons.append(f"{len(not_done)} of {coverage['chunks']} chunks not done ({sample})")
    if coverage["ratio"] < th.min_coverage:
        reasons.append(
            f"coverage {coverage['ratio']:.4f} < {th.min_coverage:g}: {coverage['missing']} of "
            f"{coverage['expected_l2_ids']} L2 ids in the run's chunks have no row of the run "
            f"(e.g. {', '.join(coverage['missing_examples'][:3])})"
        )
    if coverage["extra"]:
        reasons.append(
            f"{coverage['extra']} rows of the run are not L2 ids of the graph at its snapshot "
            f"(e.g. {', '.join(coverage['extra_examples'][:3])})"
        )
    if coverage["malformed"]:
        reasons.append(f"{coverage['malformed']} rows of the run have malformed feature cells")
    if diff:
        for key, count, limit in (
            ("node_count_change", diff["chunks_over_node_count"], th.max_node_count_change),
            ("covered_voxels_change", diff["chunks_over_covered_voxels"], th.max_covered_voxels_change),
        ):  # fmt: skip
            if count:
                w = max(diff["per_chunk"], key=lambda r, k=key: r[k])
                what = key.removesuffix("_change").replace("_", " ")
                field_ = "nodes" if key == "node_count_change" else "covered_voxels"
                reasons.append(
                    f"{count} of {diff['chunks_compared']} chunks changed {what} by more than "
                    f"{limit:.0%} against release {w['release']} (worst: chunk {w['chunk']} "
                    f"{w[field_][0]} -> {w[field_][1]}, {w[key]:+.1%})"
                )
    return reasons
