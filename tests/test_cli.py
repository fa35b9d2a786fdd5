"""`streamsed translate` as a user runs it: a real process, real audio, the real default model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.speech import RATE, espeak, silence, words

SAMPLE_TEXT = "Hello everyone. Thank you for coming to the meeting today."


def streamsed(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "streamsed", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamsed: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def two_utterances(tmp_path_factory):
    """English speech, a pause, more English speech: two VAD segments."""
    audio = np.concatenate([
        silence(0.5), espeak("Hello everyone.", "en", 130), silence(1.5),
        espeak("Thank you for coming to the meeting today.", "en", 130), silence(0.8),
    ])
    path = tmp_path_factory.mktemp("audio") / "two.wav"
    sf.write(path, audio, RATE, subtype="PCM_16")
    return path


@pytest.mark.slow
def test_translate_sample_prints_the_english_text():
    result = streamsed("translate", "samples/hello_en.wav")
    assert result.returncode == 0, result.stderr
    assert words(result.stdout) == words(SAMPLE_TEXT)


@pytest.mark.slow
def test_jsonl_times_are_the_decoded_segments(two_utterances):
    from streamsed.core.audio import load_audio_file
    from streamsed.core.segments import segment_audio
    from streamsed.engine.loading import load_engine

    result = streamsed("translate", str(two_utterances), "--format", "jsonl", "--source-lang", "en")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["segment"] for line in lines] == [0, 1]
    assert words(lines[0]["text"]) == ["hello", "everyone"]
    assert words(lines[1]["text"]) == words("Thank you for coming to the meeting today.")
    assert all(line["source_lang"] == "en" and line["target_lang"] == "en" for line in lines)
    segments = segment_audio(load_engine(device="cpu"), load_audio_file(two_utterances)[0])
    for line, segment in zip(lines, segments):
        assert line["start"] == round(segment.start / RATE, 3)
        assert line["end"] == round(segment.end / RATE, 3)
        assert set(line) == {"segment", "start", "end", "source_lang", "target_lang", "text", "avg_logprob",
                             "no_speech_prob", "words"}
        assert "".join(w["word"] for w in line["words"]) == line["text"]


@pytest.mark.slow
def test_vtt_and_srt_output(two_utterances):
    vtt = streamsed("translate", str(two_utterances), "--format", "vtt")
    assert vtt.returncode == 0, vtt.stderr
    assert vtt.stdout.startswith("WEBVTT\n\n0-0\n00:00:0")
    assert "\n1-0\n00:00:0" in vtt.stdout and "meeting today" in vtt.stdout
    srt = streamsed("translate", str(two_utterances), "--format", "srt")
    assert srt.stdout.startswith("1\n00:00:0") and "\n2\n00:00:0" in srt.stdout and "," in srt.stdout


def test_missing_file(tmp_path):
    assert_one_line_error(streamsed("translate", str(tmp_path / "nope.wav")), "not found")


def test_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n")
    assert_one_line_error(streamsed("translate", str(path)), "notes.wav")


def test_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.int16), RATE, subtype="PCM_16")
    assert_one_line_error(streamsed("translate", str(path)), "empty")


def test_stereo_audio(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.zeros((RATE, 2), dtype=np.int16), RATE, subtype="PCM_16")
    assert_one_line_error(streamsed("translate", str(path)), "2 channels", "sox")


def test_eight_bit_audio(tmp_path):
    path = tmp_path / "u8.wav"
    sf.write(path, np.zeros(RATE, dtype=np.float32), RATE, subtype="PCM_U8")
    assert_one_line_error(streamsed("translate", str(path)), "8-bit")


def test_malformed_language_code():
    assert_one_line_error(streamsed("translate", "samples/hello_en.wav", "--target-lang", "english!"), "english!")


@pytest.mark.slow
def test_language_the_model_does_not_know():
    assert_one_line_error(streamsed("translate", "samples/hello_en.wav", "--source-lang", "zz"), "'zz'", "not supported")


@pytest.mark.slow
def test_pair_whisper_cannot_produce():
    assert_one_line_error(
        streamsed("translate", "samples/hello_en.wav", "--source-lang", "en", "--target-lang", "de"), "into English"
    )


def test_hub_id_offline_names_the_fix(tmp_path):
    result = streamsed(
        "translate", "samples/hello_en.wav", "--model", "someorg/not-cached-model",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_line_error(result, "not in the local Hugging Face cache", "hf download someorg/not-cached-model")


def test_missing_local_model_dir(tmp_path):
    assert_one_line_error(
        streamsed("translate", "samples/hello_en.wav", "--model", str(tmp_path / "no-such-model")), "no-such-model"
    )


def test_broken_ctranslate2_model_dir(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00garbage")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert_one_line_error(streamsed("translate", "samples/hello_en.wav", "--model", str(tmp_path)), str(tmp_path))


@pytest.mark.slow
def test_faster_whisper_directory_as_model(tmp_path):
    """A CTranslate2/faster-whisper directory given as --model is converted once and served."""
    from streamsed.bench.decode import materialize_default_ct2

    ct2_dir = materialize_default_ct2()
    assert (ct2_dir / "model.bin").is_file()
    result = streamsed(
        "translate", "samples/hello_en.wav", "--model", str(ct2_dir),
        env={"STREAMSED_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    assert words(result.stdout) == words(SAMPLE_TEXT)
    assert list((tmp_path / "cache" / "converted").iterdir()), "the conversion is cached"
