"""Headless Chromium for the web tests: Debian's /usr/bin/chromium driven by Playwright (no browser
download), a fresh profile per launch, optionally a WAV file as the microphone.

Chromium's fake capture device loops the file, so give it speech followed by enough silence for
the voice activity detector to close the utterance.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"  # gitignored; CI can keep it
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]

try:
    import playwright.async_api as _playwright
except ImportError:  # pragma: no cover - the test extra installs it
    _playwright = None

requires_chromium = pytest.mark.skipif(
    _playwright is None or not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium (apt-get install chromium) and the playwright Python package",
)


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


@asynccontextmanager
async def chromium(microphone: Path | None = None):
    """A headless Chromium; ``microphone``: a WAV file played (looped) as the microphone."""
    args = list(CHROMIUM_ARGS)
    if microphone is not None:
        args.append(f"--use-file-for-fake-audio-capture={microphone}")
    async with _playwright.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield browser
        finally:
            await browser.close()


class PageErrors:
    """Collects a page's uncaught exceptions and console errors (CSP violations show up there)."""

    def __init__(self, page, ignore: tuple[str, ...] = ()):
        self.errors: list[str] = []
        self.ignore = ignore
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on("console", lambda message: message.type == "error" and self._console(message.text))

    def _console(self, text: str) -> None:
        if not any(fragment in text for fragment in self.ignore):
            self.errors.append(f"console: {text}")

    def check(self) -> None:
        assert not self.errors, "\n".join(self.errors)


class WebSocketLog:
    """Every JSON frame a page's websockets receive, as parsed dicts (what the page was sent)."""

    def __init__(self, page):
        import json

        self.received: list[dict] = []
        self.sent_text: list[dict] = []
        self.sent_frames: list[int] = []  # sizes of the binary frames sent

        def on_socket(ws):
            def received(payload):
                if isinstance(payload, str):
                    self.received.append(json.loads(payload))

            def sent(payload):
                if isinstance(payload, str):
                    self.sent_text.append(json.loads(payload))
                else:
                    self.sent_frames.append(len(payload))

            ws.on("framereceived", received)
            ws.on("framesent", sent)

        page.on("websocket", on_socket)

    def events(self, kind: str) -> list[dict]:
        return [event for event in self.received if event.get("type") == kind]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DaemonProcess:
    """``streamsed serve`` in a subprocess on ``port`` (0: any free one), ready once started."""

    def __init__(self, *args: str, port: int = 0, timeout: float = 300):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamsed", "serve", "--port", str(port), "--device", "cpu", *args],
            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        line = self.process.stdout.readline()
        assert line.startswith("listening on ws://"), (line, self.process.stderr.read())
        self.url = line.split()[-1]
        self.http = "http" + self.url[2:]
        self.port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while self.status("/readyz") != 200:
            assert self.process.poll() is None and time.monotonic() < deadline, self.process.stderr.read()
            time.sleep(0.2)

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"{self.http}{path}", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET without blocking the event loop (the daemon under test may run in it)."""

    def get():
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    return await asyncio.to_thread(get)


def has_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def cues_per_segment(cues) -> list[tuple[str, str, str, str]]:
    """webvtt-py cues grouped by the segment of their ``<segment>-<n>`` id: (segment, text of all its
    cues joined by spaces, start of the first, end of the last). A long final is several cues."""
    import html

    grouped: dict[str, list] = {}
    for cue in cues:
        segment, _, _ = cue.identifier.partition("-")
        grouped.setdefault(segment, []).append(cue)
    return [(segment, " ".join(html.unescape(c.text).replace("\n", " ") for c in group), group[0].start, group[-1].end)
            for segment, group in grouped.items()]
