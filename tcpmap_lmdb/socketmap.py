"""socketmap_table(5) codec, sans-io: netstrings in, requests out; replies to bytes.

Facts are from postfix-maps.md section 2: each request and reply is a netstring
(``LEN:DATA,``); a request is ``name SP key`` with the key sent raw (no %XX
quoting, case preserved); a reply is ``OK value``, ``NOTFOUND ``, ``TEMP reason``,
``TIMEOUT reason`` or ``PERM reason``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from .dbformat import MAX_LOOKUP_KEY

# dict_sockmap.c DICT_SOCKMAP_DEF_MAX_REPLY: the reply payload limit, framing
# not counted. Postfix >= 3.10 lets admins change it (socketmap_max_reply_size);
# older clients, such as Debian 12's 3.7, have it fixed.
MAX_REPLY = 100_000
# The longest request payload kept: a map name (a file name, NAME_MAX 255 bytes),
# SP, and the longest lookup key that can fold to a key a table holds. Postfix
# sends keys of any length (3.7) or up to socketmap_max_query_size (10000 by
# default, 3.12); a longer payload is dropped as it arrives, but for its first
# MAX_REQUEST bytes, and answered NOTFOUND.
MAX_REQUEST = 255 + 1 + MAX_LOOKUP_KEY
# Postfix accepts leading zeros; so do we, within reason. Any length fits in this.
MAX_DIGITS = 20
# The most bytes one reply netstring takes: "100000:" + payload + ",".
MAX_REPLY_BYTES = len(str(MAX_REPLY)) + 1 + MAX_REPLY + 1


class NetstringError(ValueError):
    """The byte stream is not a netstring: the connection cannot be re-synchronised."""


class WrongProtocol(NetstringError):
    """The first bytes of a connection cannot start a netstring: answer, then close.

    ``first`` holds up to four of them, to guess what the client speaks.
    """

    def __init__(self, first: bytes) -> None:
        super().__init__(wrong_protocol(first))
        self.first = first

    @property
    def tcp_table(self) -> bool:
        """Whether the client looks like a tcp_table one: its first bytes begin "get "."""
        return looks_like_tcp_table(self.first)


def looks_like_tcp_table(first: bytes) -> bool:
    """Whether FIRST, a stream's first bytes, can begin tcp_table(5)'s "get SP key"."""
    return b"get ".startswith(first) or first.startswith(b"get ")


def wrong_protocol(first: bytes) -> str:
    """What the first bytes of a connection that are not a netstring suggest."""
    if looks_like_tcp_table(first):
        return "this looks like a tcp_table client on a socketmap listener"
    return f"not a socketmap client: {first!r} cannot start a netstring"


class OverLong(NamedTuple):
    """A well-formed request payload longer than MAX_REQUEST: only its head was kept."""

    head: bytes  # the first MAX_REQUEST bytes: the map name and the start of the key


Payload = bytes | OverLong


class Lookup(NamedTuple):  # one per request: a NamedTuple is cheapest
    name: bytes
    key: bytes


class BadRequest(ValueError):
    """A well-framed request that is not ``name SP key``."""


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


_LENGTH, _DATA, _COMMA = 0, 1, 2  # what NetstringBuffer is reading
_COMMA_BYTE = ord(",")
_NO_COMMA = "netstring not terminated by ','"


class NetstringBuffer:
    """Frames a byte stream into netstring payloads, incrementally.

    Each byte received is looked at once: a length is read as its digits
    arrive, a payload is copied into one bytearray (a request that arrives a
    byte per read costs about one byte of memory per byte), and only its first
    ``limit`` bytes are kept; a longer payload is given as OverLong when its
    comma arrives. Complete netstrings inside one read are sliced out of it
    without copying. The stream must start with a digit (WrongProtocol).
    """

    __slots__ = ("_digits", "_held", "_limit", "_remaining", "_started", "_state")

    def __init__(self, limit: int = MAX_REQUEST) -> None:
        self._limit = limit
        self._state = _LENGTH
        self._digits = bytearray()  # of the length being read
        self._remaining = 0  # payload bytes still to come
        self._held = bytearray()  # the payload so far, up to the limit
        self._started = False

    def whole(self, data: bytes) -> bytes | None:
        """The payload if DATA is exactly one netstring of at most ``limit`` and nothing is
        held, else None: what a client that waits for each reply sends."""
        if self._state != _LENGTH or self._digits or not self._started:
            return None
        colon = data.find(b":", 0, MAX_DIGITS + 1)
        if colon <= 0 or data[-1:] != b"," or not data[:colon].isdigit():
            return None
        length = len(data) - colon - 2
        if length > self._limit or int(data[:colon]) != length:
            return None
        return data[colon + 1 : -1]

    @property
    def pending(self) -> int:
        """Bytes of an incomplete netstring held back, at least 1 while one is begun.

        0 only between requests (handoff.py hands a connection over only then).
        """
        begun = self._state != _LENGTH or bool(self._digits)
        return len(self._digits) + len(self._held) + begun

    def payloads(self, data: bytes) -> Iterator[Payload]:
        """Add received bytes; yield each complete payload in order.

        Raises NetstringError at the first byte that cannot belong to a
        netstring (WrongProtocol if it is the stream's first). Iterate to the
        end before the next call.
        """
        if not self._started and data:
            if not data[:1].isdigit():
                raise WrongProtocol(data[:4])
            self._started = True
        pos, size = 0, len(data)
        while pos < size:
            if self._state == _LENGTH:
                pos = self._length(data, pos)
                if pos < 0:
                    return  # the length is still arriving
                end = pos + self._remaining
                if end < size and self._remaining <= self._limit:  # the whole netstring is here
                    if data[end] != _COMMA_BYTE:
                        raise NetstringError(_NO_COMMA)
                    yield data[pos:end]
                    pos = end + 1
                    continue
                self._state = _DATA
            elif self._state == _DATA:
                pos = self._data(data, pos)
            else:
                if data[pos] != _COMMA_BYTE:
                    raise NetstringError(_NO_COMMA)
                yield self._payload()
                pos += 1

    def _length(self, data: bytes, pos: int) -> int:
        """Read length digits from POS: where the payload starts, or -1 if the ':' is to come."""
        room = MAX_DIGITS - len(self._digits)
        colon = data.find(b":", pos, pos + room + 1)
        digits = data[pos : colon if colon != -1 else pos + room + 1]
        if digits and not digits.isdigit():
            raise NetstringError(f"bad netstring length {bytes(self._digits) + digits!r}")
        self._digits += digits
        if colon == -1:
            if len(self._digits) > MAX_DIGITS:
                raise NetstringError(f"netstring length of over {MAX_DIGITS} digits")
            return -1
        if not self._digits:
            raise NetstringError("netstring length missing before ':'")
        self._remaining = int(self._digits)
        self._digits.clear()
        return colon + 1

    def _data(self, data: bytes, pos: int) -> int:
        """Take payload bytes from POS, keeping up to the limit (and one more); where they end."""
        take = min(self._remaining, len(data) - pos)
        room = self._limit + 1 - len(self._held)
        if room > 0:
            self._held += memoryview(data)[pos : pos + min(take, room)]
        self._remaining -= take
        if not self._remaining:
            self._state = _COMMA
        return pos + take

    def _payload(self) -> Payload:
        held, self._held, self._state = self._held, bytearray(), _LENGTH
        if len(held) <= self._limit:
            return bytes(held)
        return OverLong(bytes(held[: self._limit]))

    def feed(self, data: bytes) -> list[Payload]:
        """payloads(DATA) as a list."""
        return list(self.payloads(data))


def parse_request(payload: bytes) -> Lookup:
    """``name SP key``: the name is up to the first space, the key is the rest, raw.

    An empty key is a lookup like any other, and no table holds it: `postmap -q -`
    sends one for a blank line, and lmdb: answers it not found.
    """
    name, sep, key = payload.partition(b" ")
    if not sep or not name:
        raise BadRequest("expected 'name key'")
    return Lookup(name, key)


def ok(value: bytes) -> bytes | None:
    """The OK reply for a value, or None when it cannot be sent.

    An empty value is an error to Postfix's daemons (maps_find), and a payload
    over MAX_REPLY fails the lookup ("input exceeds size limit").
    """
    if not value or len(value) + 3 > MAX_REPLY:
        return None
    return netstring(b"OK " + value)


def temporary(reason: str) -> bytes:
    return netstring(b"TEMP " + _text(reason))


def permanent(reason: str) -> bytes:
    return netstring(b"PERM " + _text(reason))


def _text(reason: str) -> bytes:
    return reason.encode("utf-8", "replace")[: MAX_REPLY - 5]


NOT_FOUND = netstring(b"NOTFOUND ")
VALUE_TOO_LONG = temporary("value too long for a socketmap reply")


# --- the client side (tcpmap-query, tests) -------------------------------------


def request(name: bytes, key: bytes) -> bytes:
    """What Postfix's dict_sockmap sends: netstring of ``name SP key``."""
    return netstring(name + b" " + key)


def parse_reply(payload: bytes) -> tuple[bytes, bytes]:
    """(status word, rest) split at the first space, as dict_sockmap does."""
    status, _, rest = payload.partition(b" ")
    return status, rest
