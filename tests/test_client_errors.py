"""tcpmap-query's failures: one line naming the address and what was expected, never a traceback.

Every peer is real and on loopback: a tcpmap-server with a tcp_table, a socketmap
and a metrics listener (each one asked in the other protocols), plain sockets
that answer garbage, hang up, reset or stay silent, and a closed port.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from activation import free_port
from conftest import ROOT, ServerProcess, command, run_command

from tcpmap_lmdb import build


def query(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """tcpmap-query ARGS in a fresh interpreter, as a user runs it."""
    return run_command("tcpmap-query", *args, timeout=timeout, text=True)


class Peer:
    """A loopback listener that does BEHAVIOUR to each connection, in a thread."""

    def __init__(self, behaviour: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._behaviour = behaviour
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            self._held.append(conn)
            self._behaviour(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self.sock.close()


def _read_a_little(conn: socket.socket) -> None:
    conn.settimeout(2)
    with contextlib.suppress(OSError):
        conn.recv(4096)


def garbage(conn: socket.socket) -> None:
    _read_a_little(conn)
    conn.sendall(b"\x00\xff\xfegarbage, not a reply\r\n\x01\x02")
    conn.close()


def hang_up(conn: socket.socket) -> None:
    _read_a_little(conn)
    conn.close()


def reset(conn: socket.socket) -> None:
    _read_a_little(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST, not FIN


def silent(conn: socket.socket) -> None:
    """Keep the connection open and say nothing (closed at teardown)."""


PEERS = {"garbage": garbage, "hang-up": hang_up, "reset": reset, "silent": silent}


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """A real tcpmap-server's tcp_table, socketmap and metrics ports, by protocol."""
    source = tmp_path_factory.mktemp("errors") / "virtual"
    source.write_bytes(b"alice@example.com alice@example.net\n")
    assert build.main(["-q", str(source)]) == 0
    srv = ServerProcess(
        Path(f"{source}.lmdb"),
        (
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "socketmap:127.0.0.1:0",
            "--listen",
            "metrics:127.0.0.1:0",
        ),
    )
    try:
        ports = {
            kind: int(srv.wait_for_log(rf"127\.0\.0\.1:(\d+) serves {kind}").group(1))
            for kind in ("tcp_table", "socketmap", "metrics")
        }
        yield ports
    finally:
        srv.check_clean_exit()


# How each client names the address, and the word its error must carry.
CLIENTS: dict[str, tuple[Callable[[int], list[str]], str]] = {
    "tcp_table": (lambda port: ["-s", f"tcp:127.0.0.1:{port}", "alice@example.com"], "tcp"),
    "socketmap": (
        lambda port: ["-s", f"socketmap:inet:127.0.0.1:{port}:virtual", "alice@example.com"],
        "socketmap",
    ),
    "metrics": (lambda port: ["--info", f"metrics:127.0.0.1:{port}"], "metrics"),
}


def assert_one_clear_line(result: subprocess.CompletedProcess[str], port: int, word: str) -> str:
    """Exit 2, nothing on stdout, one stderr line naming 127.0.0.1:PORT and WORD."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("tcpmap-query: "), line
    assert f"127.0.0.1:{port}" in line, line
    assert word in line.lower(), line
    assert result.stdout == ""
    return line


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("peer", PEERS)
def test_misbehaving_peer(client: str, peer: str) -> None:
    """Garbage, a hang-up, a reset, silence: one line that says what was expected there."""
    server = Peer(PEERS[peer])
    try:
        args, word = CLIENTS[client]
        line = assert_one_clear_line(query("--timeout", "1", *args(server.port)), server.port, word)
    finally:
        server.close()
    assert "expected" in line, line
    if peer == "silent":
        assert "no reply within 1 s" in line, line


def answering(reply: bytes) -> Callable[[socket.socket], None]:
    def behaviour(conn: socket.socket) -> None:
        _read_a_little(conn)
        conn.sendall(reply)
        conn.close()

    return behaviour


@pytest.mark.parametrize(
    ("client", "reply", "says"),
    [
        ("tcp_table", b"9:NOTFOUND ,", "it answered a netstring: a socketmap listener?"),
        ("tcp_table", b"HTTP/1.0 400 Bad Request\r\n\r\n", "it answered HTTP"),
        ("socketmap", b"500 not%20found\n", "it answered a tcp_table reply"),
        ("socketmap", b"7:MAYBE x,", "malformed reply b'MAYBE x'; expected a socketmap server"),
        ("socketmap", b"200000:", "reply length b'200000' over the limit"),
        ("socketmap", b"200:", "malformed netstring reply b'200:'"),
        ("metrics", b"HTTP/1.0 404 Not Found\r\n\r\n", "GET /metrics answered HTTP 404"),
        ("metrics", b"HTTP/1.0 200 OK\r\n\r\nhello world\n", "not a tcpmap-server's metrics"),
        ("metrics", b"9:NOTFOUND ,", "it answered a netstring"),
    ],
)
def test_other_servers(client: str, reply: bytes, says: str) -> None:
    """Other kinds of server (not tcpmap-server) at the address: what they answered, named."""
    server = Peer(answering(reply))
    try:
        args, word = CLIENTS[client]
        line = assert_one_clear_line(query("--timeout", "5", *args(server.port)), server.port, word)
    finally:
        server.close()
    assert says in line, line


@pytest.mark.parametrize("client", CLIENTS)
def test_closed_port(client: str) -> None:
    """Nothing listens: the connect error names the address (postmap's wording for tcp:)."""
    port = free_port()
    args, word = CLIENTS[client]
    line = assert_one_clear_line(query(*args(port)), port, word)
    assert "Connection refused" in line, line


@pytest.mark.parametrize(
    ("client", "listener", "says"),
    [
        ("tcp_table", "socketmap", "this is a socketmap listener"),  # the server's 400
        ("tcp_table", "metrics", "it answered HTTP: a metrics listener?"),
        ("socketmap", "tcp_table", "this is a tcp_table listener"),  # the server's PERM
        ("socketmap", "metrics", "no reply within 1 s; expected a socketmap server"),
        ("metrics", "tcp_table", "a tcp_table listener?"),
        ("metrics", "socketmap", "without an HTTP reply (a socketmap listener?)"),
    ],
)
def test_wrong_listener_of_a_real_server(
    listeners: dict[str, int], client: str, listener: str, says: str
) -> None:
    """A client pointed at another kind of tcpmap-server listener says what it expected."""
    port = listeners[listener]
    args, word = CLIENTS[client]
    line = assert_one_clear_line(query("--timeout", "1", *args(port)), port, word)
    assert says in line, line


def test_right_listeners_still_answer(listeners: dict[str, int]) -> None:
    """The same commands against the right listeners work (the errors above are not noise)."""
    for kind, (args, _) in CLIENTS.items():
        result = query("--timeout", "5", *args(listeners[kind]))
        assert (result.returncode, result.stderr) == (0, ""), kind
        assert result.stdout, kind


def test_interrupted_query_exits_quietly() -> None:
    """Ctrl-C while waiting for a reply: exit 130, no traceback."""
    server = Peer(silent)
    try:
        proc = subprocess.Popen(
            command("tcpmap-query", "-s", f"tcp:127.0.0.1:{server.port}", "k"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 30
        while server.accepted == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)  # polling for the connection, with a deadline
        assert server.accepted == 1
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        server.close()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert err == "tcpmap-query: interrupted\n"


def test_output_closed_early_is_no_error(tmp_path: Path) -> None:
    """tcpmap-query --dump TABLE | head -1: no traceback when the reader goes away."""
    source = tmp_path / "big"
    source.write_bytes(b"".join(b"key%06d@example.com value%06d\n" % (i, i) for i in range(20_000)))
    assert build.main(["-q", str(source)]) == 0
    proc = subprocess.Popen(
        command("tcpmap-query", "--dump", str(source)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"key000000@example.com\tvalue000000\n"
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(30) != 0
    assert err == b"", err


# --- a server address where a table file is taken ---------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--dump", "{addr}"], "--dump reads an LMDB table file; {addr} is an address"),
        (["--dump", "inet:{addr}"], "--dump reads an LMDB table file; inet:{addr} is an address"),
        (["--info", "{addr}"], "--info reads an LMDB table file; {addr} is an address"),
        (["--db", "{addr}", "k"], "--db reads an LMDB table file; {addr} is an address"),
        (["--db", "tcp:{addr}", "k"], "--db reads an LMDB table file; tcp:{addr} is a server"),
        (["-s", "lmdb:{addr}", "k"], "lmdb: names an LMDB table file; {addr} is an address"),
        (["--dump", "metrics:{addr}"], "--dump reads an LMDB table file; metrics:{addr} is"),
    ],
)
def test_address_given_for_a_table_file(args: list[str], says: str) -> None:
    """An address where a file is expected: say which the option needs, and what to use."""
    addr = f"127.0.0.1:{free_port()}"
    result = query(*(arg.format(addr=addr) for arg in args))
    line = assert_one_clear_line(result, int(addr.rpartition(":")[2]), "address")
    assert says.format(addr=addr) in line, line


def test_file_named_like_an_address_is_still_read(tmp_path: Path) -> None:
    """A table file that exists is read, however its name looks."""
    source = tmp_path / "127.0.0.1:4242"
    source.write_bytes(b"k v\n")
    assert build.main(["-q", str(source)]) == 0
    result = query("--dump", str(source))
    assert (result.returncode, result.stdout, result.stderr) == (0, "k\tv\n", "")


# --- an address taken as a key ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["alice@example.com", "{addr}"],  # postmap's order, without the table's type
        ["{addr}"],
        ["{addr}", "alice@example.com"],
    ],
)
def test_address_given_as_a_key_is_noted(listeners: dict[str, int], args: list[str]) -> None:
    """KEY HOST:PORT: HOST:PORT is a key (as to postmap); say so, and what was meant."""
    addr = f"127.0.0.1:{listeners['tcp_table']}"
    result = query("--timeout", "5", *(arg.format(addr=addr) for arg in args))
    note = f"tcpmap-query: note: {addr} is taken as a key; did you mean -s {addr}?"
    assert note in result.stderr.splitlines(), result.stderr


@pytest.mark.parametrize("args", [["-s", "tcp:{addr}", "{addr}"], ["alice@example.com"]])
def test_no_note_when_a_server_is_given_or_no_key_looks_like_one(
    listeners: dict[str, int], args: list[str]
) -> None:
    addr = f"127.0.0.1:{listeners['tcp_table']}"
    result = query("--timeout", "5", *(arg.format(addr=addr) for arg in args))
    assert "note:" not in result.stderr


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "1e400", "soon", "1e308"])
def test_a_timeout_that_is_no_time_is_refused(value: str) -> None:
    """--timeout takes a number of seconds above 0 and at most 1e9, as tcpmap-server's do;
    anything else is one usage line naming the option and the value, never a traceback."""
    done = query("-s", f"tcp:127.0.0.1:{free_port()}", "--timeout", value, "key")
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert "--timeout" in done.stderr and value in done.stderr, done.stderr
