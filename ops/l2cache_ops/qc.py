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

The report is a bounded summary (counts, distributions, verdicts, a few examples of each
kind, the largest changes: :mod:`l2cache_ops.qc_summary`); per-chunk figures stay in the
chunk rows (:mod:`l2cache_ops.qc_reports`). The deep check is :mod:`l2cache_ops.qc_verify`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from l2cache.compute import DatasetContext
from l2cache.config import DatasetConfig
from l2cache.domain.ids import SpatialBits
from l2cache.domain.lineage import utc_now
from l2cache.domain.regions import region_size
from l2cache.engine.chunk_qc import (
    BY_SERIES,
    LINEAR_BINS,
    LOG_BINS,
    QUANTILES,
    SERIES,
    Series,
    decode_bins,
    parse_counters,
    round5,
    series_edges,
)
from l2cache.gcp.bigtable import CellFilter, read_rows
from l2cache.store import runstate
from l2cache.store.ledger import LEDGER_FAMILY, RunRecord
from l2cache_ops.qc_reports import BATCH_KINDS, chunk_ids_of
from l2cache_ops.qc_summary import (
    MAX_EXAMPLES,
    Coverage,
    Diff,
    Distribution,
    QcThresholds,
    add_dense,
    chunk_figures,
    distributions,
    signed_change,
)
from l2cache_ops.qc_verify import Verifier, decode_feature_rows, graph_l2_ids, run_rows
from l2cache_ops.releases import covers, release_history, release_state

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
    "signed_change",
]

PAGE = 1000  # chunk rows per keyed read (region QC and the diff)
VERIFY_MAX_CHUNKS = 10_000  # --verify re-reads the graph and the cache: a region, never a run
QC_SHARD_PREFIX = "qchist:"
CHUNK_COLUMNS = [b"status", b"coords", b"l2_count", b"qc", b"error"]


# -- reading the runs table --------------------------------------------------------------
def read_counters(table: Table | str, run_id: str) -> tuple[dict[bytes, int], int]:
    """The run's QC counters summed over its ``qchist`` shard rows, and the rows read."""
    rows = read_rows(table, prefix=f"{QC_SHARD_PREFIX}{run_id}:".encode())
    out: dict[bytes, int] = {}
    for row in rows.values():
        for col, value in row.get(runstate.SUM_FAMILY, {}).items():
            out[col] = out.get(col, 0) + int.from_bytes(value, "big", signed=True)
    return out, len(rows)


def done_count(table: Table | str, run_id: str) -> tuple[int | None, int]:
    """Chunks of the run done (the run-state ``stat:`` counters' ``done`` summed; None
    for a run recorded before they existed), and the rows read: tells chunks done
    without QC statistics from chunks not done."""
    rows = read_rows(
        table,
        prefix=f"stat:{run_id}:".encode(),
        cells=CellFilter(columns={runstate.SUM_FAMILY: [b"done"]}, per_column=1),
    )
    if not rows:
        return None, 0
    total = sum(
        int.from_bytes(r.get(runstate.SUM_FAMILY, {}).get(b"done", b"\0"), "big", signed=True)
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
    cov.add_inputs(None, cov_counts)
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
    checker = Verifier(ctx, run) if verify else None
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
            mine = chunk_figures(row)
            if cid in base and mine is not None:
                release, old_row = base[cid]
                old = chunk_figures(old_row)
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
    cov.add_inputs(coords, qc)
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
            mine = chunk_figures(rows.get(cid))
            release, old_row = base[cid]
            old = chunk_figures(old_row)
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


def _input_reasons(inputs: dict[str, Any], th: QcThresholds) -> list[str]:
    """Orphan voxels and ghost supervoxels over the map's limits (the workers computed
    them as background; too many mean the graph and the segmentation disagree)."""
    where = [str(e["chunk"]) for e in inputs["examples"][:3]]
    at = f" (e.g. chunks {', '.join(where)})" if where else ""
    reasons = []
    if inputs["orphan_voxel_fraction"] > th.max_orphan_voxel_fraction:
        reasons.append(
            f"orphan voxels {inputs['orphan_voxel_fraction']:.4g} > "
            f"{th.max_orphan_voxel_fraction:g} (max_orphan_voxel_fraction): "
            f"{inputs['orphan_voxels']} voxels of {inputs['orphan_sv']} supervoxels without "
            f"an L2 parent were computed as background{at}"
        )
    if inputs["ghost_sv_fraction"] > th.max_ghost_sv_fraction:
        reasons.append(
            f"ghost supervoxels {inputs['ghost_sv_fraction']:.4g} > "
            f"{th.max_ghost_sv_fraction:g} (max_ghost_sv_fraction): {inputs['ghost_sv']} "
            f"supervoxels of the graph have no voxel in the segmentation{at}"
        )
    return reasons


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
    reasons.extend(_input_reasons(coverage["inputs"], th))
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
