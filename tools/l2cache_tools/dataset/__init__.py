"""A local PCG-shaped dataset from any labelled volume, and PCG-style edits on it.

``build`` turns a labelled volume into what a PCG deployment has: a precomputed
supervoxel segmentation (CloudVolume, file://) and a PCG-layout graph table in
Bigtable. ``edits`` applies merges and splits that create new L2 ids at a new
timestamp and publishes them exactly as PCG does.
"""

from .build import BuildResult, build_dataset
from .edits import EditResult, apply_merge, apply_split, publish_edit

__all__ = [
    "BuildResult",
    "EditResult",
    "apply_merge",
    "apply_split",
    "build_dataset",
    "publish_edit",
]
