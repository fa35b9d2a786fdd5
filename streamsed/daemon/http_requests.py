"""Plain HTTP requests with a body (the OpenAI-compatible API) on the websocket port.

websockets parses only what a handshake can be: a GET without a body. ``HttpConnection`` is the
websockets ``ServerConnection`` the daemon's server creates for every TCP connection; it reads the
request line first and, for a method other than GET or a path under ``DIVERTED_PREFIXES``, takes
the connection away from websockets and serves one HTTP/1.1 exchange itself with h11: request,
body (``Content-Length`` or chunked, 413 past the limit, ``100 Continue`` when asked for), an
async handler, the response, close. Everything else goes to websockets untouched, so the
handshake, the pages and the GET endpoints are served exactly as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers

__all__ = ["HttpRequest", "HttpResponse", "HttpConnection", "connection_class", "DIVERTED_PREFIXES"]

log = logging.getLogger(__name__)

DIVERTED_PREFIXES = ("/v1/audio/", "/v1/models")  # served here for every method (OpenAI's error shapes)
MAX_REQUEST_LINE = 8192
READ_TIMEOUT_S = 120.0  # the whole request (headers and body) must arrive within this
OPEN_TIMEOUT_S = 10.0  # websockets' own handshake timeout, applied here (see HttpConnection.handshake)


@dataclass
class HttpRequest:
    method: str
    target: str  # path and query, as sent
    headers: Headers  # case-insensitive
    body: bytes
    client: str  # the peer address

    @property
    def path(self) -> str:
        return urlsplit(self.target).path.rstrip("/") or "/"


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
ErrorPage = Callable[[int, str], HttpResponse]  # (status, message) -> the answer this layer gives itself


def plain_error(status: int, message: str) -> HttpResponse:
    return HttpResponse(status, f"{message}\n".encode())


class BodyTooLarge(Exception):
    pass


def diverted(request_line: bytes) -> bool:
    """Whether a request line is for this module rather than for websockets."""
    method, _, rest = request_line.partition(b" ")
    path = rest.partition(b" ")[0].decode("latin-1")
    return method != b"GET" or path.startswith(DIVERTED_PREFIXES)


def connection_class(handler: Handler, max_body: Callable[[HttpRequest], int],
                     error_page: ErrorPage = plain_error) -> type[ServerConnection]:
    """A ``create_connection`` for ``websockets.serve`` that sends diverted requests to ``handler``;
    ``max_body(request)`` (headers known, body not yet) is the largest body accepted, and
    ``error_page`` words the errors this layer answers by itself (400, 413, 500, 503)."""
    bound = {"handler": staticmethod(handler), "max_body": staticmethod(max_body), "error_page": staticmethod(error_page)}
    return type("BoundHttpConnection", (HttpConnection,), bound)


class HttpConnection(ServerConnection):
    handler: Handler
    max_body: Callable[[HttpRequest], int]
    error_page: ErrorPage = staticmethod(plain_error)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head = b""  # bytes before the request line is complete
        self._sniffed = False
        self._exchange: _Exchange | None = None
        self._taken = self.loop.create_future()  # set when this connection is diverted

    # -- asyncio protocol: route the bytes ------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._exchange is not None:
            self._exchange.receive(data)
            return
        if not self._sniffed:
            self._head += data
            line_end = self._head.find(b"\n")
            if line_end < 0 and len(self._head) < MAX_REQUEST_LINE:
                return  # the request line is not complete yet
            self._sniffed = True
            data, self._head = self._head, b""
            if line_end >= 0 and diverted(data[:line_end].rstrip(b"\r")):
                self._exchange = _Exchange(self)
                self._taken.set_result(None)
                self._exchange.receive(data)
                return
        super().data_received(data)

    def eof_received(self) -> None:
        if self._exchange is not None:
            self._exchange.receive(b"")
            return
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._exchange is not None:
            self._exchange.lost()
        super().connection_lost(exc)

    # -- websockets' per-connection task -----------------------------------------------------------
    async def handshake(self, *args, **kwargs) -> None:
        """For a diverted request: run its exchange, and return once the transport is closed (so
        that websockets' abort of a connection that never opened cannot cut off the response).
        The daemon serves with ``open_timeout=None`` and the handshake timeout is applied here, as
        a long file job must not be cut at websockets' 10 s."""
        await asyncio.wait([self.request_rcvd, self.connection_lost_waiter, self._taken],
                           return_when=asyncio.FIRST_COMPLETED)
        if self._exchange is None:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                await super().handshake(*args, **kwargs)
            return
        await self._exchange.run()
        await self.connection_lost_waiter


class _Exchange:
    """One request and its response over h11."""

    def __init__(self, connection: HttpConnection):
        self.connection = connection
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.arrived = asyncio.Event()
        self.gone = False

    def receive(self, data: bytes) -> None:
        try:
            self.h11.receive_data(data)
        except RuntimeError:  # data after the request ended (a pipelined request): ignored, we close
            pass
        self.arrived.set()

    def lost(self) -> None:
        self.gone = True
        self.arrived.set()

    async def run(self) -> None:
        try:
            request = await asyncio.wait_for(self._read(), READ_TIMEOUT_S)
        except h11.RemoteProtocolError as error:
            self._finish(self.connection.error_page(400, f"bad HTTP request: {error}"))
            return
        except BodyTooLarge as error:
            self._finish(self.connection.error_page(413, str(error)))
            return
        except (TimeoutError, ConnectionError):
            self._close()
            return
        try:
            response = await self.connection.handler(request)
        except asyncio.CancelledError:  # the daemon is stopping
            self._finish(self.connection.error_page(503, "the daemon is shutting down"))
            raise
        except Exception:
            log.exception("HTTP handler failed on %s %s", request.method, request.target)
            response = self.connection.error_page(500, "internal server error (see the daemon's log)")
        self._finish(response)

    async def _read(self) -> HttpRequest:
        head = await self._next_event()
        if not isinstance(head, h11.Request):
            raise ConnectionError("the client left before sending a request")
        headers = Headers((name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers)
        request = HttpRequest(head.method.decode("ascii"), head.target.decode("latin-1"), headers, b"",
                              _peer(self.connection))
        limit = self.connection.max_body(request)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"the request body is {int(declared)} bytes; the limit is {limit}")
        if self.h11.they_are_waiting_for_100_continue:
            self._write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        chunks, size = [], 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                request.body = b"".join(chunks)
                return request
            else:
                raise ConnectionError("the client left in the middle of its request")

    async def _next_event(self):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.gone:
                raise ConnectionError("connection lost")
            self.arrived.clear()
            await self.arrived.wait()

    def _finish(self, response: HttpResponse) -> None:
        if self.gone:
            return
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
                   ("Connection", "close"), *response.headers]
        try:
            data = self.h11.send(h11.Response(status_code=response.status, headers=headers))
            data += self.h11.send(h11.Data(data=response.body)) + self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # e.g. the request was too broken to answer in HTTP/1.1
            data = b""
        self._write(data)
        self._close()

    def _write(self, data: bytes) -> None:
        if data and not self.gone:
            self.connection.transport.write(data)

    def _close(self) -> None:
        self.connection.transport.close()  # flushes the response, then connection_lost


def _peer(connection: ServerConnection) -> str:
    peer = connection.transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) else str(peer or "")
