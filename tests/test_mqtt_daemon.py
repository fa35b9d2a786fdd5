"""`streamsed serve` processes with MQTT, against a real Mosquitto: the Last Will when the daemon is
killed -9, ``offline`` on a clean exit, no connection at all when MQTT is disabled, config errors.

The daemon runs the tiny random Whisper saved as a local model directory (``--model DIR``), so the
real command line and wiring are tested in seconds; one ``slow`` test uses the real default model."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from tests import mosquitto
from tests.mosquitto import Mosquitto, Recorder, SubProcess, retained
from tests.speech import espeak, silence, words
from tests.tiny_models import NO_GUARD_ENV

pytestmark = pytest.mark.skipif(not mosquitto.available(), reason="needs Debian's mosquitto (see README)")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker(tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.kill()


@pytest.fixture(scope="module")
def speech() -> bytes:
    audio = np.concatenate([silence(0.3), espeak("Hello everyone.", "en", 140), silence(1.0),
                            espeak("Thank you for coming to the meeting.", "en", 140), silence(1.0)])
    return (audio * 32767).astype("<i2").tobytes()


def write_config(path: Path, **mqtt) -> Path:
    lines = ["[mqtt]"] + [f"{key} = {json.dumps(value)}" for key, value in mqtt.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Serve:
    """`streamsed serve --port 0` with a config file; constructed once it listens and /readyz is 200."""

    def __init__(self, config: Path, model: str | Path | None, log: Path, env=None, timeout=300):
        model_args = ["--model", str(model)] if model is not None else []
        no_guard = NO_GUARD_ENV if model is not None else {}  # the tiny model's loops would all be dropped
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamsed", "serve", "--config", str(config), *model_args, "--port", "0",
                 "--device", "cpu", "--log-level", "info"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **no_guard, **(env or {})},
            )
        line = self.process.stdout.readline()
        assert line.startswith("listening on ws://"), (line, log.read_text())
        self.url = line.split()[-1]
        deadline = time.monotonic() + timeout
        while self.readyz() != 200:
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    def readyz(self) -> int:
        try:
            with urllib.request.urlopen(f"http{self.url[2:]}/readyz", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def wait_line(sub: SubProcess, wanted: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while wanted not in (line.rstrip("\n") for line in sub.output):
        assert time.monotonic() < deadline, f"no {wanted!r} in {sub.output}"
        time.sleep(0.02)


async def stream(url: str, data: bytes, **options) -> list[dict]:
    async with connect(f"{url}/v1/stream") as ws:
        await ws.send(json.dumps({"type": "start", **options}))
        for first in range(0, len(data), 3200):
            await ws.send(data[first: first + 3200])
        await ws.send(json.dumps({"type": "stop"}))
        return [event async for event in _events(ws)]


async def _events(ws):
    async for message in ws:
        yield json.loads(message)


def test_kill_9_leaves_the_last_will_offline(broker, tiny_model_dir, tmp_path, speech):
    config = write_config(tmp_path / "streamsed.toml", enabled=True, host=mosquitto.HOST, port=broker.port,
                          node_id="killme")
    watcher = SubProcess(["mosquitto_sub", "-d", "-v", "-h", mosquitto.HOST, "-p", str(broker.port),
                          "-t", "streamsed/killme/status"], timeout=10)
    server = Serve(config, tiny_model_dir, tmp_path / "serve.log")
    try:
        wait_line(watcher, "streamsed/killme/status online")

        async def captions():
            async with Recorder(broker.port, ["streamsed/killme/+/+/final"]) as recorder:
                events = await stream(server.url, speech, stream="den", source_lang="en")
                sent = [e for e in events if e["type"] == "final"]
                await recorder.wait_for(lambda ms: len(ms) == len(sent))
            return sent, recorder.messages

        sent, received = asyncio.run(captions())
        assert len(sent) == 2
        assert [(m.topic, json.loads(m.payload), m.qos, m.retain) for m in received] == \
            [("streamsed/killme/den/en/final", final, 1, False) for final in sent]

        server.process.send_signal(signal.SIGKILL)  # no clean disconnect: the broker sends the will
        assert server.process.wait(10) == -signal.SIGKILL
        wait_line(watcher, "streamsed/killme/status offline", timeout=10)
    finally:
        server.close()
        watcher.stop()
    assert [(m.topic, m.payload, m.retain) for m in retained(broker.port, "streamsed/killme/status", count=1)] == \
        [("streamsed/killme/status", "offline", True)]
    assert "published offline" not in server.log.read_text()


def test_sigterm_publishes_offline_itself(broker, tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "streamsed.toml", enabled=True, host=mosquitto.HOST, port=broker.port,
                          node_id="calm")
    server = Serve(config, tiny_model_dir, tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 20
        while [m.payload for m in retained(broker.port, "streamsed/calm/status", count=1)] != ["online"]:
            assert time.monotonic() < deadline
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.log.read_text()
    finally:
        server.close()
    log = server.log.read_text()
    assert "MQTT: connected to" in log and "published offline on streamsed/calm/status" in log
    assert "Traceback" not in log
    assert [(m.payload, m.qos, m.retain) for m in retained(broker.port, "streamsed/calm/status", count=1)] == \
        [("offline", 1, True)]


def pending_connection(listener: socket.socket, timeout: float) -> bool:
    return bool(select.select([listener], [], [], timeout)[0])


def test_disabled_mqtt_makes_no_connection_attempt(tiny_model_dir, tmp_path):
    with socket.socket() as fake_broker:  # any connection attempt would show up here
        fake_broker.bind((mosquitto.HOST, 0))
        fake_broker.listen()
        port = fake_broker.getsockname()[1]
        config = write_config(tmp_path / "streamsed.toml", enabled=False, host=mosquitto.HOST, port=port)
        server = Serve(config, tiny_model_dir, tmp_path / "disabled.log")
        try:
            assert not pending_connection(fake_broker, 2.0)
        finally:
            server.close()
        assert "MQTT" not in server.log.read_text()
        # The same config with MQTT switched on by the environment does connect: the probe works.
        server = Serve(config, tiny_model_dir, tmp_path / "enabled.log", env={"STREAMSED_MQTT__ENABLED": "true"})
        try:
            assert pending_connection(fake_broker, 10.0)
        finally:
            server.close()


def test_serve_reports_an_unreadable_password_file(tmp_path):
    config = write_config(tmp_path / "streamsed.toml", enabled=True, username="me",
                          password_file=str(tmp_path / "missing"))
    result = subprocess.run([sys.executable, "-m", "streamsed", "serve", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamsed: error: [mqtt] password_file"), result.stderr


@pytest.mark.slow
def test_real_model_finals_over_mqtt_match_the_websocket(broker, tmp_path, speech):
    config = write_config(tmp_path / "streamsed.toml", enabled=True, host=mosquitto.HOST, port=broker.port,
                          node_id="real")
    server = Serve(config, None, tmp_path / "serve.log")  # the default model, whisper-base
    try:
        async def scenario():
            async with Recorder(broker.port, ["streamsed/real/#", "homeassistant/#"]) as recorder:
                events = await stream(server.url, speech, stream="meeting")
                sent = [e for e in events if e["type"] == "final"]
                await recorder.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/state")]) == len(sent))
            return sent, recorder

        sent, recorder = asyncio.run(scenario())
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
    finally:
        server.close()
    assert [words(f["text"]) for f in sent] == [words("Hello everyone."),
                                                words("Thank you for coming to the meeting.")]
    assert [json.loads(m.payload) for m in recorder.on("/meeting/en/final")] == sent
    assert [m.payload for m in recorder.on("/meeting/en/state")] == [f["text"] for f in sent]
    config_message = [m for m in recorder.messages if m.topic.startswith("homeassistant/sensor/")]
    assert len(config_message) == 1
    assert json.loads(config_message[0].payload)["device"]["model"] == "speech translation (whisper-base)"
