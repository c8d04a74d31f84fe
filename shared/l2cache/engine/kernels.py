"""Fused numba kernels of the feature engine.

Why compiled: the only unavoidable pass over a chunk is its Euclidean distance
transform; everything else (labels -> dense index, counts, moments, faces, contacts,
distance statistics, representative voxel) must cost a fraction of it. Separate numpy
passes (``bincount`` per moment, sorts, ``unique``) add up to several EDTs, so each
kernel below walks the volume once in memory order and accumulates every per-label
quantity it can in that walk.

All kernels take a C-contiguous 3-D view ``vol`` whose axes are the original
(x, y, z) axes permuted by ``perm`` (``perm[k]`` = original axis of array axis ``k``):
a Fortran-ordered chunk is passed as its transpose, so no copy is ever made and both
memory orders give identical results.
"""

from __future__ import annotations

import numpy as np
from numba import njit

DT_CLIP = 65535.0  # u16 max: infinite distances (no boundary in the chunk) saturate here


@njit(cache=True, nogil=True)
def _hash_slot(v: np.unsignedinteger, mask: np.uint64) -> np.uint64:
    # Fibonacci hashing: spreads PCG ids, whose low bits are small segment ids.
    return ((v * np.uint64(11400714819323198485)) >> np.uint64(40)) & mask


@njit(cache=True, nogil=True)
def _dense_index_run(
    flat: np.ndarray,
    dst: np.ndarray,
    start: int,
    keys: np.ndarray,
    vals: np.ndarray,
    ids: np.ndarray,
    k: int,
    max_label: int,
) -> tuple[int, int]:
    """Relabel ``flat[start:]`` until done or the tables need to grow.

    Kept free of any array (re)allocation: growing inside the hot loop stops numba
    from optimising it (measured 20x slower). Returns ``(stop, k)``.
    """
    mask = np.uint64(keys.size - 1)
    limit = min(ids.size - 1, keys.size // 2, max_label)
    last_label = np.uint64(0)
    last_index = 0
    for i in range(start, flat.size):
        v = flat[i]
        if v != last_label:
            if v == 0:
                last_index = 0
            else:
                slot = _hash_slot(v, mask)
                while keys[slot] != 0 and keys[slot] != v:
                    slot = (slot + np.uint64(1)) & mask
                if keys[slot] == v:
                    last_index = vals[slot]
                else:
                    if k >= limit:
                        return i, k
                    k += 1
                    ids[k] = v
                    keys[slot] = v
                    vals[slot] = k
                    last_index = k
            last_label = v
        dst[i] = last_index
    return flat.size, k


@njit(cache=True, nogil=True)
def _rehash(ids: np.ndarray, k: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(cap, dtype=np.uint64)
    vals = np.zeros(cap, dtype=np.int64)
    mask = np.uint64(cap - 1)
    for m in range(1, k + 1):
        slot = _hash_slot(ids[m], mask)
        while keys[slot] != 0:
            slot = (slot + np.uint64(1)) & mask
        keys[slot] = ids[m]
        vals[slot] = m
    return keys, vals


def dense_dtype(n_ids: int) -> type[np.unsignedinteger]:
    """The narrowest index dtype for ``n_ids`` non-zero ids (index 0 = background)."""
    if n_ids <= np.iinfo(np.uint16).max:
        return np.uint16
    if n_ids <= np.iinfo(np.uint32).max:
        return np.uint32
    raise ValueError("more than 2**32 - 1 labels in one chunk")


@njit(cache=True, nogil=True)
def _apply_lut(src: np.ndarray, lut: np.ndarray, dst: np.ndarray) -> None:
    for i in range(src.size):
        dst[i] = lut[src[i]]


def apply_lut(index: np.ndarray, lut: np.ndarray, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """``lut[index]`` as ``dtype``, same shape; in place when ``index`` has that dtype.

    One compiled pass (numpy's fancy indexing would build an int64 temporary of the
    whole volume). ``lut`` values must fit ``dtype``; ``index`` must be C-contiguous.
    """
    if not index.flags.c_contiguous:
        raise ValueError("index must be C-contiguous")
    if lut.size and (int(lut.min()) < 0 or int(lut.max()) > np.iinfo(dtype).max):
        raise ValueError(f"lookup table values do not fit {np.dtype(dtype).name}")
    out = index if index.dtype == dtype else np.empty(index.shape, dtype=dtype)
    lut_into(index, lut.astype(np.int64, copy=False), out)
    return out


def lut_into(index: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = lut[index]`` for C-contiguous ``index``/``out`` of one shape."""
    if not (index.flags.c_contiguous and out.flags.c_contiguous) or index.shape != out.shape:
        raise ValueError("index and out must be C-contiguous and of one shape")
    _apply_lut(index.reshape(-1), lut, out.reshape(-1))


def dense_index(vol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense label index (0 = background, 1..K) of ``vol`` and the original ids.

    Returns ``(dense, ids)`` with ``ids[dense] == vol`` and ``ids[0] == 0``. ``dense``
    is uint16 when K < 65,536 (the EDT runs ~20 % faster on it than on uint32, and
    much faster than on uint64), else uint32. Labels are spatially coherent, so the
    last seen label answers most voxels; transitions go to an open-addressing hash
    table (plain arrays: several times faster than a typed dict).
    """
    flat = vol.reshape(-1)
    for dtype in (np.uint16, np.uint32):
        max_label = np.iinfo(dtype).max
        dense = np.empty(vol.shape, dtype=dtype)
        dst = dense.reshape(-1)
        cap = 1 << 14
        keys = np.zeros(cap, dtype=np.uint64)
        vals = np.zeros(cap, dtype=np.int64)
        ids = np.zeros(cap // 2 + 1, dtype=np.uint64)
        start, k = 0, 0
        while start < flat.size:
            start, k = _dense_index_run(flat, dst, start, keys, vals, ids, k, max_label)
            if start >= flat.size or k >= max_label:
                break
            cap *= 4
            grown = np.zeros(cap // 2 + 1, dtype=np.uint64)
            grown[: k + 1] = ids[: k + 1]
            ids = grown
            keys, vals = _rehash(ids, k, cap)
        if start >= flat.size:
            return dense, ids[: k + 1].copy()
        del dense  # too many labels for this dtype: redo wider
    raise ValueError("more than 2**32 - 1 labels in one chunk")


@njit(cache=True, nogil=True)
def first_pass(
    dense: np.ndarray, dt: np.ndarray, n_labels: int, perm: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts, coordinate sums, faces, chunk-face contacts and truncated-EDT stats.

    Returns ``(count[K], coord_sum[K,3], faces[K,3], contacts[K,2,3], dt_max[K],
    dt_sum[K])`` indexed by dense label, coordinates/axes in original (x, y, z) order.
    Chunk-face contacts are counted by walking the six faces afterwards, not by six
    tests per voxel (~30 % of this pass).
    """
    n0, n1, n2 = dense.shape
    count = np.zeros(n_labels, dtype=np.int64)
    coord_sum = np.zeros((n_labels, 3), dtype=np.int64)
    faces = np.zeros((n_labels, 3), dtype=np.int64)
    contacts = np.zeros((n_labels, 2, 3), dtype=np.int64)
    dt_max = np.zeros(n_labels, dtype=np.float64)
    dt_sum = np.zeros(n_labels, dtype=np.float64)
    p0, p1, p2 = perm[0], perm[1], perm[2]
    for i in range(n0):
        has_i = i + 1 < n0
        for j in range(n1):
            has_j = j + 1 < n1
            for k in range(n2):
                a = dense[i, j, k]
                if a >= n_labels:
                    raise ValueError("dense index out of range of its ids")
                if has_i:
                    b = dense[i + 1, j, k]
                    if b != a:
                        if a:
                            faces[a, p0] += 1
                        if b:
                            faces[b, p0] += 1
                if has_j:
                    b = dense[i, j + 1, k]
                    if b != a:
                        if a:
                            faces[a, p1] += 1
                        if b:
                            faces[b, p1] += 1
                if k + 1 < n2:
                    b = dense[i, j, k + 1]
                    if b != a:
                        if a:
                            faces[a, p2] += 1
                        if b:
                            faces[b, p2] += 1
                if a == 0:
                    continue
                count[a] += 1
                coord_sum[a, p0] += i
                coord_sum[a, p1] += j
                coord_sum[a, p2] += k
                t = dt[i, j, k]
                if not t < DT_CLIP:
                    t = DT_CLIP
                t = np.floor(t)
                if t > dt_max[a]:
                    dt_max[a] = t
                dt_sum[a] += t
    # chunk-face contacts: only the six faces, not a test per voxel
    for side in range(2):
        i = 0 if side == 0 else n0 - 1
        for j in range(n1):
            for k in range(n2):
                a = dense[i, j, k]
                if a:
                    contacts[a, side, p0] += 1
        j = 0 if side == 0 else n1 - 1
        for i in range(n0):
            for k in range(n2):
                a = dense[i, j, k]
                if a:
                    contacts[a, side, p1] += 1
        k = 0 if side == 0 else n2 - 1
        for i in range(n0):
            for j in range(n1):
                a = dense[i, j, k]
                if a:
                    contacts[a, side, p2] += 1
    return count, coord_sum, faces, contacts, dt_max, dt_sum


@njit(cache=True, nogil=True)
def second_pass(
    dense: np.ndarray, wanted: np.ndarray, centroid: np.ndarray, res: np.ndarray, perm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Centred second moments (nm^2) and squared max distance (nm) from the centroid.

    Centring here (instead of raw moments) keeps the covariance exact to float64
    rounding however far the chunk sits from the origin. Scalars only in the loop:
    small temporary arrays there cost ~50 % more time. Labels come in runs along the
    innermost axis, so each run accumulates in registers and is stored once: the same
    additions in the same order as one voxel at a time (bit-identical), ~35 % faster.
    """
    n0, n1, n2 = dense.shape
    n_labels = centroid.shape[0]
    moments = np.zeros((n_labels, 6), dtype=np.float64)
    max_d2 = np.zeros(n_labels, dtype=np.float64)
    rev = perm[0] == 2
    rx, ry, rz = res[0], res[1], res[2]
    for i in range(n0):
        for j in range(n1):
            k = 0
            while k < n2:
                a = dense[i, j, k]
                if a == 0 or not wanted[a]:
                    k += 1
                    continue
                c0 = centroid[a, 0]
                c1 = centroid[a, 1]
                c2 = centroid[a, 2]
                m0 = moments[a, 0]
                m1 = moments[a, 1]
                m2 = moments[a, 2]
                m3 = moments[a, 3]
                m4 = moments[a, 4]
                m5 = moments[a, 5]
                md = max_d2[a]
                cy = (j - c1) * ry
                while k < n2 and dense[i, j, k] == a:
                    if rev:
                        x, z = k, i
                    else:
                        x, z = i, k
                    cx = (x - c0) * rx
                    cz = (z - c2) * rz
                    d2 = cx * cx + cy * cy + cz * cz
                    if d2 > md:
                        md = d2
                    m0 += cx * cx
                    m1 += cx * cy
                    m2 += cx * cz
                    m3 += cy * cy
                    m4 += cy * cz
                    m5 += cz * cz
                    k += 1
                moments[a, 0] = m0
                moments[a, 1] = m1
                moments[a, 2] = m2
                moments[a, 3] = m3
                moments[a, 4] = m4
                moments[a, 5] = m5
                max_d2[a] = md
    full = np.empty((n_labels, 3, 3), dtype=np.float64)
    for a in range(n_labels):
        full[a, 0, 0] = moments[a, 0]
        full[a, 0, 1] = full[a, 1, 0] = moments[a, 1]
        full[a, 0, 2] = full[a, 2, 0] = moments[a, 2]
        full[a, 1, 1] = moments[a, 3]
        full[a, 1, 2] = full[a, 2, 1] = moments[a, 4]
        full[a, 2, 2] = moments[a, 5]
    return full, max_d2


@njit(cache=True, nogil=True)
def representative_pass(
    dense: np.ndarray,
    dt: np.ndarray,
    wanted: np.ndarray,
    centroid: np.ndarray,
    max_d: np.ndarray,
    res: np.ndarray,
    perm: np.ndarray,
    shape_xyz: np.ndarray,
) -> np.ndarray:
    """Voxel maximising ``trunc(dt) * (1 - d / max_d)`` per label.

    Ties go to the first voxel in C (x-major) order of the ORIGINAL axes, whatever
    the memory order, so C and Fortran chunks agree bit for bit. A voxel's score is at
    most ``trunc(dt)`` (``0 <= d <= max_d``, same float expressions as in
    :func:`second_pass`), so a voxel with ``trunc(dt) < best`` can neither beat nor tie
    the best and skips the square root: exact, not a heuristic.
    """
    n0, n1, n2 = dense.shape
    n_labels = centroid.shape[0]
    best = np.full(n_labels, -1.0, dtype=np.float64)
    best_flat = np.full(n_labels, -1, dtype=np.int64)
    rev = perm[0] == 2
    rx, ry, rz = res[0], res[1], res[2]
    ny, nz = shape_xyz[1], shape_xyz[2]
    for i in range(n0):
        for j in range(n1):
            k = 0
            while k < n2:
                a = dense[i, j, k]
                if a == 0 or not wanted[a]:
                    k += 1
                    continue
                c0 = centroid[a, 0]
                c2 = centroid[a, 2]
                cy = (j - centroid[a, 1]) * ry
                m = max_d[a]
                bs = best[a]
                bf = best_flat[a]
                while k < n2 and dense[i, j, k] == a:
                    if rev:
                        x, z = k, i
                    else:
                        x, z = i, k
                    t = dt[i, j, k]
                    if not t < DT_CLIP:
                        t = DT_CLIP
                    t = np.floor(t)
                    if t < bs:  # score <= t: this voxel can neither beat nor tie the best
                        k += 1
                        continue
                    if m > 0:
                        cx = (x - c0) * rx
                        cz = (z - c2) * rz
                        score = t * (1.0 - np.sqrt(cx * cx + cy * cy + cz * cz) / m)
                    else:
                        score = t
                    flat = (x * ny + j) * nz + z
                    if score > bs or (score == bs and flat < bf):
                        bs = score
                        bf = flat
                    k += 1
                best[a] = bs
                best_flat[a] = bf
    best_idx = np.zeros((n_labels, 3), dtype=np.int64)
    for a in range(n_labels):
        f = best_flat[a]
        if f >= 0:
            best_idx[a, 0] = f // (ny * nz)
            best_idx[a, 1] = (f // nz) % ny
            best_idx[a, 2] = f % nz
    return best_idx
