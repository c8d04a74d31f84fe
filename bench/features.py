"""Feature engine vs the bare EDT of the same chunk, side by side in one run.

    .venv/bin/python bench/features.py [--quick]

The EDT is the one pass the engine cannot avoid, so the figure that matters is the
ratio engine / ``edt.edt(chunk, black_border=False, parallel=1)`` measured on the same
chunk in the same process (these machines are noisy; absolute seconds are not). Peak
RSS and cold start are measured in fresh subprocesses so they include the interpreter,
imports and the numba cache load, as a cold Cloud Function would pay them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import crackle
import edt
import numpy as np

from l2cache.engine.features import compute_features

ROOT = Path(__file__).resolve().parents[1]
VOLUME = ROOT / "data" / "pinky40" / "pinky40_512.ckl.gz"
RES = (16.0, 16.0, 40.0)

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from l2cache.engine.features import compute_features
t_import = time.perf_counter() - t0
labels = np.load(sys.argv[1])  # saved in Fortran order, as CloudVolume returns chunks
assert labels.flags.f_contiguous
t1 = time.perf_counter()
compute_features(labels, (16.0, 16.0, 40.0))
t_first = time.perf_counter() - t1
t2 = time.perf_counter()
compute_features(labels, (16.0, 16.0, 40.0))
t_warm = time.perf_counter() - t2
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child of this
# (large) benchmark process would report the parent's size; VmHWM belongs to the new mm.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"import_s": t_import, "first_call_s": t_first, "warm_call_s": t_warm,
                  "peak_rss_mib": int(hwm) / 1024}))
"""


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_chunk(chunk: np.ndarray, repeat: int) -> tuple[float, float, int]:
    n = len(compute_features(chunk, RES)["l2id"])  # also warms the kernels for this layout
    edt.edt(chunk, anisotropy=RES, black_border=False, parallel=1)  # warm both sides alike
    engine = best_of(lambda: compute_features(chunk, RES), repeat)
    bare = best_of(lambda: edt.edt(chunk, anisotropy=RES, black_border=False, parallel=1), repeat)
    return engine, bare, n


def fresh_process(chunk: np.ndarray) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chunk.npy"
        np.save(path, np.asfortranarray(chunk))
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 small chunks, 1 repeat")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    volume = crackle.load(str(VOLUME))  # uint32 (x, y, z), Fortran order
    repeat = 1 if args.quick else args.repeat

    print(f"# feature engine vs bare EDT (single-threaded), best of {repeat}, pinky40 {RES} nm")
    print(f"{'chunk':<28} {'nodes':>6} {'engine_s':>9} {'edt_s':>7} {'ratio':>6}")
    ratios = []
    grid = [(x, y, z) for x in (0, 256) for y in (0, 256) for z in (0, 128, 256, 384)]
    if args.quick:
        grid = grid[:4]
    for x, y, z in grid:
        chunk = np.asfortranarray(volume[x : x + 256, y : y + 256, z : z + 128], dtype=np.uint64)
        engine, bare, n = measure_chunk(chunk, repeat)
        ratios.append(engine / bare)
        name = f"256x256x128 @({x},{y},{z})"
        print(f"{name:<28} {n:>6} {engine:>9.3f} {bare:>7.3f} {engine / bare:>6.2f}")
    print(
        f"256x256x128 chunks: median ratio {np.median(ratios):.2f}, max {max(ratios):.2f} "
        f"over {len(ratios)} chunks"
    )

    big = np.asfortranarray(volume[0:256, 0:256, 0:512], dtype=np.uint64)
    del volume
    engine, bare, n = measure_chunk(big, repeat)
    print(f"{'256x256x512 @(0,0,0)':<28} {n:>6} {engine:>9.3f} {bare:>7.3f} {engine / bare:>6.2f}")

    cold = fresh_process(big)
    print(
        f"fresh process, 256x256x512 chunk: import {cold['import_s']:.2f}s, first call "
        f"{cold['first_call_s']:.2f}s (kernel cache load), warm call {cold['warm_call_s']:.2f}s, "
        f"peak RSS {cold['peak_rss_mib']:.0f} MiB (interpreter + input chunk + engine)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
