"""Connection limits uvicorn lacks: request-head size, head read timeout, body idle timeout.

uvicorn (0.54) offers `limit_concurrency` (503 once that many connections or tasks exist),
`timeout_keep_alive` (armed only *after* a response completes) and, for its h11 protocol only,
`h11_max_incomplete_event_size`. With the httptools protocol it uses by default there is no limit
on the request head (llhttp has none: a 1 MB header or 100,000 headers were answered 200), no
timer at all while a request head or body is being received (a socket that sends nothing, half a
header, or a body shorter than its Content-Length is held forever). This subclass of uvicorn's
`HttpToolsProtocol` adds exactly those three, with the values from `Settings`:

- request line + headers above `max_header_bytes` -> 431 and the connection closed;
- a request head not complete `header_timeout_s` after its first byte (or after the connection
  opened) -> 408 and closed (closed without an answer if the client sent nothing at all);
- no body bytes for `body_timeout_s` while the body is incomplete -> 408 (if no response started)
  and closed; the app sees the client disconnect.

It also asks `early_refusal` (`service.http.early_refusal`, set by `boostserve serve`) once a
request head is complete: while SLO mode sheds, a classify request is answered 429 from there, its
body discarded as it arrives, and no ASGI task is started.

Why a protocol subclass and not middleware: an ASGI app only runs once the head is complete, and a
body read stalled in `receive()` cannot answer while the app awaits it; only the protocol sees the
bytes and owns the socket.
"""

from __future__ import annotations

import json
import time
from asyncio import TimerHandle
from collections.abc import Callable
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http.early_refusal import EarlyRefusal
from service.http.errors import error_body, raw_response, status_for
from service.http.middleware import ARRIVED_AT

HEADERS_TOO_LARGE = "headers_too_large"
REQUEST_TIMEOUT = "request_timeout"


def _raw_error(status: int, error_type: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response in our envelope, with Connection: close."""
    body = json.dumps(error_body(error_type, message)).encode()
    return raw_response(status, [(b"content-type", b"application/json"), (b"connection", b"close")], body)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit and head/body read timeouts."""

    max_header_bytes = 32 * 1024
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    early_refusal: ClassVar[EarlyRefusal | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # bytes received now belong to a request head
        self._head_bytes = 0  # bytes received since the current head began
        self._read_timer: TimerHandle | None = None
        #: The answer of the request being received when the gate refused it, and its keep-alive.
        self._refusal: tuple[bytes, bool] | None = None

    # -- timers ----------------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _refuse(self, status: int, error_type: str, message: str) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.logger.warning("closing connection: %s", message)
            self.transport.write(_raw_error(status, error_type, message))
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._read_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head waiting behind a response in progress: not the client's delay.
            self._arm(self.header_timeout_s, self._head_timed_out)
            return
        if self._head_bytes == 0:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.close()
            return
        self._refuse(
            status_for(REQUEST_TIMEOUT),
            REQUEST_TIMEOUT,
            f"request head not received within {self.header_timeout_s:g} s",
        )

    def _body_timed_out(self) -> None:
        self._read_timer = None
        self._refuse(
            status_for(REQUEST_TIMEOUT), REQUEST_TIMEOUT, f"no request body bytes for {self.body_timeout_s:g} s"
        )

    # -- protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm(self.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._read_timer is None:
                self._arm(self.header_timeout_s, self._head_timed_out)
        elif self._read_timer is not None:
            self._arm(self.body_timeout_s, self._body_timed_out)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse(
                status_for(HEADERS_TOO_LARGE),
                HEADERS_TOO_LARGE,
                f"request line and headers exceed {self.max_header_bytes} bytes",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._arm(self.body_timeout_s, self._body_timed_out)
        gate = self.early_refusal
        if gate is not None and (self.cycle is None or self.cycle.response_complete):  # not behind a pipelined one
            # Keep-alive as uvicorn decides it; a client waiting for 100-continue is answered now
            # and the connection closed (it will not send the body the parser waits for).
            waiting = self.expect_100_continue
            keep_alive = not waiting and self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
            refusal = gate(
                self.parser.get_method(), self.url, self.headers, keep_alive, self.server_state.default_headers
            )
            if refusal is not None:
                if waiting:
                    self._answer_refused(refusal, keep_alive=False)
                    refusal = b""  # answered: the rest of this message, if any arrives, is discarded
                self._refusal = (refusal, keep_alive)
                return
        self.scope[ARRIVED_AT] = time.monotonic()  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        self._head_bytes = 0
        refusal = self._refusal
        if refusal is None:
            super().on_message_complete()
            return
        self._refusal = None
        self._answer_refused(*refusal)

    def _answer_refused(self, response: bytes, keep_alive: bool) -> None:
        """Write a refusal and go on as uvicorn does after a response (keep-alive timer or close)."""
        if self.transport.is_closing() or not response:
            return
        self.transport.write(response)
        self.server_state.total_requests += 1
        if not keep_alive:
            self.transport.close()
            return
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


def bounded_protocol(
    *,
    max_header_bytes: int,
    header_timeout_s: float,
    body_timeout_s: float,
    early_refusal: EarlyRefusal | None = None,
) -> type[HttpToolsProtocol]:
    """A BoundedHttpToolsProtocol class carrying these limits (uvicorn instantiates the class itself)."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "max_header_bytes": max_header_bytes,
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "early_refusal": None if early_refusal is None else staticmethod(early_refusal),
        },
    )
