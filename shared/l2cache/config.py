"""The dataset map: which datasets exist and where their data, graph and cache live.

One YAML file (path in ``L2CACHE_CONFIG``) read once at start-up and passed down
explicitly (the functions' entry points hold it in a :class:`ReloadingMap`, read again
when the file changes); nothing deeper in the code reads the environment for it. Geometry a
dataset entry leaves out (resolution, voxel offset, chunk size, spatial bits) is read
from the segmentation's own ``info`` through CloudVolume, so a CAVE operator only has
to name the paths. Example::

    bigtable: {project: my-project, instance: l2cache}
    pubsub: {project: my-project, missing_ids_topic: l2cache-missing-ids,
             edits_topic: pcg-edits, dead_letter_topic: l2cache-dead-letter}
    tasks: {project: my-project, location: us-east1, queue: l2cache-compute,
            compute_url: https://.../compute_chunk,
            edits_queue: l2cache-compute-edits,  # optional: the default is <queue>-edits
            fan_out: 16,                         # optional: span tasks per split
            ramp: {start_per_s: 5, growth: 1.5, step_s: 300, max_per_s: 500}}  # optional
    max_ids_per_request: 500000
    missing_ids: {max_chunks_per_request: 100, max_chunks_per_caller: 600,   # optional: the
                  caller_window_s: 60, negative_ttl_s: 86400, pending_ttl_s: 900,
                  guard_table_id: l2cache_lookup_guard}   # lookup's recompute budgets
    auth: {url: global.example.org/auth, service_namespace: pychunkedgraph}   # optional: CAVE auth
    virtual_tables: {minnie65_public_v117: minnie65_public}                  # optional aliases
    datasets:
      minnie65_public:                      # the PCG graph table id
        segmentation: graphene://https://.../segmentation/table/minnie65_public
        graph: {kind: bigtable, project: p, instance: pychunkedgraph, table_id: minnie65_public}
        cache_table_id: l2cache_minnie65_v1
        fallback_table_id: minnie65_l2cache  # optional: an existing table served for ids
                                             # the cache table lacks (the switch-over)
        resolution: [8, 8, 40]              # optional: else from the segmentation info
        row_format: current                 # optional: or legacy_nm (pre-2022 rows)
        auth_dataset: minnie65_phase3       # optional: else asked from the auth service
        input: {strict: false}              # optional: true fails chunks with orphan/ghost svs;
                                            # ghost_sv_allowance: 5, max_ghost_sv_fraction:
                                            # 0.05 (a chunk over both fails: lost input)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from l2cache.domain.ids import SpatialBits
from l2cache.domain.spans import DEFAULT_FAN_OUT, Ramp

log = logging.getLogger(__name__)

CONFIG_ENV = "L2CACHE_CONFIG"
# The existing service answered 80,000 ids in one call and caveclient never splits.
# Answers past 8 MiB of JSON are streamed (chunked, l2cache.serving.respond), so Cloud
# Run's 32 MiB limit on declared lengths does not apply; the cap bounds the request
# body (32 bytes per id: 16 MB) and a request's time (500,000 ids: measured in
# BENCHMARKS.md "Big requests").
DEFAULT_MAX_IDS = 500_000
ROW_FORMATS = ("current", "legacy_nm")
DEFAULT_AUTH_NAMESPACE = "pychunkedgraph"


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
    # How rows without l2cache lineage are stored: "current" (the existing service since
    # 2022: voxel count, chunk-relative u16 voxel index) or "legacy_nm" (before: nm^3
    # and absolute u64 nm). Rows l2cache writes are always "current".
    row_format: str = "current"
    # CAVE auth dataset whose `view` permission guards this table; None = ask the auth
    # service which dataset the table belongs to (as the existing service does).
    auth_dataset: str | None = None
    # True when the resolution was given as integers (as in a graphene info): the
    # existing service's size_nm3 is then an int64 (and stringified by int64_as_str).
    integral_resolution: bool = True
    # A cache table another service wrote and owns (e.g. the existing L2 cache's):
    # served as it is, never written by l2cache (edits and missing ids are ignored).
    existing_cache_table: bool = False
    # ``input: {strict: true}``: a chunk with orphan supervoxels (no L2 parent) or ghost
    # ones (in the graph, no voxel) fails as InconsistentInput; by default they are
    # background and counted (l2cache.compute), as the existing service treats them.
    strict_input: bool = False
    # ``input: {ghost_sv_allowance, max_ghost_sv_fraction}``: lost input, per chunk. A
    # chunk whose ghosts exceed both the allowance (a handful: the existing service's
    # ghosts are supervoxels without voxels, a few per chunk) and the fraction of the
    # graph's supervoxels in the chunk fails as InconsistentInput (incomplete input);
    # a run-wide QC threshold alone cannot see one chunk that lost 20 % of its content.
    ghost_sv_allowance: int = 5
    max_ghost_sv_fraction: float = 0.05
    # The switch-over (README, "Switching"): an existing table (the existing service's)
    # read for the ids ``cache_table_id`` lacks, never written. Ids in neither are queued
    # and computed into ``cache_table_id``, so the new table heals while it takes over.
    # ``row_format`` then describes this table; the cache table's rows are l2cache's.
    fallback_table_id: str | None = None

    @property
    def voxel_volume_nm3(self) -> float:
        r = self.resolution
        return float(r[0] * r[1] * r[2])


@dataclass(frozen=True)
class BigtableConfig:
    """The Bigtable instance that holds the cache tables and the runs table."""

    project: str
    instance: str


@dataclass(frozen=True)
class PubSubConfig:
    """Topics: missing ids (lookup -> on_edit), PCG's edits, and the dead letters."""

    project: str
    missing_ids_topic: str | None = None
    edits_topic: str | None = None
    edits_project: str | None = None  # PCG's project, when its edits topic lives there
    dead_letter_topic: str | None = None
    # deliveries before Pub/Sub's dead-letter policy gives up; on_edit answers the last
    # one itself (ack + dead letter "gave up after N attempts"), so it must match infra
    max_delivery_attempts: int = 10


@dataclass(frozen=True)
class TasksConfig:
    """The Cloud Tasks queue that feeds compute_chunk, and how its attempts end."""

    project: str
    location: str
    queue: str
    compute_url: str
    service_account_email: str | None = None
    # the queue's max attempts: a task's last attempt records "gave up" instead of 5xx
    max_attempts: int = 10
    # an attempt silent for longer than this (worker killed, timed out) is presumed lost
    attempt_deadline_s: float = 1800.0
    # read the next chunk of a batch while this one computes (pipeline.compute_chunks):
    # worth it only with a second vCPU, and it needs memory for one more read in flight
    read_ahead: bool = False
    # multi-chunk edits go on their own queue (None: "<queue>-edits"), so an edit never
    # waits behind the millions of tasks of a bulk ingest (docs/design.md, "Dispatch")
    edits_queue: str | None = None
    # a span task wider than its batch enqueues at most this many child spans
    fan_out: int = DEFAULT_FAN_OUT
    # leaf span tasks are scheduled by this warm-up ramp from the run's start
    ramp: Ramp = field(default_factory=Ramp)

    @property
    def edits_queue_name(self) -> str:
        """The queue on_edit enqueues multi-chunk edits on."""
        return self.edits_queue or f"{self.queue}-edits"


@dataclass(frozen=True)
class AuthConfig:
    """CAVE auth (middle-auth-client) for the lookup; absent = Cloud Run IAM only.

    ``url`` is the auth service's host and path without a scheme, as the library's
    ``AUTH_URL`` (it always speaks https); ``sticky_url`` its ``STICKY_AUTH_URL``.
    """

    url: str
    service_namespace: str = DEFAULT_AUTH_NAMESPACE
    sticky_url: str | None = None


@dataclass(frozen=True)
class MissingIdPolicy:
    """What one lookup may cost the recompute queue (docs/design.md, "Missing ids").

    Work is counted in chunks: a missing-id recompute reads and computes a whole chunk
    whatever number of its ids was asked for. Ids the graph says do not exist are
    remembered for ``negative_ttl_s``; ids queued once are not queued again for
    ``pending_ttl_s``; a request queues at most ``max_chunks_per_request`` chunks and a
    caller at most ``max_chunks_per_caller`` per ``caller_window_s``. The marks and
    counters live in ``guard_table_id``, shared by every lookup instance.
    """

    max_chunks_per_request: int = 100
    max_chunks_per_caller: int = 600
    caller_window_s: int = 60
    negative_ttl_s: int = 86_400
    pending_ttl_s: int = 900
    guard_table_id: str = "l2cache_lookup_guard"


@dataclass(frozen=True)
class LookupWaitPolicy:
    """The lookup's opt-in ``?wait=S`` and ``?state=true`` (the map's ``lookup_wait:``;
    :mod:`l2cache.serving.wait`), checked when the map is read so a bad value fails the
    load, never a request.

    A waiting request holds one of the instance's request threads for up to ``max_s``
    (at most 60 s, half the function's timeout); at most ``max_concurrent`` requests
    with a wait run at once per instance (``None``: half its threads, at least 1), and
    at most ``max_per_caller`` of them for one caller (``None``: half of
    ``max_concurrent``, at least 1), so waits never take every thread from plain
    lookups, nor one caller every wait. ``max_ids``: ids per request with ``state`` or
    ``wait`` (that answer is built whole).
    """

    max_s: float = 30.0
    max_ids: int = 75_000
    max_concurrent: int | None = None
    max_per_caller: int | None = None


MAX_WAIT_S = 60.0  # lookup_wait.max_s at most: half the lookup function's 120 s timeout


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
    auth: AuthConfig | None = None
    # Public alias -> real graph table id, as the existing service's VIRTUAL_TABLES.
    virtual_tables: dict[str, str] = field(default_factory=dict)
    # The lookup's budgets of recompute work for missing ids (the map's ``missing_ids:``).
    missing_ids: MissingIdPolicy = field(default_factory=MissingIdPolicy)
    # The lookup's ?wait= and ?state= bounds (the map's ``lookup_wait:``).
    lookup_wait: LookupWaitPolicy = field(default_factory=LookupWaitPolicy)
    # The parsed YAML document as read: the operations side reads its own sections
    # (``qc:``, ``slo:``, see l2cache_ops.settings) from it; the core never does.
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def resolve_table(self, name: str) -> DatasetConfig:
        """The dataset a request's table name means, following a virtual alias."""
        return self.dataset(self.virtual_tables.get(name, name))

    def dataset(self, name: str) -> DatasetConfig:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise UnknownDatasetError(f"unknown dataset {name!r} (known: {known})") from None

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


class ReloadingMap:
    """The dataset map of a long-running process, read again when its file changes.

    A function instance reads the map on its first request; a dataset added to the map
    afterwards (``local up`` then ``dataset add``) was rejected as unknown until the
    process restarted, and its run stayed pending. :meth:`get` costs one ``stat`` per
    call and re-reads the map when the file's mtime, size or inode changed. A map that
    no longer parses (an edit half written) keeps the last good one, logged, and is
    tried again on the next call; the first read raises as :func:`load_config` does. In
    the cloud the map is part of the deployed archive and never changes.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._config: L2CacheConfig | None = None

    def get(self) -> L2CacheConfig:
        """The current map (the same object until the file changes)."""
        path = Path(self._path or os.environ.get(CONFIG_ENV) or "")
        try:
            st = path.stat()
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None  # load_config says why, unless a good map is already held
        with self._lock:
            if self._config is not None and (stamp is None or stamp == self._stamp):
                return self._config
            try:
                config = load_config(self._path)
            except ConfigError as exc:
                if self._config is None:
                    raise
                log.error("keeping the previous dataset map: %s", exc)
                return self._config
            if self._config is not None:
                log.info("dataset map %s changed: read again", path)
            self._config, self._stamp = config, stamp
            return config


def parse_config(raw: Any, source: str = "<dict>") -> L2CacheConfig:
    """Validate a parsed YAML document into an :class:`L2CacheConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping")
    bt = config_section(raw, "bigtable", source, required=True)
    bigtable = BigtableConfig(_str(bt, "project", source), _str(bt, "instance", source))
    ps = config_section(raw, "pubsub", source)
    pubsub = (
        PubSubConfig(
            project=_str(ps, "project", source),
            missing_ids_topic=ps.get("missing_ids_topic"),
            edits_topic=ps.get("edits_topic"),
            edits_project=ps.get("edits_project"),
            dead_letter_topic=ps.get("dead_letter_topic"),
            max_delivery_attempts=_positive_int(ps, "max_delivery_attempts", 10, source),
        )
        if ps
        else None
    )
    tk = config_section(raw, "tasks", source)
    tasks = (
        TasksConfig(
            project=_str(tk, "project", source),
            location=_str(tk, "location", source),
            queue=_str(tk, "queue", source),
            compute_url=_str(tk, "compute_url", source),
            service_account_email=tk.get("service_account_email"),
            max_attempts=_positive_int(tk, "max_attempts", 10, source),
            attempt_deadline_s=float(_positive_int(tk, "attempt_deadline_s", 1800, source)),
            read_ahead=_flag(tk, "read_ahead", source),
            edits_queue=_optional_str(tk, "edits_queue", source),
            fan_out=_fan_out(tk, source),
            ramp=_ramp(tk, source),
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
    return L2CacheConfig(
        bigtable,
        datasets,
        pubsub,
        tasks,
        max_ids,
        runs_table_id,
        source,
        auth=_auth(raw, source),
        virtual_tables=_virtual_tables(raw, datasets, source),
        missing_ids=_missing_ids(raw, source),
        lookup_wait=_lookup_wait(raw, source),
        raw=raw,
    )


def _auth(raw: Mapping, source: str) -> AuthConfig | None:
    section = config_section(raw, "auth", source)
    if not section:
        return None
    where = f"{source}: auth"
    url = _str(section, "url", where)
    if "://" in url:
        raise ConfigError(f"{where}: url is host/path without a scheme (the client adds https)")
    namespace = section.get("service_namespace", DEFAULT_AUTH_NAMESPACE)
    sticky = section.get("sticky_url")
    if not isinstance(namespace, str) or not namespace:
        raise ConfigError(f"{where}: service_namespace must be a non-empty string")
    if sticky is not None and (not isinstance(sticky, str) or "://" in sticky):
        raise ConfigError(f"{where}: sticky_url is host/path without a scheme")
    return AuthConfig(url=url, service_namespace=namespace, sticky_url=sticky)


def _missing_ids(raw: Mapping, source: str) -> MissingIdPolicy:
    """``missing_ids:``: every key optional (:class:`MissingIdPolicy`'s defaults)."""
    section = config_section(raw, "missing_ids", source)
    where = f"{source}: missing_ids"
    base = MissingIdPolicy()
    unknown = set(section) - set(MissingIdPolicy.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {
        key: _positive_int(section, key, getattr(base, key), where)
        for key in MissingIdPolicy.__dataclass_fields__
        if key != "guard_table_id"
    }
    table = _optional_str(section, "guard_table_id", where) or base.guard_table_id
    return MissingIdPolicy(**values, guard_table_id=table)


def _lookup_wait(raw: Mapping, source: str) -> LookupWaitPolicy:
    """``lookup_wait:``: every key optional (:class:`LookupWaitPolicy`'s defaults)."""
    section = config_section(raw, "lookup_wait", source)
    where = f"{source}: lookup_wait"
    unknown = set(section) - set(LookupWaitPolicy.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    base = LookupWaitPolicy()
    max_s = section.get("max_s", base.max_s)
    if isinstance(max_s, bool) or not isinstance(max_s, int | float) or not 0 <= max_s:
        raise ConfigError(f"{where}: max_s must be a number of seconds >= 0, got {max_s!r}")
    if max_s > MAX_WAIT_S:
        raise ConfigError(
            f"{where}: max_s is at most {MAX_WAIT_S:g} s (half the lookup's timeout), got {max_s!r}"
        )
    optional = {
        key: _positive_int(section, key, 1, where) if section.get(key) is not None else None
        for key in ("max_concurrent", "max_per_caller")
    }
    return LookupWaitPolicy(
        max_s=float(max_s),
        max_ids=_positive_int(section, "max_ids", base.max_ids, where),
        **optional,
    )


def _virtual_tables(raw: Mapping, datasets: Mapping, source: str) -> dict[str, str]:
    """``alias: real`` or the existing service's ``alias: {table_id: real}``."""
    section = config_section(raw, "virtual_tables", source)
    out: dict[str, str] = {}
    for alias, target in section.items():
        real = target.get("table_id") if isinstance(target, Mapping) else target
        if not isinstance(real, str) or real not in datasets:
            raise ConfigError(
                f"{source}: virtual table {alias!r} must name a dataset of the map, got {real!r}"
            )
        if str(alias) in datasets:
            raise ConfigError(f"{source}: virtual table {alias!r} is also a dataset name")
        out[str(alias)] = real
    return out


def config_section(raw: Mapping, key: str, source: str, required: bool = False) -> Mapping:
    """``raw[key]`` as a mapping (``{}`` when absent and not ``required``); shared with
    the operator sections' parser so both report errors the same way."""
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{source}: missing section '{key}'")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: '{key}' must be a mapping")
    return value


def _flag(section: Mapping, key: str, where: str) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def _positive_int(section: Mapping, key: str, default: int, where: str) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def _optional_str(section: Mapping, key: str, where: str) -> str | None:
    value = section.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{where}: '{key}' must be a non-empty string when given")
    return value


def dispatch_settings(tasks: Mapping, where: str = "dataset map") -> tuple[int, Ramp]:
    """The map's ``tasks.fan_out`` and ``tasks.ramp``, checked, from the raw ``tasks``
    section: for infra, which sizes the queue from them without resolving datasets."""
    return _fan_out(tasks, where), _ramp(tasks, where)


def _fan_out(tasks: Mapping, where: str) -> int:
    """``tasks.fan_out``: at least 2 (a split must split), at most 1000 (one task's
    enqueues stay well inside its timeout)."""
    value = _positive_int(tasks, "fan_out", DEFAULT_FAN_OUT, where)
    if not 2 <= value <= 1000:
        raise ConfigError(f"{where}: 'tasks.fan_out' must be in 2..1000, got {value}")
    return value


def _ramp(tasks: Mapping, where: str) -> Ramp:
    """``tasks.ramp``: ``start_per_s`` (0 = no ramp), ``growth`` (> 1), ``step_s`` and
    ``max_per_s`` (> 0); each optional (:class:`l2cache.domain.spans.Ramp`'s defaults)."""
    section = config_section(tasks, "ramp", f"{where}: tasks")
    unknown = set(section) - {"start_per_s", "growth", "step_s", "max_per_s"}
    if unknown:
        raise ConfigError(f"{where}: unknown tasks.ramp keys {sorted(unknown)}")
    base = Ramp()
    values = {}
    for key in ("start_per_s", "growth", "step_s", "max_per_s"):
        v = section.get(key, getattr(base, key))
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{where}: tasks.ramp.{key} must be a number, got {v!r}")
        values[key] = float(v)
    if values["start_per_s"] < 0 or values["growth"] <= 1:
        raise ConfigError(f"{where}: tasks.ramp needs start_per_s >= 0 and growth > 1")
    if values["step_s"] <= 0 or values["max_per_s"] <= 0:
        raise ConfigError(f"{where}: tasks.ramp needs step_s > 0 and max_per_s > 0")
    return Ramp(**values)


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
    row_format = entry.get("row_format", "current")
    if row_format not in ROW_FORMATS:
        raise ConfigError(f"{where}: row_format must be one of {', '.join(ROW_FORMATS)}")
    auth_dataset = entry.get("auth_dataset")
    if auth_dataset is not None and (not isinstance(auth_dataset, str) or not auth_dataset):
        raise ConfigError(f"{where}: auth_dataset must be a non-empty string")
    fallback = _optional_str(entry, "fallback_table_id", where)
    existing = _flag(entry, "existing_cache_table", where)
    if fallback is not None and (fallback == cache_table_id or existing):
        raise ConfigError(
            f"{where}: fallback_table_id must name another table than cache_table_id, in an "
            "entry whose cache table l2cache writes (not existing_cache_table): it is the "
            "existing table served while the new one fills"
        )
    # CloudVolume types the resolution as int unless a component is a float.
    integral = not any(isinstance(v, float) for v in merged["resolution"])
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
        row_format=row_format,
        auth_dataset=auth_dataset,
        integral_resolution=integral,
        existing_cache_table=existing,
        **_input_section(entry, where),
        fallback_table_id=fallback,
    )


def _input_section(entry: Mapping, where: str) -> dict[str, Any]:
    """``input: {strict, ghost_sv_allowance, max_ghost_sv_fraction}`` (all optional; no
    other key), as DatasetConfig fields: the per-chunk tolerance of orphans and ghosts."""
    section = entry.get("input") or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: input must be a mapping, got {section!r}")
    known = ("strict", "ghost_sv_allowance", "max_ghost_sv_fraction")
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"{where}: input: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    out: dict[str, Any] = {"strict_input": _flag(section, "strict", f"{where}: input")}
    allowance = section.get("ghost_sv_allowance", 5)
    if isinstance(allowance, bool) or not isinstance(allowance, int) or allowance < 0:
        raise ConfigError(
            f"{where}: input: ghost_sv_allowance must be a count >= 0, got {allowance!r}"
        )
    fraction = section.get("max_ghost_sv_fraction", 0.05)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ConfigError(f"{where}: input: max_ghost_sv_fraction must be a number")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ConfigError(
            f"{where}: input: max_ghost_sv_fraction must be in [0, 1], got {fraction!r}"
        )
    out["ghost_sv_allowance"] = int(allowance)
    out["max_ghost_sv_fraction"] = float(fraction)
    return out


def _geometry_from_info(segmentation: str, where: str) -> dict[str, Any]:
    """Resolution, offset, size, chunk size and spatial bits from the volume's info."""
    try:
        from cloudvolume import CloudVolume
    except ImportError as exc:  # the lookup's lock has no CloudVolume: its map is resolved
        raise ConfigError(
            f"{where}: resolution, voxel_offset, chunk_size and spatial_bits must be in the "
            f"dataset map here: reading them from the segmentation info needs CloudVolume, "
            f"which cannot be imported ({exc}); deploy archives carry them, resolved when "
            f"`pulumi up` builds the archive"
        ) from None
    try:
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
