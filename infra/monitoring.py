"""Log-based metrics from the functions' structured logs, and one Cloud Monitoring
dashboard with the same SLO panels as ``l2cache status`` / ``l2cache dashboard``.

The functions write one JSON line per chunk, stream event and lookup
(``l2cache.support.logs``: ``jsonPayload.l2cache`` = chunk | event | lookup, with status,
dataset, attempts, duration_s, latency_s). The metrics below count and measure those
lines; the dashboard charts them with the dataset map's ``slo:`` targets drawn as
thresholds. Objectives the logs cannot show (time to recover a failed chunk, QC pass,
$ per mm^3) are listed in a text panel that says where they are measured (the runs
ledger). Prices come from ``l2cache_ops.cost``, the one place they are defined.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_gcp as gcp
from children import COMPONENT_TYPE, child_opts
from config import StackConfig

from l2cache_ops.cost import PRICES
from l2cache_ops.slo import SloTargets

RUN = 'resource.type="cloud_run_revision"'
FN = 'resource.label."service_name"'
USER = "logging.googleapis.com/user/"

# One object of the dashboard's JSON (a tile, a chart, a data set, a threshold): built
# here only to be serialized by dashboard_json, so its values are any JSON value.
JsonObject = dict[str, object]


def _labels(
    *names: str,
) -> tuple[list[gcp.logging.MetricMetricDescriptorLabelArgs], dict[str, str]]:
    """The metric's label descriptors, and how each label is read from the log line."""
    descriptors = [
        gcp.logging.MetricMetricDescriptorLabelArgs(key=n, value_type="STRING") for n in names
    ]
    return descriptors, {n: f"EXTRACT(jsonPayload.{n})" for n in names}


def _seconds_buckets() -> gcp.logging.MetricBucketOptionsArgs:
    # 0.01 s .. ~5.8 h in 26 doubling buckets: covers a lookup and a slow chunk alike
    return gcp.logging.MetricBucketOptionsArgs(
        exponential_buckets=gcp.logging.MetricBucketOptionsExponentialBucketsArgs(
            num_finite_buckets=26, growth_factor=2, scale=0.01
        )
    )


# name -> (description, filter on the structured line, labels, value field or None)
LOG_METRICS: dict[str, tuple[str, str, tuple[str, ...], str | None]] = {
    "l2cache_chunks": (
        "chunk attempts by outcome (done / failed / retrying / skipped)",
        'jsonPayload.l2cache="chunk"',
        ("status", "dataset"),
        None,
    ),
    "l2cache_chunk_seconds": (
        "compute seconds of each chunk done",
        'jsonPayload.l2cache="chunk" AND jsonPayload.status="done"',
        ("dataset",),
        "duration_s",
    ),
    "l2cache_chunk_attempts": (
        "attempt number of each chunk that finished (more than 1 = retried)",
        'jsonPayload.l2cache="chunk" AND jsonPayload.status=("done" OR "failed")',
        ("dataset",),
        "attempts",
    ),
    "l2cache_edit_latency": (
        "edit-to-available seconds: values written minus PCG's publish time",
        'jsonPayload.l2cache="event" AND jsonPayload.latency_s>=0',
        ("dataset",),
        "latency_s",
    ),
    "l2cache_events": (
        "edit and missing-id deliveries by outcome",
        'jsonPayload.l2cache="event"',
        ("status", "dataset"),
        None,
    ),
    "l2cache_lookups": (
        "lookup requests by outcome",
        'jsonPayload.l2cache="lookup"',
        ("status", "dataset"),
        None,
    ),
}


def log_metrics(cfg: StackConfig, parent: pulumi.Resource) -> dict[str, gcp.logging.Metric]:
    """One log-based metric per entry of LOG_METRICS (counters, or distributions): the
    dashboard charts metrics, not log lines, so each SLO panel needs one."""
    out: dict[str, gcp.logging.Metric] = {}
    for name, (description, flt, labels, value) in LOG_METRICS.items():
        descriptors, extractors = _labels(*labels)
        out[name] = gcp.logging.Metric(
            name,
            name=name,
            project=cfg.project,
            description=description,
            filter=f"{RUN} AND {flt}",
            metric_descriptor=gcp.logging.MetricMetricDescriptorArgs(
                metric_kind="DELTA",
                value_type="DISTRIBUTION" if value is not None else "INT64",
                unit="s" if value in ("duration_s", "latency_s") else "1",
                labels=descriptors,
                display_name=name,
            ),
            label_extractors=extractors,
            # with a value field, a distribution of it; without (None: unset), a line count
            value_extractor=None if value is None else f"EXTRACT(jsonPayload.{value})",
            bucket_options=None if value is None else _seconds_buckets(),
            opts=child_opts(parent),
        )
    return out


def slo_targets(cfg: StackConfig) -> SloTargets:
    """The dataset map's top-level ``slo:`` targets (what the panels' thresholds show)."""
    return SloTargets.from_mapping(cfg.datasets.get("slo") or {})


def _series(
    filter_: str, aligner: str, reducer: str, group_by: list[str] | None, legend: str = ""
) -> JsonObject:
    """One line of a chart: the time series of ``filter_``, aligned per minute."""
    return {
        "timeSeriesQuery": {
            "timeSeriesFilter": {
                "filter": filter_,
                "aggregation": {
                    "alignmentPeriod": "60s",
                    "perSeriesAligner": aligner,
                    "crossSeriesReducer": reducer,
                    "groupByFields": group_by or [],
                },
            }
        },
        "plotType": "LINE",
        "legendTemplate": legend,
    }


def _chart(
    title: str,
    filter_: str,
    aligner: str = "ALIGN_RATE",
    reducer: str = "REDUCE_SUM",
    group_by: list[str] | None = None,
    thresholds: list[JsonObject] | None = None,
    extra: list[JsonObject] | None = None,
) -> JsonObject:
    """A line chart tile of ``filter_``, with more series (``extra``) and SLO lines."""
    chart: JsonObject = {"dataSets": [_series(filter_, aligner, reducer, group_by), *(extra or [])]}
    if thresholds:
        chart["thresholds"] = thresholds
    return {"title": title, "xyChart": chart}


def _threshold(value: float | None, label: str, direction: str = "ABOVE") -> list[JsonObject]:
    """A target drawn on a chart; none when the dataset map sets no such target."""
    if value is None:
        return []
    return [{"value": float(value), "label": label, "color": "RED", "direction": direction}]


def _target(value: float | None, unit: str) -> str:
    """A target as a panel title shows it."""
    return "no target" if value is None else f"{value:g} {unit}".strip()


def slo_tiles(t: SloTargets) -> list[JsonObject]:
    """The SLO panels, from the structured logs, with the map's targets as thresholds."""
    chunks = f'metric.type="{USER}l2cache_chunks"'
    p50 = "ALIGN_PERCENTILE_50"
    per_s = None if t.throughput_chunks_per_h is None else t.throughput_chunks_per_h / 3600
    latency = f'metric.type="{USER}l2cache_edit_latency"'
    return [
        _chart(
            f"SLO throughput: chunks done per second "
            f"(target >= {_target(t.throughput_chunks_per_h, 'chunks/h')})",
            f'{chunks} AND metric.label."status"="done"',
            thresholds=_threshold(per_s, "throughput target", "BELOW"),
        ),
        _chart(
            f"SLO failures and retries: chunk attempts by outcome (failure rate <= "
            f"{_target(t.max_failure_rate, '')}, retry rate <= {_target(t.max_retry_rate, '')})",
            chunks,
            group_by=['metric.label."status"'],
        ),
        _chart(
            "SLO retries: attempt number of finished chunks (p95; 1 = no retry)",
            f'metric.type="{USER}l2cache_chunk_attempts"',
            aligner="ALIGN_PERCENTILE_95",
            reducer="REDUCE_MAX",
        ),
        _chart(
            f"SLO edit-to-available p50 / p95 (s) (targets {_target(t.edit_p50_s, 's')} / "
            f"{_target(t.edit_p95_s, 's')})",
            latency,
            aligner="ALIGN_PERCENTILE_95",
            reducer="REDUCE_MAX",
            thresholds=_threshold(t.edit_p95_s, "p95 target")
            + _threshold(t.edit_p50_s, "p50 target"),
            extra=[_series(latency, p50, "REDUCE_MAX", None, "p50")],
        ),
        _chart(
            "compute seconds per chunk (p50, from the chunk lines)",
            f'metric.type="{USER}l2cache_chunk_seconds"',
            aligner=p50,
            reducer="REDUCE_MAX",
        ),
        _chart(
            "edits and missing ids by outcome",
            f'metric.type="{USER}l2cache_events"',
            group_by=['metric.label."status"'],
        ),
        _chart(
            "lookups by outcome",
            f'metric.type="{USER}l2cache_lookups"',
            group_by=['metric.label."status"'],
        ),
        {
            "title": "SLOs measured from the runs ledger",
            "text": {
                "format": "MARKDOWN",
                "content": (
                    "Per run, from the runs ledger (`l2cache status DATASET RUN`, "
                    "`l2cache dashboard DATASET`):\n\n"
                    f"- time to recover a failed chunk: target {_target(t.max_recover_s, 's')}\n"
                    f"- QC pass: {'required' if t.qc_pass else 'no target'}\n"
                    f"- cost envelope: {_target(t.max_usd_per_mm3, 'USD per mm^3')}\n\n"
                    f"Prices (l2cache_ops.cost): ${PRICES.gib_second}/GiB-s, "
                    f"${PRICES.vcpu_second}/vCPU-s, ${PRICES.bigtable_node_hour}/Bigtable node-hour, "
                    f"${PRICES.storage_gib_month}/GiB-month stored, ${PRICES.task}/task."
                ),
            },
        },
    ]


def dashboard_json(cfg: StackConfig) -> str:
    """The dashboard as Cloud Monitoring takes it: the SLO panels first, then what
    explains them (requests, queue, latency, dead letters, cost), as one JSON text with
    sorted keys, so the same tiles always give the same text."""
    tiles = [
        *slo_tiles(slo_targets(cfg)),
        _chart(
            "compute_chunk requests/s",
            f'{RUN} AND {FN}="l2cache-compute-chunk" AND metric.type="run.googleapis.com/request_count"',
            group_by=["metric.label.response_code_class"],
        ),
        _chart(
            "Cloud Tasks attempts by response (failures and retries)",
            'resource.type="cloud_tasks_queue" AND metric.type="cloudtasks.googleapis.com/queue/task_attempt_count"',
            group_by=["metric.label.response_code"],
        ),
        _chart(
            "Cloud Tasks queue depth",
            'resource.type="cloud_tasks_queue" AND metric.type="cloudtasks.googleapis.com/queue/depth"',
            aligner="ALIGN_MEAN",
        ),
        _chart(
            "lookup latency p95 (ms)",
            f'{RUN} AND {FN}="l2cache-lookup" AND metric.type="run.googleapis.com/request_latencies"',
            aligner="ALIGN_PERCENTILE_95",
            reducer="REDUCE_MAX",
        ),
        _chart(
            "dead-lettered messages",
            'resource.type="pubsub_topic" AND metric.type="pubsub.googleapis.com/topic/send_message_operation_count" AND resource.label."topic_id"="l2cache-dead-letter"',
        ),
        _chart(
            f"estimated compute cost: billable instance seconds x (GiB x ${PRICES.gib_second}"
            f" + vCPU x ${PRICES.vcpu_second}) per s",
            f'{RUN} AND metric.type="run.googleapis.com/container/billable_instance_time"',
            group_by=[FN],
        ),
    ]
    layout = {"displayName": "l2cache", "gridLayout": {"columns": "2", "widgets": tiles}}
    return json.dumps(layout, sort_keys=True)


class Monitoring(pulumi.ComponentResource):
    """The log-based metrics, then the dashboard that charts them (it depends on them:
    a chart of a user metric that does not exist yet shows nothing). The program
    declares no alert policies yet; they would belong here, on the same metrics."""

    metrics: dict[str, gcp.logging.Metric]
    dashboard: gcp.monitoring.Dashboard

    def __init__(
        self, name: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(COMPONENT_TYPE.format("Monitoring"), name, None, opts)
        self.metrics = log_metrics(cfg, self)
        self.dashboard = gcp.monitoring.Dashboard(
            "dashboard",
            dashboard_json=dashboard_json(cfg),
            project=cfg.project,
            opts=child_opts(self, depends_on=list(self.metrics.values())),
        )
        self.register_outputs(
            {
                "dashboard": self.dashboard.id,
                "log_metrics": [m.name for m in self.metrics.values()],
            }
        )
