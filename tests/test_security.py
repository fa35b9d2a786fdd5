"""Tokens, TLS, Prometheus metrics and connection limits of the daemon (tiny model, real sockets)."""

import asyncio
import json
import ssl
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamsed.daemon.config import ConfigError, load_config, with_overrides
from streamsed.daemon.server import Daemon
from streamsed.engine.loading import engine_from_model
from tests.speech import espeak, silence
from tests.tiny_models import NO_GUARD, tiny_whisper
from tests.waiting import eventually

TOKEN, OTHER = "s3cret-token", "second-token"


@pytest.fixture(scope="module")
def engine():
    model, extractor, tokenizer = tiny_whisper()
    return engine_from_model(model, extractor, tokenizer, name="tiny-whisper", device="cpu")


@pytest.fixture(scope="module")
def speech():
    audio = np.concatenate([silence(0.3), espeak("Hello everyone.", "en", 140), silence(1.0),
                            espeak("Thank you for coming.", "en", 140), silence(1.0)])
    return (audio * 32767).astype("<i2").tobytes()


async def started(engine, **server):
    daemon = Daemon(with_overrides(load_config(env={}), server={"port": 0, **server}, guard=NO_GUARD), engine)
    await daemon.start()
    await daemon.wait_ready()
    return daemon


def get(url, headers=None, context=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def aget(*args, **kwargs):
    return await asyncio.to_thread(get, *args, **kwargs)


async def stream_and_stop(url, speech, stream="room", **connect_kwargs):
    async with connect(url, **connect_kwargs) as ws:
        await ws.send(json.dumps({"type": "start", "stream": stream, "source_lang": "en"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        for start in range(0, len(speech), 3200):
            await ws.send(speech[start:start + 3200])
        await ws.send(json.dumps({"type": "stop"}))
        events = []
        try:
            while True:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        except ConnectionClosed:
            pass
        return events


async def refused_with(url, status, **kwargs):
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):
            pass
    assert info.value.response.status_code == status
    return info.value.response.body.decode()


# -- tokens -----------------------------------------------------------------------------------------
async def test_every_endpoint_but_health_needs_a_token(engine, speech):
    daemon = await started(engine, auth_tokens=[TOKEN, OTHER])
    http, ws = daemon.url.replace("ws://", "http://"), daemon.url
    try:
        assert (await stream_and_stop(f"{ws}/v1/stream", speech, additional_headers={
            "Authorization": f"Bearer {TOKEN}"}))[-1]["type"] == "final"
        for path in ("/v1/streams", "/v1/streams/room/captions.vtt", "/v1/engine", "/metrics", "/nope"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                status, body = await aget(http + path, headers)
                assert status == 401 and "room" not in body and "Hello" not in body, (path, headers)
            assert (await aget(http + path, {"Authorization": f"Bearer {OTHER}"}))[0] != 401
            assert (await aget(f"{http}{path}?token={TOKEN}"))[0] != 401
        assert "room" in (await aget(f"{http}/v1/streams?token={TOKEN}"))[1]
        for path in ("/healthz", "/readyz", "/captions", "/web/viewer.js"):  # probes and data-free page files
            assert (await aget(http + path))[0] == 200
        for path in ("/v1/stream", "/v1/captions?stream=room"):
            body = await refused_with(ws + path, 401)
            assert "token" in body and "room" not in body.replace("?stream=room", "")
            await refused_with(f"{ws}{path}{'&' if '?' in path else '?'}token=wrong", 401)
        async with connect(f"{ws}/v1/captions?stream=room&token={TOKEN}") as listener:
            assert json.loads(await listener.recv())["type"] == "subscribed"
    finally:
        await daemon.stop()


async def test_public_captions_open_listening_but_not_ingest(engine, speech):
    daemon = await started(engine, auth_tokens=[TOKEN], public_captions=True)
    http, ws = daemon.url.replace("ws://", "http://"), daemon.url
    try:
        await refused_with(f"{ws}/v1/stream", 401)
        async with connect(f"{ws}/v1/captions?stream=room") as listener:
            assert json.loads(await listener.recv())["type"] == "subscribed"
            await stream_and_stop(f"{ws}/v1/stream?token={TOKEN}", speech)
            assert json.loads(await asyncio.wait_for(listener.recv(), 30))["stream"] == "room"
        assert (await aget(f"{http}/v1/streams/room/captions.vtt"))[0] == 200
        assert (await aget(f"{http}/v1/engine"))[0] == 401  # operators' counters stay private
    finally:
        await daemon.stop()


def test_tokens_come_from_the_environment_and_from_a_file(tmp_path, engine):
    config = load_config(env={"STREAMSED_SERVER__AUTH_TOKENS": "a, b"})
    assert config.server.auth_tokens == ["a", "b"]
    path = tmp_path / "tokens"
    path.write_text("# streamsed tokens\nfirst\n\n  second  \n")
    daemon = Daemon(with_overrides(load_config(env={}), server={"auth_tokens": ["x"], "auth_tokens_file": str(path)}),
                    engine)
    assert daemon.tokens == ["x", "first", "second"]
    with pytest.raises(ConfigError, match="auth_tokens_file"):
        Daemon(with_overrides(load_config(env={}), server={"auth_tokens_file": str(tmp_path / "missing")}), engine)


async def test_an_open_address_without_tokens_warns_at_start(engine, caplog):
    daemon = await started(engine, host="0.0.0.0")
    await daemon.stop()
    assert "without auth_tokens" in caplog.text
    caplog.clear()
    daemon = await started(engine)  # loopback: no warning
    await daemon.stop()
    assert "without auth_tokens" not in caplog.text


# -- TLS --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and 127.0.0.2, made by openssl."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=streamsed",
                    "-addext", "subjectAltName=IP:127.0.0.1,IP:127.0.0.2", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_tls_serves_https_and_wss_on_one_port(engine, speech, certificate):
    cert, key = certificate
    daemon = await started(engine, host="127.0.0.1", tls_cert=str(cert), tls_key=str(key))
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        assert daemon.url.startswith("wss://")
        https = daemon.url.replace("wss://", "https://")
        assert await aget(f"{https}/healthz", context=trust) == (200, "ok\n")
        events = await stream_and_stop(f"{daemon.url}/v1/stream", speech, ssl=trust)
        assert [e["segment"] for e in events if e["type"] == "final"] == [0, 1]
        with pytest.raises(urllib.error.URLError):  # a client that does not trust the certificate
            await aget(f"{https}/healthz")
        with pytest.raises(OSError):  # plain http on the TLS port: the server hangs up
            await aget(daemon.url.replace("wss://", "http://") + "/healthz")
    finally:
        await daemon.stop()


def test_bad_tls_files_are_a_clear_config_error(tmp_path, engine):
    (tmp_path / "cert.pem").write_text("not a certificate")
    config = with_overrides(load_config(env={}), server={"port": 0, "tls_cert": str(tmp_path / "cert.pem"),
                                                         "tls_key": str(tmp_path / "cert.pem")})
    with pytest.raises(ConfigError, match="tls_cert"):
        asyncio.run(Daemon(config, engine).start())
    with pytest.raises(ConfigError, match="go together"):
        load_config(env={}, overrides={"server.tls_cert": "a.pem"})


# -- metrics ----------------------------------------------------------------------------------------
def scrape(text: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            key = sample.name + (f"{{{labels}}}" if labels else "")
            if "le" in sample.labels:
                key += f"[le={sample.labels['le']}]"
            samples[key] = sample.value
    return samples


async def test_metrics_count_what_was_streamed(engine, speech):
    daemon = await started(engine)
    http = daemon.url.replace("ws://", "http://")
    try:
        async with connect(f"{daemon.url}/v1/captions?stream=m") as listener:
            await listener.recv()
            during = scrape((await aget(f"{http}/metrics"))[1])
            assert during["streamsed_listeners_active"] == 1 and during["streamsed_sessions_active"] == 0
            events = await stream_and_stop(daemon.url + "/v1/stream", speech, stream="m")
        status, text = await aget(f"{http}/metrics")
    finally:
        await daemon.stop()
    assert status == 200
    m = scrape(text)
    finals = [e for e in events if e["type"] == "final"]
    partials = [e for e in events if e["type"] == "partial"]
    assert m["streamsed_segments_total"] == len([e for e in events if e["type"] == "speech_end"]) == 2
    assert m["streamsed_finals_total"] == len(finals) == 2
    assert m["streamsed_partials_total"] == len(partials)
    assert m["streamsed_dropped_total{reason=no_speech}"] == m["streamsed_dropped_total{reason=repetition}"] == 0
    assert m["streamsed_final_lag_seconds_count"] == 2
    assert m["streamsed_final_lag_seconds_sum"] == pytest.approx(sum(f["latency_ms"] for f in finals) / 1000, abs=1e-6)
    assert m["streamsed_first_partial_seconds_count"] == len({p["segment"] for p in partials})
    assert m["streamsed_sessions_active"] == 0 and m["streamsed_listeners_active"] == 0
    assert 0 < m["streamsed_engine_busy_ratio"] <= 1 and m["streamsed_engine_busy_seconds_total"] > 0
    assert m["streamsed_engine_queue_depth"] == 0
    assert m["streamsed_encoder_batch_size_count"] == m["streamsed_decoder_batch_rows_count"] > 0
    assert m["streamsed_encoder_batch_size_bucket[le=+Inf]"] == m["streamsed_encoder_batch_size_count"]
    assert not [line for line in text.splitlines() if 'stream="' in line]  # no stream-id labels


# -- limits -----------------------------------------------------------------------------------------
async def test_connections_per_address_and_listeners_are_limited(engine):
    daemon = await started(engine, max_connections_per_client=3, max_listeners=2)
    try:
        async with connect(f"{daemon.url}/v1/captions?stream=a") as one, \
                connect(f"{daemon.url}/v1/captions?stream=b") as two:
            await one.recv(), await two.recv()
            async with connect(f"{daemon.url}/v1/captions?stream=c") as three:
                error = json.loads(await three.recv())
                assert error["code"] == "too_many_listeners"
            async with connect(f"{daemon.url}/v1/stream") as ingest:  # the third connection of this address
                await ingest.send(json.dumps({"type": "start", "stream": "s"}))
                assert json.loads(await ingest.recv())["type"] == "ready"
                assert "max_connections_per_client" in await refused_with(f"{daemon.url}/v1/stream", 429)
        # The server gives slots back once its handlers finish, a moment after the clients see the close.
        await eventually(lambda: not daemon._connections and daemon.hub.listener_count() == 0)
        async with connect(f"{daemon.url}/v1/captions?stream=a") as again:  # slots are given back
            assert json.loads(await again.recv())["type"] == "subscribed"
    finally:
        await daemon.stop()


async def test_an_idle_ingest_session_is_finished_and_closed(engine, speech):
    daemon = await started(engine, idle_timeout_s=1.0)
    try:
        async with connect(f"{daemon.url}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "start", "stream": "idle", "source_lang": "en"}))
            await ws.recv()
            await ws.send(speech[: len(speech) // 6 * 2])  # the first utterance, then nothing but keepalives
            for _ in range(3):  # text messages are not audio: they do not keep the session
                await asyncio.sleep(0.2)
                await ws.send(json.dumps({"type": "keepalive"}))
            events = []
            with pytest.raises(ConnectionClosed):
                while True:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        assert ws.close_code == 1008 and ws.close_reason.startswith("idle_timeout")
        kinds = [e["type"] for e in events]
        assert "error" in kinds and events[kinds.index("error")]["code"] == "idle_timeout"
        assert kinds.count("final") == kinds.count("speech_start") >= 1  # its utterance was finalized
    finally:
        await daemon.stop()


async def test_vanished_clients_free_their_slots(engine, speech):
    """16 clients vanish mid-utterance (TCP gone, no close frame); their slots come back within the
    ping timeout plus the time to finish their open utterances, and a new stream is served."""
    daemon = await started(engine, max_sessions=16, ping_interval_s=0.5, max_connections_per_client=32)
    try:
        clients = []
        for n in range(16):
            ws = await connect(f"{daemon.url}/v1/stream")
            await ws.send(json.dumps({"type": "start", "stream": f"gone{n}", "source_lang": "en"}))
            await ws.recv()
            await ws.send(speech[: len(speech) // 8 * 2])  # inside the first utterance
            clients.append(ws)
        assert len(daemon.sessions) == 16
        await refused_with_code(daemon, "too_many_sessions")
        for ws in clients:
            ws.transport.abort()  # no close frame, no FIN handshake: the client is just gone
        async with asyncio.timeout(60):
            while daemon.sessions:
                await asyncio.sleep(0.2)
        events = await stream_and_stop(f"{daemon.url}/v1/stream", speech, stream="after")
        assert [e["segment"] for e in events if e["type"] == "final"] == [0, 1]
    finally:
        await daemon.stop()


async def refused_with_code(daemon, code):
    async with connect(f"{daemon.url}/v1/stream") as ws:  # refused at once, before any start message
        assert json.loads(await ws.recv())["code"] == code


async def test_the_bundled_clients_send_their_token(engine, speech, tmp_path):
    import soundfile as sf

    from clients.ws_stream import main as stream_main

    wav = tmp_path / "talk.wav"
    sf.write(wav, np.frombuffer(speech, "<i2"), 16000)
    daemon = await started(engine, auth_tokens=[TOKEN])
    try:
        assert await asyncio.to_thread(stream_main, [str(wav), "--url", daemon.url, "--fast", "--token", TOKEN]) == 0
        assert await asyncio.to_thread(stream_main, [str(wav), "--url", daemon.url, "--fast", "--token", "no"]) == 2
    finally:
        await daemon.stop()


# -- robustness -------------------------------------------------------------------------------------
def junk_messages(rng) -> list:
    """1,200 things a broken or hostile client sends: text junk, JSON of the wrong shape and types,
    odd-sized, NaN and oversized frames, huge starts."""
    texts = ["", "{", "}", "null", "[]", "42", '"start"', "\x00\xff", "{'type': 'start'}", "[{\"type\": \"start\"}]",
             json.dumps({"type": 7}), json.dumps({"type": None}), json.dumps({"type": "launch"}),
             json.dumps({"type": "start", "sample_rate": "fast"}), json.dumps({"type": "start", "sample_rate": -1}),
             json.dumps({"type": "start", "encoding": ["pcm"]}), json.dumps({"type": "start", "stream": "x" * 5000}),
             json.dumps({"type": "start", "targets": {"de": 1}}), json.dumps({"type": "start", "source_lang": 3}),
             json.dumps({"type": "start", "junk": "x" * 200_000}), json.dumps({"type": "stop", "now": [1] * 10})]
    frames = [b"\x01", b"\x00" * 3, np.full(800, np.nan, "<f4").tobytes(), np.full(800, np.inf, "<f4").tobytes(),
              b"\x00" * 1_100_000]
    messages = []
    for _ in range(1200):
        if rng.random() < 0.6:
            messages.append(texts[rng.integers(len(texts))])
        elif rng.random() < 0.5:
            messages.append(frames[rng.integers(len(frames))])
        else:
            messages.append(rng.bytes(int(rng.integers(1, 64))))
    return messages


async def test_a_thousand_malformed_messages_then_a_good_stream_equals_offline(engine, speech):
    from streamsed.core.audio import pcm_to_float32
    from streamsed.core.languages import Target
    from streamsed.core.segments import segment_audio

    rng = np.random.default_rng(7)
    daemon = await started(engine, max_connections_per_client=64, ping_interval_s=1.0)
    try:
        messages = junk_messages(rng)
        sent, connections, ws = 0, 0, None
        for n, message in enumerate(messages):
            if ws is None or n % 100 == 0:  # every 100 messages the client vanishes and comes back
                if ws is not None:
                    ws.transport.abort()
                ws = await connect(f"{daemon.url}/v1/stream", max_size=None)
                connections += 1
            try:
                await ws.send(message)
                sent += 1
            except ConnectionClosed:  # a fatal error (a 1.1 MB frame, a bad start) closed it: reconnect
                ws = await connect(f"{daemon.url}/v1/stream", max_size=None)
                connections += 1
        ws.transport.abort()
        assert sent >= 1000 and connections >= 12
        async with connect(f"{daemon.url}/v1/stream", max_size=None) as ws:  # junk in an open session too
            await ws.send(json.dumps({"type": "start", "stream": "fuzz", "sample_rate": 16000}))
            await ws.recv()
            for message in messages[:300]:
                if isinstance(message, str):
                    await ws.send(message)
            ws.transport.abort()
        assert (await aget(daemon.url.replace("ws://", "http://") + "/healthz"))[0] == 200
        events = await stream_and_stop(f"{daemon.url}/v1/stream", speech, stream="good")
        audio = pcm_to_float32(speech, "pcm_s16le")
        expected = [engine.transcribe([s.audio], [Target("en", "en")], window="fast")[0][0].text
                    for s in segment_audio(engine, audio)]
        assert [e["text"] for e in events if e["type"] == "final"] == expected and len(expected) == 2
    finally:
        await daemon.stop()
