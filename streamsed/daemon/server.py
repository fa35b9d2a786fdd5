"""The daemon: websockets + HTTP on one port, one StreamSession per ingest connection.

Endpoints (see docs/protocol.md): ``GET /healthz``, ``GET /readyz``, ``ws /v1/stream`` (ingest)
and ``ws /v1/captions?stream=ID[&target_lang=xx]`` (listeners). The model loads in a thread while
the port already answers /healthz; ingest connections are refused with ``not_ready`` until then.
Browser pages, caption export and the websocket Origin check are in ``web_routes``.

Per ingest connection three tasks cooperate, so the socket is always read (pings are answered
however busy the model is) and events keep their order:

* the reader puts every frame into the connection's inbox;
* the processor takes frames in order: protocol messages, ``session.feed`` for audio;
* the sender writes the session's events (and errors) from the outbox to the client.

Session events also go to the CaptionsHub, which never waits for a listener. Whatever way an
ingest connection ends (stop, client gone, daemon shutting down), the session is finished so
the finals of its open utterance reach the listeners.

Other edges (MQTT publisher, microphone source) plug in as ``Edge`` objects: started once the
model is ready, stopped after the websocket sessions have finished, in reverse order of
registration — register sinks (MQTT) before sources (microphone) so a source's last finals
still reach the sinks. Live sessions of every kind are in ``Daemon.sessions`` by stream id.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import signal
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ..core import protocol
from ..core.audio import AudioError
from ..core.languages import UnsupportedTarget, resolve_targets
from ..core.protocol import ProtocolError, close_reason, encode, error_event
from . import auth, openai_api, web_routes
from .captions_hub import CaptionsHub
from .config import Config, ConfigError
from .http_requests import connection_class
from .metrics import Metrics
from .session import SessionOptions, StreamSession

if TYPE_CHECKING:  # the daemon edge never touches torch itself: the worker and engine do
    from ..engine.engine import Engine
    from ..engine.worker import EngineWorker

log = logging.getLogger(__name__)

MAX_QUEUED_FRAMES = 512  # frames read but not processed yet; the reader waits beyond this
SHED_ERROR = ProtocolError("overloaded", "the engine cannot keep up with every stream: this one, the newest, is "
                           "closed after its open utterance is finalized; retry later")
_GONE, _SHUTDOWN, _SHED = object(), object(), object()  # inbox markers: client gone / daemon stopping / load shed


class Edge(Protocol):
    """A replaceable I/O edge of the daemon (it knows nothing of torch)."""

    async def start(self, daemon: "Daemon") -> None: ...

    async def stop(self) -> None: ...


class Daemon:
    """Serve ``config``; pass ``engine`` (tests) or ``engine_loader`` to skip loading config.model."""

    def __init__(
        self, config: Config, engine: Engine | None = None, *, engine_loader: Callable[[], Engine] | None = None
    ):
        self.config = config
        self.engine = engine
        self.hub = CaptionsHub(config.streaming.listener_queue)
        self.worker: EngineWorker | None = None
        self.load_error: BaseException | None = None
        self._loader = engine_loader or self._load_configured_model
        self._ready = asyncio.Event()
        self._ingests: set[_Ingest] = set()
        self._server: Server | None = None
        self._load_task: asyncio.Task | None = None
        self._stopping = False
        self._shedder: asyncio.Task | None = None
        self._admitted = 0  # ingest connections admitted so far: their order decides which is shed first
        self.shed_streams = 0  # ingest sessions closed to bring an overloaded engine back within its deadline
        self.edges: list[Edge] = []
        self.sessions: dict[str, StreamSession] = {}  # live sessions by stream id (any source)
        try:
            self.tokens = auth.load_tokens(config.server.auth_tokens, config.server.auth_tokens_file)
        except OSError as error:
            raise ConfigError(f"[server] auth_tokens_file: {error}") from None
        self._connections: Counter[str] = Counter()  # open websockets per client address
        self.metrics = Metrics(self)
        self.hub.event_hook = self.metrics.observe
        self.api = openai_api.OpenAiApi(self)
        self.started_at = time.time()

    def add_edge(self, edge: Edge) -> None:
        """Register before ``start``; see the module doc for the start/stop order."""
        self.edges.append(edge)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.server.tls_cert else "ws"
        return f"{scheme}://{self.config.server.host}:{self.port}"

    async def start(self) -> None:
        """Listen now; the model loads in the background (``wait_ready`` waits for it)."""
        server = self.config.server
        # HTTP requests with a body (the OpenAI-compatible API) are served by http_requests, which also
        # applies websockets' 10 s handshake timeout to everything else (a file job runs longer).
        http = connection_class(self.api.handle, self.api.max_body, openai_api.error_response)
        self._server = await serve(
            self._handle, server.host, server.port, process_request=self._http,
            max_size=4 * server.max_frame_bytes, compression=None, ssl=self._tls_context(),
            ping_interval=server.ping_interval_s, ping_timeout=server.ping_interval_s,
            create_connection=http, open_timeout=None,
        )
        if not self.tokens and not _is_loopback(server.host):
            log.warning("listening on %s without auth_tokens: anyone who can reach it can stream, read captions "
                        "and list streams (README \"Deploying\")", server.host)
        self._load_task = asyncio.create_task(self._load())

    def _tls_context(self) -> ssl.SSLContext | None:
        """https and wss on the same port when [server] tls_cert and tls_key are set."""
        server = self.config.server
        if not server.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(server.tls_cert, server.tls_key)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"[server] tls_cert/tls_key: {error}") from None
        return context

    def _load_configured_model(self) -> Engine:
        from ..engine.loading import load_engine

        model = self.config.model
        return load_engine(model.name, device=model.device, dtype=model.dtype, window_margin_s=model.window_margin_s,
                           cuda_graphs=model.cuda_graphs)

    async def _load(self) -> None:
        try:
            if self.engine is None:
                self.engine = await asyncio.to_thread(self._loader)
            if self._stopping:  # shut down while loading: start nothing that stop() would miss
                return
            from ..engine.worker import EngineWorker

            model = self.config.model
            worker = await asyncio.to_thread(  # off the loop: lanes copy the model's modules
                lambda: EngineWorker(self.engine, model.max_batch_utterances, final_window=model.final_window,
                                     partial_window=model.partial_window, final_deadline_ms=model.final_deadline_ms,
                                     lanes=model.lanes, partial_dtype=model.partial_dtype))
            if self._stopping:
                return
            self.worker = worker
            worker.start()
        except Exception as error:
            self.load_error = error
            log.debug("model failed to load: %s", error)  # wait_ready() and run() raise it; /readyz shows it
            return
        self._ready.set()
        log.info("model %s ready on %s", self.engine.name, self.engine.device)
        if self.config.server.shed_after_s > 0:
            self._shedder = asyncio.create_task(self._shed_load())
        for edge in self.edges:
            try:
                await edge.start(self)
            except Exception:  # one broken edge (no broker, no microphone) must not stop the daemon
                log.exception("edge %s failed to start", type(edge).__name__)

    async def wait_ready(self) -> None:
        """Wait for the model; re-raises its load error."""
        await asyncio.shield(self._load_task)
        if self.load_error is not None:
            raise self.load_error

    async def run(self) -> None:
        """``streamsed serve``: start, wait for SIGTERM/SIGINT, stop gracefully. Raises a load error."""
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
        waiter = asyncio.create_task(signalled.wait())
        try:
            await self.start()
            print(f"listening on {self.url}", flush=True)
            await asyncio.wait({waiter, self._load_task}, return_when=asyncio.FIRST_COMPLETED)
            if self.load_error is None:
                await waiter
                log.info("signal received: finishing open utterances, then exiting")
        finally:
            waiter.cancel()
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if self.load_error is not None:
            raise self.load_error

    async def stop(self) -> None:
        """Stop accepting; finish every session (its finals are sent to client and listeners); close."""
        if self._stopping or self._server is None:
            return
        self._stopping = True
        self._server.close(close_connections=False)  # stop listening; handlers run on
        self.api.cancel_jobs()  # files being decoded get 503; live streams finish their utterances
        if self._shedder is not None:
            self._shedder.cancel()
        ingests = list(self._ingests)
        for ingest in ingests:
            ingest.shutdown()
        await asyncio.gather(*(ingest.done.wait() for ingest in ingests))
        for edge in reversed(self.edges):
            try:
                await edge.stop()
            except Exception:
                log.exception("edge %s failed to stop cleanly", type(edge).__name__)
        self.hub.close_all()  # listeners send what is queued, then close 1001
        await self._server.wait_closed()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)

    async def _shed_load(self) -> None:
        """Load shedding: while the engine has been overloaded for ``shed_after_s``, close the most
        recently admitted ingest stream (its open utterance is still finalized), then give the
        rest another ``shed_after_s`` to catch up before shedding the next. Admission control alone
        cannot help when streams arrive faster than overload shows; this bounds their lag."""
        patience = self.config.server.shed_after_s
        last_shed = -math.inf
        while True:
            await asyncio.sleep(min(patience / 4, 1.0))
            worker = self.worker
            now = time.monotonic()
            if worker is None or worker.overloaded_for < patience or now - last_shed < patience:
                continue
            live = [ingest for ingest in self._ingests if ingest.session is not None and not ingest.closing]
            if len(live) < 2:  # one stream is all the engine has: it keeps going
                continue
            newest = max(live, key=lambda ingest: ingest.order)
            log.warning("overloaded for %.0f s: closing the newest stream %s (%d streams open)",
                        worker.overloaded_for, newest.stream, len(live))
            newest.shutdown(_SHED)
            self.shed_streams += 1
            last_shed = now

    # -- HTTP and routing -----------------------------------------------------------------------
    def _http(self, connection: ServerConnection, request):
        path, query = protocol.split_path(request.path)
        if self.tokens and auth.needs_token(path, static_pages=web_routes.PAGES.keys(),
                                            public_captions=self.config.server.public_captions):
            if not auth.token_ok(self.tokens, auth.presented_token(request.headers, query)):
                response = connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
                response.headers["WWW-Authenticate"] = 'Bearer realm="streamsed"'
                return response
        if path in (protocol.STREAM_PATH, protocol.CAPTIONS_PATH):
            client = _client_address(connection)
            if self._connections[client] >= self.config.server.max_connections_per_client:
                most = self.config.server.max_connections_per_client
                return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, f"too many connections from this address "
                                          f"(max_connections_per_client = {most})\n")
        if path == "/metrics":
            return web_routes.metrics(self)
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.ready:
                return connection.respond(HTTPStatus.OK, "ready\n")
            state = ("shutting down" if self._stopping else
                     f"model failed to load: {self.load_error}" if self.load_error else "loading model")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, state + "\n")
        if path in (protocol.STREAM_PATH, protocol.CAPTIONS_PATH):
            if not web_routes.origin_allowed(request.headers, self.config.server.allowed_origins):
                log.info("refused a websocket from origin %s", request.headers.get_all("Origin"))
                return web_routes.forbidden_origin(request.headers)  # 403: a page from another site
            return None  # websocket handshake
        page = web_routes.route(self, request)  # browser pages, caption export, stream list
        if page is not None:
            return page
        endpoints = (f"/healthz /readyz ws:{protocol.STREAM_PATH} ws:{protocol.CAPTIONS_PATH} / /captions /speak "
                     f"{web_routes.STREAMS_PATH} {web_routes.STREAMS_PATH}/ID/captions.vtt|.srt|.jsonl "
                     f"{web_routes.ENGINE_PATH} /metrics POST:/v1/audio/transcriptions POST:/v1/audio/translations "
                     f"/v1/models")
        return connection.respond(HTTPStatus.NOT_FOUND, f"not found; endpoints: {endpoints}\n")

    async def _handle(self, ws: ServerConnection) -> None:
        client = _client_address(ws)
        self._connections[client] += 1
        try:
            await self._serve_socket(ws)
        finally:
            self._connections[client] -= 1
            if self._connections[client] <= 0:
                del self._connections[client]

    async def _serve_socket(self, ws: ServerConnection) -> None:
        path, query = protocol.split_path(ws.request.path)
        if path == protocol.CAPTIONS_PATH:
            await self._captions(ws, query)
            return
        if not self.ready:
            await refuse(ws, ProtocolError("not_ready", "the model is still loading; retry when /readyz returns 200"))
            return
        if len(self._ingests) >= self.config.server.max_sessions:
            most = self.config.server.max_sessions
            await refuse(ws, ProtocolError(
                "too_many_sessions", f"the daemon is serving its maximum of {most} sessions; retry later"
            ))
            return
        if self.worker is not None and self.worker.overloaded:
            await refuse(ws, ProtocolError(
                "overloaded", "finals are behind their deadline; new streams are refused until they catch up"
            ))
            return
        ingest = _Ingest(self, ws, query)
        self._admitted += 1
        ingest.order = self._admitted
        self._ingests.add(ingest)
        try:
            await ingest.run()
        finally:
            self._ingests.discard(ingest)

    async def _captions(self, ws: ServerConnection, query: dict[str, str]) -> None:
        try:
            stream, target_lang = protocol.caption_filter(query)
        except ProtocolError as error:
            await refuse(ws, error)
            return
        if self.hub.listener_count() >= self.config.server.max_listeners:
            await refuse(ws, ProtocolError("too_many_listeners", f"the daemon is serving its maximum of "
                                           f"{self.config.server.max_listeners} listeners; retry later"))
            return
        listener = self.hub.subscribe(stream, target_lang)
        if self._stopping:
            listener.close()

        async def pump() -> None:
            await ws.send(encode(protocol.subscribed_event(stream, target_lang)))
            while (event := await listener.get()) is not None:
                await ws.send(encode(event))

        async def discard_input() -> None:
            async for _ in ws:
                pass

        tasks = {asyncio.create_task(pump()), asyncio.create_task(discard_input())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.hub.unsubscribe(listener)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await ws.close(protocol.CLOSE_GOING_AWAY, "server shutting down")  # no-op if the client left


async def refuse(ws: ServerConnection, error: ProtocolError) -> None:
    """Send a fatal error event and close with its code."""
    try:
        await ws.send(encode(error.event()))
    except ConnectionClosed:
        return
    await ws.close(error.close_code, close_reason(error.code, error.message))


class _Ingest:
    """One ``/v1/stream`` connection: reader -> inbox -> processor (session) -> outbox -> sender."""

    def __init__(self, daemon: Daemon, ws: ServerConnection, query: dict[str, str]):
        self.daemon = daemon
        self.config = daemon.config
        self.ws = ws
        self.query = query
        self.inbox: asyncio.Queue = asyncio.Queue(MAX_QUEUED_FRAMES)
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.session: StreamSession | None = None
        self.stream: str | None = None
        self.closing = False
        self.order = 0  # admission order (set by the daemon)
        self.done = asyncio.Event()

    def shutdown(self, marker=_SHUTDOWN) -> None:
        """Daemon stopping (or this stream shed): ignore further input, finish what was received,
        close 1001 (1013 when shed)."""
        self.closing = True
        try:
            self.inbox.put_nowait(marker)
        except asyncio.QueueFull:  # the processor is behind; the marker queues after the backlog
            asyncio.get_running_loop().create_task(self.inbox.put(marker))

    def reply(self, event: dict) -> None:
        self.outbox.put_nowait(event)

    def emit(self, event: dict) -> None:
        """The session's event callback: to the client and to the stream's listeners."""
        self.reply(event)
        self.daemon.hub.publish(event)

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        sender = asyncio.create_task(self._send())
        try:
            code, reason = await self._process()
        except Exception as error:  # a bug or an engine failure: report it, keep the daemon up
            log.exception("session on stream %s failed", self.stream)
            self.reply(error_event("internal", f"internal error: {error}"))
            code, reason = protocol.CLOSE_INTERNAL, close_reason("internal", str(error))
            try:
                await self._finish()  # the open utterance's final still reaches listeners
            except Exception:
                log.exception("stream %s: finishing after the failure failed too", self.stream)
        finally:
            try:
                if self.stream is not None:
                    self.daemon.hub.release(self.stream)
                    self.daemon.sessions.pop(self.stream, None)
                self.outbox.put_nowait(None)
                await sender
            finally:  # whatever happened, shutdown must not wait for this connection forever
                reader.cancel()
                self.done.set()
        await self.ws.close(code, reason)
        log.info("stream %s closed (%s %s)", self.stream, code, reason)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if not self.closing:
                    await self.inbox.put(message)
        except ConnectionClosed:
            pass
        finally:  # on any end of the socket (even an unexpected error) the processor must learn of it
            await self.inbox.put(_GONE)

    async def _send(self) -> None:
        while (event := await self.outbox.get()) is not None:
            try:
                await self.ws.send(encode(event))
            except ConnectionClosed:
                pass  # client gone: listeners still get the events through the hub

    async def _process(self) -> tuple[int, str]:
        idle = self.config.server.idle_timeout_s
        last_audio = time.monotonic()
        while True:
            try:
                item = await asyncio.wait_for(self.inbox.get(), idle - (time.monotonic() - last_audio)) \
                    if idle else await self.inbox.get()
            except TimeoutError:  # a client that holds a session slot without talking
                error = ProtocolError("idle_timeout", f"no audio for {idle:g} s (idle_timeout_s); the session is "
                                      "finished and closed")
                self.reply(error.event())
                await self._finish()
                return error.close_code, close_reason(error.code, error.message)
            if isinstance(item, bytes):
                last_audio = time.monotonic()
            if item is _GONE or item is _SHUTDOWN or item is _SHED:
                if item is _SHED:
                    self.reply(SHED_ERROR.event())
                await self._finish()
                if item is _SHUTDOWN:
                    return protocol.CLOSE_GOING_AWAY, "server shutting down"
                if item is _SHED:
                    return SHED_ERROR.close_code, close_reason(SHED_ERROR.code, SHED_ERROR.message)
                return protocol.CLOSE_NORMAL, ""
            try:
                if isinstance(item, bytes):
                    await self._audio(item)
                    continue
                message = protocol.parse_client_message(item)
                if message["type"] == "start":
                    self._start(message)
                elif message["type"] == "stop":
                    await self._finish()
                    return protocol.CLOSE_NORMAL, "stopped"
            except ProtocolError as error:
                self.reply(error.event())
                if error.fatal:
                    await self._finish()
                    return error.close_code, close_reason(error.code, error.message)

    def _start(self, message: dict | None) -> None:
        """Open the session from query parameters + ``message`` (None: implicit start by audio)."""
        if self.session is not None:
            raise ProtocolError("already_started", "this connection's session has already started; start is ignored")
        options = protocol.start_options(self.query, message, self.config.streaming)
        engine = self.daemon.engine
        try:
            resolved = resolve_targets(engine, options.source_lang, options.targets, options.prompt)
        except UnsupportedTarget as error:
            raise ProtocolError("unsupported_language", str(error)) from None
        if not self.daemon.hub.claim(options.stream):
            raise ProtocolError(
                "stream_in_use", f"stream {options.stream!r} is already being ingested by another connection"
            )
        self.stream = options.stream
        session_options = SessionOptions(
            stream=options.stream, sample_rate=options.sample_rate, encoding=options.encoding,
            source_lang=options.source_lang, targets=list(options.targets), prompt=options.prompt,
        )
        try:
            self.session = StreamSession(
                session_options, self.daemon.worker, engine, self.emit,
                vad_config=self.config.vad, chunk_ms=self.config.streaming.chunk_ms, guard=self.config.guard,
            )
        except (UnsupportedTarget, AudioError) as error:
            raise ProtocolError("unsupported_language" if isinstance(error, UnsupportedTarget) else "bad_option",
                                str(error)) from None
        self.daemon.sessions[options.stream] = self.session
        session_id = uuid.uuid4().hex[:12]
        self.reply(protocol.ready_event(
            options, session_id, engine.name, resolved[0].source_lang, [t.target_lang for t in resolved]
        ))
        log.info("stream %s: session %s started (%d Hz %s, %s -> %s)", options.stream, session_id,
                 options.sample_rate, options.encoding, resolved[0].source_lang, [t.target_lang for t in resolved])

    async def _audio(self, data: bytes) -> None:
        if self.session is None:
            self._start(None)  # audio before start: the query parameters and defaults apply
        limit = self.config.server.max_frame_bytes
        if len(data) > limit:
            raise ProtocolError(
                "frame_too_large", f"binary frame of {len(data)} bytes is over max_frame_bytes ({limit}); dropped"
            )
        try:
            await self.session.feed(data)
        except AudioError as error:
            raise ProtocolError("bad_audio", f"{error}; frame dropped") from None

    async def _finish(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.finish()


def _client_address(connection: ServerConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if address else "?"


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
