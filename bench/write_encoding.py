"""Feature rows to MutateRows bytes: the old hand encoder vs the generated protobuf messages.

    .venv/bin/python bench/write_encoding.py [--repeat 7]

Real rows: the engine's features of pinky40 chunks (16.0, 16.0, 40.0) nm, 256x256x128
each, concatenated (and tiled past what they hold) to 791 (the 256x256x512 chunk at
(0,0,0) has 791 L2 nodes), 2,000, 5,000 and 10,000 rows; each row has the 8 feature
cells and the 4 lineage cells, as ``CacheStore.write_features`` writes them. Both
encoders take the same feature columns and lineage and produce ``(key, entry bytes)``
per row; their bytes are asserted identical, then the two are timed alternately in
one process (median of ``--repeat``). The difference is also shown as a share of the
bare EDT of the production 256x256x512 chunk (``edt.edt``, as bench/features.py): the
floor of what computing a chunk costs.

``hand`` is the encoder l2cache used until the write path was unified (commit 753ebd6,
``l2cache.gcp.bigtable_write``), kept here verbatim so before and after come from the
same run; ``generated`` is :func:`l2cache.gcp.bigtable_write.encode_columns`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import crackle
import edt
import numpy as np

from l2cache.domain import ids as idlib
from l2cache.domain.attributes import ATTRIBUTES, FEATURE_FAMILY, LINEAGE_FAMILY, encode_column
from l2cache.domain.lineage import Lineage
from l2cache.engine.features import compute_features
from l2cache.gcp.bigtable_write import encode_columns, timestamp_micros

ROOT = Path(__file__).resolve().parents[1]
VOLUME = ROOT / "data" / "pinky40" / "pinky40_512.ckl.gz"
RES = (16.0, 16.0, 40.0)
SIZES = (791, 2_000, 5_000, 10_000)
LINEAGE = Lineage(
    "bulk-20261203T093903-abcdef",  # new_run's form
    "0123456789abcdef",
    "efb9e8615b2d",
    "0123456789abcdef",
    datetime(2026, 12, 3, tzinfo=UTC),
)


# --- the hand encoder, verbatim (shared/l2cache/gcp/bigtable_write.py at 753ebd6) ---------------


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 (server timestamp -1): 10 bytes
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class CellEncoder:
    def __init__(self, family: str, qualifier: bytes, micros: int) -> None:
        self._prefix = (
            _field(1, family.encode()) + _field(2, qualifier) + _varint(3 << 3) + _varint(micros)
        )
        self._headers: dict[int, bytes] = {}

    def header(self, length: int) -> bytes:
        head = self._headers.get(length)
        if head is None:
            value_tag = _varint(4 << 3 | 2) + _varint(length) if length else b""
            set_cell_len = len(self._prefix) + len(value_tag) + length
            set_cell_head = _varint(1 << 3 | 2) + _varint(set_cell_len)
            mutation_len = len(set_cell_head) + set_cell_len
            head = _varint(2 << 3 | 2) + _varint(mutation_len) + set_cell_head
            head += self._prefix + value_tag
            self._headers[length] = head
        return head

    def encode(self, value: bytes) -> bytes:
        return self.header(len(value)) + value


def encode_entry(row_key: bytes, cells: bytes) -> bytes:
    body = _field(1, row_key) + cells
    return _varint(2 << 3 | 2) + _varint(len(body)) + body


def encode_rows(keys, columns, constant: bytes) -> list[tuple[bytes, bytes]]:
    encoders = [enc for enc, _ in columns]
    values = [vals for _, vals in columns]
    out = []
    for i, key in enumerate(keys):
        cells = b"".join([enc.encode(vals[i]) for enc, vals in zip(encoders, values, strict=True)])
        out.append((key, encode_entry(key, cells + constant)))
    return out


def hand(features: dict, lineage: Lineage) -> list[tuple[bytes, bytes]]:
    """write_features at 753ebd6, up to the request."""
    micros = timestamp_micros(lineage.cell_timestamp)
    columns = [
        (CellEncoder(FEATURE_FAMILY, a.key, micros), encode_column(a, features[a.name]))
        for a in ATTRIBUTES
    ]
    shared = b"".join(
        CellEncoder(LINEAGE_FAMILY, col, micros).encode(value)
        for col, value in lineage.columns().items()
    )
    return encode_rows(idlib.row_keys(features["l2id"]), columns, shared)


# --- the generated messages, as CacheStore.write_features calls them -------------------------


def generated(features: dict, lineage: Lineage) -> list[tuple[bytes, bytes]]:
    columns = [(FEATURE_FAMILY, a.key, encode_column(a, features[a.name])) for a in ATTRIBUTES]
    shared = [(LINEAGE_FAMILY, col, value) for col, value in lineage.columns().items()]
    return encode_columns(idlib.row_keys(features["l2id"]), columns, shared, lineage.cell_timestamp)


def real_rows(volume: np.ndarray, n: int) -> tuple[dict, int]:
    """The first ``n`` feature rows of pinky40's 256x256x128 chunks, tiled when short,
    renamed to distinct layer-2 ids."""
    parts = []
    for x, y, z in [(x, y, z) for x in (0, 256) for y in (0, 256) for z in (0, 128, 256, 384)]:
        chunk = np.asfortranarray(volume[x : x + 256, y : y + 256, z : z + 128], dtype=np.uint64)
        parts.append(compute_features(chunk, RES))
    feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    have = len(feats["l2id"])
    take = np.arange(n) % have
    out = {k: v[take] for k, v in feats.items()}
    out["l2id"] = (np.uint64(2) << np.uint64(56)) + np.arange(1, n + 1, dtype=np.uint64)
    return out, have


def timed(fn, *args) -> float:
    """Seconds one call of ``fn(*args)`` takes."""
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    volume = crackle.load(str(VOLUME))
    big = np.asfortranarray(volume[0:256, 0:256, 0:512], dtype=np.uint64)
    bare_edt = functools.partial(edt.edt, big, anisotropy=RES, black_border=False, parallel=1)
    bare_edt()  # warm
    edt_s = min(timed(bare_edt) for _ in range(2))
    del big
    everything, have = real_rows(volume, max(SIZES))
    print(
        f"# feature rows -> MutateRows entries: hand encoder (753ebd6) vs generated protobuf "
        f"messages (upb), median of {args.repeat} alternating rounds; {have} real rows of 16 "
        f"pinky40 256x256x128 chunks, tiled; 12 cells a row; bare EDT of the 256x256x512 "
        f"chunk {edt_s:.2f} s"
    )
    print(
        f"{'rows':>7} {'hand_ms':>8} {'generated_ms':>12} {'ratio':>6} "
        f"{'extra_ms/1k_rows':>16} {'extra/chunk_EDT':>15}"
    )
    for n in SIZES:
        feats = {k: v[:n] for k, v in everything.items()}
        assert hand(feats, LINEAGE) == generated(feats, LINEAGE), "different bytes"
        rounds = {"hand": [], "generated": []}
        for _ in range(args.repeat):
            rounds["hand"].append(timed(hand, feats, LINEAGE))
            rounds["generated"].append(timed(generated, feats, LINEAGE))
        h = float(np.median(rounds["hand"]))
        g = float(np.median(rounds["generated"]))
        extra = (g - h) / n * 1000
        share = (g - h) / edt_s if n == SIZES[0] else float("nan")
        share_text = f"{share:>14.2%}" if n == SIZES[0] else f"{'':>14}-"
        print(
            f"{n:>7} {h * 1e3:>8.1f} {g * 1e3:>12.1f} {g / h:>6.2f} "
            f"{extra * 1e3:>16.1f} {share_text}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
