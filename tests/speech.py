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


# sox synth recipes: noise colours, a tone, a chord, mains hum, amplitude-modulated brown noise.
NOISE_RECIPES = {
    "white": ["synth", "4", "whitenoise", "vol", "0.3"],
    "pink": ["synth", "4", "pinknoise", "vol", "0.3"],
    "brown": ["synth", "4", "brownnoise", "vol", "0.3"],
    "am_brown": ["synth", "4", "brownnoise", "tremolo", "3", "90", "vol", "0.5"],
    "tone_440": ["synth", "4", "sine", "440", "vol", "0.3"],
    "chord": ["synth", "4", "pluck", "C4", "pluck", "E4", "pluck", "G4", "vol", "0.4"],
    "hum_50": ["synth", "4", "sine", "50", "sine", "100", "vol", "0.3"],
}
ALSA = Path("/usr/share/sounds/alsa")


def sox_noise(name: str) -> np.ndarray:
    """One of NOISE_RECIPES, float32 mono at 16 kHz."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "noise.wav"
        subprocess.run(["sox", "-n", "-r", str(RATE), "-c", "1", str(path), *NOISE_RECIPES[name]], check=True)
        samples, _ = sf.read(path, dtype="float32")
    return samples.astype(np.float32)


def alsa_clip(name: str) -> np.ndarray:
    """A recording from alsa-utils (e.g. Front_Center, Noise), float32 mono at 16 kHz."""
    samples, rate = sf.read(ALSA / f"{name}.wav", dtype="float32")
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    return soxr.resample(samples, rate, RATE).astype(np.float32)


def not_speech() -> dict[str, np.ndarray]:
    """Everything that must never become a caption: sox noises, ALSA's Noise.wav, silence."""
    return {**{name: sox_noise(name) for name in NOISE_RECIPES}, "alsa_noise": alsa_clip("Noise"),
            "silence": silence(4.0)}
