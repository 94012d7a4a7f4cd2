"""What a client sends never reaches the log raw: no forged lines, no terminal escapes.

A real server (-v) on loopback and on a unix socket; its whole log is checked line by line.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from conftest import MakeTable, RawConn, ServerProcess, SocketmapConn, StartServer

from tcpmap_lmdb import socketmap
from tcpmap_lmdb.logtext import printable

HOSTILE = b"x\ny\rz\x1b[31mw\\v"  # LF, CR, an ANSI colour, a backslash
HOSTILE_SHOWN = r"x\x0ay\x0dz\x1b[31mw\\v"


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"alice@example.com", "alice@example.com"),
        (b"a%20b", "a%20b"),
        (HOSTILE, HOSTILE_SHOWN),
        ("bj\u00f6rn@\u00e9xample.com".encode(), "bj\u00f6rn@\u00e9xample.com"),  # UTF-8: as is
        (b"\xff\xfe", r"\xff\xfe"),  # not UTF-8
        ("a\u2028b\u202ec".encode(), r"a\xe2\x80\xa8b\xe2\x80\xaec"),  # line sep., bidi override
        ("tab\there", r"tab\x09here"),
        ("\udcff", r"\xff"),  # a byte decoded with surrogateescape
    ],
)
def test_printable(data: bytes | str, shown: str) -> None:
    assert printable(data) == shown
    assert printable(data).isprintable()


def _lines_are_ours(srv: ServerProcess) -> None:
    for line in srv.logs:
        assert re.match(r"tcpmap-server: (DEBUG|INFO|WARNING|ERROR): ", line), repr(line)
        assert "\x1b" not in line and "\r" not in line, repr(line)


def test_verbose_tcp_table_key_is_escaped(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    """A tcp_table key sent raw (not %XX-quoted, as Postfix would) with CR and ESC."""
    db = make_table(tmp_path / "virtual.lmdb", {"k": "v"})
    srv = server(db, "-v")
    with srv.connect() as conn:
        assert conn.exchange(b"get " + HOSTILE.replace(b"\n", b"") + b"\n").startswith(b"500 ")
        assert conn.exchange(b"get bad%zz\x1b\r\n").startswith(b"400 ")
    srv.wait_for_log(r"tcp_table map virtual key xy\\x0dz\\x1b\[31mw\\\\v: not found")
    srv.wait_for_log(r"key bad%zz\\x1b\\x0d: temporary: ")
    _lines_are_ours(srv)


def test_verbose_socketmap_key_and_map_name_are_escaped(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    """socketmap carries any byte: LF in the key and in the map name, over a unix socket
    whose client bound a name with LF in it (its peer address is logged too)."""
    db = make_table(tmp_path / "virtual.lmdb", {"k": "v"})
    path = tmp_path / "sm.sock"
    srv = server(db, "-v", "--listen", "127.0.0.1:0", "--listen", f"socketmap:unix:{path}")
    with SocketmapConn(path) as conn:
        assert conn.ask(b"virtual", HOSTILE)[0] == b"NOTFOUND"
        assert conn.ask(b"vir\ntual\x1b", b"k")[0] == b"PERM"
    client = tmp_path / "client\nFORGED\x1b"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(client))
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(socketmap.request(b"virtual", b"k"))
        assert sock.recv(100) == b"4:OK v,"
    srv.wait_for_log(rf"socketmap map virtual key {re.escape(HOSTILE_SHOWN)}: not found")
    srv.wait_for_log(r"socketmap map vir\\x0atual\\x1b key k: permanent: unknown map ")
    srv.wait_for_log(r"unix:.*client\\x0aFORGED\\x1b: socketmap map virtual key k: found")
    _lines_are_ours(srv)


def test_warnings_about_bad_requests_are_escaped(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    """The warning that quotes a bad stream's first bytes (here CR, LF and ESC)."""
    db = make_table(tmp_path / "virtual.lmdb", {"k": "v"})
    path = tmp_path / "sm.sock"
    srv = server(db, "--listen", "127.0.0.1:0", "--listen", f"socketmap:unix:{path}")
    with srv.connect() as conn:
        conn.send(b"\x1b\r\nFORGED\n")
        conn.read_line()
    with RawConn(path, 5) as raw:
        raw.send(b"\x1b\r\nFORGED\n")
    srv.wait_for_logs(r"WARNING: .*(not a|looks like).*closing", 2)
    srv.stop()
    _lines_are_ours(srv)
