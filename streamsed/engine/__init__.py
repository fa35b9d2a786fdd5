"""The inference engine: the one place that owns the model and the device.

``families`` (per-architecture prompts and decoder steps), ``loading`` (model reference -> Engine,
device and dtype), ``ct2_whisper`` and ``default_model`` (the CTranslate2 Whisper converter and the
offline default model), ``engine`` (batched encode, KV-cached batched greedy decode), ``worker``
(the thread that batches requests of every stream), ``offline`` (the batch pipeline of files).

May import: ``streamsed.core``, torch, transformers. Never the daemon or the commands.

This package is the Python API; its names load torch only when first used::

    from streamsed.engine import Target, load_engine
    engine = load_engine("whisper-base")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.languages import Target, UnsupportedTarget
    from .engine import EncodedBatch, Engine, Hypothesis
    from .loading import ModelUnavailable, engine_from_model, load_engine
    from .worker import EngineWorker

_EXPORTS = {
    "Target": "..core.languages",
    "UnsupportedTarget": "..core.languages",
    "Engine": ".engine",
    "EncodedBatch": ".engine",
    "Hypothesis": ".engine",
    "load_engine": ".loading",
    "engine_from_model": ".loading",
    "ModelUnavailable": ".loading",
    "EngineWorker": ".worker",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy (PEP 562): importing streamsed.engine.families or .worker for types must not load torch.
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
