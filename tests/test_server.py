"""tcpmap-server over real loopback sockets, spoken to with plain stdlib sockets.

Every reply read goes through conftest.check_reply: 3 digits, SP, text that
hex-decodes, LF, at most 4096 bytes, no CR, never 200 with an empty value.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import (
    REPLY_TIMEOUT,
    Conn,
    MakeTable,
    ServerProcess,
    StartServer,
    assert_refused_beyond_loopback,
    check_reply,
    make_table,
)

from tcpmap_lmdb import protocol

TABLE = {
    "alice@example.com": "alice@mail.example.com",
    "Mixed@Example.COM": "mixed",
    "with space": "space",
    "100%": "percent",
    "50%25": "literal escape",
    "jürgen@example.de": "umlaut",
    "Straße@Example.de": "street",
    "relay": "smtp:[relay.example.com]:587 with spaces",
    "controls": "é\t\r\n%",
}
MAX_LINE = protocol.MAX_REQUEST - 1  # longest request line accepted, LF not counted


@pytest.fixture
def db(tmp_path: Path, make_table: MakeTable) -> Path:
    return make_table(tmp_path / "virtual.lmdb", TABLE)


@pytest.fixture
def srv(server: StartServer, db: Path) -> ServerProcess:
    return server(db)


@pytest.fixture
def conn(srv: ServerProcess) -> Conn:
    return srv.connect()


# --- lookups ----------------------------------------------------------------


def test_found_key_answers_200_with_the_value(conn: Conn) -> None:
    """A key in the table is answered `200 value`."""
    assert conn.exchange(b"get alice@example.com\n") == b"200 alice@mail.example.com\n"


def test_missing_key_answers_500(conn: Conn) -> None:
    """A key not in the table is answered 500 (not found), and the connection stays."""
    assert conn.exchange(b"get bob@example.com\n") == protocol.NOT_FOUND
    assert conn.ask("alice@example.com") == (200, b"alice@mail.example.com")


@pytest.mark.parametrize(
    ("key", "wire", "value"),
    [
        ("with space", b"with%20space", b"space"),
        ("100%", b"100%25", b"percent"),
        ("50%25", b"50%2525", b"literal escape"),
        ("jürgen@example.de", b"j%C3%BCrgen@example.de", b"umlaut"),
    ],
    ids=["space", "percent", "percent-looking-key", "utf-8"],
)
def test_hex_quoted_keys_are_decoded(conn: Conn, key: str, wire: bytes, value: bytes) -> None:
    """Keys arrive %XX-encoded exactly as Postfix's hex_quote writes them, and are found."""
    assert protocol.request(key.encode()) == b"get " + wire + b"\n"
    assert conn.ask(key) == (200, value)


def test_lowercase_hex_escapes_are_decoded(conn: Conn) -> None:
    """hex_unquote accepts either case of hex digits, so do we."""
    assert check_reply(conn.exchange(b"get j%c3%bcrgen@example.de\n")) == (200, b"umlaut")


@pytest.mark.parametrize(
    "key", ["ALICE@EXAMPLE.COM", "mixed@example.com", "MIXED@EXAMPLE.COM", "STRASSE@example.DE"]
)
def test_keys_are_case_folded(conn: Conn, key: str) -> None:
    """Postfix sends tcp: keys in their original case; the server folds them (ß -> ss too)."""
    code, _ = conn.ask(key)
    assert code == 200


def test_value_with_spaces_is_hex_quoted(conn: Conn) -> None:
    """Spaces in a value go out as %20, so the reply text never has bare whitespace."""
    assert conn.exchange(b"get relay\n") == b"200 smtp:[relay.example.com]:587%20with%20spaces\n"


def test_value_with_8bit_and_control_bytes_is_hex_quoted(conn: Conn) -> None:
    """UTF-8, TAB, CR, LF and % in a value are %XX-encoded (upper-case hex)."""
    assert conn.exchange(b"get controls\n") == b"200 %C3%A9%09%0D%0A%25\n"


def test_every_byte_value_round_trips(server: StartServer, tmp_path: Path) -> None:
    """A value holding every non-NUL byte comes back intact through the quoting."""
    value = bytes(range(1, 256))
    db = make_table(tmp_path / "bytes.lmdb", {b"all": value})
    with server(db).connect() as conn:
        assert conn.ask("all") == (200, value)


def test_value_filling_the_reply_limit_is_served(server: StartServer, tmp_path: Path) -> None:
    """A value whose reply is exactly 4096 bytes with its LF is answered 200."""
    db = make_table(tmp_path / "long.lmdb", {"fits": "a" * 4091, "spaces": " " * 1363})
    with server(db).connect() as conn:
        line = conn.exchange(b"get fits\n")
        assert len(line) == protocol.MAX_REPLY
        assert check_reply(line) == (200, b"a" * 4091)
        assert conn.ask("spaces") == (200, b" " * 1363)


def test_value_too_long_for_a_reply_answers_400(server: StartServer, tmp_path: Path) -> None:
    """A value that cannot fit in 4096 bytes is a temporary error (400), never a 500 or a cut."""
    db = make_table(tmp_path / "long.lmdb", {"raw": "a" * 4092, "quoted": " " * 1364})
    with server(db).connect() as conn:
        assert conn.exchange(b"get raw\n") == protocol.VALUE_TOO_LONG
        assert conn.exchange(b"get quoted\n") == protocol.VALUE_TOO_LONG
        assert conn.ask("raw")[0] == 400


def test_empty_stored_value_answers_400(server: StartServer, tmp_path: Path) -> None:
    """A stored empty value is a table fault: 400, never `200 ` with nothing."""
    db = make_table(tmp_path / "empty.lmdb", {"empty": "", "full": "x"})
    with server(db).connect() as conn:
        code, text = conn.ask("empty")
        assert code == 400
        assert b"empty" in text
        assert conn.ask("full") == (200, b"x")


def test_longest_storable_key_is_found_and_longer_ones_are_not(
    server: StartServer, tmp_path: Path
) -> None:
    """A 510-byte key is found; 511 bytes and longer are simply not found."""
    key = "k" * 510
    db = make_table(tmp_path / "keys.lmdb", {key: "longest"})
    with server(db).connect() as conn:
        assert conn.ask(key) == (200, b"longest")
        assert conn.exchange(protocol.request(b"k" * 511)) == protocol.NOT_FOUND
        assert conn.exchange(protocol.request("é".encode() * 2000)) == protocol.NOT_FOUND


@pytest.mark.parametrize("fold", ["default", "--fold", "--no-fold"])
def test_fold_flags_decide_case_sensitivity(server: StartServer, tmp_path: Path, fold: str) -> None:
    """By default the build record decides folding; --fold / --no-fold override it."""
    folded = make_table(tmp_path / "folded.lmdb", {"alice": "a"})
    exact = make_table(tmp_path / "exact.lmdb", {"Alice": "A"}, folded=False)
    args = () if fold == "default" else (fold,)
    with server(folded, *args).connect() as conn:
        assert conn.ask("alice") == (200, b"a")
        assert conn.ask("ALICE")[0] == (500 if fold == "--no-fold" else 200)
    with server(exact, *args).connect() as conn:
        # --fold folds the lookup: "Alice" becomes "alice", which is not stored.
        assert conn.ask("Alice")[0] == (500 if fold == "--fold" else 200)
        assert conn.ask("alice")[0] == 500


# --- framing ------------------------------------------------------------------


def test_request_split_at_every_byte_boundary(conn: Conn) -> None:
    """A request arriving in two pieces, cut anywhere, is answered once, correctly."""
    request = protocol.request("jürgen@example.de".encode())
    for cut in range(1, len(request)):
        conn.send(request[:cut])
        conn.send(request[cut:])
        assert check_reply(conn.read_line()) == (200, b"umlaut"), f"cut at {cut}"


def test_requests_sent_one_byte_at_a_time(conn: Conn) -> None:
    """A stream of requests dribbled byte by byte is answered in order."""
    stream = b"get alice@example.com\nget nobody\nget with%20space\n"
    for byte in stream:
        conn.send(bytes([byte]))
    assert conn.read_line() == b"200 alice@mail.example.com\n"
    assert conn.read_line() == protocol.NOT_FOUND
    assert conn.read_line() == b"200 space\n"


def test_coalesced_requests_are_answered_in_order(conn: Conn) -> None:
    """Several requests in one send get one reply each, in order, whatever their outcome."""
    conn.send(
        b"get alice@example.com\nget nobody\nbogus\nput a b\nget 100%25\nget relay\nget bad%zz\n"
    )
    codes = [check_reply(conn.read_line())[0] for _ in range(7)]
    assert codes == [200, 500, 400, 500, 200, 200, 400]
    assert conn.ask("mixed@example.com") == (200, b"mixed")


def test_trailing_cr_is_ignored(conn: Conn) -> None:
    """A CRLF-terminated request (someone typing in telnet) is still understood."""
    assert conn.exchange(b"get alice@example.com\r\n") == b"200 alice@mail.example.com\n"


def test_second_space_is_part_of_the_key(conn: Conn) -> None:
    """Postfix sends exactly one SP after `get`; anything after it is the key, spaces too."""
    assert conn.exchange(b"get  alice@example.com\n") == protocol.NOT_FOUND


def test_half_closed_client_still_gets_its_reply(conn: Conn) -> None:
    """A client that sends a request and shuts down its side gets the reply, then EOF."""
    conn.send(b"get alice@example.com\n")
    conn.sock.shutdown(socket.SHUT_WR)
    assert conn.read_line() == b"200 alice@mail.example.com\n"
    conn.read_eof()


# --- bad requests -------------------------------------------------------------


def test_put_answers_500(conn: Conn) -> None:
    """The table is read-only: `put` is rejected with 500, and the connection stays."""
    assert conn.exchange(b"put alice@example.com other\n") == protocol.READ_ONLY
    assert conn.ask("alice@example.com") == (200, b"alice@mail.example.com")


@pytest.mark.parametrize(
    "line",
    [
        b"bogus alice@example.com",
        b"GET alice@example.com",
        b"",
        b"get",
        b"get alice%zz",
        b"get alice%2",
        b"get alice%",
        b"get %",
        b"get a%00b",
        b"get %00tcpmap-lmdb",
    ],
    ids=[
        "unknown-command",
        "upper-case-command",
        "empty-line",
        "get-without-key",
        "bad-hex",
        "short-escape",
        "percent-at-end",
        "lone-percent",
        "nul-in-key",
        "build-record-key",
    ],
)
def test_bad_request_answers_400_and_keeps_the_connection(conn: Conn, line: bytes) -> None:
    """A request we cannot parse is a temporary error (400); the next request still works.

    (After a first good request: a stream that starts with garbage is the wrong protocol.)"""
    assert conn.ask("alice@example.com") == (200, b"alice@mail.example.com")
    code, text = check_reply(conn.exchange(line + b"\n"))
    assert code == 400
    assert text
    assert conn.ask("alice@example.com") == (200, b"alice@mail.example.com")


def test_longest_request_line_is_accepted(conn: Conn) -> None:
    """The longest request line kept (LF not counted) is read and answered normally."""
    request = b"get " + b"k" * (MAX_LINE - 4) + b"\n"
    assert conn.exchange(request) == protocol.NOT_FOUND
    assert conn.ask("alice@example.com") == (200, b"alice@mail.example.com")


def test_over_long_get_is_not_found_and_the_connection_stays(srv: ServerProcess) -> None:
    """A get line one byte over the limit: no table holds such a key, so 500 when its LF
    comes (not before: the rest is read and dropped); the connection goes on."""
    with srv.connect() as conn:
        conn.send(b"get " + b"k" * (MAX_LINE + 1 - 4))
        conn.send(b"k" * 100_000 + b"\n")
        assert conn.read_line() == protocol.NOT_FOUND
        assert conn.ask("mixed@example.com") == (200, b"mixed")


def test_requests_around_an_over_long_line_are_answered_in_order(conn: Conn) -> None:
    """Complete requests before and after an over-long non-get line: their replies, and a
    400 for the long line, in order; the connection stays."""
    conn.send(b"get alice@example.com\nget nobody\n" + b"x" * protocol.MAX_REQUEST)
    assert conn.read_line() == b"200 alice@mail.example.com\n"
    assert conn.read_line() == protocol.NOT_FOUND
    conn.send(b"\nget mixed@example.com\n")
    assert conn.read_line() == protocol.LINE_TOO_LONG
    assert conn.read_line() == b"200 mixed\n"


def test_a_stream_of_garbage_is_answered_once_and_closed(srv: ServerProcess) -> None:
    """100 kB with no LF that cannot be tcp_table: 400 at the first byte, then a hang-up."""
    with srv.connect() as conn:
        conn.send(b"x" * 100_000)
        assert conn.read_line() == protocol.temporary("not a tcp_table request")
        # Bytes the server never read turn its close into a reset: either is a hang-up.
        with contextlib.suppress(ConnectionResetError):
            conn.read_eof()
    with srv.connect() as fresh:
        assert fresh.ask("alice@example.com")[0] == 200


def test_client_reset_mid_request_does_not_disturb_the_server(srv: ServerProcess) -> None:
    """A client that resets the connection half-way through a line leaves the server fine."""
    sock = socket.create_connection(srv.address, timeout=REPLY_TIMEOUT)
    sock.sendall(b"get alice@exa")
    # SO_LINGER 0: close() sends RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    with srv.connect() as conn:
        assert conn.ask("alice@example.com") == (200, b"alice@mail.example.com")


# --- connections, limits, timeouts ----------------------------------------------


def test_many_open_connections_are_all_served(srv: ServerProcess) -> None:
    """Fifty persistent connections, like fifty Postfix processes, are each answered."""
    conns = [srv.connect() for _ in range(50)]
    try:
        for round_ in range(3):
            for index, conn in enumerate(conns):
                code, _ = conn.ask("alice@example.com" if (index + round_) % 2 else "nobody")
                assert code == (200 if (index + round_) % 2 else 500)
    finally:
        for conn in conns:
            conn.close()


def test_idle_connection_is_closed_after_the_idle_timeout(server: StartServer, db: Path) -> None:
    """With --idle-timeout 0.5 a silent connection is closed, no sooner than 0.5 s."""
    srv = server(db, "--idle-timeout", "0.5")
    with srv.connect() as conn:
        started = time.monotonic()
        conn.read_eof(timeout=REPLY_TIMEOUT)
        assert time.monotonic() - started >= 0.5


def test_idle_timeout_counts_from_the_last_request(server: StartServer, db: Path) -> None:
    """A connection kept busy past the idle timeout stays open; closes 0.5 s after going quiet."""
    srv = server(db, "--idle-timeout", "0.5")
    with srv.connect() as conn:
        started = time.monotonic()
        for _ in range(100_000):
            assert conn.ask("alice@example.com")[0] == 200
            if time.monotonic() - started > 1.2:
                break
        assert time.monotonic() - started > 1.2
        quiet = time.monotonic()
        conn.read_eof(timeout=REPLY_TIMEOUT)
        assert time.monotonic() - quiet >= 0.5


def test_max_connections_makes_room_by_closing_the_longest_idle(
    server: StartServer, db: Path
) -> None:
    """With --max-connections 2 a third client is served at once: the connection idle
    longest is closed for it (Postfix reconnects), the other one is kept."""
    srv = server(db, "--max-connections", "2")
    first, second = srv.connect(), srv.connect()
    try:
        assert first.ask("alice@example.com")[0] == 200
        assert second.ask("alice@example.com")[0] == 200
        with srv.connect() as third:  # the kernel completes the handshake: listen queue
            third.send(b"get mixed@example.com\n")
            assert third.read_line(timeout=1.0) == b"200 mixed\n"
            first.read_eof(timeout=1.0, reset_ok=True)
            assert third.ask("alice@example.com")[0] == 200
        assert second.ask("alice@example.com")[0] == 200
    finally:
        first.close()
        second.close()


# --- the table changing under the server --------------------------------------------


def test_replacement_by_rename_is_served_on_open_connections(srv: ServerProcess, db: Path) -> None:
    """A table published by rename answers the next lookup on every open connection."""
    conns = [srv.connect() for _ in range(5)]
    try:
        for conn in conns:
            assert conn.ask("alice@example.com") == (200, b"alice@mail.example.com")
        make_table(db, {"alice@example.com": "moved@new.example", "bob": "new key"})
        for conn in conns:
            assert conn.ask("alice@example.com") == (200, b"moved@new.example")
            assert conn.ask("bob") == (200, b"new key")
            assert conn.ask("relay")[0] == 500
    finally:
        for conn in conns:
            conn.close()


def test_sighup_reopens_the_table(srv: ServerProcess, conn: Conn) -> None:
    """SIGHUP logs a re-open, reopens the table, and open connections keep working."""
    assert conn.ask("alice@example.com")[0] == 200
    mark = srv.mark()
    srv.signal(signal.SIGHUP)
    srv.wait_for_log(r"INFO: SIGHUP: re-opening .*virtual\.lmdb", since=mark)
    srv.wait_for_log(r"INFO: opened .*virtual\.lmdb: \d+ records", since=mark)
    assert conn.ask("alice@example.com") == (200, b"alice@mail.example.com")


def test_missing_database_answers_400_then_recovers(server: StartServer, tmp_path: Path) -> None:
    """Without the file every lookup is 400 with a reason; publishing it fixes it, no restart."""
    db = tmp_path / "late.lmdb"
    srv = server(db)
    srv.wait_for_log(r"WARNING: table unavailable: .*late\.lmdb is missing")
    with srv.connect() as conn:
        code, text = conn.ask("alice")
        assert code == 400
        assert str(db).encode() in text
        assert b"missing" in text
        make_table(db, {"alice": "here now"})
        assert conn.ask("alice") == (200, b"here now")
    with srv.connect() as fresh:
        assert fresh.ask("alice") == (200, b"here now")


def test_deleted_database_answers_400(srv: ServerProcess, conn: Conn, db: Path) -> None:
    """A table deleted while serving gives 400 (defer), never 500 (bounce)."""
    assert conn.ask("alice@example.com")[0] == 200
    db.unlink()
    code, text = conn.ask("alice@example.com")
    assert code == 400
    assert b"missing" in text
    assert conn.ask("nobody")[0] == 400


def test_garbage_database_answers_400(server: StartServer, tmp_path: Path) -> None:
    """A file that is not LMDB gives 400 naming the file, for found and unknown keys alike."""
    db = tmp_path / "garbage.lmdb"
    db.write_bytes(b"not an lmdb file\n" * 1000)
    with server(db).connect() as conn:
        for key in ("alice", "nobody"):
            code, text = conn.ask(key)
            assert code == 400
            assert str(db).encode() in text


def test_long_error_reason_is_cut_to_fit_the_reply(server: StartServer, tmp_path: Path) -> None:
    """A 400 whose reason quotes to over 4096 bytes is cut, still well formed."""
    deep = tmp_path.joinpath(*[f"dir {n:02d} " + "x y " * 45 for n in range(18)])
    db = deep / "virtual.lmdb"
    assert len(protocol.quote(str(db).encode())) > protocol.MAX_REPLY
    with server(db).connect() as conn:
        line = conn.exchange(b"get alice\n")
        code, text = check_reply(line)
        assert code == 400
        assert len(line) > protocol.MAX_REPLY - 4
        assert str(db).encode().startswith(text)


# --- stopping -------------------------------------------------------------------


def test_sigterm_answers_requests_already_sent(srv: ServerProcess, conn: Conn) -> None:
    """Requests on the wire when SIGTERM lands are answered before the connection closes."""
    assert conn.ask("alice@example.com")[0] == 200
    conn.send(b"get alice@example.com\nget nobody\nget relay\n")
    srv.signal(signal.SIGTERM)
    assert conn.read_line() == b"200 alice@mail.example.com\n"
    assert conn.read_line() == protocol.NOT_FOUND
    assert check_reply(conn.read_line())[0] == 200
    conn.read_eof()
    assert srv.stop() == 0


def test_sigterm_right_after_the_first_request_still_answers(srv: ServerProcess) -> None:
    """A brand-new connection's first request, sent just before SIGTERM, is answered."""
    with srv.connect() as conn:
        conn.send(b"get alice@example.com\n")
        srv.signal(signal.SIGTERM)
        assert conn.read_line() == b"200 alice@mail.example.com\n"
        conn.read_eof()
    assert srv.stop() == 0


def test_sigterm_closes_idle_connections_and_exits_0(srv: ServerProcess) -> None:
    """On SIGTERM idle connections are closed at once and the server exits 0."""
    idle = [srv.connect() for _ in range(3)]
    assert idle[0].ask("alice@example.com")[0] == 200
    srv.signal(signal.SIGTERM)
    for conn in idle:
        conn.read_eof()
        conn.close()
    assert srv.stop() == 0
    srv.wait_for_log(r"INFO: stopped after 1 lookups")


def test_sigint_stops_the_server_cleanly(srv: ServerProcess) -> None:
    """SIGINT (Ctrl-C) stops the server like SIGTERM, exit status 0."""
    srv.signal(signal.SIGINT)
    assert srv.proc.wait(REPLY_TIMEOUT) == 0


def test_refuses_connections_after_sigterm(srv: ServerProcess) -> None:
    """Once stopped the server accepts no new connection."""
    srv.signal(signal.SIGTERM)
    srv.wait_for_log(r"INFO: stopped after")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(srv.address, timeout=REPLY_TIMEOUT).close()
    assert srv.stop() == 0


# --- where it listens --------------------------------------------------------------


@pytest.mark.parametrize(
    "listen",
    [["0.0.0.0:0"], ["[::]:0"], ["127.0.0.1:0", "0.0.0.0:0"]],
    ids=["ipv4-any", "ipv6-any", "loopback-plus-any"],
)
def test_non_loopback_listen_is_refused(db: Path, listen: list[str]) -> None:
    """Listening beyond loopback is refused (exit 2) with a message about authentication."""
    args: list[str] = []
    for address in listen:
        args += ["--listen", address]
    assert_refused_beyond_loopback("--db", db, *args)


def test_allow_remote_permits_any_address(server: StartServer, db: Path) -> None:
    """--allow-remote lets it bind 0.0.0.0; we still only talk to it over loopback."""
    srv = server(db, "--listen", "0.0.0.0:0", "--allow-remote")
    assert srv.host == "0.0.0.0"
    with srv.connect() as conn:
        assert conn.ask("alice@example.com")[0] == 200


def test_ipv6_loopback_is_served(server: StartServer, db: Path) -> None:
    """--listen [::1]:0 listens on IPv6 loopback and answers there."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    srv = server(db, "--listen", "[::1]:0")
    assert srv.host == "[::1]"
    with Conn(srv.port, host="::1") as conn:
        assert conn.ask("alice@example.com")[0] == 200
