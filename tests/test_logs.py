"""l2cache.support.logs: one JSON line per chunk / event / lookup, fields the log metrics read."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from l2cache.serving.api import LookupService
from l2cache.support import logs


def lines(capsys) -> list[dict]:
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]


def test_emit_writes_one_json_line_with_the_common_fields():
    buf = io.StringIO()
    logs.emit(
        "chunk",
        stream=buf,
        dataset="d",
        run_id="r",
        chunk=[1, 2, 3],
        status="failed",
        attempts=3,
        error="x" * 5000,
        duration_s=1.5,
    )
    (line,) = buf.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["severity"] == "ERROR" and entry["l2cache"] == "chunk"
    assert {k: entry[k] for k in ("dataset", "run_id", "chunk", "status", "attempts")} == {
        "dataset": "d",
        "run_id": "r",
        "chunk": [1, 2, 3],
        "status": "failed",
        "attempts": 3,
    }
    assert len(entry["error"]) == 2000


def test_chunk_decorator_logs_outcomes_and_transient_raises(capsys):
    ctx = SimpleNamespace(dataset=SimpleNamespace(name="ds"))
    run = SimpleNamespace(run_id="run-1")

    @logs.chunk
    def compute(ctx, run, coords, fail=False):
        if fail:
            raise ConnectionError("bigtable hiccup")
        return {"chunk": list(coords), "status": "done", "l2_count": 4, "attempt": 2}

    assert compute(ctx, run, (1, 0, 0))["status"] == "done"
    with pytest.raises(ConnectionError):
        compute(ctx, run, (2, 0, 0), fail=True)
    done, retry = lines(capsys)
    assert (done["status"], done["attempts"], done["l2_count"], done["chunk"]) == (
        "done",
        2,
        4,
        [1, 0, 0],
    )
    assert retry["status"] == "retrying" and retry["severity"] == "WARNING"
    assert "bigtable hiccup" in retry["error"]


def test_event_decorator_measures_edit_to_available(capsys):
    @logs.event
    def handle(config, data, attributes, message_id, dead_letter=None, publish_time=None):
        return {"status": "ok", "written": 3}

    published = datetime.now(UTC) - timedelta(seconds=5)
    handle(None, b"", {"table_id": "ds"}, "m1", None, published)
    (entry,) = lines(capsys)
    assert entry["l2cache"] == "event" and entry["dataset"] == "ds"
    assert 5 <= entry["latency_s"] < 60


def test_the_lookup_logs_each_request(capsys):
    from l2cache.config import parse_config

    cfg = parse_config({"bigtable": {"project": "p", "instance": "i"}, "datasets": {}})
    service = LookupService(cfg, store_factory=lambda name: None)
    r = service.handle("GET", "/l2cache/api/v1/table/nope/attributes", {}, {}, b"")
    (entry,) = lines(capsys)
    assert entry["l2cache"] == "lookup" and entry["http_status"] == r.status == 405
    assert entry["dataset"] == "nope" and entry["status"] == "rejected"
