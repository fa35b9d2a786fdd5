"""Audio input helpers: PCM decoding, resampling and file loading (sans-I/O apart from file reads).

Everything downstream (VAD, the model) works on float32 mono samples at
``MODEL_SAMPLE_RATE``; these helpers get any accepted input into that form and
turn unsupported input into an ``AudioError`` with a message a user can act on.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

MODEL_SAMPLE_RATE = 16000
"""Whisper-style models expect 16 kHz mono input."""

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000

# Byte layout of each raw PCM encoding a client may stream.
_PCM_ENCODINGS = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}

# 8-bit audio is too coarse for recognition, and usually means a wrong export setting.
_EIGHT_BIT_SUBTYPES = {"PCM_U8", "PCM_S8"}


class AudioError(ValueError):
    """Input audio that cannot be used; ``str(error)`` is a one-line, user-facing message."""


def check_sample_rate(rate: int) -> None:
    """Raise AudioError unless ``rate`` (Hz) is within the supported range."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"sample rate {rate} Hz is not supported; "
            f"expected {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )


def pcm_to_float32(data: bytes | np.ndarray, encoding: str = "pcm_s16le") -> np.ndarray:
    """Convert mono PCM to float32 samples in [-1, 1].

    ``data`` is either raw little-endian bytes in ``encoding`` ("pcm_s16le" or
    "pcm_f32le") or a 1-D numpy array of int16, float32 or float64 samples (the
    array's dtype wins; ``encoding`` only describes bytes). Float input is
    clipped to [-1, 1]; NaN or infinity is rejected rather than passed on to
    the model.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        samples = _decode_pcm_bytes(bytes(data), encoding)
    elif isinstance(data, np.ndarray):
        samples = data
    else:
        raise AudioError(f"expected PCM bytes or a numpy array, got {type(data).__name__}")

    if samples.ndim != 1:
        raise AudioError(f"expected mono audio as a 1-D array, got shape {samples.shape}")
    sample_type = samples.dtype.type
    if sample_type is np.int16:
        return samples.astype(np.float32) / np.float32(32768.0)
    if sample_type in (np.float32, np.float64):
        if not np.isfinite(samples).all():
            raise AudioError("audio contains NaN or infinite samples")
        return np.clip(samples, -1.0, 1.0).astype(np.float32)
    raise AudioError(f"unsupported sample type {samples.dtype}; expected int16, float32 or float64")


def _decode_pcm_bytes(data: bytes, encoding: str) -> np.ndarray:
    dtype = _PCM_ENCODINGS.get(encoding)
    if dtype is None:
        expected = ", ".join(_PCM_ENCODINGS)
        raise AudioError(f"unsupported encoding {encoding!r}; expected one of: {expected}")
    if len(data) % dtype.itemsize:
        raise AudioError(
            f"{encoding} data must be whole {dtype.itemsize}-byte samples, got {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype)


class StreamResampler:
    """Resample a float32 mono stream chunk by chunk, with state carried across chunks.

    The output is identical however the input is split into chunks, so callers
    can feed whatever sizes arrive from the network. Pass ``last=True`` with the
    final chunk to drain the filter's delay line; the stream is finished then.
    """

    def __init__(self, in_rate: int, out_rate: int = MODEL_SAMPLE_RATE):
        check_sample_rate(in_rate)
        check_sample_rate(out_rate)
        self.in_rate = in_rate
        self.out_rate = out_rate
        # Equal rates need no filtering, and skipping soxr keeps samples bit-exact.
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(
            in_rate, out_rate, 1, dtype="float32"
        )
        self._finished = False

    def process(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        """Resample the next chunk; returns however many output samples are ready."""
        if self._finished:
            raise RuntimeError("StreamResampler.process() called after last=True")
        if samples.dtype != np.float32 or samples.ndim != 1:
            raise AudioError(
                f"expected 1-D float32 samples, got {samples.dtype} with shape {samples.shape}"
            )
        self._finished = last
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(np.ascontiguousarray(samples), last=last)


def load_audio_file(path: str | PathLike[str]) -> tuple[np.ndarray, int]:
    """Read a mono audio file as float32 samples at MODEL_SAMPLE_RATE.

    Returns ``(samples, original_sample_rate)``. Raises AudioError for a missing
    or unreadable file, empty audio, more than one channel, 8-bit PCM and sample
    rates outside the supported range.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(path) as audio_file:
            _check_audio_file(path, audio_file)
            samples = audio_file.read(dtype="float32")
            rate = audio_file.samplerate
    except sf.LibsndfileError as error:
        reason = error.error_string.rstrip(".")
        raise AudioError(f"{path} is not a readable audio file ({reason})") from error
    if rate != MODEL_SAMPLE_RATE:
        samples = soxr.resample(samples, rate, MODEL_SAMPLE_RATE)
    return samples, rate


def decode_audio_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """An uploaded file (any format soundfile reads) as float32 mono at MODEL_SAMPLE_RATE.

    Unlike ``load_audio_file`` it mixes several channels down (an API client cannot be asked to
    run sox first); empty, 8-bit, unreadable files and rates out of range raise AudioError."""
    import io

    try:
        with sf.SoundFile(io.BytesIO(data)) as audio_file:
            if audio_file.channels != 1:
                samples = audio_file.read(dtype="float32", always_2d=True).mean(axis=1)
                audio_file.seek(0)
                _check_audio_file(Path(name), audio_file, channels=False)
            else:
                _check_audio_file(Path(name), audio_file)
                samples = audio_file.read(dtype="float32")
            rate = audio_file.samplerate
    except sf.LibsndfileError as error:
        raise AudioError(f"{name} is not an audio file soundfile can read ({error.error_string.rstrip('.')}): "
                         f"send WAV, FLAC, OGG/Vorbis, Opus or MP3") from None
    except (RuntimeError, TypeError) as error:  # soundfile's own "Error opening ..." for unknown formats
        raise AudioError(f"{name} is not an audio file soundfile can read ({error}): "
                         f"send WAV, FLAC, OGG/Vorbis, Opus or MP3") from None
    if rate != MODEL_SAMPLE_RATE:
        samples = soxr.resample(samples, rate, MODEL_SAMPLE_RATE)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _check_audio_file(path: Path, audio_file: sf.SoundFile, channels: bool = True) -> None:
    if channels and audio_file.channels != 1:
        raise AudioError(
            f"{path} has {audio_file.channels} channels: stereo/multichannel input is not "
            f"supported; mix down first, e.g. `sox in.wav -c 1 out.wav`"
        )
    if audio_file.subtype in _EIGHT_BIT_SUBTYPES:
        raise AudioError(
            f"{path} is 8-bit PCM, which is not supported; "
            f"convert to 16-bit first, e.g. `sox in.wav -b 16 out.wav`"
        )
    if audio_file.frames == 0:
        raise AudioError(f"{path} contains no audio")
    try:
        check_sample_rate(audio_file.samplerate)
    except AudioError as error:
        raise AudioError(f"{path}: {error}") from None
