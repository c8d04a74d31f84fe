"""The dataset map: which datasets exist and where their data, graph and cache live.

One YAML file (path in ``L2CACHE_CONFIG``) read once at start-up and passed down
explicitly; nothing deeper in the code reads the environment for it. Geometry a
dataset entry leaves out (resolution, voxel offset, chunk size, spatial bits) is read
from the segmentation's own ``info`` through CloudVolume, so a CAVE operator only has
to name the paths. Example::

    bigtable: {project: my-project, instance: l2cache}
    pubsub: {project: my-project, missing_ids_topic: l2cache-missing-ids,
             edits_topic: pcg-edits, dead_letter_topic: l2cache-dead-letter}
    tasks: {project: my-project, location: us-east1, queue: l2cache-compute,
            compute_url: https://.../compute_chunk}
    max_ids_per_request: 200000
    datasets:
      minnie65_public:                      # the PCG graph table id
        segmentation: graphene://https://.../segmentation/table/minnie65_public
        graph: {kind: bigtable, project: p, instance: pychunkedgraph, table_id: minnie65_public}
        cache_table_id: l2cache_minnie65_v1
        resolution: [8, 8, 40]              # optional: else from the segmentation info
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .ids import SpatialBits

CONFIG_ENV = "L2CACHE_CONFIG"
DEFAULT_MAX_IDS = 200_000


class ConfigError(ValueError):
    """The dataset map is missing or malformed; the message says what and where."""


class UnknownDatasetError(KeyError):
    """A request named a dataset the map does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown dataset"


@dataclass(frozen=True)
class GraphSource:
    """Where the supervoxel -> L2 graph is read: PCG's Bigtable or a graphene server."""

    kind: str  # "bigtable" | "graphene"
    project: str | None = None
    instance: str | None = None
    table_id: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: names, sources and the geometry the features need."""

    name: str
    segmentation: str
    graph: GraphSource
    cache_table_id: str
    resolution: tuple[float, float, float]
    voxel_offset: tuple[int, int, int]
    chunk_size: tuple[int, int, int]
    spatial_bits: SpatialBits
    volume_size: tuple[int, int, int] | None = None

    @property
    def voxel_volume_nm3(self) -> float:
        r = self.resolution
        return float(r[0] * r[1] * r[2])

    def public_mapping(self) -> dict[str, Any]:
        """What ``/table_mapping`` shows for this dataset (no credentials inside)."""
        return {
            "l2_cache_id": self.cache_table_id,
            "segmentation": self.segmentation,
            "resolution": list(self.resolution),
            "voxel_offset": list(self.voxel_offset),
            "chunk_size": list(self.chunk_size),
        }


@dataclass(frozen=True)
class BigtableConfig:
    project: str
    instance: str


@dataclass(frozen=True)
class PubSubConfig:
    project: str
    missing_ids_topic: str | None = None
    edits_topic: str | None = None
    dead_letter_topic: str | None = None


@dataclass(frozen=True)
class TasksConfig:
    project: str
    location: str
    queue: str
    compute_url: str
    service_account_email: str | None = None


@dataclass(frozen=True)
class L2CacheConfig:
    """The whole map: shared services plus the datasets by name."""

    bigtable: BigtableConfig
    datasets: dict[str, DatasetConfig]
    pubsub: PubSubConfig | None = None
    tasks: TasksConfig | None = None
    max_ids_per_request: int = DEFAULT_MAX_IDS
    runs_table_id: str = "l2cache_runs"
    source: str = field(default="", compare=False)

    def dataset(self, name: str) -> DatasetConfig:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise UnknownDatasetError(f"unknown dataset {name!r} (known: {known})") from None

    def dataset_by_cache_table(self, cache_table_id: str) -> DatasetConfig | None:
        for ds in self.datasets.values():
            if ds.cache_table_id == cache_table_id:
                return ds
        return None

    def table_mapping(self) -> dict[str, str]:
        """Graph table id -> L2 cache id, as the existing service's ``table_mapping``."""
        return {name: ds.cache_table_id for name, ds in sorted(self.datasets.items())}


def load_config(path: str | Path | None = None) -> L2CacheConfig:
    """Read the dataset map from ``path`` (default: ``$L2CACHE_CONFIG``)."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no dataset map: set {CONFIG_ENV} to the YAML file's path")
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read dataset map {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"dataset map {path} is not valid YAML: {exc}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: Any, source: str = "<dict>") -> L2CacheConfig:
    """Validate a parsed YAML document into an :class:`L2CacheConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping")
    bt = _section(raw, "bigtable", source, required=True)
    bigtable = BigtableConfig(_str(bt, "project", source), _str(bt, "instance", source))
    ps = _section(raw, "pubsub", source)
    pubsub = (
        PubSubConfig(
            project=_str(ps, "project", source),
            missing_ids_topic=ps.get("missing_ids_topic"),
            edits_topic=ps.get("edits_topic"),
            dead_letter_topic=ps.get("dead_letter_topic"),
        )
        if ps
        else None
    )
    tk = _section(raw, "tasks", source)
    tasks = (
        TasksConfig(
            project=_str(tk, "project", source),
            location=_str(tk, "location", source),
            queue=_str(tk, "queue", source),
            compute_url=_str(tk, "compute_url", source),
            service_account_email=tk.get("service_account_email"),
        )
        if tk
        else None
    )
    datasets_raw = raw.get("datasets")
    if not isinstance(datasets_raw, Mapping):
        raise ConfigError(f"{source}: 'datasets' must map dataset names to entries")
    datasets = {str(n): _dataset(str(n), e, source) for n, e in datasets_raw.items()}
    max_ids = raw.get("max_ids_per_request", DEFAULT_MAX_IDS)
    if not isinstance(max_ids, int) or max_ids <= 0:
        raise ConfigError(f"{source}: max_ids_per_request must be a positive integer")
    runs_table_id = raw.get("runs_table_id", "l2cache_runs")
    if not isinstance(runs_table_id, str) or not runs_table_id:
        raise ConfigError(f"{source}: runs_table_id must be a non-empty string")
    return L2CacheConfig(bigtable, datasets, pubsub, tasks, max_ids, runs_table_id, source)


def _section(raw: Mapping, key: str, source: str, required: bool = False) -> Mapping:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{source}: missing section '{key}'")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: '{key}' must be a mapping")
    return value


def _str(section: Mapping, key: str, where: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    return value


def _triple(value: Any, kind: type, what: str) -> tuple:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ConfigError(f"{what} must be a list of 3 numbers, got {value!r}")
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a list of 3 numbers, got {value!r}") from None


def _dataset(name: str, entry: Any, source: str) -> DatasetConfig:
    where = f"{source}: dataset {name!r}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping")
    segmentation = _str(entry, "segmentation", where)
    graph_raw = entry.get("graph")
    if not isinstance(graph_raw, Mapping) or graph_raw.get("kind") not in ("bigtable", "graphene"):
        raise ConfigError(f"{where}: graph.kind must be 'bigtable' or 'graphene'")
    graph = GraphSource(**{k: graph_raw.get(k) for k in GraphSource.__dataclass_fields__})
    if graph.kind == "bigtable" and not (graph.project and graph.instance and graph.table_id):
        raise ConfigError(f"{where}: a bigtable graph needs project, instance and table_id")
    if graph.kind == "graphene" and not graph.url:
        raise ConfigError(f"{where}: a graphene graph needs url")
    cache_table_id = _str(entry, "cache_table_id", where)

    needed = ("resolution", "voxel_offset", "chunk_size", "spatial_bits")
    info = {} if all(k in entry for k in needed) else _geometry_from_info(segmentation, where)
    merged = {**info, **{k: entry[k] for k in (*needed, "volume_size") if k in entry}}
    missing = [k for k in needed if k not in merged]
    if missing:
        raise ConfigError(
            f"{where}: {', '.join(missing)} not given and not in the segmentation info"
        )
    resolution = _triple(merged["resolution"], float, f"{where}: resolution")
    if min(resolution) <= 0:
        raise ConfigError(f"{where}: resolution must be positive")
    chunk_size = _triple(merged["chunk_size"], int, f"{where}: chunk_size")
    if min(chunk_size) <= 0:
        raise ConfigError(f"{where}: chunk_size must be positive")
    bits_raw = merged["spatial_bits"]
    if not isinstance(bits_raw, Mapping):
        raise ConfigError(f"{where}: spatial_bits must map layer -> bits")
    try:
        bits = SpatialBits.from_mapping(bits_raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: spatial_bits: {exc}") from None
    if bits.table[2] < 0:
        raise ConfigError(f"{where}: spatial_bits has no entry for layer 2")
    volume_size = merged.get("volume_size")
    return DatasetConfig(
        name=name,
        segmentation=segmentation,
        graph=graph,
        cache_table_id=cache_table_id,
        resolution=resolution,
        voxel_offset=_triple(merged["voxel_offset"], int, f"{where}: voxel_offset"),
        chunk_size=chunk_size,
        spatial_bits=bits,
        volume_size=_triple(volume_size, int, f"{where}: volume_size") if volume_size else None,
    )


def _geometry_from_info(segmentation: str, where: str) -> dict[str, Any]:
    """Resolution, offset, size, chunk size and spatial bits from the volume's info."""
    try:
        from cloudvolume import CloudVolume

        cv = CloudVolume(segmentation, progress=False)
        info = cv.info
        scale = info["scales"][0]
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        raise ConfigError(f"{where}: cannot read the segmentation info ({exc})") from None
    out: dict[str, Any] = {
        "resolution": list(scale["resolution"]),
        "voxel_offset": list(scale.get("voxel_offset", [0, 0, 0])),
        "volume_size": list(scale["size"]),
    }
    graph = info.get("graph") or {}
    if "chunk_size" in graph:
        out["chunk_size"] = list(graph["chunk_size"])
    if "spatial_bit_masks" in graph:
        out["spatial_bits"] = {int(k): int(v) for k, v in graph["spatial_bit_masks"].items()}
    return out
