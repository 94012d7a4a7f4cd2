"""Limits that hold under abuse: a real server on loopback, clients that misbehave on purpose.

Memory is read from /proc/PID/status (VmRSS) of the server process. Every wait is on a
reply, an EOF or a log line, bounded by a deadline; every load is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    REPLY_TIMEOUT,
    Conn,
    MakeTable,
    ServerProcess,
    SocketmapConn,
    StartServer,
    assert_refused_beyond_loopback,
)

from tcpmap_lmdb import protocol

MiB = 1 << 20
BIG_VALUE = "a" * 4091  # its reply is exactly 4096 bytes, the tcp_table maximum
BIG_REPLY = b"200 " + BIG_VALUE.encode() + b"\n"
LINE_LIMIT = protocol.MAX_REQUEST  # a request line this long without LF is refused


@pytest.fixture
def db(tmp_path: Path, make_table: MakeTable) -> Path:
    return make_table(tmp_path / "virtual.lmdb", {"big": BIG_VALUE, "alice": "here"})


def rss(srv: ServerProcess) -> int:
    """The server's resident set size in bytes (VmRSS)."""
    status = Path(f"/proc/{srv.proc.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def logged(srv: ServerProcess, pattern: str, since: int) -> bool:
    """Whether a log line from SINCE on matches PATTERN (no waiting)."""
    return any(re.search(pattern, line) for line in srv.logs[since:])


def timed_ask(conn: Conn, key: str) -> float:
    """Look KEY up (it must be found); the seconds the answer took."""
    started = time.monotonic()
    code, _ = conn.ask(key)
    assert code == 200
    return time.monotonic() - started


def drain(sock: socket.socket, timeout: float = REPLY_TIMEOUT, limit: int = 64 * MiB) -> bytes:
    """What is left to read until EOF or reset, bounded in time and size."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) <= limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"connection still open after {timeout}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"more than {limit} bytes")


def sm_port(srv: ServerProcess) -> int:
    return int(srv.wait_for_log(r"INFO: 127\.0\.0\.1:(\d+) serves socketmap ").group(1))


# --- a client that never reads ---------------------------------------------------------------


@pytest.mark.parametrize(("clients", "requests"), [(1, 200_000), (10, 20_000)])
def test_clients_that_never_read_cannot_make_the_server_buffer(
    server: StartServer, db: Path, clients: int, requests: int
) -> None:
    """Pipelining `get` for a 4 KiB value without reading: RSS stays flat, cut off after the
    idle timeout, and another client is answered promptly throughout."""
    idle = 2.0
    srv = server(db, "--idle-timeout", str(idle), "-v")
    bystander = srv.connect()
    timed_ask(bystander, "big")
    base = peak = rss(srv)
    mark = srv.mark()
    started = time.monotonic()
    hogs = [socket.create_connection(srv.address, timeout=30) for _ in range(clients)]
    stream = b"get big\n" * requests  # 800 MB of replies in all, if the server wrote them

    def pipeline(hog: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the server hung up on us: what we expect
            hog.sendall(stream)

    senders = [threading.Thread(target=pipeline, args=(hog,)) for hog in hogs]
    for sender in senders:
        sender.start()
    ports = [hog.getsockname()[1] for hog in hogs]
    patterns = [rf"DEBUG: 127\.0\.0\.1:{port}: idle for" for port in ports]
    slowest = 0.0
    try:
        while not all(logged(srv, pattern, mark) for pattern in patterns):
            assert time.monotonic() - started < idle + 10, "the hogs were never cut off"
            peak = max(peak, rss(srv))
            slowest = max(slowest, timed_ask(bystander, "alice"))
        closed_after = time.monotonic() - started
        for sender in senders:
            sender.join(timeout=10)
            assert not sender.is_alive()
        replies = [drain(hog) for hog in hogs]
    finally:
        for hog in hogs:
            hog.close()
    assert peak - base < 50 * MiB, f"RSS grew by {(peak - base) / MiB:.1f} MiB"
    assert idle <= closed_after < idle + 3
    assert slowest < 1.0, f"the bystander waited {slowest:.2f}s"
    for data in replies:
        # Whatever did arrive is whole replies (a reset may cut the last); far from all of them.
        whole = data[: len(data) - len(data) % len(BIG_REPLY)]
        assert whole == BIG_REPLY * (len(whole) // len(BIG_REPLY))
        assert len(data) // len(BIG_REPLY) < requests // 2
    assert bystander.ask("big") == (200, BIG_VALUE.encode())
    bystander.close()


# --- slowloris ----------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["request", "nothing"], ids=["after-a-request", "from-connect"])
@pytest.mark.parametrize("kind", ["tcp", "socketmap"])
def test_slowloris_is_cut_off_by_the_idle_timeout(
    server: StartServer, db: Path, kind: str, first: str
) -> None:
    """One byte every 0.2 s without completing a request: closed 1 s after the last answer."""
    srv = server(
        db,
        "--idle-timeout",
        "1",
        "--listen",
        "tcp:127.0.0.1:0",
        "--listen",
        "socketmap:127.0.0.1:0",
    )
    conn: Conn | SocketmapConn
    if kind == "tcp":
        conn, trickle = Conn(srv.port), b"get " + b"x" * 20
    else:
        conn, trickle = SocketmapConn(sm_port(srv)), b"9999:virtual " + b"x" * 20
    last_answer = time.monotonic()
    with conn:
        if first == "request":
            if isinstance(conn, Conn):
                assert conn.ask("alice") == (200, b"here")
            else:
                assert conn.ask(b"virtual", b"alice") == (b"OK", b"here")
            last_answer = time.monotonic()
        sent = 0
        for byte in trickle:
            try:
                conn.sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            conn.sock.settimeout(0.2)  # the pace of the trickle, and the wait for the hang-up
            try:
                data = conn.sock.recv(100)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            assert data == b"", f"a reply to an incomplete request: {data!r}"
            break
        else:
            pytest.fail(f"still open after trickling {sent} bytes")
        closed_after = time.monotonic() - last_answer
    assert 0.9 <= closed_after < 1.6, f"closed {closed_after:.2f}s after the last answer"
    assert sent >= 4, "the trickle did not go on during the idle timeout"


# --- connection floods --------------------------------------------------------------------------


def test_connections_beyond_max_connections_queue_and_are_served_in_turn(
    server: StartServer, db: Path
) -> None:
    """--max-connections 5 and 50 clients: five served promptly, 45 wait in the listen queue
    without hurting them, then are served five at a time, in order, as slots free."""
    srv = server(db, "--max-connections", "5")
    holders = [srv.connect() for _ in range(5)]
    latencies = [timed_ask(holder, "alice") for holder in holders]
    queued = [srv.connect() for _ in range(45)]  # the kernel completes these handshakes
    sent_at = {}
    for conn in queued:
        conn.send(b"get alice\n")
        sent_at[conn] = time.monotonic()
    # While the queue waits, the five open connections keep getting prompt answers.
    for _ in range(3):
        latencies += [timed_ask(holder, "big") for holder in holders]
        ready, _, _ = select.select([conn.sock for conn in queued], [], [], 0.1)
        assert ready == [], "a connection over the limit was served"
    assert max(latencies) < 0.5, f"slowest answer to an open connection: {max(latencies):.2f}s"

    def answered(conns: list[Conn], count: int, timeout: float = REPLY_TIMEOUT) -> list[Conn]:
        """Wait until COUNT of CONNS have a reply waiting; return those."""
        deadline = time.monotonic() + timeout
        ready: list[socket.socket] = []
        while len(ready) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(ready)} of {count} connections answered in {timeout}s"
            ready, _, _ = select.select([conn.sock for conn in conns], [], [], remaining)
        return [conn for conn in conns if conn.sock in ready]

    for holder in holders:
        holder.close()
    first = answered(queued, 5)
    assert first == queued[:5], "not served in arrival order"
    ready, _, _ = select.select([conn.sock for conn in queued[5:]], [], [], 0.3)
    assert ready == [], "more than five connections served at once"
    waits = []
    waiting = list(queued)
    while waiting:
        for conn in answered(waiting, 1):
            assert conn.read_line() == b"200 here\n"
            waits.append(time.monotonic() - sent_at[conn])
            # Served in turn: nobody who arrived more than five places later is served first.
            assert queued.index(conn) < queued.index(waiting[0]) + 5
            waiting.remove(conn)
            conn.close()
    assert len(waits) == 45
    assert max(waits) < REPLY_TIMEOUT


# --- over-long lines ----------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [20 * 1024, 1024, 7], ids=["one-go", "1KiB-pieces", "7B-pieces"])
def test_over_long_line_is_refused_as_soon_as_the_limit_is_passed(
    server: StartServer, db: Path, piece: int
) -> None:
    """20 KiB without LF: the 400 and the hang-up come once 16384 bytes are in, not at the end."""
    srv = server(db)
    line = b"get " + b"k" * (20 * 1024 - 4)
    mark = srv.mark()
    with srv.connect() as conn:
        sent = 0
        while sent < LINE_LIMIT:
            conn.send(line[sent : sent + piece])
            sent += len(line[sent : sent + piece])
        # Past the limit and not one byte more: the answer must not wait for the rest.
        assert conn.read_line() == protocol.LINE_TOO_LONG
        assert drain(conn.sock) == b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.send(line[sent:])  # the rest goes nowhere
    srv.wait_for_log(r"WARNING: .*request line longer than 16383 bytes, closing", since=mark)
    with srv.connect() as fresh:
        assert fresh.ask("alice") == (200, b"here")


def test_over_long_input_is_never_buffered(server: StartServer, db: Path) -> None:
    """200 clients holding 16383 bytes each cost little; a 64 MiB line is cut off after the
    first read, its sender reset long before the end; RSS barely moves."""
    srv = server(db)
    base = rss(srv)
    almost = b"get " + b"k" * (LINE_LIMIT - 1 - 4)  # the longest line, still without its LF
    holders = [srv.connect() for _ in range(200)]
    try:
        for holder in holders:
            holder.send(almost)
        with socket.create_connection(srv.address, timeout=REPLY_TIMEOUT) as flood:
            chunk, sent = b"x" * (1 << 16), 0
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                while sent < 64 * MiB:
                    sent += flood.send(chunk)
            assert sent < 16 * MiB, f"{sent / MiB:.1f} MiB went in before the reset"
        # Every pending line was kept whole: completing it gives a normal answer.
        for holder in holders:
            holder.send(b"\n")
        for holder in holders:
            assert holder.read_line() == protocol.NOT_FOUND
        grown = rss(srv) - base
    finally:
        for holder in holders:
            holder.close()
    assert grown < 20 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"


# --- where it listens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen",
    ["socketmap:0.0.0.0:0", "tcp:0.0.0.0:0=other", "socketmap:[::]:0", "mail.example.com:0"],
    ids=["socketmap-any", "named-map-any", "socketmap-ipv6-any", "hostname"],
)
def test_every_listener_form_refuses_non_loopback(db: Path, listen: str) -> None:
    """socketmap and named-map listeners, and host names, are held to loopback too (exit 2)."""
    maps = db.parent / "maps"
    maps.mkdir()
    assert_refused_beyond_loopback("--db", db, "--maps", maps, "--listen", listen)
