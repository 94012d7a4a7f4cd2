"""socketmap_table(5) codec, sans-io: netstrings in, requests out; replies to bytes.

Facts are from postfix-maps.md section 2: each request and reply is a netstring
(``LEN:DATA,``); a request is ``name SP key`` with the key sent raw (no %XX
quoting, case preserved); a reply is ``OK value``, ``NOTFOUND ``, ``TEMP reason``,
``TIMEOUT reason`` or ``PERM reason``.
"""

from __future__ import annotations

from typing import NamedTuple

# dict_sockmap.c DICT_SOCKMAP_DEF_MAX_REPLY: the reply payload limit, framing
# not counted. Postfix >= 3.10 lets admins change it (socketmap_max_reply_size);
# older clients, such as Debian 12's 3.7, have it fixed.
MAX_REPLY = 100_000
# Postfix sends keys up to socketmap_max_query_size (10000 by default, 3.12)
# plus the map name; allow ten times that before calling the peer broken.
MAX_REQUEST = 100_000
_MAX_DIGITS = len(str(MAX_REQUEST)) + 8  # Postfix accepts leading zeros; so do we, within reason


class NetstringError(ValueError):
    """The byte stream is not a netstring: the connection cannot be re-synchronised.

    ``payloads`` holds the complete requests that arrived before the error.
    """

    def __init__(self, message: str, payloads: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.payloads = payloads or []


class Lookup(NamedTuple):  # one per request: a NamedTuple is cheapest
    name: bytes
    key: bytes


class BadRequest(ValueError):
    """A well-framed request that is not ``name SP key``."""


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class NetstringBuffer:
    """Frames a byte stream into netstring payloads of at most MAX_REQUEST bytes.

    While a payload of known length is still arriving, received chunks are only
    collected, not re-scanned: a request trickled a byte at a time costs linear
    work, not quadratic.
    """

    __slots__ = ("_chunks", "_held", "_limit", "_needed")

    def __init__(self, limit: int = MAX_REQUEST) -> None:
        self._chunks: list[bytes] = []
        self._held = 0  # bytes in _chunks
        self._needed = 0  # bytes to hold before scanning again is worthwhile
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete payloads.

        Raises NetstringError at the first byte that cannot belong to a
        netstring, or as soon as a length over the limit is announced.
        """
        self._chunks.append(data)
        self._held += len(data)
        if self._held < self._needed:
            return []
        buffer = b"".join(self._chunks) if len(self._chunks) > 1 else data
        payloads: list[bytes] = []
        try:
            start, self._needed = self._split(buffer, payloads)
        except NetstringError as exc:
            self._chunks, self._held, self._needed = [], 0, 0
            exc.payloads = payloads
            raise
        rest = buffer[start:]
        self._chunks, self._held = ([rest] if rest else []), len(rest)
        return payloads

    @property
    def pending(self) -> int:
        """Bytes of an incomplete netstring held back."""
        return self._held

    def _split(self, buffer: bytes, payloads: list[bytes]) -> tuple[int, int]:
        """Append complete payloads: (where the incomplete rest starts, bytes it needs)."""
        start = 0
        while start < len(buffer):
            colon = buffer.find(b":", start, start + _MAX_DIGITS + 1)
            if colon == -1:
                digits = buffer[start : start + _MAX_DIGITS + 1]
                if not digits.isdigit() or len(digits) > _MAX_DIGITS:
                    raise NetstringError(f"bad netstring length {digits[:20]!r}")
                return start, 0  # the length is still arriving
            digits = buffer[start:colon]
            if not digits.isdigit():
                raise NetstringError(f"bad netstring length {digits[:20]!r}")
            length = int(digits)
            if length > self._limit:
                raise NetstringError(f"netstring of {length} bytes exceeds {self._limit}")
            end = colon + 1 + length
            if len(buffer) <= end:
                return start, end + 1 - start  # payload or its comma still arriving
            if buffer[end] != ord(","):
                raise NetstringError("netstring not terminated by ','")
            payloads.append(buffer[colon + 1 : end])
            start = end + 1
        return start, 0


def parse_request(payload: bytes) -> Lookup:
    """``name SP key``: the name is up to the first space, the key is the rest, raw."""
    name, sep, key = payload.partition(b" ")
    if not sep or not name:
        raise BadRequest("expected 'name key'")
    if not key:
        raise BadRequest("empty key")
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
