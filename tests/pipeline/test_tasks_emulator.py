"""The extended Cloud Tasks emulator does what the local stack relies on.

Loopback-only binding, the queue's retry config (backoff, max attempts), bounded
concurrent dispatch and GetTask, checked against a recording HTTP target on 127.0.0.1.
That no further attempt comes is shown by the task being gone from the emulator
(GetTask NOT_FOUND: it succeeded or was dropped), never by sleeping.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
from google.api_core.exceptions import NotFound

from l2cache.config import TasksConfig
from l2cache.gcp.tasks import enqueue, ensure_queue, tasks_client
from l2cache_tools.local.stack import start_tasks_emulator


class Target(BaseHTTPRequestHandler):
    calls: dict[str, list[float]] = {}
    fail_first: dict[str, int] = {}
    active = 0
    max_active = 0
    lock = threading.Lock()
    release = threading.Event()  # requests to /hold answer once it is set

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        key = self.path
        with Target.lock:
            Target.calls.setdefault(key, []).append(time.monotonic())
            n = len(Target.calls[key])
            Target.active += 1
            Target.max_active = max(Target.max_active, Target.active)
        if key.startswith("/slow"):
            time.sleep(0.4)
        if key.startswith("/hold"):
            Target.release.wait(20)
        with Target.lock:
            Target.active -= 1
        status = 503 if n <= Target.fail_first.get(key, 0) else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    emu = start_tasks_emulator(tmp_path_factory.mktemp("tasks"))
    old = os.environ.get("L2CACHE_TASKS_EMULATOR_HOST")
    os.environ.update(emu.env)
    yield emu, f"http://127.0.0.1:{httpd.server_address[1]}"
    emu.stop()
    httpd.shutdown()
    if old is None:
        os.environ.pop("L2CACHE_TASKS_EMULATOR_HOST", None)
    else:
        os.environ["L2CACHE_TASKS_EMULATOR_HOST"] = old


def queue(name: str, url: str, **kw) -> TasksConfig:
    cfg = TasksConfig(project="p", location="l", queue=name, compute_url=url)
    ensure_queue(tasks_client(), cfg, **kw)
    return cfg


def wait_calls(path: str, n: int, timeout: float = 20) -> list[float]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(Target.calls.get(path, [])) >= n:
            return Target.calls[path]
        time.sleep(0.02)
    raise AssertionError(f"{path}: {len(Target.calls.get(path, []))} calls, wanted {n}")


def wait_gone(name: str, timeout: float = 20) -> None:
    """Until GetTask says NOT_FOUND: the task succeeded or was dropped after its last
    attempt, so no attempt of it can come any more (bounded; fails loudly)."""
    client = tasks_client()
    end = time.monotonic() + timeout
    while True:
        try:
            task = client.get_task(name=name)
        except NotFound:
            return
        if time.monotonic() > end:
            raise AssertionError(
                f"{name} still held after {timeout:.0f}s ({task.dispatch_count} attempts)"
            )
        time.sleep(0.02)


def test_listens_on_loopback_only(setup):
    emu, _ = setup
    listening = [
        c
        for c in psutil.Process(emu.process.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(_loopback(c.laddr.ip) for c in listening)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_failed_task_is_retried_with_backoff_until_success(setup):
    _, url = setup
    Target.fail_first["/retry"] = 2
    cfg = queue("retry-q", f"{url}/retry", max_attempts=5, min_backoff_s=0.3, max_backoff_s=5)
    name = enqueue(tasks_client(), cfg, {"x": 1})
    calls = wait_calls("/retry", 3)
    wait_gone(name)
    assert len(Target.calls["/retry"]) == 3  # succeeded on the third attempt, then stopped
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.28 and gaps[1] >= 0.58  # 0.3 s, then doubled


def test_gives_up_after_max_attempts(setup):
    _, url = setup
    Target.fail_first["/always"] = 10**6
    cfg = queue("giveup-q", f"{url}/always", max_attempts=3, min_backoff_s=0.1, max_backoff_s=0.2)
    name = enqueue(tasks_client(), cfg, {"x": 2})
    wait_calls("/always", 3)
    wait_gone(name)  # dropped: no fourth attempt can come
    assert len(Target.calls["/always"]) == 3


def test_dispatches_up_to_max_concurrent(setup):
    _, url = setup
    Target.max_active = 0
    cfg = queue("slow-q", f"{url}/slow", max_concurrent=2)
    client = tasks_client()
    for i in range(5):
        enqueue(client, cfg, {"i": i})
    wait_calls("/slow", 5)
    assert Target.max_active == 2


def test_get_task_answers_until_the_task_is_done(setup):
    """What ``wait_gone`` relies on: GetTask finds a task while it is pending and while
    its attempt is in flight (the target holds it), and NOT_FOUND once it succeeded."""
    _, url = setup
    Target.release.clear()
    cfg = queue("hold-q", f"{url}/hold")
    client = tasks_client()
    client.pause_queue(name=client.queue_path("p", "l", "hold-q"))
    name = enqueue(client, cfg, {"x": 3})
    assert client.get_task(name=name).dispatch_count == 0  # pending
    client.resume_queue(name=client.queue_path("p", "l", "hold-q"))
    wait_calls("/hold", 1)
    try:
        assert client.get_task(name=name).dispatch_count == 1  # in flight
    finally:
        Target.release.set()
    wait_gone(name)
    with pytest.raises(NotFound):
        client.get_task(name=f"{client.queue_path('p', 'l', 'hold-q')}/tasks/never-created")
    assert len(Target.calls["/hold"]) == 1
