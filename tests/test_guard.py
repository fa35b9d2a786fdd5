"""The hallucination guard's rules (openai-whisper's defaults), without a model."""

import pytest

from streamsed.core.guard import GuardConfig, compression_ratio, drop_reason


def test_no_speech_needs_both_a_high_no_speech_probability_and_a_low_logprob():
    assert drop_reason("I'm going to the next station.", -1.8, 0.79) == "no_speech"
    assert drop_reason("Front center.", -0.4, 0.02) is None
    assert drop_reason("you", -0.45, 0.93) is None  # sure of its word: kept, as openai-whisper keeps it
    assert drop_reason("maybe", -1.5, 0.3) is None  # unsure, but the model heard speech


def test_loops_are_dropped_as_repetition():
    loop = "the the the the the the the the the the the the the the the"
    assert compression_ratio(loop) > 2.4
    assert drop_reason(loop, -0.1, 0.0) == "repetition"
    assert compression_ratio("") == 0.0 and drop_reason("", None, None) is None


def test_models_without_scores_and_a_disabled_guard_drop_nothing():
    assert drop_reason("words", None, None) is None
    assert drop_reason("x x x x x x x x x x x x x x x x x x x x", -5, 0.99, GuardConfig(enabled=False)) is None


def test_thresholds_are_configurable_and_checked():
    strict = GuardConfig(no_speech_threshold=0.01, logprob_threshold=-0.3)
    assert drop_reason("Front center.", -0.4, 0.02, strict) == "no_speech"
    with pytest.raises(ValueError, match="no_speech_threshold"):
        GuardConfig(no_speech_threshold=1.5)
    with pytest.raises(ValueError, match="logprob_threshold"):
        GuardConfig(logprob_threshold=0.5)
