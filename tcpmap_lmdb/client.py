"""A blocking tcp_table client, as Postfix's dict_tcp behaves: for tcpmap-query and tests."""

from __future__ import annotations

import socket

from . import protocol
from .config import Address

DEFAULT_TIMEOUT = 100.0  # dict_tcp.c DICT_TCP_TMOUT


class LookupFailed(Exception):
    """The server answered 4xx, something Postfix would reject, or hung up."""


class TcpTableClient:
    """One persistent connection; one request, then one reply, in lock-step."""

    def __init__(self, address: Address, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self._sock = socket.create_connection((address.host, address.port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def lookup(self, key: bytes) -> bytes | None:
        """The value for KEY, or None when the server answers 5xx (not found)."""
        self._sock.sendall(protocol.request(key))
        line = self._file.readline(protocol.MAX_REPLY + 1)
        if not line.endswith(b"\n"):
            if len(line) > protocol.MAX_REPLY:
                raise LookupFailed(f"{self.address}: reply longer than {protocol.MAX_REPLY}")
            raise LookupFailed(f"{self.address}: unexpected EOF")
        try:
            code, text = protocol.parse_reply(line[:-1])
        except protocol.ProtocolError as exc:
            raise LookupFailed(f"{self.address}: {exc}") from None
        if code // 100 == 2:
            return text.partition(b"\x00")[0]  # hex_unquote'd C string ends at NUL
        if code // 100 == 5:
            return None
        raise LookupFailed(f"{self.address}: {line[:-1].decode('ascii', 'replace')}")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> TcpTableClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
