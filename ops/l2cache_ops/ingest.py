"""Start or resume a bulk ingest or a region reprocess: record the run, enqueue its root task.

The root task is one span over all the run's positions ``[0, n_chunks)`` of its keyed
chunk order; the fan-out itself (:func:`l2cache.domain.spans.plan_span`) runs in the
compute_chunk workers, which schedule the leaves by the warm-up ramp counted from the
run's start (a resume ramps again from its own start: ``t0_ms``). This is the operator's
side, which never runs in the cloud.
"""

from __future__ import annotations

from collections.abc import Sequence

from l2cache.compute import dataset_context
from l2cache.config import L2CacheConfig
from l2cache.domain.lineage import utc_now
from l2cache.domain.regions import DEFAULT_BATCH, region_from_bbox, region_size
from l2cache.gcp.tasks import enqueue_span, tasks_client
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
    """Record a run (or reopen one to resume) and enqueue its root span task.

    A new run's tasks are generation 0; a resume gets a fresh generation (task names
    stay unique per (run, span, generation), see :func:`l2cache.gcp.tasks.span_task_id`).
    A bbox makes the run a ``region_reprocess``: besides its chunks' current nodes, its
    workers recompute the ids with rows there that later edits superseded
    (:func:`l2cache.compute.with_superseded`); a run without a bbox (``bulk_ingest``,
    for a new table) does not look for them.
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
        if run.region is None or run.n_chunks != region_size(run.region):
            raise ValueError(f"run {run.run_id} is a {run.kind} run: nothing to resume by chunk")
        now = utc_now()
        generation = "resume" + now.strftime("%Y%m%dT%H%M%S%f")
        t0_ms = int(now.timestamp() * 1000)
    else:
        region = region_from_bbox(ctx.dataset, bbox_voxels)
        kind = "region_reprocess" if bbox_voxels is not None else "bulk_ingest"
        run = new_run(
            kind, ctx.dataset, region, region_size(region), trigger, pinned_revision=pinned_revision
        )
        ctx.ledger.create_run(run)
        generation = 0
        t0_ms = None  # the workers ramp from the run record's created_at
    enqueue_span(
        tasks_client(),
        config.tasks,
        dataset_name,
        run.run_id,
        0,
        run.n_chunks,
        batch,
        generation,
        t0_ms=t0_ms,
    )
    return run
