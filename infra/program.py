"""The whole deployment as components by concern; ``__main__`` exports their outputs.

Each component (``l2cache:index:<Name>``) owns its resources, the grants that open them
and its outputs: ServiceAccounts, Storage, Messaging, Lookup, Workers, Monitoring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import config
import pulumi
import pulumi_gcp as gcp
import routing
from config import StackConfig
from iam import ServiceAccounts
from lookup import Lookup
from messaging import Messaging
from monitoring import Monitoring
from storage import Storage
from workers import Workers


@dataclass(frozen=True)
class Deployment:
    """Every component of one stack, as ``build`` returns it: ``export`` reads their
    outputs from it, and the tests each component's resources."""

    accounts: ServiceAccounts
    storage: Storage
    messaging: Messaging
    lookup: Lookup
    workers: Workers
    monitoring: Monitoring

    @property
    def functions(self) -> dict[str, gcp.cloudfunctionsv2.Function]:
        """The deployed functions by name (one per folder under functions/)."""
        return {
            "lookup": self.lookup.function,
            "compute_chunk": self.workers.compute_chunk,
            "on_edit": self.workers.on_edit,
        }


def build(cfg: StackConfig) -> Deployment:
    """Compose the components; the config is checked first, so nothing is declared
    for a configuration the program refuses."""
    config.validate(cfg)  # also when a StackConfig is built by hand (tests)
    accounts = ServiceAccounts("accounts", cfg.project)
    storage = Storage("storage", cfg)
    # Pub/Sub pushes to on_edit, and the worker publishes to Pub/Sub's dead-letter topic:
    # the push subscriptions take on_edit's URL once Workers has declared it.
    on_edit_url: pulumi.Output[str]
    resolve_on_edit_url: Callable[[pulumi.Output[str]], None]
    on_edit_url, resolve_on_edit_url = pulumi.deferred_output()
    messaging = Messaging(
        "messaging", cfg, push_account=accounts.pubsub_push, on_edit_url=on_edit_url
    )
    lookup = Lookup(
        "lookup", cfg, account=accounts.lookup, storage=storage, missing_topic=messaging.missing
    )
    workers = Workers(
        "workers",
        cfg,
        accounts=accounts,
        storage=storage,
        dead_letter_topic=messaging.dead_letter,
    )
    resolve_on_edit_url(workers.on_edit_url)
    monitoring = Monitoring("monitoring", cfg)
    return Deployment(accounts, storage, messaging, lookup, workers, monitoring)


def export(d: Deployment) -> None:
    """The stack outputs, from the components' outputs (names kept: operators and the
    dataset map read them)."""
    pulumi.export("lookup_url", d.lookup.url)
    pulumi.export("compute_chunk_url", d.workers.compute_chunk_url)
    if d.messaging.edits_topic is not None:  # PCG's topic, subscribed to by path
        pulumi.export("edits_topic", d.messaging.edits_topic)
    pulumi.export("missing_ids_topic", d.messaging.missing.id)
    pulumi.export("dead_letter_topic", d.messaging.dead_letter.id)
    pulumi.export("queue", d.workers.queue_id)
    pulumi.export("edits_queue", d.workers.edits_queue_id)
    pulumi.export("bigtable_instance", d.storage.instance_name)
    pulumi.export("cache_tables", d.storage.cache_table_names)
    pulumi.export("existing_cache_tables", d.storage.existing_tables)
    pulumi.export("runs_table", d.storage.runs.name)
    pulumi.export("tasks_invoker_email", d.accounts.tasks_invoker.email)
    pulumi.export("lookup_ingress", d.lookup.ingress)
    if d.lookup.reach is not None:
        pulumi.export("lookup_backend_service", d.lookup.backend_service)
        pulumi.export("url_map_path_rule", routing.PATH_RULE)
        pulumi.export("url_map_commands", d.lookup.url_map_commands)
        if d.lookup.lb_ip is not None:
            pulumi.export("lookup_lb_ip", d.lookup.lb_ip)
