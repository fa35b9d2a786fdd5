"""The microphone: capture mechanics with a fake PortAudio, then real PortAudio capture from a
virtual ALSA device (tests/virtual_mic.py), then the daemon's microphone edge with the tiny engine."""

import asyncio
import builtins
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamsed.daemon import microphone
from streamsed.daemon.config import load_config, with_overrides
from streamsed.daemon.microphone import (
    Audio,
    InputDevice,
    Lost,
    Microphone,
    MicrophoneEdge,
    MicrophoneError,
    Opened,
    PortAudioMissing,
    Unavailable,
    find_device,
    level_dbfs,
    mix_to_mono,
)
from tests import virtual_mic
from tests.tiny_models import NO_GUARD
from tests.virtual_mic import VirtualMic
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent


# -- a fake PortAudio -----------------------------------------------------------------------------
class FakePortAudioError(Exception):
    pass


class Flags:
    def __init__(self, input_overflow=False):
        self.input_overflow = input_overflow


class FakeStream:
    """Calls back from its own thread, like PortAudio: ``script`` is a list of blocks (bytes),
    numbers (seconds to pause) and "fail" (end the stream as a driver error does)."""

    def __init__(self, script, **settings):
        self.script, self.settings = script, settings
        self.callback, self.finished_callback = settings["callback"], settings["finished_callback"]
        self.aborted = self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.callback_seconds = []

    def start(self):
        self.thread.start()

    def _run(self):
        for step in self.script:
            if self.aborted:
                return
            if step == "fail":
                self.finished_callback()
                return
            if isinstance(step, (int, float)):
                time.sleep(step)
                continue
            started = time.perf_counter()
            self.callback(step, len(step) // 2 // self.settings["channels"], None, Flags())
            self.callback_seconds.append(time.perf_counter() - started)
        while not self.aborted:  # a live device goes on delivering nothing new here: silence
            time.sleep(0.01)

    def abort(self, ignore_errors=True):
        self.aborted = True

    def close(self, ignore_errors=True):
        self.aborted = self.closed = True
        if self.finished_callback is not None:
            self.finished_callback()


class FakeBackend:
    """``opens``: per open attempt, a script for FakeStream or an exception to raise."""

    error = FakePortAudioError

    def __init__(self, devices, opens):
        self._devices, self.opens, self.refreshes, self.streams, self.settings = devices, list(opens), 0, [], []

    def devices(self):
        return list(self._devices)

    def refresh(self):
        self.refreshes += 1

    def open_input(self, **settings):
        self.settings.append(settings)
        step = self.opens.pop(0) if self.opens else []
        if isinstance(step, Exception):
            raise step
        stream = FakeStream(step, **settings)
        self.streams.append(stream)
        return stream


MONO = InputDevice(0, "Built-in Microphone", "ALSA", 48000, 1, default=True)
STEREO = InputDevice(3, "USB Audio CODEC: Stereo", "ALSA", 44100, 2)
PULSE = InputDevice(5, "pulse", "ALSA", 44100, 32)


def pcm(*values, channels=1):
    return np.array(values, dtype="<i2").tobytes()


async def collect(mic: Microphone, until, timeout=10.0, **kwargs):
    """Events of ``mic`` until ``until(events)`` is true; then close it and drain."""
    events = []
    async with asyncio.timeout(timeout):
        async for event in mic.events(**kwargs):
            events.append(event)
            if until(events):
                mic.close()
    return events


# -- devices ---------------------------------------------------------------------------------------
def test_find_device_by_default_index_and_name():
    devices = [MONO, STEREO, PULSE]
    assert find_device(None, devices) is MONO and find_device("", devices) is MONO
    assert find_device("3", devices) is STEREO and find_device(5, devices) is PULSE
    assert find_device("usb", devices) is STEREO  # a unique part of the name, any case
    assert find_device("PULSE", devices) is PULSE


def test_device_not_found_lists_the_devices_that_exist():
    with pytest.raises(MicrophoneError) as error:
        find_device("Blue Yeti", [MONO, STEREO])
    message = str(error.value)
    assert "'Blue Yeti' not found" in message
    assert "[0] Built-in Microphone (48000 Hz, 1 ch)" in message and "[3] USB Audio CODEC: Stereo (44100 Hz, 2 ch)" in message
    assert "\n" not in message
    with pytest.raises(MicrophoneError, match="no input device with index 7; input devices: .0. Built-in"):
        find_device("7", [MONO])
    with pytest.raises(MicrophoneError, match="ambiguous"):
        find_device("i", [MONO, STEREO])
    with pytest.raises(MicrophoneError, match="sees no input device"):
        find_device(None, [])


def test_format_devices_marks_the_default():
    table = microphone.format_devices([MONO, STEREO]).splitlines()
    assert table[0].split() == ["index", "name", "rate", "(Hz)", "channels", "host", "API"]
    assert table[1].startswith("*") and table[1].split()[1:] == ["0", "Built-in", "Microphone", "48000", "1", "ALSA"]
    assert table[2].split() == ["3", "USB", "Audio", "CODEC:", "Stereo", "44100", "2", "ALSA"]


def test_level_and_mix_down():
    t = np.arange(48000) / 48000
    sine = (np.sin(2 * np.pi * 1000 * t) * 32767).astype("<i2").tobytes()
    assert level_dbfs(sine) == pytest.approx(-3.0, abs=0.1)
    assert level_dbfs(bytes(960)) == microphone.SILENCE_DBFS and level_dbfs(b"") == microphone.SILENCE_DBFS
    stereo = np.array([[100, 300], [-5, -6], [32767, 32767]], dtype="<i2").tobytes()
    assert np.frombuffer(mix_to_mono(stereo, 2), "<i2").tolist() == [200, -6, 32767]


# -- capture mechanics (fake PortAudio) -------------------------------------------------------------
async def test_blocks_arrive_in_order_at_the_devices_own_rate():
    blocks = [pcm(i, i + 1, i + 2) for i in range(0, 60, 3)]
    backend = FakeBackend([MONO], [blocks])
    mic = Microphone(backend=backend, block_ms=20)
    events = await collect(mic, lambda ev: sum(isinstance(e, Audio) for e in ev) == len(blocks))
    assert events[0] == Opened(MONO, 48000, 1)
    assert b"".join(e.data for e in events if isinstance(e, Audio)) == b"".join(blocks)
    settings = backend.settings[0]
    assert (settings["samplerate"], settings["channels"], settings["dtype"], settings["blocksize"]) == (48000, 1, "int16", 960)
    assert settings["device"] == 0 and backend.streams[0].closed
    assert mic.dropped_blocks == 0 and backend.refreshes == 0


async def test_two_channel_device_is_captured_in_stereo_and_mixed_down():
    backend = FakeBackend([STEREO, PULSE], [[np.array([[1000, 3000], [-2, -4]], "<i2").tobytes()]])
    mic = Microphone("USB", sample_rate=16000, backend=backend)
    events = await collect(mic, lambda ev: any(isinstance(e, Audio) for e in ev))
    assert events[0] == Opened(STEREO, 16000, 2) and backend.settings[0]["channels"] == 2
    assert np.frombuffer(events[1].data, "<i2").tolist() == [2000, -3]
    # A device with many (virtual) channels is opened mono: the driver mixes.
    backend = FakeBackend([PULSE], [[pcm(1, 2)]])
    events = await collect(Microphone(backend=backend), lambda ev: any(isinstance(e, Audio) for e in ev))
    assert events[0].channels == 1 and backend.settings[0]["channels"] == 1


async def test_the_callback_never_waits_for_a_busy_loop():
    """PortAudio's thread must not block even while the event loop is stuck for a while."""
    backend = FakeBackend([MONO], [[0.05] + [pcm(i) for i in range(20)]])
    mic = Microphone(backend=backend)
    events = []

    async def consume():
        async for event in mic.events():
            events.append(event)
            if isinstance(event, Opened):
                time.sleep(0.5)  # the loop is blocked; the stream's thread calls back meanwhile
            if sum(isinstance(e, Audio) for e in events) == 20:
                mic.close()

    await asyncio.wait_for(consume(), 10)
    assert max(backend.streams[0].callback_seconds) < 0.05
    assert [np.frombuffer(e.data, "<i2")[0] for e in events if isinstance(e, Audio)] == list(range(20))


async def test_a_full_queue_drops_new_blocks_counts_and_logs_them(caplog):
    blocks = [pcm(i) for i in range(30)]
    backend = FakeBackend([MONO], [blocks])
    mic = Microphone(backend=backend, queue_blocks=5)
    got = []

    async def slow_consumer():
        async for event in mic.events():
            if isinstance(event, Opened):
                await asyncio.to_thread(time.sleep, 0.5)  # every block arrives while we are busy
            elif isinstance(event, Audio):
                got.append(np.frombuffer(event.data, "<i2")[0])
                if len(got) == 5:
                    mic.close()

    with caplog.at_level(logging.WARNING, logger="streamsed.daemon.microphone"):
        await asyncio.wait_for(slow_consumer(), 10)
    assert got == [0, 1, 2, 3, 4]  # the oldest are kept, in order
    assert mic.dropped_blocks == 25
    warnings = [r.getMessage() for r in caplog.records if "dropped microphone audio" in r.getMessage()]
    assert len(warnings) == 1 and "1 block, 1 in all" in warnings[0]  # logged once, then at most every 10 s


async def test_a_lost_device_is_reopened_every_retry_s(caplog):
    backend = FakeBackend([MONO], [[pcm(1), pcm(2), 0.05, "fail"], FakePortAudioError("Device unavailable"),
                                   FakePortAudioError("Device unavailable"), [pcm(3)]])
    mic = Microphone(backend=backend, retry_s=0.1)
    with caplog.at_level(logging.DEBUG, logger="streamsed.daemon.microphone"):
        started = time.monotonic()
        events = await collect(mic, lambda ev: ev[-1] == Audio(pcm(3)))
        elapsed = time.monotonic() - started
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Opened", "Audio", "Audio", "Lost", "Unavailable", "Unavailable", "Opened", "Audio"]
    assert "stopped" in events[3].reason
    assert "Device unavailable" in events[4].reason and events[4].retry_s == 0.1
    assert backend.refreshes == 3  # PortAudio re-initialized before every re-open, to see re-plugged devices
    assert elapsed >= 0.3 and mic.opens == 2
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert any(level == "WARNING" and "lost" in m and "re-open it every 0.1 s" in m for level, m in messages)
    errors = [m for level, m in messages if level == "ERROR"]
    assert len(errors) == 1 and "Device unavailable" in errors[0]  # a repeated failure is not logged again


async def test_a_stalled_device_counts_as_lost():
    backend = FakeBackend([MONO], [[pcm(1)], [pcm(2)]])  # one block each, then silence from the driver
    mic = Microphone(backend=backend, retry_s=0.05, stall_s=0.3)
    events = await collect(mic, lambda ev: ev[-1] == Audio(pcm(2)))
    assert [type(e).__name__ for e in events] == ["Opened", "Audio", "Lost", "Opened", "Audio"]
    assert events[2].reason == "no audio from the device for 0.3 s"
    assert backend.streams[0].closed


async def test_a_stream_opened_after_cancellation_is_closed():
    class SlowBackend(FakeBackend):
        def open_input(self, **settings):
            time.sleep(0.3)  # a slow driver
            return super().open_input(**settings)

    backend = SlowBackend([MONO], [[pcm(1)]])
    mic = Microphone(backend=backend)
    consumer = asyncio.create_task(collect(mic, lambda ev: False))
    await asyncio.sleep(0.1)
    consumer.cancel()  # e.g. a second Ctrl-C while the device opens
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await eventually(lambda: backend.streams and backend.streams[0].closed, 5)


async def test_first_open_failure_raises_when_not_retrying():
    backend = FakeBackend([MONO], [])
    with pytest.raises(MicrophoneError, match="'nope' not found; input devices: .0. Built-in"):
        await collect(Microphone("nope", backend=backend), lambda ev: True, retry_initial=False)
    backend = FakeBackend([MONO], [FakePortAudioError("Invalid sample rate")])
    with pytest.raises(MicrophoneError, match=r"cannot open input device \[0\] Built-in Microphone at 8000 Hz: Invalid"):
        await collect(Microphone(sample_rate=8000, backend=backend), lambda ev: True, retry_initial=False)


def without_portaudio(monkeypatch):
    """Make ``import sounddevice`` fail the way it does when libportaudio2 is missing."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_portaudio_names_the_package(monkeypatch, capsys):
    from streamsed.cli import main

    without_portaudio(monkeypatch)
    with pytest.raises(PortAudioMissing) as error:
        microphone.input_devices()
    assert "libportaudio2" in str(error.value) and "PortAudio library not found" in str(error.value)
    assert main(["devices"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamsed: error: cannot use the microphone: the PortAudio library is not installed")
    assert "sudo apt-get install libportaudio2" in err and len(err.strip().splitlines()) == 1


# -- real PortAudio capture from the virtual ALSA device ---------------------------------------------
@pytest.fixture
def vmic(tmp_path, monkeypatch):
    """A plugged-in virtual microphone this process's PortAudio sees (re-initialized for it)."""
    reason = virtual_mic.available()
    if reason:
        pytest.skip(reason)
    mic = VirtualMic(tmp_path / "alsa")
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(mic.config_path))
    mic.plug()
    microphone.refresh_devices()
    yield mic
    mic.cleanup()


def streamsed(*args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "streamsed", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


def test_devices_lists_the_virtual_microphone(vmic):
    result = streamsed("devices", env=vmic.env)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["index", "name", "rate", "(Hz)", "channels", "host", "API"]
    assert rows[1:] == [["*", "0", "vmic", "44100", "128", "ALSA"]]


def test_devices_without_any_input_device(tmp_path):
    if virtual_mic.available():
        pytest.skip(virtual_mic.available())
    empty = tmp_path / "asound.conf"
    # Not even the system's configuration (no sound card can show up); the one PCM cannot open.
    empty.write_text('pcm.gone {\n type file\n slave.pcm "null"\n file "/dev/null"\n'
                     f' infile "{tmp_path}/missing.raw"\n format "raw"\n}}\n')
    result = streamsed("devices", env={"ALSA_CONFIG_PATH": str(empty)})
    assert result.returncode == 0 and result.stdout.startswith("no input devices found: PortAudio sees no input device")


def test_mic_with_an_unknown_device_lists_the_existing_ones(vmic):
    started = time.monotonic()
    result = streamsed("mic", "--local", "--input-device", "Blue Yeti", env=vmic.env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("streamsed: error: input device 'Blue Yeti' not found; input devices: ")
    assert "[0] vmic (44100 Hz, 128 ch)" in result.stderr and "see `streamsed devices`" in result.stderr
    assert time.monotonic() - started < 30  # checked before the model loads


def tone(rate, seconds=1.5, freq=440.0):
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * freq * t) * 0.5 * 32767).round().astype("<i2")


def find(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Index where ``needle`` starts in ``haystack`` (exactly), or -1."""
    key = int(np.flatnonzero(needle)[0])  # anchor on a non-zero sample: silence matches everywhere
    for index in np.flatnonzero(haystack == needle[key]) - key:
        if index >= 0 and np.array_equal(haystack[index: index + len(needle)], needle):
            return int(index)
    return -1


async def capture_while(mic: Microphone, action, settle=0.5):
    """Run ``action`` (blocking, in a thread) while ``mic`` captures; returns (events, audio, seconds)."""
    events, started = [], None

    async def script():
        await asyncio.to_thread(action)
        await asyncio.sleep(settle)
        mic.close()

    task = None
    async with asyncio.timeout(60):
        async for event in mic.events(retry_initial=False):
            events.append(event)
            if isinstance(event, Opened) and task is None:
                started = time.monotonic()
                task = asyncio.create_task(script())
    await task
    audio = np.frombuffer(b"".join(e.data for e in events if isinstance(e, Audio)), "<i2")
    return events, audio, time.monotonic() - started


@pytest.mark.parametrize("rate", [44100, 16000])
async def test_samples_arrive_intact_and_in_real_time(tmp_path, monkeypatch, rate):
    reason = virtual_mic.available()
    if reason:
        pytest.skip(reason)
    with VirtualMic(tmp_path / "alsa", rate=rate) as vmic:
        monkeypatch.setenv("ALSA_CONFIG_PATH", str(vmic.config_path))
        microphone.refresh_devices()
        signal = tone(rate)
        # 44100: the device's own default rate (nothing configured); 16000: an explicit rate.
        mic = Microphone("vmic", sample_rate=0 if rate == 44100 else rate, block_ms=50)

        def play():
            time.sleep(0.3)
            vmic.play_pcm(signal)
            vmic.wait_played()

        events, audio, seconds = await capture_while(mic, play)
    assert events[0] == Opened(events[0].device, rate, 1) and events[0].device.name == "vmic"
    start = find(audio, signal)
    assert start >= 0, "the tone did not come through sample for sample"
    assert not audio[:start].any() and not audio[start + len(signal):].any()  # silence around it
    captured = len(audio) / rate
    assert seconds - 0.5 < captured < seconds + 1.0, (captured, seconds)  # paced like a real device
    assert mic.dropped_blocks == 0


async def test_real_stereo_capture_is_mixed_down(tmp_path, monkeypatch):
    reason = virtual_mic.available()
    if reason:
        pytest.skip(reason)
    with VirtualMic(tmp_path / "alsa", channels=2) as vmic:
        monkeypatch.setenv("ALSA_CONFIG_PATH", str(vmic.config_path))
        microphone.refresh_devices()

        class TwoChannels(microphone.PortAudio):  # 'vmic' offers 128 channels; present it as a 2-channel device
            def devices(self):
                return [InputDevice(d.index, d.name, d.hostapi, d.default_rate, 2, d.default)
                        for d in super().devices()]

        left, right = tone(44100, 1.0), tone(44100, 1.0, 660.0)
        mic = Microphone("vmic", backend=TwoChannels())

        def play():
            time.sleep(0.3)
            vmic.play_pcm(np.stack([left, right], axis=1))
            vmic.wait_played()

        events, audio, _ = await capture_while(mic, play)
    assert events[0].channels == 2
    mixed = ((left.astype(np.int32) + right) / 2).round().astype("<i2")
    assert find(audio, mixed) >= 0


async def test_an_unplugged_device_is_reopened_when_it_comes_back(vmic, caplog):
    mic = Microphone("vmic", retry_s=0.3)
    events = []

    async def script():
        await asyncio.sleep(1.0)
        await asyncio.to_thread(vmic.unplug)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(vmic.plug)
        await asyncio.sleep(1.5)
        mic.close()

    with caplog.at_level(logging.INFO, logger="streamsed.daemon.microphone"):
        task = asyncio.create_task(script())
        async with asyncio.timeout(30):
            async for event in mic.events(retry_initial=False):
                events.append((time.monotonic(), event))
        await task
    kinds = [type(e).__name__ for _, e in events if not isinstance(e, Audio)]
    assert kinds[:3] == ["Opened", "Lost", "Unavailable"] and kinds[-1] == "Opened", kinds
    assert set(kinds[2:-1]) == {"Unavailable"}
    lost = next(e for _, e in events if isinstance(e, Lost))
    assert "stopped" in lost.reason
    unavailable = next(e for _, e in events if isinstance(e, Unavailable))
    assert "'vmic' not found" in unavailable.reason
    reopened = max(t for t, e in events if isinstance(e, Opened))
    assert any(isinstance(e, Audio) for t, e in events if t > reopened)  # audio flows again
    assert mic.opens == 2
    text = caplog.text
    assert "microphone [0] vmic lost" in text and "capturing from [0] vmic" in text


# -- the daemon's microphone edge (tiny engine) ---------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    from streamsed.engine.loading import engine_from_model
    from tests.tiny_models import tiny_whisper

    model, extractor, tokenizer = tiny_whisper()
    return engine_from_model(model, extractor, tokenizer, name="tiny-whisper", device="cpu")


def speech_audio(*texts, pause=1.2, tail=1.2):
    from tests.speech import espeak, silence

    parts = []
    for text in texts:
        parts += [espeak(text, "en", 140), silence(pause)]
    parts[-1] = silence(tail)
    return np.concatenate(parts)


def mic_config(**microphone_settings):
    return with_overrides(load_config(env={}), server={"port": 0}, guard=NO_GUARD,
                          microphone={"enabled": True, "device": "vmic", "retry_s": 0.5, **microphone_settings})


async def start_daemon(config, engine):
    from streamsed.daemon.server import Daemon

    daemon = Daemon(config, engine)
    edge = MicrophoneEdge(config)
    daemon.add_edge(edge)
    await daemon.start()
    await daemon.wait_ready()
    return daemon, edge


async def listen(url: str, stream: str = "mic"):
    ws = await connect(f"{url}/v1/captions?stream={stream}")
    assert json.loads(await ws.recv())["type"] == "subscribed"
    return ws


async def finals_from(ws, count: int, timeout=60.0) -> list[dict]:
    finals = []
    async with asyncio.timeout(timeout):
        while len(finals) < count:
            event = json.loads(await ws.recv())
            if event["type"] == "final":
                finals.append(event)
    return finals


async def test_daemon_microphone_stream_reaches_caption_listeners(vmic, engine):
    daemon, edge = await start_daemon(mic_config(), engine)
    try:
        listener = await listen(daemon.url)
        await eventually(lambda: "mic" in daemon.sessions)
        assert daemon.sessions["mic"].options.sample_rate == 44100
        vmic.play(speech_audio("Hello everyone.", "Thank you for coming."))
        heard = []

        async def read_all():
            while True:
                heard.append(json.loads(await listener.recv()))

        reader = asyncio.create_task(read_all())
        await asyncio.to_thread(vmic.wait_played)
        await eventually(lambda: len([e for e in heard if e["type"] == "final"]) == 2, 60)
        reader.cancel()
        finals = [e for e in heard if e["type"] == "final"]
        assert [(f["stream"], f["segment"]) for f in finals] == [("mic", 0), ("mic", 1)]
        assert 0 < finals[0]["start"] < finals[0]["end"] < finals[1]["start"] < finals[1]["end"]
        assert any(e["type"] == "partial" for e in heard)
        # The id belongs to the microphone: a websocket client cannot ingest into it.
        async with connect(f"{daemon.url}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "start", "stream": "mic"}))
            assert json.loads(await ws.recv())["code"] == "stream_in_use"
        await listener.close()
    finally:
        await daemon.stop()
    assert "mic" not in daemon.sessions and edge.session is None
    assert edge.microphone.dropped_blocks == 0


async def test_daemon_keeps_serving_websockets_while_the_microphone_is_gone(vmic, engine, caplog):
    from tests.speech import espeak, silence

    # One long utterance that is still open when the device goes: no shortening of the end pause.
    daemon, edge = await start_daemon(with_overrides(mic_config(), vad={"end_silence_schedule": []}), engine)
    listener = await listen(daemon.url)
    heard = []  # (arrival time, event)

    async def read_all():
        async for message in listener:
            heard.append((time.monotonic(), json.loads(message)))

    reader = asyncio.create_task(read_all())
    finals = lambda: [e for _, e in heard if e["type"] == "final"]  # noqa: E731
    try:
        await eventually(lambda: "mic" in daemon.sessions)
        vmic.play(espeak("Hello everyone, this sentence keeps going on and on for quite a while now.", "en", 130))
        await asyncio.to_thread(vmic.wait_played, 60, 1.5)  # 1.5 s before its end: the utterance is open
        with caplog.at_level(logging.INFO, logger="streamsed.daemon.microphone"):
            unplugged = time.monotonic()
            await asyncio.to_thread(vmic.unplug)
            # The open utterance is finalized when the device goes away.
            await eventually(lambda: len(finals()) == 1, 60)
            arrived, final = next((t, e) for t, e in heard if e["type"] == "final")
            assert arrived > unplugged and final["segment"] == 0 and final["end"] > final["start"] + 2
            await eventually(lambda: "mic" not in daemon.sessions)

            # Meanwhile websocket streams are served as usual.
            audio = np.concatenate([silence(0.3), espeak("Hello everyone.", "en", 140), silence(1.0)])
            data = (audio * 32767).astype("<i2").tobytes()
            async with connect(f"{daemon.url}/v1/stream") as ws:
                await ws.send(json.dumps({"type": "start", "stream": "room1"}))
                assert json.loads(await ws.recv())["type"] == "ready"
                for first in range(0, len(data), 3200):
                    await ws.send(data[first: first + 3200])
                await ws.send(json.dumps({"type": "stop"}))
                events = []
                try:
                    while True:
                        events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
                except ConnectionClosed:
                    pass
            assert ws.close_code == 1000 and [e["segment"] for e in events if e["type"] == "final"] == [0]
            await asyncio.sleep(1.2)  # a few failed re-opens
            assert "mic" not in daemon.sessions
            await asyncio.to_thread(vmic.plug)
            await eventually(lambda: "mic" in daemon.sessions, 20)
        assert edge.sessions_started == 2 and edge.microphone.opens == 2
        messages = caplog.text
        assert "microphone [0] vmic lost: the audio device stopped" in messages
        assert "input device 'vmic' not found" in messages and "retrying every 0.5 s" in messages

        vmic.play(speech_audio("Thank you for coming."))
        await eventually(lambda: len(finals()) == 2, 60)
        assert finals()[1]["segment"] == 0  # a new session after the device came back
    finally:
        await daemon.stop()
        await asyncio.wait_for(reader, 10)


async def test_daemon_without_its_microphone_still_serves(vmic, engine, caplog):
    with caplog.at_level(logging.ERROR, logger="streamsed.daemon.microphone"):
        daemon, edge = await start_daemon(mic_config(device="Blue Yeti"), engine)
        try:
            await eventually(lambda: "Blue Yeti" in caplog.text)
            assert "input devices: [0] vmic (44100 Hz, 128 ch)" in caplog.text
            async with connect(f"{daemon.url}/v1/stream") as ws:
                await ws.send(json.dumps({"type": "start", "stream": "room1"}))
                assert json.loads(await ws.recv())["type"] == "ready"
        finally:
            await daemon.stop()
    assert daemon.sessions == {}


async def test_daemon_with_portaudio_missing_logs_the_package(engine, monkeypatch, caplog):
    without_portaudio(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="streamsed.daemon.microphone"):
        daemon, edge = await start_daemon(mic_config(), engine)
        try:
            await eventually(lambda: "libportaudio2" in caplog.text)
            async with connect(f"{daemon.url}/v1/stream") as ws:
                await ws.send(json.dumps({"type": "start", "stream": "mic"}))  # released: the edge gave up
                assert json.loads(await ws.recv())["type"] == "ready"
        finally:
            await daemon.stop()


async def test_edge_stop_without_start_and_bad_languages(engine, caplog):
    config = mic_config(targets=["de"])  # Whisper translates into English only
    await MicrophoneEdge(config).stop()  # the daemon may stop an edge it never started
    with caplog.at_level(logging.ERROR, logger="streamsed.daemon.microphone"):
        daemon, edge = await start_daemon(config, engine)
        await daemon.stop()
    assert "microphone stays off" in caplog.text and edge.microphone.opens == 0


# -- the real daemon with the real model --------------------------------------------------------------
@pytest.mark.slow
def test_serve_with_microphone_whisper_base(tmp_path):
    """`streamsed serve` with [microphone] enabled: espeak speech through the virtual ALSA device
    comes out as the right finals at a /v1/captions listener."""
    from tests.speech import words
    from tests.test_daemon_e2e import FIRST, SECOND

    reason = virtual_mic.available()
    if reason:
        pytest.skip(reason)
    config = tmp_path / "mic.toml"
    config.write_text('[microphone]\nenabled = true\ndevice = "vmic"\n')
    with VirtualMic(tmp_path / "alsa") as vmic:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamsed", "serve", "--config", str(config), "--port", "0", "--device", "cpu",
             "--log-level", "info"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **vmic.env},
        )
        try:
            line = server.stdout.readline()
            assert line.startswith("listening on ws://"), (line, server.stderr.read())
            url = line.split()[-1]

            async def scenario():
                async with asyncio.timeout(300):
                    while True:  # the model loads, then the microphone edge starts
                        try:
                            listener = await listen(url)
                            break
                        except OSError:
                            await asyncio.sleep(0.5)
                    await asyncio.sleep(1)
                    vmic.play(speech_audio(FIRST, SECOND, pause=1.5, tail=1.5))
                    return await finals_from(listener, 2, timeout=240)

            finals = asyncio.run(scenario())
        finally:
            server.terminate()
            code = server.wait(60)
        stderr = server.stderr.read()
    assert code == 0, stderr
    assert "capturing from [0] vmic at 44100 Hz" in stderr and "Traceback" not in stderr
    assert [(f["stream"], f["segment"]) for f in finals] == [("mic", 0), ("mic", 1)]
    assert words(finals[0]["text"]) == words(FIRST)
    assert words(finals[1]["text"]) == words(SECOND), finals[1]["text"]
