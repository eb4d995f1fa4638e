"""uvicorn, hardened against hostile clients: a connection cap, a header timeout, one log line per accept flood,
and a shutdown (SIGTERM, Ctrl-C) that stops the running generation at its next step.

uvicorn's own ``limit_concurrency`` answers 503 only once a request's headers are in, and its keep-alive timer
does not run while a request's headers trickle in, so idle or slow connections (a slowloris) could hold every
file descriptor. Here each connection must send complete headers within ``header_timeout`` seconds, and a
connection beyond ``max_connections`` is answered 503 and closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import threading
import time
from collections.abc import Generator
from typing import Any

import h11
import uvicorn
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("mlx_dgemma.server")

_BUSY_BODY = (
    b'{"error": {"message": "too many open connections: retry shortly", "type": "server_error", '
    b'"param": null, "code": "too_many_connections"}}'
)
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)

MAX_HEADERS = 100  # as Python's http.client
MAX_HEADER_BYTES = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # 16 KiB: h11's bound on headers that arrive in pieces


def _too_large(max_headers: int, max_bytes: int) -> bytes:
    body = (
        b'{"error": {"message": "the request\'s headers are too large (at most %d headers and %d bytes): send '
        b'fewer or shorter headers", "type": "invalid_request_error", "param": null, "code": '
        b'"headers_too_large"}}' % (max_headers, max_bytes)
    )
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )


class _BoundedConnection(h11.Connection):
    """h11's connection with a bound on a request's header count and bytes. h11 bounds only headers that arrive
    in pieces (``max_incomplete_event_size``): 10,000 headers sent in one write were all accepted. Keeps the last
    protocol error, so that the 431s (these and h11's own) are answered 431, not uvicorn's 400."""

    error: h11.RemoteProtocolError | None = None

    def __init__(self, max_headers: int, max_bytes: int):
        super().__init__(h11.SERVER, max_bytes)
        self.max_headers, self.max_bytes = max_headers, max_bytes

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                size = (
                    len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                )
                if len(event.headers) > self.max_headers or size > self.max_bytes:
                    raise h11.RemoteProtocolError("request headers too large", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as e:
            self.error = e
            raise


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, a timeout on receiving each request's headers, and a bound
    on their number and size (HTTP 431 and close)."""

    max_connections = 512
    header_timeout = 10.0
    max_headers = MAX_HEADERS
    max_header_bytes = MAX_HEADER_BYTES
    _header_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.conn = _BoundedConnection(self.max_headers, self.max_header_bytes)

    def send_400_response(self, msg: str) -> None:
        error = getattr(self.conn, "error", None)
        if error is None or error.error_status_hint != 431:
            super().send_400_response(msg)
            return
        self.transport.write(_too_large(self.max_headers, self.max_header_bytes))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_BUSY)
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle and self._header_timer is not None:  # a request's headers are all in
            self._header_timer.cancel()
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request on this keep-alive connection gets the same bound

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(max_connections: int, header_timeout: float) -> type[GuardedH11]:
    """A ``GuardedH11`` subclass with these limits (uvicorn instantiates the class it is given)."""
    return type(
        "GuardedH11", (GuardedH11,), {"max_connections": max_connections, "header_timeout": header_timeout}
    )


class FloodLog:
    """An event-loop exception handler that logs running out of file descriptors once a minute, without a
    traceback (asyncio logs a traceback per refused accept, hundreds of MB a minute under a flood)."""

    def __init__(self, every_s: float = 60.0):
        self.every_s, self.last, self.missed = every_s, -float("inf"), 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (
            errno.EMFILE,
            errno.ENFILE,
            errno.ENOBUFS,
            errno.ENOMEM,
        ):
            now = time.monotonic()
            if now - self.last >= self.every_s:
                log.error(
                    "out of file descriptors (%s): refusing connections until some close "
                    "(%d similar errors not logged); lower --max-connections or raise `ulimit -n`",
                    exc.strerror,
                    self.missed,
                )
                self.last, self.missed = now, 0
            else:
                self.missed += 1
            return
        loop.default_exception_handler(context)


class Server(uvicorn.Server):
    """``uvicorn.Server`` whose exit signal also stops the generation in progress (at its next step), so that
    SIGTERM ends the process within seconds rather than after the longest running answer."""

    def __init__(self, config: uvicorn.Config, on_exit: Any = None):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.on_exit is not None:
            self.on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's, with SIGINT ending the process as SIGTERM does. Once serving stops, uvicorn raises the
        signal it caught again under the handler it found: SIGTERM's default action ends the process there,
        while Python's SIGINT handler raises KeyboardInterrupt, after which ``asyncio.run`` and the interpreter
        wait for every thread still running (an image fetch, a tokenizer), so Ctrl-C could leave the server
        hanging. Under SIG_DFL the caught SIGINT ends the process as SIGTERM's does (exit status 130)."""
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGINT, previous)

    async def startup(self, sockets: list | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(FloodLog())
        await super().startup(sockets)


def make_config(
    app: Any,
    *,
    log_level: str = "info",
    max_connections: int = 512,
    header_timeout: float = 10.0,
    keep_alive_s: int = 5,
    graceful_s: int = 3,
    **kw: Any,
) -> uvicorn.Config:
    """The uvicorn configuration the server runs with (also used by ``BackgroundServer``)."""
    return uvicorn.Config(
        app,
        log_level=log_level,
        http=guarded_protocol(max_connections, header_timeout),
        limit_concurrency=max_connections + 1,
        timeout_keep_alive=keep_alive_s,
        timeout_graceful_shutdown=graceful_s,
        **kw,
    )
