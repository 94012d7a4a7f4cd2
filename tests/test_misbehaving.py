"""Clients that misbehave on purpose, against a real server on loopback (issue 12).

Each test is one example of a kind of abuse: a client that never reads its
replies, a client that holds a slot and stays quiet, a flood of warnings, a key
no table can hold, a client speaking the other protocol. Postfix's own postmap
is the client wherever the question is what Postfix sees.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
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
)
from postfix_tools import run_postfix

from tcpmap_lmdb import protocol, socketmap

MiB = 1 << 20
HUGE = "h" * 99_000  # a 99 KB value: a socketmap reply fits it, a tcp_table one does not


@pytest.fixture
def db(tmp_path: Path, make_table: MakeTable) -> Path:
    (tmp_path / "maps").mkdir()
    make_table(tmp_path / "maps" / "virtual.lmdb", {"alice": "here", "huge": HUGE})
    return make_table(tmp_path / "main.lmdb", {"alice": "here"})


def both(server: StartServer, db: Path, *args: str) -> tuple[ServerProcess, int]:
    """A server with a tcp_table listener (srv.port) and a socketmap one (the int)."""
    srv = server(
        db,
        "--maps",
        str(db.parent / "maps"),
        "--listen",
        "tcp:127.0.0.1:0",
        "--listen",
        "socketmap:127.0.0.1:0",
        *args,
    )
    match = srv.wait_for_log(r"INFO: 127\.0\.0\.1:(\d+) serves socketmap ")
    return srv, int(match.group(1))


def rss(srv: ServerProcess) -> int:
    """The server's resident set size in bytes (VmRSS of /proc/PID/status)."""
    status = Path(f"/proc/{srv.proc.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


# --- 1. memory: a client that never reads -----------------------------------------------------


def test_socketmap_clients_that_never_read_cost_a_bounded_amount_each(
    server: StartServer, db: Path
) -> None:
    """20 clients pipeline requests for a 99 KB value and never read: the server stops
    reading from each once its replies fill the per-connection bound (RSS grows by less
    than 1 MiB per client; it used to be 6 MiB), and a bystander is still answered."""
    srv, sm = both(server, db)
    bystander = SocketmapConn(sm)
    assert bystander.ask(b"virtual", b"alice") == (b"OK", b"here")
    base = rss(srv)
    request = socketmap.request(b"virtual", b"huge")
    hogs = []
    for _ in range(20):
        hog = socket.create_connection(("127.0.0.1", sm))
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.settimeout(0)
        with contextlib.suppress(BlockingIOError):
            hog.send(request * 4000)  # 60 KB of requests: 400 MB of replies if all answered
        hogs.append(hog)
    try:
        # The server has read and answered what it will once a lookup on a fresh
        # connection is served after every hog has been taken in.
        deadline = time.monotonic() + REPLY_TIMEOUT
        peak = 0
        while time.monotonic() < deadline:
            peak = max(peak, rss(srv))
            assert bystander.ask(b"virtual", b"alice") == (b"OK", b"here")
        grown = peak - base
    finally:
        for hog in hogs:
            hog.close()
    assert grown < 20 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for 20 clients"


def test_never_reading_clients_together_hold_no_more_than_the_budget(
    server: StartServer, db: Path
) -> None:
    """300 such clients would hold 60 MB at 198 KB each: over the 32 MiB budget the ones
    holding longest are closed (with a warning), RSS grows by less than 60 MiB all told,
    and a bystander is answered throughout."""
    srv, sm = both(server, db)
    bystander = SocketmapConn(sm)
    assert bystander.ask(b"virtual", b"alice") == (b"OK", b"here")
    base = peak = rss(srv)
    mark = srv.mark()
    request = socketmap.request(b"virtual", b"huge")
    hogs = []
    try:
        for count in range(300):
            hog = socket.socket()
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.connect(("127.0.0.1", sm))
            hog.settimeout(0)
            with contextlib.suppress(BlockingIOError):
                hog.send(request * 4000)
            hogs.append(hog)
            if count % 10 == 0:
                peak = max(peak, rss(srv))
                assert bystander.ask(b"virtual", b"alice") == (b"OK", b"here")
        srv.wait_for_log(r"WARNING: .*not reading its replies, over the 32 MiB", since=mark)
        peak = max(peak, rss(srv))
    finally:
        for hog in hogs:
            hog.close()
    assert peak - base < 60 * MiB, f"RSS grew by {(peak - base) / MiB:.1f} MiB"


# --- 2. idle connections and --max-connections ------------------------------------------------


def test_a_newcomer_at_max_connections_closes_the_longest_idle_connection(
    server: StartServer, db: Path
) -> None:
    """--max-connections 5, all five idle after one request: a sixth client is answered
    within a second, and the connection idle longest is the one closed."""
    srv = server(db, "--max-connections", "5")
    holders = [srv.connect() for _ in range(5)]
    for holder in holders:
        assert holder.ask("alice") == (200, b"here")  # holders[0] has been idle longest
    started = time.monotonic()
    with srv.connect() as newcomer:
        assert newcomer.ask("alice") == (200, b"here")
        assert time.monotonic() - started < 1.0
    holders[0].read_eof(timeout=1.0, reset_ok=True)
    for holder in holders[1:]:
        assert holder.ask("alice") == (200, b"here")
        holder.close()
    holders[0].close()


def test_eviction_keeps_serving_newcomers_in_turn(server: StartServer, db: Path) -> None:
    """--max-connections 3 and 20 newcomers one after another: each is answered in a second,
    and at most three connections stay open."""
    srv = server(db, "--max-connections", "3")
    conns: list[Conn] = []
    for _ in range(20):
        started = time.monotonic()
        conn = srv.connect()
        assert conn.ask("alice") == (200, b"here")
        assert time.monotonic() - started < 1.0
        conns.append(conn)
    for conn in conns[:-3]:
        conn.read_eof(timeout=1.0, reset_ok=True)
    for conn in conns:
        conn.close()


# --- 3. warnings ------------------------------------------------------------------------------


def test_a_client_causing_thousands_of_warnings_gets_a_few_lines_and_a_summary(
    server: StartServer, db: Path
) -> None:
    """1,500 connections that each earn a warning: a handful of WARNING lines, then one
    summary line with the number suppressed; lifecycle lines still appear."""
    srv, sm = both(server, db, "--max-connections", "2000")
    mark = srv.mark()
    count = 1500
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", sm), timeout=REPLY_TIMEOUT) as sock:
            sock.sendall(b"x")
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(4096):
                    pass
    summary = srv.wait_for_log(r"WARNING: 127\.0\.0\.1: (\d+) more warnings suppressed", 20, mark)
    warnings = [line for line in srv.logs[mark:] if "WARNING:" in line]
    shown = [line for line in warnings if "suppressed" not in line]
    assert len(shown) <= 10, "\n".join(warnings[:20])
    assert len(shown) + int(summary.group(1)) <= count
    assert len(warnings) <= 12
    srv.signal(15)
    srv.wait_for_log(r"INFO: stopping", since=mark)


# --- 5. keys that cannot exist ----------------------------------------------------------------


def test_a_tcp_table_key_too_long_for_any_table_is_not_found_and_the_connection_stays(
    server: StartServer, db: Path
) -> None:
    """A key of 6,000 spaces (an 18 KB request line): 500 not found, connection kept."""
    srv = server(db, "--idle-timeout", "5")
    with srv.connect() as conn:
        assert conn.ask(" " * 6000) == (500, b"not found")
        assert conn.ask("alice") == (200, b"here")
        conn.send(b"get " + b"x" * 1_000_000)  # a megabyte: discarded as it arrives
        conn.send(b"\n")
        assert conn.read_line() == protocol.NOT_FOUND
        assert conn.ask("alice") == (200, b"here")


def test_a_socketmap_key_too_long_for_any_table_is_notfound(server: StartServer, db: Path) -> None:
    """A well-formed netstring with a 200 KB key: NOTFOUND, connection kept; an unknown
    map with such a key is still PERM."""
    _, sm = both(server, db)
    with SocketmapConn(sm) as conn:
        assert conn.ask(b"virtual", b"k" * 200_000) == (b"NOTFOUND", b"")
        assert conn.ask(b"virtual", b"alice") == (b"OK", b"here")
        status, _ = conn.ask(b"nosuchmap", b"k" * 200_000)
        assert status == b"PERM"


def test_an_over_long_line_without_lf_still_meets_the_idle_timeout(
    server: StartServer, db: Path
) -> None:
    """Discarding an over-long line is not activity: 100 KB trickled without an LF over
    more than the idle timeout is still cut off at the timeout."""
    srv = server(db, "--idle-timeout", "1")
    with srv.connect() as conn:
        conn.send(b"get " + b"x" * 20_000)
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - started < 3:
                conn.send(b"x" * 1000)
                conn.sock.settimeout(0.05)
                try:
                    if conn.sock.recv(100) == b"":
                        break
                except TimeoutError:
                    continue
        closed_after = time.monotonic() - started
    assert closed_after < 2.0, f"still open after {closed_after:.1f}s"


def test_postmap_finds_no_over_long_key_in_lmdb_nor_over_tcp(
    server: StartServer, db: Path, postfix_dir: Path, tmp_path: Path
) -> None:
    """The truth from Postfix's own lmdb: a key of 3,000 é (18 KB on the wire) is not found.
    tcp: must say the same (exit 1, nothing printed), not a query error."""
    key = "é" * 3000
    source = tmp_path / "src"
    source.write_text("alice here\n")
    assert run_postfix("postmap", postfix_dir, f"lmdb:{source}").returncode == 0
    truth = run_postfix("postmap", postfix_dir, "-q", key, f"lmdb:{source}")
    assert (truth.returncode, truth.stdout, truth.stderr) == (1, b"", b"")
    srv = server(db)
    ours = run_postfix("postmap", postfix_dir, "-q", key, f"tcp:127.0.0.1:{srv.port}")
    assert (ours.returncode, ours.stdout, ours.stderr) == (1, b"", b"")


# --- 6. the wrong protocol --------------------------------------------------------------------


def postmap_timed(config: Path, *args: str) -> tuple[subprocess.CompletedProcess[bytes], float]:
    started = time.monotonic()
    result = run_postfix("postmap", config, *args)
    return result, time.monotonic() - started


def test_a_socketmap_client_on_a_tcp_table_port_gets_an_error_at_once(
    server: StartServer, db: Path, postfix_dir: Path
) -> None:
    """`postmap -q KEY socketmap:inet:...` against a tcp_table port: an error within a
    second, and one log line naming the likely mistake."""
    srv = server(db)
    mark = srv.mark()
    result, took = postmap_timed(
        postfix_dir, "-q", "alice", f"socketmap:inet:127.0.0.1:{srv.port}:virtual"
    )
    assert result.returncode != 0
    assert took < 1.5, f"postmap took {took:.1f}s"
    assert b"tcp_table" in result.stderr, result.stderr
    srv.wait_for_log(r"WARNING: .*looks like a socketmap client on a tcp_table", since=mark)


def test_a_tcp_table_client_on_a_socketmap_port_gets_an_error_at_once(
    server: StartServer, db: Path, postfix_dir: Path
) -> None:
    """`postmap -q KEY tcp:...` against a socketmap port: an error within a second (not ten
    reconnects), and one log line naming the likely mistake."""
    srv, sm = both(server, db)
    mark = srv.mark()
    result, took = postmap_timed(postfix_dir, "-q", "alice", f"tcp:127.0.0.1:{sm}")
    assert result.returncode != 0
    assert took < 1.5, f"postmap took {took:.1f}s"
    srv.wait_for_log(r"WARNING: .*looks like a tcp_table client on a socketmap", since=mark)
    assert len([line for line in srv.logs[mark:] if "WARNING" in line]) == 1


@pytest.mark.parametrize(
    ("first", "kind"),
    [(b"12:virtual k", "tcp"), (b"\x16\x03\x01", "tcp"), (b"get alice\n", "socketmap")],
    ids=["netstring-on-tcp", "tls-on-tcp", "get-on-socketmap"],
)
def test_the_first_bytes_of_the_wrong_protocol_close_the_connection(
    server: StartServer, db: Path, first: bytes, kind: str
) -> None:
    """Bytes that cannot start a request of the listener's protocol: a reply, then EOF,
    without waiting for more bytes (the client may be waiting for us)."""
    srv, sm = both(server, db)
    with socket.create_connection(("127.0.0.1", srv.port if kind == "tcp" else sm)) as sock:
        sock.sendall(first)
        sock.settimeout(REPLY_TIMEOUT)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data, "no error reply"


def test_a_tcp_table_key_may_start_with_digits(server: StartServer, db: Path) -> None:
    """Only the first bytes of a connection are judged, and "get 12:..." is tcp_table."""
    srv = server(db)
    with srv.connect() as conn:
        assert conn.ask("12:virtual") == (500, b"not found")
        conn.send(b"12:junk\n")  # later lines are only bad requests: 400, kept
        assert conn.read_line().startswith(b"400 ")
        assert conn.ask("alice") == (200, b"here")
