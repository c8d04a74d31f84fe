"""The worker's size as infra deploys it, for cost figures computed off the cloud.

``infra/sizing.py`` is the one definition of compute_chunk's memory and CPU (Pulumi
deploys exactly that); the cost of a chunk must use the same numbers, so this loads
that module from the checkout rather than restating its constants. The core
(``l2cache_ops.cost``) never imports infra: it takes the size as an argument.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from l2cache_ops.cost import PRICE_ENV, PRICES, Prices

SIZING = Path(__file__).resolve().parents[2] / "infra" / "sizing.py"


@cache
def infra_sizing():
    """``infra/sizing.py`` as a module (it imports only ``math``)."""
    spec = importlib.util.spec_from_file_location("l2cache_infra_sizing", SIZING)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"infra sizing not found at {SIZING}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_prices(chunk_size, base: Prices = PRICES) -> Prices:
    """Unit prices for compute_chunk as deployed for ``chunk_size``: memory from
    ``worker_memory_mib``, vCPU from ``cpu_for_memory`` (an explicit
    ``L2CACHE_COST_FUNCTION_GIB`` in the environment wins)."""
    import os

    if os.environ.get(PRICE_ENV["worker_gib"]):
        return base
    sizing = infra_sizing()
    mib = sizing.worker_memory_mib(tuple(int(v) for v in chunk_size))
    return base.with_worker(mib, float(sizing.cpu_for_memory(mib)))
