"""A slow, obvious reference for the feature engine, written from the feature semantics
(``l2cache.engine.features`` docstring; README "Data model").

One node at a time with plain numpy, no shared code with ``l2cache.engine.features`` beyond
the attribute dtypes, so that a bug in the engine's fused kernels shows up as a
difference here.
"""

from __future__ import annotations

import edt
import numpy as np

U16_MAX = 65535


def _sat(value: float, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.array(min(max(value, info.min), info.max)).astype(dtype)


def reference_features(labels: np.ndarray, resolution) -> dict[int, dict[str, np.ndarray]]:
    labels = np.asarray(labels).astype(np.uint64)
    res = np.asarray(resolution, dtype=np.float64)
    dt_all = edt.edt(labels, anisotropy=tuple(res), black_border=False)
    dt_all = np.floor(np.minimum(dt_all, U16_MAX))  # inf (no boundary) saturates at u16 max
    out = {}
    for node in np.unique(labels):
        if node == 0:
            continue
        mask = labels == node
        coords = np.argwhere(mask)  # C (x-major) order
        n = len(coords)
        dts = dt_all[mask]  # boolean indexing also walks C order

        area = 0.0
        for axis in range(3):
            a = np.take(labels, range(0, labels.shape[axis] - 1), axis=axis)
            b = np.take(labels, range(1, labels.shape[axis]), axis=axis)
            faces = np.count_nonzero((a != b) & ((a == node) | (b == node)))
            other = [r for i, r in enumerate(res) if i != axis]
            area += faces * other[0] * other[1]

        centroid = coords.sum(axis=0) / n
        diff = (coords - centroid) * res
        d = np.sqrt(diff[:, 0] ** 2 + diff[:, 1] ** 2 + diff[:, 2] ** 2)
        max_d = d.max()
        score = dts * (1.0 - d / max_d) if max_d > 0 else dts
        rep = coords[int(np.argmax(score))]

        contacts = np.zeros((2, 3), dtype=np.int64)
        for axis in range(3):
            contacts[0, axis] = np.count_nonzero(coords[:, axis] == 0)
            contacts[1, axis] = np.count_nonzero(coords[:, axis] == labels.shape[axis] - 1)

        if n * np.prod(res) >= 1e7 and n > 1:
            pts = coords * res
            cov = np.cov(pts.T, ddof=1)
            evals, evecs = np.linalg.eigh(cov)
            order = np.argsort(evals)[::-1]
            evals = np.clip(evals[order], 0, None)
            comps = evecs[:, order].T
            for row in comps:
                if row[np.argmax(np.abs(row))] < 0:
                    row *= -1
            pca = comps.astype("<f2")
            pca_val = np.sqrt(evals * (min(n, 10_000) - 1)).astype("<f4")
        else:
            pca = np.full((3, 3), np.nan, dtype="<f2")
            pca_val = np.full(3, np.nan, dtype="<f4")

        out[int(node)] = {
            "size_nm3": _sat(n, np.uint32),
            "area_nm2": _sat(np.floor(area), np.uint32),
            "max_dt_nm": _sat(dts.max(), np.uint16),
            "mean_dt_nm": np.array(min(dts.astype(np.float64).mean(), 65504.0)).astype("<f2"),
            "rep_coord_nm": np.array([_sat(v, np.uint16) for v in rep], dtype="<u2"),
            "chunk_intersect_count": np.minimum(contacts, U16_MAX).astype("<u2"),
            "pca": pca,
            "pca_val": pca_val,
        }
    return out
