"""The Cloud Tasks queues compute tasks go through, with retry and rate settings (children
of the Workers component, which also grants the worker the right to enqueue on them).

Two queues: the bulk queue (span, region and reconcile tasks; its rate and concurrency
derived from the dataset size and the workers, ``l2cache_ops.sizing.plan_dispatch``) and
the edits queue (on_edit's multi-chunk edits), whose concurrency is the share of the
workers the bulk queue cannot take, so an edit never waits behind a bulk ingest."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp
import sizing
from config import StackConfig


def queue(cfg: StackConfig, opts: pulumi.ResourceOptions | None = None) -> gcp.cloudtasks.Queue:
    """The queue the dataset map's ``tasks.queue`` names; its attempts must equal the
    map's ``tasks.max_attempts`` (config.validate), compute_chunk records the last one."""
    tk = cfg.datasets.get("tasks", {})
    return gcp.cloudtasks.Queue(
        "compute-queue",
        name=tk.get("queue", "l2cache-compute"),
        location=cfg.region,
        project=cfg.project,
        rate_limits={
            "max_concurrent_dispatches": cfg.queue_max_concurrent,
            "max_dispatches_per_second": cfg.queue_max_per_second,
        },
        retry_config={
            "max_attempts": cfg.queue_max_attempts,
            "min_backoff": f"{cfg.queue_min_backoff_s}s",
            "max_backoff": f"{cfg.queue_max_backoff_s}s",
            "max_doublings": 5,
        },
        stackdriver_logging_config={"sampling_ratio": 0.1},
        opts=opts,
    )


def edits_queue(
    cfg: StackConfig, opts: pulumi.ResourceOptions | None = None
) -> gcp.cloudtasks.Queue:
    """The queue the dataset map's ``tasks.edits_queue`` names (default ``<queue>-edits``):
    the same retries as the bulk queue (compute_chunk records the last attempt), its own
    concurrency (``StackConfig.edits_max_concurrent``) and Cloud Tasks' full rate."""
    return gcp.cloudtasks.Queue(
        "edits-queue",
        name=cfg.edits_queue_name,
        location=cfg.region,
        project=cfg.project,
        rate_limits={
            "max_concurrent_dispatches": cfg.edits_max_concurrent,
            "max_dispatches_per_second": sizing.CLOUD_TASKS_MAX_DISPATCHES_PER_S,
        },
        retry_config={
            "max_attempts": cfg.queue_max_attempts,
            "min_backoff": f"{cfg.queue_min_backoff_s}s",
            "max_backoff": f"{cfg.queue_max_backoff_s}s",
            "max_doublings": 5,
        },
        stackdriver_logging_config={"sampling_ratio": 1.0},
        opts=opts,
    )
