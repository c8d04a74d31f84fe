"""A chunk's QC statistics, computed by the worker while it still holds the features.

Why here: re-reading the graph and every cache row of a run to check it costs hours at
connectome scale (167 s for 400k rows in one process, ~5 h at 11.6 M chunks). The worker
already has each chunk's features in memory, so it summarises them once, for a few
microseconds per node, and the operator's QC only merges the summaries:

- **Per chunk** (:attr:`ChunkQc.summary`, JSON in the chunk's ledger row ``chunk:<run>:<chunk>``,
  column ``qc``): node count, the graph's L2 count in the chunk, covered voxels, PCA-empty
  nodes, each series' median, the exact sum of each series (fixed point) and the chunk's
  histogram (all series, dense counts, zlib, base64). The median and counts have the
  meaning the per-chunk table of the old QC report had, so the diff against a release
  compares like with like; region QC merges these.
- **Per run** (:attr:`ChunkQc.bins`, the amounts the ledger adds to the sharded counter rows
  ``qchist:<run>:<shard>``): one int64 counter per occupied bin (``b"size_nm3.137"``: bin
  137 of ``size_nm3``), the fixed-point sums (``b"size_nm3.sum"``) and the coverage counters
  (``b"qc.chunks"``, ``b"qc.nodes"``, ...). Everything is a count or an integer sum, so
  shards and chunks merge by addition, in any order, exactly.

Bins are fixed per dataset (:func:`series_edges`), the same for the worker and the
operator's tools (which import them from here): geometric for heavy-tailed series, linear
for fractions. Exact min/max are not kept (no counter can merge a max): a run's min and max
are read as the bounds of its first and last occupied bin, 3-7 % wide for geometric bins;
quantiles come from the bins too.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

FORMAT_VERSION = 1  # of the per-chunk JSON and the bin layout below
LOG_BINS = 300  # geometric bins: ~3-7 % wide over the features' ranges
LINEAR_BINS = 100
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
COVERAGE_COUNTERS = (  # the run-level coverage counters (``qc.<name>``), summed per chunk
    "chunks",
    "nodes",
    "graph_l2",
    "missing",
    "extra",
    "covered_voxels",
    "pca_empty",
    "supervoxels",  # the segmentation's distinct supervoxels in the chunk
    "orphan_sv",  # of them, those without an L2 parent (their voxels are background)
    "orphan_voxels",
    "ghost_sv",  # supervoxels the graph has in the chunk without a voxel
)
INPUT_COUNTERS = ("supervoxels", "orphan_sv", "orphan_voxels", "ghost_sv")


class QcGeometry(Protocol):
    """What the bin edges depend on (a :class:`l2cache.config.DatasetConfig` is one)."""

    @property
    def chunk_size(self) -> Sequence[int]: ...  # noqa: D102

    @property
    def voxel_volume_nm3(self) -> float: ...  # noqa: D102


@dataclass(frozen=True)
class Series:
    """One distribution QC tracks: a scalar per node derived from one stored attribute.

    ``sum_scale`` makes the series' sum an integer counter: ``round(sum * sum_scale)``,
    exact for integer-valued series (scale 1), to 1e-3 nm or 1e-6 of a fraction otherwise.
    """

    name: str
    scale: str  # "log": zero bin + geometric bins up to the series' top; "linear": 0..1
    unit: str
    sum_scale: float = 1.0

    @property
    def n_bins(self) -> int:
        """Bins of the series (the same for every dataset, so the layout is fixed)."""
        return LINEAR_BINS if self.scale == "linear" else LOG_BINS


SERIES: tuple[Series, ...] = (
    Series("size_nm3", "log", "nm^3", 1.0),  # summed as voxels: see :func:`series_sum`
    Series("area_nm2", "log", "nm^2", 1.0),
    Series("max_dt_nm", "log", "nm", 1.0),
    Series("mean_dt_nm", "log", "nm", 1e3),
    *(Series(f"rep_coord_{a}", "linear", "chunk fraction", 1e6) for a in "xyz"),
    Series("chunk_intersect_count", "log", "voxels on chunk faces", 1.0),
    *(Series(f"pca_major_{a}", "linear", "|component|", 1e6) for a in "xyz"),
    *(Series(f"pca_val_{i}", "log", "nm", 1e3) for i in range(3)),
)
BY_SERIES: dict[str, Series] = {s.name: s for s in SERIES}
OFFSETS: dict[str, int] = {}  # series -> first index of its bins in the chunk's dense layout
_at = 0
for _s in SERIES:
    OFFSETS[_s.name] = _at
    _at += _s.n_bins
TOTAL_BINS = _at
del _at, _s


def series_edges(series: Series, dataset: QcGeometry) -> np.ndarray:
    """Fixed bin edges of a series for a dataset, so histograms of any runs (and of any
    chunks) merge and compare bin by bin."""
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


def all_edges(dataset: QcGeometry) -> dict[str, np.ndarray]:
    """Every series' edges for a dataset (computed once per process by the callers)."""
    return {s.name: series_edges(s, dataset) for s in SERIES}


def series_values(features: Mapping[str, np.ndarray], dataset: QcGeometry) -> dict[str, np.ndarray]:
    """Per-series float64 arrays (one value per node) from the engine's feature arrays.

    The same derivation for the worker (from :func:`l2cache.engine.features.compute_features`)
    and for ``qc --verify`` (from the stored bytes, decoded to the same arrays), so both see
    the same numbers: size in nm^3 (stored voxels times the voxel volume), the
    representative point as a fraction of the chunk, the major PCA axis' absolute
    components; NaN where PCA is empty (a node under 0.01 um^3).
    """
    cs = np.asarray(dataset.chunk_size, dtype=np.float64)
    n = np.asarray(features["size_nm3"]).shape[0]
    rep = np.asarray(features["rep_coord_nm"], dtype=np.float64).reshape(n, 3)
    pca = np.asarray(features["pca"], dtype=np.float64).reshape(n, 3, 3)
    pca_val = np.asarray(features["pca_val"], dtype=np.float64).reshape(n, 3)
    faces = np.asarray(features["chunk_intersect_count"], dtype=np.float64).reshape(n, 6)
    out = {
        "size_nm3": np.asarray(features["size_nm3"], dtype=np.float64) * dataset.voxel_volume_nm3,
        "area_nm2": np.asarray(features["area_nm2"], dtype=np.float64),
        "max_dt_nm": np.asarray(features["max_dt_nm"], dtype=np.float64),
        "mean_dt_nm": np.asarray(features["mean_dt_nm"], dtype=np.float64),
        "chunk_intersect_count": faces.sum(axis=1),
    }
    for axis, a in enumerate("xyz"):
        out[f"rep_coord_{a}"] = rep[:, axis] / cs[axis]
        out[f"pca_major_{a}"] = np.abs(pca[:, 0, axis])  # row 0 = the major axis
        out[f"pca_val_{axis}"] = pca_val[:, axis]
    return out


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin (int64) of the finite ``values``; values outside the edges count in
    the first or last bin (as ``np.histogram`` of the clipped values would).

    Non-finite values are left out: NaN is a node too small for PCA (counted as
    ``pca_empty``), never a value.
    """
    v = values[np.isfinite(values)]
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, edges.size - 2)
    return np.bincount(idx, minlength=edges.size - 1).astype(np.int64)


def series_sum(series: Series, values: np.ndarray, dataset: QcGeometry) -> int:
    """The series' sum as an integer counter (``round(sum * sum_scale)``; size as voxels,
    so a run's total volume in nm^3 stays far below int64's range)."""
    v = values[np.isfinite(values)]
    if series.name == "size_nm3":
        return int(round(float(v.sum()) / dataset.voxel_volume_nm3))
    return int(round(float(v.sum()) * series.sum_scale))


def sum_value(series: Series, counter: int, dataset: QcGeometry) -> float:
    """The real-valued sum a :func:`series_sum` counter stands for."""
    if series.name == "size_nm3":
        return counter * dataset.voxel_volume_nm3
    return counter / series.sum_scale


@dataclass(frozen=True)
class ChunkQc:
    """One chunk's QC statistics: ``summary`` for the chunk row (JSON-able, ~0.5-2 KB),
    ``bins`` for the run's sharded counters (column -> amount, only non-zero ones)."""

    summary: dict[str, Any]
    bins: dict[bytes, int]


def chunk_qc(
    features: Mapping[str, np.ndarray],
    dataset: QcGeometry,
    graph_l2: int | None = None,
    edges: Mapping[str, np.ndarray] | None = None,
    inputs: Mapping[str, int] | None = None,
) -> ChunkQc:
    """The QC statistics of one chunk's features (the dict ``compute_features`` returns).

    ``graph_l2`` is the number of L2 ids the graph has in the chunk at the run's snapshot
    (the worker's relabel knows it): with the node count it is the chunk's coverage, so
    QC need not re-read the graph. ``edges`` lets a caller reuse :func:`all_edges`.
    ``inputs`` are the chunk's :data:`INPUT_COUNTERS` (orphan and ghost supervoxels, which
    the worker treats as background): QC holds their run totals against the map's
    thresholds, so many of them fail a run although no chunk failed.
    Deterministic: the same features give the same bytes.
    """
    edges = edges or all_edges(dataset)
    values = series_values(features, dataset)
    nodes = int(np.asarray(features["size_nm3"]).shape[0])
    expected = nodes if graph_l2 is None else int(graph_l2)
    dense = np.zeros(TOTAL_BINS, dtype=np.int64)
    p50: dict[str, float | None] = {}
    sums: dict[str, int] = {}
    for s in SERIES:
        v = values[s.name]
        dense[OFFSETS[s.name] : OFFSETS[s.name] + s.n_bins] = bin_counts(v, edges[s.name])
        finite = v[np.isfinite(v)]
        p50[s.name] = round5(float(np.median(finite))) if finite.size else None
        sums[s.name] = series_sum(s, v, dataset)
    coverage = {
        "chunks": 1,
        "nodes": nodes,
        "graph_l2": expected,
        "missing": max(expected - nodes, 0),
        "extra": max(nodes - expected, 0),
        "covered_voxels": int(np.asarray(features["size_nm3"], dtype=np.int64).sum()),
        "pca_empty": int(np.isnan(values["pca_val_0"]).sum()),
        **{k: int((inputs or {}).get(k, 0)) for k in INPUT_COUNTERS},
    }
    summary = {
        "v": FORMAT_VERSION,
        **{k: v for k, v in coverage.items() if k != "chunks" and (v or k not in INPUT_COUNTERS)},
        "p50": p50,
        "sum": sums,
        "bins": encode_bins(dense),
    }
    return ChunkQc(summary, counter_amounts(dense, sums, coverage))


def counter_amounts(
    dense: np.ndarray, sums: Mapping[str, int], coverage: Mapping[str, int]
) -> dict[bytes, int]:
    """Column -> amount for the run's counter rows: occupied bins, sums, coverage."""
    out: dict[bytes, int] = {}
    for s in SERIES:
        part = dense[OFFSETS[s.name] : OFFSETS[s.name] + s.n_bins]
        for i in np.flatnonzero(part).tolist():
            out[f"{s.name}.{i}".encode()] = int(part[i])
        if sums.get(s.name):
            out[f"{s.name}.sum".encode()] = int(sums[s.name])
    for name in COVERAGE_COUNTERS:
        if coverage.get(name):
            out[f"qc.{name}".encode()] = int(coverage[name])
    return out


def encode_bins(dense: np.ndarray) -> str:
    """A chunk's dense bin counts as text for its JSON column: little-endian uint32,
    zlib, base64 (mostly zeros, so ~0.3-1.5 KB instead of ~15 KB)."""
    if dense.size != TOTAL_BINS:
        raise ValueError(f"expected {TOTAL_BINS} bins, got {dense.size}")
    return base64.b64encode(zlib.compress(dense.astype("<u4").tobytes(), 6)).decode()


def decode_bins(text: str) -> np.ndarray:
    """The dense int64 bin counts :func:`encode_bins` encoded."""
    raw = zlib.decompress(base64.b64decode(text))
    dense = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    if dense.size != TOTAL_BINS:
        raise ValueError(f"bin layout of {dense.size} bins, this code has {TOTAL_BINS}")
    return dense


def parse_counters(cells: Mapping[bytes, int]) -> tuple[np.ndarray, dict[str, int], dict[str, int]]:
    """(dense bins, sums, coverage) from counter columns (a merged ``qchist`` read, or the
    sum of several chunks' :attr:`ChunkQc.bins`); unknown columns are ignored."""
    dense = np.zeros(TOTAL_BINS, dtype=np.int64)
    sums = {s.name: 0 for s in SERIES}
    coverage = {name: 0 for name in COVERAGE_COUNTERS}
    for col, amount in cells.items():
        name, _, tail = col.decode().rpartition(".")
        if name == "qc" and tail in coverage:
            coverage[tail] += int(amount)
        elif name in BY_SERIES:
            if tail == "sum":
                sums[name] += int(amount)
            elif tail.isdigit() and int(tail) < BY_SERIES[name].n_bins:
                dense[OFFSETS[name] + int(tail)] += int(amount)
    return dense, sums, coverage


def merge_counters(parts: Iterable[Mapping[bytes, int]]) -> dict[bytes, int]:
    """Sum counter dicts column by column (what the shard rows hold after all chunks)."""
    out: dict[bytes, int] = {}
    for part in parts:
        for col, amount in part.items():
            out[col] = out.get(col, 0) + int(amount)
    return out


def series_counts(dense: np.ndarray, series: Series) -> np.ndarray:
    """One series' bins out of the dense layout."""
    return dense[OFFSETS[series.name] : OFFSETS[series.name] + series.n_bins]


def round5(value: float) -> float:
    """Five significant digits: enough to compare runs, short in the stored JSON."""
    if not math.isfinite(value):
        return value
    return float(f"{value:.5g}")
