"""The offline pipeline's model half: decode VAD segments in batches (``streamsed translate``).

The daemon decodes the same segments one by one as they close; both go through ``Engine.transcribe``
on the same audio, so a live final equals the offline result for its segment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from ..core.captions import SegmentResult
from ..core.guard import GuardConfig, drop_reason
from ..core.languages import Target
from ..core.vad import SpeechEnded
from .engine import Engine, run_rows

__all__ = ["translate_segments"]

log = logging.getLogger(__name__)


def translate_segments(
    engine: Engine, segments: list[SpeechEnded], targets: list[Target], batch_size: int = 8, window: str = "exact",
    guard: GuardConfig | None = None,
) -> Iterator[SegmentResult]:
    """Decode segments in batches; results come in segment order, targets in the given order.

    ``window`` is the encoder window (``Engine.encode``); a live final equals this output when the
    daemon's ``final_window`` is the same setting. Hypotheses the hallucination ``guard`` rejects
    are left out (logged), as the daemon sends no text for them.
    """
    for first in range(0, len(segments), batch_size):
        batch = segments[first : first + batch_size]
        rows = [(u, t) for u in range(len(batch)) for t in targets]
        flat = run_rows(engine, [s.audio for s in batch], rows, window=window, word_timings=True)
        hypotheses = [flat[u * len(targets) : (u + 1) * len(targets)] for u in range(len(batch))]
        for segment, per_target in zip(batch, hypotheses):
            for hyp in per_target:
                reason = drop_reason(hyp.text, hyp.avg_logprob, hyp.no_speech_prob, guard)
                if reason:
                    log.info("segment %d dropped (%s): %r", segment.segment, reason, hyp.text)
                    continue
                yield SegmentResult.decoded(segment, hyp)
