"""tcp_table(5) codec, sans-io: bytes in, requests out; replies to bytes.

Facts are from postfix-maps.md section 1. Nothing here touches a socket, a
clock or a logger.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

from .dbformat import MAX_LOOKUP_KEY

MAX_REPLY = 4096  # tcp_table(5): "no longer than 4096 characters including the newline"
# Longest request line kept, LF included: "get ", the longest lookup key that can
# fold to a key a table holds (dbformat.MAX_LOOKUP_KEY), every byte %XX-quoted,
# then CR LF. A longer line is discarded as it arrives and answered "not found".
MAX_REQUEST = len(b"get ") + 3 * MAX_LOOKUP_KEY + 2
# postfix-maps.md 1.1: Postfix only sends "get SP key"; dict_tcp.c documents put.
_COMMANDS = (b"get", b"put")

# hex_quote() copies a byte literally iff it is not '%', not whitespace and
# printable ASCII: that is 0x21-0x24 and 0x26-0x7E. Everything else is %XX,
# upper-case hex.
_LITERAL = frozenset(range(0x21, 0x7F)) - {0x25}
_QUOTE_TABLE: tuple[bytes, ...] = tuple(
    bytes([b]) if b in _LITERAL else b"%%%02X" % b for b in range(256)
)
_LITERAL_BYTES = bytes(sorted(_LITERAL))
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


class ProtocolError(ValueError):
    """A request the server must answer with 400 (and keeps the connection)."""


class WrongProtocol(ValueError):
    """The first bytes of a connection cannot start a tcp_table request: answer, then close.

    ``first`` holds those bytes (at most three), to guess what the client speaks.
    """

    def __init__(self, first: bytes) -> None:
        super().__init__(wrong_protocol(first))
        self.first = first


def quote(data: bytes) -> bytes:
    """Encode like Postfix's hex_quote(): the exact bytes Postfix would send."""
    if not data.translate(None, _LITERAL_BYTES):  # only literal bytes: nothing to quote
        return data
    return b"".join([_QUOTE_TABLE[b] for b in data])


def unquote(data: bytes) -> bytes:
    """Decode like Postfix's hex_unquote(): '%' must be followed by two hex digits.

    Raises ProtocolError for a malformed escape. Other bytes are copied verbatim.
    """
    if b"%" not in data:
        return data
    decoded = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), data)
    # A '%' left after substitution is one no valid escape consumed. Count
    # instead of re-scanning: every valid escape removes exactly one '%'.
    if data.count(b"%") != len(_PERCENT.findall(data)):
        raise ProtocolError("malformed %XX escape")
    return decoded


# --- requests ---------------------------------------------------------------


# NamedTuples, not dataclasses: one is built per request, and this is the hot path.
class Get(NamedTuple):
    key: bytes  # decoded, not yet folded


class Put(NamedTuple):
    key: bytes
    value: bytes


Request = Get | Put


# Bytes that send a request line to the full parser: an escape, NUL, CR.
_NOT_PLAIN = b"%\x00\r"


def plain_get(line: bytes) -> bytes | None:
    """The key of a line that is exactly ``get KEY`` with nothing to decode, else None.

    What Postfix sends for almost every key; the hot path. Everything else goes
    through parse_request(), which gives the same key for these lines.
    """
    if line[:4] == b"get " and len(line) > 4 and len(line.translate(None, _NOT_PLAIN)) == len(line):
        return line[4:]
    return None


def parse_request(line: bytes) -> Request:
    """Parse one request line, without its LF.

    Postfix sends exactly ``get SP hex-quoted-key``. A trailing CR (someone
    typing into telnet) is dropped: Postfix quotes CR, so it never sends one.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    command, space, argument = line.partition(b" ")
    if command == b"get":
        if not space:
            raise ProtocolError("get requires a key")
        # An empty key (`get `) is a lookup like any other, and no table holds it:
        # `postmap -q -` sends one for a blank line, and lmdb: answers it not found.
        key = unquote(argument)
        if b"\x00" in key:
            raise ProtocolError("key contains NUL")
        return Get(key)
    if command == b"put":
        # Documented in dict_tcp.c but never sent by Postfix; we are read-only.
        key, _, value = argument.partition(b" ")
        if not key or not value:
            raise ProtocolError("put requires a key and a value")
        return Put(unquote(key), unquote(value))
    raise ProtocolError("unknown command")


class OverLong(NamedTuple):
    """A request line longer than MAX_REQUEST: discarded, but for its first bytes."""

    head: bytes  # up to len("get ") bytes: enough to tell the command


Line = bytes | OverLong


def wrong_protocol(first: bytes) -> str:
    """What the first bytes of a connection that are not a tcp_table request suggest."""
    if first[:1].isdigit():  # socketmap_table(5): a netstring starts "LEN:"
        return "this looks like a socketmap client on a tcp_table listener"
    return f"not a tcp_table client: {first!r} cannot start a 'get KEY' request"


class LineBuffer:
    """Frames a byte stream into LF-terminated lines of at most ``limit`` bytes, LF included.

    Incremental: only bytes that arrive are searched for LF (what is held never
    holds one), and an incomplete line is kept in one bytearray, so a line that
    arrives a byte per read costs about one byte of memory per byte. A longer
    line is not kept: its bytes are dropped as they come, and it is given as
    OverLong when its LF arrives. The first bytes of the stream must be those
    of a request (WrongProtocol otherwise), as soon as they can be judged.
    """

    __slots__ = ("_buffer", "_limit", "_plain", "_skipping", "_started")

    def __init__(self, limit: int = MAX_REQUEST) -> None:
        self._buffer = bytearray()
        self._limit = limit
        self._skipping: bytes | None = None  # the head of an over-long line being dropped
        self._started = False  # the stream began as a request should
        self._plain = False  # started, nothing held or dropped: whole_line() may answer

    def lines(self, data: bytes) -> Iterator[Line]:
        """Add received bytes; yield each complete line, without its LF, in order.

        Raises WrongProtocol before anything else when the stream's first bytes
        cannot start a request. Iterate to the end before the next call.
        """
        if not self._started:
            self._check_start(data)
        start = 0
        if self._skipping is not None or self._buffer:
            end = data.find(b"\n")
            if end == -1:
                self._hold(data, 0)
                return
            held, head = self._buffer, self._skipping
            self._skipping = None
            if head is None and len(held) + end < self._limit:
                held += memoryview(data)[:end]
                line: Line = bytes(held)
            else:
                line = OverLong(head if head is not None else bytes((held + data[:4])[:4]))
            held.clear()
            yield line
            start = end + 1
        find, limit = data.find, self._limit
        while (end := find(b"\n", start)) != -1:
            yield data[start:end] if end - start < limit else OverLong(data[start : start + 4])
            start = end + 1
        self._hold(data, start)

    def _hold(self, data: bytes, start: int) -> None:
        """Keep DATA[START:], an incomplete line (or drop it, once it is over-long)."""
        if self._skipping is None and start < len(data):
            held = self._buffer
            if len(held) + len(data) - start < self._limit:
                held += memoryview(data)[start:]
            else:
                self._skipping = bytes((held + data[start : start + 4])[:4])
                held.clear()
        self._plain = self._started and not self._buffer and self._skipping is None

    def _check_start(self, data: bytes) -> None:
        first = bytes((self._buffer + data[:3])[:3])
        if not any(command.startswith(first) for command in _COMMANDS):
            raise WrongProtocol(first)
        self._started = len(first) == 3

    def feed(self, data: bytes) -> list[Line]:
        """lines(DATA) as a list."""
        return list(self.lines(data))

    def whole_line(self, data: bytes) -> bytes | None:
        """DATA without its LF if it is exactly one line and nothing is held, else None.

        What a client that waits for each reply sends: no need to split or buffer.
        """
        if self._plain and 0 < len(data) <= self._limit and data.find(b"\n") == len(data) - 1:
            return data[:-1]
        return None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held back."""
        return len(self._buffer)

    @property
    def mid_request(self) -> bool:
        """Whether a line has begun (held, or an over-long one being dropped).

        False only between requests: handoff.py hands a connection over only then.
        """
        return bool(self._buffer) or self._skipping is not None


# --- replies ----------------------------------------------------------------


def reply(code: int, text: bytes) -> bytes:
    """One reply line: 3-digit code, SP, hex-quoted text, LF."""
    return b"%d %s\n" % (code, quote(text))


def found(value: bytes) -> bytes | None:
    """The 200 reply for a value, or None if it cannot be sent.

    Postfix rejects a reply longer than MAX_REPLY, and treats an empty value
    as an error in its daemons (maps_find), so neither is ever sent as 200.
    """
    if not value:
        return None
    line = b"200 " + quote(value) + b"\n"  # reply(200, value), without the formatting
    return line if len(line) <= MAX_REPLY else None


def fits(value: bytes) -> bool:
    """Whether a value can be answered with 200 within the reply limit."""
    return found(value) is not None


def temporary(reason: str) -> bytes:
    """400: Postfix defers the mail and retries later."""
    return _truncate(reply(400, reason.encode("utf-8", "replace")))


def _truncate(line: bytes) -> bytes:
    if len(line) <= MAX_REPLY:
        return line
    cut = line[: MAX_REPLY - 1]
    # Never cut inside a %XX escape: that would make the reply malformed.
    tail = cut.rfind(b"%", len(cut) - 2)
    if tail != -1:
        cut = cut[:tail]
    return cut + b"\n"


NOT_FOUND = reply(500, b"not found")
READ_ONLY = reply(500, b"put not supported: table is read-only")
LINE_TOO_LONG = reply(400, b"request line too long")


def over_long(line: OverLong) -> bytes:
    """The reply to a line too long to keep: a key that long is in no table (500)."""
    return NOT_FOUND if line.head == b"get " else LINE_TOO_LONG


# A value stored by other tools that cannot be sent: the mail must wait, not bounce.
VALUE_TOO_LONG = reply(
    400, b"value too long for a tcp_table reply (4096 bytes): look this map up over socketmap"
)


# --- the client side (tcpmap-query, tests) -------------------------------------


def request(key: bytes) -> bytes:
    """The exact line Postfix's dict_tcp sends: ``get SP hex-quoted-key LF``."""
    return b"get " + quote(key) + b"\n"


def parse_reply(line: bytes) -> tuple[int, bytes]:
    """Check a reply line (without LF) as Postfix's client does; (code, decoded text).

    Three ASCII digits, one whitespace byte, then text that must hex-decode
    (postfix-maps.md 1.3). Raises ProtocolError for anything Postfix calls
    "malformed reply".
    """
    if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in b" \t\v\f\r":
        raise ProtocolError(f"malformed reply: {line[:100]!r}")
    return int(line[:3]), unquote(line[4:])
