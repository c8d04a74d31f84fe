"""Pub/Sub: our missing-id and dead-letter topics, push subscriptions to on_edit, their
dead-letter policy and the IAM the Pub/Sub service agent needs for them.

PCG's edits topic is NOT ours: PCG publishes every edit to one existing topic that
other services (mesh workers) read too. We only attach a subscription to it, by its
full path (``l2cache:pcgEditsTopic``, ``projects/<pcg-project>/topics/<name>``); this
program never creates, changes or re-points that topic. The subscription lives in our
project; when the topic is in PCG's project, whoever runs ``pulumi up`` needs
``pubsub.topics.attachSubscription`` on it (``roles/pubsub.subscriber`` on the topic,
granted by the PCG project's owner). Once attached, delivery needs nothing from PCG.

Who publishes to our topics is granted by the publisher's component (Lookup: missing
ids; Workers: dead letters), so each component shows all the access its identity has.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp
from children import COMPONENT_TYPE, child_opts
from config import StackConfig


def topic_names(cfg: StackConfig) -> dict[str, str]:
    """The topics l2cache owns: missing ids (lookup -> on_edit) and dead letters."""
    ps = cfg.datasets.get("pubsub") or {}
    return {
        "missing": ps.get("missing_ids_topic", "l2cache-missing-ids"),
        "dead_letter": ps.get("dead_letter_topic", "l2cache-dead-letter"),
    }


class Messaging(pulumi.ComponentResource):
    """Our topics and the push subscriptions that deliver edits and missing ids to
    on_edit with an OIDC token of the push identity, dead-lettering after the map's
    ``pubsub.max_delivery_attempts``."""

    missing: gcp.pubsub.Topic
    dead_letter: gcp.pubsub.Topic
    # "missing", "edits" (only with PCG's topic configured) -> push to on_edit;
    # "dead_letter" -> the inspection subscription on the dead-letter topic
    subscriptions: dict[str, gcp.pubsub.Subscription]
    grants: list[pulumi.CustomResource]
    edits_topic: pulumi.Output[str] | None  # PCG's topic, subscribed to by path

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        push_account: gcp.serviceaccount.Account,
        on_edit_url: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(COMPONENT_TYPE.format("Messaging"), name, None, opts)
        topics = {
            key: gcp.pubsub.Topic(
                f"topic-{key}", name=topic, project=cfg.project, opts=child_opts(self)
            )
            for key, topic in topic_names(cfg).items()
        }
        self.missing, self.dead_letter = topics["missing"], topics["dead_letter"]
        project_number = gcp.organizations.get_project(
            project_id=cfg.project, opts=pulumi.InvokeOptions(parent=self)
        ).number
        pubsub_agent = (
            f"serviceAccount:service-{project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"
        )
        self.subscriptions = self._push(cfg, push_account, on_edit_url)
        self.grants = [
            # the Pub/Sub service agent must be able to move messages to the dead-letter
            # topic, and to acknowledge them on the subscription they leave
            *(
                gcp.pubsub.SubscriptionIAMMember(
                    f"dlq-ack-{key}",
                    subscription=sub.name,
                    role="roles/pubsub.subscriber",
                    member=pubsub_agent,
                    project=cfg.project,
                    opts=child_opts(self),
                )
                for key, sub in sorted(self.subscriptions.items())
            ),
            gcp.pubsub.TopicIAMMember(
                "dlq-publish-agent",
                topic=self.dead_letter.name,
                role="roles/pubsub.publisher",
                member=pubsub_agent,
                project=cfg.project,
                opts=child_opts(self),
            ),
            # and mint the push identity's OIDC tokens, which on_edit's invoker grant admits
            gcp.serviceaccount.IAMMember(
                "pubsub-mints-push-tokens",
                service_account_id=push_account.name,
                role="roles/iam.serviceAccountTokenCreator",
                member=pubsub_agent,
                opts=child_opts(self),
            ),
        ]
        self.subscriptions["dead_letter"] = gcp.pubsub.Subscription(
            "dead-letter-inspect",
            name="l2cache-dead-letter-inspect",
            topic=self.dead_letter.id,
            project=cfg.project,
            message_retention_duration="604800s",
            opts=child_opts(self),
        )
        edits = self.subscriptions.get("edits")
        self.edits_topic = edits.topic if edits is not None else None
        self.register_outputs(
            {
                "missing_ids_topic": self.missing.id,
                "dead_letter_topic": self.dead_letter.id,
                "edits_topic": self.edits_topic,
                "subscriptions": {key: s.name for key, s in self.subscriptions.items()},
            }
        )

    def _push(
        self,
        cfg: StackConfig,
        push_account: gcp.serviceaccount.Account,
        on_edit_url: pulumi.Input[str],
    ) -> dict[str, gcp.pubsub.Subscription]:
        """Edits (if PCG's topic is configured) and missing ids, pushed to on_edit."""
        sources: dict[str, pulumi.Input[str]] = {"missing": self.missing.id}
        if cfg.pcg_edits_topic:
            sources["edits"] = cfg.pcg_edits_topic  # the existing topic, referenced by path
        else:
            pulumi.log.warn(
                "no PCG edits topic (l2cache:pcgEditsTopic): on_edit gets missing ids only and "
                "edits will not update the cache"
            )
        return {
            key: gcp.pubsub.Subscription(
                f"push-{key}",
                name=f"l2cache-{key}-to-on-edit",
                topic=topic,
                project=cfg.project,
                ack_deadline_seconds=600,
                push_config={
                    "push_endpoint": on_edit_url,
                    "oidc_token": {"service_account_email": push_account.email},
                },
                retry_policy={"minimum_backoff": "10s", "maximum_backoff": "600s"},
                dead_letter_policy={
                    "dead_letter_topic": self.dead_letter.id,
                    "max_delivery_attempts": cfg.max_delivery_attempts,
                },
                opts=child_opts(self),
            )
            for key, topic in sorted(sources.items())
        }
