"""Thin gevent glue: one greenlet per connection, timeouts, limits, signals, shutdown."""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterable
from math import frexp
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.socket
import greenlet
from gevent.server import StreamServer

from . import handoff, snapshot
from .admission import BacklogWatch, OutputBudget
from .config import METRICS, SOCKETMAP, Binding, ConfigError, ServerConfig
from .counters import LATENCY_OFFSET, LATENCY_SAMPLE, CheckStats, Latency, ServerStats
from .dbformat import count, map_name
from .listeners import Endpoint, client_key, format_address, open_endpoints, remove_socket_files
from .maps import Maps, UnknownMap
from .ratelimit import WarningLimiter
from .responder import (
    LoggedResponder,
    LoggedSocketmapResponder,
    Responder,
    SocketmapResponder,
)
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


class CloseReason(enum.StrEnum):
    """Why the server closed a connection: each one is counted in Server.closed."""

    CLIENT = "client"  # the client hung up (EOF, reset)
    IDLE = "idle"  # no request answered for --idle-timeout
    LIMIT = "limit"  # made room: idle longest at --max-connections, or over the output budget
    ERROR = "error"  # a stream the protocol cannot go on with (framing, wrong protocol)
    SHUTDOWN = "shutdown"


class _Stopping(Exception):
    """Thrown into idle connections when the server shuts down."""


class _HandOff(Exception):
    """Thrown into idle connections when the server stops and keeps them (handoff.py)."""


class _Evicted(Exception):
    """Thrown into the connection idle longest when a newcomer needs its slot."""


class _OverBudget(_Evicted):
    """Thrown into a connection holding replies its client does not read, when all
    connections together hold more than the output budget."""


class Server:
    """Serves the maps on the given endpoints, each with its own protocol."""

    def __init__(
        self,
        config: ServerConfig,
        maps: Maps,
        endpoints: Iterable[Endpoint],
        checks: CheckStats | None = None,
        fdstore: handoff.FdStore | None = None,
    ) -> None:
        self._config = config
        self._maps = maps
        self._handles: dict[Binding, Callable[[Any, object], None]] = {}
        # On a stop, idle connections go to systemd's file descriptor store.
        self._fdstore = fdstore if fdstore is not None and fdstore.enabled else None
        self._kept: dict[str, list[int]] = {}  # FDNAME -> duplicates to store
        self._pool = gevent.pool.Pool(config.max_connections)
        self._endpoints = list(endpoints)
        self.stats = ServerStats()
        metrics = [e for e in self._endpoints if e.binding.protocol == METRICS]
        self.responders: list[Responder | SocketmapResponder] = []  # one per map listener
        self.latency = Latency()
        self._reads = -1  # reads served, modulo LATENCY_SAMPLE (_serve_timed)
        if metrics:  # time requests only when someone can read the times
            self._serve = self._serve_timed  # type: ignore[method-assign]
        self._servers: list[StreamServer] = [
            StreamServer(endpoint.sock, self._handler(endpoint.binding, maps), spawn=self._pool)
            for endpoint in self._endpoints
            if endpoint.binding.protocol != METRICS
        ]
        if metrics:
            self._servers += self._metrics_servers(metrics, maps, checks or CheckStats())
        map_endpoints = [e for e in self._endpoints if e.binding.protocol != METRICS]
        self._endpoints = map_endpoints + metrics
        self._wires: dict[_Wire, _IdleWatch] = {}
        self._stopping = False
        self._stop_requested = gevent.event.Event()
        self._backlog = BacklogWatch(
            [endpoint.sock for endpoint in map_endpoints],
            full=lambda: self.full,
            evict=self.evict_idlest,
        )
        self.output = OutputBudget[_Wire](config.output_budget, close=self._close_holder)
        self.warnings = WarningLimiter()
        self._summaries: gevent.Greenlet[..., None] | None = None
        self.connections = 0
        self.lookups = 0

    def _handler(self, binding: Binding, maps: Maps) -> Callable[[Any, object], None]:
        """StreamServer's handle for a listener: with -v, one that logs every lookup.

        One per binding: connections kept across a restart (adopt) share it.
        """
        handle = self._handles.get(binding)
        if handle is not None:
            return handle
        responder = _responder(binding, maps, self._config)
        self.responders.append(responder)
        name = handoff.fd_name(binding)
        if self._config.verbose:
            db = binding.map or self._config.db_name
            handle = _LoggedHandler(self, responder, db, name).handle
        elif isinstance(responder, SocketmapResponder):
            handle = _Handler(self, functools.partial(SocketmapSession, responder), name).handle
        else:
            handle = _Handler(self, functools.partial(TcpTableSession, responder), name).handle
        self._handles[binding] = handle
        return handle

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
            self._pool.spawn(self._handler(binding, self._maps), conn.sock, peer)
            adopted += 1
        if self._fdstore is not None and names:
            self._fdstore.forget(names)
        if adopted:
            log.info("serving %s from before the restart", count(adopted, "connection"))
        return adopted

    def _metrics_servers(
        self, endpoints: list[Endpoint], maps: Maps, checks: CheckStats
    ) -> list[StreamServer]:
        from . import metrics  # noqa: PLC0415 - prometheus_client only when asked for

        collector = metrics.TcpmapCollector(
            responders=self.responders,
            latency=self.latency,
            checks=checks,
            server=self.stats,
            open_connections=lambda: self.connections,
            maps=maps,
        )
        registry = metrics.registry(collector)
        return [metrics.wsgi_server(e.sock, registry, self.warn_peer) for e in endpoints]

    def start(self) -> None:
        _raise_fd_limit(self._config.max_connections)
        for server, endpoint in zip(self._servers, self._endpoints, strict=True):
            server.start()
            log.info("listening on %s", endpoint.where)
            log.info("%s serves %s (%s)", endpoint.where, endpoint.binding, endpoint.origin)
        self._summaries = gevent.spawn(self._summarise_warnings)

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
        self._backlog.close()
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
                count(kept, "connection"),
                stored,
            )
        if self._summaries is not None:
            self._summaries.kill()
        self._log_summaries()
        log.info("stopped after %d lookups", self.lookups)

    # --- warnings about clients ------------------------------------------------

    def warn(self, wire: _Wire, address: object, message: str) -> None:
        """Log a warning about a client, unless it has had its share (ratelimit.py)."""
        self.warn_peer(wire.sock, address, message)

    def warn_peer(self, sock: socket.socket, address: object, message: str) -> None:
        """warn() for any client socket (the metrics listener's too)."""
        if self.warnings.allow(client_key(sock, address)):
            peer = format_address(address)
            log.warning("%s: %s", peer, message, extra={"CLIENT": peer})
        else:
            self.stats.warnings_suppressed += 1  # tcpmap_warnings_suppressed_total

    def _summarise_warnings(self) -> None:
        while True:
            gevent.sleep(1.0)
            self._log_summaries()

    def _log_summaries(self) -> None:
        for client, suppressed in self.warnings.expired():
            log.warning(
                "%s: %d more warnings suppressed in %ds",
                client,
                suppressed,
                self.warnings.window,
                extra={"CLIENT": client},
            )

    # --- at --max-connections ------------------------------------------------

    def evict_idlest(self) -> bool:
        """Close the connection idle longest, for a newcomer; False if none can go now.

        Idle means waiting for a request, or for the client to read its replies;
        its idle time counts from its last answered request (_IdleWatch.last).
        One whose request has arrived but is not read yet is not idle: under
        load the hub may run this before it wakes that connection's greenlet.
        """
        waiting = sorted(
            (
                (watch.last, wire)
                for wire, watch in self._wires.items()
                if wire.stoppable and wire.on_client
            ),
            key=lambda pair: pair[0],
        )
        for _, victim in waiting:
            if victim.waiting and victim.has_input:
                continue  # a request arrived; the hub has yet to wake its greenlet
            victim.stoppable = False  # one eviction each
            victim.stop(_Evicted)
            return True
        return False

    @property
    def full(self) -> bool:
        return bool(self._pool.full()) and not self._stopping

    # --- output held for slow readers ----------------------------------------

    @staticmethod
    def _close_holder(wire: _Wire) -> bool:
        """Close a connection holding replies, over the output budget (admission.py)."""
        if not wire.stoppable:
            return False
        wire.stoppable = False
        wire.stop(_OverBudget)
        return True

    # --- one connection -----------------------------------------------------

    def _handle(
        self,
        new_session: SessionFactory,
        gsock: gevent.socket.socket,
        address: object,
        fd_name: str,
    ) -> None:
        self.connections += 1
        self.stats.accepted += 1
        session = new_session()
        wire = _Wire(socket.socket(fileno=gsock.detach()))
        watch = _IdleWatch(self._config.idle_timeout)
        self._wires[wire] = watch
        if self._pool.full():
            self._backlog.start()  # a newcomer will close the connection idle longest
        reason = CloseReason.CLIENT
        try:
            reason = self._converse(wire, address, session, watch, fd_name)
        except _IdleTimeout:  # silent, or not reading its replies
            reason = CloseReason.IDLE
            log.debug("%s: idle for %ss, closing", format_address(address), watch.idle)
        except _OverBudget:
            reason = CloseReason.LIMIT
            budget = self.output.budget >> 20
            self.warn(wire, address, f"not reading its replies, over the {budget} MiB held for all")
        except _Evicted:
            reason = CloseReason.LIMIT
            log.debug("%s: idle longest at --max-connections, closing", format_address(address))
        except OSError as exc:
            reason = CloseReason.ERROR
            log.debug("%s: %s", format_address(address), exc)
        except _Stopping:
            reason = CloseReason.SHUTDOWN  # the kill landed while a reply was being sent
        finally:
            del self._wires[wire]
            watch.close()
            wire.close()
            self.connections -= 1
            self.stats.closed[reason] += 1

    def _converse(
        self, wire: _Wire, address: object, session: Session, watch: _IdleWatch, fd_name: str
    ) -> CloseReason:
        """Read and answer until the client hangs up, errs, or the server stops.

        Stopping with a file descriptor store, the connection is kept for the
        next instance (under FD_NAME) once nothing of a request is half read.
        """
        while not self._stopping or self._fdstore is not None:
            if self._stopping and self._keep(wire, address, session, watch, fd_name):
                return CloseReason.SHUTDOWN
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
            if not data:
                return CloseReason.CLIENT
            if not self._serve(wire, address, session, data, watch):
                return CloseReason.ERROR
        # Shutting down: answer requests that already arrived, then close.
        pending = wire.pending()
        if pending:
            self._serve(wire, address, session, pending, watch)
        return CloseReason.SHUTDOWN

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
        """Answer every complete request in DATA; False if the connection must close.

        Each output is sent before the session answers more, so what one
        connection holds is one output (sessions.OUTPUT_LIMIT); all of them
        together hold about the budget at most (admission.OutputBudget).
        """
        answered = 0
        close = None
        for replies, requests, close in session.receive(data):
            answered += requests
            if replies:
                _send_all(wire, replies, watch, self)
            if close is not None:
                self.warn(wire, address, f"{close}, closing")
                break
        if answered:
            self.lookups += answered
            watch.last = time.monotonic()  # the idle clock restarts
        return close is None

    def _serve_timed(
        self,
        wire: _Wire,
        address: object,
        session: Session,
        data: bytes,
        watch: _IdleWatch,
    ) -> bool:
        """_serve, timed for tcpmap_lookup_duration_seconds; bound instead of it with metrics.

        One read in LATENCY_SAMPLE is timed, the first of the server's included:
        timing every read cost 5.7% of lookups/s, sampling about 1%
        (tests/bench/metrics_cost.py). A copy, not a wrapper: a call more per read
        cost as much as the timing. Keep the two in step. The end time is the
        clock read _serve makes anyway for the idle watch.
        """
        self._reads = reads = (self._reads + 1) & (LATENCY_SAMPLE - 1)
        started = 0.0 if reads else time.monotonic()  # never 0.0: seconds since boot
        answered = 0
        close = None
        for replies, requests, close in session.receive(data):
            answered += requests
            if replies:
                _send_all(wire, replies, watch, self)
            if close is not None:
                self.warn(wire, address, f"{close}, closing")
                break
        if answered:
            self.lookups += answered
            watch.last = now = time.monotonic()  # the idle clock restarts
            if started:
                elapsed, latency = now - started, self.latency
                # Latency.observe_seconds, inline: a method call costs as much again.
                latency.by_exponent[LATENCY_OFFSET + frexp(elapsed)[1]] += answered
                latency.sum += elapsed * answered
        return close is None


class _Handler:
    """StreamServer's handle for one listener: a bound method, not functools.partial.

    A call through partial (C) starts a new interpreter frame on the C stack,
    which every connection's greenlet would carry, and copy at every switch.
    """

    __slots__ = ("_fd_name", "_new_session", "_server")

    def __init__(self, server: Server, new_session: SessionFactory, fd_name: str) -> None:
        self._server = server
        self._new_session = new_session
        self._fd_name = fd_name  # what systemd's store calls its connections (handoff.py)

    def handle(self, sock: gevent.socket.socket, address: object) -> None:
        self._server._handle(self._new_session, sock, address, self._fd_name)


class _LoggedHandler:
    """StreamServer's handle with -v: each connection's session logs its lookups."""

    __slots__ = ("_fd_name", "_name", "_responder", "_server")

    def __init__(
        self,
        server: Server,
        responder: Responder | SocketmapResponder,
        name: str | None,
        fd_name: str,
    ) -> None:
        self._server = server
        self._responder = responder
        self._name = name or ""
        self._fd_name = fd_name

    def handle(self, sock: gevent.socket.socket, address: object) -> None:
        peer = format_address(address)
        factory: SessionFactory
        if isinstance(self._responder, SocketmapResponder):
            logged = LoggedSocketmapResponder(self._responder, peer)
            factory = functools.partial(SocketmapSession, logged)
        else:
            factory = functools.partial(
                TcpTableSession, LoggedResponder(self._responder, peer, self._name)
            )
        self._server._handle(factory, sock, address, self._fd_name)


class _Wire:
    """One connection's non-blocking socket, waited on by switching to the hub directly.

    gevent's own socket builds a Waiter for every wait; a map server waits once
    per request, and that was a sixth of its time per lookup (tests/bench). Here
    each wait starts an io watcher whose callback resumes this greenlet, and
    stops it after: nothing but readiness, or an exception the hub throws (the
    idle Timeout, a stop), resumes the greenlet from that wait.
    """

    __slots__ = (
        "_greenlet",
        "_hub",
        "_read",
        "_resume",
        "_write",
        "sending",
        "sock",
        "stoppable",
        "waiting",
    )

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        hub = gevent.get_hub()
        self.sock = sock
        self.waiting = False  # waiting for the next request (Server.stop ends that)
        self.sending = False  # waiting for the client to read its replies
        self.stoppable = True  # not yet chosen to make room
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

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what fits now, waiting only when nothing does."""
        while True:
            try:
                return self.sock.send(data)
            except BlockingIOError:
                self.sending = True
                try:
                    self._wait(self._write)
                finally:
                    self.sending = False

    @property
    def on_client(self) -> bool:
        """Waiting on its client, to send a request or to read replies."""
        return self.waiting or self.sending

    def stop(self, exception: type[BaseException]) -> None:
        """Raise EXCEPTION in the connection's greenlet (soon, from the hub)."""
        greenlet = self._greenlet
        assert isinstance(greenlet, gevent.Greenlet)  # StreamServer spawns one per connection
        greenlet.kill(exception, block=False)

    @property
    def has_input(self) -> bool:
        """The client has sent bytes not yet read: it is not idle, whatever its clock says."""
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return False
        except OSError:
            return True  # an error to read: let its greenlet find it

    def pending(self) -> bytes:
        """What the client has already sent (one read's worth), without waiting for more."""
        try:
            return self.sock.recv(RECV_SIZE)
        except OSError:
            return b""

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


def _send_all(wire: _Wire, data: bytes | bytearray, watch: _IdleWatch, server: Server) -> None:
    """sendall() that survives the idle watch firing while a busy client reads slowly.

    What does not go at once is counted in SERVER.output until it is sent.
    """
    try:
        sent = wire.sock.send(data)  # no wait here: a wait must be counted first
    except BlockingIOError:
        sent = 0
    if sent == len(data):  # the usual case: the reply fits the socket buffer
        return
    rest = memoryview(data)[sent:]
    # The whole output stays in memory until its last byte is sent, and so does
    # the read it answers (at most RECV_SIZE bytes).
    held = len(data) + RECV_SIZE
    server.output.hold(wire, held)
    try:
        while rest:
            try:
                sent = wire.send(rest)
            except _IdleTimeout as exc:
                if watch.expired(exc):
                    raise
                continue  # nothing was sent by the interrupted call: send it again
            rest = rest[sent:]
    finally:
        server.output.release(wire, held)


def _responder(
    binding: Binding, maps: Maps, config: ServerConfig
) -> Responder | SocketmapResponder:
    """A listener's responder: socketmap, or tcp_table bound to one map."""
    if binding.protocol == SOCKETMAP:
        return SocketmapResponder(maps)
    name = binding.map or config.db_name
    assert name is not None  # ServerConfig.check_binding guarantees a map
    return Responder(_map_lookup(maps, name), name)


def _map_lookup(maps: Maps, name: str) -> Callable[[bytes], bytes | None]:
    try:
        return maps.get(name).lookup  # known now: bind to it directly
    except UnknownMap:
        pass
    # Logged at start and when it appears; once open, its LiveTable logs its changes.
    log.warning(
        "a tcp_table listener serves map %s, but there is no %s.lmdb in %s: "
        "its lookups are answered 400 (mail deferred) until the table is there",
        name,
        name,
        maps.directory,
    )
    appeared = [False]

    def lookup(key: bytes) -> bytes | None:
        try:
            table = maps.get(name)
        except UnknownMap:
            raise TableError(f"no table {name}.lmdb in {maps.directory}") from None
        if not appeared[0]:
            appeared[0] = True
            log.info("map %s: %s.lmdb is there now, serving it", name, name)
        return table.lookup(key)

    return lookup


def _check_maps_directory(directory: Path | None) -> None:
    """Warn at start when --maps names no directory: no map in it can be served."""
    if directory is None or directory.is_dir():
        return
    why = "does not exist" if not directory.exists() else "is not a directory"
    log.warning("--maps %s %s: no map is served from it until it is created", directory, why)


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


def run(config: ServerConfig, started: dict[Path, snapshot.Check] | None = None) -> int:
    """Open the tables, listen, serve until SIGTERM/SIGINT; SIGHUP re-opens the tables.

    STARTED: checks begun before (snapshot.start_check), taken for the first open of
    their table; those left are cancelled."""
    started = {} if started is None else started
    notifier = Notifier()
    tables = {map_name(config.db): config.db} if config.db is not None else {}
    # Each new version of a file is copied and checked by a child process before
    # it is served (snapshot.py); the hub keeps serving the current one meanwhile.
    _check_maps_directory(config.maps)
    checks = CheckStats()
    maps = Maps(
        tables,
        config.maps,
        fold_keys=config.fold_keys,
        take=checks.counting(snapshot.in_child(gevent.sleep, started)),
        sleep=gevent.sleep,
        watcher=_loop_watch,
    )
    try:
        maps.open_all()  # before READY
    finally:
        snapshot.cancel_all(started)  # a table not opened after all (gone meanwhile)
    listeners, connections = inherited_sockets()
    try:
        endpoints = open_endpoints(config, listeners)
    except BaseException:
        for conn in connections:
            conn.sock.close()
        raise
    server = Server(config, maps, endpoints, checks, handoff.FdStore())
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
    server.stats.reloads += 1
    notifier.reloading()
    try:
        maps.refresh_all(force=True)
        maps.open_all()
    finally:  # systemd waits for READY=1 after RELOADING=1, whatever happened
        notifier.ready(_status(server, maps))
