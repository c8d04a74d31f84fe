"""Service accounts, one per role, and the least-privilege grants between them.

- lookup: reads the cache tables, publishes missing ids. Nothing else.
- worker (compute_chunk, on_edit): reads graph tables and segmentation, writes cache
  and runs tables, enqueues split tasks, publishes dead letters.
- tasks-invoker: the OIDC identity Cloud Tasks uses to call compute_chunk; the only
  principal allowed to invoke it.
- pubsub-push: the OIDC identity of the push subscriptions; the only principal
  allowed to invoke on_edit.
"""

from __future__ import annotations

import pulumi_gcp as gcp


def service_accounts(project: str) -> dict[str, gcp.serviceaccount.Account]:
    roles = {
        "lookup": "l2cache lookup (reads the cache)",
        "worker": "l2cache compute_chunk and on_edit (writes the cache)",
        "tasks-invoker": "Cloud Tasks OIDC identity for compute_chunk",
        "pubsub-push": "Pub/Sub push OIDC identity for on_edit",
    }
    return {
        key: gcp.serviceaccount.Account(
            f"sa-{key}", account_id=f"l2cache-{key}", display_name=text, project=project
        )
        for key, text in roles.items()
    }


def member(sa: gcp.serviceaccount.Account):
    return sa.email.apply(lambda e: f"serviceAccount:{e}")
