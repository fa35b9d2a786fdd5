"""`streamsed serve` as a user runs it: a real daemon process, the real default model, the real
clients, espeak-ng speech with pauses."""

import asyncio
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.speech import RATE, espeak, silence, words

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# One clause each: a pause inside a long sentence may close a segment (the end pause shortens as it runs).
FIRST, SECOND = "Hello everyone.", "Thank you for coming to the meeting today."


def python(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


class Server:
    """A `streamsed serve --port 0` process, ready (GET /readyz == 200) once constructed."""

    def __init__(self, timeout=300):
        self.process = python("-m", "streamsed", "serve", "--port", "0", "--device", "cpu", "--log-level", "info")
        line = self.process.stdout.readline()
        assert line.startswith("listening on ws://127.0.0.1:"), (line, self.process.stderr.read())
        self.url = line.split()[-1]
        self.http = "http" + self.url[2:]
        deadline = time.monotonic() + timeout
        while self.readyz() != 200:
            assert self.process.poll() is None and time.monotonic() < deadline, self.process.stderr.read()
            time.sleep(0.2)

    def readyz(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.http}/readyz", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def server():
    server = Server()
    yield server
    assert server.stop() == 0, server.process.stderr.read()


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory):
    """Two utterances separated by a pause, 16 kHz 16-bit like a recorder would write them."""
    audio = np.concatenate([silence(0.5), espeak(FIRST, "en", 130), silence(1.5),
                            espeak(SECOND, "en", 130), silence(1.0)])
    path = tmp_path_factory.mktemp("audio") / "meeting.wav"
    sf.write(path, audio, RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def offline(speech_file):
    """What `streamsed translate --format jsonl` says about the same file."""
    result = subprocess.run([sys.executable, "-m", "streamsed", "translate", str(speech_file), "--format", "jsonl",
                             "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def as_offline(final: dict) -> dict:
    keys = ("segment", "start", "end", "source_lang", "target_lang", "text", "avg_logprob", "no_speech_prob", "words")
    return {key: final[key] for key in keys if key in final}  # the scores and word timings must match too


def lines_of(process: subprocess.Popen, timeout: float):
    """The process's stdout lines as they come, until EOF or ``timeout`` seconds pass."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)],
                     daemon=True).start()
    deadline = time.monotonic() + timeout
    while (line := lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
        yield line


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_stream_listen_and_match_offline(server, speech_file, offline):
    assert [line["segment"] for line in offline] == [0, 1]
    assert words(offline[0]["text"]) == words(FIRST)
    listener = python("-m", "clients.listen", "--url", server.url, "--stream", "meeting", "--jsonl")
    assert json.loads(listener.stdout.readline()) == {"type": "subscribed", "stream": "meeting", "target_lang": None}
    client = python("-m", "clients.ws_stream", str(speech_file), "--url", server.url, "--stream", "meeting",
                    "--realtime", "--chunk-ms", "100", "--jsonl")
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, err
    events = jsonl(out)
    assert events[0]["type"] == "ready" and events[0]["model"] == "whisper-base"

    finals = [e for e in events if e["type"] == "final"]
    assert [as_offline(f) for f in finals] == offline  # same segments, times and text as offline
    for final in finals:
        assert final["stream"] == "meeting" and 0 <= final["latency_ms"] < 30000
    print("final latency_ms:", [f["latency_ms"] for f in finals])

    # Partials of the long utterance arrive while it is still being spoken.
    kinds = [(e["type"], e.get("segment")) for e in events]
    assert ("partial", 1) in kinds and kinds.index(("partial", 1)) < kinds.index(("speech_end", 1))
    partials = [e for e in events if e["type"] == "partial" and e["segment"] == 1]
    assert any(p["stable"] for p in partials) and all(p["start"] == finals[1]["start"] for p in partials)
    ends = {e["segment"]: e for e in events if e["type"] == "speech_end"}
    assert [(ends[f["segment"]]["start"], ends[f["segment"]]["end"]) for f in finals] == \
        [(f["start"], f["end"]) for f in finals]

    # The listener saw the same finals (it keeps running: the test ends it once they are in).
    heard = []
    for line in lines_of(listener, timeout=30):
        event = json.loads(line)
        if event["type"] == "final":
            heard.append(event)
        if len(heard) == len(finals):
            break
    listener.terminate()
    listener.wait(10)
    assert heard == finals


def test_four_concurrent_streams(server, speech_file, offline):
    clients = [
        python("-m", "clients.ws_stream", str(speech_file), "--url", server.url, "--stream", f"room{n}", "--fast",
               "--jsonl")
        for n in range(4)
    ]
    for n, client in enumerate(clients):
        out, err = client.communicate(timeout=600)
        assert client.returncode == 0, err
        finals = [e for e in jsonl(out) if e["type"] == "final"]
        assert [f["stream"] for f in finals] == [f"room{n}"] * 2
        assert [as_offline(f) for f in finals] == offline


def test_bad_requests_get_error_events(server):
    async def check():
        async with connect(f"{server.url}/v1/stream") as ws:
            await ws.send("{oops")
            assert json.loads(await ws.recv())["code"] == "bad_json"
            await ws.send(json.dumps({"type": "start", "source_lang": "en", "targets": ["de"]}))
            error = json.loads(await ws.recv())
            assert error["code"] == "unsupported_language" and "into English" in error["message"]
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1008

    asyncio.run(check())
    assert server.readyz() == 200


def test_sigterm_mid_utterance_delivers_the_final_and_exits_0():
    clip = espeak(SECOND, "en", 130)
    clip = clip[: np.flatnonzero(np.abs(clip) > 0.01)[-1] + 1]  # not even espeak's own trailing silence
    audio = np.concatenate([silence(0.4), clip])  # no pause at the end: still open
    data = (audio * 32767).astype("<i2").tobytes()
    server = Server()

    async def scenario():
        listener = await connect(f"{server.url}/v1/captions?stream=live")
        assert json.loads(await listener.recv())["type"] == "subscribed"
        async with connect(f"{server.url}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "start", "stream": "live"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            for first in range(0, len(data), 3200):  # real time, 100 ms frames
                await ws.send(data[first: first + 3200])
                await asyncio.sleep(0.1)
            events = []
            while not any(e["type"] == "partial" for e in events):  # the utterance is open and decoding
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            server.process.send_signal(signal.SIGTERM)
            try:
                while True:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            except ConnectionClosed:
                pass
        heard = []
        try:
            while True:
                heard.append(json.loads(await asyncio.wait_for(listener.recv(), 60)))
        except ConnectionClosed:
            pass
        return ws.close_code, events, listener.close_code, heard

    close_code, events, listener_close, heard = asyncio.run(scenario())
    assert server.process.wait(60) == 0, server.process.stderr.read()
    finals = [e for e in events if e["type"] == "final"]
    assert close_code == 1001 and listener_close == 1001
    assert [f["segment"] for f in finals] == [0] and words(finals[0]["text"])[:3] == ["thank", "you", "for"]
    assert [e for e in heard if e["type"] == "final"] == finals
    assert "Traceback" not in server.process.stderr.read()
