"""The whole local stack on 127.0.0.1: emulators, the three functions, topics, queue.

The same code paths as the cloud run here; only endpoints differ. ``LocalStack``
starts everything on free ports, writes the dataset map (``l2cache.yaml``) and a state
file (``local-stack.json``) into its directory, and stops every process group on exit.
``l2cache local up|down`` wrap it for a shell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from l2cache.gcp.bigtable import bigtable_instance

from .emulators import (
    Emulator,
    free_port,
    ready,
    start_bigtable_emulator,
    start_pubsub_emulator,
)
from .functions import FunctionRuntime, start_function

PROJECT = "l2cache-local"
INSTANCE = "l2cache"
LOCATION = "us-east1"
QUEUE = "l2cache-compute"
EDITS_QUEUE = "l2cache-compute-edits"  # multi-chunk edits: never behind a bulk run
EDITS_WORKERS = 1  # compute_chunk processes kept for the edits queue alone
# the warm-up ramp of leaf span tasks, faster than the cloud's (5/s, x1.5 per 5 min) so a
# local run is not slowed: every leaf of a small run is due within a second
LOCAL_RAMP = {"start_per_s": 50, "growth": 1.5, "step_s": 60, "max_per_s": 500}
EDITS_TOPIC = "pcg-edits"
MISSING_TOPIC = "l2cache-missing-ids"
DEAD_LETTER_TOPIC = "l2cache-dead-letter"
STATE_FILE = "local-stack.json"
CONFIG_FILE = "l2cache.yaml"
MAX_DELIVERY_ATTEMPTS = 5


def start_tasks_emulator(log_dir: Path) -> Emulator:
    """The Cloud Tasks emulator: ``l2cache_tools.local.tasks_emulator`` under this
    interpreter (the other emulators come from the Cloud SDK), in its own process group
    so :meth:`LocalStack.stop` and ``local down`` stop it like the others."""
    port = free_port()
    log = open(Path(log_dir) / "tasks-emulator.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "l2cache_tools.local.tasks_emulator", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    emu = Emulator("tasks", port, proc, {"L2CACHE_TASKS_EMULATOR_HOST": f"127.0.0.1:{port}"})
    return ready(emu, 30)


class LocalStack:
    """Start with ``with LocalStack(dir) as stack:``; ``stack.env`` reaches everything."""

    def __init__(
        self,
        directory: Path,
        compute_workers: int = 2,
        max_attempts: int = 5,
        attempt_deadline_s: int = 120,
        runtimes: Callable[[LocalStack], Mapping[str, FunctionRuntime]] | None = None,
    ) -> None:
        """``runtimes``, when given, is called once the emulators run and the dataset map
        exists (with its compute URL), before any function starts: it may add datasets
        and returns how to run each function as deployed (functions it leaves out run
        from the repository as usual). Those get only the emulator endpoints from the
        stack, everything else from their runtime's environment."""
        self.dir = Path(directory).resolve()
        self.runtimes = runtimes
        self.compute_workers = compute_workers
        self.max_attempts = max_attempts
        self.attempt_deadline_s = attempt_deadline_s
        self.processes: list[Emulator] = []
        self.env: dict[str, str] = {}
        self.urls: dict[str, str] = {}

    @property
    def config_path(self) -> Path:
        """The stack's dataset map: ``L2CACHE_CONFIG`` points every process here."""
        return self.dir / CONFIG_FILE

    def base_config(self, compute_url: str) -> dict[str, Any]:
        """The map's service sections for this stack (no dataset): what :meth:`start`
        writes, or refreshes in a map kept from an earlier start, since ports change."""
        return {
            "bigtable": {"project": PROJECT, "instance": INSTANCE},
            "pubsub": {
                "project": PROJECT,
                "missing_ids_topic": MISSING_TOPIC,
                "edits_topic": EDITS_TOPIC,
                "dead_letter_topic": DEAD_LETTER_TOPIC,
                "max_delivery_attempts": MAX_DELIVERY_ATTEMPTS,
            },
            "tasks": {
                "project": PROJECT,
                "location": LOCATION,
                "queue": QUEUE,
                "edits_queue": EDITS_QUEUE,
                "ramp": dict(LOCAL_RAMP),
                "compute_url": compute_url,
                "max_attempts": self.max_attempts,
                "attempt_deadline_s": self.attempt_deadline_s,
            },
            "max_ids_per_request": 200_000,
            "runs_table_id": "l2cache_runs",
            "datasets": {},
        }

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Emulators first, then the map, the runs table and the functions that read
        them, then topics, subscriptions and the queue that point at the functions."""
        self.dir.mkdir(parents=True, exist_ok=True)
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        bt = start_bigtable_emulator(log_dir=logs)
        self.processes.append(bt)
        ps = start_pubsub_emulator(self.dir / "pubsub-data", log_dir=logs)
        self.processes.append(ps)
        tasks = start_tasks_emulator(logs)
        self.processes.append(tasks)
        self.env = {**bt.env, **ps.env, **tasks.env, "L2CACHE_CONFIG": str(self.config_path)}
        os.environ.update(self.env)
        compute_port = free_port()
        compute_url = f"http://127.0.0.1:{compute_port}/"
        if not self.config_path.exists():
            self.config_path.write_text(yaml.safe_dump(self.base_config(compute_url)))
        else:  # keep datasets, refresh endpoints
            cfg = yaml.safe_load(self.config_path.read_text())
            cfg.update({k: v for k, v in self.base_config(compute_url).items() if k != "datasets"})
            self.config_path.write_text(yaml.safe_dump(cfg))
        instance = bigtable_instance(PROJECT, INSTANCE, admin=True)
        from l2cache.store.ledger import create_runs_table

        create_runs_table(instance, "l2cache_runs")
        from l2cache.store.missing_guard import create_guard_table

        create_guard_table(instance, "l2cache_lookup_guard")  # the lookup's missing-id guard
        runtimes = dict(self.runtimes(self)) if self.runtimes else {}
        fn_env = {**self.env, "PYTHONUNBUFFERED": "1", "NUMBA_CACHE_DIR": str(self.dir / "numba")}
        # a deployed-mode function gets the endpoints, never the repo's map or cache dir
        endpoints = {k: v for k, v in self.env.items() if k != "L2CACHE_CONFIG"}
        endpoints["PYTHONUNBUFFERED"] = "1"

        def env_for(name: str, extra: dict[str, str]) -> dict[str, str]:
            return {**(endpoints if name in runtimes else fn_env), **extra}

        self.processes.append(
            start_function(
                "compute_chunk",
                env_for(
                    "compute_chunk",
                    {"WORKERS": str(self.compute_workers + EDITS_WORKERS), "THREADS": "1"},
                ),
                port=compute_port,
                log_dir=logs,
                runtime=runtimes.get("compute_chunk"),
            )
        )
        lookup = start_function(
            "lookup", env_for("lookup", {}), log_dir=logs, runtime=runtimes.get("lookup")
        )
        self.processes.append(lookup)
        on_edit = start_function(
            "on_edit",
            env_for("on_edit", {"WORKERS": "1", "THREADS": "2"}),
            signature_type="cloudevent",
            log_dir=logs,
            runtime=runtimes.get("on_edit"),
        )
        self.processes.append(on_edit)
        self.urls = {
            "compute_chunk": compute_url,
            "lookup": f"http://{lookup.host}",
            "on_edit": f"http://{on_edit.host}",
        }
        self._create_messaging()
        self._create_queue()
        self.write_state()

    def _create_messaging(self) -> None:
        from google.cloud import pubsub_v1
        from google.protobuf import duration_pb2
        from google.pubsub_v1.types import DeadLetterPolicy, PushConfig, RetryPolicy

        pub = pubsub_v1.PublisherClient()
        sub = pubsub_v1.SubscriberClient()
        for topic in (EDITS_TOPIC, MISSING_TOPIC, DEAD_LETTER_TOPIC):
            pub.create_topic(name=pub.topic_path(PROJECT, topic))
        dead = pub.topic_path(PROJECT, DEAD_LETTER_TOPIC)
        for topic in (EDITS_TOPIC, MISSING_TOPIC):
            path = pub.topic_path(PROJECT, topic)
            sub.create_subscription(
                request={
                    "name": sub.subscription_path(PROJECT, f"{topic}-on-edit"),
                    "topic": path,
                    # the event source is taken from the push URL path
                    "push_config": PushConfig(
                        push_endpoint=f"{self.urls['on_edit']}/projects/{PROJECT}/topics/{topic}"
                    ),
                    "ack_deadline_seconds": 60,
                    "retry_policy": RetryPolicy(
                        minimum_backoff=duration_pb2.Duration(seconds=1),
                        maximum_backoff=duration_pb2.Duration(seconds=10),
                    ),
                    "dead_letter_policy": DeadLetterPolicy(
                        dead_letter_topic=dead, max_delivery_attempts=MAX_DELIVERY_ATTEMPTS
                    ),
                }
            )
        sub.create_subscription(
            name=sub.subscription_path(PROJECT, "dead-letter-inspect"), topic=dead
        )

    def _create_queue(self) -> None:
        from l2cache.config import load_config
        from l2cache.gcp.tasks import ensure_queue, tasks_client

        cfg = load_config(self.config_path)
        client = tasks_client()
        # the bulk queue may occupy compute_workers processes, the edits queue the one
        # more process started for it: an edit never waits for a bulk task to finish
        for queue, concurrent in (
            (cfg.tasks.queue, self.compute_workers),
            (cfg.tasks.edits_queue_name, EDITS_WORKERS),
        ):
            ensure_queue(
                client,
                cfg.tasks,
                max_attempts=self.max_attempts,
                min_backoff_s=0.2,
                max_backoff_s=5,
                max_concurrent=concurrent,
                queue=queue,
            )

    def write_state(self) -> None:
        """Record the endpoints and process ids, so ``l2cache local down`` can stop a
        stack another process started."""
        state = {
            "env": self.env,
            "urls": self.urls,
            "pids": {p.name: p.process.pid for p in self.processes},
            "started_at": time.time(),
        }
        (self.dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def stop(self) -> None:
        """Stop every process group, newest first, going on past any that fails to stop,
        and remove the state file so ``local down`` finds nothing left to stop."""
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - stop everything we can
                pass
        self.processes = []
        (self.dir / STATE_FILE).unlink(missing_ok=True)


def stop_from_state(directory: Path) -> int:
    """Stop a stack started by ``l2cache local up`` (its process groups)."""
    import signal

    path = Path(directory) / STATE_FILE
    if not path.exists():
        return 0
    state = json.loads(path.read_text())
    stopped = 0
    for pid in state["pids"].values():
        try:
            os.killpg(pid, signal.SIGTERM)
            stopped += 1
        except ProcessLookupError:
            pass
    path.unlink()
    return stopped
