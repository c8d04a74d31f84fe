"""Lookup latency over HTTP on a >= 1M-row cache table in the Bigtable emulator.

    .venv/bin/python bench/lookup.py [--rows 1000000]

One request of N ids (the server splits it into concurrent Bigtable reads) against the
same N ids fetched the way users do today to dodge timeouts: one request per 100 ids,
one after another. Both run in the same process against the same server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import requests
import yaml

from l2cache.config import parse_config
from l2cache.domain import ids
from l2cache.domain.attributes import BY_NAME
from l2cache.domain.lineage import Lineage
from l2cache.gcp.bigtable import bigtable_instance
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache_tools.local.emulators import start_bigtable_emulator
from l2cache_tools.local.functions import start_function

PROJECT, INSTANCE, TABLE = "bench", "bench", "cache_bench"


def config(tmp: Path) -> dict:
    cfg = {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "max_ids_per_request": 200_000,
        "datasets": {
            "bench": {
                "segmentation": "file:///nowhere",
                "graph": {
                    "kind": "bigtable",
                    "project": PROJECT,
                    "instance": INSTANCE,
                    "table_id": "bench",
                },
                "cache_table_id": TABLE,
                "resolution": [8, 8, 40],
                "voxel_offset": [0, 0, 0],
                "chunk_size": [256, 256, 512],
                "spatial_bits": {1: 10, 2: 10, 3: 9},
            }
        },
    }
    (tmp / "l2cache.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def fake_features(l2: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid random values of the stored dtypes (the engine's speed is not measured here)."""
    n = l2.size
    out = {"l2id": l2}
    for name, attr in BY_NAME.items():
        shape = (n, *attr.shape)
        if attr.dtype.kind == "f":
            out[name] = rng.random(shape).astype(attr.dtype)
        else:
            out[name] = rng.integers(0, 60_000, shape).astype(attr.dtype)
    return out


def fill(store: CacheStore, n_rows: int, spatial) -> np.ndarray:
    rng = np.random.default_rng(0)
    per_chunk = 10_000
    coords = np.stack(np.unravel_index(np.arange(n_rows // per_chunk + 1), (64, 64, 64)), 1)
    segs = np.tile(np.arange(1, per_chunk + 1), coords.shape[0])[:n_rows]
    chunk_of = np.repeat(coords, per_chunk, axis=0)[:n_rows]
    l2 = ids.encode_ids(2, chunk_of, segs, spatial)
    lineage = Lineage("bench-fill", cell_timestamp=datetime(2026, 1, 1, tzinfo=UTC))
    parts = np.array_split(l2, max(1, n_rows // 50_000))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: store.write_features(fake_features(p, rng), lineage), parts))
    return l2


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def one_request(url: str, sample: np.ndarray) -> None:
    """What a notebook pays: request, answer received, decompressed and parsed."""
    r = requests.post(url, json={"l2_ids": sample.tolist()}, timeout=600)
    r.raise_for_status()
    assert len(r.json()) == sample.size


def served(url: str, sample: np.ndarray) -> dict[str, float]:
    """One request as requests sends it (``Accept-Encoding: gzip, deflate, br``), the
    compressed answer received but neither decompressed nor parsed: the server's work
    plus the transfer, what the serving overhead is. Returns its Server-Timing (s)."""
    r = requests.post(url, json={"l2_ids": sample.tolist()}, timeout=600, stream=True)
    r.raise_for_status()
    assert r.raw.read(decode_content=False)
    return {
        name.strip(): float(ms) / 1000
        for name, ms in (part.split(";dur=") for part in r.headers["Server-Timing"].split(","))
    }


def naive(url: str, sample: np.ndarray) -> None:
    with requests.Session() as s:
        for i in range(0, sample.size, 100):
            part = sample[i : i + 100]
            r = s.post(url, json={"l2_ids": part.tolist()}, timeout=60)
            r.raise_for_status()


def raw_read(reader, sample: np.ndarray) -> None:
    """The same keys read straight from Bigtable (whole rows, newest cells), no serving:
    what the lookup cannot do faster than, so its overhead is measured against it."""
    keys = ids.row_keys(np.unique(sample))
    rows = {}
    for i in range(0, len(keys), 10_000):
        rows.update(reader.read(keys[i : i + 10_000]))
    assert len(rows) == len(keys)


def serving_overhead(url: str, reader, sample: np.ndarray, rounds: int) -> dict[str, float]:
    """Medians over paired rounds (raw read first, then the lookup over HTTP): raw and
    lookup seconds, their per-round ratio, and the server's own phases."""
    rows = []
    for _ in range(rounds):
        t = time.perf_counter()
        raw_read(reader, sample)
        raw = time.perf_counter() - t
        t = time.perf_counter()
        phases = served(url, sample)
        lookup = time.perf_counter() - t
        rows.append({"raw": raw, "lookup": lookup, "ratio": lookup / raw, **phases})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir, start_bigtable_emulator() as bt:
        tmp = Path(tmpdir)
        cfg = config(tmp)
        import os

        os.environ.update(bt.env)
        dataset = parse_config(cfg).dataset("bench")
        table = create_cache_table(bigtable_instance(PROJECT, INSTANCE, admin=True), TABLE)
        t = time.perf_counter()
        l2 = fill(CacheStore(table, dataset), args.rows, dataset.spatial_bits)
        fill_s = time.perf_counter() - t
        print(
            f"# lookup benchmark: {l2.size:,} rows filled in {fill_s:.0f}s "
            f"({l2.size / fill_s:,.0f} rows/s)"
        )
        with start_function(
            "lookup", {"L2CACHE_CONFIG": str(tmp / "l2cache.yaml"), **bt.env}, log_dir=tmp
        ) as fn:
            url = f"http://{fn.host}/l2cache/api/v1/table/bench/attributes"
            rng = np.random.default_rng(1)
            one_request(url, l2[:100])  # warm the instance
            from l2cache.gcp.bigtable import RowReader

            reader = RowReader(table.name)
            print("# serving overhead: HTTP lookup round trip (JSON, all attributes, requests'")
            print("# default Accept-Encoding, answer received but not decompressed or parsed)")
            print("# vs the raw Bigtable read of the same keys in this process, paired rounds,")
            print("# median; the server's phases from its Server-Timing header")
            print(
                f"{'ids':>8} {'raw_read_s':>10} {'lookup_s':>9} {'ratio':>6} "
                f"{'srv_read':>8} {'decode':>7} {'encode':>7}"
            )
            for n in (1_000, 10_000):
                sample = rng.choice(l2, n, replace=False)
                raw_read(reader, sample)  # warm the channel
                m = serving_overhead(url, reader, sample, args.repeat)
                print(
                    f"{n:>8} {m['raw']:>10.3f} {m['lookup']:>9.3f} {m['ratio']:>6.2f} "
                    f"{m['read']:>8.3f} {m['decode']:>7.3f} {m['encode']:>7.3f}"
                )
            print(f"{'ids':>8} {'mode':<22} {'p50_s':>7} {'p95_s':>7} {'ids/s':>9}")
            for n in (1_000, 10_000, 100_000):
                sample = rng.choice(l2, min(n, l2.size), replace=False)
                rep = args.repeat if n < 100_000 else 3
                times = timed(lambda s=sample: one_request(url, s), rep)
                p50 = statistics.median(times)
                p95 = float(np.percentile(times, 95))
                print(
                    f"{n:>8} {'one request (server)':<22} {p50:>7.3f} {p95:>7.3f} {n / p50:>9,.0f}"
                )
                rep_naive = 3 if n < 100_000 else 1
                times_n = timed(lambda s=sample: naive(url, s), rep_naive)
                p50n = statistics.median(times_n)
                p95n = float(np.percentile(times_n, 95))
                print(
                    f"{n:>8} {'100 ids per request':<22} {p50n:>7.3f} {p95n:>7.3f} "
                    f"{n / p50n:>9,.0f}   (one request is {p50n / p50:.1f}x faster)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
