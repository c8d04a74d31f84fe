"""Structured logs: one JSON line per chunk, stream event and lookup.

Cloud Run (functions gen2) turns a JSON line on stdout into a structured log entry:
``severity`` becomes the entry's severity, ``message`` its summary and every other key
a ``jsonPayload`` field. infra/monitoring.py defines log-based metrics on these
fields (``jsonPayload.l2cache`` = ``chunk`` | ``event`` | ``lookup``), so the Cloud
Monitoring dashboard shows the SLOs ``l2cache status`` computes from the ledger:
throughput and failures (chunk lines by status), retries (``attempts``), compute time
(``duration_s``), edit-to-available latency (event lines' ``latency_s``) and lookups.

The entry points are decorators, so each instrumented function needs one added line.
A logging failure never changes what the function returns or raises.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, Protocol, TextIO, TypeVar

SEVERITY = {
    "done": "INFO",
    "skipped": "INFO",
    "ok": "INFO",
    "fanned_out": "INFO",
    "ignored": "INFO",
    "retrying": "WARNING",
    "partial": "WARNING",
    "failed": "ERROR",
    "dead_lettered": "ERROR",
    "rejected": "ERROR",
    "error": "ERROR",
}
FIELDS = ("dataset", "run_id", "chunk", "status", "duration_s", "attempts", "error")
_TABLE = re.compile(r"/table/([^/]+)/")


# What the decorators read of the calls they wrap, as structural types: this module is
# layer 0, so it names no dataset context, run record or lookup service, only the
# attributes it logs (``ctx.dataset.name``, ``run.run_id``). The rest of each call is
# passed through untouched and keeps the wrapped function's own types (``_P``).
class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _DatasetScoped(Protocol):
    @property
    def dataset(self) -> _Named: ...


class _RunScoped(Protocol):
    @property
    def run_id(self) -> str: ...


_P = ParamSpec("_P")
_Ctx = TypeVar("_Ctx", bound=_DatasetScoped)
_Run = TypeVar("_Run", bound=_RunScoped)
_Config = TypeVar("_Config")
_Attributes = TypeVar("_Attributes", bound=Mapping[str, str] | None)
_Task = TypeVar("_Task", bound=Mapping[str, Any])
_Outcome = TypeVar("_Outcome", bound=Mapping[str, Any])
_Body = TypeVar("_Body", bound=Mapping[str, Any])
_Service = TypeVar("_Service")
_Answer = TypeVar("_Answer")


def emit(kind: str, stream: TextIO | None = None, **fields: Any) -> dict[str, Any]:
    """Write one structured line (``kind`` = chunk | event | lookup); returns it."""
    status = fields.get("status")
    entry: dict[str, Any] = {
        "severity": fields.pop("severity", None) or SEVERITY.get(str(status), "INFO"),
        "message": f"l2cache {kind} {status}",
        "l2cache": kind,
        **{k: fields.get(k) for k in FIELDS},
        **{k: v for k, v in fields.items() if k not in FIELDS},
    }
    if entry.get("error") is not None:
        entry["error"] = str(entry["error"])[:2000]
    try:
        print(json.dumps(entry, default=str, sort_keys=True), file=stream or sys.stdout, flush=True)
    except Exception:  # noqa: BLE001 - a log line must never fail the work it describes
        pass
    return entry


def _raised(kind: str, base: dict[str, Any], exc: Exception, t0: float) -> None:
    """The line for a call that raised: the caller answers 5xx, so it will be retried."""
    emit(
        kind,
        **base,
        status="retrying",
        error=repr(exc),
        duration_s=round(time.perf_counter() - t0, 4),
    )


def chunk(
    fn: Callable[Concatenate[_Ctx, _Run, Sequence[int], _P], _Outcome],
) -> Callable[Concatenate[_Ctx, _Run, Sequence[int], _P], _Outcome]:
    """Log ``compute.compute_chunk(ctx, run, coords, ...)``: one line per chunk attempt.

    The chunk metrics (throughput, failures by status, retries, compute time) count
    these lines, so an attempt that raises still gets one (``retrying``) before the
    exception goes on to the caller.
    """

    @functools.wraps(fn)
    def wrapper(
        ctx: _Ctx, run: _Run, coords: Sequence[int], *args: _P.args, **kwargs: _P.kwargs
    ) -> _Outcome:
        t0 = time.perf_counter()
        base: dict[str, Any] = {
            "dataset": ctx.dataset.name,
            "run_id": run.run_id,
            "chunk": [int(c) for c in coords],
        }
        try:
            out = fn(ctx, run, coords, *args, **kwargs)
        except Exception as exc:
            _raised("chunk", base, exc, t0)
            raise
        emit(
            "chunk",
            **base,
            status=out.get("status"),
            attempts=out.get("attempt"),
            error=out.get("error"),
            l2_count=out.get("l2_count"),
            duration_s=round(time.perf_counter() - t0, 4),
        )
        return out

    return wrapper


def ids_task(
    fn: Callable[Concatenate[_Ctx, _Run, _Task, int, _P], tuple[int, _Body]],
) -> Callable[Concatenate[_Ctx, _Run, _Task, int, _P], tuple[int, _Body]]:
    """Log ``handlers.compute_chunk._ids_task(ctx, run, task, attempt, ...)``.

    One ``chunk`` line per fanned-out event chunk, tagged with its ``event_key``, so
    the chunks of an edit spread over tasks are counted like those of a bulk run.
    """

    @functools.wraps(fn)
    def wrapper(
        ctx: _Ctx, run: _Run, task: _Task, attempt: int, *args: _P.args, **kwargs: _P.kwargs
    ) -> tuple[int, _Body]:
        t0 = time.perf_counter()
        code, body = fn(ctx, run, task, attempt, *args, **kwargs)
        status = body.get("status") or ("done" if code < 300 else "retrying")
        emit(
            "chunk",
            dataset=ctx.dataset.name,
            run_id=run.run_id,
            chunk=task.get("chunk"),
            status=status,
            attempts=attempt,
            error=body.get("error"),
            event_key=task.get("event_key"),
            duration_s=round(time.perf_counter() - t0, 4),
        )
        return code, body

    return wrapper


def event(
    fn: Callable[Concatenate[_Config, bytes, _Attributes, str, _P], _Outcome],
) -> Callable[Concatenate[_Config, bytes, _Attributes, str, _P], _Outcome]:
    """Log ``handlers.on_edit.handle_message(config, data, attributes, message_id, ...)``.

    One line per delivery, with ``latency_s`` = now - PCG's publish time once the values
    are written: the edit-to-available latency metric is read from these lines.
    """

    @functools.wraps(fn)
    def wrapper(
        config: _Config,
        data: bytes,
        attributes: _Attributes,
        message_id: str,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _Outcome:
        t0 = time.perf_counter()
        given: Mapping[str, str] | None = attributes
        base: dict[str, Any] = {
            "dataset": (given or {}).get("table_id"),
            "message_id": message_id,
        }
        try:
            out = fn(config, data, attributes, message_id, *args, **kwargs)
        except Exception as exc:
            _raised("event", base, exc, t0)
            raise
        published = kwargs.get("publish_time", args[1] if len(args) > 1 else None)
        latency = None
        if isinstance(published, datetime) and out.get("status") in ("ok", "partial"):
            if published.tzinfo is None:
                published = published.replace(tzinfo=UTC)
            latency = round((datetime.now(UTC) - published).total_seconds(), 4)
        emit(
            "event",
            **base,
            status=out.get("status"),
            error=out.get("reason"),
            written=out.get("written"),
            latency_s=latency,
            duration_s=round(time.perf_counter() - t0, 4),
        )
        return out

    return wrapper


def lookup(
    fn: Callable[Concatenate[_Service, str, str, _P], _Answer],
) -> Callable[Concatenate[_Service, str, str, _P], _Answer]:
    """Log ``LookupService.handle(self, method, path, ...)``: one line per request.

    The lookup metrics (requests by outcome, latency, missing ids queued) come from
    these lines; a 4xx (the client's error) is logged at INFO as ``rejected``, a 5xx
    (the cache's) at ERROR.
    """

    @functools.wraps(fn)
    def wrapper(
        self: _Service, method: str, path: str, *args: _P.args, **kwargs: _P.kwargs
    ) -> _Answer:
        t0 = time.perf_counter()
        response = fn(self, method, path, *args, **kwargs)
        m = _TABLE.search(path or "")
        code = int(getattr(response, "status", 0))
        emit(
            "lookup",
            dataset=m.group(1) if m else None,
            http_status=code,
            status="ok" if code < 400 else "error" if code >= 500 else "rejected",
            severity="ERROR" if code >= 500 else "INFO",
            missing_ids=(getattr(response, "headers", {}) or {}).get("X-L2Cache-Missing-Ids"),
            duration_s=round(time.perf_counter() - t0, 4),
        )
        return response

    return wrapper
