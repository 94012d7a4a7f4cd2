"""Connections kept across a restart through the file descriptor store (handoff.py).

systemd's side is played here by a datagram NOTIFY_SOCKET that takes the
descriptors the server stores (SCM_RIGHTS), answers BARRIER=1 the way PID 1
does (by closing the pipe it got), and hands the descriptors to the next
server in LISTEN_FDS/LISTEN_FDNAMES after the listening socket: what a restart
job does. tests/system/inside.sh does the same with a real systemd.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from activation import Activated, exec_start, tcp_listener
from conftest import MakeTable

from tcpmap_lmdb import handoff
from tcpmap_lmdb.config import SOCKETMAP, TCP_TABLE, Binding

TIMEOUT = 10.0


class FakeManager:
    """The service manager's end of NOTIFY_SOCKET, with a file descriptor store.

    A thread reads the messages as they come, as PID 1 does.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self.stored: list[tuple[str, int]] = []  # (FDNAME, fd), in order
        self.messages: list[dict[str, str]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._run, daemon=True)
        self._reader.start()

    def _run(self) -> None:
        while True:
            fds = array.array("i")
            try:
                data, ancdata, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(253 * 4))
            except OSError:
                return  # closed
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._changed:
                self._take(fields, list(fds))
                self.messages.append(fields)
                self._changed.notify_all()

    def _take(self, fields: dict[str, str], fds: list[int]) -> None:
        if fields.get("FDSTORE") == "1":
            self.stored.extend((fields.get("FDNAME", "stored"), fd) for fd in fds)
            return
        if fields.get("FDSTOREREMOVE") == "1":
            for entry in [entry for entry in self.stored if entry[0] == fields["FDNAME"]]:
                self.stored.remove(entry)
                os.close(entry[1])
        # BARRIER=1: closing its pipe says everything before it was read.
        for fd in fds:
            os.close(fd)

    def wait_for(self, key: str, since: int = 0, timeout: float = TIMEOUT) -> dict[str, str]:
        """The first message from SINCE on that has KEY, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for fields in self.messages[since:]:
                    if key in fields:
                        return fields
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key} in {self.messages[since:]}")
                self._changed.wait(left)

    def mark(self) -> int:
        with self._changed:
            return len(self.messages)

    def names(self) -> list[str]:
        with self._changed:
            return [name for name, _ in self.stored]

    def take_store(self) -> list[tuple[str, socket.socket]]:
        """The stored descriptors, as sockets for the next instance (the store keeps them too)."""
        with self._changed:
            return [(name, socket.socket(fileno=os.dup(fd))) for name, fd in self.stored]

    def close_store(self) -> None:
        """Close what the store holds, as systemd does when the unit stops for good."""
        with self._changed:
            for _, fd in self.stored:
                os.close(fd)
            self.stored.clear()

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(TIMEOUT)
        for _, fd in self.stored:
            os.close(fd)
        self.stored.clear()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeManager]:
    fake = FakeManager(tmp_path / "notify")
    yield fake
    fake.close()


def start(
    db: Path,
    manager: FakeManager,
    listener: socket.socket,
    stored: list[tuple[str, socket.socket]] = (),  # type: ignore[assignment]
) -> Activated:
    sockets = [listener, *(sock for _, sock in stored)]
    names = ["tcp_table", *(name for name, _ in stored)]
    since = manager.mark()
    server = Activated(exec_start(db), sockets, names, env={"NOTIFY_SOCKET": str(manager.path)})
    for _, sock in stored:
        sock.close()  # the server has its own copy now
    manager.wait_for("READY", since)
    return server


def ask(sock: socket.socket, key: str) -> bytes:
    sock.sendall(f"get {key}\n".encode())
    return read_reply(sock)


def read_reply(sock: socket.socket) -> bytes:
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"EOF after {reply!r}")
        reply += chunk
    return reply


@pytest.fixture
def db(tmp_path: Path, make_table: MakeTable) -> Path:
    return make_table(tmp_path / "virtual.lmdb", {"alice@example.com": "alice@example.net"})


def test_fd_names_round_trip_every_binding() -> None:
    """Each listener's binding survives its FDNAME, which never holds ':'."""
    for binding in (Binding(TCP_TABLE), Binding(TCP_TABLE, "virtual"), Binding(SOCKETMAP)):
        name = handoff.fd_name(binding)
        assert ":" not in name
        assert handoff.binding_of(name) == binding
    assert handoff.binding_of("tcp_table") is None


def test_connections_survive_a_restart(db: Path, manager: FakeManager) -> None:
    """Persistent connections keep working across a restart: no EOF, same answers."""
    listener = tcp_listener("127.0.0.1")
    first = start(db, manager, listener)
    clients = [socket.create_connection(listener.getsockname(), timeout=TIMEOUT) for _ in range(5)]
    try:
        for client in clients:
            assert ask(client, "alice@example.com") == b"200 alice@example.net\n"
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(TIMEOUT) == 0
        assert manager.names() == ["conn.tcp_table"] * len(clients)
        # Between the two instances, a request waits in the kernel's buffers.
        clients[0].sendall(b"get alice@example.com\n")
        second = start(db, manager, listener, manager.take_store())
        try:
            assert second.proc.pid != first.proc.pid
            assert read_reply(clients[0]) == b"200 alice@example.net\n"
            for client in clients:
                assert ask(client, "ALICE@example.com") == b"200 alice@example.net\n"
            assert manager.names() == []  # adopted: dropped from the store at once
        finally:
            second.stop()
    finally:
        for client in clients:
            client.close()
        listener.close()


def test_a_half_sent_request_is_finished_before_the_handoff(db: Path, manager: FakeManager) -> None:
    """A request half-way through when the stop begins is answered; the connection is kept."""
    listener = tcp_listener("127.0.0.1")
    first = start(db, manager, listener)
    client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    try:
        assert ask(client, "alice@example.com") == b"200 alice@example.net\n"
        client.sendall(b"get alice@exa")
        since = manager.mark()
        first.proc.send_signal(signal.SIGTERM)
        manager.wait_for("STOPPING", since)
        client.sendall(b"mple.com\n")
        assert read_reply(client) == b"200 alice@example.net\n"
        assert first.proc.wait(TIMEOUT) == 0
        assert manager.names() == ["conn.tcp_table"]
        second = start(db, manager, listener, manager.take_store())
        try:
            assert ask(client, "alice@example.com") == b"200 alice@example.net\n"
        finally:
            second.stop()
    finally:
        client.close()
        listener.close()


def test_without_a_notify_socket_a_stop_closes_connections(db: Path) -> None:
    """Not under systemd: a stop closes every connection, as it always did."""
    listener = tcp_listener("127.0.0.1")
    server = Activated(exec_start(db), [listener], ["tcp_table"])
    try:
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        with client:
            assert ask(client, "alice@example.com") == b"200 alice@example.net\n"
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(TIMEOUT) == 0
            assert client.recv(1) == b""
    finally:
        listener.close()


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def test_a_socketmap_connection_comes_back_as_socketmap(db: Path, manager: FakeManager) -> None:
    """A stored connection is served with its listener's protocol, not the first listener's."""
    tcp, smap = tcp_listener("127.0.0.1"), tcp_listener("127.0.0.1")
    env = {"NOTIFY_SOCKET": str(manager.path)}

    def start_both(stored: list[tuple[str, socket.socket]]) -> Activated:
        since = manager.mark()
        names = ["tcp_table", "socketmap", *(name for name, _ in stored)]
        sockets = [tcp, smap, *(sock for _, sock in stored)]
        server = Activated(exec_start(db), sockets, names, env=env)
        for _, sock in stored:
            sock.close()
        manager.wait_for("READY", since)
        return server

    request = netstring(b"virtual alice@example.com")
    wanted = netstring(b"OK alice@example.net")
    first = start_both([])
    client = socket.create_connection(smap.getsockname(), timeout=TIMEOUT)
    try:
        client.sendall(request)
        assert client.recv(4096) == wanted
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(TIMEOUT) == 0
        assert manager.names() == ["conn.socketmap"]
        second = start_both(manager.take_store())
        try:
            client.sendall(request)
            assert client.recv(4096) == wanted
        finally:
            second.stop()
    finally:
        client.close()
        tcp.close()
        smap.close()


# --- a real Postfix across a restart ------------------------------------------------


def require_root() -> None:
    why = "runs a Postfix MTA, which needs root: run as root (make test in CI does)"
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {why}", pytrace=False)
    pytest.skip(why)


def restart(
    server: Activated, db: Path, manager: FakeManager, listener: socket.socket
) -> Activated:
    """What `systemctl restart` does: SIGTERM, then a new server with the store's fds."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0
    assert manager.names(), "nothing was handed over: the test would prove nothing"
    return start(db, manager, listener, manager.take_store())


def test_postfix_logs_no_eof_and_defers_nothing_across_a_restart(
    tmp_path: Path, make_table: MakeTable, manager: FakeManager
) -> None:
    """Mail through a real Postfix across a server restart: no "unexpected EOF", no deferral."""
    require_root()
    from postfix_mta import DOMAIN, Options, PostfixMTA  # noqa: PLC0415 - only as root

    db = make_table(tmp_path / "virtual.lmdb", {f"info@{DOMAIN}": "alice@localhost"})
    listener = tcp_listener("127.0.0.1")
    server = start(db, manager, listener)
    mta = PostfixMTA(Options(f"tcp:127.0.0.1:{listener.getsockname()[1]}"))
    try:
        sent = []
        for round_ in range(3):
            for _ in range(5):
                message_id = f"<{os.urandom(8).hex()}@tcpmap-test.invalid>"
                mta.send([f"info@{DOMAIN}"], message_id)
                sent.append(message_id)
            for message_id in sent:
                mta.wait_delivered("alice", message_id)
            if round_ < 2:
                server = restart(server, db, manager, listener)
        mta.wait_queue_empty()
        log = mta.log()
        assert "unexpected EOF" not in log, log
        assert "status=deferred" not in log, log
        assert sorted(mta.message_ids("alice")) == sorted(sent)
    finally:
        mta.stop()
        server.stop()
        listener.close()
