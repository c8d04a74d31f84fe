"""The Pulumi program under mocks: the resources and the properties that matter."""

from __future__ import annotations

import pulumi
import pytest

from .harness import INFRA, MOCKS, PCG_EDITS, program, settle, stack_config

EMAIL = "{}@proj.iam.gserviceaccount.com"
WORKER = "serviceAccount:" + EMAIL.format("l2cache-worker")
LOOKUP = "serviceAccount:" + EMAIL.format("l2cache-lookup")
TASKS = "serviceAccount:" + EMAIL.format("l2cache-tasks-invoker")
PUSH = "serviceAccount:" + EMAIL.format("l2cache-pubsub-push")
PUBSUB_AGENT = "serviceAccount:service-123456789@gcp-sa-pubsub.iam.gserviceaccount.com"


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
        (queue,) = of_type("gcp:cloudtasks/queue:Queue")
        assert queue.inputs["retryConfig"] == {
            "maxAttempts": 7,
            "minBackoff": "5s",
            "maxBackoff": "300s",
            "maxDoublings": 5,
        }
        assert queue.inputs["rateLimits"] == {
            "maxConcurrentDispatches": 80,
            "maxDispatchesPerSecond": 40.0,
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
        assert set(tables) == {"l2cache_minnie_v1", "l2cache_pinky_v1", "l2cache_runs"}
        for t in ("l2cache_minnie_v1", "l2cache_pinky_v1"):
            assert tables[t]["columnFamilies"] == [{"family": "0"}, {"family": "lineage"}]
        assert tables["l2cache_runs"]["columnFamilies"] == [{"family": "run"}, {"family": "ledger"}]
        assert all(t["deletionProtection"] == "PROTECTED" for t in tables.values())  # production
        # resources keyed by table id: moving a table between dataset entries keeps it
        names = sorted(r.name for r in of_type("gcp:bigtable/table:Table"))
        assert names == ["cache-l2cache_minnie_v1", "cache-l2cache_pinky_v1", "runs"]
        policies = of_type("gcp:bigtable/gCPolicy:GCPolicy")
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
