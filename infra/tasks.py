"""The Cloud Tasks queue compute tasks go through, with retry and rate settings (a child
of the Workers component, which also grants the worker the right to enqueue on it)."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp
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
