"""Service accounts, one per role; each component grants its own least-privilege access.

- lookup: reads the cache tables and (keys only) the graph tables, reads and writes its
  missing-id guard table, publishes missing ids. Nothing else (Lookup's grants).
- worker (compute_chunk, on_edit): reads graph tables and segmentation, writes cache
  and runs tables, enqueues split tasks, publishes dead letters (Workers' grants).
- tasks-invoker: the OIDC identity Cloud Tasks uses to call compute_chunk; the only
  principal allowed to invoke it.
- pubsub-push: the OIDC identity of the push subscriptions; the only principal
  allowed to invoke on_edit.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp
from children import COMPONENT_TYPE, child_opts

ROLES = {
    "lookup": "l2cache lookup (reads the cache)",
    "worker": "l2cache compute_chunk and on_edit (writes the cache)",
    "tasks-invoker": "Cloud Tasks OIDC identity for compute_chunk",
    "pubsub-push": "Pub/Sub push OIDC identity for on_edit",
}


def member(sa: gcp.serviceaccount.Account) -> pulumi.Output[str]:
    """``serviceAccount:<email>``, the form every IAM grant names an account in; an
    Output, since the email is known only once the account exists."""
    return sa.email.apply(lambda e: f"serviceAccount:{e}")


class ServiceAccounts(pulumi.ComponentResource):
    """The four identities. Grants live with the component whose resource they open
    (Lookup, Workers, Messaging), so each component shows all the access it gives."""

    lookup: gcp.serviceaccount.Account
    worker: gcp.serviceaccount.Account
    tasks_invoker: gcp.serviceaccount.Account
    pubsub_push: gcp.serviceaccount.Account

    def __init__(self, name: str, project: str, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(COMPONENT_TYPE.format("ServiceAccounts"), name, None, opts)
        accounts = {
            key: gcp.serviceaccount.Account(
                f"sa-{key}",
                account_id=f"l2cache-{key}",
                display_name=text,
                project=project,
                opts=child_opts(self),
            )
            for key, text in ROLES.items()
        }
        self.lookup = accounts["lookup"]
        self.worker = accounts["worker"]
        self.tasks_invoker = accounts["tasks-invoker"]
        self.pubsub_push = accounts["pubsub-push"]
        self.register_outputs(
            {f"{key.replace('-', '_')}_email": sa.email for key, sa in accounts.items()}
        )
