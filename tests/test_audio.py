import numpy as np
import pytest
import soundfile as sf

from streamsed.core.audio import MODEL_SAMPLE_RATE, AudioError, StreamResampler, load_audio_file, pcm_to_float32


def sine(frequency: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)]


# --- pcm_to_float32 ---------------------------------------------------------

def test_s16le_bytes_scale_to_unit_range():
    pcm = np.array([0, 16384, -16384, 32767, -32768], dtype="<i2").tobytes()
    samples = pcm_to_float32(pcm)
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, [0.0, 0.5, -0.5, 32767 / 32768, -1.0])


def test_f32le_bytes_decode_and_clip():
    pcm = np.array([0.25, -0.75, 1.5, -2.0], dtype="<f4").tobytes()
    np.testing.assert_array_equal(pcm_to_float32(pcm, "pcm_f32le"), [0.25, -0.75, 1.0, -1.0])


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
def test_arrays_of_each_supported_dtype(dtype):
    source = np.array([0.5, -0.25, 0.0])
    array = (source * 32768).astype(dtype) if dtype is np.int16 else source.astype(dtype)
    samples = pcm_to_float32(array)
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, source.astype(np.float32))


@pytest.mark.parametrize(
    ("data", "encoding", "message"),
    [
        (b"\x00\x00", "pcm_mulaw", "unsupported encoding 'pcm_mulaw'"),
        (b"\x00\x00\x00", "pcm_s16le", "whole 2-byte samples, got 3 bytes"),
        (b"\x00" * 6, "pcm_f32le", "whole 4-byte samples, got 6 bytes"),
        (np.array([0.0, np.nan], dtype=np.float32), "pcm_s16le", "NaN or infinite"),
        (np.array([np.inf], dtype=np.float64), "pcm_s16le", "NaN or infinite"),
        (np.array([1, 2], dtype=np.int32), "pcm_s16le", "unsupported sample type int32"),
        (np.zeros((2, 2), dtype=np.float32), "pcm_s16le", "1-D array"),
        ([0.0, 0.1], "pcm_s16le", "got list"),
    ],
)
def test_pcm_conversion_errors(data, encoding, message):
    with pytest.raises(AudioError, match=message):
        pcm_to_float32(data, encoding)


# --- StreamResampler ---------------------------------------------------------

@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_resampled_stream_has_model_rate_length_and_keeps_frequency(rate):
    source = sine(440.0, rate)
    resampler = StreamResampler(rate)
    chunks = np.array_split(source, [1000, 1001, 7000, 20000])
    output = np.concatenate(
        [resampler.process(chunk) for chunk in chunks[:-1]] + [resampler.process(chunks[-1], last=True)]
    )
    assert output.dtype == np.float32
    assert abs(len(output) - MODEL_SAMPLE_RATE) <= 1
    assert peak_frequency(output, MODEL_SAMPLE_RATE) == pytest.approx(440.0, abs=2.0)


def test_resampler_passes_equal_rates_through_unchanged():
    source = sine(440.0, MODEL_SAMPLE_RATE, seconds=0.1)
    np.testing.assert_array_equal(StreamResampler(MODEL_SAMPLE_RATE).process(source), source)


@pytest.mark.parametrize("rate", [4000, 7999, 192001, 384000])
def test_resampler_rejects_rates_out_of_range(rate):
    with pytest.raises(AudioError, match=f"sample rate {rate} Hz is not supported"):
        StreamResampler(rate)


def test_resampler_rejects_integer_samples():
    with pytest.raises(AudioError, match="expected 1-D float32"):
        StreamResampler(44100).process(np.zeros(10, dtype=np.int16))


def test_resampler_refuses_input_after_last_chunk():
    resampler = StreamResampler(44100)
    resampler.process(np.zeros(100, dtype=np.float32), last=True)
    with pytest.raises(RuntimeError):
        resampler.process(np.zeros(100, dtype=np.float32))


# --- load_audio_file ---------------------------------------------------------

@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_load_resamples_to_model_rate(tmp_path, rate):
    path = tmp_path / "tone.wav"
    sf.write(path, sine(1000.0, rate), rate, subtype="PCM_16")
    samples, original_rate = load_audio_file(path)
    assert original_rate == rate
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - MODEL_SAMPLE_RATE) <= 1
    assert peak_frequency(samples, MODEL_SAMPLE_RATE) == pytest.approx(1000.0, abs=2.0)


def test_load_missing_file(tmp_path):
    with pytest.raises(AudioError, match="audio file not found"):
        load_audio_file(tmp_path / "missing.wav")


def test_load_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n")
    with pytest.raises(AudioError, match="is not a readable audio file"):
        load_audio_file(path)


def test_load_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match="contains no audio"):
        load_audio_file(path)


def test_load_stereo_names_the_fix(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.zeros((1600, 2), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="has 2 channels") as error:
        load_audio_file(path)
    assert "sox in.wav -c 1 out.wav" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("name", "subtype"), [("u8.wav", "PCM_U8"), ("s8.aiff", "PCM_S8")])
def test_load_eight_bit_pcm(tmp_path, name, subtype):
    path = tmp_path / name
    sf.write(path, sine(440.0, 16000, seconds=0.1), 16000, subtype=subtype)
    with pytest.raises(AudioError, match="8-bit PCM"):
        load_audio_file(path)


@pytest.mark.parametrize("rate", [6000, 384000])
def test_load_sample_rate_out_of_range(tmp_path, rate):
    path = tmp_path / "odd_rate.wav"
    sf.write(path, np.zeros(1000, dtype=np.float32), rate, subtype="PCM_16")
    with pytest.raises(AudioError, match=f"sample rate {rate} Hz is not supported"):
        load_audio_file(path)
