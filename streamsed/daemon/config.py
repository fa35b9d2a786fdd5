"""Daemon settings: built-in defaults < TOML file < ``STREAMSED_<SECTION>__<KEY>`` env vars < CLI flags.

``config/streamsed.toml`` documents every setting with its default. Every layer is checked the
same way: an unknown section or key, a value of the wrong type or an out-of-range value raises
``ConfigError`` whose message names the setting (and the file or variable it came from).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..core.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from ..core.guard import GuardConfig
from ..core.vad import VadConfig

ENV_PREFIX = "STREAMSED_"
WINDOWS = ("exact", "fast", "auto")  # the engine's encoder windows (streamsed.engine.engine.WINDOWS)
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
    # Overloaded this long: close the newest ingest stream (after its open utterance); 0 = never.
    shed_after_s: float = 10.0
    # Origins (scheme://host[:port]) whose pages may open the websockets, besides same-origin pages.
    allowed_origins: list[str] = field(default_factory=list)
    # Access tokens (streamsed/daemon/auth.py); [] and "" = no authentication.
    auth_tokens: list[str] = field(default_factory=list)
    auth_tokens_file: str = ""
    public_captions: bool = False  # with tokens: viewers, listeners and exports need none (ingest does)
    tls_cert: str = ""  # PEM files: serve https and wss on the same port
    tls_key: str = ""
    max_connections_per_client: int = 8  # open websockets per client address
    max_listeners: int = 256
    idle_timeout_s: float = 60.0  # an ingest session that sends no audio this long is closed; 0 = never


@dataclass(frozen=True)
class ModelConfig:
    name: str = "whisper-base"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_utterances: int = 16
    lanes: int = 0  # engine threads running batches in parallel; 0 = auto (2 on a multi-core CPU, 1 on CUDA)
    final_window: str = "auto"  # exact | fast | auto (fast on CPU, exact on CUDA)
    partial_window: str = "fast"
    partial_dtype: str = "auto"  # auto | same | int8: what partials run on (auto, float32 on a CPU: a segment's first on int8)
    window_margin_s: float = 5.0
    final_deadline_ms: float = 2000.0
    cuda_graphs: bool = True  # CUDA + Whisper: static KV cache, decoder step replayed as CUDA graphs


@dataclass(frozen=True)
class StreamingConfig:
    chunk_ms: int = 500
    source_lang: str = ""  # "" = the model's default (Whisper: English)
    targets: list[str] = field(default_factory=list)  # [] = transcribe (target = source)
    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    listener_queue: int = 64


@dataclass(frozen=True)
class ApiConfig:
    """The OpenAI-compatible audio API (streamsed/daemon/openai_api.py, README "OpenAI-compatible API")."""

    enabled: bool = True
    max_upload_mb: float = 25.0  # larger request bodies get 413 (OpenAI's own limit is 25 MB)
    max_jobs: int = 4  # files decoding at once; more get 429
    model_aliases: list[str] = field(default_factory=list)  # other names the served model answers to


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"


@dataclass(frozen=True)
class MqttConfig:
    """The MQTT publisher edge (streamsed/mqtt.py, docs/mqtt.md); "" means "derive the default"."""

    enabled: bool = False
    host: str = "localhost"
    port: int = 1883
    username: str = ""
    password: str = ""
    password_file: str = ""  # a file holding the password (first line); excludes password
    tls: bool = False
    tls_ca: str = ""  # "" = the system's CA certificates
    tls_cert: str = ""  # client certificate + key, for brokers that require one
    tls_key: str = ""
    client_id: str = ""  # "" = streamsed-<node_id>
    node_id: str = ""  # "" = this host's name
    topic_prefix: str = ""  # "" = streamsed/<node_id>
    qos_partial: int = 0
    qos_final: int = 1
    keepalive_s: int = 60
    queue_size: int = 10000
    flush_timeout_s: float = 5.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    ha_discovery: bool = True
    ha_prefix: str = "homeassistant"


@dataclass(frozen=True)
class MicrophoneConfig:
    """The daemon's microphone source (streamsed/microphone.py); see config/streamsed.toml."""

    enabled: bool = False
    device: str = ""  # "" = the default input; a device name (or a unique part of it) or an index like "2"
    sample_rate: int = 0  # 0 = the device's own default rate (resampled to 16 kHz with soxr)
    block_ms: int = 100
    queue_blocks: int = 50
    retry_s: float = 3.0
    stream: str = "mic"
    source_lang: str = ""  # "" = [streaming] source_lang
    targets: list[str] = field(default_factory=list)  # [] = [streaming] targets


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    microphone: MicrophoneConfig = field(default_factory=MicrophoneConfig)


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
    sections = {}
    for name, settings in values.items():
        try:
            sections[name] = SECTIONS[name](**settings)
        except ValueError as error:  # a section's own checks (VadConfig, GuardConfig)
            raise ConfigError(f"[{name}] {error}") from None
    config = Config(**sections)
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
    if kind is tuple:  # [vad] end_silence_schedule: [[seconds, ms], ...]
        if isinstance(value, (list, tuple)) and all(
                isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair) for pair in value):
            return tuple((float(at), int(ms)) for at, ms in value)
        raise ConfigError(f"{where} must be a list of [seconds, ms] pairs, got {value!r}")
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
        if kind is tuple:  # "5:200,10:100"
            pairs = [item.split(":") for item in text.split(",") if item.strip()]
            return tuple((float(at), int(ms)) for at, ms in pairs)
        return kind(text.strip()) if kind is not str else text
    except ValueError:
        raise ConfigError(f"environment variable {name} must be {_type_name(kind)}, got {text!r}") from None


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a comma-separated list", tuple: "seconds:ms pairs like 5:200,10:100"}[kind]


def _validate(config: Config) -> None:
    from ..core.protocol import ENCODINGS, ProtocolError, parse_languages
    from .web_routes import valid_origin_setting

    server, model, streaming = config.server, config.model, config.streaming
    checks = [
        (0 <= server.port <= 65535, "[server] port must be 0-65535 (0 = any free port)"),
        (server.max_sessions >= 1, "[server] max_sessions must be at least 1"),
        (server.shed_after_s >= 0, "[server] shed_after_s must be 0 (never shed) or positive"),
        (server.max_frame_bytes >= 1024, "[server] max_frame_bytes must be at least 1024"),
        (server.ping_interval_s > 0, "[server] ping_interval_s must be positive"),
        (bool(server.tls_cert) == bool(server.tls_key), "[server] tls_cert and tls_key go together"),
        (server.max_connections_per_client >= 1, "[server] max_connections_per_client must be at least 1"),
        (server.max_listeners >= 1, "[server] max_listeners must be at least 1"),
        (server.idle_timeout_s >= 0, "[server] idle_timeout_s must be 0 (never) or positive"),
        (all(valid_origin_setting(o) for o in server.allowed_origins),
         "[server] allowed_origins entries must be \"*\" or scheme://host[:port] (http or https, no path), "
         f"got {server.allowed_origins!r}"),
        (model.device in ("auto", "cpu", "cuda"), "[model] device must be auto, cpu or cuda"),
        (model.dtype in ("auto", "float32", "float16", "bfloat16", "int8"),
         "[model] dtype must be auto, float32, float16, bfloat16 or int8"),
        (model.max_batch_utterances >= 1, "[model] max_batch_utterances must be at least 1"),
        (0 <= model.lanes <= 16, "[model] lanes must be between 0 (auto) and 16"),
        (model.final_window in WINDOWS, "[model] final_window must be exact, fast or auto"),
        (model.partial_window in WINDOWS, "[model] partial_window must be exact, fast or auto"),
        (model.partial_dtype in ("auto", "same", "int8"), "[model] partial_dtype must be auto, same or int8"),
        (0 <= model.window_margin_s <= 30, "[model] window_margin_s must be between 0 and 30"),
        (model.final_deadline_ms > 0, "[model] final_deadline_ms must be positive"),
        (streaming.chunk_ms >= 100, "[streaming] chunk_ms must be at least 100"),
        (MIN_SAMPLE_RATE <= streaming.sample_rate <= MAX_SAMPLE_RATE,
         f"[streaming] sample_rate must be {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE}"),
        (streaming.encoding in ENCODINGS, f"[streaming] encoding must be one of {', '.join(ENCODINGS)}"),
        (streaming.listener_queue >= 1, "[streaming] listener_queue must be at least 1"),
        (config.logging.level.lower() in LOG_LEVELS, f"[logging] level must be one of {', '.join(LOG_LEVELS)}"),
        (config.api.max_upload_mb > 0, "[api] max_upload_mb must be positive"),
        (config.api.max_jobs >= 1, "[api] max_jobs must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        parse_languages(streaming.source_lang or None, streaming.targets)
    except ProtocolError as error:
        raise ConfigError(f"[streaming] {error.message}") from None
    _validate_mqtt(config.mqtt)
    _validate_microphone(config.microphone)


def _validate_microphone(mic: MicrophoneConfig) -> None:
    from ..core.protocol import _STREAM_ID, ProtocolError, parse_languages

    checks = [
        (mic.sample_rate == 0 or MIN_SAMPLE_RATE <= mic.sample_rate <= MAX_SAMPLE_RATE,
         f"[microphone] sample_rate must be 0 (the device's own) or {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE}"),
        (10 <= mic.block_ms <= 1000, "[microphone] block_ms must be 10-1000"),
        (mic.queue_blocks >= 1, "[microphone] queue_blocks must be at least 1"),
        (mic.retry_s > 0, "[microphone] retry_s must be positive"),
        (bool(_STREAM_ID.match(mic.stream)),
         f"[microphone] stream must be 1-128 of A-Z a-z 0-9 . _ : -, got {mic.stream!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        parse_languages(mic.source_lang or None, mic.targets)
    except ProtocolError as error:
        raise ConfigError(f"[microphone] {error.message}") from None


def _valid_topic_prefix(prefix: str) -> bool:
    """A topic (no wildcards) that more levels can follow: no empty level, no leading/trailing "/"."""
    levels = prefix.split("/")
    return all(level and not set(level) & set("+#\0") for level in levels)


def _validate_mqtt(mqtt: MqttConfig) -> None:
    import re

    node_id = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
    checks = [
        (bool(mqtt.host), "[mqtt] host must not be empty"),
        (1 <= mqtt.port <= 65535, "[mqtt] port must be 1-65535"),
        (not (mqtt.password and mqtt.password_file), "[mqtt] set password or password_file, not both"),
        (mqtt.username or not (mqtt.password or mqtt.password_file),
         "[mqtt] a password (or password_file) needs a username"),
        (mqtt.tls or not (mqtt.tls_ca or mqtt.tls_cert or mqtt.tls_key),
         "[mqtt] tls_ca, tls_cert and tls_key need tls = true"),
        (bool(mqtt.tls_cert) == bool(mqtt.tls_key), "[mqtt] tls_cert and tls_key go together"),
        (not mqtt.node_id or node_id.match(mqtt.node_id),
         f"[mqtt] node_id must be 1-64 of A-Z a-z 0-9 _ - (Home Assistant's rule), got {mqtt.node_id!r}"),
        (not mqtt.topic_prefix or _valid_topic_prefix(mqtt.topic_prefix),
         f"[mqtt] topic_prefix must be topic levels like streamsed/kitchen (no + # or empty levels), "
         f"got {mqtt.topic_prefix!r}"),
        (_valid_topic_prefix(mqtt.ha_prefix), f"[mqtt] ha_prefix must be a topic like homeassistant, got {mqtt.ha_prefix!r}"),
        (mqtt.qos_partial in (0, 1, 2) and mqtt.qos_final in (0, 1, 2), "[mqtt] qos_partial and qos_final must be 0, 1 or 2"),
        (5 <= mqtt.keepalive_s <= 65535, "[mqtt] keepalive_s must be 5-65535"),
        (mqtt.queue_size >= 10, "[mqtt] queue_size must be at least 10"),
        (mqtt.flush_timeout_s >= 0, "[mqtt] flush_timeout_s must not be negative"),
        (mqtt.reconnect_min_s > 0, "[mqtt] reconnect_min_s must be positive"),
        (mqtt.reconnect_max_s >= mqtt.reconnect_min_s, "[mqtt] reconnect_max_s must be at least reconnect_min_s"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def with_overrides(config: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of ``config`` with some settings replaced, e.g. ``with_overrides(c, server={"port": 0})``."""
    return replace(config, **{name: replace(getattr(config, name), **values) for name, values in sections.items()})
