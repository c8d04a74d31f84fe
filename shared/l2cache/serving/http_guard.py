"""Request framing for the HTTP functions: every request body read bounded, every client
error a 4xx JSON ``{"code", "message"}``, whoever detects it.

functions-framework serves each function with gunicorn (gthread workers: a fixed pool of
threads per instance) in production and with werkzeug's dev server under ``--debug``. Left
alone, a malformed chunked body surfaced as an exception inside the lookup (503, which
clients retry), the HTTP server's own refusals (bad header, 417, 431, ...) were HTML,
a slow body held a worker thread for as long as the client liked, a declared body over
the limit was still read to its end (functions-framework's ``read_request`` hook), and
a body of many gzip members cost quadratic CPU.

:func:`install` (called at import time by each ``functions/<name>/main.py``, which
functions-framework executes inside its Flask app's context) adds three things:

- :class:`FramingGuard`, WSGI middleware in front of the Flask app. Before the function
  runs it refuses a request target over 16 KiB (414), unknown methods (405), refuses a declared ``Content-Length`` over the
  limit before reading a byte (413), reads the body (``Content-Length`` or chunked) in
  64 KiB steps up to the limit (413 past it) under a wall-clock deadline (408) and a
  CPU budget (413), decodes ``Content-Encoding`` gzip/deflate by streaming inflation
  bounded in output bytes and gzip members (:func:`decode_body`), and hands the app the
  decoded body as a plain in-memory stream (so nothing downstream reads the socket
  again). A framing error raised by the server while the body is read (a bad chunk size,
  a missing chunk terminator, a client that went away) is a 400.
- A Flask error handler turning the framework's own HTTP errors (404/405 from routing,
  400 from the CloudEvent conversion) into the same JSON body.
- The HTTP servers' own error pages (gunicorn's ``util.write_error``, werkzeug's
  ``send_error``) replaced by the JSON body; gunicorn's 501 for an unsupported
  ``Transfer-Encoding`` becomes a 400 (it is the client's request that is wrong).

The deadline is enforced by a watchdog thread that shuts the connection's read side when
it passes: a blocked ``recv`` returns at once however the server buffers its reads, the
write side stays open for the 408. A refusal that leaves body bytes unread shuts the read
side after the answer is written, so the server neither drains nor reuses the
connection. What a WSGI app cannot do (slow request *headers*, the per-instance thread
count) is the server's and the platform's: docs/design.md, "Request framing".
"""

from __future__ import annotations

import contextlib
import heapq
import io
import itertools
import json
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

READ_STEP = 64 * 2**10
INFLATE_STEP = 64 * 2**10
DEFAULT_BODY_LIMIT = 1 * 2**20
DEFAULT_DEADLINE_S = 10.0
# A declared body gets at least this rate (bytes/s) on top of the deadline: the lookup's
# cap of 500,000 ids is a ~11 MB JSON body (16 MB limit), which a client on an 8 Mbit/s
# uplink needs ~11 s to send, so its deadline is length / rate (16 s at the limit).
MIN_BODY_RATE = 2**20
DEFAULT_CPU_BUDGET_S = 1.0
MAX_GZIP_MEMBERS = 16
MAX_TARGET_BYTES = 16 * 2**10  # path + query; functions-framework lifts gunicorn's 8 KiB
DEADLINE_ENV = "L2CACHE_BODY_DEADLINE_S"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


class FramingError(Exception):
    """A request the guard refuses: the status and message the client sees."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may cost a function instance.

    ``body_bytes`` bounds the raw body and, separately, the decoded body (an int, or a
    callable read per request: the lookup's limit follows its dataset map's id cap).
    ``deadline_s`` bounds the wall time of reading the body (``L2CACHE_BODY_DEADLINE_S``
    overrides it), ``cpu_s`` the CPU the reading thread spends on it (framing of tiny
    chunks), ``gzip_members`` the members of a gzip body (honest clients send one).
    """

    body_bytes: int | Callable[[], int] = DEFAULT_BODY_LIMIT
    methods: frozenset[str] = field(default=frozenset({"POST"}))
    deadline_s: float = DEFAULT_DEADLINE_S
    cpu_s: float = DEFAULT_CPU_BUDGET_S
    gzip_members: int = MAX_GZIP_MEMBERS
    target_bytes: int = MAX_TARGET_BYTES
    cors: bool = False

    def body_limit(self) -> int:
        """The body limit for this request (the default if the callable fails)."""
        if callable(self.body_bytes):
            try:
                return int(self.body_bytes())
            except Exception:  # a broken map is the handler's to report, not the guard's
                return DEFAULT_BODY_LIMIT
        return self.body_bytes

    def deadline(self) -> float:
        """Seconds a body may take to arrive (the environment may override it)."""
        raw = os.environ.get(DEADLINE_ENV)
        if raw:
            with contextlib.suppress(ValueError):
                return max(0.05, float(raw))
        return self.deadline_s


def error_body(status: int, message: str) -> bytes:
    """The JSON error body of the contract (``serving.api.error_response``'s bytes)."""
    payload = {"code": status, "message": message}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# --- the deadline watchdog ---------------------------------------------------------------


class _Watchdog:
    """One daemon thread that shuts a socket's read side when its deadline passes.

    Started on first use and again after a fork (gunicorn forks its worker after
    functions-framework imported main.py in the master).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, socket.socket] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def arm(self, deadline: float, sock: socket.socket) -> int:
        with self._cond:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._heap, self._armed, self._pid = [], {}, os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="l2cache-body-deadline", daemon=True
                )
                self._thread.start()
            token = next(self._ids)
            self._armed[token] = sock
            heapq.heappush(self._heap, (deadline, token))
            self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, token = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                sock = self._armed.pop(token, None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)


_watchdog = _Watchdog()


def _socket_of(environ: dict) -> socket.socket | None:
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    return sock if isinstance(sock, socket.socket) else None


# --- reading and decoding ----------------------------------------------------------------


def _declared_length(environ: dict) -> int | None:
    raw = (environ.get("CONTENT_LENGTH") or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not raw.isascii():
        raise FramingError(400, f"Content-Length {raw[:40]!r} is not a length")
    return int(raw)


def read_body(environ: dict, limit: int, deadline_s: float, cpu_s: float) -> bytes:
    """The whole request body, at most ``limit`` bytes, within ``deadline_s`` seconds of
    wall time and ``cpu_s`` seconds of this thread's CPU; :class:`FramingError` otherwise.

    A declared length over the limit is refused before anything is read; a declared
    length within it gets at least ``length / MIN_BODY_RATE`` seconds (a big honest body
    on a slow uplink). Without a socket in the environ (an in-process test client) the
    deadline is checked between reads only.
    """
    length = _declared_length(environ)
    chunked = "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower()
    if length is not None and length > limit:
        raise FramingError(413, f"request body of {length} bytes is over the {limit}-byte limit")
    if length and not chunked:
        deadline_s = max(deadline_s, length / MIN_BODY_RATE)
    if not chunked and not length:
        return b""
    stream = environ["wsgi.input"]
    want = limit + 1 if chunked else length
    assert want is not None
    sock = _socket_of(environ)
    start, cpu0 = time.monotonic(), time.thread_time()
    deadline = start + deadline_s
    token = _watchdog.arm(deadline, sock) if sock is not None else None
    parts: list[bytes] = []
    got = 0
    ended = False  # the server's reader said the body is complete
    try:
        while got < want and time.monotonic() < deadline:
            try:
                data = stream.read(min(READ_STEP, want - got))
            except TimeoutError:
                break
            except Exception as exc:  # the server's body parser: bad chunk, peer gone
                if time.monotonic() >= deadline:  # the watchdog cut the stream
                    break
                raise FramingError(400, f"malformed request body: {_describe(exc)}") from None
            if not data:
                ended = True
                break
            parts.append(data)
            got += len(data)
            if time.thread_time() - cpu0 > cpu_s:
                raise FramingError(
                    413, f"reading the request body took over {cpu_s:g} s of CPU (framing)"
                )
    finally:
        if token is not None:
            _watchdog.disarm(token)
    if got > limit:
        raise FramingError(413, f"request body is over the {limit}-byte limit")
    complete = got == want if not chunked else ended
    if not complete:
        if time.monotonic() >= deadline:
            raise FramingError(
                408,
                f"the request body did not arrive within {deadline_s:g} s ({got} bytes received)",
            )
        raise FramingError(400, f"request body ended after {got} of {length} bytes")
    return b"".join(parts)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
    return text if len(text) <= 200 else text[:200] + "..."


def decode_body(body: bytes, encoding: str, limit: int, max_members: int) -> bytes:
    """``body`` decoded per its ``Content-Encoding`` (identity, gzip, x-gzip, deflate).

    Bounded in bytes and in work: inflation streams ``INFLATE_STEP`` input bytes at a
    time with ``max_length`` so output never exceeds ``limit + 1`` bytes (413), whatever
    the ratio; a gzip body may have at most ``max_members`` members (400), so the cost is
    O(len(body) + limit) whatever the member sizes. Trailing zero bytes after the last
    member are allowed, as ``gzip.decompress`` allows them.
    """
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return body
    if len(codings) > 1:
        raise FramingError(415, f"one Content-Encoding at most, got {encoding[:80]!r}")
    coding = codings[0]
    if coding in ("gzip", "x-gzip"):
        return _inflate(body, 16 + zlib.MAX_WBITS, limit, max_members, "gzip")
    if coding == "deflate":
        zlib_header = (
            len(body) >= 2 and (body[0] & 0x0F) == 8 and (body[0] << 8 | body[1]) % 31 == 0
        )
        wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
        return _inflate(body, wbits, limit, 1, "deflate")
    raise FramingError(415, f"unsupported Content-Encoding {coding[:40]!r}; use gzip")


def _inflate(data: bytes, wbits: int, limit: int, max_members: int, name: str) -> bytes:
    out = bytearray()
    view = memoryview(data)
    pos, n, members = 0, len(data), 0
    while True:
        members += 1
        if members > max_members:
            raise FramingError(
                400, f"a {name} body of more than {max_members} members; send one member"
            )
        d = zlib.decompressobj(wbits)
        try:
            while not d.eof:
                if pos >= n:
                    raise FramingError(400, f"Content-Encoding is {name} but the body is truncated")
                piece = view[pos : pos + INFLATE_STEP]
                pos += len(piece)
                out += d.decompress(piece, limit + 1 - len(out))
                while d.unconsumed_tail and not d.eof and len(out) <= limit:
                    out += d.decompress(d.unconsumed_tail, limit + 1 - len(out))
                if len(out) > limit:
                    raise FramingError(413, f"the decompressed body is over the {limit}-byte limit")
        except zlib.error:
            raise FramingError(
                400, f"Content-Encoding is {name} but the body is not {name}"
            ) from None
        pos -= len(d.unused_data)  # the next member starts where this one ended
        if pos >= n or data.count(0, pos) == n - pos:  # end, or zero padding
            return bytes(out)
        if max_members == 1:
            raise FramingError(400, f"bytes after the end of the {name} stream")


# --- the middleware ----------------------------------------------------------------------


class _Answer:
    """A refusal's WSGI body; when the request body was left unread, shuts the read side
    once the answer is written, so the server neither drains nor reuses the connection."""

    def __init__(self, body: bytes, sock: socket.socket | None) -> None:
        self._body = body
        self._sock = sock

    def __iter__(self) -> Iterator[bytes]:
        yield self._body

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RD)


def _has_body(environ: dict) -> bool:
    length = (environ.get("CONTENT_LENGTH") or "").strip()
    chunked = "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower()
    return chunked or length not in ("", "0")


class FramingGuard:
    """WSGI middleware: the request's body read, bounded and decoded before ``app`` runs."""

    def __init__(self, app: WsgiApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        target = len(environ.get("PATH_INFO") or "") + len(environ.get("QUERY_STRING") or "")
        if target > self.limits.target_bytes:
            return self._refuse(
                environ,
                start_response,
                FramingError(414, f"the request target is over {self.limits.target_bytes} bytes"),
                unread=_has_body(environ),
            )
        if method not in self.limits.methods:
            allowed = ", ".join(sorted(self.limits.methods))
            return self._refuse(
                environ,
                start_response,
                FramingError(405, f"method {method[:20]!r} is not allowed here; use {allowed}"),
                unread=_has_body(environ),
                extra=[("Allow", allowed)],
            )
        limit = self.limits.body_limit()
        try:
            body = read_body(environ, limit, self.limits.deadline(), self.limits.cpu_s)
        except FramingError as exc:
            return self._refuse(environ, start_response, exc, unread=True)
        try:
            body = decode_body(
                body, environ.get("HTTP_CONTENT_ENCODING") or "", limit, self.limits.gzip_members
            )
        except FramingError as exc:
            return self._refuse(environ, start_response, exc, unread=False)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input_terminated"] = True
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        if environ.pop("HTTP_CONTENT_ENCODING", None) is not None:
            environ["l2cache.decoded"] = True
        return self.app(environ, start_response)

    def _refuse(
        self,
        environ: dict,
        start_response: Callable,
        exc: FramingError,
        unread: bool,
        extra: list[tuple[str, str]] | None = None,
    ) -> Iterable[bytes]:
        body = error_body(exc.status, exc.message)
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *(extra or []),
        ]
        if unread:
            headers.append(("Connection", "close"))
        if self.limits.cors:
            headers.append(("Access-Control-Allow-Origin", "*"))
        start_response(f"{exc.status} {_reason(exc.status)}", headers)
        if environ.get("REQUEST_METHOD") == "HEAD":
            body = b""
        return _Answer(body, _socket_of(environ) if unread else None)


# --- the framework's and the servers' own errors -----------------------------------------


def _flask_http_error(exc: Any) -> Any:
    """Flask's HTTP errors (routing 404/405, a bad CloudEvent's 400) as the JSON body."""
    code = getattr(exc, "code", None) or 500
    if code >= 500:
        return exc
    message = getattr(exc, "description", None) or _reason(code)
    headers = {"Content-Type": "application/json"}
    if code == 405 and getattr(exc, "valid_methods", None):
        headers["Allow"] = ", ".join(exc.valid_methods)
    return error_body(code, str(message)), code, headers


def _server_status(status: int, reason: str) -> tuple[int, str]:
    if status in (501, 505):  # an unsupported Transfer-Encoding or HTTP version: the
        return 400, "Bad Request"  # request is wrong, and 5xx would make clients retry
    return status, reason


def install_server_errors() -> None:
    """Make the HTTP servers' own error answers the JSON body (idempotent)."""
    try:
        import gunicorn.util as gutil
    except ImportError:  # not installed: nothing to patch
        gutil = None
    if gutil is not None and not getattr(gutil.write_error, "l2cache", False):

        def write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
            status_int, reason = _server_status(status_int, reason)
            body = error_body(status_int, mesg or reason)
            head = (
                f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            gutil.write_nonblock(sock, head.encode("latin1") + body)

        write_error.l2cache = True  # type: ignore[attr-defined]
        gutil.write_error = write_error
    try:
        from werkzeug.serving import WSGIRequestHandler
    except ImportError:
        return
    if not getattr(WSGIRequestHandler.send_error, "l2cache", False):

        def send_error(
            self: Any, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            code, reason = _server_status(code, _reason(code))
            body = error_body(code, message or explain or reason)
            self.log_error("code %d, message %s", code, message)
            self.send_response(code, reason)
            self.send_header("Connection", "close")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.close_connection = True
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)

        send_error.l2cache = True  # type: ignore[attr-defined]
        WSGIRequestHandler.send_error = send_error  # type: ignore[method-assign]


def install(limits: Limits, app: Any = None) -> bool:
    """Guard ``app`` (by default the Flask app functions-framework is building, current
    while it executes main.py). Returns False when there is no app (main.py imported by
    an in-process test), after still patching the servers' error pages."""
    install_server_errors()
    if app is None:
        import flask

        if not flask.has_app_context():
            return False
        app = flask.current_app._get_current_object()  # type: ignore[attr-defined]
    if getattr(app, "l2cache_guarded", False):
        return True
    from werkzeug.exceptions import HTTPException

    app.register_error_handler(HTTPException, _flask_http_error)
    app.wsgi_app = FramingGuard(app.wsgi_app, limits)
    app.l2cache_guarded = True
    return True
