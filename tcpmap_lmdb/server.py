"""Thin gevent glue: listeners, one greenlet per connection, timeouts, limits, shutdown."""

from __future__ import annotations

import logging
import resource
import signal
import socket
from collections.abc import Callable, Iterable

import gevent
import gevent.event
import gevent.pool
import gevent.socket
from gevent.server import StreamServer

from . import protocol
from .config import DEFAULT_LISTEN, Address, ServerConfig
from .responder import Responder
from .systemd import Notifier, inherited_listeners
from .table import LiveTable

log = logging.getLogger(__name__)

RECV_SIZE = 65536
LISTEN_BACKLOG = 1024  # bursts of Postfix processes connecting at once
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to systemd


class _Stopping(Exception):
    """Thrown into idle connections when the server shuts down."""


def bind(address: Address) -> gevent.socket.socket:
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


class Server:
    """Serves one LiveTable on the given listening sockets."""

    def __init__(
        self,
        config: ServerConfig,
        table: LiveTable,
        listeners: Iterable[gevent.socket.socket],
    ) -> None:
        self._config = config
        self._table = table
        self._responder = Responder(table.lookup)
        self._pool = gevent.pool.Pool(config.max_connections)
        self._servers = [StreamServer(s, self._handle, spawn=self._pool) for s in listeners]
        self._idle: set[gevent.Greenlet[..., None]] = set()
        self._stopping = False
        self._stop_requested = gevent.event.Event()
        self.connections = 0
        self.lookups = 0

    @property
    def addresses(self) -> list[str]:
        return [_format_sockname(s.socket.getsockname()) for s in self._servers]

    def start(self) -> None:
        _raise_fd_limit(self._config.max_connections)
        for server in self._servers:
            server.start()
        for address in self.addresses:
            log.info("listening on %s", address)

    def request_stop(self) -> None:
        """Safe from a signal handler: the main greenlet does the work."""
        self._stop_requested.set()

    def serve_until_stopped(self, before_stop: Callable[[], None] = lambda: None) -> None:
        self._stop_requested.wait()
        before_stop()
        self.stop()

    def stop(self) -> None:
        """Stop accepting, answer what was already read, close every connection."""
        log.info("stopping: closing listeners, %d connections open", self.connections)
        self._stopping = True
        for server in self._servers:
            server.close()
        for greenlet in list(self._idle):
            greenlet.kill(_Stopping, block=False)
        self._pool.join(timeout=self._config.stop_timeout)
        self._pool.kill(timeout=1)
        log.info("stopped after %d lookups", self.lookups)

    # --- one connection -----------------------------------------------------

    def _handle(self, sock: gevent.socket.socket, address: object) -> None:
        self.connections += 1
        buffer = protocol.LineBuffer()
        idle_timeout = self._config.idle_timeout
        current = gevent.getcurrent()
        assert isinstance(current, gevent.Greenlet)  # StreamServer spawns one per connection
        try:
            while not self._stopping:
                # One timer covers reading a request and writing its reply: an idle
                # client and one that stops reading its replies are both cut off.
                # A new one each time: a cancelled gevent.Timeout that is started
                # again only runs for what was left of its time (libev semantics).
                timer = gevent.Timeout(idle_timeout)
                timer.start()
                try:
                    self._idle.add(current)
                    try:
                        data = sock.recv(RECV_SIZE)
                    except _Stopping:
                        data = _read_pending(sock)
                    finally:
                        self._idle.discard(current)
                    if not data or not self._serve(sock, address, buffer, data):
                        return
                except gevent.Timeout as exc:
                    if exc is not timer:
                        raise
                    log.debug("%s: idle for %ss, closing", _peer(address), timer.seconds)
                    return
                finally:
                    timer.close()
            # Shutting down: answer requests that already arrived, then close.
            pending = _read_pending(sock)
            if pending:
                self._serve(sock, address, buffer, pending)
        except OSError as exc:
            log.debug("%s: %s", _peer(address), exc)
        except _Stopping:
            pass  # the kill landed after recv returned: the connection just closes
        finally:
            self.connections -= 1

    def _serve(
        self, sock: gevent.socket.socket, address: object, buffer: protocol.LineBuffer, data: bytes
    ) -> bool:
        """Answer every complete line in DATA; False when the connection must close."""
        try:
            lines = buffer.feed(data)
        except protocol.LineTooLong as exc:
            peer = _peer(address)
            log.warning("%s: %s, closing the connection", peer, exc, extra={"CLIENT": peer})
            sock.sendall(self._answer(exc.lines) + protocol.LINE_TOO_LONG)
            return False
        if lines:
            sock.sendall(self._answer(lines))
        return True

    def _answer(self, lines: list[bytes]) -> bytes:
        self.lookups += len(lines)
        return self._responder.answer_all(lines)


def _read_pending(sock: gevent.socket.socket) -> bytes:
    """What the client has already sent, without waiting for more."""
    chunks = []
    sock.settimeout(0.0)
    try:
        while chunk := sock.recv(RECV_SIZE):
            chunks.append(chunk)
    except OSError:
        pass
    finally:
        sock.settimeout(None)
    return b"".join(chunks)


def _peer(address: object) -> str:
    return _format_sockname(address)


def _format_sockname(name: object) -> str:
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(name) or "unix socket"


def _raise_fd_limit(connections: int) -> None:
    """Each connection is a file descriptor; systemd's default soft limit is 1024."""
    wanted = connections + 64
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (OSError, ValueError) as exc:  # a seccomp filter may forbid setrlimit
        log.warning("cannot raise the open file limit: %s (set LimitNOFILE=)", exc)
        return
    if new < wanted:
        log.warning("open file limit %d is below --max-connections %d", new, connections)


def run(config: ServerConfig) -> int:
    """Open the table, listen, serve until SIGTERM/SIGINT; SIGHUP re-opens the table."""
    notifier = Notifier()
    table = LiveTable(config.db, fold_keys=config.fold_keys, warm=True)
    table.refresh()  # open and warm before READY: a cold first lookup stalls the hub
    server = Server(config, table, _listeners(config))
    gevent.signal_handler(signal.SIGTERM, server.request_stop)
    gevent.signal_handler(signal.SIGINT, server.request_stop)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(_reload, server, table, notifier))
    server.start()
    notifier.ready(_status(server, table))
    helpers: list[gevent.Greenlet[..., None]] = []
    if notifier.enabled:
        helpers.append(gevent.spawn(_report_status, server, table, notifier))
    if notifier.watchdog_interval:
        helpers.append(gevent.spawn(_watchdog, notifier, notifier.watchdog_interval))
    try:
        server.serve_until_stopped(before_stop=notifier.stopping)
    finally:
        gevent.killall(helpers)
        table.close()
    return 0


def _listeners(config: ServerConfig) -> list[gevent.socket.socket]:
    inherited = inherited_listeners()
    if not inherited:
        return [bind(address) for address in config.listen or (DEFAULT_LISTEN,)]
    if config.listen:
        log.warning("serving the sockets systemd passed; --listen is ignored")
    for listener in inherited:
        log.info("inherited socket %r from systemd", listener.name)
    return [listener.sock for listener in inherited]


def _status(server: Server, table: LiveTable) -> str:
    current = table.table
    serving = f"serving {current.describe()}" if current else f"table unavailable: {table.error}"
    return f"{serving}; {server.connections} connections; {server.lookups} lookups"


def _report_status(server: Server, table: LiveTable, notifier: Notifier) -> None:
    while True:
        gevent.sleep(STATUS_INTERVAL)
        notifier.status(_status(server, table))


def _watchdog(notifier: Notifier, interval: float) -> None:
    # Runs on the hub like every request: a missed ping means the hub is stuck.
    while True:
        notifier.watchdog()
        gevent.sleep(interval)


def _reload(server: Server, table: LiveTable, notifier: Notifier) -> None:
    log.info("SIGHUP: re-opening %s", table.path)
    notifier.reloading()
    table.refresh(force=True)
    notifier.ready(_status(server, table))
