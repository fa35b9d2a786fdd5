"""Daemon settings: built-in defaults < TOML file < ``STREAMSED_<SECTION>__<KEY>`` env vars < CLI flags.

``config/streamsed.toml`` documents every setting with its default. Every layer is checked the
same way: an unknown section or key, a value of the wrong type or an out-of-range value raises
``ConfigError`` whose message names the setting (and the file or variable it came from).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from .audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from .vad import VadConfig

ENV_PREFIX = "STREAMSED_"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and says what is expected."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_sessions: int = 16
    max_frame_bytes: int = 1_048_576
    ping_interval_s: float = 20.0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "whisper-base"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_utterances: int = 16


@dataclass(frozen=True)
class StreamingConfig:
    chunk_ms: int = 500
    source_lang: str = ""  # "" = the model's default (Whisper: English)
    targets: list[str] = field(default_factory=list)  # [] = transcribe (target = source)
    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    listener_queue: int = 64


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS = {f.name: f.default_factory for f in fields(Config)}


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config; ``overrides`` maps ``"section.key"`` to a value (None = not given)."""
    values: dict[str, dict[str, Any]] = {name: asdict(factory()) for name, factory in SECTIONS.items()}
    if path is not None:
        for (section, key), value in _read_toml(Path(path)).items():
            values[section][key] = _check_type(section, key, value, f"{path}: [{section}] {key}")
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, key = _known(*name[len(ENV_PREFIX):].lower().split("__", 1), where=f"environment variable {name}")
        values[section][key] = _parse_env(section, key, text, name)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = _known(*dotted.split(".", 1), where=f"override {dotted!r}")
        values[section][key] = _check_type(section, key, value, f"{section}.{key}")
    try:
        config = Config(**{name: SECTIONS[name](**v) for name, v in values.items()})
    except ValueError as error:  # VadConfig's own checks
        raise ConfigError(f"[vad] {error}") from None
    _validate(config)
    return config


def _read_toml(path: Path) -> dict[tuple[str, str], Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path} is not a readable TOML file ({error})") from None
    found = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section!r} must be a [section], one of {', '.join(SECTIONS)}")
        for key, value in table.items():
            found[_known(section, key, where=str(path))] = value
    return found


def _known(section: str, key: str = "", *, where: str) -> tuple[str, str]:
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r} (sections: {', '.join(SECTIONS)})")
    keys = [f.name for f in fields(SECTIONS[section]())]
    if key not in keys:
        raise ConfigError(f"{where}: unknown key {key!r} in [{section}] (keys: {', '.join(keys)})")
    return section, key


def _default(section: str, key: str) -> Any:
    return getattr(SECTIONS[section](), key)


def _check_type(section: str, key: str, value: Any, where: str) -> Any:
    default = _default(section, key)
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    if type(value) is not kind:
        raise ConfigError(f"{where} must be {_type_name(kind)}, got {value!r}")
    return value


def _parse_env(section: str, key: str, text: str, name: str) -> Any:
    kind = type(_default(section, key))
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("1", "true", "yes", "on")
        if kind is list:
            return [item.strip() for item in text.split(",") if item.strip()]
        return kind(text.strip()) if kind is not str else text
    except ValueError:
        raise ConfigError(f"environment variable {name} must be {_type_name(kind)}, got {text!r}") from None


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a comma-separated list"}[kind]


def _validate(config: Config) -> None:
    from .protocol import ENCODINGS, ProtocolError, parse_languages

    server, model, streaming = config.server, config.model, config.streaming
    checks = [
        (0 <= server.port <= 65535, "[server] port must be 0-65535 (0 = any free port)"),
        (server.max_sessions >= 1, "[server] max_sessions must be at least 1"),
        (server.max_frame_bytes >= 1024, "[server] max_frame_bytes must be at least 1024"),
        (server.ping_interval_s > 0, "[server] ping_interval_s must be positive"),
        (model.device in ("auto", "cpu", "cuda"), "[model] device must be auto, cpu or cuda"),
        (model.dtype in ("auto", "float32", "float16", "bfloat16"),
         "[model] dtype must be auto, float32, float16 or bfloat16"),
        (model.max_batch_utterances >= 1, "[model] max_batch_utterances must be at least 1"),
        (streaming.chunk_ms >= 100, "[streaming] chunk_ms must be at least 100"),
        (MIN_SAMPLE_RATE <= streaming.sample_rate <= MAX_SAMPLE_RATE,
         f"[streaming] sample_rate must be {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE}"),
        (streaming.encoding in ENCODINGS, f"[streaming] encoding must be one of {', '.join(ENCODINGS)}"),
        (streaming.listener_queue >= 1, "[streaming] listener_queue must be at least 1"),
        (config.logging.level.lower() in LOG_LEVELS, f"[logging] level must be one of {', '.join(LOG_LEVELS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        parse_languages(streaming.source_lang or None, streaming.targets)
    except ProtocolError as error:
        raise ConfigError(f"[streaming] {error.message}") from None


def with_overrides(config: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of ``config`` with some settings replaced, e.g. ``with_overrides(c, server={"port": 0})``."""
    return replace(config, **{name: replace(getattr(config, name), **values) for name, values in sections.items()})
