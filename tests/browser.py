"""A headless Chromium driven over the DevTools protocol through a pipe (``--remote-debugging-pipe``:
the browser reads commands on fd 3 and writes replies and events on fd 4, NUL-separated JSON), so the
tests need no Python package and open no port.

``open_page(url)`` loads a page and returns what a test checks: every request's URL, the console
errors and uncaught exceptions, each <img>'s and <video>'s decoded width, and a screenshot (PNG bytes).
Chromium comes from Debian's ``chromium`` package (``scripts/setup.sh`` installs it when run as root).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MISSING = ("headless Chromium not found (tried: " + ", ".join(CANDIDATES) + "); install it with "
           "`sudo scripts/setup.sh` (as root it runs `apt-get install chromium`)")

# Waits for every image and video of the page to finish loading (or fail), then reports them.
MEDIA_JS = """
(async () => {
  const wait = (el, ok, events) => ok(el) ? null : new Promise(r => {
    for (const ev of events) el.addEventListener(ev, r, {once: true});
    setTimeout(r, 15000);
  });
  const imgs = [...document.images];
  const vids = [...document.querySelectorAll('video')];
  for (const v of vids) { if (v.readyState < 1) v.load(); }
  await Promise.all(imgs.map(i => wait(i, x => x.complete, ['load', 'error'])));
  await Promise.all(vids.map(v => wait(v, x => x.readyState >= 2 || x.error, ['loadeddata', 'error'])));
  return {
    imgs: imgs.map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth})),
    videos: vids.map(v => ({src: v.currentSrc || v.src, width: v.videoWidth, ready: v.readyState,
                            error: v.error ? v.error.code + ' ' + v.error.message : null})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    height: Math.ceil(document.documentElement.scrollHeight),
  };
})()
"""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    imgs: list[dict] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    screenshot: bytes = b""


class Chromium:
    def __init__(self, exe: str, timeout: float = 30.0):
        self.timeout = timeout
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        cmd_r, cmd_w = os.pipe()  # we write commands; the browser reads them on fd 3
        out_r, out_w = os.pipe()  # the browser writes on fd 4; we read
        # above any fd the child's 3 and 4 could clash with
        hi_cmd, hi_out = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(out_w)

        def child_fds() -> None:
            os.dup2(hi_cmd, 3)  # inheritable copies; the originals close on exec
            os.dup2(hi_out, 4)

        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile.name}", "--no-first-run",
             "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-extensions", "--mute-audio", "--autoplay-policy=no-user-gesture-required",
             "--hide-scrollbars", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr, close_fds=False,
            preexec_fn=child_fds)
        os.close(hi_cmd)
        os.close(hi_out)
        self.w = os.fdopen(cmd_w, "wb", buffering=0)
        self.r = os.fdopen(out_r, "rb", buffering=0)
        self.inbox: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self.r.read(65536)
            if not chunk:
                self.inbox.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self.inbox.put(json.loads(msg))

    def _next(self, deadline: float) -> dict:
        left = deadline - time.monotonic()
        try:
            msg = self.inbox.get(timeout=max(left, 0.01))
        except queue.Empty:
            raise TimeoutError("Chromium did not answer in time") from None
        if msg is None:
            self.stderr.seek(0)
            raise RuntimeError(f"Chromium exited: {self.stderr.read()[-2000:].decode(errors='replace')}")
        return msg

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg: dict = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == method and ev.get("sessionId") == session:
                return self.events.pop(i)
        while True:
            ev = self._next(deadline)
            if ev.get("method") == method and ev.get("sessionId") == session:
                return ev
            self.events.append(ev)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.w.close()
        self.stderr.close()
        self.profile.cleanup()

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_page(url: str, exe: str, width: int = 1400) -> PageResult:
    """Load ``url`` in a fresh headless Chromium and collect what the page did."""
    res = PageResult()
    with Chromium(exe) as b:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=s)
        b.send("Emulation.setDeviceMetricsOverride",
               {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=s)
        b.events.clear()  # about:blank's own events
        b.send("Page.navigate", {"url": url}, session=s)
        b.wait_event("Page.loadEventFired", s)
        media = b.send("Runtime.evaluate", {"expression": MEDIA_JS, "awaitPromise": True, "returnByValue": True},
                       session=s)
        if "exceptionDetails" in media:
            raise RuntimeError(f"page script failed: {media['exceptionDetails']}")
        value = media["result"]["value"]
        res.imgs, res.videos, res.links = value["imgs"], value["videos"], value["links"]
        b.send("Emulation.setDeviceMetricsOverride",
               {"width": width, "height": min(int(value["height"]), 16000), "deviceScaleFactor": 1, "mobile": False},
               session=s)
        shot = b.send("Page.captureScreenshot", {"format": "png"}, session=s)
        res.screenshot = base64.b64decode(shot["data"])
        b.send("Runtime.evaluate", {"expression": "0"}, session=s)  # flush events sent before this point
        for ev in b.events:
            if ev.get("sessionId") != s:
                continue
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Network.requestWillBeSent":
                res.requests.append(p["request"]["url"])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                res.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                res.errors.append(f"exception: {p['exceptionDetails']}")
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                res.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return res


def save(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
