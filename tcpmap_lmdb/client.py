"""Blocking clients that behave as Postfix's dict_tcp and dict_sockmap: for tcpmap-query.

Errors are worded as Postfix words them (dict_tcp.c: "connect to TCP map
127.0.0.1:4242: Connection refused"), so they name the table in every case.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from . import protocol, socketmap
from .config import Address, ConfigError

DEFAULT_TIMEOUT = 100.0  # dict_tcp.c DICT_TCP_TMOUT

# How main.cf names a table this tool can query (the -s argument).
TABLE_FORMS = (
    "tcp:HOST:PORT (or HOST:PORT), socketmap:inet:HOST:PORT:NAME, "
    "socketmap:unix:PATH:NAME, lmdb:PATH"
)


class LookupFailed(Exception):
    """The server could not answer this key (4xx, TEMP, PERM); the next key may work."""


class ServerFailed(LookupFailed):
    """The connection is unusable (refused, hung up, malformed reply): no key can go on."""


@dataclass(frozen=True, slots=True)
class TableName:
    """A table as main.cf names it: TYPE:NAME (postconf(5) "type:table")."""

    type: str  # "tcp", "socketmap" or "lmdb"
    address: Address | None = None  # tcp, socketmap:inet
    path: str | None = None  # socketmap:unix (the socket), lmdb (the table)
    map: str | None = None  # socketmap: the map name sent with each request

    @classmethod
    def parse(cls, text: str) -> TableName:
        """One of TABLE_FORMS; raises ValueError naming them all."""
        try:
            return cls._parse(text)
        except (ValueError, ConfigError) as exc:
            raise ValueError(f"{exc}; accepted forms: {TABLE_FORMS}") from None

    @classmethod
    def _parse(cls, text: str) -> TableName:
        kind, _, rest = text.partition(":")
        if kind == "lmdb":
            if not rest:
                raise ValueError(f"{text!r}: no file name")
            return cls("lmdb", path=rest)
        if kind == "socketmap":
            where, sep, name = rest.rpartition(":")
            if not sep or not name:
                raise ValueError(f"{text!r}: no map name at the end")
            transport, _, place = where.partition(":")
            if transport == "unix" and place:
                return cls("socketmap", path=place, map=name)
            if where == "unix":  # socketmap:unix:PATH, the name forgotten
                raise ValueError(f"{text!r}: no map name after the socket path")
            if transport == "inet":
                if name.isdigit() and ":" not in place:  # socketmap:inet:HOST:PORT
                    raise ValueError(f"{text!r}: no map name after the port")
                return cls("socketmap", address=Address.parse(place), map=name)
            raise ValueError(f"{text!r}: expected socketmap:inet:... or socketmap:unix:...")
        if kind == "tcp":
            return cls("tcp", address=Address.parse(rest))
        # TYPE:NAME of another table type (hash:/etc/aliases), not HOST:PORT.
        if kind.isalpha() and kind != "localhost" and rest and not rest.isdigit():
            raise ValueError(
                f"{text!r}: unknown table type {kind!r} (postmap -q KEY {text} reads that table)"
            )
        return cls("tcp", address=Address.parse(text))

    @staticmethod
    def looks_like(text: str) -> bool:
        """Whether TEXT is a table name rather than a key (postmap's KEY TABLE order)."""
        if not text.startswith(("tcp:", "socketmap:", "lmdb:")):
            return False
        try:
            TableName._parse(text)
        except (ValueError, ConfigError):
            return False
        return True

    def __str__(self) -> str:
        if self.type == "lmdb":
            return f"lmdb:{self.path}"
        where = f"unix:{self.path}" if self.path is not None else f"inet:{self.address}"
        return (
            f"socketmap:{where}:{self.map}" if self.type == "socketmap" else f"tcp:{self.address}"
        )


def _connect_inet(address: Address, what: str, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((address.host, address.port), timeout=timeout)
    except OSError as exc:
        raise ServerFailed(f"connect to {what} {address}: {_reason(exc)}") from None


def _reason(exc: OSError, timeout: float | None = None) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out" if timeout is None else f"no reply within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror}"
    return exc.strerror or str(exc)


# What each client expected to find at the address, for errors past the connect.
EXPECTED_TCP_TABLE = "expected a tcp_table server (tcp_table(5))"
EXPECTED_SOCKETMAP = "expected a socketmap server (socketmap_table(5))"


def peer_hint(data: bytes) -> str:
    """What the first bytes a peer sent suggest it is: "" if nothing, else "; ...".

    For errors against the wrong kind of listener, e.g. a tcp_table client on a
    metrics listener.
    """
    if data.startswith(b"HTTP/"):
        return "; it answered HTTP: a metrics listener?"
    if re.match(rb"[0-9]{1,6}:", data):
        return "; it answered a netstring: a socketmap listener? (-s socketmap:inet:HOST:PORT:NAME)"
    if re.match(rb"[245][0-9][0-9] ", data):
        return "; it answered a tcp_table reply: a tcp_table listener? (-s tcp:HOST:PORT)"
    return ""


def shown(data: bytes, limit: int = 60) -> str:
    """DATA, at most LIMIT bytes of it, as a Python bytes literal (safe on a terminal)."""
    return repr(data[:limit]) + ("..." if len(data) > limit else "")


class TcpTableClient:
    """One persistent connection; one request, then one reply, in lock-step."""

    def __init__(self, address: Address, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._sock = _connect_inet(address, "TCP map", timeout)
        self._file = self._sock.makefile("rb")

    def lookup(self, key: bytes) -> bytes | None:
        """The value for KEY, or None when the server answers 5xx (not found).

        Raises LookupFailed with the server's decoded reason for 4xx, and
        ServerFailed when the connection is lost or the reply malformed; its
        message names the address and says what was expected there (dict_tcp.c's
        wording first: "read TCP map reply from ADDRESS: ...").
        """
        try:
            self._sock.sendall(protocol.request(key))
            line = self._file.readline(protocol.MAX_REPLY + 1)
        except OSError as exc:
            raise self._failed(_reason(exc, self.timeout)) from None
        if not line.endswith(b"\n"):
            if len(line) > protocol.MAX_REPLY:
                raise self._failed(f"text longer than {protocol.MAX_REPLY}", line)
            raise self._failed("unexpected EOF" + (f" after {shown(line)}" if line else ""), line)
        try:
            code, text = protocol.parse_reply(line[:-1])
        except protocol.ProtocolError:
            raise self._failed(f"malformed reply {shown(line)}", line) from None
        if code // 100 == 2:
            return text.partition(b"\x00")[0]  # hex_unquote'd C string ends at NUL
        if code // 100 == 5:
            return None
        reason = text.decode("utf-8", "replace")
        raise LookupFailed(f"tcp:{self.address} answered {code}: {reason}")

    def _failed(self, detail: str, data: bytes = b"") -> ServerFailed:
        return ServerFailed(
            f"read TCP map reply from {self.address}: {detail}; {EXPECTED_TCP_TABLE}"
            + peer_hint(data)
        )

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
        self.where = f"inet:{where}" if isinstance(where, Address) else f"unix:{where}"
        self.name = name
        self.timeout = timeout
        if isinstance(where, Address):
            self._sock = _connect_inet(where, "socketmap", timeout)
        else:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(where)
            except OSError as exc:
                self._sock.close()
                raise ServerFailed(f"connect to socketmap {self.where}: {_reason(exc)}") from None
        self._file = self._sock.makefile("rb")

    def lookup(self, key: bytes) -> bytes | None:
        """The value for KEY, or None for NOTFOUND; LookupFailed for TEMP, PERM and others."""
        try:
            self._sock.sendall(socketmap.request(self.name, key))
            payload = self._read_netstring()
        except OSError as exc:
            raise self._failed(_reason(exc, self.timeout)) from None
        status, text = socketmap.parse_reply(payload)
        if status == b"OK":
            return text
        if status == b"NOTFOUND":
            return None
        if status not in (b"TEMP", b"PERM"):  # dict_sockmap.c: "malformed reply"
            raise self._failed(f"malformed reply {shown(payload)}")
        reason = text.decode("utf-8", "replace")
        status_text = status.decode("ascii", "replace")
        raise LookupFailed(f"socketmap:{self.where} answered {status_text}: {reason}")

    def _read_netstring(self) -> bytes:
        digits = b""
        while (byte := self._file.read(1)) != b":":
            if not byte:
                raise self._failed("unexpected EOF" + (f" after {shown(digits)}" if digits else ""))
            digits += byte
            if not digits.isdigit() or len(digits) > 12:
                seen = digits + self._ready(60 - len(digits))  # for peer_hint
                raise self._failed(f"bad netstring length {shown(seen)}", seen)
        length = int(digits) if digits else -1  # the loop let only digits in
        if not 0 <= length <= socketmap.MAX_REPLY:
            raise self._failed(f"reply length {digits!r} over the limit")
        payload = self._file.read(length + 1)
        if len(payload) != length + 1 or not payload.endswith(b","):
            raise self._failed(f"malformed netstring reply {shown(digits + b':' + payload)}")
        return payload[:-1]

    def _ready(self, limit: int) -> bytes:
        """Up to LIMIT bytes the peer has sent and we have not read, without waiting."""
        self._sock.setblocking(False)
        try:
            return self._file.peek(limit)[:limit]
        except OSError:
            return b""
        finally:
            self._sock.settimeout(self.timeout)

    def _failed(self, detail: str, data: bytes = b"") -> ServerFailed:
        return ServerFailed(
            f"read socketmap reply from {self.where}: {detail}; {EXPECTED_SOCKETMAP}"
            + peer_hint(data)
        )

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> SocketmapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Client = TcpTableClient | SocketmapClient


def connect(spec: str | TableName, timeout: float = DEFAULT_TIMEOUT) -> Client:
    """A client for a server table named as in main.cf (TABLE_FORMS but lmdb:).

    Raises ValueError for a bad name, ServerFailed when the connection fails.
    """
    name = spec if isinstance(spec, TableName) else TableName.parse(spec)
    if name.type == "socketmap":
        assert name.map is not None  # parse gives every socketmap name a map
        where: Address | str = name.address if name.address is not None else str(name.path)
        return SocketmapClient(where, name.map.encode(), timeout)
    if name.type == "tcp":
        assert name.address is not None
        return TcpTableClient(name.address, timeout)
    raise ValueError(f"{name}: not a server table; look it up with --db {Path(str(name.path))}")


CRLF = b"\r\n"
EXPECTED_METRICS = "expected a tcpmap-server metrics listener (--listen metrics:HOST:PORT)"


def served_tables(address: Address, timeout: float = DEFAULT_TIMEOUT) -> list[list[str]]:
    """--info metrics:HOST:PORT: per map, the NAME: VALUE lines of metrics.served_tables.

    Raises ServerFailed naming metrics:ADDRESS, what went wrong and what was
    expected there, for every way the peer can fail: refused, reset, timed
    out, not HTTP, an HTTP error, or a body that is not a tcpmap-server's metrics.
    """
    # Only here: http.client (and email, ssl) is a fifth of the server's start.
    import http.client  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415

    from . import metrics  # noqa: PLC0415 - prometheus_client only here

    where = f"metrics:{address}"
    try:
        return metrics.served_tables(address, timeout)
    except urllib.error.HTTPError as exc:  # before URLError, its base
        detail, data = f"GET /metrics answered HTTP {exc.code} {exc.reason}", b""
    except urllib.error.URLError as exc:
        reason = exc.reason
        detail = _reason(reason, timeout) if isinstance(reason, OSError) else str(reason)
        data = b""
    except http.client.BadStatusLine as exc:  # RemoteDisconnected included
        raw = getattr(exc, "line", "")  # http.client sets it; typeshed does not say so
        line = raw.encode("latin-1", "replace") if isinstance(raw, str) else b""
        if isinstance(exc, http.client.RemoteDisconnected) or not line:
            # what a socketmap listener does with a request that is no netstring
            detail = "closed the connection without an HTTP reply (a socketmap listener?)"
        else:
            detail = f"no HTTP reply: got {shown(line.rstrip(CRLF))}"
        data = line
    except (http.client.HTTPException, OSError) as exc:
        broken = f"a broken HTTP reply ({type(exc).__name__})"
        detail = _reason(exc, timeout) if isinstance(exc, OSError) else broken
        data = b""
    except ValueError as exc:  # not the text format, not UTF-8, or not ours
        detail, data = f"not a tcpmap-server's metrics ({exc})", b""
    raise ServerFailed(f"{where}: {detail}; {EXPECTED_METRICS}{peer_hint(data)}")
