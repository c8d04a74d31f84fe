"""One Cloud Monitoring dashboard: throughput, failures/retries, lookup latency, cost."""

from __future__ import annotations

import json

import pulumi_gcp as gcp
from config import StackConfig

# list prices used for the estimate panel (USD): keep in line with l2cache.status
PRICE_GIB_SECOND = 0.0000025
PRICE_VCPU_SECOND = 0.000024


def _chart(
    title: str,
    filter_: str,
    aligner: str = "ALIGN_RATE",
    reducer: str = "REDUCE_SUM",
    group_by: list[str] | None = None,
) -> dict:
    return {
        "title": title,
        "xyChart": {
            "dataSets": [
                {
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
                }
            ]
        },
    }


def dashboard_json(cfg: StackConfig) -> str:
    run = 'resource.type="cloud_run_revision"'
    fn = 'resource.label."service_name"'
    tiles = [
        _chart(
            "compute_chunk requests/s (throughput)",
            f'{run} AND {fn}="l2cache-compute-chunk" AND metric.type="run.googleapis.com/request_count"',
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
            f'{run} AND {fn}="l2cache-lookup" AND metric.type="run.googleapis.com/request_latencies"',
            aligner="ALIGN_PERCENTILE_95",
            reducer="REDUCE_MAX",
        ),
        _chart(
            "dead-lettered messages",
            'resource.type="pubsub_topic" AND metric.type="pubsub.googleapis.com/topic/send_message_operation_count" AND resource.label."topic_id"="l2cache-dead-letter"',
        ),
        _chart(
            f"estimated compute cost: billable instance seconds x (GiB x ${PRICE_GIB_SECOND}"
            f" + ${PRICE_VCPU_SECOND}) per s",
            f'{run} AND metric.type="run.googleapis.com/container/billable_instance_time"',
            group_by=[fn],
        ),
    ]
    layout = {"displayName": "l2cache", "gridLayout": {"columns": "2", "widgets": tiles}}
    return json.dumps(layout, sort_keys=True)


def dashboard(cfg: StackConfig) -> gcp.monitoring.Dashboard:
    return gcp.monitoring.Dashboard(
        "dashboard", dashboard_json=dashboard_json(cfg), project=cfg.project
    )
