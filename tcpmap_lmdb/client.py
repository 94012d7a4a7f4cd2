"""Blocking clients that behave as Postfix's dict_tcp and dict_sockmap: for tcpmap-query."""

from __future__ import annotations

import socket

from . import protocol, socketmap
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


class SocketmapClient:
    """socketmap_table(5), as Postfix's dict_sockmap: one request, then one reply."""

    def __init__(self, where: Address | str, name: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.where = str(where)
        self.name = name
        if isinstance(where, Address):
            self._sock = socket.create_connection((where.host, where.port), timeout=timeout)
        else:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            self._sock.connect(where)
        self._file = self._sock.makefile("rb")

    def lookup(self, key: bytes) -> bytes | None:
        """The value for KEY, or None for NOTFOUND; LookupFailed for TEMP, PERM and others."""
        self._sock.sendall(socketmap.request(self.name, key))
        status, text = socketmap.parse_reply(self._read_netstring())
        if status == b"OK":
            return text
        if status == b"NOTFOUND":
            return None
        reason = text.decode("utf-8", "replace")
        raise LookupFailed(f"{self.where}: {status.decode('ascii', 'replace')} {reason}")

    def _read_netstring(self) -> bytes:
        digits = b""
        while (byte := self._file.read(1)) != b":":
            if not byte:
                raise LookupFailed(f"{self.where}: unexpected EOF")
            digits += byte
            if not digits.isdigit() or len(digits) > 12:
                raise LookupFailed(f"{self.where}: bad netstring length {digits!r}")
        length = int(digits) if digits else -1  # the loop let only digits in
        if not 0 <= length <= socketmap.MAX_REPLY:
            raise LookupFailed(f"{self.where}: reply length {digits!r} over the limit")
        payload = self._file.read(length + 1)
        if len(payload) != length + 1 or not payload.endswith(b","):
            raise LookupFailed(f"{self.where}: malformed netstring reply")
        return payload[:-1]

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> SocketmapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Client = TcpTableClient | SocketmapClient


def connect(spec: str, timeout: float = DEFAULT_TIMEOUT) -> Client:
    """A client for a table named as in Postfix's main.cf (the type prefix optional):

    ``HOST:PORT``, ``tcp:HOST:PORT``, ``socketmap:inet:HOST:PORT:NAME``,
    ``socketmap:unix:PATH:NAME``.
    """
    if spec.startswith("socketmap:"):
        rest, sep, name = spec[len("socketmap:") :].rpartition(":")
        if not sep or not name:
            raise ValueError(f"{spec!r}: expected socketmap:inet:HOST:PORT:NAME or unix:PATH:NAME")
        if rest.startswith("unix:"):
            return SocketmapClient(rest[5:], name.encode(), timeout)
        if rest.startswith("inet:"):
            return SocketmapClient(Address.parse(rest[5:]), name.encode(), timeout)
        raise ValueError(f"{spec!r}: expected socketmap:inet:... or socketmap:unix:...")
    address = spec[4:] if spec.startswith("tcp:") else spec
    return TcpTableClient(Address.parse(address), timeout)
