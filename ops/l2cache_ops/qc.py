"""QC of a run: are the values it wrote complete and plausible, before they become a release?

The worker summarises each chunk while it holds the features
(:mod:`l2cache.engine.chunk_qc`): the summary goes into the chunk's ledger row (column
``qc``) and its histogram bins and counts are added to the run's sharded counter rows
``qchist:<run>:<shard>``. QC merges those summaries; it re-reads nothing by default, so
its cost is set by what it is asked about, not by the run's size:

- **Run QC** (:func:`run_qc` without a region): distributions and coverage from the
  ``qchist`` shard rows (16 reads whatever the run's size), examples of chunks not done
  from the run's ``fail:`` rows (a bounded read), and the diff per chunk against the
  release covering it, reading both runs' chunk rows by key, page by page (bounded
  memory; skipped without a read when no release covers any chunk of the run).
- **Region QC** (:func:`region_qc`): the same report over a box of chunks, from the
  region's own chunk rows read by key in pages of :data:`PAGE` chunks; rows outside the
  box are never read.
- **Verify** (``verify=True``, a region of at most :data:`VERIFY_MAX_CHUNKS` chunks): the
  deep check the worker's figures cannot replace: the L2 ids the graph has at the run's
  snapshot (one key-range read of the supervoxel rows per chunk) against the rows the run
  wrote (one key-range read of the cache per chunk, at the run's cell version); missing,
  extra and malformed rows, and chunks whose rows differ from what the worker recorded.

Checks, each with its reasons when it fails: chunks not done; coverage (the graph's L2 ids
of the done chunks that have a row of the run); the per-chunk diff of node count and
covered voxels against the covering release, with the thresholds of the dataset map's
``qc:`` section. Changes are signed: a chunk that lost every node reads -100 %.

The report is a bounded summary (counts, distributions, verdicts, at most
:data:`MAX_EXAMPLES` examples of each kind, the :data:`WORST` largest changes); per-chunk
figures stay in the chunk rows (:mod:`l2cache_ops.qc_reports`).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from l2cache.compute import DatasetContext, load_chunk_l2
from l2cache.config import DatasetConfig
from l2cache.domain import ids as idlib
from l2cache.domain.attributes import BY_NAME, FEATURE_FAMILY, LINEAGE_FAMILY
from l2cache.domain.ids import SpatialBits
from l2cache.domain.lineage import utc_now
from l2cache.domain.regions import region_size
from l2cache.engine.chunk_qc import (
    BY_SERIES,
    LINEAR_BINS,
    LOG_BINS,
    QUANTILES,
    SERIES,
    TOTAL_BINS,
    Series,
    all_edges,
    bin_counts,
    decode_bins,
    parse_counters,
    round5,
    series_counts,
    series_edges,
    series_values,
    sum_value,
)
from l2cache.gcp.bigtable import CellFilter, read_rows
from l2cache.inputs.graph import GRAPH_FAMILY, PARENTS
from l2cache.store.ledger import LEDGER_FAMILY, RunRecord
from l2cache_ops.qc_reports import BATCH_KINDS, chunk_ids_of
from l2cache_ops.releases import covers, release_history, release_state
from l2cache_ops.rollback import chunk_key_ranges

if TYPE_CHECKING:  # annotations only
    from google.cloud.bigtable.table import Table

__all__ = [
    "BY_SERIES",
    "LINEAR_BINS",
    "LOG_BINS",
    "QUANTILES",
    "SERIES",
    "Distribution",
    "QcThresholds",
    "Series",
    "decode_feature_rows",
    "graph_l2_ids",
    "region_qc",
    "run_qc",
    "run_rows",
    "series_edges",
]

PAGE = 1000  # chunk rows per keyed read (region QC and the diff)
READ_CHUNKS = 64  # chunks per key-range read of --verify (one RowSet, one range per chunk)
VERIFY_MAX_CHUNKS = 10_000  # --verify re-reads the graph and the cache: a region, never a run
MAX_EXAMPLES = 10
WORST = 50  # largest per-chunk changes kept in the report (the HTML page plots them)
QC_SHARD_PREFIX = "qchist:"
CHUNK_COLUMNS = [b"status", b"coords", b"l2_count", b"qc", b"error"]


@dataclass(frozen=True)
class QcThresholds:
    """When a run fails QC. Changes are relative (0.05 = 5%) per chunk, against the
    release currently covering that chunk, in either direction; coverage is the fraction
    of the graph's L2 ids of the run's done chunks that have a row of the run."""

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


# -- distributions ------------------------------------------------------------------------
class Distribution:
    """A mergeable summary of one series: fixed-bin counts and the exact count and sum.

    Min and max are the bounds of the first and last occupied bins (a counter cannot
    merge a max; geometric bins are 3-7 % wide), and quantiles are read off the bins.
    """

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = edges
        self.counts = np.zeros(edges.size - 1, dtype=np.int64)
        self.total = 0.0

    @property
    def n(self) -> int:
        """Values counted (every finite value falls in exactly one bin)."""
        return int(self.counts.sum())

    def add(self, values: np.ndarray) -> None:
        """Count raw ``values`` in (``--verify``'s re-read rows). Non-finite ones are
        dropped: a malformed row is reported as malformed, and a node too small for PCA
        has NaN there."""
        values = values[np.isfinite(values)]
        self.counts += bin_counts(values, self.edges)
        self.total += float(values.sum())

    def add_counts(self, counts: np.ndarray, total: float) -> None:
        """Merge counts and a sum already binned (a chunk's or a counter shard's)."""
        self.counts += counts
        self.total += total

    def bounds(self) -> tuple[float, float] | None:
        """(lower edge of the first occupied bin, upper edge of the last), None if empty."""
        nz = np.flatnonzero(self.counts)
        if nz.size == 0:
            return None
        return float(self.edges[nz[0]]), float(self.edges[nz[-1] + 1])

    def quantiles(self, qs: Sequence[float] = QUANTILES) -> dict[str, float]:
        """Quantiles read off the histogram (linear within a bin)."""
        n = self.n
        if n == 0:
            return {}
        cum = np.cumsum(self.counts)
        lo, hi = self.bounds() or (0.0, 0.0)
        out = {}
        for q in qs:
            target = q * n
            i = min(int(np.searchsorted(cum, target, side="left")), self.counts.size - 1)
            before = cum[i - 1] if i else 0
            frac = (target - before) / self.counts[i] if self.counts[i] else 0.0
            value = self.edges[i] + frac * (self.edges[i + 1] - self.edges[i])
            out[f"p{round(q * 100):02d}"] = round5(min(max(float(value), lo), hi))
        return out

    def summary(self, unit: str = "") -> dict[str, Any]:
        """The report's JSON of the series: exact count and mean, min/max as bin bounds,
        quantiles, and only the occupied span of the histogram (a report stays small
        however many bins)."""
        n = self.n
        nz = np.flatnonzero(self.counts)
        first, last = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        bounds = self.bounds()
        return {
            "unit": unit,
            "count": n,
            "min": round5(bounds[0]) if bounds else None,
            "max": round5(bounds[1]) if bounds else None,
            "min_max": "bin bounds",
            "mean": round5(self.total / n) if n else None,
            "quantiles": self.quantiles(),
            "histogram": {
                "edges": [round5(e) for e in self.edges[first : last + 1].tolist()],
                "counts": self.counts[first:last].tolist(),
            },
        }


def distributions(dataset: DatasetConfig) -> dict[str, Distribution]:
    """An empty distribution per series with the dataset's fixed edges."""
    edges = all_edges(dataset)
    return {s.name: Distribution(edges[s.name]) for s in SERIES}


def add_dense(
    dists: Mapping[str, Distribution],
    dense: np.ndarray,
    sums: Mapping[str, int],
    dataset: DatasetConfig,
) -> None:
    """Merge dense bins and integer sums (a chunk's, or the run's counters) into ``dists``."""
    for s in SERIES:
        dists[s.name].add_counts(
            series_counts(dense, s), sum_value(s, sums.get(s.name, 0), dataset)
        )


# -- the report's accumulators -----------------------------------------------------------
@dataclass
class Coverage:
    """Coverage of the done chunks: the graph's L2 ids against the rows written."""

    source: str
    chunks: int = 0  # chunks in scope
    done: int = 0
    done_without_stats: int = 0  # done before workers recorded QC statistics
    expected: int = 0
    rows: int = 0
    missing: int = 0
    extra: int = 0
    malformed: int = 0
    covered_voxels: int = 0
    pca_empty: int = 0
    not_done: list[dict[str, Any]] = field(default_factory=list)
    not_done_by_status: dict[str, int] = field(default_factory=dict)
    missing_examples: list[str] = field(default_factory=list)
    extra_examples: list[str] = field(default_factory=list)
    chunk_examples: list[dict[str, Any]] = field(default_factory=list)  # chunks with gaps

    def not_done_chunk(self, coords: Sequence[int], status: str, error: Any = None) -> None:
        """Count a chunk that is not done; keep it as an example while there is room."""
        self.not_done_by_status[status] = self.not_done_by_status.get(status, 0) + 1
        if len(self.not_done) < MAX_EXAMPLES:
            self.not_done.append({"chunk": list(coords), "status": status, "error": error})

    def report(self) -> dict[str, Any]:
        """The report's ``coverage`` section (the keys releases and the dashboard read)."""
        matched = self.expected - self.missing
        return {
            "source": self.source,
            "ratio": round5(1.0 if self.expected == 0 else matched / self.expected),
            "expected_l2_ids": self.expected,
            "rows_written": self.rows,
            "matched": matched,
            "missing": self.missing,
            "extra": self.extra,
            "malformed": self.malformed,
            "covered_voxels": self.covered_voxels,
            "chunks": self.chunks,
            "chunks_done": self.done,
            "chunks_done_without_stats": self.done_without_stats,
            "chunks_not_done_count": self.chunks - self.done,
            "chunks_not_done_by_status": self.not_done_by_status,
            "chunks_not_done": self.not_done,
            "missing_examples": self.missing_examples,
            "extra_examples": self.extra_examples,
            "chunks_with_gaps": self.chunk_examples,
        }


def signed_change(old: float, new: float) -> float:
    """Relative change, signed: 10 -> 0 is -1.0 (-100 %), 10 -> 11 is +0.1. From 0 to
    n it is +n (a count, not a fraction: there is no ratio, and JSON has no inf)."""
    if old:
        return (new - old) / old
    return float(new)


@dataclass
class _Metric:
    """Streaming figures of one per-chunk change: count, signed min/max/mean, over the
    threshold (by magnitude), all in constant memory."""

    limit: float
    count: int = 0
    total: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    over: int = 0
    grown: int = 0
    shrunk: int = 0
    worst: dict[str, Any] | None = None  # the chunk with the largest change by magnitude

    def add(self, change: float, row: dict[str, Any]) -> None:
        """Count one chunk's change (``row``: the chunk's diff entry, kept if the worst)."""
        self.count += 1
        self.total += change
        self.lo, self.hi = min(self.lo, change), max(self.hi, change)
        if abs(change) > self.limit:
            self.over += 1
        self.grown += change > 0
        self.shrunk += change < 0
        if self.worst is None or abs(change) > abs(self.worst["change"]):
            self.worst = {"change": change, "row": row}

    def report(self) -> dict[str, Any]:
        """The metric's figures for the report (signed min/max/mean; the worst chunk)."""
        if not self.count:
            return {"count": 0}
        return {
            "count": self.count,
            "worst": self.worst["row"] if self.worst else None,
            "min": round5(self.lo),
            "max": round5(self.hi),
            "max_abs": round5(max(abs(self.lo), abs(self.hi))),
            "mean": round5(self.total / self.count),
            "over_threshold": self.over,
            "grown": self.grown,
            "shrunk": self.shrunk,
        }


class Diff:
    """The per-chunk diff against the covering release, in bounded memory: streaming
    figures per metric and a heap of the :data:`WORST` largest changes."""

    def __init__(self, th: QcThresholds) -> None:
        self.metrics = {
            "node_count_change": _Metric(th.max_node_count_change),
            "covered_voxels_change": _Metric(th.max_covered_voxels_change),
        }
        self.releases: set[int] = set()
        self.compared = 0
        self.baseline_missing = 0  # covered by a release whose run has no done row there
        self._worst: list[tuple[float, int, dict[str, Any]]] = []
        self._seq = 0

    def add(self, cid: int, coords: Sequence[int], release: int, old: dict, new: dict) -> None:
        """Compare one chunk: ``old``/``new`` hold ``nodes`` and ``covered_voxels`` (None
        when that run recorded no covered voxels: compared on nodes only)."""
        self.compared += 1
        self.releases.add(release)
        row: dict[str, Any] = {
            "chunk": [int(c) for c in coords],
            "chunk_id": str(cid),
            "release": release,
            "nodes": [old["nodes"], new["nodes"]],
            "covered_voxels": [old.get("covered_voxels"), new.get("covered_voxels")],
        }
        worst = 0.0
        for key, (a, b) in (
            ("node_count_change", row["nodes"]),
            ("covered_voxels_change", row["covered_voxels"]),
        ):
            if a is None or b is None:
                row[key] = None
                continue
            change = signed_change(a, b)
            row[key] = round5(change)
            self.metrics[key].add(change, row)
            worst = max(worst, abs(change) / max(self.metrics[key].limit, 1e-12))
        self._seq += 1
        item = (worst, -self._seq, row)
        if len(self._worst) < WORST:
            heapq.heappush(self._worst, item)
        elif item[:2] > self._worst[0][:2]:
            heapq.heapreplace(self._worst, item)

    def report(self) -> dict[str, Any] | None:
        """The report's ``diff`` section; None when no chunk had a release to compare with."""
        if not self.compared and not self.baseline_missing:
            return None
        worst = [r for _, _, r in sorted(self._worst, key=lambda t: (-t[0], -t[1]))]
        return {
            "releases": sorted(self.releases),
            "chunks_compared": self.compared,
            "chunks_without_baseline_row": self.baseline_missing,
            **{k: m.report() for k, m in self.metrics.items()},
            "chunks_over_node_count": self.metrics["node_count_change"].over,
            "chunks_over_covered_voxels": self.metrics["covered_voxels_change"].over,
            "worst": worst,
        }


# -- reading the runs table --------------------------------------------------------------
def read_counters(table: Table | str, run_id: str) -> tuple[dict[bytes, int], int]:
    """The run's QC counters summed over its ``qchist`` shard rows, and the rows read."""
    rows = read_rows(table, prefix=f"{QC_SHARD_PREFIX}{run_id}:".encode())
    out: dict[bytes, int] = {}
    for row in rows.values():
        for col, value in row.get(LEDGER_FAMILY, {}).items():
            out[col] = out.get(col, 0) + int.from_bytes(value, "big", signed=True)
    return out, len(rows)


def done_count(table: Table | str, run_id: str) -> tuple[int | None, int]:
    """Chunks of the run done (the run-state ``stat:`` counters' ``done`` summed; None
    for a run recorded before they existed), and the rows read: tells chunks done
    without QC statistics from chunks not done."""
    rows = read_rows(
        table,
        prefix=f"stat:{run_id}:".encode(),
        cells=CellFilter(columns={LEDGER_FAMILY: [b"done"]}, per_column=1),
    )
    if not rows:
        return None, 0
    total = sum(
        int.from_bytes(r.get(LEDGER_FAMILY, {}).get(b"done", b"\0"), "big", signed=True)
        for r in rows.values()
    )
    return total, len(rows)


def _decode(col: bytes, value: bytes) -> Any:
    """A ledger cell: ``status`` is text, every other column this module reads is JSON."""
    if col == b"status":
        return value.decode()
    try:
        return json.loads(value)
    except ValueError:
        return value.decode(errors="replace")


def read_chunk_rows(
    table: Table | str, run_id: str, chunk_ids: Sequence[int]
) -> dict[int, dict[str, Any]]:
    """Chunk id -> the fields QC reads of its ``chunk:<run>:<id>`` row (status, coords,
    l2_count, qc, error), by key; chunks with no row are absent."""
    keys = [b"chunk:%s:%020d" % (run_id.encode(), int(c)) for c in chunk_ids]
    if not keys:
        return {}
    cells = CellFilter(columns={LEDGER_FAMILY: CHUNK_COLUMNS}, per_column=1)
    out = {}
    for key, row in read_rows(table, keys=keys, cells=cells).items():
        fam = row.get(LEDGER_FAMILY, {})
        out[int(key.rsplit(b":", 1)[1])] = {c.decode(): _decode(c, v) for c, v in fam.items()}
    return out


def failure_examples(table: Table | str, run_id: str, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` of the run's ``fail:`` rows (chunks failed or retrying)."""
    rows = read_rows(table, prefix=f"fail:{run_id}:".encode(), limit=limit)
    out = []
    for row in rows.values():
        fam = {c.decode(): _decode(c, v) for c, v in row.get(LEDGER_FAMILY, {}).items()}
        out.append(
            {"chunk": fam.get("coords"), "status": fam.get("status"), "error": fam.get("error")}
        )
    return out


def box_pages(
    box: Sequence[int], spatial_bits: SpatialBits, page: int = PAGE
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(coords, layer-2 chunk ids) of every chunk of ``box``, ``page`` at a time, in
    x-major order; never the whole box in memory."""
    lo, hi = np.asarray(box[:3], dtype=np.int64), np.asarray(box[3:], dtype=np.int64)
    shape = np.maximum(hi - lo, 0)
    n = int(np.prod(shape))
    for start in range(0, n, page):
        flat = np.arange(start, min(start + page, n), dtype=np.int64)
        coords = np.stack(np.unravel_index(flat, tuple(shape.tolist())), axis=1) + lo
        yield coords, chunk_ids_of(coords, spatial_bits)


def _intersect(a: Sequence[int], b: Sequence[int]) -> list[int] | None:
    """The overlap of two chunk boxes; None when they do not meet."""
    lo = [max(a[i], b[i]) for i in range(3)]
    hi = [min(a[i + 3], b[i + 3]) for i in range(3)]
    return None if any(h <= low for low, h in zip(lo, hi, strict=True)) else [*lo, *hi]


# -- the diff against releases -----------------------------------------------------------
class Baselines:
    """Which release covers a chunk, and that release's run's figures for it.

    The releases of a dataset are few (read once); the figures are the release run's
    own chunk rows (node count = rows it wrote, covered voxels from its ``qc`` column),
    read by key for one page of chunks at a time.
    """

    def __init__(self, table: Table | str, dataset: str, ledger_releases: list[dict]) -> None:
        self.table = table
        self.releases = [r for r in reversed(ledger_releases) if not r["rolled_back"]]
        self.rows_read = 0

    def any_overlap(self, box: Sequence[int]) -> bool:
        """Whether some live release meets ``box`` at all (else the diff reads nothing)."""
        return any(_intersect(r["region"], box) is not None for r in self.releases)

    def page(
        self, coords: np.ndarray, cids: np.ndarray
    ) -> dict[int, tuple[dict[str, Any], dict[str, Any] | None]]:
        """Chunk id -> (covering release, its run's fields or None) for one page."""
        owner: dict[int, dict[str, Any]] = {}
        for c, cid in zip(coords.tolist(), cids.tolist(), strict=True):
            for release in self.releases:  # newest first
                if covers(release, c):
                    owner[cid] = release
                    break
        by_run: dict[str, list[int]] = {}
        for cid, release in owner.items():
            by_run.setdefault(release["run_id"], []).append(cid)
        out: dict[int, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        for run_id, ids in by_run.items():
            rows = read_chunk_rows(self.table, run_id, ids)
            self.rows_read += len(ids)
            for cid in ids:
                out[cid] = (owner[cid], rows.get(cid))
        return out


def _figures(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Node count and covered voxels of a done chunk row (None if not done)."""
    if not row or row.get("status") != "done":
        return None
    qc = row.get("qc") if isinstance(row.get("qc"), dict) else None
    nodes = row.get("l2_count", qc.get("nodes") if qc else None)
    if nodes is None:
        return None
    return {"nodes": int(nodes), "covered_voxels": qc.get("covered_voxels") if qc else None}


# -- the checks --------------------------------------------------------------------------
def _check_run(ctx: DatasetContext, run_id: str) -> RunRecord:
    run = ctx.ledger.get_run(run_id)
    if run.dataset != ctx.dataset.name:
        raise ValueError(
            f"run {run_id} belongs to dataset {run.dataset!r}, not {ctx.dataset.name!r}"
        )
    if run.kind not in BATCH_KINDS:
        raise ValueError(f"QC checks bulk and region runs; {run_id} is a {run.kind} run")
    if run.region is None:
        raise ValueError(f"run {run_id} has no region")
    return run


def run_qc(
    ctx: DatasetContext,
    run_id: str,
    thresholds: QcThresholds | None = None,
    region: Sequence[int] | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Check a bulk or region run (or, with ``region``, its chunks in that chunk box);
    returns the report (not stored: see :func:`l2cache_ops.qc_reports.save_report`).

    Without a region, distributions and coverage come from the run's counter shards
    (O(1) reads) and only the diff reads chunk rows. ``verify`` re-reads the graph and
    the cache (a region, or a run of at most :data:`VERIFY_MAX_CHUNKS` chunks).
    """
    if region is not None:
        return region_qc(ctx, run_id, region, thresholds, verify)
    run = _check_run(ctx, run_id)
    if verify:
        if region_size(run.region) > VERIFY_MAX_CHUNKS:
            raise ValueError(
                f"--verify re-reads the graph and the cache of every chunk it checks: give a "
                f"--region of at most {VERIFY_MAX_CHUNKS} chunks (run {run_id} has "
                f"{region_size(run.region)})"
            )
        return region_qc(ctx, run_id, run.region, thresholds, verify=True, whole=True)
    thresholds = thresholds or QcThresholds()
    ledger, ds = ctx.ledger, ctx.dataset
    table = ledger.table
    counters, shard_rows = read_counters(table, run_id)
    dense, sums, cov_counts = parse_counters(counters)
    dists = distributions(ds)
    add_dense(dists, dense, sums, ds)
    cov = Coverage(source="worker (per-chunk counters)")
    cov.chunks = region_size(run.region)
    cov.done = cov_counts["chunks"]
    done_total, stat_rows = done_count(table, run_id)
    if done_total is not None and done_total > cov.done:
        cov.done_without_stats = done_total - cov.done
        cov.done = done_total
    cov.expected, cov.rows = cov_counts["graph_l2"], cov_counts["nodes"]
    cov.missing, cov.extra = cov_counts["missing"], cov_counts["extra"]
    cov.covered_voxels, cov.pca_empty = cov_counts["covered_voxels"], cov_counts["pca_empty"]
    failures = failure_examples(table, run_id, MAX_EXAMPLES) if cov.done < cov.chunks else []
    for f in failures:
        cov.not_done.append(f)
    missing_chunks = cov.chunks - cov.done
    if missing_chunks:
        cov.not_done_by_status = {
            "not done (failed, retrying, running or not started)": missing_chunks
        }
    diff, diff_rows = _diff_box(ctx, run, run.region, thresholds)
    reads = {
        "counter_rows": shard_rows + stat_rows,
        "failure_rows": len(failures),
        **diff_rows,
    }
    scope = {"kind": "run", "region": run.region, "chunks": cov.chunks}
    return _report(ctx, run, scope, cov, dists, diff, thresholds, reads, "run counters")


def region_qc(
    ctx: DatasetContext,
    run_id: str,
    region: Sequence[int],
    thresholds: QcThresholds | None = None,
    verify: bool = False,
    whole: bool = False,
) -> dict[str, Any]:
    """QC of the run's chunks in chunk box ``region`` ``[x0, y0, z0, x1, y1, z1)`` (cut to
    the run's region): reads the box's chunk rows of the run by key, :data:`PAGE` at a
    time, and the covering releases' rows of the same chunks; nothing outside the box.

    ``verify`` also re-reads the graph and the cache of the box (at most
    :data:`VERIFY_MAX_CHUNKS` chunks). ``whole`` marks a box that is the run's whole region
    (``run_qc(verify=True)``): the report is then a run report.
    """
    thresholds = thresholds or QcThresholds()
    run = _check_run(ctx, run_id)
    region = [int(v) for v in region]
    if len(region) != 6:
        raise ValueError(f"a region is 6 chunk coordinates x0,y0,z0,x1,y1,z1, got {region}")
    box = _intersect(run.region, region)
    if box is None:
        raise ValueError(f"region {region} does not overlap run {run_id}'s region {run.region}")
    n = region_size(box)
    if verify and n > VERIFY_MAX_CHUNKS:
        raise ValueError(
            f"--verify re-reads the graph and the cache: at most {VERIFY_MAX_CHUNKS} chunks, "
            f"the region has {n}"
        )
    ds, table = ctx.dataset, ctx.ledger.table
    bits = ds.spatial_bits
    dists = distributions(ds)
    cov = Coverage(source="worker (chunk rows)")
    cov.chunks = n
    baselines = Baselines(table, ds.name, release_history(ctx.ledger, ds.name))
    diff = Diff(thresholds)
    check_diff = baselines.any_overlap(box)
    checker = _Verifier(ctx, run) if verify else None
    reads = {"chunk_rows": 0, "baseline_rows": 0}
    for coords, cids in box_pages(box, bits):
        rows = read_chunk_rows(table, run.run_id, cids.tolist())
        reads["chunk_rows"] += int(cids.size)
        base = baselines.page(coords, cids) if check_diff else {}
        for c, cid in zip(coords.tolist(), cids.tolist(), strict=True):
            row = rows.get(cid)
            status = (row or {}).get("status", "not started")
            if status != "done":
                cov.not_done_chunk(c, status, (row or {}).get("error"))
                continue
            cov.done += 1
            qc = row.get("qc") if isinstance(row.get("qc"), dict) else None
            if qc is None:
                cov.done_without_stats += 1
            elif checker is None:
                _add_chunk(cov, dists, qc, c, ds)
            mine = _figures(row)
            if cid in base and mine is not None:
                release, old_row = base[cid]
                old = _figures(old_row)
                if old is None:
                    diff.baseline_missing += 1
                else:
                    diff.add(cid, c, release["release"], old, mine)
        if checker is not None:
            checker.check(coords, cids, rows, cov, dists)
    reads["baseline_rows"] = baselines.rows_read
    if checker is not None:
        reads.update(checker.reads)
        cov.source = "verify (graph and cache re-read)"
    scope = {"kind": "run" if whole else "region", "region": box, "chunks": n}
    source = "cache rows re-read" if checker else "chunk rows"
    return _report(ctx, run, scope, cov, dists, diff.report(), thresholds, reads, source)


def _add_chunk(
    cov: Coverage,
    dists: Mapping[str, Distribution],
    qc: Mapping[str, Any],
    coords: Sequence[int],
    ds: DatasetConfig,
) -> None:
    """Merge one done chunk's recorded statistics into the region's figures."""
    nodes, expected = int(qc["nodes"]), int(qc.get("graph_l2", qc["nodes"]))
    cov.rows += nodes
    cov.expected += expected
    cov.missing += int(qc.get("missing", 0))
    cov.extra += int(qc.get("extra", 0))
    cov.covered_voxels += int(qc.get("covered_voxels", 0))
    cov.pca_empty += int(qc.get("pca_empty", 0))
    if (qc.get("missing") or qc.get("extra")) and len(cov.chunk_examples) < MAX_EXAMPLES:
        cov.chunk_examples.append({"chunk": list(coords), "graph_l2": expected, "rows": nodes})
    if qc.get("bins"):
        add_dense(dists, decode_bins(qc["bins"]), qc.get("sum", {}), ds)


def _diff_box(
    ctx: DatasetContext, run: RunRecord, box: Sequence[int], th: QcThresholds
) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """The whole run's per-chunk diff: pages of the box, only the chunks a release covers
    (their rows of both runs read by key); no read at all when no release meets the box."""
    table, ds = ctx.ledger.table, ctx.dataset
    baselines = Baselines(table, ds.name, release_history(ctx.ledger, ds.name))
    diff = Diff(th)
    reads = {"chunk_rows": 0, "baseline_rows": 0}
    if not baselines.any_overlap(box):
        return None, reads
    for coords, cids in box_pages(box, ds.spatial_bits):
        base = baselines.page(coords, cids)
        if not base:
            continue
        ids = [c for c in cids.tolist() if c in base]
        rows = read_chunk_rows(table, run.run_id, ids)
        reads["chunk_rows"] += len(ids)
        for c, cid in zip(coords.tolist(), cids.tolist(), strict=True):
            if cid not in base:
                continue
            mine = _figures(rows.get(cid))
            release, old_row = base[cid]
            old = _figures(old_row)
            if mine is None:
                continue  # not done: reported as such by the coverage check
            if old is None:
                diff.baseline_missing += 1
            else:
                diff.add(cid, c, release["release"], old, mine)
    reads["baseline_rows"] = baselines.rows_read
    return diff.report(), reads


def _report(
    ctx: DatasetContext,
    run: RunRecord,
    scope: dict[str, Any],
    cov: Coverage,
    dists: Mapping[str, Distribution],
    diff: dict[str, Any] | None,
    th: QcThresholds,
    reads: dict[str, int],
    features_source: str,
) -> dict[str, Any]:
    coverage = cov.report()
    reasons = _reasons(coverage, diff, th)
    return {
        "run_id": run.run_id,
        "dataset": ctx.dataset.name,
        "kind": run.kind,
        "region": run.region,
        "scope": scope,
        "created_at": utc_now().isoformat(),
        "passed": not reasons,
        "reasons": reasons,
        "thresholds": asdict(th),
        "lineage": run.provenance(),
        "release_state": release_state(ctx.ledger, ctx.dataset.name),
        "coverage": coverage,
        "features_source": features_source,
        "features": {s.name: dists[s.name].summary(s.unit) for s in SERIES},
        "pca_empty": cov.pca_empty,
        "per_chunk": {
            "nodes_mean": round5(cov.rows / cov.done) if cov.done else None,
            "covered_voxels_mean": round5(cov.covered_voxels / cov.done) if cov.done else None,
        },
        "diff": diff,
        "reads": reads,
    }


def _pct(change: float) -> str:
    """A signed relative change as a percentage: a drop reads negative (-100.0%)."""
    return f"{change:+.1%}"


def _reasons(coverage: dict[str, Any], diff: dict[str, Any] | None, th: QcThresholds) -> list[str]:
    """Why the run fails QC, one sentence per failed check with examples; empty: passed."""
    reasons = []
    not_done = coverage["chunks_not_done_count"]
    if not_done:
        sample = "; ".join(
            f"{d['chunk']} {d['status']}" for d in coverage["chunks_not_done"][:3] if d["chunk"]
        )
        reasons.append(
            f"{not_done} of {coverage['chunks']} chunks not done"
            + (f" ({sample})" if sample else "")
        )
    if coverage["chunks_done"] and coverage["chunks_done_without_stats"] == coverage["chunks_done"]:
        reasons.append(
            f"none of the {coverage['chunks_done']} done chunks recorded QC statistics (computed "
            "before workers kept them): check a region with --verify, or recompute the run"
        )
    if coverage["ratio"] < th.min_coverage:
        examples = coverage["missing_examples"][:3] or [
            str(c["chunk"]) for c in coverage["chunks_with_gaps"][:3]
        ]
        which = "checked" if coverage["source"].startswith("verify") else "done"
        reasons.append(
            f"coverage {coverage['ratio']:.4f} < {th.min_coverage:g}: {coverage['missing']} of "
            f"the {coverage['expected_l2_ids']} L2 ids the graph has in the {which} chunks "
            "have no row of the run" + (f" (e.g. {', '.join(examples)})" if examples else "")
        )
    if coverage["extra"]:
        examples = coverage["extra_examples"][:3]
        reasons.append(
            f"{coverage['extra']} rows of the run are not L2 ids of the graph at its snapshot"
            + (f" (e.g. {', '.join(examples)})" if examples else "")
        )
    if coverage["malformed"]:
        reasons.append(f"{coverage['malformed']} rows of the run have malformed feature cells")
    if diff:
        for key, count, limit, field_ in (
            ("node_count_change", diff["chunks_over_node_count"], th.max_node_count_change, "nodes"),
            ("covered_voxels_change", diff["chunks_over_covered_voxels"],
             th.max_covered_voxels_change, "covered_voxels"),
        ):  # fmt: skip
            if not count:
                continue
            w = diff[key]["worst"]
            what = key.removesuffix("_change").replace("_", " ")
            reasons.append(
                f"{count} of {diff['chunks_compared']} chunks changed {what} by more than "
                f"{limit:.0%} against release {w['release']} (worst: chunk {w['chunk']} "
                f"{w[field_][0]} -> {w[field_][1]}, {_pct(w[key])})"
            )
    return reasons


# -- --verify: the graph and the cache re-read --------------------------------------------
class _Verifier:
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
                recorded = _figures(row) if done else None
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


# the bin layout is the engine's: a report names it so a reader can tell
BIN_LAYOUT = {"log_bins": LOG_BINS, "linear_bins": LINEAR_BINS, "total": TOTAL_BINS}
