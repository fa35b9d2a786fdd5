"""Whole files through the live engine worker (the HTTP API's transcriptions and translations).

A file is cut by the same segmenter as ``streamsed translate`` and every live stream, fed to it in
chunks on the VAD thread (so a long file never holds up the live streams' voice detection for
more than one chunk), and its segments go to the worker as ``kind="file"`` requests: after live
finals and partials, a few at a time, so a one-hour file advances in the engine's spare time and
live finals keep their deadline. The results are ``translate``'s: same segments, same window
setting (``[model] final_window``), same hallucination guard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..core.audio import MODEL_SAMPLE_RATE
from ..core.captions import SegmentResult
from ..core.guard import GuardConfig, drop_reason
from ..core.languages import EngineInfo, Target
from ..core.segments import segmenter_for
from ..core.vad import SpeechEnded, VadConfig
from .session import in_vad_thread

if TYPE_CHECKING:
    from ..engine.worker import EngineWorker

__all__ = ["transcribe_file", "IN_FLIGHT", "VAD_CHUNK_S"]

log = logging.getLogger(__name__)

IN_FLIGHT = 2  # segments of one file queued at the worker at a time
VAD_CHUNK_S = 30  # seconds of audio per VAD call


async def transcribe_file(
    worker: EngineWorker, engine: EngineInfo, audio: np.ndarray, targets: Sequence[Target], *,
    vad: VadConfig | None = None, guard: GuardConfig | None = None, word_timings: bool = False,
) -> list[SegmentResult]:
    """Every kept result of ``audio`` (16 kHz float32), in segment order, targets in the given order."""
    segmenter = segmenter_for(engine, vad)
    pending: list[tuple[SpeechEnded, asyncio.Future]] = []
    results: list[SegmentResult] = []
    chunk = VAD_CHUNK_S * MODEL_SAMPLE_RATE
    try:
        for start in range(0, len(audio), chunk):
            last = start + chunk >= len(audio)
            piece = audio[start : start + chunk]
            events = await in_vad_thread(lambda p=piece, f=last: segmenter.feed(p) + (segmenter.flush() if f else []))
            for segment in (e for e in events if isinstance(e, SpeechEnded)):
                while len(pending) >= IN_FLIGHT:
                    results += await _collect(pending.pop(0), guard)
                future = worker.submit(segment.audio, list(targets), "file", word_timings=word_timings)
                pending.append((segment, future))
        while pending:
            results += await _collect(pending.pop(0), guard)
    finally:
        for _, future in pending:  # the client left or the daemon stops: give the engine time back
            future.cancel()
    return results


async def _collect(job: tuple[SpeechEnded, asyncio.Future], guard: GuardConfig | None) -> list[SegmentResult]:
    segment, future = job
    kept = []
    for hypothesis in await future:
        reason = drop_reason(hypothesis.text, hypothesis.avg_logprob, hypothesis.no_speech_prob, guard)
        if reason:
            log.info("file segment %d dropped (%s): %r", segment.segment, reason, hypothesis.text)
            continue
        kept.append(SegmentResult.decoded(segment, hypothesis))
    return kept
