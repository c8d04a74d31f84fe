"""The Pulumi program under mocks: the resources and the properties that matter."""

from __future__ import annotations

import asyncio

import pulumi
import pytest

from .harness import (
    INFRA,
    MOCKS,
    MONITOR,
    PCG_EDITS,
    program,
    registered_outputs,
    settle,
    stack_config,
)

EMAIL = "{}@proj.iam.gserviceaccount.com"
WORKER = "serviceAccount:" + EMAIL.format("l2cache-worker")
LOOKUP = "serviceAccount:" + EMAIL.format("l2cache-lookup")
TASKS = "serviceAccount:" + EMAIL.format("l2cache-tasks-invoker")
PUSH = "serviceAccount:" + EMAIL.format("l2cache-pubsub-push")
PUBSUB_AGENT = "serviceAccount:service-123456789@gcp-sa-pubsub.iam.gserviceaccount.com"
# the log-based metrics, in the order Monitoring declares them
LOG_METRICS = (
    "l2cache_chunks",
    "l2cache_chunk_seconds",
    "l2cache_chunk_attempts",
    "l2cache_edit_latency",
    "l2cache_events",
    "l2cache_lookups",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = stack_config(tmp_path_factory.mktemp("infra"))
    return cfg, program.build(cfg)


def of_type(typ: str):
    return [r for r in MOCKS.resources if r.typ == typ]


def check(built, fn):
    """Run ``fn`` once every resource is registered (pulumi's mocks are asynchronous)."""
    _, res = built
    return settle(res).apply(lambda _: fn())


@pulumi.runtime.test
def test_iam_is_exactly_the_least_privilege_set(built):
    def verify():
        iam_types = (
            "gcp:bigtable/tableIamMember:TableIamMember",
            "gcp:bigtable/instanceIamMember:InstanceIamMember",
            "gcp:pubsub/topicIAMMember:TopicIAMMember",
            "gcp:pubsub/subscriptionIAMMember:SubscriptionIAMMember",
            "gcp:storage/bucketIAMMember:BucketIAMMember",
            "gcp:cloudtasks/queueIamMember:QueueIamMember",
            "gcp:serviceaccount/iAMMember:IAMMember",
            "gcp:cloudrunv2/serviceIamMember:ServiceIamMember",
        )
        grants = sorted(
            (r.typ.split(":")[-1], r.name, r.inputs["role"], r.inputs["member"])
            for r in MOCKS.resources
            if r.typ in iam_types
        )
        expected = sorted(
            [
                ("TableIamMember", "lookup-reads-minnie", "roles/bigtable.reader", LOOKUP),
                ("TableIamMember", "lookup-reads-pinky", "roles/bigtable.reader", LOOKUP),
                ("TableIamMember", "lookup-writes-guard", "roles/bigtable.user", LOOKUP),
                ("TableIamMember", "lookup-reads-runs", "roles/bigtable.reader", LOOKUP),
                ("InstanceIamMember", "lookup-reads-graph-0", "roles/bigtable.reader", LOOKUP),
                ("TableIamMember", "worker-writes-minnie", "roles/bigtable.user", WORKER),
                ("TableIamMember", "worker-writes-pinky", "roles/bigtable.user", WORKER),
                ("TableIamMember", "worker-writes-runs", "roles/bigtable.user", WORKER),
                ("InstanceIamMember", "worker-reads-graph-0", "roles/bigtable.reader", WORKER),
                ("TopicIAMMember", "lookup-publishes-missing", "roles/pubsub.publisher", LOOKUP),
                (
                    "TopicIAMMember",
                    "worker-publishes-dead-letters",
                    "roles/pubsub.publisher",
                    WORKER,
                ),
                ("TopicIAMMember", "dlq-publish-agent", "roles/pubsub.publisher", PUBSUB_AGENT),
                ("SubscriptionIAMMember", "dlq-ack-edits", "roles/pubsub.subscriber", PUBSUB_AGENT),
                (
                    "SubscriptionIAMMember",
                    "dlq-ack-missing",
                    "roles/pubsub.subscriber",
                    PUBSUB_AGENT,
                ),
                (
                    "BucketIAMMember",
                    "worker-reads-segmentation-0",
                    "roles/storage.objectViewer",
                    WORKER,
                ),
                ("QueueIamMember", "worker-enqueues", "roles/cloudtasks.enqueuer", WORKER),
                ("QueueIamMember", "worker-enqueues-edits", "roles/cloudtasks.enqueuer", WORKER),
                (
                    "IAMMember",
                    "worker-acts-as-tasks-invoker",
                    "roles/iam.serviceAccountUser",
                    WORKER,
                ),
                (
                    "IAMMember",
                    "pubsub-mints-push-tokens",
                    "roles/iam.serviceAccountTokenCreator",
                    PUBSUB_AGENT,
                ),
                ("ServiceIamMember", "invoke-compute_chunk", "roles/run.invoker", TASKS),
                ("ServiceIamMember", "invoke-on_edit", "roles/run.invoker", PUSH),
                (
                    "ServiceIamMember",
                    "invoke-lookup-0",
                    "roles/run.invoker",
                    "group:cave@example.org",
                ),
            ]
        )
        assert grants == expected
        assert not [g for g in grants if g[3] in ("allUsers", "allAuthenticatedUsers")]

    return check(built, verify)


@pulumi.runtime.test
def test_queue_retry_and_rate_settings(built):
    def verify():
        queues = {q.name: q for q in of_type("gcp:cloudtasks/queue:Queue")}
        assert set(queues) == {"compute-queue", "edits-queue"}
        for queue in queues.values():
            assert queue.inputs["retryConfig"] == {
                "maxAttempts": 7,
                "minBackoff": "5s",
                "maxBackoff": "300s",
                "maxDoublings": 5,
            }
        assert queues["compute-queue"].inputs["name"] == "l2cache-compute"
        assert queues["compute-queue"].inputs["rateLimits"] == {
            "maxConcurrentDispatches": 80,
            "maxDispatchesPerSecond": 40.0,
        }
        # the edits queue: the map's default name; all 80 instances go to the bulk queue
        # here (queueMaxConcurrent=80), so edits get the floor of 1 at Cloud Tasks' rate
        assert queues["edits-queue"].inputs["name"] == "l2cache-compute-edits"
        assert queues["edits-queue"].inputs["rateLimits"] == {
            "maxConcurrentDispatches": 1,
            "maxDispatchesPerSecond": 500.0,
        }

    return check(built, verify)


@pulumi.runtime.test
def test_push_subscriptions_dead_letter_and_oidc(built):
    def verify():
        subs = {r.name: r.inputs for r in of_type("gcp:pubsub/subscription:Subscription")}
        assert set(subs) == {"push-edits", "push-missing", "dead-letter-inspect"}
        topics = {
            "push-edits": PCG_EDITS,  # PCG's existing topic, by its full path
            "push-missing": "projects/proj/topics/l2cache-missing-ids",
        }
        for key, topic in topics.items():
            sub = subs[key]
            assert sub["topic"] == topic
            assert sub["deadLetterPolicy"] == {
                "deadLetterTopic": "projects/proj/topics/l2cache-dead-letter",
                "maxDeliveryAttempts": 10,
            }
            assert sub["retryPolicy"] == {"minimumBackoff": "10s", "maximumBackoff": "600s"}
            assert sub["project"] == "proj"  # the subscription is ours, the topic PCG's
            push = sub["pushConfig"]
            assert push["pushEndpoint"] == "https://l2cache-on-edit-xyz.a.run.app"
            assert push["oidcToken"] == {"serviceAccountEmail": EMAIL.format("l2cache-pubsub-push")}

    return check(built, verify)


@pulumi.runtime.test
def test_the_pcg_edits_topic_is_never_created(built):
    def verify():
        topics = sorted(r.inputs["name"] for r in of_type("gcp:pubsub/topic:Topic"))
        assert topics == ["l2cache-dead-letter", "l2cache-missing-ids"]
        assert not [t for t in topics if "edit" in t]
        # nothing is granted on PCG's topic either: we only attach a subscription
        on_topics = [r.inputs["topic"] for r in of_type("gcp:pubsub/topicIAMMember:TopicIAMMember")]
        assert not [t for t in on_topics if "edit" in t]

    return check(built, verify)


@pulumi.runtime.test
def test_bigtable_tables_families_and_gc_rules(built):
    def verify():
        (instance,) = of_type("gcp:bigtable/instance:Instance")
        assert instance.inputs["instanceType"] == "PRODUCTION"
        assert instance.inputs["clusters"][0]["numNodes"] == 3
        tables = {r.inputs["name"]: r.inputs for r in of_type("gcp:bigtable/table:Table")}
        assert set(tables) == {
            "l2cache_minnie_v1",
            "l2cache_pinky_v1",
            "l2cache_runs",
            "l2cache_lookup_guard",
        }
        for t in ("l2cache_minnie_v1", "l2cache_pinky_v1"):
            assert tables[t]["columnFamilies"] == [{"family": "0"}, {"family": "lineage"}]
        assert tables["l2cache_runs"]["columnFamilies"] == [
            {"family": "run"},
            {"family": "ledger"},
            {"family": "sum", "type": "intsum"},
            {"family": "idx"},
        ]
        guard = tables.pop("l2cache_lookup_guard")  # marks and counters: nothing to protect
        assert guard["columnFamilies"] == [{"family": f} for f in ("neg", "pend", "rate")]
        assert all(t["deletionProtection"] == "PROTECTED" for t in tables.values())  # production
        # resources keyed by table id: moving a table between dataset entries keeps it
        names = sorted(r.name for r in of_type("gcp:bigtable/table:Table"))
        assert names == [
            "cache-l2cache_minnie_v1",
            "cache-l2cache_pinky_v1",
            "lookup-guard",
            "runs",
        ]
        everything = of_type("gcp:bigtable/gCPolicy:GCPolicy")
        guard_gc = [p for p in everything if p.inputs["table"] == "l2cache_lookup_guard"]
        assert sorted(p.inputs["columnFamily"] for p in guard_gc) == ["neg", "pend", "rate"]
        assert all(p.inputs["maxAge"] == {"duration": "168h"} for p in guard_gc)
        # the runs table's per-id index (l2edit: rows) is collected after 30 days
        (runs_idx,) = [p for p in everything if p.inputs["table"] == "l2cache_runs"]
        assert runs_idx.inputs["columnFamily"] == "idx"
        assert runs_idx.inputs["maxAge"] == {"duration": "720h"}
        assert runs_idx.inputs["maxVersions"] == [{"number": 1}]
        assert runs_idx.inputs["mode"] == "UNION"
        policies = [p for p in everything if p not in guard_gc and p is not runs_idx]
        assert sorted((p.inputs["table"], p.inputs["columnFamily"]) for p in policies) == sorted(
            (t, f) for t in ("l2cache_minnie_v1", "l2cache_pinky_v1") for f in ("0", "lineage")
        )
        assert all(p.inputs["maxVersions"] == [{"number": 4}] for p in policies)

    return check(built, verify)


@pulumi.runtime.test
def test_functions_memory_timeouts_and_env(built):
    def verify():
        fns = {
            r.inputs["name"]: r.inputs for r in of_type("gcp:cloudfunctionsv2/function:Function")
        }
        assert set(fns) == {"l2cache-lookup", "l2cache-compute-chunk", "l2cache-on-edit"}
        for name in ("l2cache-compute-chunk", "l2cache-on-edit"):
            worker = fns[name]["serviceConfig"]
            # 256x256x512: (33.5 M voxels x 14 B + 300 MiB) x 1.25 = 935 -> 1,024 MiB,
            # over the measured 627 MiB peak
            assert worker["availableMemory"] == "1024Mi"
            assert worker["availableCpu"] == "1"
            # (10 s cold start + 4 chunks x 3.0 s) x 5 = 110 -> the 120 s floor
            assert worker["timeoutSeconds"] == 120
            assert worker["maxInstanceRequestConcurrency"] == 1
            assert worker["maxInstanceCount"] == 80
            assert worker["serviceAccountEmail"] == EMAIL.format("l2cache-worker")
        lookup = fns["l2cache-lookup"]["serviceConfig"]
        assert lookup["serviceAccountEmail"] == EMAIL.format("l2cache-lookup")
        assert "AUTH_URI" not in lookup["environmentVariables"]
        for f in fns.values():
            env = f["serviceConfig"]["environmentVariables"]
            # exactly infra's function_env(), which the deployed-mode test runs with
            assert env == {
                "L2CACHE_CONFIG": "/workspace/datasets.yaml",
                "NUMBA_CACHE_DIR": "/tmp/numba",
                "CLOUD_VOLUME_DIR": "/tmp/cloudvolume",
            }
            assert f["buildConfig"]["runtime"] == "python311"
            # no load balancer configured: lookup is reached at its run.app URL
            assert f["serviceConfig"]["ingressSettings"] == "ALLOW_ALL"
        # no routing resources unless asked for
        assert not [r for r in MOCKS.resources if r.typ.startswith("gcp:compute/")]

    return check(built, verify)


def test_every_function_folder_is_deployed(built):
    from archive import function_names

    folders = sorted(p.name for p in (INFRA.parent / "functions").iterdir() if p.is_dir())
    assert function_names() == folders
    _, res = built
    assert sorted(res.functions) == folders


# Every cloud resource of the test stack, by the component that creates it.
CHILDREN = {
    "l2cache:index:ServiceAccounts": {
        "sa-lookup",
        "sa-worker",
        "sa-tasks-invoker",
        "sa-pubsub-push",
    },
    "l2cache:index:Storage": {
        "bigtable",
        "cache-l2cache_minnie_v1",
        "cache-l2cache_pinky_v1",
        *(f"gc-l2cache_{t}_v1-{f}" for t in ("minnie", "pinky") for f in ("0", "lineage")),
        "runs",
        "lookup-guard",
        *(f"gc-lookup-guard-{f}" for f in ("neg", "pend", "rate")),
        "gc-runs-idx",
        "source",
    },
    "l2cache:index:Messaging": {
        "topic-missing",
        "topic-dead_letter",
        "push-edits",
        "push-missing",
        "dead-letter-inspect",
        "dlq-ack-edits",
        "dlq-ack-missing",
        "dlq-publish-agent",
        "pubsub-mints-push-tokens",
    },
    "l2cache:index:Lookup": {
        "src-lookup",
        "fn-lookup",
        "invoke-lookup-0",
        "lookup-reads-minnie",
        "lookup-reads-pinky",
        "lookup-writes-guard",
        "lookup-reads-runs",
        "lookup-reads-graph-0",
        "lookup-publishes-missing",
    },
    "l2cache:index:Workers": {
        "src-compute_chunk",
        "src-on_edit",
        "fn-compute_chunk",
        "fn-on_edit",
        "compute-queue",
        "edits-queue",
        "invoke-compute_chunk",
        "invoke-on_edit",
        "worker-writes-minnie",
        "worker-writes-pinky",
        "worker-writes-runs",
        "worker-publishes-dead-letters",
        "worker-reads-graph-0",
        "worker-reads-segmentation-0",
        "worker-enqueues",
        "worker-enqueues-edits",
        "worker-acts-as-tasks-invoker",
    },
    "l2cache:index:Monitoring": {*LOG_METRICS, "dashboard"},
}


def components():
    return [r for r in MONITOR.registrations.values() if r.type.startswith("l2cache:index:")]


@pulumi.runtime.test
def test_each_component_parents_exactly_its_resources(built):
    _, res = built
    # a few of each component's typed attributes: the resources the mocks saw under it
    owned = {
        "l2cache:index:ServiceAccounts": [res.accounts.worker, res.accounts.pubsub_push],
        "l2cache:index:Storage": [res.storage.runs, res.storage.bucket, res.storage.instance],
        "l2cache:index:Messaging": [res.messaging.dead_letter, *res.messaging.grants],
        "l2cache:index:Lookup": [res.lookup.function, *res.lookup.invokers, *res.lookup.grants],
        "l2cache:index:Workers": [
            res.workers.queue,
            res.workers.edits_queue,
            res.workers.on_edit,
            *res.workers.grants,
        ],
        "l2cache:index:Monitoring": [res.monitoring.dashboard, *res.monitoring.metrics.values()],
    }
    urns = {typ: pulumi.Output.all(*(r.urn for r in rs)) for typ, rs in owned.items()}

    def verify(owned_urns):
        comps = {c.type: c for c in components()}
        assert set(comps) == set(CHILDREN)
        for typ, comp in comps.items():
            assert comp.parent_type == "pulumi:pulumi:Stack", typ  # components sit at the root
            assert {r.name for r in MONITOR.children(comp)} == CHILDREN[typ], typ
            for urn in owned_urns[typ]:
                assert MONITOR.registrations[urn].parent == comp.urn, urn
        # no cloud resource is left at the stack root, none belongs to two components
        cloud = [r for r in MONITOR.registrations.values() if r not in comps.values()]
        assert all(r.parent_type.startswith("l2cache:index:") for r in cloud)
        assert sorted(r.name for r in cloud) == sorted(n for c in CHILDREN.values() for n in c)

    return pulumi.Output.all(settle(res), pulumi.Output.from_input(urns)).apply(
        lambda args: verify(args[1])
    )


@pulumi.runtime.test
def test_every_resource_keeps_the_urn_it_had_at_the_stack_root(built):
    """Each child is aliased to its own name with no parent (the stack), so `pulumi up`
    on a stack deployed before the components moves it instead of replacing it; the
    cache tables and GC policies also keep their older dataset-keyed names."""

    def verify():
        comps = components()
        assert all(c.aliases == () for c in comps)  # new: nothing to carry over
        for r in MONITOR.registrations.values():
            if r in comps:
                continue
            assert ("", True) in r.program_aliases, r.name
            assert all(no_parent for _, no_parent in r.program_aliases), r.name
            older = {name for name, _ in r.program_aliases if name}
            if r.name in ("lookup-guard", "gc-runs-idx") or r.name.startswith("gc-lookup-guard-"):
                assert older == set(), r.name  # new
            elif r.type == "gcp:bigtable/table:Table" and r.name != "runs":
                dataset = r.name.split("_")[1]  # cache-l2cache_<dataset>_v1
                assert older == {f"cache-{dataset}"}
            elif r.type == "gcp:bigtable/gCPolicy:GCPolicy":
                dataset, family = r.name.split("_")[1], r.name.rsplit("-", 1)[1]
                assert older == {f"gc-{dataset}-{family}"}
            else:
                assert older == set(), r.name

    return check(built, verify)


@pulumi.runtime.test
def test_components_register_their_outputs(built):
    _, res = built
    emails = {key: EMAIL.format(f"l2cache-{key}") for key in ("lookup", "worker")}
    expected = {
        "l2cache:index:ServiceAccounts": {
            "lookup_email": emails["lookup"],
            "worker_email": emails["worker"],
            "tasks_invoker_email": EMAIL.format("l2cache-tasks-invoker"),
            "pubsub_push_email": EMAIL.format("l2cache-pubsub-push"),
        },
        "l2cache:index:Storage": {
            "instance_name": "l2cache",
            "cache_tables": {"minnie": "l2cache_minnie_v1", "pinky": "l2cache_pinky_v1"},
            "existing_cache_tables": {},
            "fallback_tables": {},
            "runs_table": "l2cache_runs",
            "guard_table": "l2cache_lookup_guard",
            "source_bucket": "proj-l2cache-source",
        },
        "l2cache:index:Messaging": {
            "missing_ids_topic": "projects/proj/topics/l2cache-missing-ids",
            "dead_letter_topic": "projects/proj/topics/l2cache-dead-letter",
            "edits_topic": PCG_EDITS,
            "subscriptions": {
                "edits": "l2cache-edits-to-on-edit",
                "missing": "l2cache-missing-to-on-edit",
                "dead_letter": "l2cache-dead-letter-inspect",
            },
        },
        # not routed: no backend, URL map commands or LB address (None is not sent)
        "l2cache:index:Lookup": {
            "url": "https://l2cache-lookup-xyz.a.run.app",
            "ingress": "ALLOW_ALL",
        },
        "l2cache:index:Workers": {
            "compute_chunk_url": "https://l2cache-compute-chunk-xyz.a.run.app",
            "on_edit_url": "https://l2cache-on-edit-xyz.a.run.app",
            "queue": "compute-queue_id",
            "edits_queue": "edits-queue_id",
        },
        "l2cache:index:Monitoring": {
            "dashboard": "dashboard_id",
            "log_metrics": list(LOG_METRICS),
        },
    }
    # the typed attributes resolve to the same values the components register
    attributes = {
        "lookup_url": res.lookup.url,
        "lookup_ingress": res.lookup.ingress,
        "compute_chunk_url": res.workers.compute_chunk_url,
        "on_edit_url": res.workers.on_edit_url,
        "queue": res.workers.queue_id,
        "instance_name": res.storage.instance_name,
        "cache_tables": res.storage.cache_table_names,
        "edits_topic": res.messaging.edits_topic,
    }

    def verify(args):
        registered, values = args
        assert registered == expected
        assert values == {
            "lookup_url": expected["l2cache:index:Lookup"]["url"],
            "lookup_ingress": "ALLOW_ALL",
            "compute_chunk_url": expected["l2cache:index:Workers"]["compute_chunk_url"],
            "on_edit_url": expected["l2cache:index:Workers"]["on_edit_url"],
            "queue": "compute-queue_id",
            "instance_name": "l2cache",
            "cache_tables": expected["l2cache:index:Storage"]["cache_tables"],
            "edits_topic": PCG_EDITS,
        }
        assert res.lookup.reach is None and res.lookup.lb_ip is None

    outputs = asyncio.ensure_future(registered_outputs(res))
    return pulumi.Output.all(outputs, pulumi.Output.from_input(attributes)).apply(verify)


@pulumi.runtime.test
def test_stack_exports_are_the_component_outputs(built):
    """The stack outputs keep their names and values (operators and the dataset map
    read them: compute_chunk_url and tasks_invoker_email go into tasks:)."""
    _, res = built
    program.export(res)
    exported = pulumi.Output.from_input(dict(pulumi.runtime.get_root_resource().outputs))

    def verify(values):
        assert values == {
            "lookup_url": "https://l2cache-lookup-xyz.a.run.app",
            "compute_chunk_url": "https://l2cache-compute-chunk-xyz.a.run.app",
            "edits_topic": PCG_EDITS,
            "missing_ids_topic": "projects/proj/topics/l2cache-missing-ids",
            "dead_letter_topic": "projects/proj/topics/l2cache-dead-letter",
            "queue": "compute-queue_id",
            "edits_queue": "edits-queue_id",
            "bigtable_instance": "l2cache",
            "cache_tables": {"minnie": "l2cache_minnie_v1", "pinky": "l2cache_pinky_v1"},
            "existing_cache_tables": {},
            "runs_table": "l2cache_runs",
            "tasks_invoker_email": EMAIL.format("l2cache-tasks-invoker"),
            "lookup_ingress": "ALLOW_ALL",
        }

    return exported.apply(verify)
