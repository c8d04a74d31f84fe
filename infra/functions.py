"""The three gen2 Cloud Functions, their deploy archives and who may invoke them.

compute_chunk and on_edit are Cloud Run IAM only, always: exactly the tasks-invoker
and the push identity. lookup depends on where the user check happens:

- CAVE auth configured (the dataset map's ``auth:`` section): the app
  checks every request's CAVE token with middle-auth-client, so Cloud Run lets every
  request through (``allUsers`` invoker). Cloud Run IAM accepts only Google identity
  tokens, which caveclient does not send; IAM in front would refuse every CAVE user.
- otherwise: IAM only, the configured ``l2cache:lookupInvokers`` and nobody else
  (``allUsers`` only if listed).
"""

from __future__ import annotations

from pathlib import Path

import pulumi
import pulumi_gcp as gcp
import sizing
from archive import build_archive
from config import StackConfig

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
    ingress: str = "ALLOW_ALL",
    secrets: list[dict] | None = None,
    depends_on: list | None = None,
) -> gcp.cloudfunctionsv2.Function:
    service = {
        "available_memory": f"{memory_mib}Mi",
        "available_cpu": sizing.cpu_for_memory(memory_mib),
        "timeout_seconds": timeout_s,
        "max_instance_count": max_instances,
        "max_instance_request_concurrency": concurrency,
        "service_account_email": sa.email,
        "ingress_settings": ingress,
        "environment_variables": env,
    }
    if secrets:
        service["secret_environment_variables"] = secrets
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
        service_config=service,
        opts=pulumi.ResourceOptions(depends_on=depends_on or []),
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


def lookup_invokers(cfg: StackConfig) -> list[str]:
    """Who Cloud Run lets call lookup (see the module docstring)."""
    if cfg.cave_auth:
        if cfg.lookup_invokers:
            pulumi.log.info(
                "CAVE auth is on: lookup is invocable by allUsers and the app checks tokens; "
                "l2cache:lookupInvokers is not used"
            )
        return ["allUsers"]
    if cfg.routed and "allUsers" not in cfg.lookup_invokers:
        pulumi.log.warn(
            "lookup is behind a load balancer without CAVE auth: only callers sending a "
            "Google identity token of a lookupInvokers member get through (caveclient does not)"
        )
    return list(cfg.lookup_invokers)


def auth_token_access(cfg: StackConfig, lookup_sa, member) -> list:
    """Lookup may read the operator's CAVE service token secret (``AUTH_TOKEN``, what the
    existing service uses to ask the auth service which dataset a table belongs to).
    The secret itself is the operator's: a credential never passes through this program."""
    if not cfg.auth_token_secret:
        return []
    return [
        gcp.secretmanager.SecretIamMember(
            "lookup-reads-auth-token",
            secret_id=cfg.auth_token_secret,
            project=cfg.project,
            role="roles/secretmanager.secretAccessor",
            member=member(lookup_sa),
        )
    ]


def lookup_secrets(cfg: StackConfig) -> list[dict]:
    if not cfg.auth_token_secret:
        return []
    return [
        {
            "key": "AUTH_TOKEN",
            "project_id": cfg.project,
            "secret": cfg.auth_token_secret,
            "version": "latest",
        }
    ]


SOURCE_DIR = "/workspace"  # where Cloud Functions gen2 puts the unpacked archive
WRITABLE_DIR = "/tmp"  # the only writable path of the function's filesystem


def function_env() -> dict[str, str]:
    """The environment every function runs with (plain values, no Pulumi resources, so
    the deployed-mode test runs the archives with exactly this).

    Only /tmp is writable in Cloud Functions: everything a library writes at import or
    at run time is pointed there. CloudVolume (and cloud-files, which reads the same
    variable) creates ``$CLOUD_VOLUME_DIR`` (default ``~/.cloudvolume``) at import, and a
    read-only home fails it with EROFS; numba writes the feature kernels' compiled cache
    to ``NUMBA_CACHE_DIR``. The code revision is not here: it is in the archive
    (``l2cache/REVISION``), written by the archive builder from git.
    """
    return {
        "L2CACHE_CONFIG": f"{SOURCE_DIR}/datasets.yaml",
        "NUMBA_CACHE_DIR": f"{WRITABLE_DIR}/numba",
        "CLOUD_VOLUME_DIR": f"{WRITABLE_DIR}/cloudvolume",
    }


def deploy(cfg: StackConfig, bucket, accounts: dict, member) -> tuple[dict, list]:
    env = function_env()
    token_access = auth_token_access(cfg, accounts["lookup"], member)  # before the deploy
    # on_edit reads one chunk at a time; compute_chunk may read the next one ahead
    worker_mem = sizing.worker_memory_mib(cfg.chunk_size)
    compute_mem = sizing.worker_memory_mib(cfg.chunk_size, cfg.map_read_ahead)
    worker_timeout = sizing.worker_timeout_s(cfg.chunk_size, cfg.chunks_per_task)
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
            ingress=cfg.ingress,
            secrets=lookup_secrets(cfg),
            depends_on=token_access,
        ),
        # one chunk per instance at a time: memory is sized for exactly one chunk
        "compute_chunk": function(
            "compute_chunk",
            cfg,
            upload("compute_chunk", cfg, bucket),
            accounts["worker"],
            compute_mem,
            worker_timeout,
            cfg.worker_max_instances,
            sizing.WORKER_REQUESTS_PER_INSTANCE,
            env,
        ),
        "on_edit": function(
            "on_edit",
            cfg,
            upload("on_edit", cfg, bucket),
            accounts["worker"],
            worker_mem,
            sizing.on_edit_timeout_s(cfg.chunk_size, cfg.chunks_per_task),
            cfg.worker_max_instances,
            sizing.WORKER_REQUESTS_PER_INSTANCE,
            env,
        ),
    }
    invokers = [
        invoker("compute_chunk", fns["compute_chunk"], cfg, member(accounts["tasks-invoker"])),
        invoker("on_edit", fns["on_edit"], cfg, member(accounts["pubsub-push"])),
    ]
    for i, who in enumerate(lookup_invokers(cfg)):
        invokers.append(invoker("lookup", fns["lookup"], cfg, who, suffix=f"-{i}"))
    return fns, invokers + token_access
