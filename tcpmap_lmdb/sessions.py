"""One connection's protocol state: bytes received in, reply bytes out.

The server glue only moves bytes; a session frames requests, answers them and
says when the connection must close.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from . import protocol, socketmap
from .responder import Responder, SocketmapResponder

# What one batch of requests gives: (replies, requests answered, why the
# connection must close after the replies or None). One per read, on the hot
# path: a plain tuple costs a seventh of a NamedTuple.
Output = tuple[bytes | bytearray, int, str | None]

# The most reply bytes a session hands over at once. The server sends a batch
# before it reads or answers anything more from that client, so this bounds
# what a client that pipelines requests and never reads its replies can make
# the server hold: a batch is closed once it reaches _FLUSH_AT, and one more
# reply (a socketmap one is at most MAX_REPLY_BYTES) cannot take it past this.
OUTPUT_LIMIT = 128 * 1024
_FLUSH_AT = OUTPUT_LIMIT - socketmap.MAX_REPLY_BYTES

_Request = TypeVar("_Request")


class Session(Protocol):
    def receive(self, data: bytes) -> Iterable[Output]: ...

    @property
    def pending(self) -> int:
        """Bytes of an incomplete request held back (0 between requests)."""
        ...


def _batches(
    requests: Iterator[_Request],
    answer: Callable[[_Request], bytes],
    errors: tuple[type[Exception], ...],
    error_reply: Callable[[Exception], bytes],
) -> Iterator[Output]:
    """Answer REQUESTS as they are framed, in batches of under OUTPUT_LIMIT bytes.

    An exception of ERRORS from the framing ends the stream: what came before is
    answered, then ERROR_REPLY(exc) is sent and the connection closes.
    """
    replies = bytearray()
    count = 0
    try:
        for request in requests:
            replies += answer(request)
            count += 1
            if len(replies) >= _FLUSH_AT:
                yield replies, count, None
                replies, count = bytearray(), 0
    except errors as exc:
        yield replies + error_reply(exc), count, str(exc)
        return
    if count:
        yield replies, count, None


class TcpTableSession:
    """tcp_table(5): LF-framed lines; an over-long line is dropped as it comes and answered
    (500 for a "get": no table has such a key); a stream that does not start as a
    request is answered once, then closed."""

    __slots__ = ("_buffer", "_responder")

    def __init__(self, responder: Responder) -> None:
        self._responder = responder
        self._buffer = protocol.LineBuffer()

    def receive(self, data: bytes) -> Iterable[Output]:
        line = self._buffer.whole_line(data)
        if line is not None:  # the usual case, and the fast path
            return ((self._responder.answer(line), 1, None),)
        return self.receive_framed(data)

    def receive_framed(self, data: bytes) -> Iterable[Output]:
        """receive() without the one-line shortcut: what it must equal (tests)."""
        return _batches(
            self._buffer.lines(data), self._answer, (protocol.WrongProtocol,), _tcp_table_refusal
        )

    @property
    def pending(self) -> int:
        return int(self._buffer.mid_request)

    def _answer(self, line: protocol.Line) -> bytes:
        if type(line) is bytes:
            return self._responder.answer(line)
        assert isinstance(line, protocol.OverLong)
        return protocol.over_long(line)


# What a client of the other protocol is told before the hang-up.
TO_SOCKETMAP_CLIENT = socketmap.permanent("this is a tcp_table listener: use tcp:HOST:PORT")
TO_OTHER_CLIENT = protocol.temporary("not a tcp_table request")
TO_TCP_TABLE_CLIENT = protocol.temporary(
    "this is a socketmap listener: use socketmap:inet:HOST:PORT:NAME"
)


def _tcp_table_refusal(exc: Exception) -> bytes:
    """The reply before hanging up on a client that does not speak tcp_table.

    A socketmap client is told in its own protocol, so that Postfix logs the
    reason ("socketmap server permanent error: ..."); anything else gets a 400.
    """
    assert isinstance(exc, protocol.WrongProtocol)
    return TO_SOCKETMAP_CLIENT if exc.first[:1].isdigit() else TO_OTHER_CLIENT


class SocketmapSession:
    """socketmap_table(5): netstrings; a framing error closes the connection.

    After a framing error the stream cannot be re-synchronised, so nothing more
    is sent: Postfix's client treats the disconnect as a temporary error. A
    stream that does not start as a netstring gets one reply first.
    """

    __slots__ = ("_buffer", "_responder")

    def __init__(self, responder: SocketmapResponder) -> None:
        self._responder = responder
        self._buffer = socketmap.NetstringBuffer()

    def receive(self, data: bytes) -> Iterable[Output]:
        payload = self._buffer.whole(data)
        if payload is not None:  # one request per read: what Postfix sends
            return ((self._responder.answer(payload), 1, None),)
        return _batches(
            self._buffer.payloads(data),
            self._responder.answer_any,
            (socketmap.NetstringError,),
            _socketmap_refusal,
        )

    @property
    def pending(self) -> int:
        return self._buffer.pending


def _socketmap_refusal(exc: Exception) -> bytes:
    """Nothing after a framing error; a tcp_table client is told in its own protocol
    (a 400 line, which Postfix's client takes as a temporary error at once, instead of
    reconnecting ten times)."""
    # Not exc.tcp_table: compiled by mypyc 2.4, reading that property of an exception
    # class from another module crashed the server (test_misbehaving, make test-compiled).
    if isinstance(exc, socketmap.WrongProtocol) and socketmap.looks_like_tcp_table(exc.first):
        return TO_TCP_TABLE_CLIENT
    return b""
