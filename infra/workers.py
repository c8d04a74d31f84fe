"""The Workers component: compute_chunk and on_edit, the task queue, and their access.

Both functions run as the worker identity, one chunk per instance at a time (memory is
sized for exactly one chunk, sizing.py). compute_chunk is invoked only by Cloud Tasks
(the tasks-invoker identity) and on_edit only by Pub/Sub push (the push identity).
The worker reads graph tables and segmentation, writes the cache tables l2cache owns
(never an existing one) and the runs table, enqueues split tasks that carry the
tasks-invoker's token, and publishes the messages it dead-letters itself.
"""

from __future__ import annotations

import iam
import pulumi
import pulumi_gcp as gcp
import sizing
import tasks
from children import COMPONENT_TYPE, child_opts
from config import StackConfig
from iam import ServiceAccounts
from storage import Storage

import functions


class Workers(pulumi.ComponentResource):
    """compute_chunk, on_edit, the queue, who may invoke them, what the worker may do:
    one component because both functions run as the one worker identity, whose whole
    access is then declared here."""

    sources: dict[str, gcp.storage.BucketObject]  # function name -> its archive
    compute_chunk: gcp.cloudfunctionsv2.Function
    on_edit: gcp.cloudfunctionsv2.Function
    queue: gcp.cloudtasks.Queue
    edits_queue: gcp.cloudtasks.Queue  # multi-chunk edits, never behind a bulk run
    invokers: list[gcp.cloudrunv2.ServiceIamMember]
    grants: list[pulumi.CustomResource]
    compute_chunk_url: pulumi.Output[str]  # the dataset map's tasks.compute_url
    on_edit_url: pulumi.Output[str]  # the push endpoint
    queue_id: pulumi.Output[str]
    edits_queue_id: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        accounts: ServiceAccounts,
        storage: Storage,
        dead_letter_topic: gcp.pubsub.Topic,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(COMPONENT_TYPE.format("Workers"), name, None, opts)
        env = functions.function_env()
        self.sources = {
            fn: functions.upload(fn, cfg, storage.bucket, child_opts(self))
            for fn in ("compute_chunk", "on_edit")
        }
        # on_edit reads one chunk at a time; compute_chunk may read the next one ahead
        self.compute_chunk = functions.function(
            "compute_chunk",
            cfg,
            self.sources["compute_chunk"],
            accounts.worker,
            sizing.worker_memory_mib(cfg.chunk_size, cfg.map_read_ahead),
            sizing.worker_timeout_s(cfg.chunk_size, cfg.chunks_per_task),
            cfg.worker_max_instances,
            sizing.WORKER_REQUESTS_PER_INSTANCE,
            env,
            child_opts(self),
        )
        self.on_edit = functions.function(
            "on_edit",
            cfg,
            self.sources["on_edit"],
            accounts.worker,
            sizing.worker_memory_mib(cfg.chunk_size),
            sizing.on_edit_timeout_s(cfg.chunk_size, cfg.chunks_per_task),
            cfg.worker_max_instances,
            sizing.WORKER_REQUESTS_PER_INSTANCE,
            env,
            child_opts(self),
        )
        self.queue = tasks.queue(cfg, child_opts(self))
        self.edits_queue = tasks.edits_queue(cfg, child_opts(self))
        self.invokers = [
            functions.invoker(
                "compute_chunk",
                self.compute_chunk,
                cfg,
                iam.member(accounts.tasks_invoker),
                child_opts(self),
            ),
            functions.invoker(
                "on_edit", self.on_edit, cfg, iam.member(accounts.pubsub_push), child_opts(self)
            ),
        ]
        self.grants = self._grants(cfg, accounts, storage, dead_letter_topic)
        self.compute_chunk_url = self.compute_chunk.url
        self.on_edit_url = self.on_edit.url
        self.queue_id = self.queue.id
        self.edits_queue_id = self.edits_queue.id
        self.register_outputs(
            {
                "compute_chunk_url": self.compute_chunk_url,
                "on_edit_url": self.on_edit_url,
                "queue": self.queue_id,
                "edits_queue": self.edits_queue_id,
            }
        )

    def _grants(
        self,
        cfg: StackConfig,
        accounts: ServiceAccounts,
        storage: Storage,
        dead_letter_topic: gcp.pubsub.Topic,
    ) -> list[pulumi.CustomResource]:
        """Exactly what the worker identity may do (see the module docstring)."""
        worker = iam.member(accounts.worker)
        out: list[pulumi.CustomResource] = []
        # served-only (existing) tables are absent here: l2cache never writes a table it
        # does not own
        tables = {dataset: t.name for dataset, t in storage.cache_tables.items()}
        for key, table in [*sorted(tables.items()), ("runs", storage.runs.name)]:
            out.append(
                gcp.bigtable.TableIamMember(
                    f"worker-writes-{key}",
                    instance_name=storage.instance_name,
                    table=table,
                    role="roles/bigtable.user",
                    member=worker,
                    project=cfg.bigtable_project,
                    opts=child_opts(self),
                )
            )
        # poison messages: on_edit dead-letters what can never succeed itself
        out.append(
            gcp.pubsub.TopicIAMMember(
                "worker-publishes-dead-letters",
                topic=dead_letter_topic.name,
                role="roles/pubsub.publisher",
                member=worker,
                project=cfg.project,
                opts=child_opts(self),
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
                    opts=child_opts(self),
                )
            )
        for i, bucket in enumerate(cfg.segmentation_buckets):
            out.append(
                gcp.storage.BucketIAMMember(
                    f"worker-reads-segmentation-{i}",
                    bucket=bucket,
                    role="roles/storage.objectViewer",
                    member=worker,
                    opts=child_opts(self),
                )
            )
        # split tasks: the worker enqueues sub-tasks that carry the tasks-invoker's OIDC token
        out.append(
            gcp.cloudtasks.QueueIamMember(
                "worker-enqueues",
                name=self.queue.name,
                location=cfg.region,
                project=cfg.project,
                role="roles/cloudtasks.enqueuer",
                member=worker,
                opts=child_opts(self),
            )
        )
        # multi-chunk edits: on_edit (the worker account) enqueues them on the edits queue
        out.append(
            gcp.cloudtasks.QueueIamMember(
                "worker-enqueues-edits",
                name=self.edits_queue.name,
                location=cfg.region,
                project=cfg.project,
                role="roles/cloudtasks.enqueuer",
                member=worker,
                opts=child_opts(self),
            )
        )
        out.append(
            gcp.serviceaccount.IAMMember(
                "worker-acts-as-tasks-invoker",
                service_account_id=accounts.tasks_invoker.name,
                role="roles/iam.serviceAccountUser",
                member=worker,
                opts=child_opts(self),
            )
        )
        return out
