"""The daemon on a real loopback socket with the tiny random Whisper: every bad input, refusals,
health endpoints, listeners, shutdown and responsiveness while the model is busy."""

import argparse
import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamsed.daemon.config import load_config, with_overrides
from streamsed.daemon.server import Daemon
from streamsed.engine.loading import engine_from_model
from tests.speech import espeak, silence
from tests.tiny_models import NO_GUARD, tiny_whisper
from tests.waiting import eventually


@pytest.fixture(scope="module")
def engine():
    model, extractor, tokenizer = tiny_whisper()
    return engine_from_model(model, extractor, tokenizer, name="tiny-whisper", device="cpu")


@pytest.fixture(scope="module")
def speech():
    """Two utterances, s16le bytes at 16 kHz, ending in silence."""
    audio = np.concatenate([silence(0.3), espeak("Hello everyone.", "en", 140), silence(1.0),
                            espeak("Thank you for coming.", "en", 140), silence(1.0)])
    return (audio * 32767).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def open_speech():
    """One utterance with no silence after it: the VAD leaves it open until finish()."""
    audio = np.concatenate([silence(0.3), espeak("Hello everyone, this keeps going.", "en", 140)])
    return (audio * 32767).astype("<i2").tobytes()


def config(**server):
    return with_overrides(load_config(env={}), server={"port": 0, **server}, guard=NO_GUARD)


@pytest.fixture
async def daemon(engine):
    daemon = Daemon(config(), engine)
    await daemon.start()
    await daemon.wait_ready()
    yield daemon
    await daemon.stop()


def chunks(data: bytes, size: int = 3200):
    return [data[i: i + size] for i in range(0, len(data), size)]


async def receive(ws, timeout=30.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until_closed(ws, timeout=60.0) -> list[dict]:
    events = []
    async with asyncio.timeout(timeout):
        try:
            while True:
                events.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            pass
    return events


async def start(ws, **options) -> dict:
    await ws.send(json.dumps({"type": "start", **options}))
    ready = await receive(ws)
    assert ready["type"] == "ready", ready
    return ready


async def stream(ws, data: bytes) -> None:
    for chunk in chunks(data):
        await ws.send(chunk)


def finals(events):
    return [e for e in events if e["type"] == "final"]


async def http_get(url: str) -> tuple[int, str]:
    def get():
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    return await asyncio.to_thread(get)


async def expect_fatal(ws, code, close_code=1008) -> dict:
    error = await receive(ws)
    assert error["type"] == "error" and error["code"] == code, error
    assert error["message"]
    await until_closed(ws)
    assert ws.close_code == close_code and ws.close_reason.startswith(code)
    return error


# -- the happy path -----------------------------------------------------------------------------
async def test_stream_stop_delivers_finals_then_closes_1000(daemon, speech):
    async with connect(f"{daemon.url}/v1/stream") as ws:
        ready = await start(ws, stream="room1", source_lang="en")
        assert ready == {"type": "ready", "stream": "room1", "session": ready["session"], "model": "tiny-whisper",
                         "sample_rate": 16000, "source_lang": "en", "targets": ["en"], "prompt": None}
        await stream(ws, speech)
        await ws.send(json.dumps({"type": "keepalive"}))
        await ws.send(json.dumps({"type": "stop"}))
        events = await until_closed(ws)
    assert ws.close_code == 1000
    assert [(e["segment"], e["target_lang"]) for e in finals(events)] == [(0, "en"), (1, "en")]
    kinds = [e["type"] for e in events]
    assert kinds.count("speech_start") == 2 and kinds.count("speech_end") == 2
    for final in finals(events):
        assert set(final) == {"type", "stream", "segment", "source_lang", "target_lang", "text", "start", "end",
                              "latency_ms", "window", "queued_ms", "compute_ms", "avg_logprob"}
        assert final["stream"] == "room1" and 0 <= final["start"] < final["end"] <= len(speech) / 32000
        assert final["latency_ms"] >= 0


async def test_audio_before_start_starts_with_query_options(daemon, speech):
    async with connect(f"{daemon.url}/v1/stream?stream=q1&targets=en&sample_rate=16000") as ws:
        await ws.send(speech[:3200])
        ready = await receive(ws)
        assert ready["type"] == "ready" and ready["stream"] == "q1" and ready["targets"] == ["en"]
        await ws.send(json.dumps({"type": "start"}))
        assert (await receive(ws))["code"] == "already_started"
        await stream(ws, speech[3200:])
        await ws.send(json.dumps({"type": "stop"}))
        events = await until_closed(ws)
    assert len(finals(events)) == 2 and ws.close_code == 1000


async def test_resampled_float_input(daemon, speech):
    samples = np.frombuffer(speech, "<i2").astype(np.float32) / 32768
    import soxr
    data = soxr.resample(samples, 16000, 44100).astype("<f4").tobytes()
    async with connect(f"{daemon.url}/v1/stream") as ws:
        assert (await start(ws, sample_rate=44100, encoding="pcm_f32le"))["sample_rate"] == 44100
        for chunk in chunks(data, 17640):
            await ws.send(chunk)
        await ws.send(json.dumps({"type": "stop"}))
        events = await until_closed(ws)
    assert [e["segment"] for e in finals(events)] == [0, 1]


# -- health ---------------------------------------------------------------------------------------
async def test_healthz_and_readyz_while_loading(engine):
    release = threading.Event()

    def slow_loader():
        assert release.wait(30)
        return engine

    daemon = Daemon(config(), engine_loader=slow_loader)
    await daemon.start()
    base = f"http://127.0.0.1:{daemon.port}"
    try:
        assert await http_get(f"{base}/healthz") == (200, "ok\n")
        assert await http_get(f"{base}/readyz") == (503, "loading model\n")
        async with connect(f"{daemon.url}/v1/stream") as ws:
            await expect_fatal(ws, "not_ready", 1013)
        status, body = await http_get(f"{base}/nope")
        assert status == 404 and "/v1/stream" in body
        release.set()
        await daemon.wait_ready()
        assert await http_get(f"{base}/readyz") == (200, "ready\n")
    finally:
        release.set()
        await daemon.stop()


async def test_readyz_reports_a_load_failure(engine):
    def broken_loader():
        raise RuntimeError("no weights here")

    daemon = Daemon(config(), engine_loader=broken_loader)
    await daemon.start()
    try:
        with pytest.raises(RuntimeError):
            await daemon.wait_ready()
        status, body = await http_get(f"http://127.0.0.1:{daemon.port}/readyz")
        assert status == 503 and "no weights here" in body
    finally:
        await daemon.stop()


# -- bad input: recoverable ------------------------------------------------------------------------
async def test_malformed_json_and_unknown_type_are_recoverable(daemon, speech):
    async with connect(f"{daemon.url}/v1/stream") as ws:
        await ws.send("{not json")
        assert (await receive(ws))["code"] == "bad_json"
        await ws.send(json.dumps({"type": "dance"}))
        error = await receive(ws)
        assert error["code"] == "unknown_type" and "dance" in error["message"]
        await ws.send("[]")
        assert (await receive(ws))["code"] == "bad_json"
        await start(ws)
        await ws.send("{")
        assert (await receive(ws))["code"] == "bad_json"
        await stream(ws, speech)
        await ws.send(json.dumps({"type": "stop"}))
        assert len(finals(await until_closed(ws))) == 2


async def test_odd_byte_count_is_dropped_and_the_session_survives(daemon, speech):
    async with connect(f"{daemon.url}/v1/stream") as ws:
        await start(ws)
        await ws.send(b"\x00\x01\x02")
        error = await receive(ws)
        assert error["code"] == "bad_audio" and "3 bytes" in error["message"]
        await stream(ws, speech)
        await ws.send(json.dumps({"type": "stop"}))
        events = await until_closed(ws)
    assert ws.close_code == 1000 and len(finals(events)) == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
async def test_nan_and_inf_floats_are_rejected(daemon, bad):
    async with connect(f"{daemon.url}/v1/stream") as ws:
        await start(ws, encoding="pcm_f32le")
        frame = np.zeros(1600, "<f4")
        frame[100] = bad
        await ws.send(frame.tobytes())
        error = await receive(ws)
        assert error["code"] == "bad_audio" and "NaN or infinite" in error["message"]
        await ws.send(np.zeros(1600, "<f4").tobytes())  # still alive
        await ws.send(json.dumps({"type": "stop"}))
        await until_closed(ws)
    assert ws.close_code == 1000


async def test_oversized_frames(engine, speech):
    daemon = Daemon(config(max_frame_bytes=4096), engine)
    await daemon.start()
    await daemon.wait_ready()
    try:
        async with connect(f"{daemon.url}/v1/stream") as ws:
            await start(ws)
            await ws.send(b"\x00" * 6000)  # over max_frame_bytes: error, frame dropped
            error = await receive(ws)
            assert error["code"] == "frame_too_large" and "4096" in error["message"]
            await stream(ws, speech)
            await ws.send(json.dumps({"type": "stop"}))
            assert len(finals(await until_closed(ws))) == 2
        async with connect(f"{daemon.url}/v1/stream") as ws:
            await start(ws)
            await ws.send(b"\x00" * 20000)  # over 4x: the websocket layer closes with 1009
            await until_closed(ws)
            assert ws.close_code == 1009
        async with connect(f"{daemon.url}/v1/stream") as ws:  # the daemon is fine
            await start(ws)
    finally:
        await daemon.stop()


# -- bad input: fatal -----------------------------------------------------------------------------
@pytest.mark.parametrize("query, options, code", [
    ("", {"encoding": "mp3"}, "unsupported_encoding"),
    ("?encoding=opus", {}, "unsupported_encoding"),
    ("", {"sample_rate": 4000}, "bad_sample_rate"),
    ("?sample_rate=400000", {}, "bad_sample_rate"),
    ("", {"source_lang": "en", "targets": ["de"]}, "unsupported_language"),  # Whisper: X -> en only
    ("", {"source_lang": "zz"}, "unsupported_language"),
    ("?targets=english!", {}, "unsupported_language"),
    ("", {"stream": "no spaces allowed"}, "bad_option"),
    ("", {"samplerate": 16000}, "bad_option"),
])
async def test_bad_start_options_close_1008_and_the_daemon_survives(daemon, query, options, code):
    async with connect(f"{daemon.url}/v1/stream{query}") as ws:
        await ws.send(json.dumps({"type": "start", **options}))
        await expect_fatal(ws, code)
    async with connect(f"{daemon.url}/v1/stream") as ws:
        await start(ws)


async def test_binary_before_start_with_bad_query_options(daemon):
    async with connect(f"{daemon.url}/v1/stream?sample_rate=100") as ws:
        await ws.send(b"\x00\x00" * 100)
        await expect_fatal(ws, "bad_sample_rate")


async def test_one_ingest_per_stream_id(daemon):
    async with connect(f"{daemon.url}/v1/stream") as first:
        await start(first, stream="dup")
        async with connect(f"{daemon.url}/v1/stream") as second:
            await second.send(json.dumps({"type": "start", "stream": "dup"}))
            await expect_fatal(second, "stream_in_use")
    # Released once the server has finished the first session (its open utterance is finalized
    # after the client's close handshake, so a reconnect right away may still find it in use).
    for _ in range(50):
        async with connect(f"{daemon.url}/v1/stream") as third:
            await third.send(json.dumps({"type": "start", "stream": "dup"}))
            reply = await receive(third)
            if reply["type"] == "ready":
                break
            assert reply["code"] == "stream_in_use"
        await asyncio.sleep(0.1)
    assert reply["type"] == "ready", reply


async def test_too_many_sessions_is_refused_at_once(engine):
    daemon = Daemon(config(max_sessions=2), engine)
    await daemon.start()
    await daemon.wait_ready()
    try:
        async with connect(f"{daemon.url}/v1/stream") as a, connect(f"{daemon.url}/v1/stream") as b:
            await start(a)
            await start(b)
            async with connect(f"{daemon.url}/v1/stream") as c:
                error = await expect_fatal(c, "too_many_sessions", 1013)
                assert "2 sessions" in error["message"]
        # The server frees a slot once its handler has finished, a moment after the client sees the close.
        await eventually(lambda: not daemon._ingests)
        async with connect(f"{daemon.url}/v1/stream") as d:  # slots are free again
            await start(d)
    finally:
        await daemon.stop()


async def test_captions_need_a_stream_id(daemon):
    async with connect(f"{daemon.url}/v1/captions") as ws:
        await expect_fatal(ws, "bad_option")


# -- listeners ------------------------------------------------------------------------------------
async def subscribe(daemon, stream, target_lang=None):
    url = f"{daemon.url}/v1/captions?stream={stream}" + (f"&target_lang={target_lang}" if target_lang else "")
    ws = await connect(url)
    assert await receive(ws) == {"type": "subscribed", "stream": stream, "target_lang": target_lang}
    return ws


async def test_listeners_see_the_same_finals(daemon, speech):
    listener = await subscribe(daemon, "shared")  # before the stream exists
    english = await subscribe(daemon, "shared", "en")
    async with connect(f"{daemon.url}/v1/stream") as ws:
        ready = await start(ws, stream="shared", source_lang="de", targets=["de", "en"])
        assert ready["targets"] == ["de", "en"]
        await stream(ws, speech)
        await ws.send(json.dumps({"type": "stop"}))
        sent = finals(await until_closed(ws))
    assert [(e["segment"], e["target_lang"]) for e in sent] == [(0, "de"), (0, "en"), (1, "de"), (1, "en")]

    async def heard_finals(ws, count):
        heard = []
        while len(heard) < count:
            event = await receive(ws)
            assert event["type"] in ("partial", "final")
            if event["type"] == "final":
                heard.append(event)
        return heard

    assert await heard_finals(listener, 4) == sent
    assert await heard_finals(english, 2) == [e for e in sent if e["target_lang"] == "en"]
    await listener.close()
    await english.close()
    for _ in range(50):
        if not daemon.hub.listeners("shared"):
            break
        await asyncio.sleep(0.02)
    assert daemon.hub.listeners("shared") == []  # unsubscribed when they left


async def test_client_vanishing_mid_utterance_still_delivers_its_final(daemon, open_speech):
    listener = await subscribe(daemon, "vanish")
    ws = await connect(f"{daemon.url}/v1/stream")
    await start(ws, stream="vanish")
    await stream(ws, open_speech)
    ws.transport.abort()  # no close handshake: the client is simply gone
    async with asyncio.timeout(30):
        while (event := await receive(listener))["type"] != "final":
            pass
    assert event["segment"] == 0 and event["stream"] == "vanish"
    await listener.close()


async def test_shutdown_finishes_open_utterances(engine, open_speech):
    daemon = Daemon(config(), engine)
    await daemon.start()
    await daemon.wait_ready()
    listener = await subscribe(daemon, "closing")
    async with connect(f"{daemon.url}/v1/stream") as ws:
        await start(ws, stream="closing")
        await stream(ws, open_speech)
        await ws.send(json.dumps({"type": "keepalive"}))  # a round trip: the audio has been read
        await asyncio.sleep(0.3)
        stopping = asyncio.create_task(daemon.stop())
        events = await until_closed(ws)
    assert ws.close_code == 1001
    assert [e["segment"] for e in finals(events)] == [0]
    heard = [e for e in await until_closed(listener) if e["type"] == "final"]
    assert heard == finals(events) and listener.close_code == 1001
    await asyncio.wait_for(stopping, 30)


# -- concurrency and responsiveness ---------------------------------------------------------------
class BusyEncoder:
    """Wraps engine.encode so every call keeps the CPU busy (GIL released) for ``seconds``."""

    def __init__(self, engine, seconds):
        self.engine, self.seconds, self.busy = engine, seconds, threading.Event()
        self.original = engine.encode

    def __enter__(self):
        def encode(audios, window="exact"):
            self.busy.set()
            a = torch.randn(384, 384)
            end = time.monotonic() + self.seconds
            while time.monotonic() < end:
                a = torch.tanh(a @ a)
            return self.original(audios, window)

        self.engine.encode = encode
        return self

    def __exit__(self, *exc):
        del self.engine.encode


async def test_pings_answered_promptly_while_the_model_is_busy(daemon, engine, speech):
    with BusyEncoder(engine, 2.0) as busy:
        async with connect(f"{daemon.url}/v1/stream") as ws, connect(f"{daemon.url}/v1/captions?stream=p") as idle:
            await start(ws, stream="p")
            await stream(ws, speech)
            assert await asyncio.to_thread(busy.busy.wait, 10)
            latencies = []
            for _ in range(5):
                latencies.append(await (await ws.ping()))
                latencies.append(await (await idle.ping()))
                await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "stop"}))
            assert len(finals(await until_closed(ws))) == 2
    assert max(latencies) < 0.25, latencies


@pytest.mark.parametrize("lanes", [1, 2])
async def test_four_concurrent_streams_complete_and_batch(engine, speech, lanes):
    # One lane (as on CUDA) batches finals of different streams; two lanes (a CPU) run each alone.
    daemon = Daemon(with_overrides(config(), model={"lanes": lanes}), engine)
    await daemon.start()
    await daemon.wait_ready()

    async def client(n):
        async with connect(f"{daemon.url}/v1/stream") as ws:
            await start(ws, stream=f"c{n}")
            await stream(ws, speech)
            await ws.send(json.dumps({"type": "stop"}))
            events = await until_closed(ws, timeout=120)
            return ws.close_code, finals(events)

    try:
        with BusyEncoder(engine, 0.3):  # slows lane 0 (the engine itself; a second lane has a replica)
            results = await asyncio.gather(*(client(n) for n in range(4)))
        stats = daemon.worker.stats
    finally:
        await daemon.stop()
    for n, (code, sent) in enumerate(results):
        assert code == 1000 and [(e["stream"], e["segment"]) for e in sent] == [(f"c{n}", 0), (f"c{n}", 1)]
    assert daemon.worker.lanes == lanes and stats.requests >= 8 and stats.failed == 0
    if lanes == 1:
        assert stats.max_encoder_batch > 1


# -- `streamsed serve` errors before any model work ------------------------------------------------
def serve_cli(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "streamsed", "serve", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamsed: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_serve_config_errors(tmp_path):
    assert_one_line_error(serve_cli("--config", str(tmp_path / "none.toml")), "config file not found")
    assert_one_line_error(serve_cli(env={"STREAMSED_SERVER__MAX_SESSIONS": "many"}),
                          "STREAMSED_SERVER__MAX_SESSIONS must be an integer")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nname = 'whisper-base'\ndevise = 'cpu'\n")
    assert_one_line_error(serve_cli("--config", str(bad)), "unknown key 'devise' in [model]")


def test_serve_port_in_use():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(serve_cli("--port", str(port)), f"cannot serve on 127.0.0.1:{port}")


# -- the reference clients, in process -------------------------------------------------------------
async def test_reference_clients(daemon, speech, tmp_path, capsys):
    import soundfile as sf
    import soxr

    from clients import listen, ws_stream

    samples = np.frombuffer(speech, "<i2").astype(np.float32) / 32768
    path = tmp_path / "speech22k.wav"
    sf.write(path, soxr.resample(samples, 16000, 22050), 22050, subtype="PCM_16")  # sent at its own rate
    listen_args = argparse.Namespace(url=daemon.url, stream="clients", target_lang=None, jsonl=True, token=None)
    listener = asyncio.create_task(listen.run(listen_args))
    while not daemon.hub.listeners("clients"):
        await asyncio.sleep(0.01)
    args = ws_stream.build_parser().parse_args([str(path), "--url", daemon.url, "--stream", "clients", "--fast",
                                                "--chunk-ms", "50", "--jsonl"])
    assert await ws_stream.run(args) == 0
    await asyncio.sleep(0.2)
    await daemon.stop()  # closes the listener with 1001: listen.run returns 0
    assert await asyncio.wait_for(listener, 10) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ready = [e for e in events if e["type"] == "ready"]
    assert len(ready) == 1 and ready[0]["sample_rate"] == 22050
    finals_seen = [(e["stream"], e["segment"]) for e in events if e["type"] == "final"]
    assert sorted(finals_seen) == [("clients", 0)] * 2 + [("clients", 1)] * 2  # from the client and the listener


def test_printer_for_people(capsys):
    from clients.ws_stream import Printer, endpoint

    printer = Printer(jsonl=False)
    printer.show({"type": "partial", "segment": 0, "target_lang": "en", "stable": "Hello", "unstable": "every"})
    printer.show({"type": "final", "segment": 0, "target_lang": "en", "text": "Hello everyone.", "start": 0.5,
                  "end": 1.75, "latency_ms": 420})
    printer.show({"type": "error", "code": "bad_audio", "message": "odd"})
    out, err = capsys.readouterr()
    assert out == "~ 0 [en] Hello every\n0 [0.50-1.75] [en] Hello everyone.  (420 ms)\n"
    assert err == "error bad_audio: odd\n"
    assert endpoint("ws://h:1", "/v1/stream") == "ws://h:1/v1/stream"
    assert endpoint("ws://h:1/", "/v1/stream") == "ws://h:1/v1/stream"
    assert endpoint("ws://h:1/custom", "/v1/stream") == "ws://h:1/custom"


async def test_new_streams_are_refused_while_the_engine_is_overloaded(engine, monkeypatch):
    daemon = Daemon(config(), engine)
    await daemon.start()
    await daemon.wait_ready()
    try:
        async with connect(f"{daemon.url}/v1/stream") as open_stream:
            await start(open_stream, stream="early")
            monkeypatch.setattr(type(daemon.worker), "overloaded", property(lambda self: True))
            async with connect(f"{daemon.url}/v1/stream") as late:
                error = await expect_fatal(late, "overloaded", 1013)
                assert "deadline" in error["message"]
            await open_stream.send(json.dumps({"type": "keepalive"}))  # the open stream is unaffected
            monkeypatch.undo()
        async with connect(f"{daemon.url}/v1/stream") as after:
            await start(after, stream="after")
    finally:
        await daemon.stop()


async def test_a_long_overload_sheds_the_newest_stream_after_finalizing_it(engine, open_speech, monkeypatch):
    daemon = Daemon(config(shed_after_s=0.4), engine)
    await daemon.start()
    await daemon.wait_ready()
    try:
        async with connect(f"{daemon.url}/v1/stream") as old, connect(f"{daemon.url}/v1/stream") as new:
            await start(old, stream="old", source_lang="en")
            await start(new, stream="new", source_lang="en")
            await stream(new, open_speech)  # an utterance still open when the stream is shed
            await new.send(json.dumps({"type": "keepalive"}))
            await asyncio.sleep(0.3)  # the processor has fed all of it before the overload starts
            monkeypatch.setattr(type(daemon.worker), "overloaded_for", property(lambda self: 60.0))
            events = await until_closed(new)
            assert new.close_code == 1013 and new.close_reason.startswith("overloaded")
            kinds = [e["type"] for e in events]
            error = events[kinds.index("error")]
            assert error["code"] == "overloaded" and "newest" in error["message"]
            assert [e["segment"] for e in finals(events)] == [0]  # its open utterance was finalized
            await asyncio.sleep(1.0)  # one stream left: it is never shed
            await old.send(json.dumps({"type": "stop"}))
            await until_closed(old)
            assert old.close_code == 1000
            monkeypatch.undo()
        status, body = await http_get(daemon.url.replace("ws://", "http://") + "/v1/engine")
        assert json.loads(body)["shed_streams"] == 1
    finally:
        await daemon.stop()


async def test_engine_counters_are_served_as_json(daemon, speech):
    status, body = await http_get(daemon.url.replace("ws://", "http://") + "/v1/engine")
    before = json.loads(body)
    assert status == 200 and before["model"] == "tiny-whisper" and before["overloaded"] is False
    assert before["windows"] == {"final": "fast", "partial": "fast", "file": "fast"} and before["final_deadline_ms"] == 2000
    assert before["partial_dtype"] == "int8-first"  # the default config on a CPU: first partials on the int8 twin
    async with connect(f"{daemon.url}/v1/stream") as ws:
        await start(ws, stream="counted", source_lang="en")
        await stream(ws, speech)
        await ws.send(json.dumps({"type": "stop"}))
        events = await until_closed(ws)
    after = json.loads((await http_get(daemon.url.replace("ws://", "http://") + "/v1/engine"))[1])
    assert after["requests"] - before["requests"] >= len(finals(events)) == 2
    assert after["busy_seconds"] > before["busy_seconds"] and after["batches"] > before["batches"]
    assert sum(after["answered_by_window"].values()) > sum(before["answered_by_window"].values())
