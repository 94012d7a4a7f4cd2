"""End to end: 1,000 hostile connections of each kind while Postfix keeps being answered.

Never-reading socketmap clients pipeline requests for a 99 KB value; tricklers
send a socketmap request one byte per TCP segment; idle tcp_table clients send
one request and stay quiet. Meanwhile `postmap -q KEY tcp:127.0.0.1:PORT` runs
again and again and must be answered within a second each time, and the
server's RSS (VmRSS of /proc/PID/status) must stay under the bound README's
Limits section states. Bounded in count (3,000 connections) and time (the
trickle lasts TRICKLE_SECONDS).
"""

from __future__ import annotations

import contextlib
import re
import resource
import selectors
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import MakeTable, ServerProcess, StartServer
from postfix_tools import run_postfix

from tcpmap_lmdb import socketmap

EACH = 1000  # connections of each kind
TRICKLE_SECONDS = 15.0
# README, Limits: the server's RSS with 1,000 connections of each kind, whatever they do.
RSS_BOUND = 250 * 1024 * 1024
MiB = 1 << 20


@pytest.fixture
def db(tmp_path: Path, make_table: MakeTable) -> Path:
    (tmp_path / "maps").mkdir()
    make_table(tmp_path / "maps" / "virtual.lmdb", {"alice": "here", "huge": "h" * 99_000})
    return make_table(tmp_path / "main.lmdb", {"alice": "here"})


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def connect(port: int, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect(): the window is agreed in the handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def send_some(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        sock.send(data)


def wait_readable(socks: list[socket.socket], timeout: float) -> None:
    """Until every one of SOCKS has something to read (its reply)."""
    deadline = time.monotonic() + timeout
    waiting = set(socks)
    while waiting:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(waiting)} connections not answered in {timeout}s"
        with selectors.DefaultSelector() as selector:
            for sock in waiting:
                selector.register(sock, selectors.EVENT_READ)
            ready = selector.select(remaining)
        waiting -= {key.fileobj for key, _ in ready}


class Postfix(threading.Thread):
    """Runs `postmap -q alice tcp:...` back to back; records how long each answer took."""

    def __init__(self, config: Path, port: int) -> None:
        super().__init__(daemon=True)
        self.config, self.port = config, port
        self.stop = threading.Event()
        self.times: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            table = f"tcp:127.0.0.1:{self.port}"
            result = run_postfix("postmap", self.config, "-q", "alice", table)
            self.times.append(time.monotonic() - started)
            if (result.returncode, result.stdout) != (0, b"here\n"):
                self.failures.append(f"{result.returncode} {result.stdout!r} {result.stderr!r}")


def test_postfix_is_answered_and_memory_bounded_under_3000_hostile_connections(
    server: StartServer, db: Path, postfix_dir: Path
) -> None:
    """1,000 never-reading, 1,000 trickling and 1,000 idle connections: every postmap -q is
    answered within a second, and RSS stays under RSS_BOUND."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * EACH + 200
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    srv: ServerProcess = server(
        db,
        "--maps",
        str(db.parent / "maps"),
        "--max-connections",
        str(3 * EACH + 50),
        "--listen",
        "tcp:127.0.0.1:0",
        "--listen",
        "socketmap:127.0.0.1:0",
    )
    sm = int(srv.wait_for_log(r"INFO: 127\.0\.0\.1:(\d+) serves socketmap ").group(1))
    base = rss(srv.proc.pid)
    postfix = Postfix(postfix_dir, srv.port)
    socks: list[socket.socket] = []
    peak = base
    try:
        tricklers = [connect(sm) for _ in range(EACH)]
        socks += tricklers
        pipelined = socketmap.request(b"virtual", b"huge") * 200
        answered = []
        for _ in range(EACH):
            hog = connect(sm, rcvbuf=4096)
            send_some(hog, pipelined)
            idle = connect(srv.port)
            send_some(idle, b"get alice\n")
            answered += [hog, idle]
        socks += answered
        # Postfix from now on: 3,000 connections arriving at once overflow any listen
        # queue (the kernel drops SYNs; a client's retry comes 1 s later), which no
        # server can help; what must hold is service while they are connected. The
        # server has taken them all in once each idle and never-reading one has had
        # a reply (or, over the output budget, its hang-up).
        wait_readable(answered, timeout=60)
        postfix.start()
        request = b"100000:virtual " + b"k" * (100_000 - 15)
        sent = 0
        deadline = time.monotonic() + TRICKLE_SECONDS
        while time.monotonic() < deadline and sent < len(request):
            for trickler in tricklers:
                send_some(trickler, request[sent : sent + 1])
            sent += 1
            if sent % 50 == 0:
                peak = max(peak, rss(srv.proc.pid))
        peak = max(peak, rss(srv.proc.pid))
    finally:
        postfix.stop.set()
        if postfix.is_alive():
            postfix.join(30)
        for sock in socks:
            sock.close()
    assert not postfix.failures, postfix.failures[:3]
    assert len(postfix.times) >= 5, f"only {len(postfix.times)} lookups in the run"
    assert max(postfix.times) < 1.0, f"slowest postmap -q: {max(postfix.times):.2f}s"
    assert sent >= 100, f"only {sent} bytes trickled to each connection"
    print(
        f"\nRSS {base / MiB:.0f} -> peak {peak / MiB:.0f} MiB; {len(postfix.times)} postmap -q,"
        f" slowest {max(postfix.times):.2f}s; trickled {sent} bytes each"
    )
    assert peak < RSS_BOUND, f"RSS peaked at {peak / MiB:.0f} MiB"
