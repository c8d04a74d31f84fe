"""``l2cache features PATH``: compute one volume's L2 features and show them.

For a person debugging a chunk: read a labelled volume (``.npz`` with ``labels``, a
crackle ``.ckl``/``.ckl.gz`` file, or a CloudVolume path), run the engine, print the
largest nodes in API units and where the time went.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .argformats import BBOX_HELP, BOX_FORMAT, box, positive_int


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``features``: the engine alone on one volume, no Bigtable or queue, for
    debugging a chunk's values or timing the engine."""
    p = sub.add_parser(
        "features",
        help="compute L2 features of a labelled volume and print a summary",
        description=__doc__,
    )
    p.add_argument("path", help=".npz (array 'labels'), .ckl/.ckl.gz, or a CloudVolume URL")
    p.add_argument(
        "--resolution",
        type=_floats3,
        metavar="X,Y,Z",
        help="nm per voxel, 3 positive numbers (default: from the file or the volume's info)",
    )
    p.add_argument(
        "--bbox", type=box, metavar=BOX_FORMAT, help=f"{BBOX_HELP} (default: the whole volume)"
    )
    p.add_argument("--mip", type=int, default=0, help="CloudVolume mip level")
    p.add_argument(
        "--top", type=positive_int, default=15, help="rows to show (largest nodes first)"
    )
    p.set_defaults(func=run)


def _floats3(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError("expected three positive numbers X,Y,Z")
    return parts[0], parts[1], parts[2]


def load_volume(
    path: str, bbox: Sequence[int] | None = None, mip: int = 0
) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Labels (x, y, z) and the resolution stored with them, if any."""
    if path.endswith(".npz"):
        with np.load(path) as z:
            labels = z["labels"]
            res = tuple(z["resolution_nm"].tolist()) if "resolution_nm" in z.files else None
    elif path.endswith((".ckl", ".ckl.gz")):
        import crackle

        labels, res = crackle.load(path), None
    else:
        from cloudvolume import CloudVolume

        cv = CloudVolume(path, mip=mip, fill_missing=True, progress=False)
        b = bbox or (*cv.bounds.minpt, *cv.bounds.maxpt)
        labels = np.asarray(cv[b[0] : b[3], b[1] : b[4], b[2] : b[5]])[..., 0]
        return labels, tuple(float(v) for v in cv.resolution)
    if bbox is not None:
        labels = labels[bbox[0] : bbox[3], bbox[1] : bbox[4], bbox[2] : bbox[5]]
    return labels, res


def run(args: argparse.Namespace) -> int:
    """Read, compute, print; the read and the engine are timed apart so a slow run shows
    which of the two to look at."""
    t0 = time.perf_counter()
    if not args.path.startswith(("gs://", "file://", "precomputed://", "graphene://")):
        if not Path(args.path).exists():
            print(f"error: {args.path} does not exist")
            return 2
    labels, file_res = load_volume(args.path, args.bbox, args.mip)
    res = args.resolution or file_res
    if res is None:
        print("error: this file stores no resolution; pass --resolution X,Y,Z (nm)")
        return 2
    t_read = time.perf_counter() - t0
    timings: dict[str, float] = {}
    t1 = time.perf_counter()
    from l2cache.engine.features import compute_features  # numba: only when computing

    feats = compute_features(labels, res, timings=timings)
    t_engine = time.perf_counter() - t1
    print_summary(feats, labels.shape, res, args.top)
    phases = "  ".join(f"{k} {v:.3f}s" for k, v in timings.items())
    print(f"\nread {t_read:.3f}s  engine {t_engine:.3f}s  ({phases})")
    print("(the first call in a process includes loading or compiling the numba kernels)")
    return 0


def print_summary(
    feats: dict[str, np.ndarray], shape: Sequence[int], res: Sequence[float], top: int
) -> None:
    """The ``top`` largest nodes, converted from the engine's voxel units to the columns
    and units :func:`.common.print_features` shows lookups in (um^3, um^2, nm), so a
    computed node reads like a served one."""
    voxel_nm3 = float(np.prod(res))
    n = len(feats["l2id"])
    print(f"volume {tuple(shape)} voxels at {tuple(res)} nm: {n} L2 nodes")
    if n == 0:
        return
    order = np.argsort(-feats["size_nm3"].astype(np.int64), kind="stable")[:top]
    header = (
        f"{'l2id':>20} {'size_um3':>10} {'area_um2':>10} {'max_dt_nm':>9} {'mean_dt_nm':>10} "
        f"{'rep_coord_nm (x,y,z)':>24} {'pca_val[0]':>10}"
    )
    print(header)
    print("-" * len(header))
    for i in order.tolist():
        rep = feats["rep_coord_nm"][i].astype(np.float64) * np.asarray(res)
        pv = feats["pca_val"][i][0]
        print(
            f"{int(feats['l2id'][i]):>20} {feats['size_nm3'][i] * voxel_nm3 / 1e9:>10.4f} "
            f"{feats['area_nm2'][i] / 1e6:>10.3f} {int(feats['max_dt_nm'][i]):>9} "
            f"{float(feats['mean_dt_nm'][i]):>10.1f} "
            f"{'(' + ','.join(f'{v:.0f}' for v in rep) + ')':>24} "
            f"{'-' if np.isnan(pv) else f'{pv:.0f}':>10}"
        )
