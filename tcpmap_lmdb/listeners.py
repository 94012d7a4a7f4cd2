"""Listening sockets: inherited from systemd, or bound from --listen."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gevent.socket

from .config import METRICS, Address, Binding, ConfigError, ListenSpec, ServerConfig
from .logtext import printable
from .systemd import Listener

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024  # bursts of Postfix processes connecting at once
# Like a loopback port, which every local user can reach: the socket unit sets
# owner and mode when it matters (SocketUser=, SocketMode=).
UNIX_SOCKET_MODE = 0o666


class ListenError(Exception):
    """A listener cannot be opened; the message names its address and the reason."""


@dataclass(frozen=True)
class Endpoint:
    sock: gevent.socket.socket
    binding: Binding
    origin: str  # for the log: where it came from
    created: Path | None = None  # a unix socket file we made, removed on exit
    created_id: tuple[int, int] | None = None  # its (st_dev, st_ino)

    @property
    def where(self) -> str:
        if self.created is not None:  # bound at a private name, then linked here (bind_unix)
            return format_address(str(self.created))
        return format_address(self.sock.getsockname())


def open_endpoints(config: ServerConfig, inherited: list[Listener]) -> list[Endpoint]:
    """The listening sockets systemd passed (INHERITED), if any; else the --listen ones.

    Without a --listen that serves maps, the default map listener too
    (ServerConfig.listeners). Raises ConfigError when systemd passes only metrics
    sockets: the service cannot bind an address itself (PrivateNetwork=yes).
    """
    if not inherited:
        return _bind_all(config.listeners, config.listen)
    if all(Binding.from_fd_name(listener.name).protocol == METRICS for listener in inherited):
        for listener in inherited:
            listener.sock.close()
        raise ConfigError(
            "systemd passed only a metrics socket (FileDescriptorName=metrics): no socket "
            "serves maps. Start tcpmap.socket too (the packaged tcpmap.service requires it), "
            "or give the service a socket for maps"
        )
    if config.listen:
        log.warning("serving the sockets systemd passed; --listen is ignored")
    endpoints = []
    for listener in inherited:
        binding = Binding.from_fd_name(listener.name)
        try:
            config.check_binding(binding, f"socket {listener.name!r} from systemd")
        except ConfigError:
            for other in inherited:
                other.sock.close()
            raise
        log.info("inherited socket %r from systemd", listener.name)
        endpoints.append(Endpoint(listener.sock, binding, f"systemd {listener.name!r}"))
    return endpoints


def _bind_all(specs: tuple[ListenSpec, ...], given: tuple[ListenSpec, ...]) -> list[Endpoint]:
    """Bind every spec, or none: a failure closes and removes what was already bound.
    A spec not among GIVEN (the --listen ones) is the default map listener."""
    endpoints: list[Endpoint] = []
    try:
        for spec in specs:
            try:
                sock = bind(spec)
            except OSError as exc:
                where = f"unix:{spec.path}" if spec.path is not None else str(spec.address)
                raise ListenError(f"cannot listen on {where}: {_reason(exc)}") from None
            created_id = _file_id(spec.path) if spec.path is not None else None
            origin = "--listen" if spec in given else "the default"
            if spec not in given and given:
                origin += ": no --listen serves maps"
            endpoints.append(Endpoint(sock, spec.binding, origin, spec.path, created_id))
    except BaseException:
        remove_socket_files(endpoints)
        for endpoint in endpoints:
            endpoint.sock.close()
        raise
    return endpoints


def remove_socket_files(endpoints: list[Endpoint]) -> None:
    """Remove the unix socket files we created, if they are still ours.

    Never those systemd made, nor one another server has put at the same path
    since (a file is ours while its inode is the one we bound).
    """
    for endpoint in endpoints:
        path = endpoint.created
        if path is not None and _file_id(path) == endpoint.created_id:
            path.unlink(missing_ok=True)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def bind(spec: ListenSpec) -> gevent.socket.socket:
    if spec.path is not None:
        return bind_unix(spec.path)
    assert spec.address is not None  # ListenSpec.parse gives one or the other
    return bind_inet(spec.address)


def bind_inet(address: Address) -> gevent.socket.socket:
    """A listening, non-blocking gevent socket for ADDRESS."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = gevent.socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit TCP_NODELAY on Linux.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_unix(path: Path) -> gevent.socket.socket:
    """A listening unix socket at PATH with mode UNIX_SOCKET_MODE from its creation.

    Anyone who can write PATH's directory could swap a symlink in at PATH, so
    nothing is ever done to PATH itself once it exists: the socket is bound
    under a umask that gives its final mode, inside a fresh private directory
    (mkdtemp, 0700) beside PATH, then hard-linked to PATH, which never follows a
    symlink and fails if anything is there. A stale socket at PATH (nobody
    listening) is unlinked first; any other file, a symlink included, is refused.
    """
    _remove_stale_socket(path)
    private = Path(tempfile.mkdtemp(prefix=".tcpmap-", dir=path.parent))
    staged = private / "s"
    sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777 & ~UNIX_SOCKET_MODE)  # bind() creates 0777 & ~umask
        try:
            sock.bind(str(staged))
        finally:
            os.umask(old_umask)
        sock.listen(LISTEN_BACKLOG)
        try:
            os.link(staged, path)
        except FileExistsError:
            message = f"{path}: something appeared there while binding; not replacing it"
            raise OSError(errno.EEXIST, message) from None
    except BaseException:
        sock.close()
        raise
    finally:
        staged.unlink(missing_ok=True)
        private.rmdir()
    return sock


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file at PATH nobody listens on; refuse anything else there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path}: exists and is not a socket")
    if _answers(path):
        raise OSError(errno.EADDRINUSE, f"{path}: another server is listening there")
    path.unlink()  # unlink() acts on the entry itself, never on a symlink's target


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror}"
    if exc.errno == errno.EADDRINUSE and exc.strerror and "listening" not in exc.strerror:
        return f"{exc.strerror} (another server, or another --listen, is on it)"
    return exc.strerror or str(exc)


def format_address(name: object) -> str:
    """A socket address for the log: HOST:PORT, [HOST]:PORT, or unix:PATH.

    A unix client can bind its socket to any path before it connects, and that
    path is its peer address here: it goes through logtext.printable, so no
    client can put a line break or a terminal escape in the log.
    """
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(name, bytes | str) and name:
        return f"unix:{printable(name)}"
    return "unix socket"


def client_key(sock: socket.socket, address: object) -> str:
    """Who a client is, for the warning budget: its IP address without the port, or
    for a unix socket the peer's uid (SO_PEERCRED)."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return "unix socket"
    _, uid, _ = struct.unpack("3i", creds)
    return f"unix socket, uid {uid}"
