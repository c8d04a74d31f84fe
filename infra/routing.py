"""Reach: lookup behind the CAVE deployment's ``/l2cache`` path.

``CAVEclient(datastack)`` calls ``<datastack local_server>/l2cache/api/v1/...``, so the
lookup function has to answer under that host. Two ways, both optional:

- ``l2cache:lookupBackend: true``: a serverless NEG on lookup's Cloud Run service and a
  global backend service on it. The operator's existing HTTPS load balancer routes
  ``/l2cache/*`` to that backend (outputs ``lookup_backend_service`` and
  ``url_map_commands``: the exact gcloud lines). The LB passes the path through
  unchanged, and lookup serves ``/l2cache/api/v1/...`` itself.
- ``l2cache:lookupDomain: l2cache.example.org``: additionally a standalone global HTTPS
  load balancer for that domain (global address, Google-managed certificate, URL map
  with ``/l2cache/*`` -> the backend, target HTTPS proxy, forwarding rule on 443); the
  operator points the domain's DNS A record at output ``lookup_lb_ip``.

``l2cache:loadBalancingScheme`` must match the operator's LB: ``EXTERNAL_MANAGED``
(global external Application LB, the default) or ``EXTERNAL`` (classic). Behind an LB
lookup's ingress becomes ``ALLOW_INTERNAL_AND_GCLB`` (config.StackConfig.ingress), so
its ``run.app`` URL no longer answers from the internet.

Every resource here is a child of the Lookup component (``parent``): reach is part of
how lookup is served, next to its ingress and invokers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pulumi
import pulumi_gcp as gcp
from children import child_opts
from config import StackConfig

PATH_PREFIX = "/l2cache"
PATH_RULE = f"{PATH_PREFIX}/*"
PATH_MATCHER = "l2cache"
BACKEND_NAME = "l2cache-lookup-backend"


def url_map_commands(url_map: str, backend: str) -> str:
    """The gcloud lines that route ``/l2cache/*`` on an existing global URL map.

    ``add-path-matcher --existing-host`` would replace the host's current path matcher
    (dropping its rules), so a host that already has one gets its map edited instead.
    """
    return "\n".join(
        [
            "# host with no path matcher of its own yet (CAVE_HOST, its current default "
            "service DEFAULT_SERVICE):",
            f"gcloud compute url-maps add-path-matcher {url_map} --global "
            f"--path-matcher-name={PATH_MATCHER} --default-service=DEFAULT_SERVICE "
            f"--path-rules='{PATH_RULE}={backend}' --new-hosts=CAVE_HOST",
            "# host that already has a path matcher: add one path rule to it",
            f"gcloud compute url-maps export {url_map} --global --destination=url-map.yaml",
            f"#   under that pathMatcher's pathRules add:  - paths: ['{PATH_RULE}']",
            f"#                                            service: {backend}",
            f"gcloud compute url-maps import {url_map} --global --source=url-map.yaml",
            "# rollback: remove that path rule (or path matcher) the same way",
        ]
    )


@dataclass(frozen=True)
class LoadBalancer:
    """Our standalone HTTPS load balancer for ``l2cache:lookupDomain``."""

    address: gcp.compute.GlobalAddress
    cert: gcp.compute.ManagedSslCertificate
    url_map: gcp.compute.URLMap
    proxy: gcp.compute.TargetHttpsProxy
    rule: gcp.compute.GlobalForwardingRule


@dataclass(frozen=True)
class Reach:
    """Lookup behind a load balancer: the backend an LB routes ``/l2cache/*`` to, the
    gcloud lines for the operator's URL map, and our own LB if a domain is set."""

    neg: gcp.compute.RegionNetworkEndpointGroup
    backend: gcp.compute.BackendService
    commands: pulumi.Output[str]
    lb: LoadBalancer | None = None


def lookup_backend(
    cfg: StackConfig, lookup_fn: gcp.cloudfunctionsv2.Function, parent: pulumi.Resource
) -> Reach:
    """Serverless NEG on lookup's Cloud Run service + the backend service on it: what a
    URL map can route ``/l2cache/*`` to, ours or the operator's."""
    neg = gcp.compute.RegionNetworkEndpointGroup(
        "lookup-neg",
        name="l2cache-lookup-neg",
        region=cfg.region,
        project=cfg.project,
        network_endpoint_type="SERVERLESS",
        # a gen2 function runs as the Cloud Run service of the same name
        cloud_run={"service": lookup_fn.name},
        opts=child_opts(parent),
    )
    backend = gcp.compute.BackendService(
        "lookup-backend",
        name=BACKEND_NAME,
        project=cfg.project,
        protocol="HTTPS",
        load_balancing_scheme=cfg.lb_scheme,
        # serverless NEGs take no health check, port or timeout: Cloud Run owns those
        backends=[{"group": neg.id}],
        log_config={"enable": True, "sample_rate": 1.0},
        opts=child_opts(parent),
    )
    commands = backend.self_link.apply(
        lambda link: url_map_commands(cfg.url_map or "CAVE_URL_MAP", link)
    )
    return Reach(neg=neg, backend=backend, commands=commands)


def standalone_lb(
    cfg: StackConfig, backend: gcp.compute.BackendService, parent: pulumi.Resource
) -> LoadBalancer:
    """A global HTTPS load balancer of our own for ``cfg.lookup_domain``."""
    domain = cfg.lookup_domain
    address = gcp.compute.GlobalAddress(
        "lookup-ip", name="l2cache-lookup-ip", project=cfg.project, opts=child_opts(parent)
    )
    cert = gcp.compute.ManagedSslCertificate(
        "lookup-cert",
        name="l2cache-lookup-cert",
        project=cfg.project,
        managed={"domains": [domain]},
        opts=child_opts(parent),
    )
    url_map = gcp.compute.URLMap(
        "lookup-url-map",
        name="l2cache-lookup",
        project=cfg.project,
        default_service=backend.id,  # other paths reach lookup too and get its 404
        host_rules=[{"hosts": [domain], "path_matcher": PATH_MATCHER}],
        path_matchers=[
            {
                "name": PATH_MATCHER,
                "default_service": backend.id,
                "path_rules": [{"paths": [PATH_RULE], "service": backend.id}],
            }
        ],
        opts=child_opts(parent),
    )
    proxy = gcp.compute.TargetHttpsProxy(
        "lookup-https-proxy",
        name="l2cache-lookup-https",
        project=cfg.project,
        url_map=url_map.id,
        ssl_certificates=[cert.id],
        opts=child_opts(parent),
    )
    rule = gcp.compute.GlobalForwardingRule(
        "lookup-https",
        name="l2cache-lookup-https",
        project=cfg.project,
        target=proxy.id,
        ip_address=address.id,
        ip_protocol="TCP",
        port_range="443",
        load_balancing_scheme=cfg.lb_scheme,
        opts=child_opts(parent),
    )
    return LoadBalancer(address=address, cert=cert, url_map=url_map, proxy=proxy, rule=rule)


def build(
    cfg: StackConfig, lookup_fn: gcp.cloudfunctionsv2.Function, parent: pulumi.Resource
) -> Reach | None:
    """Whatever routing the config asks for; None when lookup is reached directly."""
    if not cfg.routed:
        return None
    reach = lookup_backend(cfg, lookup_fn, parent)
    if cfg.lookup_domain:
        reach = replace(reach, lb=standalone_lb(cfg, reach.backend, parent))
    return reach
