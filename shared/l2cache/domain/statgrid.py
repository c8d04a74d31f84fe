"""The coarse spatial grid a run's counters are kept on.

A run's progress counters are sharded by *where* a chunk is: its region is cut into at
most :data:`MAX_CELLS` boxes of whole chunks, and every chunk counts into the counter
row of its box. One mechanism gives both things an operator needs at connectome scale:
no counter row is hot (a permuted ingest keeps every box busy at once, so the writes of
a thousand workers spread over hundreds of rows), and the per-box counts are the map of
where in the volume chunks are done, failing or retrying.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_CELLS = 512


@dataclass(frozen=True)
class StatGrid:
    """Boxes of ``cell`` chunks tiling a region from ``origin``; ``shape`` boxes per axis."""

    origin: tuple[int, int, int]
    cell: tuple[int, int, int]
    shape: tuple[int, int, int]

    @classmethod
    def for_region(cls, region: Sequence[int], max_cells: int = MAX_CELLS) -> StatGrid:
        """The finest grid of at most ``max_cells`` boxes whose boxes are as close to
        cubes (in chunks) as the region allows, so the map reads the same on every axis."""
        lo = np.asarray(region[:3], dtype=np.int64)
        extent = np.maximum(np.asarray(region[3:], dtype=np.int64) - lo, 1)
        side = 1
        while np.prod(-(-extent // side)) > max_cells:
            side += 1 if side < 8 else max(side // 8, 1)
        cell = np.minimum(np.full(3, side), extent)
        shape = -(-extent // cell)
        return cls(
            tuple(int(v) for v in lo), tuple(int(v) for v in cell), tuple(int(v) for v in shape)
        )

    @classmethod
    def from_json(cls, doc: dict | None) -> StatGrid | None:
        """The grid a run record stores (None for runs recorded before grids existed)."""
        if not doc:
            return None
        return cls(tuple(doc["origin"]), tuple(doc["cell"]), tuple(doc["shape"]))

    def to_json(self) -> dict[str, list[int]]:
        """What the run record keeps: plain lists, so the record stays JSON."""
        return {"origin": list(self.origin), "cell": list(self.cell), "shape": list(self.shape)}

    @property
    def n_cells(self) -> int:
        """How many boxes (and counter rows) the grid has."""
        return int(np.prod(self.shape))

    def cell_of(self, coords: Sequence[int]) -> int:
        """The box index (x-major) of chunk ``coords``; chunks outside the region are
        clamped to the nearest box, so an edit anywhere still counts somewhere."""
        rel = (np.asarray(coords, dtype=np.int64) - self.origin) // self.cell
        rel = np.clip(rel, 0, np.asarray(self.shape) - 1)
        return int((rel[0] * self.shape[1] + rel[1]) * self.shape[2] + rel[2])

    def cell_box(self, index: int) -> list[int]:
        """Chunk box ``[x0, y0, z0, x1, y1, z1)`` of box ``index`` (not clipped to the
        region's far end: the last box of an axis may be partly outside)."""
        ix, rest = divmod(index, self.shape[1] * self.shape[2])
        iy, iz = divmod(rest, self.shape[2])
        lo = [o + i * c for o, i, c in zip(self.origin, (ix, iy, iz), self.cell, strict=True)]
        return [*lo, *(v + c for v, c in zip(lo, self.cell, strict=True))]
