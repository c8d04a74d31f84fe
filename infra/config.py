"""Stack configuration: everything that differs between deployments, read and checked in one place.

Keys are listed with their meaning in ``Pulumi.example.yaml``. ``validate`` refuses a
configuration that would deploy something unsafe or inconsistent (more queue
dispatches than worker instances, ``allUsers`` on lookup with no CAVE auth in the app,
a malformed edits topic path) before any resource is declared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import sizing
import yaml

from l2cache.config import ConfigError as MapError
from l2cache.config import dispatch_settings

TOPIC_PATH = re.compile(r"^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/topics/[A-Za-z][\w.~+%-]{2,254}$")
LB_SCHEMES = ("EXTERNAL_MANAGED", "EXTERNAL")
INGRESS = ("ALLOW_ALL", "ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB")


class ConfigError(ValueError):
    """The stack configuration cannot be deployed; the message names the key to change."""


@dataclass(frozen=True)
class StackConfig:
    """One stack's settings, read once (``load``) and checked as a whole (``validate``)
    before any resource is declared: the components take this, never ``pulumi.Config``,
    so the tests can build a stack from a StackConfig made by hand."""

    project: str
    region: str
    datasets_file: Path
    # the dataset map as YAML gives it (l2cache.config parses it again in the functions)
    datasets: dict[str, Any]
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
    # CAVE auth in the lookup app (the dataset map's auth section): lookup is then
    # invocable by allUsers and the app checks the CAVE token; False = Cloud Run IAM only.
    cave_auth: bool = False
    # Secret Manager secret (ours) holding a CAVE service token, given to lookup as
    # AUTH_TOKEN; optional (else the user's own token asks the auth service)
    auth_token_secret: str | None = None
    # PCG's existing edits topic, projects/<p>/topics/<t>; None = no edits subscription
    pcg_edits_topic: str | None = None
    existing_cache_tables: frozenset[str] = field(default_factory=frozenset)
    existing_bigtable_instance: bool = False
    lookup_backend: bool = False  # serverless NEG + backend service for an existing LB
    lb_scheme: str = "EXTERNAL_MANAGED"
    lookup_domain: str | None = None  # standalone HTTPS load balancer for this domain
    url_map: str | None = None  # the operator's existing URL map (for the printed commands)
    lookup_ingress: str | None = None  # None: derived (ALLOW_INTERNAL_AND_GCLB behind an LB)
    chunks_per_task: int = sizing.DEFAULT_CHUNKS_PER_TASK
    # the largest run the queue is sized for (l2cache:datasetChunks, else the map's
    # largest dataset with volume_size and chunk_size, else minnie65's 11.6 M chunks)
    dataset_chunks: int = sizing.MINNIE65_CHUNKS
    # None: derived, what the workers' capacity leaves beside the bulk queue (at least 1)
    edits_queue_max_concurrent: int | None = None

    @property
    def bigtable_project(self) -> str:
        """The Bigtable instance's project: the dataset map's ``bigtable.project``, which
        may be another project than the stack's (the default)."""
        return (self.datasets.get("bigtable") or {}).get("project") or self.project

    @property
    def bigtable_instance(self) -> str:
        """The instance the functions read (the dataset map's ``bigtable.instance``):
        Storage creates it, or uses it as it is, under exactly this name."""
        return (self.datasets.get("bigtable") or {}).get("instance") or "l2cache"

    @property
    def routed(self) -> bool:
        """Lookup sits behind a load balancer (existing one or ours)."""
        return self.lookup_backend or bool(self.lookup_domain)

    @property
    def ingress(self) -> str:
        """Lookup's Cloud Run ingress: ``l2cache:lookupIngress`` if set; else, behind a
        load balancer, only the LB may reach it (the ``run.app`` URL would bypass it)."""
        if self.lookup_ingress:
            return self.lookup_ingress
        return "ALLOW_INTERNAL_AND_GCLB" if self.routed else "ALLOW_ALL"

    @property
    def map_task_attempts(self) -> int:
        """The dataset map's ``tasks.max_attempts`` (l2cache.config's default 10)."""
        return int((self.datasets.get("tasks") or {}).get("max_attempts", 10))

    @property
    def map_attempt_deadline_s(self) -> float:
        """The dataset map's ``tasks.attempt_deadline_s``: an attempt silent for longer is
        presumed lost, so ``validate`` keeps compute_chunk's timeout within it."""
        return float((self.datasets.get("tasks") or {}).get("attempt_deadline_s", 1800))

    @property
    def edits_queue_name(self) -> str:
        """The edits queue the dataset map names (``tasks.edits_queue``, default
        ``<queue>-edits``, as l2cache.config derives it)."""
        tk = self.datasets.get("tasks") or {}
        return tk.get("edits_queue") or f"{tk.get('queue', 'l2cache-compute')}-edits"

    @property
    def edits_max_concurrent(self) -> int:
        """The edits queue's concurrency: ``l2cache:editsQueueMaxConcurrent``, else the
        workers' capacity the bulk queue leaves free (at least 1)."""
        if self.edits_queue_max_concurrent is not None:
            return self.edits_queue_max_concurrent
        capacity = self.worker_max_instances * sizing.WORKER_REQUESTS_PER_INSTANCE
        return max(1, capacity - self.queue_max_concurrent)

    def dispatch_plan(self) -> sizing.DispatchPlan:
        """The bulk queue's derived settings and projection for ``dataset_chunks``
        (:func:`l2cache_ops.sizing.plan_dispatch`, with the map's fan-out and ramp)."""
        fan_out, ramp = map_dispatch(self.datasets)
        return sizing.plan_dispatch(
            self.dataset_chunks,
            self.worker_max_instances,
            sizing.WORKER_REQUESTS_PER_INSTANCE,
            chunk_s=sizing.chunk_seconds(self.chunk_size),
            fan_out=fan_out,
            ramp=ramp,
            batch=self.chunks_per_task,
        )

    @property
    def map_read_ahead(self) -> bool:
        """The dataset map's ``tasks.read_ahead``: workers then hold one more chunk's read."""
        return bool((self.datasets.get("tasks") or {}).get("read_ahead", False))

    @property
    def max_delivery_attempts(self) -> int:
        """Pub/Sub deliveries before dead-lettering: the dataset map's
        ``pubsub.max_delivery_attempts`` (on_edit answers the last one itself)."""
        return int((self.datasets.get("pubsub") or {}).get("max_delivery_attempts", 10))

    def is_existing_table(self, dataset: str) -> bool:
        """A cache table Pulumi must not create or own: the dataset map's
        ``existing_cache_table: true`` or its id in ``l2cache:existingCacheTables``."""
        ds = self.datasets["datasets"][dataset]
        return bool(ds.get("existing_cache_table")) or (
            ds["cache_table_id"] in self.existing_cache_tables
        )


def map_dispatch(datasets: Mapping[str, Any]) -> tuple[int, Any]:
    """The dataset map's ``tasks.fan_out`` and ``tasks.ramp`` (checked as the functions
    check them), the span tree and leaf schedule the queue is sized for."""
    try:
        return dispatch_settings(datasets.get("tasks") or {})
    except MapError as exc:
        raise ConfigError(str(exc)) from None


def map_dataset_chunks(datasets: Mapping[str, Any]) -> int | None:
    """Chunks of the map's largest dataset that states ``volume_size`` and
    ``chunk_size`` (the others' geometry is in their segmentation info, not read here)."""
    sizes = [
        math.prod(
            -(-int(v) // int(c)) for v, c in zip(d["volume_size"], d["chunk_size"], strict=True)
        )
        for d in (datasets.get("datasets") or {}).values()
        if isinstance(d, Mapping) and d.get("volume_size") and d.get("chunk_size")
    ]
    return max(sizes) if sizes else None


def map_auth_section(datasets: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The dataset map's top-level ``auth:`` section (``{url, service_namespace,
    sticky_url}``, parsed by ``l2cache.config``): when present, the lookup app checks
    every request's CAVE token with middle-auth-client."""
    auth = datasets.get("auth")
    return auth if isinstance(auth, Mapping) and auth else None


def parse_cave_auth(raw: str | None, datasets: Mapping[str, Any]) -> bool:
    """Whether Cloud Run lets everyone reach lookup (the app enforcing CAVE auth).

    Follows the dataset map's ``auth:`` section, the one thing the app enforces.
    ``l2cache:caveAuth`` may state it: ``true`` without the section is refused by
    ``validate`` (it would make lookup public); ``false`` with the section keeps
    Cloud Run IAM in front as well (only Google identities that also hold a CAVE token).
    """
    in_map = map_auth_section(datasets) is not None
    if raw is None or raw == "":
        return in_map
    low = raw.strip().lower()
    if low in ("true", "yes", "1"):
        return True
    if low in ("false", "no", "0"):
        return False
    raise ConfigError(f"l2cache:caveAuth must be true or false, got {raw!r}")


def edits_topic_path(raw: str | None, datasets: Mapping[str, Any]) -> str | None:
    """PCG's edits topic: ``l2cache:pcgEditsTopic``, else the dataset map's
    ``pubsub.edits_topic`` when it is a full path or comes with ``pubsub.edits_project``.
    A bare name alone is not enough: the topic lives in PCG's project, not ours."""
    if raw:
        return raw.strip()
    ps = datasets.get("pubsub") or {}
    topic = ps.get("edits_topic")
    if not topic:
        return None
    if str(topic).startswith("projects/"):
        return str(topic)
    if ps.get("edits_project"):
        return f"projects/{ps['edits_project']}/topics/{topic}"
    return None


def validate(cfg: StackConfig) -> None:
    """Refuse configurations that would deploy something inconsistent or unsafe, with
    the key to change; run by ``load`` and again by ``program.build`` (a StackConfig made
    by hand is checked too)."""
    try:
        sizing.check_queue_concurrency(
            cfg.queue_max_concurrent, cfg.worker_max_instances, cfg.edits_queue_max_concurrent
        )
        sizing.worker_memory_mib(cfg.chunk_size, cfg.map_read_ahead)
        sizing.worker_timeout_s(cfg.chunk_size, cfg.chunks_per_task)
    except sizing.SizingError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.pcg_edits_topic is not None and not TOPIC_PATH.match(cfg.pcg_edits_topic):
        raise ConfigError(
            f"l2cache:pcgEditsTopic must be projects/<pcg-project>/topics/<name>, "
            f"got {cfg.pcg_edits_topic!r}"
        )
    if cfg.cave_auth and map_auth_section(cfg.datasets) is None:
        raise ConfigError(
            "l2cache:caveAuth is true but the dataset map has no auth section: lookup would "
            "be open to allUsers with nothing checking tokens"
        )
    if cfg.auth_token_secret and not cfg.cave_auth:
        raise ConfigError("l2cache:authTokenSecret is only used with CAVE auth (dataset map auth)")
    if cfg.queue_max_attempts != cfg.map_task_attempts:
        raise ConfigError(
            f"l2cache:queueMaxAttempts={cfg.queue_max_attempts} but the dataset map's "
            f"tasks.max_attempts={cfg.map_task_attempts}: compute_chunk records a task as "
            "given up on the queue's last attempt, so they must be equal"
        )
    timeout = sizing.worker_timeout_s(cfg.chunk_size, cfg.chunks_per_task)
    if timeout > cfg.map_attempt_deadline_s:
        raise ConfigError(
            f"compute_chunk's {timeout} s timeout exceeds the dataset map's "
            f"tasks.attempt_deadline_s={cfg.map_attempt_deadline_s:g}: running attempts "
            "would be presumed lost"
        )
    if cfg.lb_scheme not in LB_SCHEMES:
        raise ConfigError(f"l2cache:loadBalancingScheme must be one of {LB_SCHEMES}")
    if cfg.lookup_ingress is not None and cfg.lookup_ingress not in INGRESS:
        raise ConfigError(f"l2cache:lookupIngress must be one of {INGRESS}")
    if cfg.routed and cfg.ingress == "ALLOW_INTERNAL_ONLY":
        raise ConfigError("lookup behind a load balancer needs ingress ALLOW_INTERNAL_AND_GCLB")
    names = cfg.datasets.get("datasets") or {}
    known = {ds["cache_table_id"] for ds in names.values()}
    unknown = sorted(cfg.existing_cache_tables - known)
    if unknown:
        raise ConfigError(
            f"l2cache:existingCacheTables names tables no dataset uses: {', '.join(unknown)}"
        )


def load(cfg: pulumi.Config | None = None, gcp: pulumi.Config | None = None) -> StackConfig:
    """The stack's ``l2cache:`` and ``gcp:`` config and the dataset map it names, with a
    default for every optional key, validated: the one place the program reads Pulumi
    config (``cfg``/``gcp`` stand in for the stack's own namespaces when given)."""
    cfg = cfg or pulumi.Config("l2cache")
    gcp = gcp or pulumi.Config("gcp")
    datasets_file = Path(cfg.require("datasetsFile"))
    if not datasets_file.is_absolute():
        datasets_file = (Path(__file__).parent / datasets_file).resolve()
    datasets = yaml.safe_load(datasets_file.read_text())
    map_attempts = int((datasets.get("tasks") or {}).get("max_attempts", 10))
    workers = cfg.get_int("workerMaxInstances") or sizing.DEFAULT_WORKER_MAX_INSTANCES
    chunks_per_task = cfg.get_int("maxChunksPerTask") or sizing.DEFAULT_CHUNKS_PER_TASK
    dataset_chunks = (
        cfg.get_int("datasetChunks") or map_dataset_chunks(datasets) or sizing.MINNIE65_CHUNKS
    )
    fan_out, ramp = map_dispatch(datasets)
    # the derived queue settings (docs/design.md, "Dispatch"): explicit keys win
    plan = sizing.plan_dispatch(
        dataset_chunks,
        workers,
        sizing.WORKER_REQUESTS_PER_INSTANCE,
        fan_out=fan_out,
        ramp=ramp,
        batch=chunks_per_task,
    )
    out = StackConfig(
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
        worker_max_instances=workers,
        queue_max_attempts=cfg.get_int("queueMaxAttempts") or map_attempts,
        queue_min_backoff_s=cfg.get_int("queueMinBackoffSeconds") or 5,
        queue_max_backoff_s=cfg.get_int("queueMaxBackoffSeconds") or 300,
        queue_max_concurrent=cfg.get_int("queueMaxConcurrent") or plan.max_concurrent_dispatches,
        queue_max_per_second=cfg.get_float("queueMaxPerSecond") or plan.max_dispatches_per_second,
        graph_instances=list(cfg.get_object("graphInstances") or []),
        segmentation_buckets=list(cfg.get_object("segmentationBuckets") or []),
        cave_auth=parse_cave_auth(cfg.get("caveAuth"), datasets),
        auth_token_secret=cfg.get("authTokenSecret") or None,
        pcg_edits_topic=edits_topic_path(cfg.get("pcgEditsTopic"), datasets),
        existing_cache_tables=frozenset(cfg.get_object("existingCacheTables") or []),
        existing_bigtable_instance=cfg.get_bool("existingBigtableInstance") or False,
        lookup_backend=cfg.get_bool("lookupBackend") or False,
        lb_scheme=cfg.get("loadBalancingScheme") or "EXTERNAL_MANAGED",
        lookup_domain=cfg.get("lookupDomain") or None,
        url_map=cfg.get("urlMap") or None,
        lookup_ingress=cfg.get("lookupIngress") or None,
        chunks_per_task=chunks_per_task,
        dataset_chunks=dataset_chunks,
        edits_queue_max_concurrent=cfg.get_int("editsQueueMaxConcurrent"),
    )
    validate(out)
    return out
