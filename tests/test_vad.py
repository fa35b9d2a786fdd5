import subprocess
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import soxr

from streamsed.core.audio import MODEL_SAMPLE_RATE, StreamResampler
from streamsed.core.vad import SpeechEnded, SpeechStarted, VadConfig, VadSegmenter, samples_to_seconds

RATE = MODEL_SAMPLE_RATE
# The webrtcvad state machine with a fixed end pause; Silero and the shortening pause: test_voice.py.
DEFAULTS = VadConfig(engine="webrtc", end_silence_schedule=(), max_segment_s=30.0)
PADDING = DEFAULTS.padding_ms * RATE // 1000
FRAME = DEFAULTS.frame_ms * RATE // 1000
END_SILENCE = DEFAULTS.end_silence_ms * RATE // 1000

PHRASES = {
    "greeting": "Hello there, how are you doing today?",
    "weather": "The weather is lovely this morning.",
    "short": "hi",
    "long": "This is a longer sentence that keeps on going without any pause at all "
            "so that we can test forced cuts",
}


@pytest.fixture(scope="module")
def speech_native(tmp_path_factory) -> dict[str, tuple[np.ndarray, int]]:
    """Real synthetic speech from espeak-ng, at espeak's own sample rate."""
    folder = tmp_path_factory.mktemp("espeak")
    clips = {}
    for name, text in PHRASES.items():
        path = folder / f"{name}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
        samples, rate = sf.read(path, dtype="float32")
        clips[name] = (samples, rate)
    return clips


@pytest.fixture(scope="module")
def speech(speech_native) -> dict[str, np.ndarray]:
    return {name: soxr.resample(samples, rate, RATE) for name, (samples, rate) in speech_native.items()}


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.float32)


def audible_span(samples: np.ndarray, offset: int = 0) -> tuple[int, int]:
    """First and one-past-last sample louder than -40 dBFS, shifted by ``offset``."""
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    return offset + loud[0], offset + loud[-1] + 1


def run(segmenter: VadSegmenter, stream: np.ndarray, chunk_sizes=None) -> list:
    if chunk_sizes is None:
        events = segmenter.feed(stream)
    else:
        events = []
        for chunk in np.split(stream, np.cumsum(chunk_sizes)):
            events += segmenter.feed(chunk)
    return events + segmenter.flush()


def ended(events: list) -> list[SpeechEnded]:
    return [event for event in events if isinstance(event, SpeechEnded)]


def two_utterances(speech) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """greeting + 1.5 s silence + weather, with the audible span of each in the stream."""
    parts = [silence(0.5), speech["greeting"], silence(1.5), speech["weather"], silence(1.0)]
    greeting_at = len(parts[0])
    weather_at = greeting_at + len(parts[1]) + len(parts[2])
    spans = [audible_span(speech["greeting"], greeting_at), audible_span(speech["weather"], weather_at)]
    return np.concatenate(parts), spans


def assert_brackets(segment: SpeechEnded, span: tuple[int, int], scale: float = 1.0) -> None:
    """The segment covers the audible speech, with no more context than pre-roll and end padding allow."""
    onset, offset = span
    slack = FRAME * scale + 2  # frame alignment, plus rounding when the span came from another rate
    assert onset - PADDING - slack <= segment.start <= onset
    # webrtcvad keeps voicing a little past the audible tail, so allow the end rule's reach as well.
    assert offset <= segment.end <= offset + PADDING + END_SILENCE + slack


# --- no speech -----------------------------------------------------------------

def test_silence_gives_no_events():
    assert run(VadSegmenter(DEFAULTS), silence(5.0)) == []


def test_low_white_noise_gives_no_events():
    noise = np.random.default_rng(0).normal(0.0, 0.01, 5 * RATE).astype(np.float32)  # about -40 dBFS
    assert run(VadSegmenter(DEFAULTS), noise) == []


def tone(frequency: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def test_a_tone_above_the_speech_band_is_not_speech():
    assert run(VadSegmenter(DEFAULTS), np.concatenate([silence(1.0), tone(6000, 2.0), silence(1.5)])) == []


def test_a_voiced_band_tone_burst_is_one_segment_around_the_burst():
    """webrtcvad calls a steady 3 kHz tone voiced; the segmenter must frame the burst like speech."""
    segments = ended(run(VadSegmenter(DEFAULTS), np.concatenate([silence(1.0), tone(3000, 2.0), silence(1.5)])))
    assert len(segments) == 1
    assert_brackets(segments[0], (RATE, 3 * RATE))


# --- real speech -----------------------------------------------------------------

def test_two_utterances_give_two_segments_around_the_speech(speech):
    stream, spans = two_utterances(speech)
    events = run(VadSegmenter(DEFAULTS), stream)

    segments = ended(events)
    assert [type(event) for event in events] == [SpeechStarted, SpeechEnded] * 2
    assert [segment.segment for segment in segments] == [0, 1]
    assert [(event.segment, event.start) for event in events[::2]] == [
        (segment.segment, segment.start) for segment in segments
    ]
    for segment, span in zip(segments, spans):
        assert_brackets(segment, span)
        assert segment.audio.dtype == np.float32
        np.testing.assert_array_equal(segment.audio, stream[segment.start:segment.end])


def test_random_chunk_sizes_give_the_same_segments(speech):
    stream, _ = two_utterances(speech)
    whole = ended(run(VadSegmenter(DEFAULTS), stream))

    rng = np.random.default_rng(1)
    chunk_sizes = []
    while sum(chunk_sizes) < len(stream):
        chunk_sizes.append(int(rng.integers(1, 3000)))
    chunked = ended(run(VadSegmenter(DEFAULTS), stream, chunk_sizes))

    assert chunked == whole  # compares segment numbers and offsets
    for chunked_segment, whole_segment in zip(chunked, whole):
        np.testing.assert_array_equal(chunked_segment.audio, whole_segment.audio)


@pytest.mark.parametrize(("input_rate", "dtype"), [(44100, np.float32), (8000, np.int16)])
def test_other_input_rates_report_offsets_in_the_16k_stream(speech_native, input_rate, dtype):
    def at_input_rate(name):
        samples, rate = speech_native[name]
        return soxr.resample(samples, rate, input_rate)

    parts = [silence(0.5, input_rate), at_input_rate("greeting"), silence(1.5, input_rate),
             at_input_rate("weather"), silence(1.0, input_rate)]
    weather_at = sum(len(part) for part in parts[:3])
    spans_at_input_rate = [audible_span(parts[1], len(parts[0])), audible_span(parts[3], weather_at)]
    stream = np.concatenate(parts)
    if dtype == np.int16:
        stream = np.round(stream * 32767).astype(np.int16)

    chunk_sizes = [input_rate // 10] * (len(stream) // (input_rate // 10))
    segments = ended(run(VadSegmenter(DEFAULTS, input_rate=input_rate), stream, chunk_sizes))

    # The stream the segmenter saw; soxr's streaming output does not depend on chunking.
    float_stream = stream.astype(np.float32) / 32768 if dtype == np.int16 else stream
    stream_16k = StreamResampler(input_rate).process(float_stream, last=True)
    scale = RATE / input_rate
    assert len(segments) == 2
    for segment, (onset, offset) in zip(segments, spans_at_input_rate):
        assert_brackets(segment, (round(onset * scale), round(offset * scale)), scale=1 + scale)
        np.testing.assert_array_equal(segment.audio, stream_16k[segment.start:segment.end])


def test_segment_ends_padding_after_the_speech_not_where_silence_was_detected(speech):
    stream, _ = two_utterances(speech)
    segmenter = VadSegmenter(DEFAULTS)
    for frame_end in range(FRAME, len(stream) + 1, FRAME):
        segments = ended(segmenter.feed(stream[frame_end - FRAME:frame_end]))
        if segments:
            break
    # The end is only known end_silence_ms after the speech stopped, but the
    # segment keeps just padding_ms of that silence.
    assert segments[0].end <= frame_end - (END_SILENCE - PADDING - FRAME)


def test_open_audio_tracks_the_open_utterance(speech):
    stream, _ = two_utterances(speech)
    segmenter = VadSegmenter(DEFAULTS)
    assert segmenter.open_audio() is None and segmenter.open_start is None

    seen_open = []
    for chunk in np.array_split(stream, len(stream) // 1600):
        events = segmenter.feed(chunk)
        if any(isinstance(event, SpeechEnded) for event in events):
            assert segmenter.open_audio() is None
        audio = segmenter.open_audio()
        if audio is not None:
            start = segmenter.open_start
            np.testing.assert_array_equal(audio, stream[start:start + len(audio)])
            seen_open.append((segmenter.open_segment, len(audio)))

    assert {segment for segment, _ in seen_open} == {0, 1}
    lengths_of_first = [length for segment, length in seen_open if segment == 0]
    assert lengths_of_first == sorted(lengths_of_first) and lengths_of_first[-1] > RATE


def test_flush_closes_the_open_utterance(speech):
    stream = np.concatenate([silence(0.5), speech["greeting"]])  # stream ends mid-speech
    segmenter = VadSegmenter(DEFAULTS)
    fed = segmenter.feed(stream)
    assert [type(event) for event in fed] == [SpeechStarted]

    flushed = segmenter.flush()
    assert [type(event) for event in flushed] == [SpeechEnded]
    segment = flushed[0]
    assert segment.start == fed[0].start
    assert audible_span(stream)[1] - FRAME < segment.end <= len(stream)
    np.testing.assert_array_equal(segment.audio, stream[segment.start:segment.end])
    assert segmenter.flush() == []
    with pytest.raises(RuntimeError):
        segmenter.feed(silence(0.1))


# --- forced cuts -----------------------------------------------------------------

def test_continuous_speech_is_cut_into_contiguous_segments_within_the_limit(speech):
    stream = np.concatenate([silence(0.5), speech["long"], silence(1.0)])
    config = replace(DEFAULTS, max_segment_s=1.0, cut_search_s=0.03)
    segments = ended(run(VadSegmenter(config), stream))

    onset, offset = audible_span(stream)
    assert len(segments) >= 5  # about 5.4 s of speech
    assert all(segment.end - segment.start <= RATE * config.max_segment_s for segment in segments)
    # With a one-frame search window the cut lands within a frame of the limit.
    assert RATE - RATE % FRAME - FRAME <= segments[0].end - segments[0].start <= RATE
    for previous, following in zip(segments, segments[1:]):
        assert following.start == previous.end
    assert segments[0].start <= onset and segments[-1].end >= offset
    assert [segment.segment for segment in segments] == list(range(len(segments)))
    np.testing.assert_array_equal(np.concatenate([segment.audio for segment in segments]),
                                  stream[segments[0].start:segments[-1].end])


# --- short utterances ------------------------------------------------------------

def test_min_speech_drops_a_short_utterance_without_using_a_segment_number(speech):
    stream = np.concatenate([silence(0.5), speech["short"], silence(1.0), speech["weather"], silence(1.0)])
    weather_span = audible_span(speech["weather"], len(stream) - RATE - len(speech["weather"]))

    events = run(VadSegmenter(replace(DEFAULTS, min_speech_ms=1000)), stream)

    assert [type(event) for event in events] == [SpeechStarted, SpeechEnded]
    assert events[0].segment == events[1].segment == 0
    assert_brackets(events[1], weather_span)


def test_the_same_short_utterance_is_kept_when_long_enough(speech):
    stream = np.concatenate([silence(0.5), speech["short"], silence(1.0)])
    segments = ended(run(VadSegmenter(replace(DEFAULTS, min_speech_ms=250)), stream))
    assert len(segments) == 1
    assert_brackets(segments[0], audible_span(speech["short"], RATE // 2))


def test_a_loud_click_is_not_speech():
    click = np.random.default_rng(2).uniform(-0.8, 0.8, RATE // 20).astype(np.float32)  # 50 ms burst
    stream = np.concatenate([silence(0.5), click, silence(1.0)])
    assert run(VadSegmenter(DEFAULTS), stream) == []


# --- configuration ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"aggressiveness": 4}, "aggressiveness"),
        ({"frame_ms": 25}, "frame_ms"),
        ({"padding_ms": 0}, "padding_ms"),
        ({"end_silence_ms": 5}, "end_silence_ms"),
        ({"start_ratio": 1.0}, "start_ratio"),
        ({"end_ratio": -0.1}, "end_ratio"),
        ({"min_speech_ms": -1}, "min_speech_ms"),
        ({"max_segment_s": 0.5}, "max_segment_s"),
    ],
)
def test_invalid_config_is_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        VadConfig(**settings)


def test_samples_to_seconds():
    assert samples_to_seconds(24000) == 1.5
