"""The worker's size as infra deploys it, for cost figures computed off the cloud.

Kept for the tools that import it from here (the dashboard): the sizing is defined
once in :mod:`l2cache_ops.sizing` (``infra/sizing.py`` imports it from there too) and
priced by :func:`l2cache_ops.cost.worker_prices`; the queue's dispatch projection
(rate, concurrency, tasks, hours) is :func:`l2cache_ops.sizing.plan_dispatch`. Nothing here loads ``infra/`` by
path, so a cost is the same from a checkout and from an installed package.
"""

from __future__ import annotations

from l2cache_ops.cost import run_prices, worker_prices
from l2cache_ops.sizing import cpu_for_memory, plan_dispatch, worker_memory_mib

__all__ = ["cpu_for_memory", "plan_dispatch", "run_prices", "worker_memory_mib", "worker_prices"]
