"""A keyed permutation of ``[0, n)``: the scattered order a bulk run's chunks are computed in.

Why: chunks in x-major (or any spatially compact) order send every worker of a run to
the same few Bigtable tablets and the same few PCG rows at once. A keyed pseudo-random
bijection spreads concurrent work over the whole volume (as cave-pipeline does), while
staying *deterministic*: position ``p`` of run ``r`` always names the same chunk, so a
retried or resumed span task computes exactly the chunks it did before.

How: a balanced Feistel network over the smallest even number of bits ``2h`` with
``2**(2h) >= n`` (4 rounds, a splitmix64-style round function keyed by round keys
derived from the run id), made a bijection of ``[0, n)`` by cycle-walking: an output
``>= n`` is encrypted again until it lands inside. A Feistel network is a bijection of
its ``2**(2h)`` domain whatever its round function, and cycle-walking a bijection
restricted to a subset is a bijection of that subset, so no chunk is skipped or computed
twice. The domain is below ``4 n``, so fewer than 4 walks are expected per value.
Vectorized in numpy (uint64 arithmetic wraps, as the mixing wants); ~0.1 us per value.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
MAX_N = 1 << 62  # the Feistel domain (2h bits) must fit uint64 with room for the shifts
SCALAR_MAX = 64  # up to this many positions (a leaf's batch) plain ints beat numpy's calls
_U64 = (1 << 64) - 1


def permutation_key(run_id: str, rounds: int = ROUNDS) -> tuple[int, ...]:
    """Round keys for a run: the run id hashed, so every run scatters differently and
    any process (worker, CLI, bench) derives the same order from the id alone."""
    digest = hashlib.sha256(f"l2cache-permutation:{run_id}".encode()).digest()
    return tuple(int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(rounds))


def _half_bits(n: int) -> int:
    """``h`` with ``2**(2h) >= n`` (at least 1, so 2 values are permuted)."""
    bits = max(2, int(n - 1).bit_length())
    return (bits + 1) // 2


def _round(r: np.ndarray, key: np.uint64, mask: np.uint64) -> np.ndarray:
    """A keyed mixing of the right half (splitmix64's finalizer), cut to ``h`` bits."""
    z = r ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return z & mask


def _feistel_int(x: int, keys: tuple[int, ...], half: int) -> int:
    """:func:`_feistel` of one value in Python ints (the same bits: uint64 wraps are
    masks here), for a leaf's few positions where numpy's per-call cost dominates."""
    mask = (1 << half) - 1
    left, right = x >> half, x & mask
    for k in keys:
        z = right ^ k
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
        left, right = right, left ^ ((z ^ (z >> 31)) & mask)
    return (left << half) | right


def _feistel(x: np.ndarray, keys: tuple[int, ...], half: int) -> np.ndarray:
    h = np.uint64(half)
    mask = np.uint64((1 << half) - 1)
    left, right = x >> h, x & mask
    for k in keys:
        left, right = right, left ^ _round(right, np.uint64(k), mask)
    return (left << h) | right


def permute(positions: np.ndarray | list[int], n: int, keys: tuple[int, ...]) -> np.ndarray:
    """The chunk linear indices at ``positions`` of the keyed order of ``[0, n)``.

    ``positions`` must lie in ``[0, n)``; the result has their shape, dtype int64.
    """
    if not 0 < n <= MAX_N:
        raise ValueError(f"permutation size must be in 1..2**62, got {n}")
    p = np.asarray(positions, dtype=np.int64)
    if p.size and (int(p.min()) < 0 or int(p.max()) >= n):
        raise ValueError(f"positions must lie in [0, {n})")
    if n == 1:
        return np.zeros(p.shape, dtype=np.int64)
    half = _half_bits(n)
    if p.size <= SCALAR_MAX:
        out_int = []
        for v in p.ravel().tolist():
            v = _feistel_int(v, keys, half)
            while v >= n:  # cycle-walking
                v = _feistel_int(v, keys, half)
            out_int.append(v)
        return np.array(out_int, dtype=np.int64).reshape(p.shape)
    limit = np.uint64(n)
    out = _feistel(p.astype(np.uint64).ravel(), keys, half)
    walk = np.flatnonzero(out >= limit)
    while walk.size:  # cycle-walking: re-encrypt only what fell outside [0, n)
        out[walk] = _feistel(out[walk], keys, half)
        walk = walk[out[walk] >= limit]
    return out.astype(np.int64).reshape(p.shape)
