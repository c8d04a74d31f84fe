"""Stack configuration: everything that differs between deployments, read in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pulumi
import yaml

INTERPRETER_MIB = 300  # python + numpy + numba + clients, measured ~250 MiB
BYTES_PER_VOXEL = 24  # uint64 input + uint16 dense labels + float32 EDT + engine scratch


@dataclass(frozen=True)
class StackConfig:
    project: str
    region: str
    datasets_file: Path
    datasets: dict
    bigtable_instance_type: str
    bigtable_nodes: int
    bigtable_zone: str
    cache_max_versions: int
    chunk_size: tuple[int, int, int]
    lookup_invokers: list[str]
    lookup_max_instances: int
    worker_max_instances: int
    queue_max_attempts: int
    queue_min_backoff_s: int
    queue_max_backoff_s: int
    queue_max_concurrent: int
    queue_max_per_second: float
    graph_instances: list[str]
    segmentation_buckets: list[str]


def worker_memory_mib(chunk_size) -> int:
    """Memory for a compute function: measured ~1.0 GiB peak for 256x256x512, rounded up."""
    voxels = math.prod(chunk_size)
    need = voxels * BYTES_PER_VOXEL / 2**20 + INTERPRETER_MIB
    return int(math.ceil(need * 1.25 / 256) * 256)


def worker_timeout_s(chunk_size) -> int:
    """~2 s per 33 M voxels measured on one vCPU; 60x headroom, capped at HTTP's 3600 s."""
    voxels = math.prod(chunk_size)
    return int(min(3600, max(120, 60 * 2.0 * voxels / 33.5e6)))


def load(cfg: pulumi.Config | None = None, gcp: pulumi.Config | None = None) -> StackConfig:
    cfg = cfg or pulumi.Config("l2cache")
    gcp = gcp or pulumi.Config("gcp")
    datasets_file = Path(cfg.require("datasetsFile"))
    if not datasets_file.is_absolute():
        datasets_file = (Path(__file__).parent / datasets_file).resolve()
    datasets = yaml.safe_load(datasets_file.read_text())
    return StackConfig(
        project=gcp.require("project"),
        region=gcp.get("region") or "us-east1",
        datasets_file=datasets_file,
        datasets=datasets,
        bigtable_instance_type=cfg.get("bigtableInstanceType") or "DEVELOPMENT",
        bigtable_nodes=cfg.get_int("bigtableNodes") or 1,
        bigtable_zone=cfg.get("bigtableZone") or f"{gcp.get('region') or 'us-east1'}-b",
        cache_max_versions=cfg.get_int("cacheMaxVersions") or 5,
        chunk_size=tuple(cfg.get_object("chunkSize") or (256, 256, 512)),
        lookup_invokers=list(cfg.get_object("lookupInvokers") or []),
        lookup_max_instances=cfg.get_int("lookupMaxInstances") or 20,
        worker_max_instances=cfg.get_int("workerMaxInstances") or 50,
        queue_max_attempts=cfg.get_int("queueMaxAttempts") or 10,
        queue_min_backoff_s=cfg.get_int("queueMinBackoffSeconds") or 5,
        queue_max_backoff_s=cfg.get_int("queueMaxBackoffSeconds") or 300,
        queue_max_concurrent=cfg.get_int("queueMaxConcurrent") or 100,
        queue_max_per_second=cfg.get_float("queueMaxPerSecond") or 20.0,
        graph_instances=list(cfg.get_object("graphInstances") or []),
        segmentation_buckets=list(cfg.get_object("segmentationBuckets") or []),
    )
