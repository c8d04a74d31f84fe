"""Chunk files with the right labels and the wrong geometry: which are refused, and by what.

The real pinky40 crop built as a PCG dataset (2x2x2 chunks of 48x48x24, atomic
cross-chunk edges in PCG's layout) on the Bigtable emulator. Each row of the table is a
rewrite of a chunk file that keeps every label (so the label checks have nothing to
say, except where a shift pushes a supervoxel out of the chunk); every chunk of the
crop is rewritten that way in turn and read through the worker's own
``load_chunk_l2``. The table states how many of the 8 chunks each corruption is caught
in and by which check, measured on this crop:

- mirrored along x, y or z, rotated, transposed: caught in every chunk, by the geometry
  check (each chunk of a 2x2x2 grid has one neighbour per axis, so a mirror along an
  axis moves that face's supervoxels to the face that has no edges);
- rolled by one voxel (content wraps around): 5-7 of 8. Caught where the face with
  edges receives the opposite plane (neighbour on the low side) or the supervoxels
  that touched it were one plane thick; passes where the face receives its own next
  layer and the objects are thicker than one voxel (1-3 of 8);
- shifted by one voxel (background fills the vacated plane): 5-7 of 8, most by the
  label check (a supervoxel one plane thick pushed out of the chunk is absent: the
  builder's octant cuts make such slivers at chunk faces; the map sets ``input:
  {strict: true}``, without which such a chunk is computed and its ghosts counted for
  QC's ``max_ghost_sv_fraction``), some by the geometry check
  (the vacated plane was the face with edges); 1-3 of 8 pass.

So mirrors, rotations and transposes are caught; a one-voxel shift is not reliably.
Every outcome is asserted exactly (the crop and the builder are deterministic), so a
change in what is caught shows up here. Bounded: ~40 s for the module (each case
rewrites and reads 8 chunk files twice).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from l2cache.compute import dataset_context, load_chunk_l2
from l2cache.config import load_config
from l2cache.domain.failures import GeometryMismatch, InconsistentInput
from l2cache.domain.regions import region_chunks
from l2cache.gcp.bigtable import bigtable_instance
from l2cache_tools.dataset import build_dataset

DS = "geomabuse"
PROJECT, INSTANCE = "geomabuse-project", "geomabuse-instance"
CHUNK, RES = (48, 48, 24), (16.0, 16.0, 40.0)
CROP = Path(__file__).resolve().parents[1] / "data" / "pinky40_crop_96x96x48.npz"
CHUNKS = [tuple(c) for c in region_chunks([0, 0, 0, 2, 2, 2])]


def shift(axis: int, by: int) -> Callable[[np.ndarray], np.ndarray]:
    """Content moved ``by`` voxels along ``axis``, background filling what it vacates."""

    def apply(a: np.ndarray) -> np.ndarray:
        out = np.zeros_like(a)
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        src[axis] = slice(0, a.shape[axis] - by) if by > 0 else slice(-by, None)
        dst[axis] = slice(by, None) if by > 0 else slice(0, a.shape[axis] + by)
        out[tuple(dst)] = a[tuple(src)]
        return out

    return apply


# name, rewrite, chunks caught by the geometry check, chunks caught by the label checks
# (the rest: computed as if good), measured on this crop (module docstring).
CASES: list[tuple[str, Callable[[np.ndarray], np.ndarray], int, int]] = [
    ("mirror-x", lambda a: a[::-1], 8, 0),
    ("mirror-y", lambda a: a[:, ::-1], 8, 0),
    ("mirror-z", lambda a: a[:, :, ::-1], 8, 0),
    ("rotate-180-xy", lambda a: a[::-1, ::-1], 8, 0),
    ("mirror-xyz", lambda a: a[::-1, ::-1, ::-1], 8, 0),
    ("transpose-xy", lambda a: a.transpose(1, 0, 2), 8, 0),
    ("roll-x+1", lambda a: np.roll(a, 1, 0), 6, 0),
    ("roll-y+1", lambda a: np.roll(a, 1, 1), 5, 0),
    ("roll-z+1", lambda a: np.roll(a, 1, 2), 7, 0),
    ("shift-x+1", shift(0, 1), 2, 4),
    ("shift-x-1", shift(0, -1), 1, 4),
    ("shift-z+1", shift(2, 1), 1, 6),
]


@pytest.fixture(scope="module")
def ctx(bigtable_emulator, tmp_path_factory):
    directory = tmp_path_factory.mktemp("geomabuse")
    instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
    built = build_dataset(
        np.load(CROP)["labels"], f"file://{directory}/sv", RES, CHUNK, instance, DS
    )
    path = directory / "datasets.yaml"
    graph = {"kind": "bigtable", "project": PROJECT, "instance": INSTANCE, "table_id": DS}
    path.write_text(
        yaml.safe_dump(
            {
                "bigtable": {"project": PROJECT, "instance": INSTANCE},
                "datasets": {
                    DS: {
                        "segmentation": built.segmentation,
                        "graph": graph,
                        "cache_table_id": f"l2cache_{DS}",
                        # the label checks refuse only with strict input; by default
                        # an absent supervoxel is a counted ghost, held against QC
                        "input": {"strict": True},
                    }
                },
            }
        )
    )
    return dataset_context(load_config(path), DS)


def verdict(ctx, coords) -> str:
    try:
        load_chunk_l2(ctx, list(coords), None)
    except GeometryMismatch:
        return "geometry"
    except InconsistentInput:
        return "labels"
    return "passed"


@pytest.mark.parametrize(
    ("name", "rewrite", "geometry", "labels"), CASES, ids=[c[0] for c in CASES]
)
def test_a_rewritten_chunk_is_refused_as_the_table_says(ctx, name, rewrite, geometry, labels):
    from cloudvolume import CloudVolume

    cv = CloudVolume(ctx.dataset.segmentation, progress=False, compress="gzip")
    outcomes = {}
    for coords in CHUNKS:
        lo = np.asarray(coords) * np.asarray(CHUNK)
        box = tuple(slice(int(a), int(a + c)) for a, c in zip(lo, CHUNK, strict=True))
        original = np.asarray(cv[box])[..., 0]
        changed = rewrite(original)
        cv[box] = np.asfortranarray(changed)
        try:
            outcomes[coords] = verdict(ctx, coords)
        finally:
            cv[box] = np.asfortranarray(original)
        assert verdict(ctx, coords) == "passed"  # restored
    counts = {v: sum(o == v for o in outcomes.values()) for v in ("geometry", "labels", "passed")}
    print(f"{name}: {counts} {outcomes}")
    if geometry >= 0:
        assert (counts["geometry"], counts["labels"]) == (geometry, labels), outcomes
    # bounded by construction (8 rewrites, 16 reads of 48x48x24 chunks), not by wall time:
    # timed bounds fail on a loaded machine
