"""Silero VAD as the segmenter's frame classifier, and the caption-sized segmentation rules.

No speech model here: these check which audio becomes segments at all, and where they are cut.
"""

import numpy as np
import pytest
import torch

from streamsed.core.vad import SpeechEnded, VadConfig, VadSegmenter
from streamsed.engine.voice import FRAME_SAMPLES, SileroClassifier, frame_classifier
from tests.speech import RATE, alsa_clip, espeak, not_speech, silence

SENTENCES = ["The train to Berlin leaves at nine.", "Please take your seats now.", "We will arrive in two hours.",
             "Coffee is served in the second car.", "Thank you for travelling with us.",
             "The weather in Berlin is sunny.", "Have a pleasant journey."]
VOICE_RECORDINGS = ["Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right",
                    "Side_Left", "Side_Right"]


def segments(audio, config=None, chunk=None):
    config = config or VadConfig()
    segmenter = VadSegmenter(config, classifier=frame_classifier(config))
    if chunk is None:
        events = segmenter.feed(audio)
    else:
        events = [e for start in range(0, len(audio), chunk) for e in segmenter.feed(audio[start:start + chunk])]
    return [e for e in events + segmenter.flush() if isinstance(e, SpeechEnded)]


def trimmed(text: str) -> np.ndarray:
    """espeak-ng speech without the silence espeak puts around it."""
    clip = espeak(text, "en", 160)
    loud = np.flatnonzero(np.abs(clip) > 0.01)
    return clip[loud[0]: loud[-1] + 1]


def joined(clips, gap_s):
    """Clips joined by ``gap_s`` of silence; returns the audio and each clip's (start, end) sample."""
    parts, spans, position = [silence(0.5)], [], int(0.5 * RATE)
    for clip in clips:
        spans.append((position, position + len(clip)))
        parts += [clip, silence(gap_s)]
        position += len(clip) + int(gap_s * RATE)
    return np.concatenate(parts + [silence(1.0)]), spans


def test_silero_probabilities_are_the_silero_package_s_own():
    audio = alsa_clip("Front_Center")
    frames = audio[: len(audio) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    ours = SileroClassifier(backend="jit").probabilities(frames)
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad  # sets torch's thread count to 1: streamsed never imports it

        model = load_silero_vad()
        with torch.inference_mode():
            theirs = [float(model(torch.from_numpy(frame.copy())[None], RATE)) for frame in frames]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert max(ours) > 0.9 and min(ours) < 0.1  # speech and the silence around it


def test_noise_tones_chords_hum_and_silence_give_no_segment():
    noises = not_speech()
    assert {name: len(segments(audio)) for name, audio in noises.items()} == dict.fromkeys(noises, 0)
    # webrtcvad, the lighter option, takes most of them for speech: that is why silero is the default.
    webrtc = VadConfig(engine="webrtc")
    assert sum(bool(segments(audio, webrtc)) for audio in noises.values()) >= 5


@pytest.mark.parametrize("name", VOICE_RECORDINGS)
def test_real_voice_recordings_are_one_segment_each(name):
    audio = alsa_clip(name)
    found = segments(np.concatenate([silence(0.5), audio, silence(1.0)]))
    assert len(found) == 1 and found[0].end - found[0].start > 0.5 * RATE


def test_chunking_does_not_change_silero_segments():
    audio, _ = joined([trimmed(s) for s in SENTENCES[:3]], 0.4)
    whole = [(s.start, s.end) for s in segments(audio)]
    assert whole and whole == [(s.start, s.end) for s in segments(audio, chunk=1234)]


def test_continuous_speech_with_short_pauses_gives_one_or_two_segments_per_sentence():
    clips = [trimmed(s) for s in SENTENCES]
    audio, spans = joined(clips, 0.25)
    found = segments(audio)
    middles = [(start + end) // 2 for start, end in spans]
    for segment in found:  # no segment holds the middle of two sentences
        assert sum(segment.start <= m < segment.end for m in middles) <= 1, (segment.start, segment.end)
    for start, end in spans:  # every sentence is in one or two segments
        assert 1 <= sum(s.start < end and start < s.end for s in found) <= 2
    # The old fixed 500 ms pause made one long segment of several sentences out of the same talk.
    fixed = segments(audio, VadConfig(end_silence_schedule=()))
    assert len(fixed) < len(SENTENCES) / 2


def test_a_forced_cut_falls_into_a_pause_not_into_a_word():
    # Pauses of 100 ms are too short to end an utterance, so only max_segment_s cuts this talk.
    clips = [trimmed(s) for s in SENTENCES * 2]
    audio, spans = joined(clips, 0.1)
    config = VadConfig(max_segment_s=6.0)
    found = segments(audio, config)
    assert len(found) >= 3
    for previous, following in zip(found, found[1:]):
        assert following.start == previous.end  # contiguous: nothing lost
    frame = FRAME_SAMPLES
    gaps = [(end, start) for (_, end), (start, _) in zip(spans, spans[1:])]
    forced = [s.end for s in found[:-1] if s.end - s.start > 5 * RATE]  # near the limit: a forced cut
    assert forced, "the talk must have needed forced cuts"
    for cut in forced:
        assert any(gap_start - frame <= cut <= gap_end + frame for gap_start, gap_end in gaps), cut / RATE
    assert all(s.end - s.start <= config.max_segment_s * RATE for s in found)


@pytest.mark.parametrize("name", ["Front_Center", "Rear_Left", "Noise"])
def test_the_onnx_sequence_model_gives_the_torchscript_probabilities(name):
    # Streamed in 100 ms pieces (3 frames, the last piece shorter), with state carried between calls.
    audio = alsa_clip(name) if name != "Noise" else not_speech()["alsa_noise"]
    frames = audio[: len(audio) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    onnx, jit = SileroClassifier(backend="onnx"), SileroClassifier(backend="jit")
    assert onnx.backend == "onnx" and SileroClassifier().backend == "onnx"  # the default with onnxruntime
    fast = [p for start in range(0, len(frames), 3) for p in onnx.probabilities(frames[start:start + 3])]
    slow = jit.probabilities(frames)
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    assert [p > 0.5 for p in fast] == [p > 0.5 for p in slow]


def test_the_onnx_model_is_silero_s_own_sequence_model():
    from streamsed.engine.voice import _data_file

    threads = torch.get_num_threads()
    try:
        from silero_vad.sequence_vad import SileroVADSequence  # the package sets torch's thread count to 1
    finally:
        torch.set_num_threads(threads)
    audio = alsa_clip("Side_Right")
    audio = audio[: len(audio) // FRAME_SAMPLES * FRAME_SAMPLES]
    theirs = SileroVADSequence(str(_data_file("silero_vad_16k_sequence.onnx"))).audio_forward(audio)
    classifier = SileroClassifier(backend="onnx")
    piece = 3 * FRAME_SAMPLES  # 96 ms, about what a 100 ms websocket chunk gives
    ours = [p for start in range(0, len(audio), piece) for p in
            classifier.probabilities(audio[start:start + piece].reshape(-1, FRAME_SAMPLES))]
    np.testing.assert_array_equal(np.float32(ours), theirs)
