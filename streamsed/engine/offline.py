"""The offline pipeline's model half: decode VAD segments in batches (``streamsed translate``).

The daemon decodes the same segments one by one as they close; both go through ``Engine.transcribe``
on the same audio, so a live final equals the offline result for its segment.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..core.captions import SegmentResult
from ..core.languages import Target
from ..core.vad import SpeechEnded, samples_to_seconds
from .engine import Engine

__all__ = ["translate_segments"]


def translate_segments(
    engine: Engine, segments: list[SpeechEnded], targets: list[Target], batch_size: int = 8, window: str = "exact"
) -> Iterator[SegmentResult]:
    """Decode segments in batches; results come in segment order, targets in the given order.

    ``window`` is the encoder window (``Engine.encode``); a live final equals this output when the
    daemon's ``final_window`` is the same setting.
    """
    for first in range(0, len(segments), batch_size):
        batch = segments[first : first + batch_size]
        hypotheses = engine.transcribe([s.audio for s in batch], targets, window=window)
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
