"""Pub/Sub: our missing-id and dead-letter topics, and push subscriptions to on_edit.

PCG's edits topic is NOT ours: PCG publishes every edit to one existing topic that
other services (mesh workers) read too. We only attach a subscription to it, by its
full path (``l2cache:pcgEditsTopic``, ``projects/<pcg-project>/topics/<name>``); this
program never creates, changes or re-points that topic. The subscription lives in our
project; when the topic is in PCG's project, whoever runs ``pulumi up`` needs
``pubsub.topics.attachSubscription`` on it (``roles/pubsub.subscriber`` on the topic,
granted by the PCG project's owner). Once attached, delivery needs nothing from PCG.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp
from config import StackConfig


def topics(cfg: StackConfig) -> dict[str, gcp.pubsub.Topic]:
    """The topics l2cache owns: missing ids (lookup -> on_edit) and dead letters."""
    ps = cfg.datasets.get("pubsub") or {}
    names = {
        "missing": ps.get("missing_ids_topic", "l2cache-missing-ids"),
        "dead_letter": ps.get("dead_letter_topic", "l2cache-dead-letter"),
    }
    return {
        k: gcp.pubsub.Topic(f"topic-{k}", name=v, project=cfg.project) for k, v in names.items()
    }


def push_subscriptions(cfg: StackConfig, tps: dict, on_edit_url, push_sa) -> dict:
    """Edits (if PCG's topic is configured) and missing ids are pushed to on_edit with
    an OIDC token of ``push_sa``."""
    project_number = gcp.organizations.get_project(project_id=cfg.project).number
    pubsub_agent = f"serviceAccount:service-{project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    sources = {"missing": tps["missing"].id}
    if cfg.pcg_edits_topic:
        sources["edits"] = cfg.pcg_edits_topic  # the existing topic, referenced by path
    else:
        pulumi.log.warn(
            "no PCG edits topic (l2cache:pcgEditsTopic): on_edit gets missing ids only and "
            "edits will not update the cache"
        )
    subs, grants = {}, []
    for key, topic in sorted(sources.items()):
        sub = gcp.pubsub.Subscription(
            f"push-{key}",
            name=f"l2cache-{key}-to-on-edit",
            topic=topic,
            project=cfg.project,
            ack_deadline_seconds=600,
            push_config={
                "push_endpoint": on_edit_url,
                "oidc_token": {"service_account_email": push_sa.email},
            },
            retry_policy={"minimum_backoff": "10s", "maximum_backoff": "600s"},
            dead_letter_policy={
                "dead_letter_topic": tps["dead_letter"].id,
                "max_delivery_attempts": cfg.max_delivery_attempts,
            },
        )
        # the Pub/Sub service agent must be able to move messages to the dead-letter topic
        grants.append(
            gcp.pubsub.SubscriptionIAMMember(
                f"dlq-ack-{key}",
                subscription=sub.name,
                role="roles/pubsub.subscriber",
                member=pubsub_agent,
                project=cfg.project,
            )
        )
        subs[key] = sub
    grants.append(
        gcp.pubsub.TopicIAMMember(
            "dlq-publish-agent",
            topic=tps["dead_letter"].name,
            role="roles/pubsub.publisher",
            member=pubsub_agent,
            project=cfg.project,
        )
    )
    dlq_sub = gcp.pubsub.Subscription(
        "dead-letter-inspect",
        name="l2cache-dead-letter-inspect",
        topic=tps["dead_letter"].id,
        project=cfg.project,
        message_retention_duration="604800s",
    )
    subs["dead_letter"] = dlq_sub
    subs["grants"] = grants
    return subs
