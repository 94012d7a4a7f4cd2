"""Thin gevent glue: one greenlet per connection, timeouts, limits, signals, shutdown."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.socket
import greenlet
from gevent.server import StreamServer

from . import handoff, verify
from .config import SOCKETMAP, Binding, ConfigError, ServerConfig
from .dbformat import map_name
from .listeners import Endpoint, format_address, open_endpoints, remove_socket_files
from .maps import Maps, UnknownMap
from .responder import Responder, SocketmapResponder
from .sessions import Session, SocketmapSession, TcpTableSession
from .systemd import Listener, Notifier, inherited_sockets
from .table import TableError
from .watch import DirectoryWatch, watch

log = logging.getLogger(__name__)

RECV_SIZE = 65536
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to systemd
_TOP_PRIORITY = 2  # libev's EV_MAXPRI
_switch = greenlet.greenlet.switch

SessionFactory = Callable[[], Session]


class _Stopping(Exception):
    """Thrown into idle connections when the server shuts down."""


class _HandOff(Exception):
    """Thrown into idle connections when the server shuts down and keeps them (handoff.py)."""


class Server:
    """Serves the maps on the given endpoints, each with its own protocol."""

    def __init__(
        self,
        config: ServerConfig,
        maps: Maps,
        endpoints: Iterable[Endpoint],
        fdstore: handoff.FdStore | None = None,
    ) -> None:
        self._config = config
        self._maps = maps
        self._pool = gevent.pool.Pool(config.max_connections)
        self._endpoints = list(endpoints)
        self._servers = [
            StreamServer(endpoint.sock, self._handler(endpoint.binding).handle, spawn=self._pool)
            for endpoint in self._endpoints
        ]
        self._wires: set[_Wire] = set()
        # On a stop, idle connections go to systemd's file descriptor store.
        self._fdstore = fdstore if fdstore is not None and fdstore.enabled else None
        self._kept: dict[str, list[int]] = {}  # FDNAME -> duplicates to store
        self._stopping = False
        self._stop_requested = gevent.event.Event()
        self.connections = 0
        self.lookups = 0

    def _handler(self, binding: Binding) -> _Handler:
        return _Handler(self, session_factory(binding, self._maps, self._config), binding)

    def adopt(self, connections: Iterable[Listener]) -> int:
        """Serve connections a previous instance left in the file descriptor store.

        Each is served with the protocol and map of the listener it was
        accepted on (its FDNAME). The names are then dropped from the store:
        systemd keeps a duplicate of each, so closing one later would
        otherwise not reach its client. Returns how many are served.
        """
        adopted = 0
        names = set()
        for conn in connections:
            names.add(conn.name)
            binding = handoff.binding_of(conn.name)
            try:
                if binding is None:
                    raise ConfigError(f"unknown kind {conn.name!r}")
                self._config.check_binding(binding, f"stored connection {conn.name!r}")
                peer = conn.sock.getpeername()
            except (ConfigError, OSError) as exc:
                log.warning("closing a connection from the file descriptor store: %s", exc)
                conn.sock.close()
                continue
            if self._pool.full():
                conn.sock.close()
                continue
            self._pool.spawn(self._handler(binding).handle, conn.sock, peer)
            adopted += 1
        if self._fdstore is not None and names:
            self._fdstore.forget(names)
        if adopted:
            log.info("serving %s from before the restart", _count(adopted, "connection"))
        return adopted

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
        for wire in self._wires:
            if wire.waiting:
                wire.stop(_HandOff if self._fdstore is not None else _Stopping)
        self._pool.join(timeout=self._config.stop_timeout)
        self._pool.kill(timeout=1)
        if self._fdstore is not None and self._kept:
            kept = sum(len(fds) for fds in self._kept.values())
            stored = self._fdstore.store(self._kept)
            for fds in self._kept.values():
                for fd in fds:
                    os.close(fd)
            self._kept.clear()
            log.info(
                "handed %s to systemd's file descriptor store (%d taken)",
                _count(kept, "connection"),
                stored,
            )
        log.info("stopped after %d lookups", self.lookups)

    # --- one connection -----------------------------------------------------

    def _handle(self, handler: _Handler, gsock: gevent.socket.socket, address: object) -> None:
        self.connections += 1
        session = handler.new_session()
        wire = _Wire(socket.socket(fileno=gsock.detach()))
        watch = _IdleWatch(self._config.idle_timeout)
        self._wires.add(wire)
        try:
            while not self._stopping or self._fdstore is not None:
                if self._stopping and self._keep(wire, address, session, watch, handler.fd_name):
                    return
                try:
                    data = wire.receive()
                except _IdleTimeout as exc:
                    if watch.expired(exc):
                        raise
                    continue  # not idle after all: the watch is re-armed, read on
                except _Stopping:
                    break
                except _HandOff:
                    continue  # _keep() decides: now, or once a half-read request is complete
                if not data or not self._serve(wire, address, session, data, watch):
                    return
            # Shutting down: answer requests that already arrived, then close.
            pending = wire.pending()
            if pending:
                self._serve(wire, address, session, pending, watch)
        except _IdleTimeout:  # silent, or not reading its replies
            log.debug("%s: idle for %ss, closing", format_address(address), watch.idle)
        except OSError as exc:
            log.debug("%s: %s", format_address(address), exc)
        except _Stopping:
            pass  # the kill landed while a reply was being sent: the connection just closes
        finally:
            self._wires.discard(wire)
            watch.close()
            wire.close()
            self.connections -= 1

    def _keep(
        self, wire: _Wire, address: object, session: Session, watch: _IdleWatch, name: str
    ) -> bool:
        """While stopping: answer what arrived, then keep the connection for the next instance.

        True when it is kept (or must close); False while a request is only
        half read: the caller reads on, and the stop timeout bounds that.
        """
        pending = wire.pending()
        if pending and not self._serve(wire, address, session, pending, watch):
            return True
        if session.pending:
            return False
        self._kept.setdefault(name, []).append(os.dup(wire.sock.fileno()))
        return True

    def _serve(
        self,
        wire: _Wire,
        address: object,
        session: Session,
        data: bytes,
        watch: _IdleWatch,
    ) -> bool:
        """Answer every complete request in DATA; False if the connection must close."""
        answered = 0
        close = None
        for replies, requests, close in session.receive(data):
            answered += requests
            if replies:
                _send_all(wire, replies, watch)
            if close is not None:
                peer = format_address(address)
                log.warning("%s: %s, closing", peer, close, extra={"CLIENT": peer})
                break
        if answered:
            self.lookups += answered
            watch.last = time.monotonic()  # the idle clock restarts
        return close is None


class _Handler:
    """StreamServer's handle for one listener: a bound method, not functools.partial.

    A call through partial (C) starts a new interpreter frame on the C stack,
    which every connection's greenlet would carry, and copy at every switch.
    """

    __slots__ = ("_server", "fd_name", "new_session")

    def __init__(self, server: Server, new_session: SessionFactory, binding: Binding) -> None:
        self._server = server
        self.new_session = new_session
        self.fd_name = handoff.fd_name(binding)  # what systemd's store calls its connections

    def handle(self, sock: gevent.socket.socket, address: object) -> None:
        self._server._handle(self, sock, address)


class _Wire:
    """One connection's non-blocking socket, waited on by switching to the hub directly.

    gevent's own socket builds a Waiter for every wait; a map server waits once
    per request, and that was a sixth of its time per lookup (tests/bench). Here
    each wait starts an io watcher whose callback resumes this greenlet, and
    stops it after: nothing but readiness, or an exception the hub throws (the
    idle Timeout, a stop), resumes the greenlet from that wait.
    """

    __slots__ = ("_greenlet", "_hub", "_read", "_resume", "_write", "sock", "waiting")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        hub = gevent.get_hub()
        self.sock = sock
        self.waiting = False  # waiting for the next request (Server.stop ends that)
        self._hub = hub
        self._read = hub.loop.io(sock.fileno(), 1)
        self._write = hub.loop.io(sock.fileno(), 2)
        self._greenlet = gevent.getcurrent()
        self._resume = self._greenlet.switch

    def _wait(self, watcher: Any) -> None:
        watcher.start(self._resume)
        try:
            # What Hub.switch() does, less its look for a switch_out() hook,
            # which connection greenlets do not have.
            _switch(self._hub)
        finally:
            watcher.stop()

    def receive(self) -> bytes:
        """The client's next bytes (b"" when it has closed); waits for them first."""
        while True:
            self.waiting = True  # between requests: a stop may end the wait
            try:
                self._wait(self._read)
            finally:
                self.waiting = False
            try:
                return self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue

    def send(self, data: bytes | memoryview) -> int:
        """Send what fits now, waiting only when nothing does."""
        while True:
            try:
                return self.sock.send(data)
            except BlockingIOError:
                self._wait(self._write)

    def stop(self, exception: type[BaseException]) -> None:
        """Raise EXCEPTION in the connection's greenlet (soon, from the hub)."""
        greenlet = self._greenlet
        assert isinstance(greenlet, gevent.Greenlet)  # StreamServer spawns one per connection
        greenlet.kill(exception, block=False)

    def pending(self) -> bytes:
        """What the client has already sent, without waiting for more."""
        chunks = []
        try:
            while chunk := self.sock.recv(RECV_SIZE):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)

    def close(self) -> None:
        self._read.close()
        self._write.close()
        self.sock.close()


class _IdleTimeout(BaseException):
    """Raised into a connection's greenlet by its _IdleWatch.

    A BaseException, as gevent.Timeout is: a lookup that waits for a table check
    when it fires must not take it for a failed lookup.
    """


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


def _send_all(wire: _Wire, data: bytes, watch: _IdleWatch) -> None:
    """sendall() that survives the idle watch firing while a busy client reads slowly."""
    rest: bytes | memoryview = data  # a memoryview only once a send falls short
    while rest:
        try:
            sent = wire.send(rest)
        except _IdleTimeout as exc:
            if watch.expired(exc):
                raise
            continue  # nothing was sent by the interrupted call: send it again
        rest = memoryview(rest)[sent:] if sent < len(rest) else b""


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


def _loop_watch(directory: Path) -> DirectoryWatch | None:
    """A directory watch the hub drains, so a lookup costs no system call to ask it.

    Its callback runs before any connection's in the same loop iteration (top
    priority): a request sent after a publication finds the watch already set.
    """
    directory_watch = watch(directory)
    if directory_watch is None:
        return None
    io: Any = gevent.get_hub().loop.io(directory_watch.fileno(), 1)
    with contextlib.suppress(AttributeError, ValueError):  # libuv has no priorities
        io.priority = _TOP_PRIORITY
    io.start(directory_watch.drain)
    directory_watch.drive(stop=io.close)
    return directory_watch


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
        tables,
        config.maps,
        fold_keys=config.fold_keys,
        warm=True,
        check=check,
        sleep=gevent.sleep,
        watcher=_loop_watch,
    )
    maps.open_all()  # open and warm before READY: a cold first lookup stalls the hub
    listeners, connections = inherited_sockets()
    try:
        endpoints = open_endpoints(config, listeners)
    except BaseException:
        for conn in connections:
            conn.sock.close()
        raise
    server = Server(config, maps, endpoints, handoff.FdStore())
    gevent.signal_handler(signal.SIGTERM, server.request_stop)
    gevent.signal_handler(signal.SIGINT, server.request_stop)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(_reload, server, maps, notifier))
    server.start()
    server.adopt(connections)
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


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


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
