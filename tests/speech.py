"""Real synthetic speech for tests: espeak-ng voices, resampled to 16 kHz with soxr."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

RATE = 16000


def espeak(text: str, voice: str = "en", speed: int = 150) -> np.ndarray:
    """Float32 mono speech at 16 kHz."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
        samples, rate = sf.read(path, dtype="float32")
    return soxr.resample(samples, rate, RATE).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing recognized text."""
    return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()
