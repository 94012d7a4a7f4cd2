"""One connection's protocol state: bytes received in, reply bytes out.

The server glue only moves bytes; a session frames requests, answers them and
says when the connection must close.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

from . import protocol, socketmap
from .responder import Responder, SocketmapResponder


class Output(NamedTuple):  # one per read, on the hot path: a NamedTuple is cheapest
    replies: bytes
    requests: int
    close: str | None = None  # why the connection must close after the replies


# Requests answered per write. A client that pipelines many small requests and
# never reads can make the server hold at most this many replies (4 KiB each for
# tcp_table) before the write blocks and the idle timeout takes over.
BATCH = 64


class Session(Protocol):
    def receive(self, data: bytes) -> Iterator[Output]: ...


def _answer(
    answer_all: Callable[[list[bytes]], bytes],
    requests: list[bytes],
    close: str | None,
    last: Output,
) -> Iterator[Output]:
    """Answer REQUESTS in batches of BATCH; then, when CLOSE says why, LAST."""
    for start in range(0, len(requests), BATCH):
        batch = requests[start : start + BATCH]
        yield Output(answer_all(batch), len(batch))
    if close is not None:
        yield last._replace(close=close)


_LINE_TOO_LONG = Output(protocol.LINE_TOO_LONG, 1)
_HANG_UP = Output(b"", 0)


class TcpTableSession:
    """tcp_table(5): LF-framed lines; an over-long line is answered 400, then closed."""

    __slots__ = ("_buffer", "_responder")

    def __init__(self, responder: Responder) -> None:
        self._responder = responder
        self._buffer = protocol.LineBuffer()

    def receive(self, data: bytes) -> Iterator[Output]:
        try:
            lines, close = self._buffer.feed(data), None
        except protocol.LineTooLong as exc:
            lines, close = exc.lines, str(exc)
        # The over-long line itself is answered: one request more.
        return _answer(self._responder.answer_all, lines, close, _LINE_TOO_LONG)


class SocketmapSession:
    """socketmap_table(5): netstrings; a framing error closes the connection.

    After a framing error the stream cannot be re-synchronised, so nothing more
    is sent: Postfix's client treats the disconnect as a temporary error.
    """

    __slots__ = ("_buffer", "_responder")

    def __init__(self, responder: SocketmapResponder) -> None:
        self._responder = responder
        self._buffer = socketmap.NetstringBuffer()

    def receive(self, data: bytes) -> Iterator[Output]:
        try:
            payloads, close = self._buffer.feed(data), None
        except socketmap.NetstringError as exc:
            payloads, close = exc.payloads, str(exc)
        return _answer(self._responder.answer_all, payloads, close, _HANG_UP)
