"""Voice activity models: Silero VAD as the segmenter's ``FrameClassifier``.

Silero VAD (the ``silero-vad`` wheel ships the TorchScript file) is a small recurrent network that
gives each 32 ms frame (512 samples at 16 kHz, plus 64 samples of context) a speech probability. It
tells noise, tones and music from speech, which webrtcvad does not. Its TorchScript wrapper keeps the
recurrent state inside the module, so one module could serve one stream only; here the inner network
is called with the state passed explicitly, so one loaded model serves every stream, each
``SileroClassifier`` holding its own state and context.

The file is loaded by path: importing the ``silero_vad`` package would set torch's global thread count
to 1 and slow the speech model down. ``VAD_STATS`` counts the CPU time spent per second of audio
(``GET /v1/engine``, ``streamsed bench load``).
"""

from __future__ import annotations

import importlib.util
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.vad import FrameClassifier, VadConfig, WebrtcClassifier

__all__ = ["frame_classifier", "SileroClassifier", "silero_model", "VAD_STATS"]

SAMPLE_RATE = 16000
FRAME_SAMPLES = 512  # what the 16 kHz network takes per call
CONTEXT_SAMPLES = 64  # samples of the previous frame prepended to each one, as silero's wrapper does


@dataclass
class VadStats:
    """Process-wide: CPU seconds spent in Silero and seconds of audio it classified."""

    cpu_seconds: float = 0.0
    audio_seconds: float = 0.0

    @property
    def ms_per_audio_second(self) -> float | None:
        return 1000 * self.cpu_seconds / self.audio_seconds if self.audio_seconds else None


VAD_STATS = VadStats()
_lock = threading.Lock()
_model: torch.jit.ScriptModule | None = None


def silero_model() -> torch.jit.ScriptModule:
    """The 16 kHz Silero network, loaded once per process."""
    global _model
    with _lock:
        if _model is None:
            spec = importlib.util.find_spec("silero_vad")  # finds the package without importing it
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError("the silero-vad package is not installed: pip install silero-vad, "
                                   "or set [vad] engine = \"webrtc\"")
            path = Path(spec.submodule_search_locations[0]) / "data" / "silero_vad.jit"
            _model = torch.jit.load(str(path), map_location="cpu").eval()._model
    return _model


class SileroClassifier:
    """One stream's Silero state; ``classify`` runs the frames through the network in order."""

    frame_samples = FRAME_SAMPLES

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self._net = silero_model()
        self._state = torch.zeros(2, 1, 128)
        self._context = torch.zeros(1, CONTEXT_SAMPLES)

    def probabilities(self, frames: np.ndarray) -> list[float]:
        started = time.thread_time()
        out = []
        with torch.inference_mode():
            for frame in torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)):
                x = torch.cat([self._context, frame[None]], dim=1)
                prob, self._state = self._net(x, self._state)
                self._context = x[:, -CONTEXT_SAMPLES:]
                out.append(float(prob))
        VAD_STATS.cpu_seconds += time.thread_time() - started
        VAD_STATS.audio_seconds += len(frames) * FRAME_SAMPLES / SAMPLE_RATE
        return out

    def classify(self, frames: np.ndarray) -> list[bool]:
        return [p > self.threshold for p in self.probabilities(frames)]


def frame_classifier(vad: VadConfig) -> FrameClassifier:
    """The classifier ``[vad] engine`` names, fresh for one stream."""
    if vad.engine == "webrtc":
        return WebrtcClassifier(vad.aggressiveness, vad.frame_ms)
    return SileroClassifier(vad.threshold)
