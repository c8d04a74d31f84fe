"""The worker's per-chunk QC statistics (l2cache.engine.chunk_qc), without Bigtable.

Checked against a direct numpy computation on the real pinky40 crop's features, merged
by addition (two chunks' bins are the bins of their union), and equal to what
``qc --verify`` derives from the stored bytes of the same nodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from l2cache.domain.attributes import ATTRIBUTES, encode_column
from l2cache.engine.chunk_qc import (
    COVERAGE_COUNTERS,
    SERIES,
    TOTAL_BINS,
    chunk_qc,
    decode_bins,
    merge_counters,
    parse_counters,
    series_counts,
    series_edges,
    series_values,
)
from l2cache.engine.features import compute_features
from l2cache_ops.qc import Distribution, decode_feature_rows, signed_change

DATA = Path(__file__).parent / "data" / "pinky40_crop_96x96x48.npz"
RES = (16.0, 16.0, 40.0)
DS = SimpleNamespace(chunk_size=(48, 48, 24), voxel_volume_nm3=16.0 * 16.0 * 40.0)


@pytest.fixture(scope="module")
def chunks():
    labels = np.load(DATA)["labels"].astype(np.uint64)
    a = compute_features(labels[:48, :48, :24], RES)
    b = compute_features(labels[48:, 48:, 24:], RES)
    return a, b


def _concat(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def test_stats_match_a_direct_numpy_computation(chunks):
    feats = chunks[0]
    qc = chunk_qc(feats, DS, graph_l2=feats["l2id"].size + 2)
    s = qc.summary
    n = feats["l2id"].size
    assert s["nodes"] == n and s["graph_l2"] == n + 2 and s["missing"] == 2 and s["extra"] == 0
    assert s["covered_voxels"] == int(feats["size_nm3"].astype(np.int64).sum())
    assert s["pca_empty"] == int(np.isnan(feats["pca_val"][:, 0]).sum())
    # the values by hand, as the old QC derived them from the stored cells
    size = feats["size_nm3"].astype(np.float64) * DS.voxel_volume_nm3
    rep_y = feats["rep_coord_nm"][:, 1].astype(np.float64) / 48
    pca_z = np.abs(feats["pca"][:, 0, 2].astype(np.float64))
    faces = feats["chunk_intersect_count"].reshape(n, 6).astype(np.float64).sum(1)
    direct = {"size_nm3": size, "rep_coord_y": rep_y, "pca_major_z": pca_z,
              "chunk_intersect_count": faces}  # fmt: skip
    dense = decode_bins(s["bins"])
    for s_ in SERIES:
        if s_.name not in direct:
            continue
        v = direct[s_.name]
        finite = v[np.isfinite(v)]
        edges = series_edges(s_, DS)
        expected = np.histogram(np.clip(finite, edges[0], edges[-1]), edges)[0]
        assert series_counts(dense, s_).tolist() == expected.tolist(), s_.name
        assert s["p50"][s_.name] == pytest.approx(float(np.median(finite)), rel=1e-4)
    assert s["sum"]["size_nm3"] == int(feats["size_nm3"].astype(np.int64).sum())
    # every node counted once per series (NaN PCA rows left out of the PCA series)
    for s_ in SERIES:
        total = int(series_counts(dense, s_).sum())
        assert total == (n - s["pca_empty"] if s_.name.startswith("pca") else n), s_.name
    # the run counters hold the same bins
    dense2, sums, cov = parse_counters(qc.bins)
    assert dense2.tolist() == dense.tolist() and sums == s["sum"]
    # input counters of a clean chunk are 0: left out of the summary, kept as counters
    assert cov == {"chunks": 1, **{k: s.get(k, 0) for k in COVERAGE_COUNTERS if k != "chunks"}}
    assert "orphan_sv" not in s and "ghost_sv" not in s


def test_orphan_and_ghost_counts_go_into_the_summary_and_the_run_counters(chunks):
    inputs = {"supervoxels": 40, "orphan_sv": 1, "orphan_voxels": 1, "ghost_sv": 2}
    qc = chunk_qc(chunks[0], DS, inputs=inputs)
    assert {k: qc.summary[k] for k in inputs} == inputs
    _, _, cov = parse_counters(merge_counters([qc.bins, qc.bins]))
    assert {k: cov[k] for k in inputs} == {k: 2 * v for k, v in inputs.items()}


def test_merging_two_chunks_bins_equals_the_bins_of_their_union(chunks):
    a, b = (chunk_qc(f, DS) for f in chunks)
    union = chunk_qc(_concat(*chunks), DS)
    dense_a, dense_b = decode_bins(a.summary["bins"]), decode_bins(b.summary["bins"])
    assert (dense_a + dense_b).tolist() == decode_bins(union.summary["bins"]).tolist()
    merged = merge_counters([a.bins, b.bins])
    d_m, s_m, c_m = parse_counters(merged)
    d_u, s_u, c_u = parse_counters(union.bins)
    assert d_m.tolist() == d_u.tolist()
    assert {k: v for k, v in c_m.items() if k != "chunks"} == {
        k: v for k, v in c_u.items() if k != "chunks"
    }
    assert c_m["chunks"] == 2
    for name in s_m:  # sums: exact for integer series, within one unit of rounding otherwise
        assert abs(s_m[name] - s_u[name]) <= 1, name
    # a distribution built from merged counts quantiles like one built from raw values
    s0 = SERIES[0]
    raw = Distribution(series_edges(s0, DS))
    raw.add(series_values(_concat(*chunks), DS)[s0.name])
    merged_dist = Distribution(series_edges(s0, DS))
    merged_dist.add_counts(series_counts(d_m, s0), 0.0)
    assert merged_dist.quantiles() == raw.quantiles()


def test_deterministic_and_small(chunks):
    one = json.dumps(chunk_qc(chunks[1], DS).summary, sort_keys=True)
    assert one == json.dumps(chunk_qc(chunks[1], DS).summary, sort_keys=True)
    assert len(one) < 4096  # a chunk row's qc column stays small
    assert decode_bins(chunk_qc(chunks[1], DS).summary["bins"]).size == TOTAL_BINS


def test_empty_chunk():
    from l2cache.engine.features import empty_features

    qc = chunk_qc(empty_features(), DS, graph_l2=0)
    assert qc.summary["nodes"] == 0 and decode_bins(qc.summary["bins"]).sum() == 0
    assert qc.bins == {b"qc.chunks": 1}
    assert all(v is None for v in qc.summary["p50"].values())


def test_worker_and_verify_derive_the_same_values(chunks):
    """``qc --verify`` decodes stored bytes; the worker has the arrays: same numbers."""
    feats = chunks[0]
    n = feats["l2id"].size
    columns = {a.key: encode_column(a, feats[a.name]) for a in ATTRIBUTES}
    cells = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    decoded, bad = decode_feature_rows(cells, DS)
    assert not bad.any()
    worker, verify = series_values(feats, DS), series_values(decoded, DS)
    for name in worker:
        np.testing.assert_array_equal(worker[name], verify[name])
    assert chunk_qc(decoded, DS).summary == chunk_qc(feats, DS).summary


def test_a_drop_is_a_negative_change():
    assert signed_change(10, 0) == -1.0
    assert f"{signed_change(10, 0):+.1%}" == "-100.0%"
    assert signed_change(10, 11) == pytest.approx(0.1)
    assert signed_change(0, 3) == 3.0  # from nothing: the new count, never inf
