"""Cost of chunks, runs and cubic millimetres from the ledger, with the unit prices.

The one place prices live (the CLI's status, the dashboard, ``ingest --sample``'s
projection, bench/ and infra's Cloud Monitoring panel all read them from here). USD,
us-east1 list prices as of November 2026; each can be overridden with the environment
variable named in :data:`PRICE_ENV` so anyone can recompute with their own contract.

A chunk costs what its worker held while computing it plus what it wrote:

    duration_s x (worker GiB x $/GiB-s + worker vCPU x $/vCPU-s)
      + L2 rows written x $/Bigtable row + attempts x $/task dispatch

``duration_s`` is the ledger's measured compute time of the attempt that succeeded
(failed attempts are not timed by the ledger, so a run with many retries is an
underestimate; the retry rate SLO shows that). The worker's memory is infra's sizing
(``infra/sizing.py`` ``worker_memory_mib`` for the dataset's chunk size): the CLI
passes it in; :data:`DEFAULT_WORKER_GIB` is that function's answer for the production
256x256x512 chunk (1,024 MiB), used when no sizing is given. A mm^3 is 1e18 nm^3 of
chunk volume (ledger ``voxels`` x the dataset's voxel volume).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

NM3_PER_MM3 = 1e18
# infra/sizing.py worker_memory_mib((256, 256, 512)) = 1024 MiB; cpu_for_memory -> 1
DEFAULT_WORKER_GIB = 1.0
DEFAULT_WORKER_VCPU = 1.0

# field of Prices -> environment variable that overrides it
PRICE_ENV = {
    "gib_second": "L2CACHE_PRICE_GIB_SECOND",
    "vcpu_second": "L2CACHE_PRICE_VCPU_SECOND",
    "bigtable_row": "L2CACHE_PRICE_BT_ROW",
    "task": "L2CACHE_PRICE_TASK",
    "worker_gib": "L2CACHE_COST_FUNCTION_GIB",
}


@dataclass(frozen=True)
class Prices:
    """Unit prices (USD) and the worker's size they apply to."""

    gib_second: float = 0.0000025  # Cloud Run / functions gen2 memory, per GiB-second
    vcpu_second: float = 0.000024  # per vCPU-second
    bigtable_row: float = 0.0000001  # one row mutation (write throughput share)
    task: float = 0.0000004  # one Cloud Tasks operation ($0.40 per million)
    worker_gib: float = DEFAULT_WORKER_GIB
    worker_vcpu: float = DEFAULT_WORKER_VCPU

    @property
    def worker_second(self) -> float:
        """USD per second of one worker instance busy with a chunk."""
        return self.worker_gib * self.gib_second + self.worker_vcpu * self.vcpu_second

    def with_worker(self, memory_mib: float, vcpu: float = DEFAULT_WORKER_VCPU) -> Prices:
        """These prices for a worker of ``memory_mib`` (infra's sizing) and ``vcpu``."""
        return replace(self, worker_gib=memory_mib / 1024.0, worker_vcpu=float(vcpu))


def prices(env: Mapping[str, str] | None = None) -> Prices:
    """List prices, each overridden by its environment variable when set."""
    env = os.environ if env is None else env
    base = Prices()
    given = {k: float(env[v]) for k, v in PRICE_ENV.items() if env.get(v)}
    return replace(base, **given)


PRICES = prices()


def chunk_cost(row: Mapping[str, Any], p: Prices = PRICES) -> float:
    """USD of one ledger chunk row (0 compute for a chunk that never finished)."""
    seconds = float(row.get("duration_s", 0) or 0)
    rows = int(row.get("l2_count", 0) or 0)
    attempts = int(row.get("attempts", 1) or 1)
    return seconds * p.worker_second + rows * p.bigtable_row + attempts * p.task


@dataclass(frozen=True)
class RunCost:
    """What a run's done chunks cost, and per unit of what they covered."""

    usd: float
    chunks: int
    compute_s: float
    l2_rows: int
    mm3: float

    @property
    def per_chunk(self) -> float | None:
        return self.usd / self.chunks if self.chunks else None

    @property
    def per_mm3(self) -> float | None:
        return self.usd / self.mm3 if self.mm3 > 0 else None


def run_cost(
    rows: Iterable[Mapping[str, Any]], voxel_volume_nm3: float, p: Prices = PRICES
) -> RunCost:
    """Cost of the done chunks among ``rows`` (ledger chunk rows) and the mm^3 they cover."""
    done = [r for r in rows if r.get("status") == "done"]
    voxels = sum(int(r.get("voxels", 0) or 0) for r in done)
    return RunCost(
        usd=sum(chunk_cost(r, p) for r in done),
        chunks=len(done),
        compute_s=sum(float(r.get("duration_s", 0) or 0) for r in done),
        l2_rows=sum(int(r.get("l2_count", 0) or 0) for r in done),
        mm3=voxels * voxel_volume_nm3 / NM3_PER_MM3,
    )


@dataclass(frozen=True)
class Projection:
    """A whole region's wall time and cost, projected from a sample of its chunks."""

    sample_chunks: int
    total_chunks: int
    seconds_per_chunk: float
    usd_per_chunk: float
    max_instances: int
    wall_s: float
    usd: float
    mm3: float

    @property
    def usd_per_mm3(self) -> float | None:
        return self.usd / self.mm3 if self.mm3 > 0 else None


def project(
    sample: RunCost,
    total_chunks: int,
    chunk_voxels: int,
    voxel_volume_nm3: float,
    max_instances: int,
    p: Prices = PRICES,
) -> Projection:
    """Scale a sample run to ``total_chunks``: cost = mean cost per chunk x chunks; wall
    time = mean compute seconds per chunk x chunks / instances (the sample's own
    scheduling overhead is left out: it measures the worker, not the queue)."""
    if sample.chunks == 0:
        raise ValueError("no sampled chunk finished: nothing to project from")
    if max_instances <= 0:
        raise ValueError("max_instances must be positive")
    per_s = sample.compute_s / sample.chunks
    per_usd = sample.usd / sample.chunks
    return Projection(
        sample_chunks=sample.chunks,
        total_chunks=int(total_chunks),
        seconds_per_chunk=per_s,
        usd_per_chunk=per_usd,
        max_instances=int(max_instances),
        wall_s=per_s * -(-int(total_chunks) // int(max_instances)),
        usd=per_usd * total_chunks,
        mm3=total_chunks * chunk_voxels * voxel_volume_nm3 / NM3_PER_MM3,
    )
