"""Thin gevent glue: one greenlet per connection, timeouts, limits, signals, shutdown."""

from __future__ import annotations

import functools
import logging
import resource
import signal
import time
from collections.abc import Callable, Iterable

import gevent
import gevent.event
import gevent.pool
import gevent.socket
from gevent.server import StreamServer

from . import verify
from .config import SOCKETMAP, Binding, ServerConfig
from .dbformat import map_name
from .listeners import Endpoint, format_address, open_endpoints, remove_socket_files
from .maps import Maps, UnknownMap
from .responder import Responder, SocketmapResponder
from .sessions import Session, SocketmapSession, TcpTableSession
from .systemd import Notifier
from .table import TableError

log = logging.getLogger(__name__)

RECV_SIZE = 65536
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to systemd

SessionFactory = Callable[[], Session]


class _Stopping(Exception):
    """Thrown into idle connections when the server shuts down."""


class Server:
    """Serves the maps on the given endpoints, each with its own protocol."""

    def __init__(self, config: ServerConfig, maps: Maps, endpoints: Iterable[Endpoint]) -> None:
        self._config = config
        self._pool = gevent.pool.Pool(config.max_connections)
        self._endpoints = list(endpoints)
        self._servers = [
            StreamServer(
                endpoint.sock,
                functools.partial(self._handle, session_factory(endpoint.binding, maps, config)),
                spawn=self._pool,
            )
            for endpoint in self._endpoints
        ]
        self._idle: set[gevent.Greenlet[..., None]] = set()
        self._stopping = False
        self._stop_requested = gevent.event.Event()
        self.connections = 0
        self.lookups = 0

    def start(self) -> None:
        _raise_fd_limit(self._config.max_connections)
        for server, endpoint in zip(self._servers, self._endpoints, strict=True):
            server.start()
            log.info("listening on %s", endpoint.where)
            log.info("%s serves %s (%s)", endpoint.where, endpoint.binding, endpoint.origin)

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

    def _handle(
        self, new_session: SessionFactory, sock: gevent.socket.socket, address: object
    ) -> None:
        self.connections += 1
        session = new_session()
        current = gevent.getcurrent()
        assert isinstance(current, gevent.Greenlet)  # StreamServer spawns one per connection
        watch = _IdleWatch(self._config.idle_timeout)
        try:
            while not self._stopping:
                try:
                    data = self._receive(sock, current)
                except _IdleTimeout as exc:
                    if watch.expired(exc):
                        raise
                    continue  # not idle after all: the watch is re-armed, read on
                if not data:
                    return
                answered, keep_open = self._serve(sock, address, session, data, watch)
                if not keep_open:
                    return
                if answered:
                    watch.touch()
            # Shutting down: answer requests that already arrived, then close.
            pending = _read_pending(sock)
            if pending:
                self._serve(sock, address, session, pending, watch)
        except _IdleTimeout:  # silent, or not reading its replies
            log.debug("%s: idle for %ss, closing", format_address(address), watch.idle)
        except OSError as exc:
            log.debug("%s: %s", format_address(address), exc)
        except _Stopping:
            pass  # the kill landed after recv returned: the connection just closes
        finally:
            watch.close()
            self.connections -= 1

    def _receive(self, sock: gevent.socket.socket, current: gevent.Greenlet[..., None]) -> bytes:
        """The next bytes from the client; on shutdown, only what already arrived."""
        self._idle.add(current)
        try:
            return sock.recv(RECV_SIZE)
        except _Stopping:
            return _read_pending(sock)
        finally:
            self._idle.discard(current)

    def _serve(
        self,
        sock: gevent.socket.socket,
        address: object,
        session: Session,
        data: bytes,
        watch: _IdleWatch,
    ) -> tuple[int, bool]:
        """Answer every complete request in DATA: (requests answered, keep the connection?)."""
        answered = 0
        for output in session.receive(data):
            answered += output.requests
            self.lookups += output.requests
            if output.replies:
                _send_all(sock, output.replies, watch)
            if output.close is not None:
                peer = format_address(address)
                log.warning("%s: %s, closing", peer, output.close, extra={"CLIENT": peer})
                return answered, False
        return answered, True


class _IdleTimeout(Exception):
    """Raised into a connection's greenlet by its _IdleWatch."""


class _IdleWatch:
    """The idle timeout of one connection: one gevent.Timeout per idle period.

    The clock restarts only when a complete request has been answered, so bytes
    trickled without a newline (slowloris) do not keep a connection, and neither
    does a client that stops reading its replies. Restarting a gevent.Timeout
    for every request would cost more than the lookup (and a cancelled one that
    is started again only runs for what was left of its time, libev semantics).
    So a request only notes the time; when the Timeout fires on a connection
    that was busy meanwhile, it is re-armed for the rest of the period.
    """

    __slots__ = ("_exception", "_timer", "idle", "last")

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.last = time.monotonic()
        self._exception = _IdleTimeout()
        self._timer = gevent.Timeout(idle, self._exception)
        self._timer.start()

    def touch(self) -> None:
        self.last = time.monotonic()

    def expired(self, exc: _IdleTimeout) -> bool:
        """After EXC fired: True if the connection is idle; else re-arm and go on."""
        if exc is not self._exception:
            raise exc
        remaining = self.last + self.idle - time.monotonic()
        if remaining <= 0:
            return True
        self._timer.close()
        self._timer = gevent.Timeout(remaining, self._exception)
        self._timer.start()
        return False

    def close(self) -> None:
        self._timer.close()


def _send_all(sock: gevent.socket.socket, data: bytes, watch: _IdleWatch) -> None:
    """sendall() that survives the idle watch firing while a busy client reads slowly."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except _IdleTimeout as exc:
            if watch.expired(exc):
                raise
            continue  # nothing was sent by the interrupted call: send it again
        view = view[sent:]


def session_factory(binding: Binding, maps: Maps, config: ServerConfig) -> SessionFactory:
    """New sessions for a listener: socketmap, or tcp_table bound to one map."""
    if binding.protocol == SOCKETMAP:
        return functools.partial(SocketmapSession, SocketmapResponder(maps))
    name = binding.map or config.db_name
    assert name is not None  # ServerConfig.check_binding guarantees a map
    return functools.partial(TcpTableSession, Responder(_map_lookup(maps, name)))


def _map_lookup(maps: Maps, name: str) -> Callable[[bytes], bytes | None]:
    try:
        return maps.get(name).lookup  # known now: bind to it directly
    except UnknownMap:
        pass

    def lookup(key: bytes) -> bytes | None:
        try:
            table = maps.get(name)
        except UnknownMap:
            raise TableError(f"no table {name}.lmdb in {maps.directory}") from None
        return table.lookup(key)

    return lookup


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
    """Open the tables, listen, serve until SIGTERM/SIGINT; SIGHUP re-opens the tables."""
    notifier = Notifier()
    tables = {map_name(config.db): config.db} if config.db is not None else {}
    # Each newly published file is walked by a child process before it is
    # served (verify.py); the hub keeps serving the current file meanwhile.
    check = verify.in_child(gevent.sleep, forget=lambda: maps.close())  # noqa: PLW0108 - maps is bound below
    maps = Maps(
        tables, config.maps, fold_keys=config.fold_keys, warm=True, check=check, sleep=gevent.sleep
    )
    maps.open_all()  # open and warm before READY: a cold first lookup stalls the hub
    endpoints = open_endpoints(config)
    server = Server(config, maps, endpoints)
    gevent.signal_handler(signal.SIGTERM, server.request_stop)
    gevent.signal_handler(signal.SIGINT, server.request_stop)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(_reload, server, maps, notifier))
    server.start()
    notifier.ready(_status(server, maps))
    helpers: list[gevent.Greenlet[..., None]] = []
    if notifier.enabled:
        helpers.append(gevent.spawn(_report_status, server, maps, notifier))
    if notifier.watchdog_interval:
        helpers.append(gevent.spawn(_watchdog, notifier, notifier.watchdog_interval))
    try:
        server.serve_until_stopped(before_stop=notifier.stopping)
    finally:
        gevent.killall(helpers)
        remove_socket_files(endpoints)
        maps.close()
    return 0


def _status(server: Server, maps: Maps) -> str:
    parts = []
    for _, live in maps:
        table = live.table
        parts.append(f"serving {table.describe()}" if table else f"table unavailable: {live.error}")
    if not parts:
        parts.append(f"no tables yet in {maps.directory}")
    counters = f"{server.connections} connections; {server.lookups} lookups"
    return "; ".join([*parts, counters])


def _report_status(server: Server, maps: Maps, notifier: Notifier) -> None:
    while True:
        gevent.sleep(STATUS_INTERVAL)
        notifier.status(_status(server, maps))


def _watchdog(notifier: Notifier, interval: float) -> None:
    # Runs on the hub like every request: a missed ping means the hub is stuck.
    while True:
        notifier.watchdog()
        gevent.sleep(interval)


def _reload(server: Server, maps: Maps, notifier: Notifier) -> None:
    paths = [str(live.path) for _, live in maps] or [f"{maps.directory}/*.lmdb"]
    log.info("SIGHUP: re-opening %s", ", ".join(paths))
    notifier.reloading()
    maps.refresh_all(force=True)
    maps.open_all()
    notifier.ready(_status(server, maps))
