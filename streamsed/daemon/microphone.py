"""Microphone capture (PortAudio through sounddevice) and the daemon's microphone edge.

``Microphone.events()`` is an async iterator over what a microphone does: ``Opened`` (the device
and the rate it runs at), ``Audio`` (mono pcm_s16le blocks at that rate), ``Lost`` (the device went
away or stopped delivering) and ``Unavailable`` (it could not be opened; the iterator retries).
Both the daemon (``MicrophoneEdge``) and the desktop tool (``streamsed mic``) consume it.

Capture runs in PortAudio's own thread. Its callback only copies the block and hands it to the
asyncio loop with ``loop.call_soon_threadsafe``; it never blocks, never waits for the loop. On the
loop side the blocks go into a bounded queue: when the consumer falls behind, new blocks are
dropped, counted (``Microphone.dropped_blocks``) and logged at most every few seconds.

The device runs at its own default rate unless a rate is configured; the session resamples to
16 kHz with soxr. A device with exactly two input channels is captured in stereo and mixed down;
any other is opened mono (ALSA/PortAudio pick or mix the channel).

A device that fails while running (unplugged USB microphone: PortAudio ends the stream) or stops
delivering audio for ``stall_s`` is closed and re-opened every ``retry_s`` seconds; PortAudio is
re-initialized before each retry, so a re-plugged device is found again. ``sounddevice`` is
imported lazily: without the PortAudio library it raises OSError on import, which becomes a
``PortAudioMissing`` error naming the package to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "Audio", "InputDevice", "Lost", "Microphone", "MicrophoneEdge", "MicrophoneError", "Opened",
    "PortAudioMissing", "Unavailable", "find_device", "format_devices", "input_devices", "level_dbfs",
    "refresh_devices",
]

PORTAUDIO_PACKAGE = "libportaudio2"
STALL_S = 5.0  # no block for this long: the device is treated as lost
CLOSE_TIMEOUT_S = 3.0  # a driver that hangs on close is abandoned after this long
STOP_TIMEOUT_S = 10.0  # daemon shutdown waits at most this long for the capture task
OVERFLOW_LOG_INTERVAL_S = 10.0
SILENCE_DBFS = -96.0  # the level reported for digital silence (16-bit floor)


class MicrophoneError(Exception):
    """A microphone problem a user can act on; ``str(error)`` is one line."""


class PortAudioMissing(MicrophoneError):
    """The PortAudio shared library (or sounddevice) is not installed; retrying cannot help."""


def _sounddevice():
    """Import sounddevice, turning a missing PortAudio library into a PortAudioMissing error."""
    try:
        import sounddevice
    except OSError as error:  # sounddevice raises OSError("PortAudio library not found") on import
        raise PortAudioMissing(
            f"cannot use the microphone: the PortAudio library is not installed ({error}); install it with "
            f"`sudo apt-get install {PORTAUDIO_PACKAGE}` (Debian/Ubuntu; Fedora: portaudio, macOS: brew install "
            f"portaudio)"
        ) from None
    except ImportError as error:
        raise PortAudioMissing(
            f"cannot use the microphone: the sounddevice package is missing ({error}); pip install sounddevice"
        ) from None
    return sounddevice


# -- devices ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    hostapi: str
    default_rate: int
    channels: int  # most input channels the device offers
    default: bool = False  # the system's default input

    @property
    def label(self) -> str:
        return f"[{self.index}] {self.name}"

    def describe(self) -> str:
        return f"[{self.index}] {self.name} ({self.default_rate} Hz, {self.channels} ch)"


def input_devices() -> list[InputDevice]:
    """Every device PortAudio can capture from (as of its last initialization)."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as error:
        raise MicrophoneError(f"PortAudio cannot list the audio devices: {error}") from None
    try:
        default_index = sd.query_devices(kind="input")["index"]
    except (sd.PortAudioError, ValueError, KeyError):
        default_index = None
    found = []
    for info in devices:
        if info["max_input_channels"] < 1:
            continue
        found.append(InputDevice(
            index=info["index"], name=info["name"], hostapi=hostapis[info["hostapi"]]["name"],
            default_rate=int(round(info["default_samplerate"])), channels=info["max_input_channels"],
            default=info["index"] == default_index,
        ))
    return found


def format_devices(devices: list[InputDevice]) -> str:
    """The table ``streamsed devices`` prints; ``*`` marks the default input."""
    if not devices:
        return f"no input devices found: {_listing(devices)}\n"
    width = max(len("name"), *(len(d.name) for d in devices))
    lines = [f"  {'index':>5}  {'name':<{width}}  {'rate (Hz)':>9}  {'channels':>8}  host API"]
    for d in devices:
        mark = "*" if d.default else " "
        lines.append(f"{mark} {d.index:>5}  {d.name:<{width}}  {d.default_rate:>9}  {d.channels:>8}  {d.hostapi}")
    return "\n".join(lines) + "\n"


def _listing(devices: list[InputDevice]) -> str:
    if not devices:
        return ("PortAudio sees no input device (is a microphone connected, and may this user open it, "
                "e.g. as a member of the 'audio' group?)")
    return "input devices: " + "; ".join(d.describe() for d in devices) + " (see `streamsed devices`)"


def find_device(spec: str | int | None, devices: list[InputDevice] | None = None) -> InputDevice:
    """The input device ``spec`` names: None/"" = the default input, an index, or a (part of a) name."""
    devices = input_devices() if devices is None else devices
    spec = spec.strip() if isinstance(spec, str) else spec
    if spec is None or spec == "":
        default = next((d for d in devices if d.default), None) or (devices[0] if devices else None)
        if default is None:
            raise MicrophoneError(f"no microphone to capture from: {_listing(devices)}")
        return default
    if isinstance(spec, int) or spec.isdigit():
        index = int(spec)
        match = next((d for d in devices if d.index == index), None)
        if match is None:
            raise MicrophoneError(f"there is no input device with index {index}; {_listing(devices)}")
        return match
    wanted = spec.casefold()
    exact = [d for d in devices if d.name.casefold() == wanted]
    if exact:
        return exact[0]
    partial = [d for d in devices if wanted in d.name.casefold()]
    if len(partial) == 1:
        return partial[0]
    if partial:
        names = "; ".join(d.describe() for d in partial)
        raise MicrophoneError(f"input device {spec!r} is ambiguous, it matches {names}; give the index or the full name")
    raise MicrophoneError(f"input device {spec!r} not found; {_listing(devices)}")


def refresh_devices() -> None:
    """Re-initialize PortAudio so devices plugged in (or configured) since are seen.

    Only call it while this process has no PortAudio stream open.
    """
    sd = _sounddevice()
    try:
        sd._terminate()
    except Exception:  # not initialized: nothing to terminate
        pass
    try:
        sd._initialize()
    except sd.PortAudioError as error:
        raise MicrophoneError(f"PortAudio cannot start: {error}") from None


def channels_for(device: InputDevice) -> int:
    """Capture mono, except from a device that only has two channels: take both and mix them."""
    return 2 if device.channels == 2 else 1


def mix_to_mono(data: bytes, channels: int) -> bytes:
    """Interleaved pcm_s16le with ``channels`` channels -> mono pcm_s16le (the channels averaged)."""
    if channels == 1:
        return data
    frames = np.frombuffer(data, dtype="<i2").reshape(-1, channels).astype(np.int32)
    return (frames.sum(axis=1) / channels).round().astype("<i2").tobytes()


def level_dbfs(data: bytes) -> float:
    """RMS level of mono pcm_s16le in dB relative to full scale (a full-scale sine is about -3)."""
    samples = np.frombuffer(data, dtype="<i2")
    if samples.size == 0:
        return SILENCE_DBFS
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64)))) / 32768.0
    return max(SILENCE_DBFS, 20 * math.log10(rms)) if rms > 0 else SILENCE_DBFS


# -- events -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opened:
    device: InputDevice
    sample_rate: int
    channels: int  # captured channels (mixed down to mono before Audio)


@dataclass(frozen=True)
class Audio:
    data: bytes  # mono pcm_s16le at Opened.sample_rate

    @property
    def level_dbfs(self) -> float:
        return level_dbfs(self.data)


@dataclass(frozen=True)
class Lost:
    reason: str


@dataclass(frozen=True)
class Unavailable:
    reason: str
    retry_s: float


MicrophoneEvent = Opened | Audio | Lost | Unavailable


# -- capture --------------------------------------------------------------------------------------
def _in_thread(function: Callable[[], Any], orphan: Callable[[Any], None] | None = None) -> asyncio.Future:
    """Run a blocking PortAudio call in a daemon thread (a hung driver cannot block exit).

    ``orphan(result)`` runs (in another thread) when the awaiter was cancelled before the result came:
    a stream opened for nobody must still be closed.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result=None, error=None) -> None:
        if future.done():  # cancelled meanwhile
            if error is None and orphan is not None:
                threading.Thread(target=orphan, args=(result,), daemon=True).start()
            return
        future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = function(), None
        except BaseException as failure:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, failure
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    threading.Thread(target=run, name="streamsed-portaudio", daemon=True).start()
    return future


class PortAudio:
    """What ``Microphone`` needs from sounddevice; tests substitute a fake with the same four members."""

    @property
    def error(self) -> type[Exception]:
        return _sounddevice().PortAudioError

    def devices(self) -> list[InputDevice]:
        return input_devices()

    def refresh(self) -> None:
        refresh_devices()

    def open_input(self, **settings):
        """A started-later ``sounddevice.RawInputStream`` (``start()``, ``abort()``, ``close()``)."""
        return _sounddevice().RawInputStream(**settings)


class _Capture:
    """One open PortAudio input stream and the bounded queue its blocks go to."""

    def __init__(self, owner: Microphone, loop: asyncio.AbstractEventLoop, channels: int):
        self.owner = owner
        self.loop = loop
        self.channels = channels
        self.blocks: deque[bytes] = deque()
        self.wakeup = asyncio.Event()
        self.lost: str | None = None
        self.closing = False
        self.stream = None

    # PortAudio's thread: copy and hand over, nothing else.
    def callback(self, indata, frames, time_info, status) -> None:
        data = bytes(indata)
        try:
            self.loop.call_soon_threadsafe(self._deliver, data, bool(status.input_overflow))
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def finished(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._ended)
        except RuntimeError:
            pass

    # The loop's thread.
    def _deliver(self, data: bytes, input_overflow: bool) -> None:
        if self.closing:
            return
        if input_overflow:
            self.owner._count("device_overflows", "the device reported an input overflow (audio lost before capture)")
        if len(self.blocks) >= self.owner.queue_blocks:
            self.owner._count("dropped_blocks", "dropped microphone audio: the consumer is not keeping up")
            return
        self.blocks.append(data)
        self.owner.last_block_at = time.monotonic()
        self.wakeup.set()

    def _ended(self) -> None:
        if not self.closing and self.lost is None:
            self.lost = "the audio device stopped (disconnected, or a driver error)"
        self.wakeup.set()

    async def next(self, stall_s: float) -> bytes | None:
        """The next block; None when the device is lost (``self.lost`` says why) or closing."""
        while not self.blocks:
            if self.lost is not None or self.closing:
                return None
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), stall_s)
            except TimeoutError:
                if not self.blocks and self.lost is None and not self.closing:
                    self.lost = f"no audio from the device for {stall_s:g} s"
        return self.blocks.popleft()

    def close_now(self) -> None:
        """Blocking: stop and close the stream (any thread)."""
        self.closing = True
        stream = self.stream
        if stream is None:
            return
        try:
            stream.abort(ignore_errors=True)
        finally:
            stream.close(ignore_errors=True)

    async def close(self) -> None:
        self.closing = True
        self.wakeup.set()
        if self.stream is None:
            return
        try:
            await asyncio.wait_for(_in_thread(self.close_now), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("the audio device did not close within %g s; abandoning it", CLOSE_TIMEOUT_S)
        except Exception as error:  # closing a dead device may fail; it is gone either way
            log.debug("closing the audio stream failed: %s", error)


class Microphone:
    """A microphone that re-opens itself; iterate ``events()`` (see the module doc)."""

    def __init__(
        self,
        device: str | int | None = None,
        *,
        sample_rate: int = 0,
        block_ms: int = 100,
        queue_blocks: int = 50,
        retry_s: float = 3.0,
        stall_s: float = STALL_S,
        backend: PortAudio | None = None,
    ):
        if block_ms <= 0 or queue_blocks < 1 or retry_s <= 0 or stall_s <= 0:
            raise ValueError("block_ms, queue_blocks, retry_s and stall_s must be positive")
        self.device = device
        self.sample_rate = sample_rate  # 0: the device's own default rate
        self.block_ms = block_ms
        self.queue_blocks = queue_blocks
        self.retry_s = retry_s
        self.stall_s = stall_s
        self.backend = backend or PortAudio()  # tests pass a fake
        self.dropped_blocks = 0  # blocks dropped because the queue was full
        self.device_overflows = 0  # blocks PortAudio flagged as overflowed (audio lost in the driver)
        self.opens = 0  # successful opens (1 + re-opens)
        self.last_block_at: float | None = None
        self.opened: Opened | None = None  # the device in use now, None while closed
        self._closed = False
        self._stop: asyncio.Event | None = None
        self._capture: _Capture | None = None
        self._logged_at: dict[str, float] = {}
        self._logged_count: dict[str, int] = {}

    def close(self) -> None:
        """Stop: ``events()`` closes the device and ends (from the loop's thread)."""
        self._closed = True
        if self._stop is not None:
            self._stop.set()
        if self._capture is not None:
            self._capture.closing = True
            self._capture.wakeup.set()

    def _count(self, counter: str, message: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        now = time.monotonic()
        last = self._logged_at.get(counter)
        if last is None or now - last >= OVERFLOW_LOG_INTERVAL_S:
            total = getattr(self, counter)
            since = total - self._logged_count.get(counter, 0)
            log.warning("microphone: %s (%d block%s, %d in all)", message, since, "" if since == 1 else "s", total)
            self._logged_at[counter] = now
            self._logged_count[counter] = total

    def _open(self, refresh: bool, loop: asyncio.AbstractEventLoop) -> tuple[_Capture, Opened]:
        """Blocking: find the device and start a stream on it (PortAudio's thread calls back)."""
        backend = self.backend
        if refresh:
            backend.refresh()
        device = find_device(self.device, backend.devices())
        rate = self.sample_rate or device.default_rate
        channels = channels_for(device)
        capture = _Capture(self, loop, channels)
        try:
            stream = backend.open_input(
                device=device.index, samplerate=rate, channels=channels, dtype="int16",
                blocksize=max(1, rate * self.block_ms // 1000), callback=capture.callback,
                finished_callback=capture.finished,
            )
        except (backend.error, ValueError) as error:
            raise MicrophoneError(f"cannot open input device {device.label} at {rate} Hz: {error}") from None
        capture.stream = stream
        try:
            stream.start()
        except backend.error as error:
            stream.close(ignore_errors=True)
            raise MicrophoneError(f"cannot start input device {device.label}: {error}") from None
        return capture, Opened(device, rate, channels)

    async def events(self, *, retry_initial: bool = True) -> AsyncIterator[MicrophoneEvent]:
        """Open the device and yield its events until ``close()``; see the module doc.

        ``retry_initial=False`` raises MicrophoneError when the first open fails (the desktop tool
        reports it and exits); later failures are always retried. PortAudioMissing always raises.
        """
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._closed:
            return
        first, last_failure = True, None
        try:
            while not self._closed:
                try:
                    capture, opened = await _in_thread(lambda refresh=not first: self._open(refresh, loop),
                                                       orphan=lambda opened_: opened_[0].close_now())
                except PortAudioMissing:
                    raise
                except MicrophoneError as error:
                    if first and not retry_initial:
                        raise
                    reason = str(error)
                    if reason != last_failure:
                        log.error("microphone: %s; retrying every %g s", reason, self.retry_s)
                    else:
                        log.debug("microphone still unavailable: %s", reason)
                    last_failure, first = reason, False
                    yield Unavailable(reason, self.retry_s)
                    await self._sleep(self.retry_s)
                    continue
                first, last_failure = False, None
                self._capture, self.opened = capture, opened
                self.opens += 1
                self.last_block_at = time.monotonic()
                if self._closed:  # close() came while the device was opening
                    break
                log.info("microphone: capturing from %s at %d Hz (%s)", opened.device.label, opened.sample_rate,
                         "stereo mixed to mono" if opened.channels == 2 else "mono")
                yield opened
                while (data := await capture.next(self.stall_s)) is not None:
                    yield Audio(mix_to_mono(data, capture.channels))
                await capture.close()
                self._capture, self.opened = None, None
                if self._closed:
                    break
                reason = capture.lost or "the audio stream ended"
                log.warning("microphone %s lost: %s; trying to re-open it every %g s",
                            opened.device.label, reason, self.retry_s)
                yield Lost(reason)
                await self._sleep(self.retry_s)
        finally:
            if self._capture is not None:
                capture, self._capture, self.opened = self._capture, None, None
                await capture.close()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass


# -- the daemon edge ------------------------------------------------------------------------------
class MicrophoneEdge:
    """``[microphone] enabled``: the daemon captures a local microphone as one more stream.

    Its captions go through the daemon's CaptionsHub like those of any websocket stream, so
    /v1/captions listeners and MQTT see them. The stream id is claimed for the edge's lifetime (a
    websocket client cannot take it over); while the device is away there is no live session, and
    when it comes back a new session starts (segment numbers and times start again at 0, as for a
    reconnecting websocket client).
    """

    def __init__(self, config, microphone: Microphone | None = None):
        mic = config.microphone
        self.config = config
        self.stream = mic.stream
        self.microphone = microphone or Microphone(
            mic.device or None, sample_rate=mic.sample_rate, block_ms=mic.block_ms,
            queue_blocks=mic.queue_blocks, retry_s=mic.retry_s,
        )
        self.session = None
        self.daemon = None
        self.sessions_started = 0
        self._task: asyncio.Task | None = None
        self._claimed = False

    def _languages(self) -> tuple[str | None, list[str | None]]:
        from ..core.languages import parse_language

        mic, streaming = self.config.microphone, self.config.streaming
        source = parse_language(mic.source_lang or streaming.source_lang or None, "source")
        targets = [parse_language(t, "target") for t in (mic.targets or streaming.targets)] or [None]
        return source, targets

    async def start(self, daemon) -> None:
        from ..core.languages import UnsupportedTarget, resolve_targets

        self.daemon = daemon
        try:
            source, targets = self._languages()
            resolve_targets(daemon.engine, source, targets)
        except UnsupportedTarget as error:
            log.error("microphone: %s; the microphone stays off", error)
            return
        if not daemon.hub.claim(self.stream):
            log.error("microphone: stream id %r is already being ingested; the microphone stays off", self.stream)
            return
        self._claimed = True
        self._task = asyncio.create_task(self._run(), name="streamsed-microphone")

    async def stop(self) -> None:
        """Close the device, finish the open utterance (its finals reach the listeners), release the id."""
        self.microphone.close()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)
            if not done:  # a hung PortAudio open/close must not keep the daemon (and MQTT's offline) waiting
                log.error("microphone: the device did not close within %s s; abandoning it", STOP_TIMEOUT_S)
                self._task.cancel()  # _run's finally still finishes the open utterance
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._claimed:
            self.daemon.hub.release(self.stream)
            self._claimed = False

    async def _run(self) -> None:
        try:
            async with contextlib.aclosing(self.microphone.events()) as events:
                async for event in events:
                    if isinstance(event, Opened):
                        self._open_session(event)
                    elif isinstance(event, Audio):
                        if self.session is not None:
                            await self.session.feed(event.data)
                    elif isinstance(event, Lost):
                        await self._finish_session()
        except MicrophoneError as error:  # PortAudio missing: nothing to retry, the stream id is free again
            log.error("microphone: %s", error)
            await self._finish_session()
            if self._claimed:
                self.daemon.hub.release(self.stream)
                self._claimed = False
        except Exception:
            log.exception("microphone stream %s failed", self.stream)
        finally:
            await self._finish_session()

    def _open_session(self, opened: Opened) -> None:
        from .session import SessionOptions, StreamSession

        source, targets = self._languages()
        options = SessionOptions(stream=self.stream, sample_rate=opened.sample_rate, encoding="pcm_s16le",
                                 source_lang=source, targets=targets)
        self.session = StreamSession(options, self.daemon.worker, self.daemon.engine, self._emit,
                                     vad_config=self.config.vad, chunk_ms=self.config.streaming.chunk_ms,
                                     guard=self.config.guard)
        self.daemon.sessions[self.stream] = self.session
        self.sessions_started += 1

    def _emit(self, event: dict) -> None:
        if event.get("type") == "final":
            log.debug("stream %s final %d [%s]: %s", self.stream, event["segment"], event["target_lang"], event["text"])
        elif event.get("type") == "error":
            log.warning("stream %s: %s: %s", self.stream, event.get("code"), event.get("message"))
        self.daemon.hub.publish(event)

    async def _finish_session(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        try:
            await session.finish()
        finally:
            if self.daemon.sessions.get(self.stream) is session:
                del self.daemon.sessions[self.stream]
