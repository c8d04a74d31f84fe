"""gcloud-tasks-emulator, extended where the local stack relies on Cloud Tasks behaviour.

Measured gaps of gcloud-tasks-emulator 0.6.2 (see the README) and what this module
changes, keeping its gRPC API (so ``google-cloud-tasks`` talks to it unchanged):

- it listens on all interfaces -> the API binds 127.0.0.1 only;
- it retries every ~0.1 s forever, ignoring the queue's retry config -> failed tasks
  are retried after exponential backoff between the queue's min and max backoff and
  dropped (logged, counted) after ``max_attempts``;
- it dispatches one task at a time per queue -> up to the queue's
  ``max_concurrent_dispatches`` tasks run at once, as on Cloud Tasks;
- it ignores ``UpdateQueue`` ("no effect currently") -> the fields named in the update
  mask (or rate limits and retry config without one) are applied, and the dispatcher
  picks up a new ``max_concurrent_dispatches`` on its next tick (``l2cache runs scale``);
- ``PauseQueue``/``ResumeQueue`` only flip the state, and an unknown queue is an
  UNKNOWN error -> a paused queue dispatches nothing until resumed (attempts already in
  flight finish, as on Cloud Tasks), and an unknown queue is NOT_FOUND
  (``l2cache runs pause|resume``);
- it accepts duplicate task names -> a second task with a name already used in the
  queue (pending or already run, as Cloud Tasks' tombstones) fails with ALREADY_EXISTS,
  which is what makes named split tasks idempotent;
- it has no ``GetTask`` -> a task is answered while it exists (pending, or an attempt
  in flight) and is NOT_FOUND once it succeeded or was dropped after its last attempt,
  as on Cloud Tasks: a test waits for that instead of sleeping to see that no further
  attempt comes.

Run: ``python -m l2cache_tools.local.tasks_emulator --port N``.
"""

from __future__ import annotations

import argparse
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib import error

import grpc
from gcloud_tasks_emulator import server as upstream
from google.api_core.exceptions import AlreadyExists, GoogleAPICallError, NotFound
from google.cloud.tasks_v2 import Queue, Task

if TYPE_CHECKING:  # annotations only
    from google.cloud.tasks_v2 import GetTaskRequest, UpdateQueueRequest
    from google.protobuf.duration_pb2 import Duration

log = logging.getLogger("l2cache.tasks-emulator")
HOST = "127.0.0.1"
DEFAULT_CONCURRENCY = 2
TICK_S = 0.02  # the longest a due task waits: new tasks and finished attempts wake at once


def _seconds(duration: timedelta | Duration | None, default: float) -> float:
    """A retry-config duration in seconds (proto-plus hands out a ``timedelta``, a raw
    message a ``Duration``); unset or zero means ``default``."""
    if duration is None:
        return default
    try:
        value = duration.total_seconds()
    except AttributeError:
        value = duration.seconds + duration.nanos / 1e9
    return value or default


class RetryingQueueState(upstream.QueueState):
    """Queue state with retry backoff, max attempts and a record of abandoned tasks."""

    def __init__(self) -> None:
        super().__init__(upstream.DEFAULT_TARGET_HOST, upstream.DEFAULT_TARGET_PORT, -1)
        self.abandoned: list[str] = []
        self.dispatched = 0
        self._names: set[str] = set()
        self._names_lock = threading.Lock()
        self.changed = threading.Event()  # a task was added: the dispatcher looks now
        # attempts in flight (for GetTask), by id(): a task is here or in its queue from
        # creation until it is done; the lock makes each move between them one step
        self._in_flight: dict[int, Task] = {}
        self._tasks_lock = threading.Lock()

    def create_task(self, queue: str, task: Task) -> Task:
        """Upstream's create_task, refusing a name the queue has already seen."""
        if task.name:
            with self._names_lock:
                if task.name in self._names:
                    raise AlreadyExists(f"Requested entity already exists: {task.name}")
                self._names.add(task.name)
        else:
            task.name = f"{queue}/tasks/{uuid.uuid4().hex}"
        created = super().create_task(queue, task)
        self.changed.set()
        return created

    def _known(self, queue_name: str) -> None:
        """Raise NOT_FOUND for an unknown queue, as Cloud Tasks does (upstream: UNKNOWN)."""
        if queue_name not in self._queues:
            raise NotFound(f"Queue {queue_name} does not exist.")

    def pause_queue(self, queue_name: str) -> Queue:
        """Upstream's pause, NOT_FOUND for an unknown queue as on Cloud Tasks, so
        ``runs pause`` fails locally the way it would in production."""
        self._known(queue_name)
        return super().pause_queue(queue_name)

    def resume_queue(self, queue_name: str) -> Queue:
        """Upstream's resume, NOT_FOUND for an unknown queue (as :meth:`pause_queue`)."""
        self._known(queue_name)
        return super().resume_queue(queue_name)

    def update_queue_fields(self, queue: Queue, paths: list[str]) -> Queue:
        """Cloud Tasks' UpdateQueue: copy the masked fields (default: rate limits and
        retry config) onto the stored queue; an unknown queue is created, as upstream."""
        if queue.name not in self._queues:
            return self.create_queue(None, queue)
        stored = self._queues[queue.name]
        for path in paths or ["rate_limits", "retry_config"]:
            *parents, leaf = path.split(".")
            src, dst = queue, stored
            for part in parents:
                src, dst = getattr(src, part), getattr(dst, part)
            setattr(dst, leaf, getattr(src, leaf))
            if parents:  # proto-plus returns nested messages by reference: write back
                setattr(stored, parents[0], getattr(stored, parents[0]))
        log.info("queue %s updated: %s", queue.name, ", ".join(paths) or "rate/retry")
        return stored

    def take_due(self, queue_name: str, limit: int) -> list[Task]:
        """Remove and return up to ``limit`` tasks whose schedule time has come."""
        now = datetime.now(UTC)
        due = []
        for task in list(self._queue_tasks.get(queue_name, [])):
            if len(due) >= limit:
                break
            st = task.schedule_time
            if st and st.replace(tzinfo=UTC) > now:
                continue
            with self._tasks_lock:
                try:
                    self._queue_tasks[queue_name].remove(task)
                except ValueError:
                    continue
                self._in_flight[id(task)] = task
            due.append(task)
        return due

    def get_task(self, name: str) -> Task:
        """Cloud Tasks' GetTask: the task while it is pending or being dispatched;
        NOT_FOUND once it succeeded or was dropped after its last attempt."""
        queue_name = name.rsplit("/tasks/", 1)[0]
        self._known(queue_name)
        with self._tasks_lock:
            for task in [*self._in_flight.values(), *self._queue_tasks.get(queue_name, [])]:
                if task.name == name:
                    return task
        raise NotFound(f"Task {name} does not exist.")

    def dispatch(self, queue_name: str, task: Task) -> None:
        """Run one attempt; a task that is done (succeeded or dropped) leaves the
        in-flight set, so GetTask answers NOT_FOUND for it from then on."""
        requeued = False
        try:
            requeued = self._attempt(queue_name, task)
        finally:
            if not requeued:  # done: succeeded or dropped (a requeued one moved already)
                with self._tasks_lock:
                    self._in_flight.pop(id(task), None)

    def _attempt(self, queue_name: str, task: Task) -> bool:
        """One attempt; True when the task went back to its queue for a retry."""
        task.dispatch_count += 1
        self.dispatched += 1
        try:
            response = upstream._make_task_request(queue_name, task, self._target_host, 0)
            status = response.status
        except error.HTTPError as exc:
            status = exc.code
        except Exception as exc:  # connection refused, reset, ...
            log.warning("task %s: %s", task.name, exc)
            status = 503
        if 200 <= status < 300:
            return False
        queue: Queue = self._queues[queue_name]
        rc = queue.retry_config
        max_attempts = rc.max_attempts if rc and rc.max_attempts else -1
        if 0 < max_attempts <= task.dispatch_count:
            log.warning("giving up task %s after %d attempts", task.name, task.dispatch_count)
            self.abandoned.append(task.name)
            return False
        lo = _seconds(rc.min_backoff if rc else None, 0.1)
        hi = _seconds(rc.max_backoff if rc else None, 3600.0)
        delay = min(hi, lo * 2 ** (task.dispatch_count - 1))
        task.schedule_time = datetime.now(UTC) + timedelta(seconds=delay)
        with self._tasks_lock:  # one step: never in neither place, never taken twice
            self._queue_tasks[queue_name].append(task)
            self._in_flight.pop(id(task), None)
        return True


class Servicer(upstream.Greeter):
    """Upstream's servicer with UpdateQueue honouring the update mask, and GetTask."""

    def UpdateQueue(  # noqa: N802 - gRPC method name
        self, request: UpdateQueueRequest, context: grpc.ServicerContext
    ) -> Queue:
        """Apply the fields the update mask names (upstream ignores UpdateQueue), so
        ``runs scale`` changes the dispatch concurrency of a running queue."""
        try:
            return self._state.update_queue_fields(request.queue, list(request.update_mask.paths))
        except GoogleAPICallError as err:
            context.abort(err.grpc_status_code, err.message)

    def GetTask(  # noqa: N802 - gRPC method name
        self, request: GetTaskRequest, context: grpc.ServicerContext
    ) -> Task:
        """The task while it exists (upstream has no GetTask), so a test can wait for
        a task to be finished instead of sleeping."""
        try:
            return self._state.get_task(request.name)
        except GoogleAPICallError as err:
            context.abort(err.grpc_status_code, err.message)


class ConcurrentProcessor(threading.Thread):
    """Dispatch due tasks of every running queue with bounded concurrency.

    It looks for due tasks when a task is created or an attempt ends, else every
    ``TICK_S`` (scheduled retries, resumed queues): a fixed poll alone left each worker
    idle ~10 ms on average between tasks (1.35 s per 64-chunk ingest with one worker).
    """

    def __init__(self, state: RetryingQueueState) -> None:
        super().__init__(daemon=True)
        self.state = state
        self.running = threading.Event()
        self.pools: dict[str, tuple[int, ThreadPoolExecutor]] = {}
        self.in_flight: dict[str, int] = {}
        self.lock = threading.Lock()

    def run(self) -> None:
        """Per running queue, start as many due tasks as its concurrency leaves free,
        then wait for a change (or the tick); until ``running`` is cleared."""
        self.running.set()
        while self.running.is_set():
            self.state.changed.clear()  # before looking: a change while looking loops again
            for name in list(self.state.queue_names()):
                queue = self.state._queues.get(name)
                if queue is None or queue.state != Queue.State.RUNNING:
                    continue
                limit = queue.rate_limits.max_concurrent_dispatches or DEFAULT_CONCURRENCY
                size, pool = self.pools.get(name, (0, None))
                if size != limit:  # new concurrency (UpdateQueue): a pool of that size
                    if pool is not None:
                        pool.shutdown(wait=False)  # its attempts in flight still finish
                    pool = ThreadPoolExecutor(limit)
                    self.pools[name] = (limit, pool)
                with self.lock:
                    free = limit - self.in_flight.get(name, 0)
                for task in self.state.take_due(name, max(free, 0)):
                    with self.lock:
                        self.in_flight[name] = self.in_flight.get(name, 0) + 1
                    pool.submit(self._run, name, task)
            self.state.changed.wait(TICK_S)

    def _run(self, name: str, task: Task) -> None:
        try:
            self.state.dispatch(name, task)
        finally:
            with self.lock:
                self.in_flight[name] -= 1
            self.state.changed.set()


def serve(port: int) -> None:
    """Serve the Cloud Tasks API on loopback only (upstream binds every interface) and
    dispatch due tasks until the server stops; the dispatcher stops with it."""
    state = RetryingQueueState()
    api = grpc.server(upstream.futures.ThreadPoolExecutor(max_workers=4))
    upstream.add_CloudTasksServicer_to_server(Servicer(state), api)
    api.add_insecure_port(f"{HOST}:{port}")  # loopback only, unlike upstream's [::]
    api.start()
    processor = ConcurrentProcessor(state)
    processor.start()
    log.info("tasks emulator on %s:%d", HOST, port)
    try:
        api.wait_for_termination()
    finally:
        processor.running.clear()


def main() -> None:
    """The command line the local stack starts the emulator with (``--port N``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(args.port)


if __name__ == "__main__":
    main()
