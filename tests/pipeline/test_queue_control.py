"""``l2cache runs scale|pause|resume`` against the real (extended) Cloud Tasks emulator.

A loopback HTTP target counts the attempts in flight: each request waits until as many
requests as the test expects are in flight at once (or a bounded time passes), so the
peak it records is exactly the queue's concurrency, whatever the machine's speed.
"""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from stackutil import DispatchProbe

from l2cache.config import TasksConfig
from l2cache.gcp.tasks import enqueue, ensure_queue, queue_path, tasks_client
from l2cache_tools.cli import main
from l2cache_tools.local.stack import start_tasks_emulator


class Gate(BaseHTTPRequestHandler):
    cond = threading.Condition()
    active = 0
    peak = 0
    finished = 0
    want = 1  # a request returns once this many are in flight (or after HOLD_S)
    HOLD_S = 1.0

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with Gate.cond:
            Gate.active += 1
            Gate.peak = max(Gate.peak, Gate.active)
            Gate.cond.notify_all()
            Gate.cond.wait_for(lambda: Gate.active >= Gate.want, timeout=Gate.HOLD_S)
            # out of flight before answering: the emulator frees the slot only once it
            # has the answer, so its next request can never be counted with this one
            Gate.active -= 1
            Gate.finished += 1
            Gate.cond.notify_all()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Gate)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    tmp = tmp_path_factory.mktemp("queue-control")
    emu = start_tasks_emulator(tmp)
    saved = os.environ.get("L2CACHE_TASKS_EMULATOR_HOST")
    os.environ.update(emu.env)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    cfg = TasksConfig(project="p", location="l", queue="ctl", compute_url=url)
    ensure_queue(tasks_client(), cfg, max_concurrent=1)
    path = tmp / "map.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "bigtable": {"project": "p", "instance": "i"},
                "tasks": {"project": "p", "location": "l", "queue": "ctl", "compute_url": url},
                "datasets": {
                    "ds": {
                        "segmentation": "file:///nowhere",
                        "graph": {
                            "kind": "bigtable",
                            "project": "p",
                            "instance": "i",
                            "table_id": "ds",
                        },
                        "cache_table_id": "c",
                        "resolution": [1, 1, 1],
                        "voxel_offset": [0, 0, 0],
                        "chunk_size": [8, 8, 8],
                        "spatial_bits": {1: 10, 2: 10},
                    }
                },
            }
        )
    )
    yield cfg, str(path)
    emu.stop()
    httpd.shutdown()
    if saved is None:
        os.environ.pop("L2CACHE_TASKS_EMULATOR_HOST", None)
    else:
        os.environ["L2CACHE_TASKS_EMULATOR_HOST"] = saved


def run_batch(cfg, n: int, want: int, timeout: float = 30) -> int:
    """Enqueue ``n`` tasks, wait until all answered; the peak of attempts in flight."""
    with Gate.cond:
        Gate.peak, Gate.finished, Gate.want = 0, 0, want
    client = tasks_client()
    for _ in range(n):
        enqueue(client, cfg, {"x": 1})
    with Gate.cond:
        assert Gate.cond.wait_for(lambda: Gate.finished >= n, timeout=timeout), Gate.finished
        return Gate.peak


def cli(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_scale_changes_how_many_attempts_run_at_once(setup, capsys):
    cfg, path = setup
    # concurrency 1: each request waits (bounded) for a second one that never comes
    assert run_batch(cfg, 3, want=2) == 1
    out = cli(capsys, "runs", "scale", "ds", "--concurrency", "3", "--config", path)
    assert "max 3 concurrent dispatches" in out
    client = tasks_client()
    assert client.get_queue(name=queue_path(client, cfg)).rate_limits.max_concurrent_dispatches == 3
    # concurrency 3: three requests meet in flight (the gate opens as soon as they do)
    assert run_batch(cfg, 6, want=3) == 3
    cli(capsys, "runs", "scale", "ds", "--concurrency", "1", "--config", path)
    assert run_batch(cfg, 3, want=2) == 1


def test_pause_holds_tasks_until_resume(setup, capsys):
    cfg, path = setup
    assert "paused" in cli(capsys, "runs", "pause", "ds", "--config", path)
    with Gate.cond:
        Gate.finished, Gate.want = 0, 1
    client = tasks_client()
    for _ in range(2):
        enqueue(client, cfg, {"x": 2})
    with DispatchProbe(cfg.project, cfg.location) as probe:
        probe.passed()  # the dispatcher has since looked at every queue: ours stayed paused
    assert Gate.finished == 0
    assert len(list(client.list_tasks(parent=queue_path(client, cfg)))) == 2
    assert "running" in cli(capsys, "runs", "resume", "ds", "--config", path)
    with Gate.cond:
        assert Gate.cond.wait_for(lambda: Gate.finished >= 2, timeout=30)


def test_unknown_queue_is_not_found(setup):
    from google.api_core.exceptions import NotFound

    cfg, _ = setup
    client = tasks_client()
    with pytest.raises(NotFound):
        client.pause_queue(name=queue_path(client, cfg) + "-nope")
