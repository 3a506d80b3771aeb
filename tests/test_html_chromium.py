"""The HTML reports in a real headless Chromium: the page loads with no console error and no
network request, every figure decodes, and the screenshot is not blank.

Chromium is driven over the DevTools protocol with a minimal websocket client written here on
the standard library, so the test needs no extra package. CI installs Debian's `chromium`
(.ci/run); without it this module is skipped with that reason.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


# ----------------------------------------------------------------------------- a tiny websocket client

class WebSocket:
    """Just enough RFC 6455 for the DevTools protocol: text frames, masking, fragmentation, ping."""

    def __init__(self, url: str, timeout: float = 30.0):
        m = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status, f"websocket handshake refused: {head[:300]!r}"
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
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

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
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
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by Chromium")
            message += payload
            if b0 & 0x80:
                return message.decode()

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class DevTools:
    """One page of a headless Chromium, with every console message, exception and request recorded."""

    def __init__(self, tmp: Path):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--mute-audio", "--window-size=1280,1000",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.time() + 60
        lines = []
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            lines.append(line)
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "Chromium did not start its DevTools endpoint:\n" + "".join(lines[-20:])
        pages = []
        for _ in range(50):
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                break
            time.sleep(0.1)
        assert pages, "Chromium opened no page"
        self.ws = WebSocket(pages[0]["webSocketDebuggerUrl"])
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(method)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        for ev in self.events:
            if ev["method"] == method:
                return ev
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg
        raise TimeoutError(method)

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions, browser log errors, requests that leave the file."""
        out = []
        for ev in self.events:
            p = ev.get("params", {})
            if ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif ev["method"] == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif ev["method"] == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif ev["method"] == "Network.requestWillBeSent":
                url = p["request"]["url"]
                if not (url.startswith("file://") or url.startswith("data:")):
                    out.append(f"network request: {url}")
            elif ev["method"] == "Network.loadingFailed":
                out.append(f"failed to load: {p.get('errorText')}")
        return out

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


def check_page(html_file: Path, tmp: Path, screenshot_to: Path | None = None) -> dict:
    """Open `html_file` in Chromium; assert on console, images and screenshot. Returns what it measured."""
    from PIL import Image

    browser = DevTools(tmp)
    try:
        browser.call("Page.navigate", url=html_file.resolve().as_uri())
        browser.wait_event("Page.loadEventFired")
        images = browser.evaluate(
            "Promise.all(Array.from(document.images).map(i => i.decode().then("
            "() => ({src: i.src.slice(0, 30), w: i.naturalWidth, h: i.naturalHeight, ok: i.complete}),"
            "() => ({src: i.src.slice(0, 30), w: 0, h: 0, ok: false}))))")
        title = browser.evaluate("document.title")
        text = browser.evaluate("document.body.innerText")
        scripts = browser.evaluate("document.scripts.length")
        shot = browser.call("Page.captureScreenshot", format="png")
        time.sleep(0.2)  # let late console messages arrive
        browser.call("Runtime.evaluate", expression="1")
        problems = browser.problems()
    finally:
        browser.close()
    png = base64.b64decode(shot["data"])
    if screenshot_to:
        screenshot_to.write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    assert not problems, problems
    assert images, "the page shows no figure"
    broken = [im for im in images if not (im["ok"] and im["w"] > 0 and im["h"] > 0)]
    assert not broken, f"{len(broken)} of {len(images)} images did not decode: {broken}"
    assert all(im["src"].startswith("data:image/png;base64") for im in images), "an image is not embedded"
    # Not blank: real contrast and many colours (a white or single-colour page fails both).
    assert pixels.std() > 20, f"screenshot looks blank (pixel std {pixels.std():.1f})"
    colours = len(np.unique(pixels.reshape(-1, 3).astype(np.uint8), axis=0))
    assert colours > 50, f"screenshot has only {colours} colours"
    return {"images": images, "title": title, "text": text, "scripts": scripts, "pixel_std": pixels.std()}


# ----------------------------------------------------------------------------- the reports

HOSTILE = '<img src=x onerror="alert(1)">&"quote"'


@pytest.fixture(scope="module")
def compare_report(tmp_path_factory):
    """A comparison of two tiny models, one of them with a name that is an HTML injection attempt."""
    import layerprobe
    from layerprobe.report import render_analysis
    from tiny_models import make_tiny

    root = tmp_path_factory.mktemp("report")
    tokens = root / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(3, 256, size=(8, 32)))
    folders = []
    for name, arch, kw in [("llama", "llama", {}), (HOSTILE.replace("/", "_"), "opt",
                                                     {"do_layer_norm_before": False, "num_hidden_layers": 4})]:
        model = make_tiny(arch, root / "models" / name, **kw)
        result = layerprobe.analyze(str(model), data=str(tokens), seq_len=32, samples=8, progress=False)
        folders.append(render_analysis(result, root / "results" / name))
    comp = layerprobe.compare(folders, out=root / "compare", progress=False)
    return comp


def test_compare_report_in_chromium(compare_report, tmp_path):
    html = compare_report.html
    source = html.read_text(encoding="utf-8")
    assert "onerror=" not in source.replace("onerror=&quot;", "")  # the name is escaped, never markup
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in source
    assert re.search(r"""(src|href)=["'](https?:)?//""", source) is None, "the page refers to a network resource"
    seen = check_page(html, tmp_path, tmp_path / "compare.png")
    assert len(seen["images"]) == len(compare_report.figures) >= 5
    assert seen["scripts"] == 0
    assert HOSTILE.replace("/", "_") in seen["text"]  # shown as text, literally


def test_model_index_in_chromium(compare_report, tmp_path):
    """Each model's own index.html (written by analyze) passes the same checks."""
    folder = compare_report.models[0].folder
    seen = check_page(folder / "index.html", tmp_path)
    assert len(seen["images"]) >= 3


def test_committed_demo_report_in_chromium(tmp_path):
    html = REPO / "examples" / "demo-report" / "index.html"
    assert html.is_file(), ("examples/demo-report/index.html is missing: run `layerprobe demo --out "
                            "examples/demo-report` and commit it")
    seen = check_page(html, tmp_path)
    assert len(seen["images"]) >= 8  # per-layer curves, heat maps and training figures
    for scheme in ("pre", "post", "mix", "lns"):
        assert scheme in seen["text"]


def test_broken_image_is_caught(tmp_path):
    """The checker itself fails on a page with an undecodable image (so it cannot pass vacuously)."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title></head><body>'
                    '<h1>broken</h1><img src="data:image/png;base64,iVBORw0KGgoAAAA"></body></html>')
    with pytest.raises(AssertionError):
        check_page(page, tmp_path)


def test_console_error_is_caught(tmp_path):
    page = tmp_path / "console.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title></head><body>'
                    '<h1>console</h1><script>console.error("boom")</script></body></html>')
    with pytest.raises(AssertionError, match="boom"):
        check_page(page, tmp_path)


def test_network_request_is_caught(tmp_path):
    """A page that loads anything over the network fails the check (the reports must not)."""
    page = tmp_path / "network.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title>'
                    '<link rel="stylesheet" href="http://127.0.0.1:9/style.css"></head><body><h1>net</h1>'
                    '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ'
                    'DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="></body></html>')
    with pytest.raises(AssertionError, match="127.0.0.1:9"):
        check_page(page, tmp_path)
