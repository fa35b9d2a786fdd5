"""The OpenAI-compatible audio API: ``POST /v1/audio/transcriptions``, ``/v1/audio/translations``
and ``GET /v1/models``, served on the daemon's port (``http_requests`` takes these requests away
from websockets) so that apps written against OpenAI's API, and the official ``openai`` SDK, work
unchanged with ``base_url="http://HOST:PORT/v1"`` and the daemon's token as ``api_key``.

Requests are multipart forms as OpenAI defines them. Answers are OpenAI's: ``json``, ``text``,
``srt``, ``vtt`` and ``verbose_json`` bodies, and errors as ``{"error": {"message", "type",
"param", "code"}}`` with OpenAI's status codes. The decoding is ``streamsed translate``'s (same
segmenter, window and guard: ``file_jobs``), through the live engine worker at file priority.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..core.audio import MODEL_SAMPLE_RATE, AudioError, decode_audio_bytes
from ..core.captions import Caption, SegmentResult, to_srt, to_vtt
from ..core.guard import compression_ratio
from ..core.languages import UnsupportedTarget, context_text, parse_language, resolve_targets
from . import auth
from .file_jobs import transcribe_file
from .http_requests import HttpRequest, HttpResponse

if TYPE_CHECKING:
    from .server import Daemon

__all__ = ["OpenAiApi", "ApiError", "RESPONSE_FORMATS", "parse_multipart"]

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
TASKS = {"/v1/audio/transcriptions": "transcribe", "/v1/audio/translations": "translate"}
MODELS_PATH = "/v1/models"
NON_AUDIO_BODY_LIMIT = 64 * 1024
_CONTENT_TYPES = {"json": "application/json", "verbose_json": "application/json",
                  "text": "text/plain; charset=utf-8", "srt": "application/x-subrip; charset=utf-8",
                  "vtt": "text/vtt; charset=utf-8"}


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> HttpResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = [("WWW-Authenticate", 'Bearer realm="streamsed"')] if self.status == 401 else []
        return _json(self.status, body, headers)


def error_response(status: int, message: str) -> HttpResponse:
    """What ``http_requests`` answers by itself (413, 400) for an API path, in OpenAI's shape."""
    codes = {413: "request_too_large", 400: "bad_request"}
    return ApiError(status, message, code=codes.get(status)).response()


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # name -> (filename, content)

    def one(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name) or self.fields.get(f"{name}[]")
        return values[-1] if values else default

    def many(self, name: str) -> list[str]:
        return self.fields.get(f"{name}[]", []) + self.fields.get(name, [])


class OpenAiApi:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.jobs = 0  # files being decoded now
        self._running: set[asyncio.Future] = set()

    def cancel_jobs(self) -> None:
        """Daemon shutdown: every file job still decoding is answered 503."""
        for job in self._running:
            job.cancel()

    @property
    def config(self):
        return self.daemon.config.api

    def max_body(self, request: HttpRequest) -> int:
        if request.method == "POST" and request.path in TASKS:
            return int(self.config.max_upload_mb * 1_000_000)
        return NON_AUDIO_BODY_LIMIT

    async def handle(self, request: HttpRequest) -> HttpResponse:
        try:
            return await self._route(request)
        except ApiError as error:
            if error.status >= 500 or error.status == 429:
                log.warning("%s %s: %d %s", request.method, request.path, error.status, error.message)
            return error.response()

    async def _route(self, request: HttpRequest) -> HttpResponse:
        path = request.path
        if not (path in TASKS or path == MODELS_PATH or path.startswith(MODELS_PATH + "/")):
            raise ApiError(404 if request.method == "GET" else 405,
                           f"{request.method} {path} is not an endpoint of this server; its HTTP API takes POST "
                           f"on /v1/audio/transcriptions and /v1/audio/translations, GET on /v1/models",
                           code="unknown_url")
        if not self.config.enabled:
            raise ApiError(404, "the OpenAI-compatible API is disabled ([api] enabled = false)", code="unknown_url")
        self._check_token(request)
        wanted = "POST" if path in TASKS else "GET"
        if request.method != wanted:
            raise ApiError(405, f"{path} takes {wanted}, not {request.method}", code="method_not_allowed")
        if not self.daemon.ready:
            raise ApiError(503, "the model is still loading; retry when /readyz answers 200", kind="server_error",
                           code="not_ready")
        if path == MODELS_PATH:
            return _json(200, {"object": "list", "data": [self._model_card(n) for n in self._model_names()]})
        if path.startswith(MODELS_PATH + "/"):
            name = path[len(MODELS_PATH) + 1:]
            return _json(200, self._model_card(self._served(name)))
        return await self._audio(request, TASKS[path])

    def _check_token(self, request: HttpRequest) -> None:
        tokens = self.daemon.tokens
        if tokens and not auth.token_ok(tokens, auth.presented_token(request.headers, {})):
            raise ApiError(401, "Incorrect API key provided: use one of the daemon's tokens ([server] auth_tokens) "
                           "as the api_key / Authorization: Bearer header", code="invalid_api_key")

    # -- models -------------------------------------------------------------------------------------
    def _model_names(self) -> list[str]:
        return [self.daemon.engine.name, *self.config.model_aliases]

    def _served(self, name: str | None) -> str:
        if not name:
            raise ApiError(400, "you must provide a model parameter", param="model", code="missing_model")
        if name not in self._model_names():
            raise ApiError(404, f"The model '{name}' does not exist: this server serves "
                           f"{', '.join(repr(n) for n in self._model_names())}", param="model", code="model_not_found")
        return name

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": int(self.daemon.started_at), "owned_by": "streamsed"}

    # -- transcriptions and translations ------------------------------------------------------------
    async def _audio(self, request: HttpRequest, task: str) -> HttpResponse:
        form = await asyncio.to_thread(parse_multipart, request.headers.get("content-type", ""), request.body)
        self._served(form.one("model"))
        response_format = form.one("response_format", "json")
        if response_format not in RESPONSE_FORMATS:
            raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not "
                           f"{response_format!r}", param="response_format", code="invalid_value")
        _check_temperature(form.one("temperature"))
        if (form.one("stream") or "false").lower() not in ("false", "0"):
            raise ApiError(400, "streaming responses are not supported; live audio goes to ws /v1/stream",
                           param="stream", code="invalid_value")
        granularities = form.many("timestamp_granularities") or ["segment"]
        for value in granularities:
            if value not in GRANULARITIES:
                raise ApiError(400, f"timestamp_granularities[] takes segment and word, not {value!r}",
                               param="timestamp_granularities", code="invalid_value")
        if "word" in granularities and response_format != "verbose_json":
            raise ApiError(400, "word timestamps need response_format=verbose_json", param="timestamp_granularities",
                           code="invalid_value")
        targets = self._targets(form, task)
        if "file" not in form.files:
            raise ApiError(400, "you must provide a file (multipart field 'file')", param="file", code="missing_file")
        filename, content = form.files["file"]
        try:
            audio = await asyncio.to_thread(decode_audio_bytes, content, filename or "file")
        except AudioError as error:
            raise ApiError(400, str(error), param="file", code="invalid_file_format") from None
        if self.jobs >= self.config.max_jobs:
            raise ApiError(429, f"{self.jobs} files are being decoded, the most [api] max_jobs allows; retry when "
                           f"one is done", kind="rate_limit_error", code="too_many_jobs")
        self.jobs += 1
        started = time.monotonic()
        job = asyncio.ensure_future(transcribe_file(
            self.daemon.worker, self.daemon.engine, audio, targets, vad=self.daemon.config.vad,
            guard=self.daemon.config.guard, word_timings="word" in granularities))
        self._running.add(job)
        try:
            results = await asyncio.shield(job)
        except UnsupportedTarget as error:  # a detected language the target cannot be made from
            raise ApiError(400, str(error), param="language", code="unsupported_language") from None
        except asyncio.CancelledError:
            if not job.cancelled():  # the client left: this handler is cancelled, the job is not yet
                job.cancel()
                raise
            raise ApiError(503, "the daemon is shutting down; send the file again later", kind="server_error",
                           code="shutting_down") from None
        finally:
            self._running.discard(job)
            self.jobs -= 1
        log.info("%s of %s (%.1f s of audio): %d segments in %.1f s", task, filename, len(audio) / MODEL_SAMPLE_RATE,
                 len(results), time.monotonic() - started)
        return self._answer(results, response_format, task, len(audio) / MODEL_SAMPLE_RATE, granularities,
                            targets[0].source_lang)

    def _targets(self, form: Form, task: str):
        try:
            source = parse_language(form.one("language"), "source")
            prompt = context_text(form.one("prompt"), form.one("hotwords") or ", ".join(form.many("keywords")) or None)
            return resolve_targets(self.daemon.engine, source, ["en" if task == "translate" else None], prompt)
        except UnsupportedTarget as error:
            raise ApiError(400, str(error), param="language", code="unsupported_language") from None
        except ValueError as error:  # prompt too long or not text
            raise ApiError(400, str(error), param="prompt", code="invalid_value") from None

    def _answer(self, results: list[SegmentResult], fmt: str, task: str, duration: float, granularities: list[str],
                language: str | None) -> HttpResponse:
        text = " ".join(r.text for r in results).strip()
        content_type = _CONTENT_TYPES[fmt]
        if fmt == "json":
            return _json(200, {"text": text})
        if fmt == "text":
            return HttpResponse(200, (text + "\n").encode(), content_type)
        if fmt in ("srt", "vtt"):
            captions = [Caption(r.segment, r.start, r.end, r.text, r.words) for r in results]
            return HttpResponse(200, (to_srt(captions) if fmt == "srt" else to_vtt(captions)).encode(), content_type)
        detected = language or next((r.source_lang for r in results), None)
        body: dict = {"task": task, "language": self.daemon.engine.language_name(detected) or "",
                      "duration": round(duration, 3), "text": text}
        if "segment" in granularities:
            body["segments"] = [_segment(i, r) for i, r in enumerate(results)]
        if "word" in granularities:
            body["words"] = [w for r in results for w in (r.words or [])]
        return _json(200, body)


def _segment(index: int, result: SegmentResult) -> dict:
    return {"id": index, "seek": int(round(result.start * 100)), "start": result.start, "end": result.end,
            "text": " " + result.text if result.text else "", "temperature": 0.0,
            "avg_logprob": result.avg_logprob, "compression_ratio": round(compression_ratio(result.text), 4),
            "no_speech_prob": result.no_speech_prob}


def _check_temperature(value: str | None) -> None:
    if value is None:
        return
    try:
        temperature = float(value)
    except ValueError:
        temperature = math.nan
    if temperature != 0:
        raise ApiError(400, f"temperature must be 0: this server decodes greedily (got {value!r})",
                       param="temperature", code="invalid_value")


def parse_multipart(content_type: str, body: bytes) -> Form:
    """A multipart/form-data body as fields and files (python-multipart), or ApiError 400."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ApiError(400, "the request must be multipart/form-data with a file field, as OpenAI's API takes it",
                       code="invalid_content_type")
    form, part = Form(), {}

    def begin():
        part.clear()
        part.update(headers={}, data=[], field=b"", value=b"")

    def header_field(data, start, end):
        part["field"] += data[start:end]

    def header_value(data, start, end):
        part["value"] += data[start:end]

    def header_end():
        part["headers"][part["field"].decode("latin-1").lower()] = part["value"]
        part["field"], part["value"] = b"", b""

    def data(data, start, end):
        part["data"].append(data[start:end])

    def end():
        _, disposition = parse_options_header(part["headers"].get("content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        content = b"".join(part["data"])
        if b"filename" in disposition:
            form.files[name] = (disposition[b"filename"].decode("utf-8", "replace"), content)
        else:
            form.fields.setdefault(name, []).append(content.decode("utf-8", "replace"))

    parser = MultipartParser(boundary, {"on_part_begin": begin, "on_header_field": header_field,
                                        "on_header_value": header_value, "on_header_end": header_end,
                                        "on_part_data": data, "on_part_end": end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as error:
        raise ApiError(400, f"the multipart body is malformed ({error})", code="invalid_multipart") from None
    return form


def _json(status: int, body: dict, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return HttpResponse(status, json.dumps(body, ensure_ascii=False).encode(), "application/json", headers or [])
