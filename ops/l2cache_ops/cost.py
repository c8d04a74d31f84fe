"""Cost of chunks, runs and cubic millimetres from the ledger, priced as Google bills it.

Prices are data, not code: ``prices.yaml`` beside this module (shipped as package data,
so a checkout and an installed ``l2cache`` read the same file) holds each unit price
with its date, currency, region and source; ``make prices`` / ``l2cache prices
refresh`` rewrites it from the Cloud Billing Catalog API
(:mod:`l2cache_ops.prices_refresh`). Everything that prints a cost (``l2cache status``,
``ingest --watch``, ``ingest --sample``'s projection, the dashboard, bench/, infra's
Cloud Monitoring panel) goes through this module.

What a run costs (USD, list prices of ``region``):

    compute   sum over done chunks of duration_s x (worker GiB x $/GiB-s
                                                    + worker vCPU x $/vCPU-s)
    dispatch  sum over done chunks of attempts x ($/Cloud Tasks operation
                                                 + $/function request)
    storage   L2 rows written x row bytes / 2^30 x $/GiB-month x storage months
    nodes     Bigtable nodes x hours the run was computing x $/node-hour

*Compute*: ``duration_s`` is the ledger's measured time of the attempt that succeeded
(failed attempts are not timed, so many retries make it an underestimate; the retry
SLO shows them). The worker's size is what infra deploys for the run's chunk size
(:func:`worker_prices`, from :mod:`l2cache_ops.sizing`, the one definition).

*Bigtable* bills provisioned node-hours and stored GiB-months, not rows. Storage: each
L2 row written is :attr:`Prices.row_bytes` bytes, **222 B**, measured on pinky40's four
256x256x512 chunks with the real writer's MutateRows entries (key + per cell family,
qualifier, 8-byte timestamp and value; ``prices.yaml`` ``measured.row_bytes`` says how,
``tests/test_prices.py`` re-measures it) and charged for ``storage_months`` (1) at the
SSD price (infra creates SSD clusters). It is an upper bound: Bigtable bills the
compressed size on disk. The rows stay as long as the dataset is served; one month
keeps a run's figure finite and comparable with a monthly bill.

Nodes: **the run is charged the instance's nodes for the hours it was computing** —
``bigtable_nodes`` (infra's ``l2cache:bigtableNodes``, default 1) x the union of its
chunks' [started_at, finished_at] intervals (a paused run's pause is not charged; the
projection uses its projected wall time). Why this and not the alternatives: the
instance is always on (it serves lookups, and production instances are deletion-
protected), so Google bills every node-hour whether a run happens or not; charging the
run nothing would hide that a region's ingest occupies the instance for hours, and the
node count is sized for the bulk write load a run puts on it. A capacity share (rows /
a node's rows per second) would rest on a throughput we have not measured on a real
instance. So this is the instance's bill while the run ran: exact for an instance
scaled up for the run, an upper bound of the marginal cost for one that would idle
anyway; :class:`RunCost` keeps it apart (``node_usd``) so it can be discounted.

A mm^3 is 1e18 nm^3 of chunk volume (ledger ``voxels`` x the dataset's voxel volume).

Environment overrides (a contract's prices, a different deployment), each read when
:func:`prices` is called: :data:`PRICE_ENV` maps every field to its variable
(``L2CACHE_PRICE_*`` for unit prices, ``L2CACHE_COST_*`` for deployment facts), and
``L2CACHE_PRICES_FILE`` names another price file of the same form.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from l2cache_ops.sizing import PRODUCTION_CHUNK, cpu_for_memory, worker_memory_mib

if TYPE_CHECKING:  # annotations only: at run time the map (numpy) and the ledger (the
    # Bigtable client) would make loading the prices ~1 s slower, for no use here
    from l2cache.config import L2CacheConfig
    from l2cache.store.ledger import RunRecord

NM3_PER_MM3 = 1e18
GIB = 2**30
PRICE_FILE = "prices.yaml"
PRICES_FILE_ENV = "L2CACHE_PRICES_FILE"

# the worker infra deploys for the production chunk (1,024 MiB, 1 vCPU): used when no
# chunk size is given
DEFAULT_WORKER_GIB = worker_memory_mib(PRODUCTION_CHUNK) / 1024.0
DEFAULT_WORKER_VCPU = float(cpu_for_memory(worker_memory_mib(PRODUCTION_CHUNK)))
DEFAULT_BIGTABLE_NODES = 1.0  # infra/config.py: l2cache:bigtableNodes or 1
DEFAULT_STORAGE = "SSD"  # infra/storage.py: the cluster's storage_type
DEFAULT_STORAGE_MONTHS = 1.0

# unit prices in the file, by field name (what the Catalog refresh rewrites)
PRICE_FIELDS = (
    "vcpu_second",
    "gib_second",
    "request",
    "task",
    "bigtable_node_hour",
    "bigtable_ssd_gib_month",
    "bigtable_hdd_gib_month",
    "pubsub_tib",
)

# field of Prices -> environment variable that overrides it
PRICE_ENV = {
    "gib_second": "L2CACHE_PRICE_GIB_SECOND",
    "vcpu_second": "L2CACHE_PRICE_VCPU_SECOND",
    "request": "L2CACHE_PRICE_REQUEST",
    "task": "L2CACHE_PRICE_TASK",
    "bigtable_node_hour": "L2CACHE_PRICE_BT_NODE_HOUR",
    "bigtable_ssd_gib_month": "L2CACHE_PRICE_BT_SSD_GIB_MONTH",
    "bigtable_hdd_gib_month": "L2CACHE_PRICE_BT_HDD_GIB_MONTH",
    "pubsub_tib": "L2CACHE_PRICE_PUBSUB_TIB",
    "worker_gib": "L2CACHE_COST_FUNCTION_GIB",
    "worker_vcpu": "L2CACHE_COST_FUNCTION_VCPU",
    "bigtable_nodes": "L2CACHE_COST_BT_NODES",
    "bigtable_storage": "L2CACHE_COST_BT_STORAGE",
    "row_bytes": "L2CACHE_COST_ROW_BYTES",
    "storage_months": "L2CACHE_COST_STORAGE_MONTHS",
}
# variables that no longer mean anything: warned about, never silently ignored
RETIRED_ENV = {
    "L2CACHE_PRICE_BT_ROW": "Bigtable is priced by node-hours (L2CACHE_PRICE_BT_NODE_HOUR) "
    "and storage (L2CACHE_PRICE_BT_SSD_GIB_MONTH, L2CACHE_COST_ROW_BYTES), not per row",
}


class PriceFileError(ValueError):
    """The price file is missing a field or has one of the wrong kind."""


def price_file_path(env: Mapping[str, str] | None = None) -> Path:
    """The price file in use: ``L2CACHE_PRICES_FILE`` when set, else the packaged one."""
    env = os.environ if env is None else env
    if env.get(PRICES_FILE_ENV):
        return Path(env[PRICES_FILE_ENV])
    return Path(str(resources.files("l2cache_ops").joinpath(PRICE_FILE)))


def load_sheet(path: Path | None = None) -> dict[str, Any]:
    """The price file as a document, checked: every price a non-negative number, the
    date, currency and region present (a sheet without them is not a price list)."""
    path = price_file_path() if path is None else Path(path)
    doc = yaml.safe_load(path.read_text())
    check_sheet(doc, str(path))
    return doc


def check_sheet(doc: object, where: str = "price file") -> None:
    """Raise :class:`PriceFileError` naming what is wrong with a price document."""
    if not isinstance(doc, dict):
        raise PriceFileError(f"{where}: not a mapping")
    for key in ("date", "currency", "region"):
        if not doc.get(key):
            raise PriceFileError(f"{where}: no {key!r}")
    table = doc.get("prices")
    if not isinstance(table, dict):
        raise PriceFileError(f"{where}: no 'prices' mapping")
    for name in PRICE_FIELDS:
        entry = table.get(name)
        usd = entry.get("usd") if isinstance(entry, dict) else None
        if isinstance(usd, bool) or not isinstance(usd, int | float) or usd < 0:
            raise PriceFileError(f"{where}: prices.{name}.usd must be a non-negative number")
        if not entry.get("source"):
            raise PriceFileError(f"{where}: prices.{name} has no source")
    row = (doc.get("measured") or {}).get("row_bytes") or {}
    if not isinstance(row.get("value"), int | float) or row["value"] <= 0:
        raise PriceFileError(f"{where}: measured.row_bytes.value must be a positive number")


def _sheet_defaults(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Prices fields from a checked price document."""
    out: dict[str, Any] = {name: float(doc["prices"][name]["usd"]) for name in PRICE_FIELDS}
    out["row_bytes"] = float(doc["measured"]["row_bytes"]["value"])
    out.update(date=str(doc["date"]), currency=str(doc["currency"]), region=str(doc["region"]))
    return out


_PACKAGED = _sheet_defaults(load_sheet(price_file_path({})))


@dataclass(frozen=True)
class Prices:
    """Unit prices (``currency``, list prices of ``region`` on ``date``) and the
    deployment they apply to (worker size, Bigtable nodes and storage type, row size).

    The defaults are the packaged ``prices.yaml``; :func:`prices` applies a price file
    and environment overrides, :meth:`with_worker` infra's sizing."""

    gib_second: float = _PACKAGED["gib_second"]
    vcpu_second: float = _PACKAGED["vcpu_second"]
    request: float = _PACKAGED["request"]
    task: float = _PACKAGED["task"]
    bigtable_node_hour: float = _PACKAGED["bigtable_node_hour"]
    bigtable_ssd_gib_month: float = _PACKAGED["bigtable_ssd_gib_month"]
    bigtable_hdd_gib_month: float = _PACKAGED["bigtable_hdd_gib_month"]
    pubsub_tib: float = _PACKAGED["pubsub_tib"]
    worker_gib: float = DEFAULT_WORKER_GIB
    worker_vcpu: float = DEFAULT_WORKER_VCPU
    bigtable_nodes: float = DEFAULT_BIGTABLE_NODES
    bigtable_storage: str = DEFAULT_STORAGE
    row_bytes: float = _PACKAGED["row_bytes"]
    storage_months: float = DEFAULT_STORAGE_MONTHS
    date: str = _PACKAGED["date"]
    currency: str = _PACKAGED["currency"]
    region: str = _PACKAGED["region"]

    @property
    def worker_second(self) -> float:
        """USD per second of one worker instance busy with a chunk."""
        return self.worker_gib * self.gib_second + self.worker_vcpu * self.vcpu_second

    @property
    def dispatch(self) -> float:
        """USD of one attempt's delivery: a Cloud Tasks operation and a function request."""
        return self.task + self.request

    @property
    def storage_gib_month(self) -> float:
        """USD per GiB-month of the cluster's storage type (SSD or HDD)."""
        if self.bigtable_storage.upper() == "HDD":
            return self.bigtable_hdd_gib_month
        return self.bigtable_ssd_gib_month

    @property
    def row_storage(self) -> float:
        """USD to store one L2 row (:attr:`row_bytes`) for :attr:`storage_months`."""
        return self.row_bytes / GIB * self.storage_gib_month * self.storage_months

    @property
    def node_second(self) -> float:
        """USD per second of the instance's Bigtable nodes."""
        return self.bigtable_nodes * self.bigtable_node_hour / 3600.0

    def with_worker(self, memory_mib: float, vcpu: float = DEFAULT_WORKER_VCPU) -> Prices:
        """These prices for a worker of ``memory_mib`` (infra's sizing) and ``vcpu``."""
        return replace(self, worker_gib=memory_mib / 1024.0, worker_vcpu=float(vcpu))


def prices(env: Mapping[str, str] | None = None) -> Prices:
    """The price file's prices (``L2CACHE_PRICES_FILE`` or the packaged one), each
    overridden by its environment variable (:data:`PRICE_ENV`) when set."""
    env = os.environ if env is None else env
    for var, why in RETIRED_ENV.items():
        if env.get(var):
            warnings.warn(f"{var} is ignored: {why}", stacklevel=2)
    base = Prices(**_sheet_defaults(load_sheet(price_file_path(env))))
    kinds = {f.name: f.type for f in fields(Prices)}
    given: dict[str, Any] = {}
    for name, var in PRICE_ENV.items():
        raw = env.get(var)
        if not raw:
            continue
        if kinds[name] == "str":
            if raw.upper() not in ("SSD", "HDD"):
                raise ValueError(f"{var}={raw!r}: expected SSD or HDD")
            given[name] = raw.upper()
            continue
        try:
            given[name] = float(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not a number") from None
    return replace(base, **given)


PRICES = prices()


def worker_prices(
    chunk_size: Sequence[int] = PRODUCTION_CHUNK,
    read_ahead: bool = False,
    base: Prices | None = None,
    env: Mapping[str, str] | None = None,
) -> Prices:
    """Prices for compute_chunk as infra deploys it for ``chunk_size``: memory from
    :func:`~l2cache_ops.sizing.worker_memory_mib` (with ``read_ahead`` when the map's
    ``tasks.read_ahead`` is on: the deployed worker is larger then), vCPU from
    :func:`~l2cache_ops.sizing.cpu_for_memory`. An explicit ``L2CACHE_COST_FUNCTION_GIB``
    in the environment wins (``base`` already carries it)."""
    env = os.environ if env is None else env
    base = PRICES if base is None else base
    if env.get(PRICE_ENV["worker_gib"]):
        return base
    mib = worker_memory_mib(tuple(int(v) for v in chunk_size), read_ahead)
    vcpu = float(env[PRICE_ENV["worker_vcpu"]]) if env.get(PRICE_ENV["worker_vcpu"]) else None
    return base.with_worker(mib, vcpu if vcpu is not None else float(cpu_for_memory(mib)))


def map_read_ahead(cfg: L2CacheConfig | None) -> bool:
    """The dataset map's ``tasks.read_ahead`` (False without a ``tasks`` section)."""
    tasks = getattr(cfg, "tasks", None)
    return bool(getattr(tasks, "read_ahead", False))


def run_prices(
    run: RunRecord, cfg: L2CacheConfig | None = None, base: Prices | None = None
) -> Prices:
    """Prices of the worker that computed ``run`` (a ledger RunRecord): its recorded
    chunk size (``params.chunk_size``; the map's dataset when the run has none) and the
    map's ``tasks.read_ahead``. Every CLI path that prints a run's cost uses this, so
    ``status``, ``ingest --watch``, ``runs inspect`` and ``ingest --sample`` agree."""
    chunk = (getattr(run, "params", None) or {}).get("chunk_size")
    if not chunk and cfg is not None:
        chunk = cfg.dataset(run.dataset).chunk_size
    return worker_prices(chunk or PRODUCTION_CHUNK, map_read_ahead(cfg), base)


def chunk_cost(row: Mapping[str, Any], p: Prices = PRICES) -> float:
    """USD of one ledger chunk row without the instance's nodes: its compute, its
    attempts' dispatches and a month of its rows' storage (0 compute for a chunk that
    never finished)."""
    seconds = float(row.get("duration_s", 0) or 0)
    rows = int(row.get("l2_count", 0) or 0)
    attempts = int(row.get("attempts", 1) or 1)
    return seconds * p.worker_second + rows * p.row_storage + attempts * p.dispatch


def busy_seconds(rows: Iterable[Mapping[str, Any]]) -> float:
    """Seconds during which at least one chunk of ``rows`` was being computed: the union
    of their [started_at, finished_at] intervals (rows missing either are skipped)."""
    spans = []
    for r in rows:
        if r.get("started_at") and r.get("finished_at"):
            a = datetime.fromisoformat(str(r["started_at"]))
            b = datetime.fromisoformat(str(r["finished_at"]))
            if b > a:
                spans.append((a, b))
    total = 0.0
    end = None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += (b - a).total_seconds()
            end = b
        elif b > end:
            total += (b - end).total_seconds()
            end = b
    return total


@dataclass(frozen=True)
class RunCost:
    """What a run's done chunks cost, per unit of what they covered, and the parts."""

    usd: float
    chunks: int
    compute_s: float
    l2_rows: int
    mm3: float
    compute_usd: float = 0.0
    dispatch_usd: float = 0.0
    storage_usd: float = 0.0
    node_usd: float = 0.0
    busy_s: float = 0.0  # union of the run's chunk intervals: what node_usd is charged for
    prices: Prices | None = field(default=None, repr=False, compare=False)  # what priced it

    @property
    def per_chunk(self) -> float | None:
        """USD per done chunk, all-in (nodes included); None before any chunk is done."""
        return self.usd / self.chunks if self.chunks else None

    @property
    def per_mm3(self) -> float | None:
        """USD per mm^3 of the done chunks, what the cost SLO (``max_usd_per_mm3``)
        judges; None while they cover no volume."""
        return self.usd / self.mm3 if self.mm3 > 0 else None


def run_cost(
    rows: Iterable[Mapping[str, Any]], voxel_volume_nm3: float, p: Prices = PRICES
) -> RunCost:
    """Cost of ``rows`` (a run's ledger chunk rows): compute, dispatch and storage of the
    done chunks, the instance's nodes for the hours any chunk was computing (failed
    attempts held the instance too), and the mm^3 the done chunks cover."""
    rows = list(rows)
    done = [r for r in rows if r.get("status") == "done"]
    totals = {
        "done": len(done),
        "voxels": sum(int(r.get("voxels", 0) or 0) for r in done),
        "compute_ms": sum(float(r.get("duration_s", 0) or 0) for r in done) * 1000,
        "l2": sum(int(r.get("l2_count", 0) or 0) for r in done),
        "attempts": sum(int(r.get("attempts", 1) or 1) for r in done),
    }
    return cost_from_counts(totals, busy_seconds(rows), voxel_volume_nm3, p)


def cost_from_counts(
    totals: Mapping[str, float], busy_s: float, voxel_volume_nm3: float, p: Prices = PRICES
) -> RunCost:
    """Cost of a run from its counters (``done``, ``voxels``, ``compute_ms``, ``l2``,
    ``attempts``: :mod:`l2cache.store.runstate`) and its busy seconds: what ``status``
    and the dashboard print, with the same prices and parts as :func:`run_cost`.

    Attempts are every dispatch the run paid for, failed ones included.
    """
    compute_s = float(totals.get("compute_ms", 0)) / 1000.0
    l2_rows = int(totals.get("l2", 0))
    attempts = int(totals.get("attempts", 0))
    voxels = int(totals.get("voxels", 0))
    busy = busy_s
    parts = {
        "compute_usd": compute_s * p.worker_second,
        "dispatch_usd": attempts * p.dispatch,
        "storage_usd": l2_rows * p.row_storage,
        "node_usd": busy * p.node_second,
    }
    return RunCost(
        usd=sum(parts.values()),
        chunks=int(totals.get("done", 0)),
        compute_s=compute_s,
        l2_rows=l2_rows,
        mm3=voxels * voxel_volume_nm3 / NM3_PER_MM3,
        busy_s=busy,
        prices=p,
        **parts,
    )


@dataclass(frozen=True)
class Projection:
    """A whole region's wall time and cost, projected from a sample of its chunks."""

    sample_chunks: int
    total_chunks: int
    seconds_per_chunk: float
    max_instances: int
    wall_s: float
    usd: float
    mm3: float
    node_usd: float = 0.0  # the instance's nodes for wall_s (included in usd)

    @property
    def usd_per_chunk(self) -> float | None:
        """All-in: the projected total over the region's chunks."""
        return self.usd / self.total_chunks if self.total_chunks else None

    @property
    def usd_per_mm3(self) -> float | None:
        """All-in per mm^3 of the whole region, comparable with a finished run's
        :attr:`RunCost.per_mm3`; None for a region of no volume."""
        return self.usd / self.mm3 if self.mm3 > 0 else None


def project(
    sample: RunCost,
    total_chunks: int,
    chunk_voxels: int,
    voxel_volume_nm3: float,
    max_instances: int,
    p: Prices = PRICES,
) -> Projection:
    """Scale a sample run to ``total_chunks``. Wall time = mean compute seconds per chunk
    x chunks / instances (the sample's own scheduling overhead is left out: it measures
    the worker, not the queue). Cost = the sample's mean per-chunk cost without nodes
    (compute, dispatch, storage) x chunks + the instance's nodes for that wall time:
    node-hours scale with the run's hours, not its chunks."""
    if sample.chunks == 0:
        raise ValueError("no sampled chunk finished: nothing to project from")
    if max_instances <= 0:
        raise ValueError("max_instances must be positive")
    per_s = sample.compute_s / sample.chunks
    per_usd = (sample.usd - sample.node_usd) / sample.chunks
    wall_s = per_s * math.ceil(int(total_chunks) / int(max_instances))
    node_usd = wall_s * p.node_second
    return Projection(
        sample_chunks=sample.chunks,
        total_chunks=int(total_chunks),
        seconds_per_chunk=per_s,
        max_instances=int(max_instances),
        wall_s=wall_s,
        usd=per_usd * total_chunks + node_usd,
        mm3=total_chunks * chunk_voxels * voxel_volume_nm3 / NM3_PER_MM3,
        node_usd=node_usd,
    )
