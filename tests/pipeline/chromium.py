"""Headless Chromium over the DevTools protocol: load a page, collect console errors,
take a screenshot.

Debian's ``chromium`` (installed by scripts/ensure_chromium.sh from ``make test``) is
started with ``--remote-debugging-port`` on 127.0.0.1 and driven with websocket-client:
``Runtime.consoleAPICalled`` (console.error/assert), ``Runtime.exceptionThrown``
(uncaught errors) and ``Log.entryAdded`` at level error (failed loads, CSP, ...) are
collected from before navigation until the load event has fired, then
``Page.captureScreenshot`` writes a PNG. No chromium -> a loud failure, never a skip.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket

CONSOLE_ERROR_TYPES = ("error", "assert")


@dataclass
class PageResult:
    console_errors: list[str] = field(default_factory=list)
    console_messages: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    title: str = ""
    plots: int = 0


def chromium_binary() -> str:
    path = shutil.which("chromium")
    if not path:
        raise AssertionError(
            "chromium is not installed: run scripts/ensure_chromium.sh (make test does)"
        )
    return path


def _wait_devtools(port_file: Path, proc: subprocess.Popen, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            text = port_file.read_text().splitlines()
            if text and text[0].strip().isdigit():
                return int(text[0])
        if proc.poll() is not None:
            raise AssertionError(f"chromium exited with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError("chromium did not open its DevTools port")


def load_page(url: str, screenshot: Path, settle_s: float = 1.0, timeout: float = 60) -> PageResult:
    """Open ``url`` in a fresh headless Chromium; console errors and a screenshot."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    proc = subprocess.Popen(
        [
            chromium_binary(),
            "--headless=new",
            "--no-sandbox",  # root in a container has no user namespace sandbox
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1400,1800",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port = _wait_devtools(profile / "DevToolsActivePort", proc)
        targets = json.load(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10)
        )
        page = next(t for t in targets if t.get("type") == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout)
        try:
            return _drive(ws, url, screenshot, settle_s, timeout)
        finally:
            ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def _drive(ws, url: str, screenshot: Path, settle_s: float, timeout: float) -> PageResult:
    result = PageResult()
    ids = iter(range(1, 1_000_000))
    replies: dict[int, dict] = {}
    loaded = False

    def handle(msg: dict) -> None:
        nonlocal loaded
        method = msg.get("method")
        params = msg.get("params", {})
        if "id" in msg:
            replies[msg["id"]] = msg
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])
            )
            result.console_messages.append(f"{params.get('type')}: {text}")
            if params.get("type") in CONSOLE_ERROR_TYPES:
                result.console_errors.append(text)
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            result.console_errors.append(
                d.get("exception", {}).get("description") or d.get("text", "exception")
            )
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                result.console_errors.append(f"{entry.get('source')}: {entry.get('text')}")
        elif method == "Page.loadEventFired":
            loaded = True

    def call(method: str, **params) -> dict:
        i = next(ids)
        ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while i not in replies:
            if time.monotonic() > deadline:
                raise AssertionError(f"no DevTools reply to {method}")
            handle(json.loads(ws.recv()))
        reply = replies.pop(i)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    for domain in ("Page", "Runtime", "Log"):
        call(f"{domain}.enable")
    call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    while not loaded:
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not finish loading in {timeout:.0f}s")
        handle(json.loads(ws.recv()))
    # let plotly finish drawing (it renders after load) and any late error arrive
    end = time.monotonic() + settle_s
    ws.settimeout(0.1)
    while time.monotonic() < end:
        try:
            handle(json.loads(ws.recv()))
        except websocket.WebSocketTimeoutException:
            pass
    ws.settimeout(timeout)
    info = call(
        "Runtime.evaluate",
        expression="JSON.stringify({title: document.title, "
        "plots: document.querySelectorAll('.js-plotly-plot .main-svg').length})",
        returnByValue=True,
    )
    values = json.loads(info["result"]["value"])
    result.title, result.plots = values["title"], values["plots"]
    shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    result.screenshot = screenshot
    return result
