"""From a request line to its reply line: the protocol meets the table.

Each outcome maps to exactly one reply code: found 200, not found 500, bad
request or any table trouble 400 (Postfix defers and retries: design.md 2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import protocol
from .table import TableError

log = logging.getLogger(__name__)

Lookup = Callable[[bytes], bytes | None]


class Responder:
    __slots__ = ("_lookup",)

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup

    def answer(self, line: bytes) -> bytes:
        """The reply for one request line (without its LF)."""
        try:
            request = protocol.parse_request(line)
        except protocol.ProtocolError as exc:
            return protocol.temporary(str(exc))
        if isinstance(request, protocol.Put):
            return protocol.READ_ONLY
        try:
            value = self._lookup(request.key)
        except TableError as exc:
            return protocol.temporary(str(exc))
        except Exception:
            # An internal fault must defer the mail (400), never bounce it (500).
            log.exception("lookup of %r failed", request.key)
            return protocol.temporary("internal error, see the server log")
        if value is None:
            return protocol.NOT_FOUND
        return protocol.found(value) or protocol.VALUE_TOO_LONG

    def answer_all(self, lines: list[bytes]) -> bytes:
        return b"".join([self.answer(line) for line in lines])
