"""One live audio stream: PCM in, protocol v1 events out (speech_start/end, partial, final, error).

A ``StreamSession`` knows nothing about sockets: bytes come in through ``feed``, events go out
through the ``emit`` callback as JSON-ready dicts, and ``finish`` ends the stream. That keeps the
finals of a stream safe when its client vanishes: the edge calls ``finish()`` and the finals still
get produced and emitted (to whatever ``emit`` now does with them).

Per stream:

* Audio is decoded (``pcm_s16le`` / ``pcm_f32le``), resampled to 16 kHz and segmented by the VAD
  (``core.segments.segmenter_for``, the same segmenter as ``streamsed translate``), whose frame
  classifier runs on one VAD thread shared by all sessions, never on the event loop.
* While an utterance is open, every ``chunk_ms`` of new audio a *partial* request for the utterance
  so far is queued on the worker, at most one in flight per session (later chunks wait for it).
  Its hypotheses go through LocalAgreement-2, one per target: ``stable`` never changes once sent.
* When an utterance closes, a *final* request for exactly the segment's audio is queued: the same
  audio the offline pipeline (``core.segments.segment_audio``) cuts, so the final equals its output.
* Finals are emitted in segment order, and a partial of segment n is dropped once n's final is out.

Requests are queued synchronously inside ``feed``, so the worker can start on them before ``feed``
returns; the session awaits their results in background tasks and never blocks ``feed`` on them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..core.audio import MODEL_SAMPLE_RATE, StreamResampler, pcm_to_float32
from ..core.guard import GuardConfig, drop_reason
from ..core.languages import Target, parse_language, resolve_targets
from ..core.segments import segmenter_for
from ..core.stabilize import LocalAgreement
from ..core.vad import SpeechEnded, SpeechStarted, VadConfig, VadEvent, samples_to_seconds

if TYPE_CHECKING:  # sessions hand work to the worker as data; they never import torch themselves
    from ..engine.worker import EngineWorker

log = logging.getLogger(__name__)

__all__ = ["SessionOptions", "StreamSession", "DECODE_FAILED"]

DECODE_FAILED = "decode_failed"
MAX_FINALS_IN_FLIGHT = 4  # per session: beyond this, feed() waits for the model (backpressure)
"""Error code emitted when the model fails on a segment's final (the stream goes on)."""


@dataclass
class SessionOptions:
    stream: str
    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    source_lang: str | None = None
    targets: list[str | None] = field(default_factory=lambda: [None])  # None: the model's default
    prompt: str | None = None  # previous-text context of every target (core.languages.context_text)


# Frame classification (Silero is a neural network) runs here, off the event loop; one thread for all
# streams keeps each stream's frames in order and leaves the other core to the speech model.
_VAD_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamsed-vad")


async def in_vad_thread(function, *args):
    """Run ``function`` on the VAD thread (file jobs of the HTTP API feed their VAD here too)."""
    return await asyncio.get_running_loop().run_in_executor(_VAD_THREAD, function, *args)


def _scores(hypothesis) -> dict:
    """The guard's inputs, rounded for the wire; absent when the model does not give them."""
    scores = {"avg_logprob": hypothesis.avg_logprob, "no_speech_prob": hypothesis.no_speech_prob}
    return {key: round(value, 4) for key, value in scores.items() if value is not None}


def _seconds(samples: int) -> float:
    """Stream offset in seconds with millisecond precision, as every event carries it."""
    return round(samples_to_seconds(samples), 3)


class StreamSession:
    """Streaming state of one stream; all methods run on the event loop of the connection."""

    def __init__(
        self,
        options: SessionOptions,
        worker: EngineWorker,
        engine_info: EngineInfo,
        emit: Callable[[dict], None],
        *,
        vad_config: VadConfig | None = None,
        chunk_ms: int = 500,
        guard: GuardConfig | None = None,
    ):
        if chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be positive, got {chunk_ms}")
        self.options = options
        self.stream = options.stream
        # Raises UnsupportedTarget for a pair the model cannot produce, before any audio arrives.
        source = parse_language(options.source_lang, "source")
        wanted = [parse_language(code, "target") for code in options.targets or [None]]
        self.targets: list[Target] = resolve_targets(engine_info, source, wanted, options.prompt)
        pcm_to_float32(b"", options.encoding)  # raises AudioError for an unknown encoding now
        self._resampler = StreamResampler(options.sample_rate, MODEL_SAMPLE_RATE)  # AudioError: bad rate
        self._segmenter = segmenter_for(engine_info, vad_config)
        self._guard = guard or GuardConfig()
        self._worker = worker
        self._engine_info = engine_info
        self._emit_callback = emit
        self._chunk_samples = chunk_ms * MODEL_SAMPLE_RATE // 1000
        self._received = 0  # 16 kHz samples handed to the segmenter so far
        self._partial_mark = 0  # stream offset when the open utterance last got a partial request
        self._partial: asyncio.Task | None = None  # the one partial in flight
        self._agreements: dict[int, dict[Target, LocalAgreement]] = {}  # segment -> one per target
        # segment -> requested target -> tokens of its latest partial (the worker fills it in): the
        # draft of the segment's next partial and of its final, read when their decode starts
        self._drafts: dict[int, dict[Target, list[int]]] = {}
        self._shown: dict[int, float] = {}  # segment -> when its last partial came back (orders partial work)
        self._last_final_segment = -1  # segments up to this one have had their finals emitted
        self._final_chain: asyncio.Task | None = None  # the newest final; it awaits the ones before
        self._finals_in_flight = 0
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    # -- input --------------------------------------------------------------------------------------
    async def feed(self, data: bytes) -> None:
        """Add PCM bytes in the session's encoding; AudioError for bytes that are not valid audio."""
        if self._finished:
            raise RuntimeError(f"stream {self.stream!r} is finished")
        arrived = time.monotonic()  # a final's latency counts from the audio that closed its segment
        samples = self._resampler.process(pcm_to_float32(data, self.options.encoding))
        self._received += len(samples)
        self._handle(await in_vad_thread(self._segmenter.feed, samples), arrived)
        self._maybe_request_partial()
        if self._finals_in_flight > MAX_FINALS_IN_FLIGHT:
            # Audio arrives faster than the model finalizes it (a file sent as fast as possible, an
            # overloaded model): wait here, so the caller stops reading instead of queueing without bound.
            await asyncio.gather(asyncio.shield(self._final_chain), return_exceptions=True)

    async def finish(self) -> None:
        """End the stream: close the open utterance, then wait until every final is emitted.

        A partial still in flight is cancelled (the finals supersede it). Safe to call more than once
        and after the client is gone; nothing is emitted after it returns.
        """
        if not self._finished:
            self._finished = True
            arrived = time.monotonic()
            tail = self._resampler.process(np.zeros(0, dtype=np.float32), last=True)
            self._received += len(tail)
            events = await in_vad_thread(lambda: self._segmenter.feed(tail) + self._segmenter.flush())
            if self._partial is not None:
                self._partial.cancel()  # the utterance is closing: its final supersedes any partial
            self._handle(events, arrived)
        if self._final_chain is not None:
            await asyncio.shield(self._final_chain)  # a cancelled caller must not cancel the finals

    def set_targets(self, targets: list[str | None]) -> list[Target]:
        """Change the output languages of a live stream (MQTT control topic); returns them resolved.

        Raises UnsupportedTarget (and changes nothing) for a code or pair the model cannot do. The
        change applies from the next partial/final request: requests already queued keep their targets.
        """
        wanted = [parse_language(code, "target") for code in targets or [None]]
        resolved = resolve_targets(self._engine_info, self.targets[0].source_lang, wanted, self.options.prompt)
        self.targets = resolved
        self.options.targets = list(wanted)
        return resolved

    async def wait_partial(self) -> None:
        """Wait for the partial in flight, if any (tests and file replays use it to pace input)."""
        if self._partial is not None:
            await asyncio.gather(self._partial, return_exceptions=True)

    # -- VAD events ---------------------------------------------------------------------------------
    def _handle(self, events: list[VadEvent], arrived: float) -> None:
        for event in events:
            if isinstance(event, SpeechStarted):
                self._partial_mark = event.start
                self._emit({"type": "speech_start", "stream": self.stream, "segment": event.segment,
                            "start": _seconds(event.start)})
            elif isinstance(event, SpeechEnded):
                self._emit({"type": "speech_end", "stream": self.stream, "segment": event.segment,
                            "start": _seconds(event.start), "end": _seconds(event.end)})
                self._request_final(event, arrived)

    # -- partials -----------------------------------------------------------------------------------
    def _maybe_request_partial(self) -> None:
        segment = self._segmenter.open_segment
        if segment is None:
            return
        if self._partial is not None and not self._partial.done():
            return  # at most one in flight; the newer audio goes into the next one
        if self._received - self._partial_mark < self._chunk_samples:
            return
        self._partial_mark = self._received
        start = self._segmenter.open_start
        targets = list(self.targets)
        future = self._submit(self._segmenter.open_audio(), "partial", segment, targets)
        self._partial = asyncio.ensure_future(self._emit_partials(segment, start, targets, future))

    async def _emit_partials(self, segment: int, start: int, targets: list[Target], future: asyncio.Future) -> None:
        try:
            hypotheses = await future
        except Exception as error:  # partials are best effort; the final will report a real failure
            log.warning("stream %s: partial of segment %d failed: %s", self.stream, segment, error)
            return
        if hypotheses is None or segment <= self._last_final_segment:
            return  # superseded, or the final is out already and must stay the last word
        self._shown[segment] = time.monotonic()  # shown or dropped: this segment had its turn
        agreements = self._agreements.setdefault(segment, {})
        for hypothesis in hypotheses:  # keyed by target: set_targets() may change them between partials
            if self._dropped(hypothesis):
                continue  # noise so far, or a loop: show nothing (the final decides for good)
            agreement = agreements.setdefault(hypothesis.target, LocalAgreement())
            stable, unstable = agreement.update(hypothesis.text)
            self._emit({"type": "partial", "stream": self.stream, "segment": segment,
                        "target_lang": hypothesis.target.target_lang, "stable": stable,
                        "unstable": unstable, "start": _seconds(start)})

    # -- finals -------------------------------------------------------------------------------------
    def _request_final(self, ended: SpeechEnded, arrived: float) -> None:
        future = self._submit(ended.audio, "final", ended.segment, list(self.targets))
        previous = self._final_chain
        self._finals_in_flight += 1
        self._final_chain = asyncio.ensure_future(self._emit_finals(ended, arrived, future, previous))

    async def _emit_finals(
        self, ended: SpeechEnded, arrived: float, future: asyncio.Future, previous: asyncio.Task | None
    ) -> None:
        try:
            hypotheses = await future
        except Exception as error:
            hypotheses = error
        if previous is not None:  # finals go out in segment order; a failed one must not stop the rest
            await asyncio.gather(asyncio.shield(previous), return_exceptions=True)
        self._finals_in_flight -= 1
        self._last_final_segment = ended.segment
        self._agreements.pop(ended.segment, None)
        self._drafts.pop(ended.segment, None)
        self._shown.pop(ended.segment, None)
        if isinstance(hypotheses, Exception):
            log.error("stream %s: final of segment %d failed: %s", self.stream, ended.segment, hypotheses)
            self._emit({"type": "error", "code": DECODE_FAILED,
                        "message": f"stream {self.stream!r} segment {ended.segment}: {hypotheses}"})
            return
        latency_ms = round((time.monotonic() - arrived) * 1000)
        for hypothesis in hypotheses:
            event = {"type": "final", "stream": self.stream, "segment": ended.segment,
                     "source_lang": hypothesis.target.source_lang, "target_lang": hypothesis.target.target_lang,
                     "text": hypothesis.text, "start": _seconds(ended.start), "end": _seconds(ended.end),
                     "latency_ms": latency_ms, "window": hypothesis.window, "queued_ms": hypothesis.queued_ms,
                     "compute_ms": hypothesis.compute_ms, **_scores(hypothesis)}
            if hypothesis.words is not None:  # word timings, in stream seconds like start and end
                offset = samples_to_seconds(ended.start)
                event["words"] = [{"word": w["word"], "start": round(w["start"] + offset, 3),
                                   "end": round(w["end"] + offset, 3)} for w in hypothesis.words]
            reason = self._dropped(hypothesis)
            if reason:
                log.info("stream %s: segment %d dropped (%s): %r", self.stream, ended.segment, reason, hypothesis.text)
                event.update(text="", dropped=reason)
                event.pop("words", None)
            self._emit(event)

    def _dropped(self, hypothesis) -> str | None:
        return drop_reason(hypothesis.text, hypothesis.avg_logprob, hypothesis.no_speech_prob, self._guard)

    # -- plumbing -----------------------------------------------------------------------------------
    def _submit(self, audio: np.ndarray, kind: str, segment: int, targets: list[Target]) -> asyncio.Future:
        """Queue on the worker, drafting from the segment's latest partial; a stopped worker gives a
        failed future instead of breaking feed()."""
        try:
            return self._worker.submit(audio, targets, kind, key=self, draft_source=self._drafts.setdefault(segment, {}),
                                       shown=self._shown.get(segment) if kind == "partial" else None)
        except RuntimeError as error:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(error)
            return future

    def _emit(self, event: dict) -> None:
        # A failing consumer (e.g. a socket that just closed) must not stop the other events.
        try:
            self._emit_callback(event)
        except Exception:
            log.exception("stream %s: emitting a %s event failed", self.stream, event.get("type"))
