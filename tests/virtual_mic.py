"""A virtual ALSA microphone for tests: real PortAudio capture without sound hardware.

``VirtualMic`` writes an ALSA configuration (pass ``mic.env`` to a subprocess, or set
``ALSA_CONFIG_PATH`` in this process before PortAudio initializes) that defines the capture PCM
``vmic``: a ``type file`` plugin over the ``null`` PCM whose ``infile`` supplies the samples.
PortAudio lists it like a sound card (default rate 44100 Hz, as PortAudio reports for ``null``).

Two details make it behave like a real microphone:

* Pacing. ``null`` runs at infinite speed, so the plugin also writes what it captured to an output
  FIFO (its ``file``) that a thread here drains at ``rate`` frames per second; once that small
  pipe is full, the capture blocks and so runs in real time (up to a few hundred ms ahead).
* A continuous signal. ``infile`` is a FIFO too, kept full by a feeder thread: the audio given
  to ``play()``, silence in between. A plain file would run out, and after its end the plugin hands
  out stale buffer contents rather than silence.

``unplug()`` behaves like pulling a USB microphone: the running capture fails (its write to the
drained FIFO breaks, PortAudio ends the stream) and opening ``vmic`` fails until ``plug()``.
With ``channels=2`` the FIFO carries two-channel frames: open ``vmic`` with 2 channels then.
(A ``type route`` PCM on top would report exactly 2 channels, but under a plugin the file plugin
loses frames, so tests open ``vmic`` itself in stereo instead.)
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import soxr

SYSTEM_ALSA_CONF = Path("/usr/share/alsa/alsa.conf")
DEFAULT_RATE = 44100  # what PortAudio reports as the null PCM's default sample rate
CHUNK_FRAMES = 1024
IN_PIPE_BYTES = 128 * 1024  # samples queued ahead of the capture
OUT_PIPE_BYTES = 4096  # how far the capture may run ahead of real time (plus the plugin's buffer)


def available() -> str | None:
    """None when virtual capture works here, else why not (for pytest.skip)."""
    from ctypes.util import find_library

    if not SYSTEM_ALSA_CONF.is_file():
        return f"no ALSA configuration at {SYSTEM_ALSA_CONF} (alsa-lib not installed)"
    if find_library("portaudio") is None:
        return "libportaudio2 is not installed"
    return None


class VirtualMic:
    def __init__(self, folder: str | os.PathLike | None = None, rate: int = DEFAULT_RATE, channels: int = 1,
                 name: str = "vmic"):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="vmic-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rate, self.channels, self.name = rate, channels, name
        self.frame_bytes = 2 * channels
        self.infile = self.folder / f"{name}-in.fifo"
        self.outfile = self.folder / f"{name}-out.fifo"
        self.config_path = self.folder / "asound.conf"
        self.env = {"ALSA_CONFIG_PATH": str(self.config_path)}
        self._queue: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._fed = 0  # bytes written to the infile FIFO
        self._consumed = 0  # bytes the capture has taken (drained from the output FIFO)
        self._marks: list[int] = []  # byte positions where played audio ends
        self._threads: list[threading.Thread] = []
        self._running = False
        self._in_fd = self._out_fd = None
        self._write_config()

    def _write_config(self) -> None:
        self.config_path.write_text(
            f"<{SYSTEM_ALSA_CONF}>\n"
            f"pcm.{self.name} {{\n"
            f"    type file\n"
            f"    slave.pcm \"null\"\n"
            f"    file \"{self.outfile}\"\n"
            f"    infile \"{self.infile}\"\n"
            f"    format \"raw\"\n"
            f"}}\n"
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> VirtualMic:
        self.plug()
        return self

    def __exit__(self, *exc) -> None:
        self.unplug()

    def plug(self) -> None:
        """Connect the device: it can be opened (again) and delivers audio."""
        if self._running:
            return
        for path in (self.infile, self.outfile):
            path.unlink(missing_ok=True)
            os.mkfifo(path)
        # O_RDWR: opening never blocks, and the FIFOs stay usable while the capture (re)opens them.
        self._in_fd = os.open(self.infile, os.O_RDWR)
        self._out_fd = os.open(self.outfile, os.O_RDWR)
        fcntl.fcntl(self._in_fd, fcntl.F_SETPIPE_SZ, IN_PIPE_BYTES)
        fcntl.fcntl(self._out_fd, fcntl.F_SETPIPE_SZ, OUT_PIPE_BYTES)
        self._running = True
        self._threads = [threading.Thread(target=self._feed, args=(self._in_fd,), daemon=True),
                         threading.Thread(target=self._pace, args=(self._out_fd,), daemon=True)]
        for thread in self._threads:
            thread.start()

    def unplug(self) -> None:
        """Disconnect: a running capture fails, and opening the device fails until ``plug()``."""
        if not self._running:
            return
        self._running = False
        for path in (self.infile, self.outfile):
            path.unlink(missing_ok=True)
        for thread in self._threads:
            thread.join(5)
        for fd in (self._in_fd, self._out_fd):
            os.close(fd)
        self._in_fd = self._out_fd = None
        with self._lock:
            self._queue.clear()
            self._marks.clear()

    def cleanup(self) -> None:
        self.unplug()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- audio ----------------------------------------------------------------------------------
    def play(self, samples: np.ndarray, rate: int = 16000) -> None:
        """Queue float32 mono samples at ``rate`` (resampled to the device rate with soxr)."""
        samples = np.asarray(samples, dtype=np.float32)
        if rate != self.rate:
            samples = soxr.resample(samples, rate, self.rate).astype(np.float32)
        self.play_pcm((np.clip(samples, -1, 1) * 32767).round().astype("<i2"))

    def play_pcm(self, pcm: np.ndarray) -> None:
        """Queue int16 samples at the device rate, shape (n,) or (n, channels), exactly as given."""
        pcm = np.asarray(pcm, dtype="<i2")
        if pcm.ndim == 1:
            pcm = np.repeat(pcm[:, None], self.channels, axis=1)
        data = pcm.tobytes()
        with self._lock:
            queued = sum(len(chunk) for chunk in self._queue)
            self._marks.append(self._fed + queued + len(data))
            for first in range(0, len(data), CHUNK_FRAMES * self.frame_bytes):
                self._queue.append(data[first: first + CHUNK_FRAMES * self.frame_bytes])

    def wait_played(self, timeout: float = 60.0, before_end_s: float = 0.0) -> None:
        """Block until the capture has taken everything queued so far (but ``before_end_s``)."""
        with self._lock:
            end = self._marks[-1] if self._marks else self._fed
        end -= int(before_end_s * self.rate) * self.frame_bytes
        deadline = time.monotonic() + timeout
        while self._consumed < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the capture took {self._consumed} of {end} bytes in {timeout} s")
            time.sleep(0.02)

    @property
    def consumed_seconds(self) -> float:
        return self._consumed / self.frame_bytes / self.rate

    # -- threads --------------------------------------------------------------------------------
    def _feed(self, fd: int) -> None:
        silence = bytes(CHUNK_FRAMES * self.frame_bytes)  # <= PIPE_BUF: one write, never split
        while self._running:
            if not select.select([], [fd], [], 0.05)[1]:
                continue  # the pipe is full: the capture is not reading (yet)
            with self._lock:
                chunk = self._queue.popleft() if self._queue else silence
                self._fed += len(chunk)
            try:
                os.write(fd, chunk)
            except OSError:
                return

    def _pace(self, fd: int) -> None:
        """Drain what the capture wrote at ``rate`` frames a second (a token bucket of 50 ms)."""
        per_second = self.rate * self.frame_bytes
        burst = per_second // 20 // self.frame_bytes * self.frame_bytes
        allowance, last = 0.0, time.monotonic()
        while self._running:
            now = time.monotonic()
            allowance = min(burst, allowance + (now - last) * per_second)
            last = now
            want = int(allowance) // self.frame_bytes * self.frame_bytes
            if want and select.select([fd], [], [], 0.05)[0]:
                try:
                    data = os.read(fd, want)
                except OSError:
                    return
                allowance -= len(data)
                self._consumed += len(data)
            else:
                time.sleep(0.005)
