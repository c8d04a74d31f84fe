"""The Lookup component: the lookup function and everything about how it is reached.

Its archive, the function (ingress from config.StackConfig.ingress), who may invoke it
(functions.lookup_invokers: ``allUsers`` with CAVE auth in the app, else the configured
invokers), the optional load-balancer reach (routing.py), and all the access its
identity has: read every cache table it serves, publish missing ids, and read the
operator's CAVE service-token secret when one is configured.
"""

from __future__ import annotations

import iam
import pulumi
import pulumi_gcp as gcp
import routing
from children import COMPONENT_TYPE, child_opts
from config import StackConfig
from storage import Storage

import functions

MEMORY_MIB = 1024
TIMEOUT_S = 120
REQUESTS_PER_INSTANCE = 8  # lookups wait on Bigtable, not CPU


class Lookup(pulumi.ComponentResource):
    """lookup, its reach and its grants, in one component so that everything a request
    to lookup passes through, and everything its identity may touch, shows in one place."""

    source: gcp.storage.BucketObject
    function: gcp.cloudfunctionsv2.Function
    invokers: list[gcp.cloudrunv2.ServiceIamMember]
    grants: list[pulumi.CustomResource]  # table reads, missing-id publish, secret access
    reach: routing.Reach | None  # None: reached at its run.app URL
    url: pulumi.Output[str]
    ingress: pulumi.Output[str]
    backend_service: pulumi.Output[str] | None  # self link, for the operator's URL map
    url_map_commands: pulumi.Output[str] | None
    lb_ip: pulumi.Output[str] | None  # our own LB's address, for the domain's A record

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        account: gcp.serviceaccount.Account,
        storage: Storage,
        missing_topic: gcp.pubsub.Topic,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(COMPONENT_TYPE.format("Lookup"), name, None, opts)
        member = iam.member(account)
        secret_access = self._auth_token_access(cfg, member)
        self.grants = [*self._grants(cfg, member, storage, missing_topic), *secret_access]
        self.source = functions.upload("lookup", cfg, storage.bucket, child_opts(self))
        self.function = functions.function(
            "lookup",
            cfg,
            self.source,
            account,
            MEMORY_MIB,
            TIMEOUT_S,
            cfg.lookup_max_instances,
            REQUESTS_PER_INSTANCE,
            functions.function_env(),
            # the secret must be readable before a revision that mounts it starts
            child_opts(self, depends_on=secret_access),
            ingress=cfg.ingress,
            secrets=functions.lookup_secrets(cfg),
        )
        self.invokers = [
            functions.invoker("lookup", self.function, cfg, who, child_opts(self), suffix=f"-{i}")
            for i, who in enumerate(functions.lookup_invokers(cfg))
        ]
        self.reach = routing.build(cfg, self.function, self)
        self.url = self.function.url
        self.ingress = self.function.service_config.ingress_settings
        self.backend_service = self.url_map_commands = self.lb_ip = None
        if self.reach is not None:
            self.backend_service = self.reach.backend.self_link
            self.url_map_commands = self.reach.commands
            if self.reach.lb is not None:
                self.lb_ip = self.reach.lb.address.address
        self.register_outputs(
            {
                "url": self.url,
                "ingress": self.ingress,
                "backend_service": self.backend_service,
                "url_map_commands": self.url_map_commands,
                "lb_ip": self.lb_ip,
            }
        )

    def _grants(
        self,
        cfg: StackConfig,
        member: pulumi.Output[str],
        storage: Storage,
        missing_topic: gcp.pubsub.Topic,
    ) -> list[pulumi.CustomResource]:
        """Exactly what lookup's identity may do: read the cache tables (existing ones
        included: they are served) and the datasets' fallback tables, read the runs
        table (per-id state: why an id failed), read and write its missing-id guard
        table, read the graph tables (a missing id's existence check, keys only) and
        publish missing ids."""
        out: list[pulumi.CustomResource] = [
            gcp.bigtable.TableIamMember(
                f"lookup-reads-{dataset}",
                instance_name=storage.instance_name,
                table=table,
                role="roles/bigtable.reader",
                member=member,
                project=cfg.bigtable_project,
                opts=child_opts(self),
            )
            for dataset, table in storage.served_tables().items()
        ]
        out += [  # the switch-over's existing tables: read for the ids a cache table lacks
            gcp.bigtable.TableIamMember(
                f"lookup-reads-fallback-{dataset}",
                instance_name=storage.instance_name,
                table=table,
                role="roles/bigtable.reader",
                member=member,
                project=cfg.bigtable_project,
                opts=child_opts(self),
            )
            for dataset, table in storage.fallback_tables.items()
        ]
        out.append(  # per-id state and the bounded wait: a failed id's reason, by key
            gcp.bigtable.TableIamMember(
                "lookup-reads-runs",
                instance_name=storage.instance_name,
                table=storage.runs.name,
                role="roles/bigtable.reader",
                member=member,
                project=cfg.bigtable_project,
                opts=child_opts(self),
            )
        )
        out.append(
            gcp.bigtable.TableIamMember(
                "lookup-writes-guard",
                instance_name=storage.instance_name,
                table=storage.guard.name,
                role="roles/bigtable.user",
                member=member,
                project=cfg.bigtable_project,
                opts=child_opts(self),
            )
        )
        for i, inst in enumerate(cfg.graph_instances):
            project, instance = inst.split("/")[1], inst.split("/")[3]
            out.append(
                gcp.bigtable.InstanceIamMember(
                    f"lookup-reads-graph-{i}",
                    instance=instance,
                    project=project,
                    role="roles/bigtable.reader",
                    member=member,
                    opts=child_opts(self),
                )
            )
        out.append(
            gcp.pubsub.TopicIAMMember(
                "lookup-publishes-missing",
                topic=missing_topic.name,
                role="roles/pubsub.publisher",
                member=member,
                project=cfg.project,
                opts=child_opts(self),
            )
        )
        return out

    def _auth_token_access(
        self, cfg: StackConfig, member: pulumi.Output[str]
    ) -> list[gcp.secretmanager.SecretIamMember]:
        """Lookup may read the operator's CAVE service token secret (``AUTH_TOKEN``, what
        the existing service uses to ask the auth service which dataset a table belongs
        to). The secret itself is the operator's: a credential never passes through
        this program."""
        if not cfg.auth_token_secret:
            return []
        return [
            gcp.secretmanager.SecretIamMember(
                "lookup-reads-auth-token",
                secret_id=cfg.auth_token_secret,
                project=cfg.project,
                role="roles/secretmanager.secretAccessor",
                member=member,
                opts=child_opts(self),
            )
        ]
