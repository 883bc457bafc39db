"""Slow clients do not hold connections: uvicorn's HTTP/1.1 protocol (h11) with a header timeout.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a connection that never
completes its request headers (a new one that sends nothing, or a few bytes then stalls) is kept open
forever. ``header_timeout_protocol(s)`` gives a protocol class that closes a connection whose request
headers are not complete ``s`` seconds after it opened or after its previous response; the body's own
limit is the app's (``serving.app.read_body``, answered 408).
"""
from __future__ import annotations

from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    _header_timer: Optional[object] = None

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no request under way
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # the next request's headers (a pipelined one already read disarms it at once)
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_timeout_protocol(seconds: float) -> type:
    """An h11 protocol class for ``uvicorn.run(http=...)`` that drops connections whose request headers take
    longer than ``seconds``."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": float(seconds)})
