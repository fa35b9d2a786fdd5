"""Browser pages in real headless Chromium (Playwright, Debian's /usr/bin/chromium) against an
in-process daemon with the tiny random Whisper: the viewer (partials, finals, last N lines, looks,
status, reconnect across a daemon restart), the speaker page (fake microphone from a WAV file),
the websocket Origin policy, and static serving without directory traversal."""

import asyncio
import http.client
import json
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamsed.daemon import web_routes
from streamsed.daemon.config import ConfigError, load_config, with_overrides
from streamsed.daemon.server import Daemon
from streamsed.engine.loading import engine_from_model
from tests.browser import PageErrors, WebSocketLog, artifact, chromium, http_get, requires_chromium
from tests.speech import RATE, espeak, silence
from tests.tiny_models import NO_GUARD, tiny_whisper

# Chromium reports refused websocket connections and fetches as console errors: expected while the
# daemon restarts.
RECONNECT_NOISE = ("WebSocket connection to", "Failed to load resource", "ERR_CONNECTION_REFUSED")


@pytest.fixture(scope="module")
def engine():
    model, extractor, tokenizer = tiny_whisper()
    return engine_from_model(model, extractor, tokenizer, name="tiny-whisper", device="cpu")


def config(**server):
    return with_overrides(load_config(env={}), server={"port": 0, **server}, guard=NO_GUARD)


async def started(engine, **server) -> Daemon:
    daemon = Daemon(config(**server), engine)
    await daemon.start()
    await daemon.wait_ready()
    return daemon


@pytest.fixture
async def daemon(engine):
    daemon = await started(engine)
    yield daemon
    await daemon.stop()


@pytest.fixture(scope="module")
def speech():
    audio = np.concatenate([silence(0.3), espeak("Hello everyone.", "en", 140), silence(1.0)])
    return (audio * 32767).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory):
    """What Chromium plays as its microphone (looped): speech, then silence that closes the utterance."""
    audio = np.concatenate([silence(0.5), espeak("Hello everyone.", "en", 140), silence(2.0)])
    path = tmp_path_factory.mktemp("mic") / "speech48k.wav"
    sf.write(path, soxr.resample(audio, RATE, 48000), 48000, subtype="PCM_16")
    return path


def partial(stream, segment, stable, unstable, target="en"):
    return {"type": "partial", "stream": stream, "segment": segment, "target_lang": target, "stable": stable,
            "unstable": unstable, "start": 0.5}


def final(stream, segment, text, target="en", start=0.5, end=1.5):
    return {"type": "final", "stream": stream, "segment": segment, "source_lang": "en", "target_lang": target,
            "text": text, "start": start, "end": end, "latency_ms": 300}


async def state(page, expected: str, timeout: float = 15_000) -> str:
    """Wait for the page's status to be ``expected``; return the status text."""
    await page.wait_for_function("s => document.body.dataset.state === s", arg=expected, timeout=timeout)
    return await page.locator("#status").inner_text()


def raw_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """An HTTP request with the path sent exactly as given (no client-side normalization)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            connection.putheader(key, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# -- static pages ---------------------------------------------------------------------------------
async def test_pages_and_assets_come_from_the_package_with_their_types(daemon):
    for path, (name, content_type) in web_routes.PAGES.items():
        status, headers, body = await http_get(f"http://127.0.0.1:{daemon.port}{path}")
        assert status == 200, path
        assert headers["Content-Type"] == content_type and headers["X-Content-Type-Options"] == "nosniff"
        assert body == (web_routes.resources.files("streamsed.daemon") / "web" / name).read_bytes()
        if content_type == web_routes.HTML:
            assert "default-src 'self'" in headers["Content-Security-Policy"]
    status, _, body = await http_get(f"http://127.0.0.1:{daemon.port}/captions/?stream=a&target_lang=en")
    assert status == 200 and b"viewer.js" in body
    for html in ("viewer.html", "speak.html"):  # no CDN: everything the pages load is ours
        page = (web_routes.resources.files("streamsed.daemon") / "web" / html).read_text()
        assert "http://" not in page and "https://" not in page and "//cdn" not in page


@pytest.mark.parametrize("path", [
    "/web/../server.py", "/web/../web_routes.py", "/../pyproject.toml", "/web/%2e%2e/server.py",
    "/web/..%2fserver.py", "/web/%2e%2e%2f%2e%2e%2fpyproject.toml", "/web/style.css/../../server.py",
    "/web/", "/web", "/web/viewer.html", "/viewer.html", "/streamsed/web/viewer.js", "/web/VIEWER.JS",
    "/web/./viewer.js", "/web//viewer.js", "/web/viewer.js%00.html", "/etc/passwd", "/web/..\\server.py",
])
async def test_no_directory_traversal(daemon, path):
    status, body = await asyncio.to_thread(raw_get, daemon.port, path)
    assert status == 404, (path, body[:200])
    assert body.startswith(b"not found; endpoints:")


# -- Origin policy for the websockets --------------------------------------------------------------
async def handshake(url: str, origin: str | None = None) -> int:
    """The handshake's HTTP status: 101 when the websocket opened."""
    try:
        async with connect(url, origin=origin, open_timeout=10) as ws:
            if "/v1/captions" in url:
                assert json.loads(await ws.recv())["type"] == "subscribed"
            return 101
    except InvalidStatus as error:
        assert b"allowed_origins" in error.response.body
        return error.response.status_code


async def test_origin_policy(engine):
    daemon = await started(engine, allowed_origins=["https://obs.example.org", "http://192.168.1.20:8080/"])
    port = daemon.port
    try:
        for path in ("/v1/stream", "/v1/captions?stream=o"):
            local, named = f"ws://127.0.0.1:{port}{path}", f"ws://localhost:{port}{path}"
            assert await handshake(local) == 101  # no Origin: a program, not a browser page
            assert await handshake(local, f"http://127.0.0.1:{port}") == 101  # same origin
            assert await handshake(named, f"http://localhost:{port}") == 101  # same origin, by name
            assert await handshake(named, f"http://LOCALHOST:{port}") == 101
            assert await handshake(local, "https://obs.example.org") == 101  # configured
            assert await handshake(local, "http://192.168.1.20:8080") == 101
            assert await handshake(local, "http://evil.example") == 403
            assert await handshake(local, "https://obs.example.org.evil.example") == 403
            assert await handshake(local, "http://obs.example.org") == 403  # another scheme is another origin
            assert await handshake(local, f"http://127.0.0.1:{port + 1}") == 403  # another port
            assert await handshake(named, f"http://127.0.0.1:{port}") == 403  # Host says localhost
            assert await handshake(local, "null") == 403  # file:// pages, sandboxed frames
        # Exports are plain GETs (no credentials): allowed origins get a CORS header, others none.
        base = f"http://127.0.0.1:{port}/v1/streams"
        _, headers, _ = await http_get(base, {"Origin": "https://obs.example.org"})
        assert headers["Access-Control-Allow-Origin"] == "https://obs.example.org"
        _, headers, _ = await http_get(base, {"Origin": "http://evil.example"})
        assert "Access-Control-Allow-Origin" not in headers
    finally:
        await daemon.stop()


async def test_any_origin_when_configured(engine):
    daemon = await started(engine, allowed_origins=["*"])
    try:
        assert await handshake(f"{daemon.url}/v1/captions?stream=o", "http://evil.example") == 101
    finally:
        await daemon.stop()


def test_same_origin_rules():
    same = web_routes.same_origin
    assert same("http://192.168.1.5", "192.168.1.5") and same("http://192.168.1.5", "192.168.1.5:80")
    assert same("https://10.0.0.2", "10.0.0.2") and same("https://localhost:443", "LOCALHOST")
    assert not same("https://10.0.0.2", "10.0.0.2:80")
    assert same("http://[::1]:8765", "[::1]:8765") and not same("http://[::1]:8765", "[::1]:8766")
    assert not same("ftp://10.0.0.2", "10.0.0.2") and not same("http://10.0.0.2", None)
    assert not same("http://user@10.0.0.2", "10.0.0.2")
    # DNS rebinding: a foreign page whose name now resolves here sends a matching Host header.
    assert not same("http://evil.example:8765", "evil.example:8765")
    assert not same("http://example.org", "example.org")  # DNS names need [server] allowed_origins


def test_allowed_origins_setting(tmp_path):
    assert load_config(env={}).server.allowed_origins == []
    env = {"STREAMSED_SERVER__ALLOWED_ORIGINS": "https://a.example, http://b.example:8080"}
    assert load_config(env=env).server.allowed_origins == ["https://a.example", "http://b.example:8080"]
    toml = tmp_path / "s.toml"
    toml.write_text('[server]\nallowed_origins = ["*"]\n')
    assert load_config(toml, env={}).server.allowed_origins == ["*"]
    for bad in (["a.example"], ["https://a.example/path"], ["ws://a.example"]):
        with pytest.raises(ConfigError, match="allowed_origins"):
            load_config(env={}, overrides={"server.allowed_origins": bad})


# -- the viewer in Chromium ------------------------------------------------------------------------
@requires_chromium
async def test_viewer_captions_and_a_daemon_restart(engine, speech):
    daemon = await started(engine)
    port = daemon.port
    try:
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            errors = PageErrors(page, ignore=RECONNECT_NOISE)
            await page.goto(f"http://127.0.0.1:{port}/captions?stream=room&lines=3")
            assert "waiting for captions on room" in await state(page, "idle")

            daemon.hub.publish(partial("room", 0, "Good morning", "every one"))
            line = page.locator('.line[data-segment="0"]')
            await line.locator(".unstable").filter(has_text="every one").wait_for()
            assert await line.locator(".stable").inner_text() == "Good morning"
            assert await line.inner_text() == "Good morning every one"
            looks = await page.evaluate("""() => {
                const style = (s) => getComputedStyle(document.querySelector(s));
                return {stable: style('.line .stable').color, unstable: style('.line .unstable').color,
                        italic: style('.line .unstable').fontStyle, size: parseFloat(style('.line').fontSize)};
            }""")
            assert looks["stable"] != looks["unstable"] and looks["italic"] == "italic" and looks["size"] >= 40
            assert "live" in await state(page, "live")

            daemon.hub.publish(final("room", 0, "Good morning, everyone."))
            await page.locator('.line.final[data-segment="0"]').wait_for()
            assert await line.inner_text() == "Good morning, everyone." and await line.locator(".unstable").count() == 1
            for segment, text in enumerate(["Welcome to the weekly meeting.", "Today we talk about captions.",
                                            "They should be easy to read from the back of the room."], start=1):
                daemon.hub.publish(final("room", segment, text))
            daemon.hub.publish(partial("room", 4, "Questions are", "welcome at the end"))
            await page.locator('.line[data-segment="4"]').wait_for()
            assert await page.locator(".line").evaluate_all("ls => ls.map(l => l.dataset.segment)") == ["2", "3", "4"]
            # The newest line is in view (auto-scroll), and the screenshot is for people to look at.
            assert await page.locator('.line[data-segment="4"]').is_visible()
            assert await page.evaluate("() => { const c = document.getElementById('captions');"
                                       " return c.scrollHeight - c.scrollTop - c.clientHeight < 2; }")
            await page.screenshot(path=artifact("viewer.png"))

            await daemon.stop()  # the viewer's socket closes with 1001
            assert "server gone" in await state(page, "gone")
            await page.screenshot(path=artifact("viewer-server-gone.png"))
            await asyncio.sleep(1.5)  # down for a while: the viewer keeps retrying
            daemon = await started(engine, port=port)
            assert "waiting for captions" in await state(page, "idle", timeout=20_000)

            async with connect(f"{daemon.url}/v1/stream") as ws:  # new captions, from a real session
                # English pinned: the random tiny model's language detection depends on the exact samples.
                await ws.send(json.dumps({"type": "start", "stream": "room", "source_lang": "en"}))
                for first in range(0, len(speech), 3200):
                    await ws.send(speech[first: first + 3200])
                await ws.send(json.dumps({"type": "stop"}))
                events = []
                try:
                    while True:
                        events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
                except ConnectionClosed:
                    pass
            finals = [e for e in events if e["type"] == "final"]
            assert [f["segment"] for f in finals] == [0]
            newest = page.locator(".line").last
            await page.wait_for_function("text => { const ls = document.querySelectorAll('.line.final .text');"
                                         " return ls.length && ls[ls.length - 1].textContent === text; }",
                                         arg=finals[0]["text"], timeout=15_000)
            assert await newest.get_attribute("data-segment") == "0"  # a new line, not the old segment 0
            assert await page.locator(".line").count() == 3
            errors.check()
    finally:
        await daemon.stop()


@requires_chromium
async def test_viewer_options_for_obs(daemon):
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 360})
        errors = PageErrors(page)
        query = "stream=obs&target_lang=de&transparent=1&size=64&color=ffcc00&unstable=00ff00&align=center&lines=2"
        await page.goto(f"http://127.0.0.1:{daemon.port}/captions?{query}")
        await state(page, "idle")
        daemon.hub.publish(final("obs", 0, "Not this one: English.", target="en"))
        daemon.hub.publish(final("obs", 0, "Guten Abend und willkommen.", target="de"))
        daemon.hub.publish(partial("obs", 1, "Wir beginnen", "gleich", target="de"))
        await page.locator('.line[data-segment="1"]').wait_for()
        assert await page.locator(".line").all_inner_texts() == ["Guten Abend und willkommen.", "Wir beginnen gleich"]
        looks = await page.evaluate("""() => {
            const style = (s) => getComputedStyle(document.querySelector(s));
            return {page: style('body').backgroundColor, html: style('html').backgroundColor,
                    size: style('.line').fontSize, color: style('.line.final').color,
                    unstable: style('.unstable').color, align: style('.line').textAlign,
                    box: style('.line .text').backgroundColor};
        }""")
        assert looks == {"page": "rgba(0, 0, 0, 0)", "html": "rgba(0, 0, 0, 0)", "size": "64px",
                         "color": "rgb(255, 204, 0)", "unstable": "rgb(0, 255, 0)", "align": "center",
                         "box": "rgba(0, 0, 0, 0.68)"}
        await page.screenshot(path=artifact("viewer-obs-transparent.png"), omit_background=True)
        errors.check()

        # ?idle=2: two quiet seconds after the last caption, the status says so.
        await page.goto(f"http://127.0.0.1:{daemon.port}/captions?stream=obs&idle=2")
        assert "waiting for captions on obs" in await state(page, "idle")
        daemon.hub.publish(final("obs", 7, "Anything else?"))
        await state(page, "live")
        assert "no captions for 2 s" in await state(page, "idle", timeout=5_000)

        # Values that are not colours or sizes are ignored, not injected.
        await page.goto(f"http://127.0.0.1:{daemon.port}/captions?stream=obs&size=1e9px;x:y&color=red;background:url(x)"
                        "&bg=javascript:alert(1)&font=x;}body{display:none")
        await state(page, "idle")
        sizes = await page.evaluate("() => [getComputedStyle(document.querySelector('.lines')).color,"
                                    " getComputedStyle(document.body).backgroundColor]")
        assert sizes == ["rgb(255, 255, 255)", "rgb(0, 0, 0)"]


@requires_chromium
async def test_stream_picker(daemon):
    daemon.hub.publish(final("lobby", 0, "Hello lobby."))
    async with chromium() as browser:
        page = await browser.new_page()
        errors = PageErrors(page)
        await page.goto(f"http://127.0.0.1:{daemon.port}/")
        link = page.locator("#streams a", has_text="lobby")
        await link.wait_for()
        assert await link.get_attribute("href") == "/captions?stream=lobby"
        assert "1 captions (en)" in await page.locator("#streams li").first.inner_text()
        await link.click()
        await state(page, "idle")
        assert page.url.endswith("/captions?stream=lobby")
        errors.check()


@requires_chromium
async def test_a_foreign_page_cannot_open_the_websockets(daemon):
    async with chromium() as browser:
        page = await browser.new_page()
        errors = PageErrors(page, ignore=RECONNECT_NOISE)
        await page.goto(f"http://localhost:{daemon.port}/captions?stream=x")
        await state(page, "idle")  # the viewer served under this name is same-origin with it
        opened = """url => new Promise(resolve => { const ws = new WebSocket(url);
                        ws.onopen = () => { ws.close(); resolve('open'); }; ws.onclose = (e) => resolve(e.code); })"""
        assert await page.evaluate(opened, f"ws://localhost:{daemon.port}/v1/captions?stream=x") == "open"
        assert await page.evaluate(opened, f"ws://127.0.0.1:{daemon.port}/v1/captions?stream=x") == 1006
        assert await page.evaluate(opened, f"ws://127.0.0.1:{daemon.port}/v1/stream") == 1006
        errors.check()


# -- the speaker page in Chromium --------------------------------------------------------------------
@requires_chromium
async def test_speaker_page_sends_the_microphone_at_its_native_rate(daemon, microphone_wav):
    async with chromium(microphone=microphone_wav) as browser:
        page = await browser.new_page(viewport={"width": 1100, "height": 700})
        errors = PageErrors(page)
        sockets = WebSocketLog(page)
        await page.goto(f"http://127.0.0.1:{daemon.port}/speak?stream=mic-test&batch_ms=40")
        assert await page.locator("#stream").input_value() == "mic-test"
        await page.click("#start")
        await state(page, "live")
        await page.wait_for_function("() => Number(document.getElementById('meter').dataset.level) > -30")
        await page.screenshot(path=artifact("speak-meter.png"))  # the level meter while speech plays
        await page.locator(".line.final").first.wait_for(timeout=60_000)
        rate = int(await page.evaluate("document.body.dataset.sampleRate"))
        start = sockets.sent_text[0]
        assert start == {"type": "start", "stream": "mic-test", "sample_rate": rate, "encoding": "pcm_s16le"}
        ready = sockets.events("ready")[0]
        assert ready["sample_rate"] == rate and ready["stream"] == "mic-test"
        assert await page.locator("#rate").get_attribute("data-sample-rate") == str(rate)
        batch = round(rate * 0.040) * 2  # 40 ms of Int16 per frame, at the browser's rate
        assert sockets.sent_frames and set(sockets.sent_frames[:-1]) == {batch}
        assert float(await page.locator("#meter").get_attribute("data-max")) > -35  # the meter saw speech
        first = sockets.events("final")[0]
        assert await page.locator(".line.final .text").first.inner_text() == first["text"]
        await page.screenshot(path=artifact("speak.png"))

        await page.click("#stop")
        assert "stopped" in await state(page, "stopped", timeout=30_000)
        assert sockets.sent_text[-1] == {"type": "stop"}
        errors.check()
    status, _, body = await http_get(f"http://127.0.0.1:{daemon.port}/v1/streams/mic-test/captions.jsonl")
    exported = [json.loads(line) for line in body.decode().splitlines()]
    assert [(r["segment"], r["text"]) for r in exported] == [(f["segment"], f["text"]) for f in sockets.events("final")]


@requires_chromium
async def test_speaker_page_reconnects_and_reports_a_taken_stream(engine, microphone_wav):
    daemon = await started(engine)
    port = daemon.port
    try:
        async with chromium(microphone=microphone_wav) as browser:
            page = await browser.new_page()
            errors = PageErrors(page, ignore=RECONNECT_NOISE)
            sockets = WebSocketLog(page)
            async with connect(f"{daemon.url}/v1/stream") as other:  # someone else ingests "taken"
                await other.send(json.dumps({"type": "start", "stream": "taken"}))
                assert json.loads(await other.recv())["type"] == "ready"
                await page.goto(f"http://127.0.0.1:{port}/speak?stream=taken")
                await page.click("#start")
                assert "stream_in_use" in await state(page, "error")
                await page.wait_for_function("() => !document.getElementById('start').disabled")  # mic off again

            await page.goto(f"http://127.0.0.1:{port}/speak?stream=comeback")
            await page.click("#start")
            await state(page, "live")
            await daemon.stop()  # the session is finished; the page keeps its microphone and retries
            assert "server gone · retrying" in await state(page, "gone")
            daemon = await started(engine, port=port)
            await state(page, "live", timeout=20_000)
            assert [e["stream"] for e in sockets.events("ready")] == ["comeback", "comeback"]
            second = max(i for i, e in enumerate(sockets.received) if e["type"] == "ready")
            async with asyncio.timeout(60):  # captions from the new daemon
                while not any(e["type"] == "final" for e in sockets.received[second:]):
                    await asyncio.sleep(0.1)
            text = next(e["text"] for e in sockets.received[second:] if e["type"] == "final")
            await page.locator(".line.final .text", has_text=text).first.wait_for()
            await page.click("#stop")
            await state(page, "stopped", timeout=30_000)
            errors.check()
    finally:
        await daemon.stop()


@requires_chromium
async def test_speaker_page_over_https_on_a_lan_address_with_a_token(engine, microphone_wav, tmp_path):
    """getUserMedia needs a secure context off localhost: the daemon's own TLS on 127.0.0.2 gives it,
    and the page carries the ?token= of its URL into its socket and its links."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=streamsed",
                    "-addext", "subjectAltName=IP:127.0.0.2", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    daemon = await started(engine, host="127.0.0.2", tls_cert=str(cert), tls_key=str(key), auth_tokens=["tok3n"])
    try:
        async with chromium(microphone=microphone_wav) as browser:
            context = await browser.new_context(ignore_https_errors=True)  # the self-signed certificate
            page = await context.new_page()
            errors = PageErrors(page)
            sockets = WebSocketLog(page)
            opened = []
            page.on("websocket", lambda ws: opened.append(ws.url))
            await page.goto(f"https://127.0.0.2:{daemon.port}/speak?stream=tls-mic&token=tok3n")
            assert await page.evaluate("window.isSecureContext")
            await page.click("#start")
            await page.locator(".line.final").first.wait_for(timeout=60_000)
            assert opened and all(url.startswith("wss://127.0.0.2:") and "token=tok3n" in url for url in opened)
            assert sockets.events("ready")[0]["stream"] == "tls-mic"
            links = await page.locator("#links a").evaluate_all("links => links.map(a => a.href)")
            assert links and all("token=tok3n" in href for href in links)
            await page.click("#stop")
            await state(page, "stopped", timeout=30_000)
            errors.check()
            # Without the token the same page gets nothing: its socket is refused with 401.
            bare = await context.new_page()
            refused = []
            bare.on("websocket", lambda ws: ws.on("close", lambda _: refused.append(ws.url)))
            await bare.goto(f"https://127.0.0.2:{daemon.port}/speak?stream=tls-mic")
            await bare.click("#start")
            await bare.wait_for_function("() => document.body.innerText.length > 0")
            async with asyncio.timeout(15):
                while not refused:
                    await asyncio.sleep(0.1)
    finally:
        await daemon.stop()
