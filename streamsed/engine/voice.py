"""Voice activity models: Silero VAD as the segmenter's ``FrameClassifier``.

Silero VAD is a small recurrent network that gives each 32 ms frame (512 samples at 16 kHz, plus 64
samples of context) a speech probability. It tells noise, tones and music from speech, which
webrtcvad does not. The state is passed explicitly, so one loaded model serves every stream, each
``SileroClassifier`` holding its own state and context.

Two forms of the same network, both shipped in the ``silero-vad`` wheel and loaded by path
(importing the ``silero_vad`` package would set torch's global thread count to 1):

- **ONNX "sequence" model** (``silero_vad_16k_sequence.onnx``, with onnxruntime; the default): one
  call per block of frames, one intra-op thread, the GIL released while it runs. Measured here it
  took about 1/4 of the TorchScript model's CPU time per second of audio, and its probabilities were
  within 3e-6 of it (no decision changed) on the ALSA voice recordings.
- **TorchScript** (``silero_vad.jit``), one call per frame, when onnxruntime is missing. Its per-frame
  Python loop holds the GIL; with four streams it cost the speech model's lanes about 30% of their
  throughput (README "Capacity").

``VAD_STATS`` counts the CPU time spent per second of audio (``GET /v1/engine``, ``streamsed bench load``).
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

__all__ = ["frame_classifier", "SileroClassifier", "silero_model", "silero_sequence_session", "VAD_STATS"]

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
_models: dict[str, object] = {}


def _data_file(name: str) -> Path:
    spec = importlib.util.find_spec("silero_vad")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed: pip install silero-vad, "
                           "or set [vad] engine = \"webrtc\"")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def silero_model() -> torch.jit.ScriptModule:
    """The 16 kHz Silero network as TorchScript, loaded once per process."""
    with _lock:
        if "jit" not in _models:
            _models["jit"] = torch.jit.load(str(_data_file("silero_vad.jit")), map_location="cpu").eval()._model
    return _models["jit"]


def silero_sequence_session():
    """Silero's block-of-frames ONNX model in one onnxruntime session (thread-safe), or None
    without onnxruntime (or with a silero-vad older than 6.2.2)."""
    with _lock:
        if "onnx" not in _models:
            path = _data_file("silero_vad_16k_sequence.onnx")  # in silero-vad 6.2.2 and later
            try:
                import onnxruntime
            except ImportError:
                _models["onnx"] = None
            else:
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = options.inter_op_num_threads = 1  # the cores are the speech model's
                _models["onnx"] = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                               providers=["CPUExecutionProvider"]) if path.exists() else None
    return _models["onnx"]


class SileroClassifier:
    """One stream's Silero state; ``classify`` runs the frames through the network in order.
    ``backend``: "onnx" (default when onnxruntime is installed) or "jit"."""

    frame_samples = FRAME_SAMPLES

    def __init__(self, threshold: float = 0.5, backend: str | None = None):
        self.threshold = threshold
        self._session = silero_sequence_session() if backend in (None, "onnx") else None
        if backend == "onnx" and self._session is None:
            raise RuntimeError("onnxruntime is not installed: pip install onnxruntime")
        self.backend = "onnx" if self._session is not None else "jit"
        if self.backend == "jit":
            self._net = silero_model()
            self._state = torch.zeros(2, 1, 128)
        self._hidden = np.zeros((1, 1, 128), dtype=np.float32)  # onnx: the LSTM's h and c
        self._cell = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)

    def probabilities(self, frames: np.ndarray) -> list[float]:
        started = time.thread_time()
        frames = np.ascontiguousarray(frames, dtype=np.float32).reshape(-1, FRAME_SAMPLES)
        if len(frames) == 0:
            return []
        # Each frame goes in with the last 64 samples before it, as silero's own wrappers do.
        contexts = np.concatenate([self._context[None], frames[:-1, -CONTEXT_SAMPLES:]])
        inputs = np.concatenate([contexts, frames], axis=1)
        self._context = frames[-1, -CONTEXT_SAMPLES:].copy()
        if self.backend == "onnx":
            probs, self._hidden, self._cell = self._session.run(
                ["speech_probs", "hn", "cn"], {"input": inputs, "h": self._hidden, "c": self._cell})
            out = [float(p) for p in np.reshape(probs, -1)]
        else:
            out = []
            with torch.inference_mode():
                for x in torch.from_numpy(inputs):
                    prob, self._state = self._net(x[None], self._state)
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
