"""One connection's protocol state: bytes received in, reply bytes out.

The server glue only moves bytes; a session frames requests, answers them and
says when the connection must close.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def _batches(requests: list[bytes]) -> Iterator[list[bytes]]:
    for start in range(0, len(requests), BATCH):
        yield requests[start : start + BATCH]


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
        for batch in _batches(lines):
            yield Output(self._responder.answer_all(batch), len(batch))
        if close is not None:
            yield Output(protocol.LINE_TOO_LONG, 1, close=close)


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
        for batch in _batches(payloads):
            yield Output(self._responder.answer_all(batch), len(batch))
        if close is not None:
            yield Output(b"", 0, close=close)
