"""The three gen2 Cloud Functions, their deploy archives and who may invoke them."""

from __future__ import annotations

from pathlib import Path

import pulumi
import pulumi_gcp as gcp
from archive import build_archive
from config import StackConfig, worker_memory_mib, worker_timeout_s

RUNTIME = "python311"
BUILD_DIR = Path(__file__).parent / ".build"


def upload(name: str, cfg: StackConfig, bucket) -> gcp.storage.BucketObject:
    path, digest = build_archive(name, cfg.datasets_file, BUILD_DIR)
    return gcp.storage.BucketObject(
        f"src-{name}",
        bucket=bucket.name,
        name=f"functions/{name}-{digest[:16]}.zip",  # content-addressed: new hash, new deploy
        source=pulumi.FileAsset(str(path)),
    )


def function(
    name: str,
    cfg: StackConfig,
    obj,
    sa,
    memory_mib: int,
    timeout_s: int,
    max_instances: int,
    concurrency: int,
    env: dict,
) -> gcp.cloudfunctionsv2.Function:
    return gcp.cloudfunctionsv2.Function(
        f"fn-{name}",
        name=f"l2cache-{name.replace('_', '-')}",
        location=cfg.region,
        project=cfg.project,
        build_config={
            "runtime": RUNTIME,
            "entry_point": name,
            "source": {"storage_source": {"bucket": obj.bucket, "object": obj.name}},
        },
        service_config={
            "available_memory": f"{memory_mib}Mi",
            "available_cpu": "1" if memory_mib <= 4096 else "2",
            "timeout_seconds": timeout_s,
            "max_instance_count": max_instances,
            "max_instance_request_concurrency": concurrency,
            "service_account_email": sa.email,
            "ingress_settings": "ALLOW_ALL",
            "environment_variables": env,
        },
    )


def invoker(
    name: str, fn: gcp.cloudfunctionsv2.Function, cfg: StackConfig, member, suffix: str = ""
) -> None:
    """Grant Cloud Run invoke on a gen2 function's service to exactly ``member``."""
    return gcp.cloudrunv2.ServiceIamMember(
        f"invoke-{name}{suffix}",
        name=fn.name,
        location=cfg.region,
        project=cfg.project,
        role="roles/run.invoker",
        member=member,
    )


def deploy(cfg: StackConfig, bucket, accounts: dict, member) -> dict:
    revision = pulumi.get_stack()
    env = {
        "L2CACHE_CONFIG": "/workspace/datasets.yaml",
        "L2CACHE_REVISION": revision,
        "NUMBA_CACHE_DIR": "/tmp/numba",
    }
    worker_mem = worker_memory_mib(cfg.chunk_size)
    worker_timeout = worker_timeout_s(cfg.chunk_size)
    fns = {
        "lookup": function(
            "lookup",
            cfg,
            upload("lookup", cfg, bucket),
            accounts["lookup"],
            1024,
            120,
            cfg.lookup_max_instances,
            8,
            env,
        ),
        # one chunk per instance at a time: memory is sized for exactly one chunk
        "compute_chunk": function(
            "compute_chunk",
            cfg,
            upload("compute_chunk", cfg, bucket),
            accounts["worker"],
            worker_mem,
            worker_timeout,
            cfg.worker_max_instances,
            1,
            env,
        ),
        "on_edit": function(
            "on_edit",
            cfg,
            upload("on_edit", cfg, bucket),
            accounts["worker"],
            worker_mem,
            min(worker_timeout, 540),
            cfg.worker_max_instances,
            1,
            env,
        ),
    }
    invokers = [
        invoker("compute_chunk", fns["compute_chunk"], cfg, member(accounts["tasks-invoker"])),
        invoker("on_edit", fns["on_edit"], cfg, member(accounts["pubsub-push"])),
    ]
    for i, who in enumerate(cfg.lookup_invokers):  # from config; allUsers only if listed
        invokers.append(invoker("lookup", fns["lookup"], cfg, who, suffix=f"-{i}"))
    return fns, invokers
