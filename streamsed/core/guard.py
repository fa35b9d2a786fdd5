"""Hallucination guard: decide from a hypothesis' own scores whether it is speech at all (sans-I/O).

Whisper invents sentences for noise, music and silence. openai-whisper skips such output with two
rules, whose default thresholds are used here:

* **no_speech**: the probability of ``<|nospeech|>`` after ``<|startoftranscript|>`` is above
  ``no_speech_threshold`` (0.6) *and* the average log-probability of the tokens is below
  ``logprob_threshold`` (-1.0): the model thought there was no speech and was unsure of its words;
* **repetition**: the text's gzip compression ratio is above ``compression_ratio_threshold`` (2.4):
  a decoder loop ("the the the ...").

A dropped segment produces a final with empty text and ``dropped`` set to the rule's name.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["GuardConfig", "drop_reason", "compression_ratio", "DROP_REASONS"]

DROP_REASONS = ("no_speech", "repetition")


@dataclass(frozen=True)
class GuardConfig:
    enabled: bool = True
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4

    def __post_init__(self) -> None:
        if not 0.0 <= self.no_speech_threshold <= 1.0:
            raise ValueError(f"no_speech_threshold must be between 0 and 1, got {self.no_speech_threshold}")
        if not self.logprob_threshold <= 0.0:
            raise ValueError(f"logprob_threshold must be 0 or negative, got {self.logprob_threshold}")
        if not self.compression_ratio_threshold > 0.0:
            raise ValueError(f"compression_ratio_threshold must be positive, got {self.compression_ratio_threshold}")


def compression_ratio(text: str) -> float:
    """len(text) / len(zlib(text)), as openai-whisper computes it (0 for empty text)."""
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


def drop_reason(text: str, avg_logprob: float | None, no_speech_prob: float | None,
                config: GuardConfig | None = None) -> str | None:
    """The rule that rejects this hypothesis ("no_speech" or "repetition"), or None to keep it.
    Scores a model does not give (None) never reject."""
    config = config or GuardConfig()
    if not config.enabled:
        return None
    if compression_ratio(text) > config.compression_ratio_threshold:
        return "repetition"
    if (no_speech_prob is not None and avg_logprob is not None
            and no_speech_prob > config.no_speech_threshold and avg_logprob < config.logprob_threshold):
        return "no_speech"
    return None
