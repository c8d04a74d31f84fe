"""Bigtable instance, one cache table per dataset, the runs table, the source bucket.

Cache tables marked existing (the dataset map's ``existing_cache_table: true`` or
``l2cache:existingCacheTables``) are served, never created, altered or deleted here:
Pulumi does not own them. ``l2cache:existingBigtableInstance`` likewise uses the
dataset map's ``bigtable`` instance as it is (e.g. the one the existing service's
tables live in) instead of creating it.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp
from config import StackConfig

CACHE_FAMILIES = ("0", "lineage")
RUNS_FAMILIES = ("run", "ledger")  # l2cache.store.ledger: RUN_FAMILY, LEDGER_FAMILY


def bigtable(cfg: StackConfig) -> dict:
    cluster = {"cluster_id": "l2cache-c1", "zone": cfg.bigtable_zone, "storage_type": "SSD"}
    if cfg.bigtable_instance_type == "PRODUCTION":
        cluster["num_nodes"] = cfg.bigtable_nodes
    if cfg.existing_bigtable_instance:
        instance_name = pulumi.Output.from_input(cfg.bigtable_instance)
        instance = None
    else:
        instance = gcp.bigtable.Instance(
            "bigtable",
            name=cfg.bigtable_instance,  # the dataset map's bigtable.instance: what functions read
            project=cfg.bigtable_project,
            instance_type=cfg.bigtable_instance_type,
            clusters=[cluster],
            deletion_protection=cfg.bigtable_instance_type == "PRODUCTION",
        )
        instance_name = instance.name
    protect = cfg.bigtable_instance_type == "PRODUCTION"  # as the instance
    cache_tables, existing, policies = {}, {}, []
    for name, ds in sorted(cfg.datasets["datasets"].items()):
        table_id = ds["cache_table_id"]
        if cfg.is_existing_table(name):
            existing[name] = table_id  # served as it is; no Table, no GC policy of ours
            continue
        # Keyed by table id, not dataset name: moving a table from a staging dataset
        # entry to the served one (README, "Switching") leaves the resource untouched
        # instead of deleting one table and creating another of the same name.
        table = gcp.bigtable.Table(
            f"cache-{table_id}",
            name=table_id,
            instance_name=instance_name,
            project=cfg.bigtable_project,
            column_families=[{"family": f} for f in CACHE_FAMILIES],
            deletion_protection="PROTECTED" if protect else "UNPROTECTED",
            opts=pulumi.ResourceOptions(aliases=[pulumi.Alias(name=f"cache-{name}")]),
        )
        cache_tables[name] = table
        for fam in CACHE_FAMILIES:
            # the last N versions are what make a bad run roll-backable
            policies.append(
                gcp.bigtable.GCPolicy(
                    f"gc-{table_id}-{fam}",
                    instance_name=instance_name,
                    table=table.name,
                    column_family=fam,
                    project=cfg.bigtable_project,
                    max_versions=[{"number": cfg.cache_max_versions}],
                    deletion_policy="ABANDON",
                    opts=pulumi.ResourceOptions(
                        depends_on=[table], aliases=[pulumi.Alias(name=f"gc-{name}-{fam}")]
                    ),
                )
            )
    runs = gcp.bigtable.Table(
        "runs",
        name=cfg.datasets.get("runs_table_id", "l2cache_runs"),
        instance_name=instance_name,
        project=cfg.bigtable_project,
        column_families=[{"family": f} for f in RUNS_FAMILIES],
        deletion_protection="PROTECTED" if protect else "UNPROTECTED",
    )
    bucket = gcp.storage.Bucket(
        "source",
        name=f"{cfg.project}-l2cache-source",
        location=cfg.region.upper(),
        project=cfg.project,
        uniform_bucket_level_access=True,
        force_destroy=True,
    )
    return {
        "instance": instance,  # None when the instance exists already
        "instance_name": instance_name,
        "cache_tables": cache_tables,
        "existing_tables": existing,  # dataset -> table id, not managed here
        "runs": runs,
        "gc_policies": policies,
        "bucket": bucket,
    }
