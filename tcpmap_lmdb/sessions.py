"""One connection's protocol state: bytes received in, reply bytes out.

The server glue only moves bytes; a session frames requests, answers them and
says when the connection must close.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from . import protocol, socketmap
from .responder import Responder, SocketmapResponder

# What one batch of requests gives: (replies, requests answered, why the
# connection must close after the replies or None). One per read, on the hot
# path: a plain tuple costs a seventh of a NamedTuple.
Output = tuple[bytes, int, str | None]


# Requests answered per write. A client that pipelines many small requests and
# never reads can make the server hold at most this many replies (4 KiB each for
# tcp_table) before the write blocks and the idle timeout takes over.
BATCH = 64


class Session(Protocol):
    def receive(self, data: bytes) -> Iterable[Output]: ...

    @property
    def pending(self) -> int:
        """Bytes of an incomplete request held back (0 between requests)."""
        ...


def _answer(
    answer_all: Callable[[list[bytes]], bytes],
    requests: list[bytes],
    close: str | None,
    last: Output,
) -> Iterable[Output]:
    """Answer REQUESTS in batches of BATCH; then, when CLOSE says why, LAST."""
    if close is None and len(requests) <= BATCH:  # the usual case: one batch, now
        return ((answer_all(requests), len(requests), None),)
    return _batches(answer_all, requests, close, last)


def _batches(
    answer_all: Callable[[list[bytes]], bytes],
    requests: list[bytes],
    close: str | None,
    last: Output,
) -> Iterator[Output]:
    for start in range(0, len(requests), BATCH):
        batch = requests[start : start + BATCH]
        yield answer_all(batch), len(batch), None
    if close is not None:
        yield last[0], last[1], close


_LINE_TOO_LONG: Output = (protocol.LINE_TOO_LONG, 1, None)
_HANG_UP: Output = (b"", 0, None)


class TcpTableSession:
    """tcp_table(5): LF-framed lines; an over-long line is answered 400, then closed."""

    __slots__ = ("_buffer", "_responder")

    def __init__(self, responder: Responder) -> None:
        self._responder = responder
        self._buffer = protocol.LineBuffer()

    def receive(self, data: bytes) -> Iterable[Output]:
        line = self._buffer.whole_line(data)
        if line is not None:  # the usual case, and the fast path
            return ((self._responder.answer(line), 1, None),)
        try:
            lines, close = self._buffer.feed(data), None
        except protocol.LineTooLong as exc:
            lines, close = exc.lines, str(exc)
        # The over-long line itself is answered: one request more.
        return _answer(self._responder.answer_all, lines, close, _LINE_TOO_LONG)

    @property
    def pending(self) -> int:
        return self._buffer.pending


class SocketmapSession:
    """socketmap_table(5): netstrings; a framing error closes the connection.

    After a framing error the stream cannot be re-synchronised, so nothing more
    is sent: Postfix's client treats the disconnect as a temporary error.
    """

    __slots__ = ("_buffer", "_responder")

    def __init__(self, responder: SocketmapResponder) -> None:
        self._responder = responder
        self._buffer = socketmap.NetstringBuffer()

    def receive(self, data: bytes) -> Iterable[Output]:
        try:
            payloads, close = self._buffer.feed(data), None
        except socketmap.NetstringError as exc:
            payloads, close = exc.payloads, str(exc)
        return _answer(self._responder.answer_all, payloads, close, _HANG_UP)

    @property
    def pending(self) -> int:
        return self._buffer.pending
