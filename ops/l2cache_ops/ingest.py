"""Start or resume a bulk ingest or a region reprocess: record the run, enqueue its root task.

The split fan-out itself (:func:`l2cache.domain.regions.plan_task`) runs in the
compute_chunk workers; this is the operator's side, which never runs in the cloud.
"""

from __future__ import annotations

from collections.abc import Sequence

from l2cache.compute import dataset_context
from l2cache.config import L2CacheConfig
from l2cache.domain.lineage import utc_now
from l2cache.domain.regions import DEFAULT_BATCH, region_from_bbox, region_size
from l2cache.gcp.tasks import enqueue_region, tasks_client
from l2cache.store.ledger import RunRecord, new_run


def start_ingest(
    config: L2CacheConfig,
    dataset_name: str,
    bbox_voxels: Sequence[int] | None = None,
    batch: int = DEFAULT_BATCH,
    resume_run: str | None = None,
    trigger: str = "cli",
    pinned_revision: str | None = None,
) -> RunRecord:
    """Record a run (or reopen one to resume) and enqueue its root split task.

    A new run's tasks are generation 0; a resume gets a fresh generation (task names
    stay unique per (run, region, generation), see :func:`l2cache.gcp.tasks.task_id`).
    """
    if config.tasks is None:
        raise ValueError("the dataset map has no 'tasks' section: nowhere to enqueue")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive number of chunks per task, got {batch!r}")
    ctx = dataset_context(config, dataset_name)
    if ctx.dataset.existing_cache_table:
        raise ValueError(
            f"dataset {dataset_name!r} is served from an existing cache table "
            f"({ctx.dataset.cache_table_id}) that l2cache does not write; point "
            "cache_table_id at a new table to ingest"
        )
    if resume_run:
        run = ctx.ledger.get_run(resume_run)
        generation = "resume" + utc_now().strftime("%Y%m%dT%H%M%S%f")
    else:
        region = region_from_bbox(ctx.dataset, bbox_voxels)
        kind = "region_reprocess" if bbox_voxels is not None else "bulk_ingest"
        run = new_run(
            kind, ctx.dataset, region, region_size(region), trigger, pinned_revision=pinned_revision
        )
        ctx.ledger.create_run(run)
        generation = 0
    enqueue_region(
        tasks_client(), config.tasks, dataset_name, run.run_id, run.region, batch, generation
    )
    return run
