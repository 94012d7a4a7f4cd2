"""One connection's protocol state: bytes received in, reply bytes out.

The server glue only moves bytes; a session frames requests, answers them and
says when the connection must close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from . import protocol, socketmap
from .responder import Responder, SocketmapResponder


@dataclass(frozen=True, slots=True)
class Output:
    replies: bytes
    requests: int
    close: str | None = None  # why the connection must close after the replies


class Session(Protocol):
    def receive(self, data: bytes) -> Output: ...


class TcpTableSession:
    """tcp_table(5): LF-framed lines; an over-long line is answered 400, then closed."""

    __slots__ = ("_buffer", "_responder")

    def __init__(self, responder: Responder) -> None:
        self._responder = responder
        self._buffer = protocol.LineBuffer()

    def receive(self, data: bytes) -> Output:
        try:
            lines = self._buffer.feed(data)
        except protocol.LineTooLong as exc:
            replies = self._responder.answer_all(exc.lines) + protocol.LINE_TOO_LONG
            return Output(replies, len(exc.lines) + 1, close=str(exc))
        return Output(self._responder.answer_all(lines), len(lines))


class SocketmapSession:
    """socketmap_table(5): netstrings; a framing error closes the connection.

    After a framing error the stream cannot be re-synchronised, so nothing more
    is sent: Postfix's client treats the disconnect as a temporary error.
    """

    __slots__ = ("_buffer", "_responder")

    def __init__(self, responder: SocketmapResponder) -> None:
        self._responder = responder
        self._buffer = socketmap.NetstringBuffer()

    def receive(self, data: bytes) -> Output:
        try:
            payloads = self._buffer.feed(data)
        except socketmap.NetstringError as exc:
            replies = self._responder.answer_all(exc.payloads)
            return Output(replies, len(exc.payloads), close=str(exc))
        return Output(self._responder.answer_all(payloads), len(payloads))
