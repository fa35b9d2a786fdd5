"""Cutting audio into the segments a model decodes, the same way offline and live (sans-I/O).

``streamsed translate`` and every live session build their segmenter here, so a live final is
decoded from exactly the samples the offline pipeline would decode.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .audio import MODEL_SAMPLE_RATE
from .languages import EngineInfo
from .vad import SpeechEnded, VadConfig, VadSegmenter

__all__ = ["segmenter_for", "segment_audio"]


def segmenter_for(engine: EngineInfo, vad: VadConfig | None = None) -> VadSegmenter:
    """A VAD segmenter whose forced cut keeps every segment inside the model's window; its frame
    classifier (Silero or webrtcvad, ``[vad] engine``) comes from the engine."""
    vad = vad or VadConfig()
    window = engine.max_window_s
    if window is not None and vad.max_segment_s > window:
        vad = VadConfig(**{**asdict(vad), "max_segment_s": window, "cut_search_s": min(vad.cut_search_s, window)})
    return VadSegmenter(vad, input_rate=MODEL_SAMPLE_RATE, classifier=engine.frame_classifier(vad))


def segment_audio(engine: EngineInfo, audio: np.ndarray, vad: VadConfig | None = None) -> list[SpeechEnded]:
    """Every speech segment of a whole recording, in order."""
    segmenter = segmenter_for(engine, vad)
    events = segmenter.feed(audio) + segmenter.flush()
    return [event for event in events if isinstance(event, SpeechEnded)]
