"""Cloud Tasks: the client (real API or the local emulator) and HTTP task creation.

There is no official emulator variable, so ``L2CACHE_TASKS_EMULATOR_HOST`` selects
the local emulator (``l2cache.local.tasks_emulator``) over an insecure loopback
channel; otherwise the client uses the real API with default credentials. Tasks
carry a JSON body with an explicit Content-Type (without it the emulator delivers
form-encoded bodies) and, in the cloud, an OIDC token of the queue's service account.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grpc
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport
from google.protobuf import duration_pb2

from .config import TasksConfig

EMULATOR_ENV = "L2CACHE_TASKS_EMULATOR_HOST"


def tasks_client() -> tasks_v2.CloudTasksClient:
    host = os.environ.get(EMULATOR_ENV)
    if host:
        channel = grpc.insecure_channel(host)
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    return tasks_v2.CloudTasksClient()


def queue_path(client, cfg: TasksConfig) -> str:
    return client.queue_path(cfg.project, cfg.location, cfg.queue)


def ensure_queue(
    client,
    cfg: TasksConfig,
    max_attempts: int = 5,
    min_backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    max_concurrent: int = 2,
) -> None:
    """Create the queue with its retry and rate settings if it does not exist."""
    parent = f"projects/{cfg.project}/locations/{cfg.location}"
    name = queue_path(client, cfg)
    existing = {q.name for q in client.list_queues(parent=parent)}
    if name in existing:
        return
    client.create_queue(
        parent=parent,
        queue=tasks_v2.Queue(
            name=name,
            retry_config=tasks_v2.RetryConfig(
                max_attempts=max_attempts,
                min_backoff=duration_pb2.Duration(
                    seconds=int(min_backoff_s), nanos=int(min_backoff_s % 1 * 1e9)
                ),
                max_backoff=duration_pb2.Duration(seconds=int(max_backoff_s)),
            ),
            rate_limits=tasks_v2.RateLimits(max_concurrent_dispatches=max_concurrent),
        ),
    )


def enqueue(client, cfg: TasksConfig, payload: dict[str, Any]) -> str:
    """Create one HTTP POST task for the compute function; returns the task name."""
    http = tasks_v2.HttpRequest(
        http_method=tasks_v2.HttpMethod.POST,
        url=cfg.compute_url,
        headers={"Content-Type": "application/json"},
        body=json.dumps(payload, sort_keys=True).encode(),
    )
    if cfg.service_account_email:
        http.oidc_token = tasks_v2.OidcToken(service_account_email=cfg.service_account_email)
    task = client.create_task(parent=queue_path(client, cfg), task=tasks_v2.Task(http_request=http))
    return task.name
