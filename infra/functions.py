"""How a gen2 Cloud Function is declared: its deploy archive, its service, who may invoke it.

The Lookup and Workers components (lookup.py, workers.py) declare the three functions
with these helpers, as their children (each helper takes the child's ``opts``).

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

# one Secret Manager secret given to a function as an environment variable
SecretEnv = gcp.cloudfunctionsv2.FunctionServiceConfigSecretEnvironmentVariableArgsDict

RUNTIME = "python311"
BUILD_DIR = Path(__file__).parent / ".build"


def upload(
    name: str, cfg: StackConfig, bucket: gcp.storage.Bucket, opts: pulumi.ResourceOptions
) -> gcp.storage.BucketObject:
    """The function's deploy archive, uploaded under its content hash."""
    path, digest = build_archive(name, cfg.datasets_file, BUILD_DIR)
    return gcp.storage.BucketObject(
        f"src-{name}",
        bucket=bucket.name,
        name=f"functions/{name}-{digest[:16]}.zip",  # content-addressed: new hash, new deploy
        source=pulumi.FileAsset(str(path)),
        opts=opts,
    )


def function(
    name: str,
    cfg: StackConfig,
    obj: gcp.storage.BucketObject,
    sa: gcp.serviceaccount.Account,
    memory_mib: int,
    timeout_s: int,
    max_instances: int,
    concurrency: int,
    env: dict[str, str],
    opts: pulumi.ResourceOptions,
    ingress: str = "ALLOW_ALL",
    secrets: list[SecretEnv] | None = None,
) -> gcp.cloudfunctionsv2.Function:
    """A gen2 function running archive ``obj`` as ``sa``, sized by the caller: one
    declaration for all three, so runtime, CPU for memory and naming stay alike."""
    service: gcp.cloudfunctionsv2.FunctionServiceConfigArgsDict = {
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
        opts=opts,
    )


def invoker(
    name: str,
    fn: gcp.cloudfunctionsv2.Function,
    cfg: StackConfig,
    member: pulumi.Input[str],
    opts: pulumi.ResourceOptions,
    suffix: str = "",
) -> gcp.cloudrunv2.ServiceIamMember:
    """Grant Cloud Run invoke on a gen2 function's service to exactly ``member``: a gen2
    function is called through the Cloud Run service it runs as, so that is where IAM
    decides who gets in."""
    return gcp.cloudrunv2.ServiceIamMember(
        f"invoke-{name}{suffix}",
        name=fn.name,
        location=cfg.region,
        project=cfg.project,
        role="roles/run.invoker",
        member=member,
        opts=opts,
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


def lookup_secrets(cfg: StackConfig) -> list[SecretEnv]:
    """Lookup's secret environment: the operator's CAVE service token, if configured."""
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
