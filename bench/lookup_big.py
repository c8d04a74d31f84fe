"""Big lookups and the binary answer (issue 20, items 4 and 6), on the Bigtable emulator.

    .venv/bin/python bench/lookup_big.py [--rows 500000] [--repeat 3]

1. JSON vs ``.npz`` for 75,000 ids, all attributes, side by side in one run, over HTTP
   to the lookup function (functions-framework): bytes on the wire (identity, brotli as
   requests and caveclient ask, gzip), the round trip to the last byte, the server's
   own time (``LookupService.handle`` in this process, answer drained) and the client's
   decode (decompress + ``json.loads`` / ``orjson.loads`` vs ``np.load``).
2. Memory per request: the function's peak RSS (``VmHWM`` of its gunicorn worker, a
   fresh process per size) and the in-process ``tracemalloc`` peak of one request, for
   75,000 and 500,000 ids, JSON (brotli) and ``.npz``.
3. What reading each row's newest cell timestamp (the ETag's input) costs the read:
   ``RowReader.read`` of 10,000 keys with and without ``stamps``, paired rounds.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import brotli
import numpy as np
import orjson
import requests
import yaml

from l2cache.config import parse_config
from l2cache.domain import ids
from l2cache.domain.lineage import Lineage
from l2cache.gcp.bigtable import RowReader, bigtable_instance
from l2cache.serving.api import LookupService
from l2cache.serving.respond import Admission
from l2cache.store.cache import CacheStore, create_cache_table
from l2cache_tools.local.emulators import start_bigtable_emulator
from l2cache_tools.local.functions import start_function

PROJECT, INSTANCE, TABLE = "bench", "bench", "cache_big_bench"
ROUTE = "/l2cache/api/v1/table/bench/attributes"
NPZ = "application/x-npz"


def config(tmp: Path) -> dict:
    cfg = {
        "bigtable": {"project": PROJECT, "instance": INSTANCE},
        "datasets": {  # the default id cap (500,000)
            "bench": {
                "segmentation": "file:///nowhere",
                "graph": {"kind": "bigtable", "project": PROJECT, "instance": INSTANCE},
                "cache_table_id": TABLE,
                "resolution": [8, 8, 40],
                "voxel_offset": [0, 0, 0],
                "chunk_size": [256, 256, 512],
                "spatial_bits": {1: 10, 2: 10, 3: 9},
            }
        },
    }
    cfg["datasets"]["bench"]["graph"]["table_id"] = "bench"
    (tmp / "l2cache.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def features(l2: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Realistic ranges, every node with PCA (the longest JSON: the worst case)."""
    n = l2.size
    return {
        "l2id": l2,
        "size_nm3": rng.integers(1, 2**22, n).astype(np.uint32),
        "area_nm2": rng.integers(1, 2**30, n).astype(np.uint32),
        "max_dt_nm": rng.integers(0, 3000, n).astype(np.uint16),
        "mean_dt_nm": rng.uniform(0, 800, n).astype(np.float16),
        "rep_coord_nm": rng.integers(0, 256, (n, 3)).astype(np.uint16),
        "chunk_intersect_count": rng.integers(0, 900, (n, 2, 3)).astype(np.uint16),
        "pca": rng.normal(size=(n, 3, 3)).astype(np.float16),
        "pca_val": rng.uniform(1, 1e5, (n, 3)).astype(np.float32),
    }


def fill(store: CacheStore, n_rows: int, spatial) -> np.ndarray:
    rng = np.random.default_rng(0)
    per_chunk = 1_000
    coords = np.stack(np.unravel_index(np.arange(n_rows // per_chunk + 1), (64, 64, 64)), 1)
    segs = np.tile(np.arange(1, per_chunk + 1), coords.shape[0])[:n_rows]
    l2 = ids.encode_ids(2, np.repeat(coords, per_chunk, axis=0)[:n_rows], segs, spatial)
    lineage = Lineage("bench-fill", cell_timestamp=datetime(2026, 1, 1, tzinfo=UTC))
    for part in np.array_split(l2, max(1, n_rows // 50_000)):
        store.write_features(features(part, rng), lineage)
    return np.sort(l2)


def post(url: str, sample: np.ndarray, accept: str | None, coding: str) -> requests.Response:
    headers = {"Content-Type": "application/octet-stream", "Accept-Encoding": coding}
    if accept:
        headers["Accept"] = accept
    body = sample.astype("<u8").tobytes()
    return requests.post(url, data=body, headers=headers, timeout=900, stream=True)


def decoders(kind: str, coding: str):
    unzip = {"br": brotli.decompress, "gzip": gzip.decompress, "identity": bytes}[coding]
    if kind == "json":
        return {
            "json.loads": lambda raw: json.loads(unzip(raw)),  # requests' .json(), caveclient
            "orjson.loads": lambda raw: orjson.loads(unzip(raw)),
        }

    def load(raw: bytes) -> dict:
        with np.load(io.BytesIO(unzip(raw)), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    return {"np.load": load}


def median_time(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def in_process(
    cfg: dict, sample: np.ndarray, accept: str | None, coding: str, trace: bool = False
) -> tuple:
    """One request through ``LookupService.handle``, its answer drained: seconds, and
    with ``trace`` the ``tracemalloc`` peak (MiB) above what was allocated before it
    (tracing slows the request ~7x: its seconds are then not the server's time)."""
    config = parse_config(cfg)
    table = bigtable_instance(PROJECT, INSTANCE).table(TABLE)
    service = LookupService(
        config, lambda name: CacheStore(table, config.dataset(name)), admission=Admission(10**7)
    )
    headers = {"Content-Type": "application/octet-stream", "Accept-Encoding": coding}
    if accept:
        headers["Accept"] = accept
    body = sample.astype("<u8").tobytes()
    service.handle("POST", ROUTE, {}, headers, np.asarray(sample[:10]).astype("<u8").tobytes())
    if trace:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = time.perf_counter()
    r = service.handle("POST", ROUTE, {}, headers, body)
    size = len(r.content())
    seconds = time.perf_counter() - t
    peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    if trace:
        tracemalloc.stop()
    assert r.status == 200 and size
    return seconds, peak


def worker_pid(pid: int) -> int:
    """gunicorn's worker: the functions-framework process's child."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


def vm(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_rss(tmp: Path, env: dict, sample: np.ndarray, accept: str | None) -> tuple:
    """A fresh function: its worker's RSS after a warm-up request, then the peak
    (VmHWM) after one request of ``sample``, and the round trip's seconds."""
    with start_function("lookup", {"L2CACHE_CONFIG": str(tmp / "l2cache.yaml"), **env}) as fn:
        url = f"http://{fn.host}{ROUTE}"
        assert post(url, sample[:100], accept, "br").content
        pid = worker_pid(fn.process.pid)
        before = vm(pid, "VmRSS")
        t = time.perf_counter()
        r = post(url, sample, accept, "br")
        size = len(r.raw.read(decode_content=False))
        seconds = time.perf_counter() - t
        assert r.status_code == 200 and size
        return before, vm(pid, "VmHWM"), seconds, r.headers.get("Transfer-Encoding") == "chunked"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ids", type=int, default=75_000, help="ids of the JSON/npz compare")
    parser.add_argument("--only-stamps", action="store_true", help="part 3 only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir, start_bigtable_emulator() as bt:
        tmp = Path(tmpdir)
        cfg = config(tmp)
        os.environ.update(bt.env)
        dataset = parse_config(cfg).dataset("bench")
        table = create_cache_table(bigtable_instance(PROJECT, INSTANCE, admin=True), TABLE)
        t = time.perf_counter()
        l2 = fill(CacheStore(table, dataset), args.rows, dataset.spatial_bits)
        print(f"# {l2.size:,} rows filled in {time.perf_counter() - t:.0f} s")
        rng = np.random.default_rng(1)
        sample = np.sort(rng.choice(l2, min(args.ids, l2.size), replace=False))

        if not args.only_stamps:
            print(f"\n# 1. JSON vs .npz, {sample.size:,} ids, all attributes, over HTTP")
            print("#    wire = bytes received; round trip to the last byte and the client's")
            print("#    decode (decompress + parse) are medians of --repeat; server = handle()")
            print("#    in this process with its answer drained")
            print(
                f"{'format':<6} {'coding':<8} {'wire_MB':>8} {'round_s':>8} {'server_s':>8} "
                f"{'decode':<13} {'decode_s':>8}"
            )
            with start_function(
                "lookup", {"L2CACHE_CONFIG": str(tmp / "l2cache.yaml"), **bt.env}, log_dir=tmp
            ) as fn:
                url = f"http://{fn.host}{ROUTE}"
                assert post(url, sample[:100], None, "br").content  # warm
                for kind, accept in (("json", None), ("npz", NPZ)):
                    for coding in ("identity", "br", "gzip"):
                        got: list[bytes] = []

                        def fetch(accept=accept, coding=coding, got=got) -> None:
                            r = post(url, sample, accept, coding)
                            got[:] = [r.raw.read(decode_content=False)]
                            assert r.status_code == 200

                        round_s = median_time(fetch, args.repeat)
                        raw = got[0]
                        server_s = statistics.median(
                            in_process(cfg, sample, accept, coding)[0] for _ in range(args.repeat)
                        )
                        for name, decode in decoders(kind, coding).items():
                            decode_s = median_time(lambda d=decode, b=raw: d(b), args.repeat)
                            print(
                                f"{kind:<6} {coding:<8} {len(raw) / 1e6:>8.2f} {round_s:>8.3f} "
                                f"{server_s:>8.3f} {name:<13} {decode_s:>8.3f}"
                            )

            print("\n# 2. memory per request: the function's worker (fresh per row), RSS after a")
            print("#    100-id warm-up and its peak (VmHWM) after the request, brotli; and the")
            print("#    tracemalloc peak of the same request in this process")
            print(
                f"{'ids':>8} {'format':<6} {'rss_MiB':>8} {'peak_MiB':>9} {'round_s':>8} "
                f"{'chunked':>7} {'traced_MiB':>10}"
            )
            for n in (75_000, min(500_000, l2.size)):
                part = np.sort(rng.choice(l2, n, replace=False)) if n < l2.size else l2
                for kind, accept in (("json", None), ("npz", NPZ)):
                    before, peak, seconds, chunked = peak_rss(tmp, bt.env, part, accept)
                    _, traced = in_process(cfg, part, accept, "br", trace=True)
                    print(
                        f"{n:>8} {kind:<6} {before:>8.0f} {peak:>9.0f} {seconds:>8.2f} "
                        f"{chunked!s:>7} {traced:>10.0f}"
                    )

        print("\n# 3. the ETag's input: RowReader.read of 10,000 keys, newest cells, with and")
        print("#    without each row's newest timestamp, paired rounds, median")
        reader = RowReader(table.name)
        keys = ids.row_keys(rng.choice(l2, 10_000, replace=False))
        reader.read(keys)
        plain, stamped = [], []
        for _ in range(max(5, args.repeat * 3)):
            t = time.perf_counter()
            reader.read(keys)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            reader.read(keys, stamps={})
            stamped.append(time.perf_counter() - t)
        p, s = statistics.median(plain), statistics.median(stamped)
        print(f"read: without {p:.3f} s, with stamps {s:.3f} s ({(s / p - 1) * 100:+.1f} %)")
        from l2cache.gcp import bigtable as bt_mod

        request = bt_mod._ReadRowsRequest(table_name=table.name)  # noqa: SLF001
        request.rows.row_keys.extend(keys)
        request.filter.CopyFrom(bt_mod.NEWEST.to_pb())
        responses = list(reader._call(request, timeout=60))  # noqa: SLF001
        parse = {}
        for label, stamps in (("without", None), ("with", {})):
            parse[label] = median_time(
                lambda st=stamps: bt_mod._parse(responses, {}, bt_mod._Progress(), False, st),  # noqa: SLF001
                15,
            )
        w, o = parse["with"], parse["without"]
        print(
            f"parse only (the same {len(responses):,} responses, 15 rounds): without "
            f"{o * 1000:.1f} ms, with stamps {w * 1000:.1f} ms ({(w / o - 1) * 100:+.1f} %)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
