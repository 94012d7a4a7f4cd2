"""The metrics listener under hostile clients: idle, slowloris and garbage requests.

A real server on loopback, real sockets; the scrape is a real HTTP client.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from pathlib import Path

import pytest
from conftest import MakeTable, ServerProcess, StartServer
from test_metrics import metrics_port, scrape

from tcpmap_lmdb import metrics, ratelimit


@pytest.fixture
def metered(
    server: StartServer, tmp_path: Path, make_table: MakeTable
) -> tuple[ServerProcess, int]:
    db = make_table(tmp_path / "virtual.lmdb", {"alice@example.com": "alice@example.net"})
    srv = server(db, "--listen", "127.0.0.1:0", "--listen", "metrics:127.0.0.1:0")
    return srv, metrics_port(srv)


def test_idle_and_slowloris_clients_do_not_block_scraping(
    metered: tuple[ServerProcess, int],
) -> None:
    """Three times more silent connections than scrapes served at once (half never send,
    half send half a request): a scrape is still answered at once, as each newcomer takes
    the slot of the connection that has waited longest for its request."""
    srv, port = metered
    hostile = []
    try:
        for n in range(3 * metrics.SCRAPERS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if n % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never end
            hostile.append(sock)
        started = time.monotonic()
        got = scrape(port, timeout=metrics.REQUEST_TIMEOUT + 10)
        elapsed = time.monotonic() - started
        assert ("tcpmap_connections_open", ()) in got
        assert elapsed < 2.0, f"scrape took {elapsed:.1f}s"
        # The silent ones were closed, for a newcomer or at their deadline: EOF, not a reply.
        for sock in hostile:
            sock.settimeout(metrics.REQUEST_TIMEOUT + 5)
            with contextlib.suppress(ConnectionResetError):  # closed with a half request unread
                assert sock.recv(4096) == b""
    finally:
        for sock in hostile:
            sock.close()
    assert not [line for line in srv.logs if "Traceback" in line]


# Requests that are not HTTP, or not HTTP this listener takes: each kind reaches a
# different error path in gevent.pywsgi.
GARBAGE = [
    b"\x00\x01\x02 hello\r\n\r\n",  # no method
    b"GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n",  # a bad header value
    b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",  # a header over 64 KiB
    b"A" * 9000 + b"\r\n\r\n",  # a request line over pywsgi's 8 KiB
    b"GET /metrics HTTP/9.9\r\n\r\n",  # no such version
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # TLS (an https:// scrape)
    b"GET /\x1b[31mred\rFORGED tcpmap-server: ERROR: x HTTP/1.1\n\n",  # control bytes
    b"get alice@example.com\n",  # a tcp_table client on the metrics port
]


def _send_garbage(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass  # the server closed with our bytes unread: fine


def test_garbage_requests_give_few_clear_warnings(metered: tuple[ServerProcess, int]) -> None:
    """50 bad requests: the rate limit's share of warnings, each naming the client, then one
    summary; no traceback, no gevent internals, no line a client wrote."""
    srv, port = metered
    mark = srv.mark()
    for n in range(50):
        _send_garbage(port, GARBAGE[n % len(GARBAGE)])
    summary = srv.wait_for_log(
        r"WARNING: 127\.0\.0\.1: (\d+) more warnings suppressed", ratelimit.WINDOW + 10, mark
    )
    logged = srv.logs[mark:]
    warnings = [line for line in logged if re.search(r": (WARNING|ERROR): ", line)]
    shown = [line for line in warnings if "suppressed" not in line]
    assert len(shown) == ratelimit.BURST, "\n".join(logged)
    assert int(summary.group(1)) == 50 - ratelimit.BURST
    for line in shown:
        assert re.match(r"tcpmap-server: WARNING: 127\.0\.0\.1:\d+: metrics listener: ", line), line
    for line in logged:
        assert re.match(r"tcpmap-server: (DEBUG|INFO|WARNING|ERROR): ", line), line
        assert "gevent" not in line and "socket object" not in line, line
        assert "\x1b" not in line and "\r" not in line, repr(line)
    assert scrape(port)[("tcpmap_warnings_suppressed_total", ())] == 50 - ratelimit.BURST


def test_requests_announcing_a_body_never_hold_a_slot(
    metered: tuple[ServerProcess, int],
) -> None:
    """Every slot taken by a whole request head that announces a body never sent (GET or
    POST, Content-Length or chunked): each is refused at once, 400 and closed, instead of
    holding its slot while the body is awaited; a scrape is answered at once."""
    srv, port = metered
    heads = [
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    ]
    hostile = []
    try:
        for n in range(metrics.SCRAPERS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(heads[n % len(heads)])
            hostile.append(sock)
        for sock in hostile:
            sock.settimeout(2.0)  # well within REQUEST_TIMEOUT: no waiting for the body
            assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
        started = time.monotonic()
        got = scrape(port, timeout=metrics.REQUEST_TIMEOUT + 10)
        assert ("tcpmap_connections_open", ()) in got
        assert time.monotonic() - started < 2.0
    finally:
        for sock in hostile:
            sock.close()
    assert not [line for line in srv.logs if "Traceback" in line]


def test_pipelined_scrapes_do_not_stop_lookups(metered: tuple[ServerProcess, int]) -> None:
    """One client writes 2,000 GET /metrics at once and reads the replies: pywsgi answers
    requests already buffered without a switch, so each must yield, or no lookup is answered
    until all are done (1.4 s here before). A lookup meanwhile is answered within 0.25 s."""
    srv, port = metered
    with socket.create_connection(("127.0.0.1", port), timeout=30) as hog, srv.connect() as conn:
        hog.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        assert hog.recv(65536).startswith(b"HTTP/1.1 200 ")  # the scrapes are under way
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            assert conn.ask("alice@example.com")[0] == 200
            slowest = max(slowest, time.monotonic() - started)
            hog.recv(1 << 20)
    assert slowest < 0.25, f"a lookup waited {slowest:.2f} s"
