"""The daemon's HTTP side for browsers: static pages, caption export, the websocket Origin policy.

Everything here is called from ``Daemon._http`` (websockets' ``process_request``) and returns a
ready ``Response`` or None (not ours). Nothing here awaits.

* Pages: ``/`` and ``/captions`` (viewer), ``/speak`` (speaker) and their assets under ``/web/``
  come from a fixed table of package files (``streamsed/web/``), never from a path on disk built
  from the request, so there is nothing to traverse.
* Export: ``GET /v1/streams/ID/captions.vtt|.srt|.jsonl[?target_lang=xx]`` renders the stream's
  finals so far (``CaptionsHub.finals``) in one target language; by default each utterance's first
  final, i.e. the first requested target (with auto-detected languages, whatever was detected).
  Cue ids are segment ids; when the stream was ingested more than once (segment numbers start
  again at 0), later sessions are numbered on after the previous session's last segment and their
  times shifted past its end, so ids stay unique and times never go back. ``GET /v1/streams``
  lists the known streams.
* Origin: browsers send ``Origin`` on every websocket handshake. Same-origin pages (the Origin's
  host:port equals the ``Host`` header), clients that send no Origin (non-browser programs) and
  the ``[server] allowed_origins`` list are accepted; any other Origin gets HTTP 403.
"""

from __future__ import annotations

import dataclasses
import email.utils
import ipaddress
import json
import re
import time
from http import HTTPStatus
from importlib import resources
from urllib.parse import unquote

from websockets.datastructures import Headers
from websockets.http11 import Response

from ..core.captions import Caption, to_srt, to_vtt
from ..core.languages import UnsupportedTarget, parse_language

HTML = "text/html; charset=utf-8"
JAVASCRIPT = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"

# URL path -> (file in streamsed/web/, content type). Only these files are ever served.
PAGES: dict[str, tuple[str, str]] = {
    "/": ("viewer.html", HTML),
    "/captions": ("viewer.html", HTML),
    "/speak": ("speak.html", HTML),
    "/web/style.css": ("style.css", CSS),
    "/web/captions.js": ("captions.js", JAVASCRIPT),
    "/web/viewer.js": ("viewer.js", JAVASCRIPT),
    "/web/speak.js": ("speak.js", JAVASCRIPT),
    "/web/speak-worklet.js": ("speak-worklet.js", JAVASCRIPT),
    "/web/icon.svg": ("icon.svg", "image/svg+xml"),
}

# Pages load only their own scripts and styles and talk only to this daemon.
PAGE_SECURITY = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
}

EXPORT_FORMATS = {
    "vtt": "text/vtt; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "jsonl": "application/x-ndjson; charset=utf-8",
}
STREAMS_PATH = "/v1/streams"
ENGINE_PATH = "/v1/engine"
_EXPORT = re.compile(r"^/v1/streams/([^/]+)/captions\.(vtt|srt|jsonl)$")
_STREAM_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ORIGIN = re.compile(r"^(https?)://([^/?#@\s]+)$")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def response(status: int, body: bytes | str, content_type: str, headers: dict[str, str] | None = None) -> Response:
    """A complete HTTP response (the connection closes after it, as websockets does for HTTP)."""
    status = HTTPStatus(status)
    data = body.encode() if isinstance(body, str) else body
    all_headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(data))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
    ])
    for key, value in (headers or {}).items():
        all_headers[key] = value
    return Response(status.value, status.phrase, all_headers, data)


def text(status: int, message: str) -> Response:
    return response(status, message + "\n", "text/plain; charset=utf-8")


def route(daemon, request) -> Response | None:
    """The response for a page, asset or export path; None for any other path."""
    from ..core.protocol import split_path

    path, query = split_path(request.path)
    if path in PAGES:
        return page(path)
    if path == STREAMS_PATH:
        return streams(daemon, request)
    if path == ENGINE_PATH:
        return engine_status(daemon)
    match = _EXPORT.match(path)
    if match:
        return export(daemon.hub, unquote(match.group(1)), match.group(2), query, cors(request, daemon.config))
    return None


def page(path: str) -> Response:
    name, content_type = PAGES[path]
    data = resources.files(__package__).joinpath("web", name).read_bytes()
    return response(HTTPStatus.OK, data, content_type, PAGE_SECURITY if content_type == HTML else None)


def streams(daemon, request) -> Response:
    """``GET /v1/streams``: every stream with finals or an ingest now, for the pages' stream picker."""
    listed = []
    for stream in sorted(set(daemon.hub.streams()) | set(daemon.sessions)):
        finals = daemon.hub.finals(stream)
        targets = list(dict.fromkeys(f["target_lang"] for f in finals))
        listed.append({"stream": stream, "live": stream in daemon.sessions, "finals": len(finals), "targets": targets})
    body = json.dumps({"streams": listed}, ensure_ascii=False) + "\n"
    return response(HTTPStatus.OK, body, "application/json; charset=utf-8", cors(request, daemon.config))


def engine_status(daemon) -> Response:
    """``GET /v1/engine``: the worker's counters (JSON), for ``streamsed bench load`` and operators."""
    worker = daemon.worker
    if worker is None:
        return text(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading")
    stats = dataclasses.asdict(worker.stats)
    body = {"model": daemon.engine.name, "device": str(daemon.engine.device), "windows": worker.windows,
            "final_deadline_ms": round(worker.final_deadline_s * 1000), "overloaded": worker.overloaded,
            "lanes": worker.lanes, "partial_dtype": worker.partial_dtype, "cost_s": worker.costs,
            "shed_streams": daemon.shed_streams, "dropped": daemon.hub.dropped,
            "vad": daemon.engine.vad_stats(), "uptime_s": round(time.monotonic() - worker.started_at, 3), **stats}
    return response(HTTPStatus.OK, json.dumps(body) + "\n", "application/json; charset=utf-8")


def metrics(daemon) -> Response:
    """``GET /metrics``: Prometheus text format (``daemon/metrics.py``)."""
    from .metrics import CONTENT_TYPE

    return response(HTTPStatus.OK, daemon.metrics.render(), CONTENT_TYPE)


# -- export -----------------------------------------------------------------------------------------
def export(hub, stream: str, fmt: str, query: dict[str, str], headers: dict[str, str] | None = None) -> Response:
    if not _STREAM_ID.match(stream):
        return text(HTTPStatus.NOT_FOUND, f"no stream {stream!r}: stream ids are 1-128 of A-Z a-z 0-9 . _ : -")
    unknown = set(query) - {"target_lang", "token"}
    if unknown:
        first = sorted(unknown)[0]
        return text(HTTPStatus.BAD_REQUEST, f"unknown query parameter {first!r}; the only one is target_lang")
    try:
        target_lang = parse_language(query.get("target_lang"), "target")
    except UnsupportedTarget as error:
        return text(HTTPStatus.BAD_REQUEST, str(error))
    if stream not in hub.streams():
        return text(HTTPStatus.NOT_FOUND, f"no stream {stream!r} (streams with captions: GET {STREAMS_PATH})")
    finals = hub.finals(stream)
    seen = list(dict.fromkeys(f["target_lang"] for f in finals))
    if target_lang is not None and seen and target_lang not in seen:
        return text(HTTPStatus.NOT_FOUND, f"stream {stream!r} has no {target_lang!r} captions; "
                                          f"its target languages: {', '.join(map(str, seen))}")
    body = render(export_rows(finals, target_lang), fmt)
    filename = f"{stream}.{target_lang}.{fmt}" if target_lang else f"{stream}.{fmt}"
    headers = {**(headers or {}), "Content-Disposition": f'inline; filename="{filename}"'}
    return response(HTTPStatus.OK, body, EXPORT_FORMATS[fmt], headers)


def export_rows(finals: list[dict], target_lang: str | None = None) -> list[dict]:
    """One row per utterance, shaped like ``translate --format jsonl``: its final in ``target_lang``,
    or by default its first final (the first requested target, whatever language Whisper detected).

    ``segment`` is the cue id: the segment id, numbered on across re-ingests of the stream, so an
    utterance has the same id in every language's file.
    """
    rows: list[dict] = []
    index_offset, time_offset = 0, 0.0
    session_segments, session_end = -1, 0.0  # the current session's highest segment id and latest end
    group: tuple | None = None  # (segment, start, end) of the utterance whose finals are coming in
    group_langs: set = set()
    for final in finals:
        key = (final["segment"], final["start"], final["end"])
        if group is not None and (final["segment"] < group[0] or (final["segment"] == group[0] and (
                key != group or final["target_lang"] in group_langs))):
            # Segment ids went back (or an utterance got a second final in one language): the stream
            # was ingested anew and numbers segments and times from 0 again.
            index_offset += session_segments + 1
            time_offset += session_end
            session_segments, session_end = -1, 0.0
            group = None
        first_of_utterance = key != group
        if first_of_utterance:
            group, group_langs = key, set()
        group_langs.add(final["target_lang"])
        session_segments = max(session_segments, final["segment"])
        session_end = max(session_end, final["end"])
        wanted = final["target_lang"] == target_lang if target_lang is not None else first_of_utterance
        if wanted:
            rows.append({
                "segment": index_offset + final["segment"],
                "start": round(time_offset + final["start"], 3),
                "end": round(time_offset + final["end"], 3),
                "source_lang": final.get("source_lang"),
                "target_lang": final["target_lang"],
                "text": final["text"],
                **({"words": [{**w, "start": round(time_offset + w["start"], 3), "end": round(time_offset + w["end"], 3)}
                              for w in final["words"]]} if final.get("words") is not None else {}),
            })
    return rows


def render(rows: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    captions = [Caption(row["segment"], row["start"], row["end"], row["text"], row.get("words")) for row in rows]
    return to_vtt(captions) if fmt == "vtt" else to_srt(captions)


# -- Origin policy ----------------------------------------------------------------------------------
def valid_origin_setting(origin: str) -> bool:
    """An ``allowed_origins`` entry: ``*`` or ``scheme://host[:port]`` (http or https, no path)."""
    return origin == "*" or bool(_ORIGIN.match(origin.strip().lower().rstrip("/")))


def _host_port(netloc: str, default_port: str) -> tuple[str, str]:
    host, port = netloc, default_port
    if netloc.startswith("["):  # [IPv6]:port
        end = netloc.find("]")
        host, rest = netloc[: end + 1], netloc[end + 1:]
        port = rest[1:] if rest.startswith(":") and rest[1:] else default_port
    elif ":" in netloc:
        host, port = netloc.rsplit(":", 1)
        port = port or default_port
    return host.lower(), port


def _is_address_literal(host: str) -> bool:
    """An IP literal or ``localhost``: names a DNS-rebinding page cannot make point at us."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return host == "localhost"


def same_origin(origin: str, host_header: str | None) -> bool:
    """True when ``origin``'s host and port are those of the ``Host`` header (the page came from here).

    Only for hosts given as an IP address or ``localhost``: a page at ``http://evil.example:8765``
    whose name was re-resolved to this machine (DNS rebinding) also sends ``Host: evil.example:8765``,
    so a DNS name is trusted only when listed in ``[server] allowed_origins``.
    """
    match = _ORIGIN.match(origin.lower())
    if not match or not host_header:
        return False
    default = _DEFAULT_PORTS[match.group(1)]
    page = _host_port(match.group(2), default)
    return page == _host_port(host_header.strip(), default) and _is_address_literal(page[0])


def origin_allowed(headers, allowed: list[str] | tuple[str, ...]) -> bool:
    """The websocket Origin policy (see the module doc)."""
    origins = headers.get_all("Origin")
    if not origins:
        return True  # not a browser: command-line clients, MQTT bridges, scripts
    if len(origins) > 1:
        return False
    origin = origins[0].strip().lower().rstrip("/")
    normalized = {entry.strip().lower().rstrip("/") for entry in allowed}
    if "*" in normalized or origin in normalized:
        return True
    hosts = headers.get_all("Host")
    return len(hosts) == 1 and same_origin(origin, hosts[0])


def forbidden_origin(headers) -> Response:
    origin = headers.get_all("Origin")
    return text(HTTPStatus.FORBIDDEN, f"origin {', '.join(origin)} may not open websockets here: only pages served "
                                      "by this daemon and [server] allowed_origins may")


def cors(request, config) -> dict[str, str]:
    """``Access-Control-Allow-Origin`` for a cross-origin fetch from an allowed origin (exports, stream list)."""
    origins = request.headers.get_all("Origin")
    if len(origins) != 1:
        return {}
    allowed = config.server.allowed_origins
    origin = origins[0].strip()
    normalized = {entry.strip().lower().rstrip("/") for entry in allowed}
    if "*" in normalized:
        return {"Access-Control-Allow-Origin": "*"}
    if origin.lower().rstrip("/") in normalized:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {}
