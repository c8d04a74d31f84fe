"""The program under other stack configs: CAVE auth, routing, existing tables, no edits topic.

Each variant is built in a fresh process (harness.py as a script): Pulumi registers one
resource per name and stack, so two builds cannot share a process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import DATASETS_YAML

HARNESS = Path(__file__).with_name("harness.py")
INVOKE = "gcp:cloudrunv2/serviceIamMember:ServiceIamMember"
FUNCTION = "gcp:cloudfunctionsv2/function:Function"
NEG = "gcp:compute/regionNetworkEndpointGroup:RegionNetworkEndpointGroup"
BACKEND = "gcp:compute/backendService:BackendService"
LB_TYPES = {
    "gcp:compute/globalAddress:GlobalAddress",
    "gcp:compute/managedSslCertificate:ManagedSslCertificate",
    "gcp:compute/uRLMap:URLMap",
    "gcp:compute/targetHttpsProxy:TargetHttpsProxy",
    "gcp:compute/globalForwardingRule:GlobalForwardingRule",
}
TASKS = "serviceAccount:l2cache-tasks-invoker@proj.iam.gserviceaccount.com"
PUSH = "serviceAccount:l2cache-pubsub-push@proj.iam.gserviceaccount.com"
BACKEND_ID = "projects/proj/global/backendServices/l2cache-lookup-backend"
NEG_ID = "projects/proj/regions/us-east1/networkEndpointGroups/l2cache-lookup-neg"
AUTH_SECTION = "auth: {url: auth.example.org/auth, service_namespace: pychunkedgraph}\n"


class Built:
    """The resources one variant registered, by type."""

    def __init__(self, rows: list[dict]) -> None:
        extra = ("output", "registered_outputs")
        self.rows = [r for r in rows if r["type"] not in extra]
        self.outputs = {r["name"]: r["inputs"] for r in rows if r["type"] == "output"}
        # component type token -> the outputs it registered
        self.registered = {
            r["name"]: r["inputs"] for r in rows if r["type"] == "registered_outputs"
        }

    def of(self, typ: str) -> list[dict]:
        return [r for r in self.rows if r["type"] == typ]

    def one(self, typ: str) -> dict:
        (row,) = self.of(typ)
        return row["inputs"]

    def invokers(self, fn: str) -> list[str]:
        return sorted(
            r["inputs"]["member"] for r in self.of(INVOKE) if r["name"].startswith(f"invoke-{fn}")
        )

    def parents(self, types: set[str]) -> set[str]:
        """The parents ("<type token>::<name>") of every resource of these types."""
        return {r["parent"] for r in self.rows if r["type"] in types}

    def service_config(self, name: str) -> dict:
        (fn,) = [r for r in self.of(FUNCTION) if r["inputs"]["name"] == name]
        return fn["inputs"]["serviceConfig"]


def build(**overrides) -> Built:
    out = subprocess.run(
        [sys.executable, str(HARNESS), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return Built(rows)


def assert_workers_iam_only(b: Built) -> None:
    assert b.invokers("compute_chunk") == [TASKS]
    assert b.invokers("on_edit") == [PUSH]
    for name in ("l2cache-compute-chunk", "l2cache-on-edit"):
        assert b.service_config(name)["ingressSettings"] == "ALLOW_ALL"


@pytest.fixture(scope="module")
def cave_auth_with_domain() -> Built:
    """CAVE auth from the dataset map's auth section; a standalone LB for a domain."""
    return build(datasets_yaml=AUTH_SECTION + DATASETS_YAML, lookup_domain="l2.example.org")


def test_cave_auth_lets_every_request_reach_lookup_and_only_lookup(cave_auth_with_domain):
    b = cave_auth_with_domain
    # the app checks the CAVE token; Cloud Run IAM would refuse caveclient's requests
    assert b.invokers("lookup") == ["allUsers"]
    assert_workers_iam_only(b)


def test_lookup_is_behind_a_serverless_neg_and_backend(cave_auth_with_domain):
    b = cave_auth_with_domain
    neg = b.one(NEG)
    assert neg["networkEndpointType"] == "SERVERLESS"
    assert neg["region"] == "us-east1"
    assert neg["cloudRun"] == {"service": "l2cache-lookup"}  # lookup's Cloud Run service
    backend = b.one(BACKEND)
    assert backend["protocol"] == "HTTPS"
    assert backend["loadBalancingScheme"] == "EXTERNAL_MANAGED"
    assert backend["backends"] == [{"group": NEG_ID}]
    assert b.service_config("l2cache-lookup")["ingressSettings"] == "ALLOW_INTERNAL_AND_GCLB"


def test_reach_belongs_to_the_lookup_component(cave_auth_with_domain):
    """The NEG, backend and our LB are children of Lookup (aliased to where they were
    at the stack root), and Lookup's outputs say how to reach it."""
    b = cave_auth_with_domain
    reach = {NEG, BACKEND} | LB_TYPES
    assert b.parents(reach) == {"l2cache:index:Lookup::lookup"}
    for r in b.rows:
        if r["type"] in reach:
            assert ["", "", True] in r["aliases"], r["name"]
    out = b.registered["l2cache:index:Lookup"]
    assert out["url"] == "https://l2cache-lookup-xyz.a.run.app"
    assert out["ingress"] == "ALLOW_INTERNAL_AND_GCLB"
    assert out["backend_service"] == f"https://www.googleapis.com/compute/v1/{BACKEND_ID}"
    assert out["lb_ip"] == "203.0.113.7"
    assert out["url_map_commands"] == b.outputs["url_map_commands"]
    assert "--path-rules='/l2cache/*=" in out["url_map_commands"]
    # allUsers is Lookup's grant, and Lookup's alone
    assert b.parents({INVOKE}) == {"l2cache:index:Lookup::lookup", "l2cache:index:Workers::workers"}
    (everyone,) = [r for r in b.of(INVOKE) if r["inputs"]["member"] == "allUsers"]
    assert everyone["parent"] == "l2cache:index:Lookup::lookup"


def test_standalone_lb_routes_l2cache_paths_for_the_domain(cave_auth_with_domain):
    b = cave_auth_with_domain
    assert {r["type"] for r in b.rows} >= LB_TYPES
    url_map = b.one("gcp:compute/uRLMap:URLMap")
    assert url_map["hostRules"] == [{"hosts": ["l2.example.org"], "pathMatcher": "l2cache"}]
    (matcher,) = url_map["pathMatchers"]
    assert matcher["name"] == "l2cache"
    assert matcher["pathRules"] == [{"paths": ["/l2cache/*"], "service": BACKEND_ID}]
    cert = b.one("gcp:compute/managedSslCertificate:ManagedSslCertificate")
    assert cert["managed"] == {"domains": ["l2.example.org"]}
    proxy = b.one("gcp:compute/targetHttpsProxy:TargetHttpsProxy")
    assert proxy["urlMap"] == "projects/proj/global/urlMaps/l2cache-lookup"
    assert proxy["sslCertificates"] == ["projects/proj/global/sslCertificates/l2cache-lookup-cert"]
    rule = b.one("gcp:compute/globalForwardingRule:GlobalForwardingRule")
    assert rule["portRange"] == "443"
    assert rule["target"] == "projects/proj/global/targetHttpsProxies/l2cache-lookup-https"
    assert rule["ipAddress"] == "projects/proj/global/addresses/l2cache-lookup-ip"
    assert rule["loadBalancingScheme"] == "EXTERNAL_MANAGED"


def test_cave_auth_with_service_token_and_backend_for_an_existing_lb():
    b = build(
        datasets_yaml=AUTH_SECTION + DATASETS_YAML,
        auth_token_secret="l2cache-auth-token",
        lookup_backend=True,
        lb_scheme="EXTERNAL",
        url_map="cave-https",
    )
    assert b.invokers("lookup") == ["allUsers"]
    assert_workers_iam_only(b)
    # the operator's secret reaches lookup as AUTH_TOKEN, and only lookup
    assert b.service_config("l2cache-lookup")["secretEnvironmentVariables"] == [
        {
            "key": "AUTH_TOKEN",
            "projectId": "proj",
            "secret": "l2cache-auth-token",
            "version": "latest",
        }
    ]
    for name in ("l2cache-compute-chunk", "l2cache-on-edit"):
        assert "secretEnvironmentVariables" not in b.service_config(name)
    access = b.one("gcp:secretmanager/secretIamMember:SecretIamMember")
    assert access["secretId"] == "l2cache-auth-token"
    assert access["role"] == "roles/secretmanager.secretAccessor"
    assert access["member"] == "serviceAccount:l2cache-lookup@proj.iam.gserviceaccount.com"
    # Lookup's grant, which its function waits for
    assert b.parents({"gcp:secretmanager/secretIamMember:SecretIamMember"}) == {
        "l2cache:index:Lookup::lookup"
    }
    assert not b.of("gcp:secretmanager/secret:Secret")  # the credential is never ours
    assert b.one(BACKEND)["loadBalancingScheme"] == "EXTERNAL"  # matches the operator's LB
    assert b.one(NEG)["cloudRun"] == {"service": "l2cache-lookup"}
    assert not [r for r in b.rows if r["type"] in LB_TYPES]  # no domain: no LB of ours
    commands = b.outputs["url_map_commands"]
    link = f"https://www.googleapis.com/compute/v1/{BACKEND_ID}"
    assert "gcloud compute url-maps add-path-matcher cave-https --global" in commands
    assert f"--path-rules='/l2cache/*={link}'" in commands
    assert "gcloud compute url-maps import cave-https --global" in commands


def test_without_cave_auth_lookup_is_iam_only_even_behind_an_lb():
    b = build(lookup_backend=True, lookup_invokers=["group:cave@example.org"])
    assert b.invokers("lookup") == ["group:cave@example.org"]
    assert "allUsers" not in {r["inputs"].get("member") for r in b.rows}
    assert_workers_iam_only(b)
    assert b.one(NEG)["cloudRun"] == {"service": "l2cache-lookup"}
    assert b.service_config("l2cache-lookup")["ingressSettings"] == "ALLOW_INTERNAL_AND_GCLB"


def test_without_cave_auth_allusers_only_when_listed():
    b = build(lookup_invokers=["allUsers"])
    assert b.invokers("lookup") == ["allUsers"]
    b = build(lookup_invokers=[])
    assert b.invokers("lookup") == []
    assert_workers_iam_only(b)


def test_read_ahead_in_the_dataset_map_sizes_the_workers_for_it():
    """One more chunk's read in flight in compute_chunk: ((14 + 8) B x 33.5 M voxels +
    300 MiB) x 1.25 = 1,255 -> 1,280 MiB (measured peak 822 MiB); on_edit reads one
    chunk at a time and keeps 1,024 MiB."""
    ahead = DATASETS_YAML.replace("max_attempts: 7}", "max_attempts: 7, read_ahead: true}")
    assert ahead != DATASETS_YAML
    b = build(datasets_yaml=ahead)
    assert b.service_config("l2cache-compute-chunk")["availableMemory"] == "1280Mi"
    assert b.service_config("l2cache-on-edit")["availableMemory"] == "1024Mi"


def test_existing_tables_and_instance_are_served_not_owned():
    marked = DATASETS_YAML.replace(
        "    cache_table_id: l2cache_minnie_v1\n",
        "    cache_table_id: l2cache_minnie_v1\n    existing_cache_table: true\n",
    )
    assert marked != DATASETS_YAML
    b = build(datasets_yaml=marked, existing_bigtable_instance=True, pcg_edits_topic=None)
    assert not b.of("gcp:bigtable/instance:Instance")
    tables = sorted(r["inputs"]["name"] for r in b.of("gcp:bigtable/table:Table"))
    assert tables == ["l2cache_lookup_guard", "l2cache_pinky_v1", "l2cache_runs"]  # ours
    assert all(r["inputs"]["instanceName"] == "l2cache" for r in b.of("gcp:bigtable/table:Table"))
    gc = {r["inputs"]["table"] for r in b.of("gcp:bigtable/gCPolicy:GCPolicy")}
    assert gc == {
        "l2cache_pinky_v1",
        "l2cache_lookup_guard",
        "l2cache_runs",  # its per-id index family (idx)
    }  # the existing table's GC rules stay as they are
    grants = {
        (r["name"], r["inputs"]["table"], r["inputs"]["role"])
        for r in b.of("gcp:bigtable/tableIamMember:TableIamMember")
    }
    assert ("lookup-reads-minnie", "l2cache_minnie_v1", "roles/bigtable.reader") in grants
    assert not [g for g in grants if g[0] == "worker-writes-minnie"]  # never written
    assert ("worker-writes-pinky", "l2cache_pinky_v1", "roles/bigtable.user") in grants
    # no edits topic configured: no edits subscription, and still no topic created for it
    subs = {r["name"] for r in b.of("gcp:pubsub/subscription:Subscription")}
    assert subs == {"push-missing", "dead-letter-inspect"}
    topics = sorted(r["inputs"]["name"] for r in b.of("gcp:pubsub/topic:Topic"))
    assert topics == ["l2cache-dead-letter", "l2cache-missing-ids"]
    # the components' outputs say the same: served, not owned; no edits topic
    store = b.registered["l2cache:index:Storage"]
    assert store["cache_tables"] == {"pinky": "l2cache_pinky_v1"}
    assert store["existing_cache_tables"] == {"minnie": "l2cache_minnie_v1"}
    assert store["instance_name"] == "l2cache"
    messaging = b.registered["l2cache:index:Messaging"]
    assert "edits_topic" not in messaging
    assert set(messaging["subscriptions"]) == {"missing", "dead_letter"}
    assert b.parents({"gcp:bigtable/tableIamMember:TableIamMember"}) == {
        "l2cache:index:Lookup::lookup",
        "l2cache:index:Workers::workers",
    }


def test_a_fallback_table_is_read_by_lookup_and_never_owned():
    """The switch-over: the new cache table is ours, the existing one only read."""
    switched = DATASETS_YAML.replace(
        "    cache_table_id: l2cache_minnie_v1\n",
        "    cache_table_id: l2cache_minnie_v2\n    fallback_table_id: pcgl2cache_minnie\n",
    )
    assert switched != DATASETS_YAML
    b = build(datasets_yaml=switched)
    tables = sorted(r["inputs"]["name"] for r in b.of("gcp:bigtable/table:Table"))
    assert "pcgl2cache_minnie" not in tables and "l2cache_minnie_v2" in tables
    gc = {r["inputs"]["table"] for r in b.of("gcp:bigtable/gCPolicy:GCPolicy")}
    assert "pcgl2cache_minnie" not in gc
    grants = {
        (r["name"], r["inputs"]["table"], r["inputs"]["role"])
        for r in b.of("gcp:bigtable/tableIamMember:TableIamMember")
        if r["inputs"]["table"] == "pcgl2cache_minnie"
    }
    assert grants == {
        ("lookup-reads-fallback-minnie", "pcgl2cache_minnie", "roles/bigtable.reader")
    }
    assert b.registered["l2cache:index:Storage"]["fallback_tables"] == {
        "minnie": "pcgl2cache_minnie"
    }


def test_existing_tables_from_the_stack_config_list():
    b = build(existing_cache_tables=["l2cache_minnie_v1", "l2cache_pinky_v1"])
    tables = [r["inputs"]["name"] for r in b.of("gcp:bigtable/table:Table")]
    assert tables == ["l2cache_runs", "l2cache_lookup_guard"]
    gc = {r["inputs"]["table"] for r in b.of("gcp:bigtable/gCPolicy:GCPolicy")}
    assert gc == {"l2cache_lookup_guard", "l2cache_runs"}  # the guard and the runs index only
    assert len(b.of("gcp:bigtable/instance:Instance")) == 1  # the instance is still ours
