"""The dataset map's operator sections: ``qc:`` thresholds and ``slo:`` targets.

Both are layered: the top-level section first, then a dataset's own section key by
key over it. The core (``l2cache.config``) keeps the parsed document and never reads
these sections, so no function loads QC or SLO code; operators' commands and the
deploy program call :func:`check_sections` so a bad value is still refused before
anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from l2cache.config import ConfigError, L2CacheConfig, config_section
from l2cache_ops.qc import QcThresholds
from l2cache_ops.slo import SloTargets

T = TypeVar("T")


def qc_thresholds(config: L2CacheConfig, dataset: str) -> QcThresholds:
    """The dataset's QC thresholds (none set: the defaults of :class:`QcThresholds`)."""
    return _layered(config, dataset, "qc", QcThresholds.from_mapping)


def slo_targets(config: L2CacheConfig, dataset: str) -> SloTargets:
    """The dataset's SLO targets (none set: every objective is "no target")."""
    return _layered(config, dataset, "slo", SloTargets.from_mapping)


def check_sections(config: L2CacheConfig) -> L2CacheConfig:
    """Parse the top-level and every dataset's ``qc:`` and ``slo:`` once; raises
    :class:`ConfigError` naming the first bad value."""
    for key, parse in (("qc", QcThresholds.from_mapping), ("slo", SloTargets.from_mapping)):
        _top(config, key, parse)
        for name in config.datasets:
            _layered(config, name, key, parse)
    return config


def _top(config: L2CacheConfig, key: str, parse: Callable[..., T]) -> T:
    try:
        return parse(config_section(config.raw, key, config.source))
    except ValueError as exc:
        raise ConfigError(f"{config.source}: {key}: {exc}") from None


def _layered(config: L2CacheConfig, dataset: str, key: str, parse: Callable[..., T]) -> T:
    """``parse(the dataset's section, base=parse(the top-level section))``.

    ``parse(mapping, base=None)`` raises ValueError for a bad value; it is reported as
    a :class:`ConfigError` naming where the value came from.
    """
    source, raw = config.source, config.raw
    top = _top(config, key, parse)
    config.dataset(dataset)  # an unknown name is UnknownDatasetError, as everywhere
    entry: Mapping[str, Any] = (raw.get("datasets") or {}).get(dataset) or {}
    own = config_section(entry, key, f"{source}: dataset {dataset!r}")
    try:
        return parse(own, base=top)
    except ValueError as exc:
        raise ConfigError(f"{source}: dataset {dataset!r}: {key}: {exc}") from None
