"""A headless Chromium driven over the DevTools protocol, with the standard library only
(a minimal WebSocket client): enough for tests to load a page, run JavaScript in it, move
and click the mouse as a reader does, and take a screenshot. Used by tests/test_viewer.py.

    with Chromium.launch(tmp_path) as browser:
        browser.navigate("file:///.../view.html")
        browser.evaluate("document.title")
        browser.hover(200, 100)
        browser.screenshot(tmp_path / "page.png")
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The browser binary: $RLM_TRAIN_CHROMIUM, else the first of CANDIDATES on PATH."""
    explicit = os.environ.get("RLM_TRAIN_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class WebSocket:
    """Just enough RFC 6455 for the DevTools protocol: text frames, client-side masking,
    fragmented and large messages, ping/pong."""

    def __init__(self, url: str, timeout: float = 30.0):
        match = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        if not match:
            raise ValueError(f"not a ws:// URL: {url}")
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            response += chunk
        head, _, self.buffer = response.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, text: str, opcode: int = 1) -> None:
        payload = text.encode()
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def recv(self) -> str:
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 9:  # ping
                self.send(payload.decode(errors="replace"), opcode=10)
                continue
            if opcode == 8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode in (0, 1, 2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Chromium:
    """One headless Chromium process and one page (tab) driven over DevTools."""

    def __init__(self, process: subprocess.Popen, profile: str, ws_url: str):
        self.process = process
        self.profile = profile
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.call("Page.enable")
        self.call("Runtime.enable")

    @classmethod
    def launch(cls, width: int = 1400, height: int = 900, timeout: float = 60.0) -> "Chromium":
        binary = find_chromium()
        if binary is None:
            raise FileNotFoundError("no chromium on PATH")
        profile = tempfile.mkdtemp(prefix="rlm-train-chromium-")
        argv = [binary, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--mute-audio", f"--window-size={width},{height}", "about:blank"]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium's own sandbox refuses to run as root
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if process.poll() is not None or time.monotonic() > deadline:
                _stop(process, profile)
                raise RuntimeError(f"{binary} did not start its DevTools server (exit {process.poll()})")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        try:
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                    pages = [t for t in json.load(response) if t.get("type") == "page"]
                if pages or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if not pages:
                raise RuntimeError("Chromium has no page to drive")
            browser = cls(process, profile, pages[0]["webSocketDebuggerUrl"])
            browser.call("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            return browser
        except BaseException:
            _stop(process, profile)
            raise

    # ------------------------------------------------------------------ protocol
    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        self.next_id += 1
        my_id = self.next_id
        self.ws.sock.settimeout(timeout)
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for k, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(k)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {method} within {timeout:.0f} s")
            self.ws.sock.settimeout(remaining)
            message = json.loads(self.ws.recv())
            if "method" in message:
                self.events.append(message)

    # ------------------------------------------------------------------ conveniences
    def navigate(self, url: str, timeout: float = 60.0) -> None:
        """Open `url` and wait for its load event."""
        self.events = [e for e in self.events if e["method"] != "Page.loadEventFired"]
        result = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise RuntimeError(f"navigate {url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired", timeout=timeout)

    def evaluate(self, expression: str, timeout: float = 60.0, *, as_page: bool = False) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited);
        a thrown exception becomes a RuntimeError with its text. DevTools may evaluate
        strings (eval) where the page's Content-Security-Policy forbids it; `as_page`
        holds the expression to the page's policy."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True, "allowUnsafeEvalBlockedByCSP": not as_page},
                           timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise RuntimeError(f"JavaScript error: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.02) -> Any:
        """Poll until `expression` has a truthy JSON value and return it (a DOM node comes
        back as {}, which is falsy here: write `!!node`)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed false for {timeout:.0f} s")
            time.sleep(interval)

    def on_new_document(self, source: str) -> None:
        """Run the JavaScript `source` in every page this tab loads from now on, before the
        page's own scripts (DevTools injects it: the page's CSP does not apply to it)."""
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def hover(self, x: float, y: float) -> None:
        """Move the mouse to (x, y) in CSS pixels of the viewport: the page gets real
        mouseover / mouseenter / mousemove events, as from a user."""
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def click(self, x: float, y: float) -> None:
        """A left click at (x, y), as from a user (press, release: mousedown, mouseup, click)."""
        self.hover(x, y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def set_outer_html(self, selector: str, html: str) -> None:
        """Replace the first element matching `selector` with `html`, parsed by DevTools
        (not by the page's script, so the page's Trusted Types do not apply to it)."""
        self.call("DOM.enable")
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise RuntimeError(f"no element matches {selector!r}")
        self.call("DOM.setOuterHTML", {"nodeId": node, "outerHTML": html})

    def console_errors(self) -> list[str]:
        """Uncaught exceptions the page threw so far."""
        return [json.dumps(e["params"].get("exceptionDetails", {}))[:500]
                for e in self.events if e["method"] == "Runtime.exceptionThrown"]

    def screenshot(self, path: str | os.PathLike[str]) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        self.ws.close()
        _stop(self.process, self.profile)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stop(process: subprocess.Popen, profile: str) -> None:
    """End the browser we started (its own process group: the renderer and GPU helpers
    go with it) and remove its profile."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    shutil.rmtree(profile, ignore_errors=True)
