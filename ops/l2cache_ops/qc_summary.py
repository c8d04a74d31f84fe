"""The figures a QC report is made of, each mergeable and bounded in memory.

Distributions are fixed-bin counts plus an exact count and sum (the bins are the
engine's, :mod:`l2cache.engine.chunk_qc`, so the workers' chunk statistics and the run's
counter shards merge into them by addition); coverage is a handful of sums plus at most
:data:`MAX_EXAMPLES` examples; the per-chunk diff against a release keeps streaming
figures and the :data:`WORST` largest changes, never one entry per chunk. Changes are
signed: a drop is negative.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from l2cache.config import DatasetConfig
from l2cache.engine.chunk_qc import (
    QUANTILES,
    SERIES,
    all_edges,
    bin_counts,
    round5,
    series_counts,
    sum_value,
)

MAX_EXAMPLES = 10
INPUTS = ("supervoxels", "orphan_sv", "orphan_voxels", "ghost_sv")  # chunk_qc's input counters
WORST = 50  # largest per-chunk changes kept in the report (the HTML page plots them)


@dataclass(frozen=True)
class QcThresholds:
    """When a run fails QC. Changes are relative (0.05 = 5%) per chunk, against the
    release currently covering that chunk, in either direction; coverage is the fraction
    of the graph's L2 ids of the run's done chunks that have a row of the run.

    Input fractions are over the run's done chunks: orphan voxels (supervoxels without an
    L2 parent, computed as background) of all segmented voxels, and ghost supervoxels
    (in the graph, without a voxel: lost input looks like this) of the graph's
    supervoxels. The workers never fail a chunk for them (unless the map's ``input:
    {strict: true}``); these limits fail the run instead, with the figures."""

    max_node_count_change: float = 0.05
    max_covered_voxels_change: float = 0.05
    min_coverage: float = 1.0
    max_orphan_voxel_fraction: float = 0.001
    max_ghost_sv_fraction: float = 0.001

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
        for key in ("min_coverage", "max_orphan_voxel_fraction", "max_ghost_sv_fraction"):
            if values[key] > 1:
                raise ValueError(f"{key} is a fraction, at most 1.0")
        return cls(**values)


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
    supervoxels: int = 0  # the segmentation's, over the done chunks
    orphan_sv: int = 0
    orphan_voxels: int = 0
    ghost_sv: int = 0
    input_examples: list[dict[str, Any]] = field(default_factory=list)  # chunks with some
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
            "inputs": self.inputs(),
        }

    def add_inputs(self, coords: Sequence[int] | None, counts: Mapping[str, Any]) -> None:
        """Add one chunk's (or the run's summed) input counts; a chunk with orphans or
        ghosts is kept as an example while there is room."""
        got = {k: int(counts.get(k, 0) or 0) for k in INPUTS}
        for key, value in got.items():
            setattr(self, key, getattr(self, key) + value)
        odd = got["orphan_sv"] or got["ghost_sv"]
        if coords is not None and odd and len(self.input_examples) < MAX_EXAMPLES:
            self.input_examples.append({"chunk": list(coords), **got})

    def inputs(self) -> dict[str, Any]:
        """Orphan and ghost supervoxels of the done chunks, counts and fractions."""
        segmented = self.covered_voxels + self.orphan_voxels
        graph_sv = self.supervoxels - self.orphan_sv + self.ghost_sv
        return {
            "supervoxels": self.supervoxels,
            "orphan_sv": self.orphan_sv,
            "orphan_voxels": self.orphan_voxels,
            "orphan_voxel_fraction": round5(self.orphan_voxels / segmented) if segmented else 0.0,
            "ghost_sv": self.ghost_sv,
            "ghost_sv_fraction": round5(self.ghost_sv / graph_sv) if graph_sv else 0.0,
            "examples": self.input_examples,
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


def chunk_figures(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Node count and covered voxels of a done chunk row (None if not done)."""
    if not row or row.get("status") != "done":
        return None
    qc = row.get("qc") if isinstance(row.get("qc"), dict) else None
    nodes = row.get("l2_count", qc.get("nodes") if qc else None)
    if nodes is None:
        return None
    return {"nodes": int(nodes), "covered_voxels": qc.get("covered_voxels") if qc else None}
