"""The whole deployment, resources grouped by concern; ``__main__`` exports its outputs."""

from __future__ import annotations

import config
import iam
import messaging
import monitoring
import pulumi
import pulumi_gcp as gcp
import routing
import storage
import tasks
from config import StackConfig

import functions


def grants(cfg: StackConfig, accounts: dict, store: dict, tps: dict, queue) -> list:
    """Exactly the access each identity needs (see iam.py)."""
    lookup, worker = iam.member(accounts["lookup"]), iam.member(accounts["worker"])
    out = []
    tables = {name: t.name for name, t in store["cache_tables"].items()}
    for name, table in sorted({**tables, **store["existing_tables"]}.items()):
        out.append(
            gcp.bigtable.TableIamMember(
                f"lookup-reads-{name}",
                instance_name=store["instance_name"],
                table=table,
                role="roles/bigtable.reader",
                member=lookup,
                project=cfg.bigtable_project,
            )
        )
        if name in store["existing_tables"]:
            continue  # served unchanged: l2cache never writes a table it does not own
        out.append(
            gcp.bigtable.TableIamMember(
                f"worker-writes-{name}",
                instance_name=store["instance_name"],
                table=table,
                role="roles/bigtable.user",
                member=worker,
                project=cfg.bigtable_project,
            )
        )
    out.append(
        gcp.bigtable.TableIamMember(
            "worker-writes-runs",
            instance_name=store["instance_name"],
            table=store["runs"].name,
            role="roles/bigtable.user",
            member=worker,
            project=cfg.bigtable_project,
        )
    )
    out.append(
        gcp.pubsub.TopicIAMMember(
            "lookup-publishes-missing",
            topic=tps["missing"].name,
            role="roles/pubsub.publisher",
            member=lookup,
            project=cfg.project,
        )
    )
    out.append(
        gcp.pubsub.TopicIAMMember(
            "worker-publishes-dead-letters",
            topic=tps["dead_letter"].name,
            role="roles/pubsub.publisher",
            member=worker,
            project=cfg.project,
        )
    )
    for i, inst in enumerate(cfg.graph_instances):
        project, instance = inst.split("/")[1], inst.split("/")[3]
        out.append(
            gcp.bigtable.InstanceIamMember(
                f"worker-reads-graph-{i}",
                instance=instance,
                project=project,
                role="roles/bigtable.reader",
                member=worker,
            )
        )
    for i, bucket in enumerate(cfg.segmentation_buckets):
        out.append(
            gcp.storage.BucketIAMMember(
                f"worker-reads-segmentation-{i}",
                bucket=bucket,
                role="roles/storage.objectViewer",
                member=worker,
            )
        )
    # split tasks: the worker enqueues sub-tasks that carry the tasks-invoker's OIDC token
    out.append(
        gcp.cloudtasks.QueueIamMember(
            "worker-enqueues",
            name=queue.name,
            location=cfg.region,
            project=cfg.project,
            role="roles/cloudtasks.enqueuer",
            member=worker,
        )
    )
    out.append(
        gcp.serviceaccount.IAMMember(
            "worker-acts-as-tasks-invoker",
            service_account_id=accounts["tasks-invoker"].name,
            role="roles/iam.serviceAccountUser",
            member=worker,
        )
    )
    project_number = gcp.organizations.get_project(project_id=cfg.project).number
    out.append(
        gcp.serviceaccount.IAMMember(
            "pubsub-mints-push-tokens",
            service_account_id=accounts["pubsub-push"].name,
            role="roles/iam.serviceAccountTokenCreator",
            member=f"serviceAccount:service-{project_number}@gcp-sa-pubsub.iam.gserviceaccount.com",
        )
    )
    return out


def build(cfg: StackConfig) -> dict:
    config.validate(cfg)  # also when a StackConfig is built by hand (tests)
    accounts = iam.service_accounts(cfg.project)
    store = storage.bigtable(cfg)
    tps = messaging.topics(cfg)
    queue = tasks.queue(cfg)
    fns, invokers = functions.deploy(cfg, store["bucket"], accounts, iam.member)
    subs = messaging.push_subscriptions(cfg, tps, fns["on_edit"].url, accounts["pubsub-push"])
    iam_grants = grants(cfg, accounts, store, tps, queue)
    routes = routing.build(cfg, fns["lookup"])
    board = monitoring.dashboard(cfg)
    return {
        "accounts": accounts,
        "store": store,
        "topics": tps,
        "queue": queue,
        "functions": fns,
        "invokers": invokers,
        "subscriptions": subs,
        "grants": iam_grants,
        "routes": routes,
        "dashboard": board,
    }


def export(res: dict) -> None:
    pulumi.export("lookup_url", res["functions"]["lookup"].url)
    pulumi.export("compute_chunk_url", res["functions"]["compute_chunk"].url)
    if "edits" in res["subscriptions"]:  # PCG's topic, subscribed to by path
        pulumi.export("edits_topic", res["subscriptions"]["edits"].topic)
    pulumi.export("missing_ids_topic", res["topics"]["missing"].id)
    pulumi.export("dead_letter_topic", res["topics"]["dead_letter"].id)
    pulumi.export("queue", res["queue"].id)
    pulumi.export("bigtable_instance", res["store"]["instance_name"])
    pulumi.export("cache_tables", {k: t.name for k, t in res["store"]["cache_tables"].items()})
    pulumi.export("existing_cache_tables", res["store"]["existing_tables"])
    pulumi.export("runs_table", res["store"]["runs"].name)
    pulumi.export("tasks_invoker_email", res["accounts"]["tasks-invoker"].email)
    pulumi.export("lookup_ingress", res["functions"]["lookup"].service_config.ingress_settings)
    routing.export(res["routes"])
