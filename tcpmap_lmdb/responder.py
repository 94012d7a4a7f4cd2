"""From a request to its reply: the protocols meet the tables.

Each outcome maps to exactly one reply: tcp_table found 200, not found 500, bad
request or any table trouble 400 (Postfix defers and retries: design.md 2);
socketmap OK, NOTFOUND, TEMP, and PERM for an unknown map.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import protocol, socketmap
from .maps import Maps, UnknownMap
from .table import TableError

log = logging.getLogger(__name__)

Lookup = Callable[[bytes], bytes | None]


class Responder:
    __slots__ = ("_lookup",)

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup

    def answer(self, line: bytes) -> bytes:
        """The reply for one request line (without its LF)."""
        key = protocol.plain_get(line)
        if key is None:  # anything but a plain "get KEY": the full parser
            try:
                request = protocol.parse_request(line)
            except protocol.ProtocolError as exc:
                return protocol.temporary(str(exc))
            if isinstance(request, protocol.Put):
                return protocol.READ_ONLY
            key = request.key
        try:
            value = self._lookup(key)
        except TableError as exc:
            return protocol.temporary(str(exc))
        except Exception:
            # An internal fault must defer the mail (400), never bounce it (500).
            log.exception("lookup of %r failed", key)
            return protocol.temporary("internal error, see the server log")
        if value is None:
            return protocol.NOT_FOUND
        return protocol.found(value) or protocol.VALUE_TOO_LONG

    def answer_all(self, lines: list[bytes]) -> bytes:
        return b"".join([self.answer(line) for line in lines])


class SocketmapResponder:
    """socketmap requests: the map is named in each request (socketmap_table(5)).

    Unknown map names are configuration errors (PERM); table trouble is TEMP,
    so Postfix defers the mail and retries.
    """

    __slots__ = ("_maps",)

    def __init__(self, maps: Maps) -> None:
        self._maps = maps

    def answer(self, payload: bytes) -> bytes:
        """The reply netstring for one request payload."""
        try:
            request = socketmap.parse_request(payload)
        except socketmap.BadRequest as exc:
            return socketmap.permanent(f"bad request: {exc}")
        name = request.name.decode("utf-8", "replace")
        try:
            table = self._maps.get(name)
            value = table.lookup(request.key) if b"\x00" not in request.key else None
        except UnknownMap:
            return socketmap.permanent(f"unknown map {name!r}")
        except TableError as exc:
            return socketmap.temporary(str(exc))
        except Exception:
            log.exception("socketmap lookup of %r in %s failed", request.key, name)
            return socketmap.temporary("internal error, see the server log")
        if value is None:
            return socketmap.NOT_FOUND
        return socketmap.ok(value) or socketmap.VALUE_TOO_LONG

    def answer_any(self, payload: socketmap.Payload) -> bytes:
        """The reply netstring for a payload, or for one too long to keep whole."""
        if type(payload) is bytes:
            return self.answer(payload)
        assert isinstance(payload, socketmap.OverLong)
        return self.answer_over_long(payload.head)

    def answer_over_long(self, head: bytes) -> bytes:
        """NOTFOUND for a known map (no table holds a key that long), PERM for an unknown one.

        HEAD is the first socketmap.MAX_REQUEST bytes, so it holds any map name.
        """
        name, sep, _ = head.partition(b" ")
        if not sep or not name:
            return socketmap.permanent("bad request: expected 'name key'")
        try:
            self._maps.get(name.decode("utf-8", "replace"))
        except UnknownMap:
            return socketmap.permanent(f"unknown map {name.decode('utf-8', 'replace')!r}")
        return socketmap.NOT_FOUND

    def answer_all(self, payloads: list[bytes]) -> bytes:
        return b"".join([self.answer(payload) for payload in payloads])
