"""Bigtable instance, one cache table per dataset, the runs table, the source bucket.

Cache tables marked existing (the dataset map's ``existing_cache_table: true`` or
``l2cache:existingCacheTables``) are served, never created, altered or deleted here:
Pulumi does not own them. ``l2cache:existingBigtableInstance`` likewise uses the
dataset map's ``bigtable`` instance as it is (e.g. the one the existing service's
tables live in) instead of creating it. A dataset's ``fallback_table_id`` (the
switch-over) is likewise only read, by lookup.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp
from children import COMPONENT_TYPE, child_opts
from config import StackConfig

CACHE_FAMILIES = ("0", "lineage")
RUNS_FAMILIES = ("run", "ledger")  # l2cache.store.ledger: RUN_FAMILY, LEDGER_FAMILY
# l2cache.store.ledger.SUM_FAMILY: the run's counters, an int64 sum aggregate family, so
# every worker's AddToCell merges into one cell (l2cache.store.runstate)
RUNS_SUM_FAMILY = "sum"
# l2cache.store.ledger.INDEX_FAMILY: per-id pointers from an edit's new L2 ids to its
# event (what the lookup's per-id state reads), collected after INDEX_MAX_AGE
RUNS_INDEX_FAMILY = "idx"
RUNS_INDEX_GC_MAX_AGE = "720h"  # l2cache.store.ledger.INDEX_MAX_AGE
# l2cache.store.missing_guard: the lookup's negative entries, pending marks, callers'
# budgets. Freshness is read from cell timestamps; GC only reclaims the space.
GUARD_FAMILIES = ("neg", "pend", "rate")
GUARD_GC_MAX_AGE = "168h"  # l2cache.store.missing_guard.GC_MAX_AGE


class Storage(pulumi.ComponentResource):
    """The Bigtable instance (unless it exists already), the cache tables l2cache owns
    with their GC policies, the runs table, and the bucket of deploy archives."""

    instance: gcp.bigtable.Instance | None  # None when the instance exists already
    instance_name: pulumi.Output[str]
    cache_tables: dict[str, gcp.bigtable.Table]  # dataset -> the table we own
    existing_tables: dict[str, str]  # dataset -> table id, served but not managed here
    gc_policies: list[gcp.bigtable.GCPolicy]
    runs: gcp.bigtable.Table
    runs_index_gc: gcp.bigtable.GCPolicy  # the runs table's per-id index: 30 days
    guard: gcp.bigtable.Table  # the lookup's missing-id guard (lookup reads and writes it)
    guard_gc: list[gcp.bigtable.GCPolicy]
    bucket: gcp.storage.Bucket
    cache_table_names: pulumi.Output[dict[str, str]]  # dataset -> owned table id

    def __init__(
        self, name: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(COMPONENT_TYPE.format("Storage"), name, None, opts)
        cluster: gcp.bigtable.InstanceClusterArgsDict = {
            "cluster_id": "l2cache-c1",
            "zone": cfg.bigtable_zone,
            "storage_type": "SSD",
        }
        if cfg.bigtable_instance_type == "PRODUCTION":
            cluster["num_nodes"] = cfg.bigtable_nodes
        if cfg.existing_bigtable_instance:
            self.instance = None
            self.instance_name = pulumi.Output.from_input(cfg.bigtable_instance)
        else:
            self.instance = gcp.bigtable.Instance(
                "bigtable",
                name=cfg.bigtable_instance,  # the dataset map's bigtable.instance: what functions read
                project=cfg.bigtable_project,
                instance_type=cfg.bigtable_instance_type,
                clusters=[cluster],
                deletion_protection=cfg.bigtable_instance_type == "PRODUCTION",
                opts=child_opts(self),
            )
            self.instance_name = self.instance.name
        protect = cfg.bigtable_instance_type == "PRODUCTION"  # as the instance
        self._datasets = dict(cfg.datasets["datasets"])
        self.cache_tables, self.existing_tables, self.gc_policies = {}, {}, []
        for dataset, ds in sorted(cfg.datasets["datasets"].items()):
            table_id = ds["cache_table_id"]
            if cfg.is_existing_table(dataset):
                self.existing_tables[dataset] = table_id  # served as it is; no Table, no GC policy
                continue
            # Keyed by table id, not dataset name: moving a table from a staging dataset
            # entry to the served one (README, "Switching") leaves the resource untouched
            # instead of deleting one table and creating another of the same name.
            table = gcp.bigtable.Table(
                f"cache-{table_id}",
                name=table_id,
                instance_name=self.instance_name,
                project=cfg.bigtable_project,
                column_families=[{"family": f} for f in CACHE_FAMILIES],
                deletion_protection="PROTECTED" if protect else "UNPROTECTED",
                opts=child_opts(self, was=[f"cache-{dataset}"]),
            )
            self.cache_tables[dataset] = table
            for fam in CACHE_FAMILIES:
                # the last N versions are what make a bad run roll-backable
                self.gc_policies.append(
                    gcp.bigtable.GCPolicy(
                        f"gc-{table_id}-{fam}",
                        instance_name=self.instance_name,
                        table=table.name,
                        column_family=fam,
                        project=cfg.bigtable_project,
                        max_versions=[{"number": cfg.cache_max_versions}],
                        deletion_policy="ABANDON",
                        opts=child_opts(self, depends_on=[table], was=[f"gc-{dataset}-{fam}"]),
                    )
                )
        self.runs = gcp.bigtable.Table(
            "runs",
            name=cfg.datasets.get("runs_table_id", "l2cache_runs"),
            instance_name=self.instance_name,
            project=cfg.bigtable_project,
            column_families=[
                *({"family": f} for f in RUNS_FAMILIES),
                {"family": RUNS_SUM_FAMILY, "type": "intsum"},
                {"family": RUNS_INDEX_FAMILY},
            ],
            deletion_protection="PROTECTED" if protect else "UNPROTECTED",
            opts=child_opts(self),
        )
        self.runs_index_gc = gcp.bigtable.GCPolicy(
            "gc-runs-idx",
            instance_name=self.instance_name,
            table=self.runs.name,
            column_family=RUNS_INDEX_FAMILY,
            project=cfg.bigtable_project,
            mode="UNION",
            max_age={"duration": RUNS_INDEX_GC_MAX_AGE},
            max_versions=[{"number": 1}],
            deletion_policy="ABANDON",
            opts=child_opts(self, depends_on=[self.runs]),
        )
        missing = cfg.datasets.get("missing_ids") or {}
        self.guard = gcp.bigtable.Table(
            "lookup-guard",
            name=missing.get("guard_table_id", "l2cache_lookup_guard"),
            instance_name=self.instance_name,
            project=cfg.bigtable_project,
            column_families=[{"family": f} for f in GUARD_FAMILIES],
            deletion_protection="UNPROTECTED",  # marks and counters: nothing to keep
            opts=child_opts(self),
        )
        self.guard_gc = [
            gcp.bigtable.GCPolicy(
                f"gc-lookup-guard-{fam}",
                instance_name=self.instance_name,
                table=self.guard.name,
                column_family=fam,
                project=cfg.bigtable_project,
                mode="UNION",
                max_age={"duration": GUARD_GC_MAX_AGE},
                max_versions=[{"number": 1}],
                deletion_policy="ABANDON",
                opts=child_opts(self, depends_on=[self.guard]),
            )
            for fam in GUARD_FAMILIES
        ]
        self.bucket = gcp.storage.Bucket(
            "source",
            name=f"{cfg.project}-l2cache-source",
            location=cfg.region.upper(),
            project=cfg.project,
            uniform_bucket_level_access=True,
            force_destroy=True,
            opts=child_opts(self),
        )
        self.cache_table_names = pulumi.Output.from_input(
            {dataset: t.name for dataset, t in self.cache_tables.items()}
        )
        self.register_outputs(
            {
                "instance_name": self.instance_name,
                "cache_tables": self.cache_table_names,
                "existing_cache_tables": self.existing_tables,
                "fallback_tables": self.fallback_tables,
                "runs_table": self.runs.name,
                "guard_table": self.guard.name,
                "source_bucket": self.bucket.name,
            }
        )

    @property
    def fallback_tables(self) -> dict[str, str]:
        """Dataset -> its ``fallback_table_id`` (the switch-over: an existing table read
        for the ids its cache table lacks). Never created, written or given GC rules
        here: lookup only reads it."""
        return {
            dataset: ds["fallback_table_id"]
            for dataset, ds in sorted(self._datasets.items())
            if ds.get("fallback_table_id")
        }

    def served_tables(self) -> dict[str, pulumi.Input[str]]:
        """Every cache table lookup reads, owned or existing, by dataset."""
        owned: dict[str, pulumi.Input[str]] = {
            dataset: t.name for dataset, t in self.cache_tables.items()
        }
        return dict(sorted({**owned, **self.existing_tables}.items()))
