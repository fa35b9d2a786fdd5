"""Split a live audio stream into utterances (sans-I/O).

Feed samples as they arrive; get back ``SpeechStarted`` / ``SpeechEnded`` events.
All offsets are sample indices into the 16 kHz stream the segmenter builds
from its input (``MODEL_SAMPLE_RATE``), so ``SpeechEnded.audio`` is exactly
``stream[start:end]`` and can go straight to the model.

Every frame is classified speech / non-speech by a ``FrameClassifier``: webrtcvad
(``WebrtcClassifier``, here) or Silero VAD (``streamsed.engine.voice``: a neural
model, so it lives with the other models; the segmenter only sees its decisions).
How utterances are found from those decisions:

* Start: while idle, the last ``padding_ms`` of frames are kept in a ring. When
  more than ``start_ratio`` of the ring is voiced an utterance opens at the
  oldest frame in the ring, so the onset that led up to the trigger is kept
  as pre-roll.
* End: the utterance closes once more than ``end_ratio`` of its last
  ``end_silence_ms`` of frames are non-speech (or ``pause_db`` below its loudest
  frame: digital silence ends a pause at once). The longer it runs, the shorter
  that pause: ``end_silence_schedule`` lists (seconds into the utterance, pause
  in ms), by default 500 ms at first, 120 ms after 1.5 s and 90 ms after 3 s, so
  continuous talk still closes at the breaths between sentences and captions
  stay caption-sized (README "Segmentation" has the measurements behind them).
  Its end is trimmed to ``padding_ms`` after the last voiced
  frame, so both sides carry the same padding instead of trailing silence.
* Forced cut: an utterance that would grow past ``max_segment_s`` is cut at the
  quietest frame (lowest energy, non-speech frames first) of its last
  ``cut_search_s``, so a cut falls into a dip between words whenever there is
  one; the next utterance opens at that same sample (``next.start ==
  previous.end``), so nothing is lost between them.
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
from typing import Protocol

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

    engine: str = "silero"
    """Frame classifier: "silero" (neural, tells noise from speech) or "webrtc" (lighter, energy-like)."""
    threshold: float = 0.5
    """Silero: a frame is speech when its speech probability is above this."""
    aggressiveness: int = 2
    """webrtcvad mode, 0 (keeps most audio as speech) to 3 (strictest)."""
    frame_ms: int = 30
    """webrtcvad's frame length: 10, 20 or 30 ms (Silero's frame is fixed at 32 ms)."""
    padding_ms: int = 300
    """Pre-roll kept before the trigger, and padding kept after the last voiced frame."""
    start_ratio: float = 0.6
    """Open an utterance when more than this share of the pre-roll ring is voiced."""
    end_ratio: float = 0.9
    """Close it when more than this share of the last end_silence_ms is non-speech."""
    end_silence_ms: int = 500
    """How much (mostly) non-speech ends an utterance (at its start; see end_silence_schedule)."""
    end_silence_schedule: tuple[tuple[float, int], ...] = ((1.5, 120), (3.0, 90))
    """(seconds into the utterance, end_silence_ms from then on), in increasing order."""
    min_speech_ms: int = 250
    """Drop utterances with less voiced audio than this (clicks, coughs, bumps)."""
    max_segment_s: float = 15.0
    """Longest segment (a 15 s caption is already long; Whisper's window is 30 s)."""
    cut_search_s: float = 3.0
    """A forced cut looks for the quietest frame in this many seconds before the limit."""
    pause_db: float = 40.0
    """A frame this many dB below the utterance's loudest counts as pause for the end rule, whatever
    the classifier says (Silero's probability lags behind a sudden silence by 100-200 ms)."""

    def __post_init__(self) -> None:
        if self.engine not in ("silero", "webrtc"):
            raise ValueError(f"engine must be silero or webrtc, got {self.engine!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")
        self.end_silence_schedule = tuple((float(at), int(ms)) for at, ms in self.end_silence_schedule)
        if [at for at, _ in self.end_silence_schedule] != sorted({at for at, _ in self.end_silence_schedule}):
            raise ValueError("end_silence_schedule must list (seconds, ms) pairs in increasing seconds")
        for at, ms in self.end_silence_schedule:
            if at <= 0 or not self.frame_ms <= ms <= self.end_silence_ms:
                raise ValueError(f"end_silence_schedule entry ({at:g}, {ms}): seconds must be positive and ms "
                                 f"between frame_ms and end_silence_ms")
        if not self.pause_db > 0:
            raise ValueError(f"pause_db must be positive, got {self.pause_db}")
        if not 0 < self.cut_search_s <= self.max_segment_s:
            raise ValueError(f"cut_search_s must be positive and at most max_segment_s, got {self.cut_search_s}")
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


class FrameClassifier(Protocol):
    """Speech or not, for consecutive frames of one 16 kHz stream (it may keep state between calls)."""

    frame_samples: int

    def classify(self, frames: np.ndarray) -> list[bool]:
        """``frames``: float32 [n, frame_samples], in stream order; one decision per frame."""
        ...


class WebrtcClassifier:
    """webrtcvad: a light GMM on spectral energy. Cheap, but it takes most noise for speech."""

    def __init__(self, aggressiveness: int = 2, frame_ms: int = 30):
        self._vad = webrtcvad.Vad(aggressiveness)
        self.frame_samples = frame_ms * VAD_SAMPLE_RATE // 1000

    def classify(self, frames: np.ndarray) -> list[bool]:
        return [self._vad.is_speech(_to_pcm16_bytes(frame), VAD_SAMPLE_RATE) for frame in frames]


@dataclass
class _Utterance:
    start: int
    last_voiced_end: int  # equals start until a voiced frame arrives
    voiced_frames: int = 0
    segment: int | None = None  # assigned when announced with SpeechStarted
    # (frame start, is speech, energy) of the latest frames, for choosing where a forced cut goes
    frames: deque = field(default_factory=deque)
    peak: float = 0.0  # RMS of its loudest frame so far


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

    def __init__(self, config: VadConfig | None = None, input_rate: int = MODEL_SAMPLE_RATE,
                 classifier: FrameClassifier | None = None):
        self.config = config = config or VadConfig()
        if classifier is None:
            if config.engine != "webrtc":
                raise ValueError(f"the {config.engine} VAD is a model: pass its classifier "
                                 "(streamsed.engine.voice.frame_classifier)")
            classifier = WebrtcClassifier(config.aggressiveness, config.frame_ms)
        self._classifier = classifier
        self._resampler = StreamResampler(input_rate, VAD_SAMPLE_RATE)
        self._frame_samples = classifier.frame_samples
        frame_ms = self._frame_samples * 1000 / VAD_SAMPLE_RATE
        self._padding_samples = config.padding_ms * VAD_SAMPLE_RATE // 1000
        self._max_segment_samples = int(config.max_segment_s * VAD_SAMPLE_RATE)
        self._cut_search_frames = max(1, round(config.cut_search_s * 1000 / frame_ms))
        self._pause_ratio = 10 ** (-config.pause_db / 20)
        self._min_voiced_frames = max(1, math.ceil(config.min_speech_ms / frame_ms))
        # (frame start, is speech) of the latest frames while no utterance is open.
        self._preroll: deque[tuple[int, bool, float]] = deque(maxlen=math.ceil(config.padding_ms / frame_ms))
        # End rule: frames of pause needed, by utterance length (samples from its start).
        self._end_windows = [(0, math.ceil(config.end_silence_ms / frame_ms))] + [
            (int(at * VAD_SAMPLE_RATE), math.ceil(ms / frame_ms)) for at, ms in config.end_silence_schedule]
        # is-speech flags of the open utterance's latest frames, for the end rule.
        self._recent: deque[bool] = deque(maxlen=self._end_windows[0][1])
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
        count = (self._buffer.end - self._next_frame) // self._frame_samples
        if count:
            first = self._next_frame
            frames = self._buffer.slice(first, first + count * self._frame_samples).reshape(count, -1)
            decisions = self._classifier.classify(frames)
            energies = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
            for n, (is_speech, energy) in enumerate(zip(decisions, energies.tolist())):
                frame_start = first + n * self._frame_samples
                self._next_frame = frame_start + self._frame_samples
                self._on_frame(frame_start, bool(is_speech), energy, events)
        self._buffer.discard_before(self._oldest_needed_sample())
        return events

    def _oldest_needed_sample(self) -> int:
        if self._utterance is not None:
            return self._utterance.start
        if self._preroll:
            return self._preroll[0][0]
        return self._next_frame

    def _on_frame(self, frame_start: int, is_speech: bool, energy: float, events: list[VadEvent]) -> None:
        frame_end = frame_start + self._frame_samples
        if self._utterance is None:
            self._preroll.append((frame_start, is_speech, energy))
            voiced = sum(speech for _, speech, _ in self._preroll)
            if voiced > self.config.start_ratio * self._preroll.maxlen:
                self._open(self._preroll[0][0], list(self._preroll), events)
                self._preroll.clear()
            return

        if frame_end - self._utterance.start > self._max_segment_samples:
            self._force_cut(events)
        self._add_frame(frame_start, is_speech, energy, events)

        needed = self._pause_frames(frame_end - self._utterance.start)
        recent = list(self._recent)[-needed:]
        if len(recent) == needed and recent.count(False) > self.config.end_ratio * needed:
            self._close_utterance(self._natural_end(frame_end), events)
            self._recent.clear()

    def _pause_frames(self, length: int) -> int:
        """Frames of pause that end an utterance ``length`` samples long (end_silence_schedule)."""
        return [frames for at, frames in self._end_windows if length >= at][-1]

    def _open(self, start: int, frames: list[tuple[int, bool, float]], events: list[VadEvent]) -> None:
        self._utterance = _Utterance(start=start, last_voiced_end=start)
        for frame in frames:
            self._add_frame(*frame, events)

    def _force_cut(self, events: list[VadEvent]) -> None:
        """The utterance reached max_segment_s without a pause: cut it at the quietest recent frame
        (non-speech first, then lowest energy, then latest) and go on in a new segment from there."""
        frames = list(self._utterance.frames)[-self._cut_search_frames:]
        cut = min(range(len(frames)), key=lambda i: (frames[i][1], frames[i][2], -i))
        cut_at = frames[cut][0]
        if cut_at <= self._utterance.start:  # nothing to search in: cut at the limit itself
            cut_at, cut = frames[-1][0] + self._frame_samples, len(frames)
        self._close_utterance(cut_at, events)
        self._recent.clear()
        # Still inside speech (the end rule has not fired): the frames after the cut start the next one.
        self._open(cut_at, frames[cut:], events)

    def _add_frame(self, frame_start: int, is_speech: bool, energy: float, events: list[VadEvent]) -> None:
        utterance = self._utterance
        utterance.peak = max(utterance.peak, energy)
        is_speech = is_speech and energy >= utterance.peak * self._pause_ratio  # pause_db: silence is silence
        utterance.frames.append((frame_start, is_speech, energy))
        if len(utterance.frames) > self._cut_search_frames:
            utterance.frames.popleft()
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
