"""Protocol v1 (sans-I/O): client messages, start options, server events, error and close codes.

``docs/protocol.md`` is the contract; this module is its executable form. Nothing here touches a
socket or the model: the server feeds it text and query strings and gets dicts or a
``ProtocolError`` carrying the error code to send.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from .languages import UnsupportedTarget, context_text, parse_language

VERSION = 1
STREAM_PATH = "/v1/stream"
CAPTIONS_PATH = "/v1/captions"
ENCODINGS = ("pcm_s16le", "pcm_f32le")
MESSAGE_TYPES = ("start", "keepalive", "stop")
START_FIELDS = ("stream", "sample_rate", "encoding", "source_lang", "targets", "prompt", "hotwords")
CAPTION_EVENTS = ("partial", "final")
_STREAM_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Close codes (RFC 6455 numbers).
CLOSE_NORMAL = 1000  # after "stop": every final was sent
CLOSE_GOING_AWAY = 1001  # daemon shutting down (finals of open utterances were sent first)
CLOSE_POLICY = 1008  # fatal client error; the reason names the error code
CLOSE_INTERNAL = 1011  # bug or engine failure
CLOSE_TRY_AGAIN = 1013  # too many sessions, the model is still loading, or the engine is overloaded

# code -> close code (None: recoverable, the connection stays open) and when it is sent.
ERRORS: dict[str, tuple[int | None, str]] = {
    "bad_json": (None, "a text frame is not a JSON object; the frame is ignored"),
    "unknown_type": (None, "a message type other than start, keepalive, stop; the message is ignored"),
    "already_started": (None, "a second start on one connection; it is ignored"),
    "bad_audio": (None, "a binary frame is not whole samples, or holds NaN/infinity; the frame is dropped"),
    "frame_too_large": (None, "a binary frame is larger than max_frame_bytes; the frame is dropped"),
    "decode_failed": (None, "the model failed on one segment's final; the stream goes on"),
    "bad_option": (CLOSE_POLICY, "an unknown option, or an option of the wrong type or form"),
    "unsupported_encoding": (CLOSE_POLICY, "encoding is not pcm_s16le or pcm_f32le"),
    "bad_sample_rate": (CLOSE_POLICY, f"sample_rate is not an integer in {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE}"),
    "unsupported_language": (CLOSE_POLICY, "a malformed language code, or a language/pair the model cannot do"),
    "stream_in_use": (CLOSE_POLICY, "another connection is already ingesting this stream id"),
    "too_many_sessions": (CLOSE_TRY_AGAIN, "the daemon is at max_sessions; retry later"),
    "not_ready": (CLOSE_TRY_AGAIN, "the model is still loading; retry when /readyz says 200"),
    "too_many_listeners": (CLOSE_TRY_AGAIN, "the daemon is serving its maximum of max_listeners listeners"),
    "idle_timeout": (CLOSE_POLICY, "no audio for idle_timeout_s: the session is finished and closed"),
    "overloaded": (CLOSE_TRY_AGAIN, "finals are behind their deadline; new streams are refused until they catch up"),
    "internal": (CLOSE_INTERNAL, "an unexpected server failure (a bug); the session ends"),
}


class ProtocolError(Exception):
    """A client error to report as an ``error`` event; ``close_code`` is None when recoverable."""

    def __init__(self, code: str, message: str):
        if code not in ERRORS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def close_code(self) -> int | None:
        return ERRORS[self.code][0]

    @property
    def fatal(self) -> bool:
        return self.close_code is not None

    def event(self) -> dict:
        return error_event(self.code, self.message)


@dataclass(frozen=True)
class StartOptions:
    stream: str
    sample_rate: int
    encoding: str
    source_lang: str | None  # None = the model's default
    targets: list[str | None]  # None = same as the source (transcribe)
    prompt: str | None = None  # hotwords + prompt: previous-text context for every target (Whisper)


def parse_client_message(text: str) -> dict:
    """A client text frame as a dict with a known ``type``, or ProtocolError."""
    try:
        message = json.loads(text)
    except ValueError as error:
        raise ProtocolError("bad_json", f"text frame is not valid JSON ({error})") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_json", f"a message must be a JSON object, got {type(message).__name__}")
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        expected = ", ".join(MESSAGE_TYPES)
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected one of {expected}")
    return message


def split_path(path: str) -> tuple[str, dict[str, str]]:
    """``/v1/stream?stream=a&targets=de,en`` -> ("/v1/stream", {"stream": "a", "targets": "de,en"})."""
    parts = urlsplit(path)
    return parts.path.rstrip("/") or "/", dict(parse_qsl(parts.query, keep_blank_values=True))


TOKEN_PARAMETER = "token"  # ?token=: the access token (daemon/auth.py), checked before any option


def start_options(query: Mapping[str, str], message: Mapping[str, Any] | None, defaults) -> StartOptions:
    """Merge config ``defaults`` (a StreamingConfig) < query parameters < the start message, validated."""
    given: dict[str, Any] = {}
    for source, values in (("query parameter", query), ("start field", message or {})):
        for key, value in values.items():
            if (key == "type" and source == "start field") or (key == TOKEN_PARAMETER and source == "query parameter"):
                continue
            if key not in START_FIELDS:
                raise ProtocolError("bad_option", f"unknown {source} {key!r}; options are {', '.join(START_FIELDS)}")
            given[key] = value
    stream = given.get("stream") or f"s-{uuid.uuid4().hex[:12]}"
    if not isinstance(stream, str) or not _STREAM_ID.match(stream):
        raise ProtocolError("bad_option", f"stream must be 1-128 characters of A-Z a-z 0-9 . _ : -, got {stream!r}")
    encoding = given.get("encoding", defaults.encoding)
    if encoding not in ENCODINGS:
        expected = ", ".join(ENCODINGS)
        raise ProtocolError("unsupported_encoding", f"encoding {encoding!r} is not supported; use one of {expected}")
    source, targets = parse_languages(
        given.get("source_lang", defaults.source_lang or None), given.get("targets", defaults.targets)
    )
    try:
        prompt = context_text(given.get("prompt"), given.get("hotwords"))
    except ValueError as error:
        raise ProtocolError("bad_option", str(error)) from None
    return StartOptions(stream, _sample_rate(given.get("sample_rate", defaults.sample_rate)), encoding, source, targets,
                        prompt)


def _sample_rate(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("bad_sample_rate", f"sample_rate must be an integer number of Hz, got {value!r}")
    if not MIN_SAMPLE_RATE <= value <= MAX_SAMPLE_RATE:
        expected = f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        raise ProtocolError("bad_sample_rate", f"sample rate {value} Hz is not supported; expected {expected}")
    return value


def parse_languages(source: Any, targets: Any) -> tuple[str | None, list[str | None]]:
    """Check the form of ``source_lang`` and ``targets`` (list, or comma-separated string)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, list) or not all(t is None or isinstance(t, str) for t in targets):
        raise ProtocolError("bad_option", f"targets must be a list of language codes, got {targets!r}")
    if source is not None and not isinstance(source, str):
        raise ProtocolError("bad_option", f"source_lang must be a language code or null, got {source!r}")
    try:
        return parse_language(source, "source"), [parse_language(t, "target") for t in targets] or [None]
    except UnsupportedTarget as error:
        raise ProtocolError("unsupported_language", str(error)) from None


def caption_filter(query: Mapping[str, str]) -> tuple[str, str | None]:
    """The (stream, target_lang) a captions listener asks for."""
    unknown = set(query) - {"stream", "target_lang", TOKEN_PARAMETER}
    if unknown:
        raise ProtocolError("bad_option", f"unknown query parameter {sorted(unknown)[0]!r}; use stream and target_lang")
    stream = query.get("stream", "")
    if not _STREAM_ID.match(stream):
        raise ProtocolError("bad_option", f"captions need ?stream=ID (1-128 of A-Z a-z 0-9 . _ : -), got {stream!r}")
    try:
        return stream, parse_language(query.get("target_lang"), "target")
    except UnsupportedTarget as error:
        raise ProtocolError("unsupported_language", str(error)) from None


# -- server events -------------------------------------------------------------------------------
def ready_event(options: StartOptions, session: str, model: str, source_lang: str | None, targets: list) -> dict:
    return {
        "type": "ready", "stream": options.stream, "session": session, "model": model,
        "sample_rate": options.sample_rate, "source_lang": source_lang, "targets": list(targets),
        "prompt": options.prompt,
    }


def subscribed_event(stream: str, target_lang: str | None) -> dict:
    return {"type": "subscribed", "stream": stream, "target_lang": target_lang}


def error_event(code: str, message: str) -> dict:
    return {"type": "error", "code": code, "message": message}


def close_reason(code: str, message: str) -> str:
    """A close frame reason: the error code plus as much message as fits in 123 bytes."""
    reason = f"{code}: {message}".encode()
    return reason.decode() if len(reason) <= 123 else reason[:120].decode(errors="ignore") + "..."


def encode(event: dict) -> str:
    return json.dumps(event, ensure_ascii=False)
