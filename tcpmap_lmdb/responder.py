"""From a request to its reply: the protocols meet the tables.

Each outcome maps to exactly one reply: tcp_table found 200, not found 500, bad
request or any table trouble 400 (Postfix defers and retries: design.md 2);
socketmap OK, NOTFOUND, TEMP, and PERM for an unknown map.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import protocol, socketmap
from .logtext import printable
from .maps import Maps, UnknownMap
from .table import TableError

log = logging.getLogger(__name__)

Lookup = Callable[[bytes], bytes | None]


class Responder:
    """tcp_table requests, answered from one map (NAME, for the log).

    Counts its replies by result in plain ints (found, notfound, temporary)
    for the metrics, which read them at scrape time: an increment is all a
    lookup pays for them.
    """

    __slots__ = ("_lookup", "_name", "_warned", "found", "notfound", "temporary")

    def __init__(self, lookup: Lookup, name: str = "") -> None:
        self._lookup = lookup
        self._name = name
        self._warned = False  # a value too long for tcp_table has been logged
        self.found = self.notfound = self.temporary = 0

    @property
    def map_name(self) -> str:
        return self._name

    def answer(self, line: bytes) -> bytes:  # noqa: PLR0911 - a return per reply, each counted
        """The reply for one request line (without its LF)."""
        key = protocol.plain_get(line)
        if key is None:  # anything but a plain "get KEY": the full parser
            try:
                request = protocol.parse_request(line)
            except protocol.ProtocolError as exc:
                self.temporary += 1
                return protocol.temporary(str(exc))
            if isinstance(request, protocol.Put):
                self.notfound += 1
                return protocol.READ_ONLY
            key = request.key
        try:
            value = self._lookup(key)
        except TableError as trouble:  # not exc: mypyc gives a name one type per function
            self.temporary += 1
            return protocol.temporary(str(trouble))
        except Exception:
            # An internal fault must defer the mail (400), never bounce it (500).
            log.exception("lookup of %s failed", printable(key))
            self.temporary += 1
            return protocol.temporary("internal error, see the server log")
        if value is None:
            self.notfound += 1
            return protocol.NOT_FOUND
        reply = protocol.found(value)
        if reply is None:
            return self._too_long(key, value)
        self.found += 1
        return reply

    def _too_long(self, key: bytes, value: bytes) -> bytes:
        self.temporary += 1
        if not self._warned:  # once: each lookup of such a key would log it again
            self._warned = True
            log.warning(
                "map %s: the value of key %s (%d bytes) does not fit a tcp_table reply: answered "
                "400; query this map over socketmap (logged once)",
                self._name,
                printable(key),
                len(value),
            )
        return protocol.VALUE_TOO_LONG

    def answer_all(self, lines: list[bytes]) -> bytes:
        return b"".join([self.answer(line) for line in lines])


class SocketmapResponder:
    """socketmap requests: the map is named in each request (socketmap_table(5)).

    Unknown map names are configuration errors (PERM); table trouble is TEMP,
    so Postfix defers the mail and retries.
    """

    __slots__ = ("_maps", "found", "notfound", "permanent", "temporary")

    def __init__(self, maps: Maps) -> None:
        self._maps = maps
        # Replies by result, for the metrics: by map name, but PERM (an unknown
        # map, a bad request): a client could make up any number of names.
        self.found: dict[str, int] = {}
        self.notfound: dict[str, int] = {}
        self.temporary: dict[str, int] = {}
        self.permanent = 0

    def answer(self, payload: bytes) -> bytes:  # noqa: PLR0911 - a return per reply, each counted
        """The reply netstring for one request payload."""
        try:
            request = socketmap.parse_request(payload)
        except socketmap.BadRequest as exc:
            self.permanent += 1
            return socketmap.permanent(f"bad request: {exc}")
        name = request.name.decode("utf-8", "replace")
        try:
            table = self._maps.get(name)
            value = table.lookup(request.key) if b"\x00" not in request.key else None
        except UnknownMap:
            self.permanent += 1
            return socketmap.permanent(f"unknown map {name!r}")
        except TableError as trouble:  # not exc, as in Responder.answer
            self._count(self.temporary, name)
            return socketmap.temporary(str(trouble))
        except Exception:
            log.exception(
                "socketmap lookup of %s in %s failed", printable(request.key), printable(name)
            )
            self._count(self.temporary, name)
            return socketmap.temporary("internal error, see the server log")
        if value is None:
            counts = self.notfound
            counts[name] = counts.get(name, 0) + 1
            return socketmap.NOT_FOUND
        reply = socketmap.ok(value)
        if reply is None:
            self._count(self.temporary, name)
            return socketmap.VALUE_TOO_LONG
        counts = self.found
        counts[name] = counts.get(name, 0) + 1
        return reply

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
            self.permanent += 1
            return socketmap.permanent("bad request: expected 'name key'")
        try:
            self._maps.get(name.decode("utf-8", "replace"))
        except UnknownMap:
            self.permanent += 1
            return socketmap.permanent(f"unknown map {name.decode('utf-8', 'replace')!r}")
        self._count(self.notfound, name.decode("utf-8", "replace"))
        return socketmap.NOT_FOUND

    @staticmethod
    def _count(counts: dict[str, int], name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    def answer_all(self, payloads: list[bytes]) -> bytes:
        return b"".join([self.answer(payload) for payload in payloads])


# --- -v: one log line per lookup --------------------------------------------------
# Bound at start instead of Responder/SocketmapResponder, so without -v a lookup
# pays nothing for it: not even a test of a flag. Everything the client sent (key,
# map name, and the reasons that quote them) goes through logtext.printable:
# non-printable bytes as \xNN, so no client can end a log line or forge one.

_TCP_RESULTS = {b"2": "found", b"5": "not found", b"4": "temporary"}
_SOCKETMAP_RESULTS = {b"OK": "found", b"NOTFOUND": "not found", b"PERM": "permanent"}


class LoggedResponder(Responder):
    """A tcp_table Responder that logs each request: client, map, key as sent, result, time.

    The key is logged as sent (%XX-quoted by Postfix), through logtext.printable:
    a byte Postfix would have quoted but a client sent raw shows as \\xNN.
    PEER is already printable (listeners.format_address).
    """

    __slots__ = ("_inner", "_map", "_peer")

    def __init__(self, inner: Responder, peer: str, map_name: str) -> None:
        self._inner = inner
        self._peer = peer
        self._map = map_name

    def answer(self, line: bytes) -> bytes:
        started = time.perf_counter_ns()
        reply = self._inner.answer(line)
        micros = (time.perf_counter_ns() - started) // 1000
        key = line[4:] if line.startswith(b"get ") else line  # hex-quoted, as sent
        result = _TCP_RESULTS.get(reply[:1], "error")
        if result == "temporary":
            result = f"temporary: {_decoded_reason(reply)}"
        log.debug(
            "%s: tcp_table map %s key %s: %s, %d us",
            self._peer,
            self._map,
            printable(key),
            printable(result),
            micros,
            extra={"CLIENT": self._peer},
        )
        return reply

    def answer_all(self, lines: list[bytes]) -> bytes:
        return b"".join([self.answer(line) for line in lines])


def _decoded_reason(reply: bytes) -> str:
    try:
        return protocol.parse_reply(reply.rstrip(b"\n"))[1].decode("utf-8", "replace")
    except protocol.ProtocolError:
        return reply.decode("ascii", "replace")


class LoggedSocketmapResponder(SocketmapResponder):
    """A SocketmapResponder that logs each request as LoggedResponder does."""

    __slots__ = ("_inner", "_peer")

    def __init__(self, inner: SocketmapResponder, peer: str) -> None:
        self._inner = inner
        self._peer = peer

    def answer(self, payload: bytes) -> bytes:
        started = time.perf_counter_ns()
        reply = self._inner.answer(payload)
        micros = (time.perf_counter_ns() - started) // 1000
        name, _, key = payload.partition(b" ")
        reply_payload = reply[reply.index(b":") + 1 : -1]
        status, _, reason = reply_payload.partition(b" ")
        result = _SOCKETMAP_RESULTS.get(status)
        if result is None:
            result = (
                f"{status.decode('ascii', 'replace').lower()}: {reason.decode('utf-8', 'replace')}"
            )
        elif status == b"PERM":
            result = f"permanent: {reason.decode('utf-8', 'replace')}"
        log.debug(
            "%s: socketmap map %s key %s: %s, %d us",
            self._peer,
            printable(name),
            printable(key),
            printable(result),
            micros,
            extra={"CLIENT": self._peer},
        )
        return reply

    def answer_over_long(self, head: bytes) -> bytes:
        return self._inner.answer_over_long(head)

    def answer_all(self, payloads: list[bytes]) -> bytes:
        return b"".join([self.answer(payload) for payload in payloads])
