"""Limits that hold under abuse: a real server on loopback, clients that misbehave on purpose.

Memory is read from /proc/PID/status (VmRSS) of the server process. Every wait is on a
reply, an EOF or a log line, bounded by a deadline; every load is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import re
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


def test_connections_beyond_max_connections_are_served_in_turn_by_closing_idle_ones(
    server: StartServer, db: Path
) -> None:
    """--max-connections 5 and 45 more clients, each sending a request at once: every one
    is answered within a second of the one before, in arrival order, by closing the
    connection idle longest; never more than five are open."""
    srv = server(db, "--max-connections", "5")
    holders = [srv.connect() for _ in range(5)]
    for holder in holders:
        timed_ask(holder, "alice")
    # Each asks at once, as Postfix does: a connection that has asked nothing yet is as
    # idle as any, and may be the one closed for the next (under load, it was).
    queued = []
    for _ in range(45):
        conn = srv.connect()  # the kernel completes these handshakes
        conn.send(b"get alice\n")
        queued.append(conn)
    for index, conn in enumerate(queued):
        assert conn.read_line(timeout=1.0) == b"200 here\n", f"client {index}"
        if index >= 5:  # five newer ones are open: this one's turn came after it was closed
            queued[index - 5].read_eof(timeout=1.0, reset_ok=True)
    for holder in holders:
        holder.read_eof(timeout=1.0, reset_ok=True)
        holder.close()
    for conn in queued[-5:]:
        assert conn.ask("big") == (200, BIG_VALUE.encode())
    for conn in queued:
        conn.close()


# --- over-long lines ----------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [20 * 1024, 1024, 7], ids=["one-go", "1KiB-pieces", "7B-pieces"])
def test_over_long_get_is_not_found_however_it_arrives(
    server: StartServer, db: Path, piece: int
) -> None:
    """A 20 KiB get line, in pieces: nothing before its LF, 500 at it, the connection kept,
    and no warning (it is a lookup of a key no table has, not an error)."""
    srv = server(db)
    line = b"get " + b"k" * (20 * 1024 - 4)
    mark = srv.mark()
    with srv.connect() as conn:
        for start in range(0, len(line), piece):
            conn.send(line[start : start + piece])
        conn.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            conn.sock.recv(100)  # no answer before the LF
        conn.send(b"\n")
        assert conn.read_line() == protocol.NOT_FOUND
        assert conn.ask("alice") == (200, b"here")
    assert not [line for line in srv.logs[mark:] if "WARNING" in line]


def test_over_long_input_is_never_buffered(server: StartServer, db: Path) -> None:
    """200 clients holding the longest line kept cost little; a 64 MiB line is dropped as
    it arrives and answered 500 at its LF; RSS barely moves."""
    srv = server(db)
    base = rss(srv)
    almost = b"get " + b"k" * (LINE_LIMIT - 1 - 4)  # the longest line, still without its LF
    holders = [srv.connect() for _ in range(200)]
    try:
        for holder in holders:
            holder.send(almost)
        with srv.connect(timeout=30) as flood:
            flood.send(b"get ")
            chunk = b"x" * (1 << 16)
            for _ in range(64 * MiB // len(chunk)):
                flood.send(chunk)
            flood.send(b"\n")
            assert flood.read_line(timeout=30) == protocol.NOT_FOUND
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
