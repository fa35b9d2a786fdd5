"""Split a live audio stream into utterances with webrtcvad (sans-I/O).

Feed samples as they arrive; get back ``SpeechStarted`` / ``SpeechEnded`` events.
All offsets are sample indices into the 16 kHz stream the segmenter builds
from its input (``MODEL_SAMPLE_RATE``), so ``SpeechEnded.audio`` is exactly
``stream[start:end]`` and can go straight to the model.

How utterances are found (every frame is classified by webrtcvad):

* Start: while idle, the last ``padding_ms`` of frames are kept in a ring. When
  more than ``start_ratio`` of the ring is voiced an utterance opens at the
  oldest frame in the ring, so the onset that led up to the trigger is kept
  as pre-roll.
* End: the utterance closes once more than ``end_ratio`` of its last
  ``end_silence_ms`` of frames are non-speech. Its end is trimmed to
  ``padding_ms`` after the last voiced frame, so both sides carry the same
  padding instead of half a second of trailing silence.
* Forced cut: an utterance that would grow past ``max_segment_s`` is cut at
  the frame boundary before the limit, and the next utterance opens at that
  same sample (``next.start == previous.end``), so nothing is lost between them.
* Short utterances: an utterance is announced with ``SpeechStarted`` only once
  it holds ``min_speech_ms`` of voiced frames. One that closes before that is
  dropped without any event and without using up a segment number, so every
  ``SpeechStarted`` is followed by a ``SpeechEnded`` with the same ``segment``,
  and segments are numbered 0, 1, 2, ... This applies to the continuation after
  a forced cut too: a tail shorter than ``min_speech_ms`` is dropped.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import webrtcvad

from .audio import MODEL_SAMPLE_RATE, StreamResampler, pcm_to_float32

# webrtcvad accepts 8/16/32/48 kHz; running it at the model's rate means VAD
# offsets and model input share one sample clock.
VAD_SAMPLE_RATE = MODEL_SAMPLE_RATE


def samples_to_seconds(samples: int) -> float:
    """Convert a sample offset or count in the 16 kHz stream to seconds."""
    return samples / VAD_SAMPLE_RATE


@dataclass
class VadConfig:
    """Segmentation settings; see the module docstring for how they interact."""

    aggressiveness: int = 2
    """webrtcvad mode, 0 (keeps most audio as speech) to 3 (strictest)."""
    frame_ms: int = 30
    """Classification frame length; webrtcvad supports 10, 20 and 30 ms."""
    padding_ms: int = 300
    """Pre-roll kept before the trigger, and padding kept after the last voiced frame."""
    start_ratio: float = 0.6
    """Open an utterance when more than this share of the pre-roll ring is voiced."""
    end_ratio: float = 0.9
    """Close it when more than this share of the last end_silence_ms is non-speech."""
    end_silence_ms: int = 500
    """How much (mostly) non-speech ends an utterance."""
    min_speech_ms: int = 250
    """Drop utterances with less voiced audio than this (clicks, coughs, bumps)."""
    max_segment_s: float = 30.0
    """Longest segment; Whisper's input window is 30 s."""

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0, 1, 2 or 3, got {self.aggressiveness}")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30, got {self.frame_ms}")
        if self.padding_ms < self.frame_ms:
            raise ValueError(f"padding_ms must be at least frame_ms ({self.frame_ms}), got {self.padding_ms}")
        if self.end_silence_ms < self.frame_ms:
            raise ValueError(
                f"end_silence_ms must be at least frame_ms ({self.frame_ms}), got {self.end_silence_ms}"
            )
        for name in ("start_ratio", "end_ratio"):
            ratio = getattr(self, name)
            # The test is "more than ratio", so 1.0 or more could never fire.
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {ratio}")
        if self.min_speech_ms < 0:
            raise ValueError(f"min_speech_ms must not be negative, got {self.min_speech_ms}")
        shortest_segment_ms = self.padding_ms + self.min_speech_ms + self.frame_ms
        if not self.max_segment_s * 1000 >= shortest_segment_ms:  # "not >=" also rejects NaN
            raise ValueError(
                f"max_segment_s must be at least padding_ms + min_speech_ms + frame_ms "
                f"({shortest_segment_ms / 1000:g} s), got {self.max_segment_s}"
            )


@dataclass(frozen=True)
class SpeechStarted:
    """Utterance ``segment`` began at sample ``start`` (emitted once it passed min_speech_ms)."""

    segment: int
    start: int


@dataclass(frozen=True)
class SpeechEnded:
    """Utterance ``segment`` is complete; ``audio`` is the 16 kHz stream[start:end]."""

    segment: int
    start: int
    end: int
    # Left out of == because comparing arrays has no single truth value; within
    # one stream the offsets determine the audio anyway.
    audio: np.ndarray = field(repr=False, compare=False)


VadEvent = SpeechStarted | SpeechEnded


@dataclass
class _Utterance:
    start: int
    last_voiced_end: int  # equals start until a voiced frame arrives
    voiced_frames: int = 0
    segment: int | None = None  # assigned when announced with SpeechStarted


class _SampleBuffer:
    """The 16 kHz stream from offset ``first`` to ``end``: appended at the tail, discarded at the head."""

    def __init__(self) -> None:
        self._data = np.zeros(VAD_SAMPLE_RATE, dtype=np.float32)
        self._head = 0  # index in _data that holds stream offset `first`
        self.first = 0
        self.end = 0

    def append(self, samples: np.ndarray) -> None:
        kept = self.end - self.first
        needed = kept + len(samples)
        if self._head + needed > len(self._data):
            # Move kept samples to the front, growing geometrically so appends stay amortised O(1).
            data = self._data if needed <= len(self._data) else np.empty(2 * needed, dtype=np.float32)
            data[:kept] = self._data[self._head:self._head + kept]
            self._data, self._head = data, 0
        tail = self._head + kept
        self._data[tail:tail + len(samples)] = samples
        self.end += len(samples)

    def discard_before(self, offset: int) -> None:
        offset = min(max(offset, self.first), self.end)
        self._head += offset - self.first
        self.first = offset

    def slice(self, start: int, end: int) -> np.ndarray:
        if not self.first <= start <= end <= self.end:
            raise IndexError(f"samples {start}:{end} are not buffered ({self.first}:{self.end})")
        return self._data[self._head + start - self.first:self._head + end - self.first].copy()


def _to_pcm16_bytes(samples: np.ndarray) -> bytes:
    return np.clip(samples * 32768.0, -32768, 32767).astype("<i2").tobytes()


class VadSegmenter:
    """Turn a stream of samples into SpeechStarted / SpeechEnded events.

    ``input_rate`` is the rate of the samples given to ``feed``; they are
    resampled to 16 kHz internally and all offsets refer to that 16 kHz stream.
    One segmenter handles one stream: call ``flush()`` at its end.
    """

    def __init__(self, config: VadConfig | None = None, input_rate: int = MODEL_SAMPLE_RATE):
        self.config = config or VadConfig()
        self._vad = webrtcvad.Vad(self.config.aggressiveness)
        self._resampler = StreamResampler(input_rate, VAD_SAMPLE_RATE)
        self._frame_samples = self.config.frame_ms * VAD_SAMPLE_RATE // 1000
        self._padding_samples = self.config.padding_ms * VAD_SAMPLE_RATE // 1000
        self._max_segment_samples = int(self.config.max_segment_s * VAD_SAMPLE_RATE)
        self._min_voiced_frames = max(1, math.ceil(self.config.min_speech_ms / self.config.frame_ms))
        # (frame start, is speech) of the latest frames while no utterance is open.
        self._preroll: deque[tuple[int, bool]] = deque(
            maxlen=math.ceil(self.config.padding_ms / self.config.frame_ms)
        )
        # is-speech flags of the open utterance's latest frames, for the end rule.
        self._recent: deque[bool] = deque(
            maxlen=math.ceil(self.config.end_silence_ms / self.config.frame_ms)
        )
        self._buffer = _SampleBuffer()
        self._next_frame = 0  # stream offset of the first sample not yet classified
        self._utterance: _Utterance | None = None
        self._next_segment = 0
        self._flushed = False

    @property
    def open_segment(self) -> int | None:
        """Segment number of the announced, still open utterance, else None."""
        utterance = self._announced()
        return None if utterance is None else utterance.segment

    @property
    def open_start(self) -> int | None:
        """Start offset of the announced, still open utterance, else None."""
        utterance = self._announced()
        return None if utterance is None else utterance.start

    def open_audio(self) -> np.ndarray | None:
        """Audio of the announced, still open utterance up to the last classified frame, else None."""
        utterance = self._announced()
        if utterance is None:
            return None
        return self._buffer.slice(utterance.start, self._next_frame)

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Add int16 or float32 mono samples at ``input_rate``; return the events they cause."""
        if self._flushed:
            raise RuntimeError("feed() after flush(): use a new VadSegmenter for a new stream")
        self._buffer.append(self._resampler.process(pcm_to_float32(samples)))
        return self._classify_buffered_frames()

    def flush(self) -> list[VadEvent]:
        """End the stream: classify what is left and close any open utterance as if silence followed.

        Samples after the last whole frame cannot be classified and are not
        included in a segment.
        """
        if self._flushed:
            return []
        self._flushed = True
        self._buffer.append(self._resampler.process(np.zeros(0, dtype=np.float32), last=True))
        events = self._classify_buffered_frames()
        if self._utterance is not None:
            self._close_utterance(self._natural_end(self._next_frame), events)
        return events

    def _announced(self) -> _Utterance | None:
        if self._utterance is None or self._utterance.segment is None:
            return None
        return self._utterance

    def _classify_buffered_frames(self) -> list[VadEvent]:
        events: list[VadEvent] = []
        while self._buffer.end - self._next_frame >= self._frame_samples:
            frame_start = self._next_frame
            frame = self._buffer.slice(frame_start, frame_start + self._frame_samples)
            is_speech = self._vad.is_speech(_to_pcm16_bytes(frame), VAD_SAMPLE_RATE)
            self._next_frame += self._frame_samples
            self._on_frame(frame_start, is_speech, events)
        self._buffer.discard_before(self._oldest_needed_sample())
        return events

    def _oldest_needed_sample(self) -> int:
        if self._utterance is not None:
            return self._utterance.start
        if self._preroll:
            return self._preroll[0][0]
        return self._next_frame

    def _on_frame(self, frame_start: int, is_speech: bool, events: list[VadEvent]) -> None:
        frame_end = frame_start + self._frame_samples
        if self._utterance is None:
            self._preroll.append((frame_start, is_speech))
            voiced = sum(speech for _, speech in self._preroll)
            if voiced > self.config.start_ratio * self._preroll.maxlen:
                self._utterance = _Utterance(start=self._preroll[0][0], last_voiced_end=self._preroll[0][0])
                for preroll_start, preroll_speech in self._preroll:
                    self._add_frame(preroll_start, preroll_speech, events)
                self._preroll.clear()
            return

        if frame_end - self._utterance.start > self._max_segment_samples:
            self._close_utterance(frame_start, events)
            # Still inside speech (the end rule has not fired): continue in a new segment.
            self._utterance = _Utterance(start=frame_start, last_voiced_end=frame_start)
        self._add_frame(frame_start, is_speech, events)

        unvoiced = len(self._recent) - sum(self._recent)
        if unvoiced > self.config.end_ratio * self._recent.maxlen:
            self._close_utterance(self._natural_end(frame_end), events)
            self._recent.clear()

    def _add_frame(self, frame_start: int, is_speech: bool, events: list[VadEvent]) -> None:
        utterance = self._utterance
        self._recent.append(is_speech)
        if is_speech:
            utterance.voiced_frames += 1
            utterance.last_voiced_end = frame_start + self._frame_samples
        if utterance.segment is None and utterance.voiced_frames >= self._min_voiced_frames:
            utterance.segment = self._next_segment
            self._next_segment += 1
            events.append(SpeechStarted(utterance.segment, utterance.start))

    def _natural_end(self, limit: int) -> int:
        """End of the open utterance when speech stops: padding after its last voiced frame, up to limit."""
        return min(limit, self._utterance.last_voiced_end + self._padding_samples)

    def _close_utterance(self, end: int, events: list[VadEvent]) -> None:
        utterance, self._utterance = self._utterance, None
        if utterance.segment is None:
            return  # never announced (less than min_speech_ms of speech): dropped silently
        audio = self._buffer.slice(utterance.start, end)
        events.append(SpeechEnded(utterance.segment, utterance.start, end, audio))
