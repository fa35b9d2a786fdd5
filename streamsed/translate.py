"""Offline pipeline: audio -> VAD segments -> engine -> one result per (segment, target).

``streamsed translate`` runs this; the daemon runs the same segmenter and engine on live audio,
so a final there equals the offline output for the same segment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from .audio import MODEL_SAMPLE_RATE
from .captions import Caption, to_srt, to_vtt
from .model.families import Target, UnsupportedTarget
from .vad import SpeechEnded, VadConfig, VadSegmenter, samples_to_seconds

if TYPE_CHECKING:  # the pipeline only calls the engine; importing it would load torch here
    from .model.engine import Engine

_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")
FORMATS = ("text", "jsonl", "srt", "vtt")


@dataclass(frozen=True)
class SegmentResult:
    segment: int
    start: float  # seconds, millisecond precision
    end: float
    source_lang: str | None
    target_lang: str | None
    text: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def parse_language(code: str | None, role: str) -> str | None:
    """Normalize a user-given language code; reject what cannot be a code before any model work."""
    if code is None or code in ("", "auto"):
        return None
    code = code.strip().lower()
    if not _LANGUAGE_CODE.match(code):
        raise UnsupportedTarget(f"{role} language {code!r} is not an ISO 639 code like 'en' or 'de'")
    return code


def resolve_targets(engine: Engine, source_lang: str | None, target_langs: list[str | None]) -> list[Target]:
    """Targets with the model's defaults filled in, each checked against the model."""
    default = engine.default_target()
    source = source_lang or default.source_lang
    targets = [Target(source, target or source or default.target_lang) for target in target_langs or [None]]
    for target in targets:
        engine.check_target(target)
    return targets


def segmenter_for(engine: Engine, vad: VadConfig | None = None) -> VadSegmenter:
    """A VAD segmenter whose forced cut keeps every segment inside the model's window."""
    vad = vad or VadConfig()
    window = engine.max_window_s
    if window is not None and vad.max_segment_s > window:
        vad = VadConfig(**{**asdict(vad), "max_segment_s": window})
    return VadSegmenter(vad, input_rate=MODEL_SAMPLE_RATE)


def segment_audio(engine: Engine, audio: np.ndarray, vad: VadConfig | None = None) -> list[SpeechEnded]:
    segmenter = segmenter_for(engine, vad)
    events = segmenter.feed(audio) + segmenter.flush()
    return [event for event in events if isinstance(event, SpeechEnded)]


def translate_segments(
    engine: Engine, segments: list[SpeechEnded], targets: list[Target], batch_size: int = 8
) -> Iterator[SegmentResult]:
    """Decode segments in batches; results come in segment order, targets in the given order."""
    for first in range(0, len(segments), batch_size):
        batch = segments[first : first + batch_size]
        hypotheses = engine.transcribe([s.audio for s in batch], targets)
        for segment, per_target in zip(batch, hypotheses):
            for hyp in per_target:
                yield SegmentResult(
                    segment=segment.segment,
                    start=round(samples_to_seconds(segment.start), 3),
                    end=round(samples_to_seconds(segment.end), 3),
                    source_lang=hyp.target.source_lang,
                    target_lang=hyp.target.target_lang,
                    text=hyp.text,
                )


def format_results(results: list[SegmentResult], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(r.to_json() + "\n" for r in results)
    if fmt == "text":
        return "".join(r.text + "\n" for r in results)
    captions = [Caption(r.segment, r.start, r.end, r.text) for r in results]
    if fmt == "srt":
        return to_srt(captions)
    if fmt == "vtt":
        return to_vtt(captions)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
