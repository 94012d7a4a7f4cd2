"""socketmap over real sockets: Postfix's postmap, raw sockets, tcpmap-query, several maps.

Servers are the real tcpmap-server in a subprocess, on 127.0.0.1:0 and unix
sockets in tmp dirs, serving real LMDB tables. The Postfix tests use
`postmap -q KEY socketmap:inet:127.0.0.1:PORT:NAME` (and socketmap:unix:PATH:NAME):
it exits 0 printing the value when found, 1 silently when not found, and 1 with
"query error" after TEMP or PERM (postfix-maps.md 2.1).
"""

from __future__ import annotations

import re
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from activation import Activated, exec_start, tcp_listener, unix_listener
from conftest import (
    ROOT,
    LoggedProcess,
    SocketmapConn,
    StartServer,
    make_table,
    server_command,
    start_server,
)
from postfix_tools import run_postfix

from tcpmap_lmdb import socketmap
from tcpmap_lmdb.socketmap import MAX_REPLY, MAX_REQUEST

START_TIMEOUT = 15.0  # a cold interpreter importing gevent on a loaded CI box
REPLY_TIMEOUT = 5.0
STOP_TIMEOUT = 15.0

VIRTUAL = {
    "alice@example.com": "alice@mail.example.com",
    "Mixed@Example.COM": "mixed",
    "with space": "space value",
    "100%": "percent",
    "a%20b": "literal percent-20",
    "a b": "a space b",
    "jürgen@example.de": "Grüße aus Köln",
    "Straße@Example.de": "street",
}
ALIASES = {"postmaster": "root", "root": "admin@example.com, ops@example.com"}
FITS = b"f" * (MAX_REPLY - 3)  # "OK " + this is exactly the 100000-byte limit
OVER = b"o" * (MAX_REPLY - 2)  # one byte too many
BIG = {b"fits": FITS, b"over": OVER}


# --- a server started with exactly the given arguments ----------------------------------

_LISTENING = re.compile(r"INFO: listening on (\S+)$")


class Served(LoggedProcess):
    """tcpmap-server with exactly ARGS (no implied --db or --listen), its log collected.

    Waits until every --listen has logged its "listening on" line; endpoints[i]
    is where the i-th --listen ended up ("127.0.0.1:PORT" or "unix:/path").
    """

    def __init__(self, args: Sequence[str | Path]) -> None:
        proc = start_server(args)
        super().__init__(proc, proc.stdout)
        expected = sum(1 for arg in args if arg == "--listen")
        try:
            lines = self.wait_for_logs(_LISTENING.pattern, expected, START_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        self.endpoints = [match.group(1) for match in lines]

    def port(self, index: int = 0) -> int:
        host, _, port = self.endpoints[index].rpartition(":")
        assert host == "127.0.0.1", self.endpoints[index]
        return int(port)

    def path(self, index: int = 0) -> Path:
        where = self.endpoints[index]
        assert where.startswith("unix:"), where
        return Path(where[5:])


Launch = Callable[..., Served]


@pytest.fixture
def launch() -> Iterator[Launch]:
    """launch(*args) starts tcpmap-server with exactly ARGS; teardown expects a clean exit."""
    started: list[Served] = []

    def start(*args: str | Path) -> Served:
        process = Served(args)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.returncode is None:
            process.check_clean_exit()


def run_to_exit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """tcpmap-server ARGS expected to give up at start: its exit status and output."""
    return subprocess.run(
        server_command(*args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        cwd=ROOT,
        check=False,
    )


def maps_dir(base: Path) -> Path:
    """BASE/maps with virtual, aliases and big (values at and over the reply limit)."""
    directory = base / "maps"
    directory.mkdir()
    make_table(directory / "virtual.lmdb", VIRTUAL)
    make_table(directory / "aliases.lmdb", ALIASES)
    make_table(directory / "big.lmdb", BIG)
    return directory


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the read-only tests: --maps DIR on an inet and a unix socket."""
    base = tmp_path_factory.mktemp("shared")
    process = Served(
        [
            "--maps",
            maps_dir(base),
            "--listen",
            "socketmap:127.0.0.1:0",
            "--listen",
            f"socketmap:unix:{base / 'sm.sock'}",
        ]
    )
    yield process
    process.check_clean_exit()


TRANSPORTS = ["inet", "unix"]


def table(srv: Served, transport: str, name: str, index: int | None = None) -> str:
    """How main.cf names map NAME on SRV's inet (or unix) listener."""
    if transport == "inet":
        return f"socketmap:inet:127.0.0.1:{srv.port(0 if index is None else index)}:{name}"
    return f"socketmap:unix:{srv.path(1 if index is None else index)}:{name}"


# --- Postfix's client --------------------------------------------------------------------


def postmap(
    config: Path, key: str, where: str, *, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`postmap -c CONFIG -q KEY WHERE`."""
    return run_postfix("postmap", config, "-q", key, where, stdin=stdin)


def assert_found(result: subprocess.CompletedProcess[bytes], value: str | bytes) -> None:
    expected = value.encode() if isinstance(value, str) else value
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert result.stdout == expected + b"\n"


def assert_not_found(result: subprocess.CompletedProcess[bytes]) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"")


def assert_query_error(result: subprocess.CompletedProcess[bytes], kind: str) -> None:
    """postmap failed after a KIND ("temporary"/"permanent") socketmap error, printing nothing."""
    assert result.returncode != 0
    assert result.stdout == b""
    assert f"socketmap server {kind} error".encode() in result.stderr, result.stderr
    assert b"query error" in result.stderr, result.stderr


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    transport: str = request.param
    return transport


@pytest.mark.postfix
def test_postmap_prints_the_value_of_a_found_key(
    postfix_dir: Path, shared: Served, transport: str
) -> None:
    """A key in the map: postmap prints its value and exits 0, without warnings."""
    result = postmap(postfix_dir, "alice@example.com", table(shared, transport, "virtual"))
    assert_found(result, "alice@mail.example.com")


@pytest.mark.postfix
def test_postmap_missing_key_exits_1_silently(
    postfix_dir: Path, shared: Served, transport: str
) -> None:
    """NOTFOUND: postmap prints nothing and exits 1, not an error."""
    assert_not_found(
        postmap(postfix_dir, "nobody@example.com", table(shared, transport, "virtual"))
    )


@pytest.mark.postfix
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ALICE@Example.COM", "alice@mail.example.com"),
        ("mixed@example.com", "mixed"),
        ("JÜRGEN@example.de", "Grüße aus Köln"),
        ("STRASSE@EXAMPLE.DE", "street"),
        ("with space", "space value"),
        ("100%", "percent"),
        ("a%20b", "literal percent-20"),
        ("a b", "a space b"),
    ],
    ids=["mixed-case", "table-mixed", "utf-8", "eszett", "space", "percent", "pct20", "a-b"],
)
def test_postmap_raw_keys_are_found_folded(
    postfix_dir: Path, shared: Served, transport: str, key: str, value: str
) -> None:
    """Keys go raw (case, spaces, %, UTF-8 kept): found as the folded table was built."""
    assert_found(postmap(postfix_dir, key, table(shared, transport, "virtual")), value)


@pytest.mark.postfix
def test_postmap_serves_each_map_of_the_directory(
    postfix_dir: Path, shared: Served, transport: str
) -> None:
    """--maps DIR: each NAME.lmdb answers as map NAME; the map name selects the table."""
    where = table(shared, transport, "aliases")
    assert_found(postmap(postfix_dir, "root", where), "admin@example.com, ops@example.com")
    assert_not_found(postmap(postfix_dir, "alice@example.com", where))


@pytest.mark.postfix
def test_batch_mode_answers_every_key(postfix_dir: Path, shared: Served, transport: str) -> None:
    """`postmap -q -` prints KEY<TAB>VALUE for each found key, in order."""
    keys = ["alice@example.com", "nobody", "with space", "MIXED@EXAMPLE.COM", "100%"]
    result = postmap(
        postfix_dir,
        "-",
        table(shared, transport, "virtual"),
        stdin="".join(f"{key}\n" for key in keys).encode(),
    )
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert result.stdout.decode().splitlines() == [
        "alice@example.com\talice@mail.example.com",
        "with space\tspace value",
        "MIXED@EXAMPLE.COM\tmixed",
        "100%\tpercent",
    ]


class CountingRelay:
    """A loopback TCP relay to a port that counts the connections made through it."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self._target), timeout=30)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._listener.close()
        self._accepter.join(REPLY_TIMEOUT)
        for sock in self._sockets:
            sock.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.mark.postfix
def test_batch_mode_uses_one_connection_for_all_keys(postfix_dir: Path, shared: Served) -> None:
    """Postfix keeps its socketmap connection: several keys, one connection, every answer."""
    relay = CountingRelay(shared.port(0))
    try:
        keys = ["alice@example.com", "ALICE@EXAMPLE.COM", "nobody", "100%", "with space"]
        result = postmap(
            postfix_dir,
            "-",
            f"socketmap:inet:127.0.0.1:{relay.port}:virtual",
            stdin="".join(f"{key}\n" for key in keys).encode(),
        )
    finally:
        relay.close()
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert len(result.stdout.splitlines()) == 4
    assert relay.connections == 1


@pytest.mark.postfix
def test_unknown_map_is_a_permanent_query_error(
    postfix_dir: Path, shared: Served, transport: str
) -> None:
    """A map name with no table: PERM, so postmap fails with a query error naming it."""
    result = postmap(postfix_dir, "alice@example.com", table(shared, transport, "nosuchmap"))
    assert_query_error(result, "permanent")
    assert b"nosuchmap" in result.stderr


@pytest.mark.postfix
def test_server_keeps_serving_after_an_unknown_map(postfix_dir: Path, shared: Served) -> None:
    """After a PERM the next lookup, on the same server, is answered normally."""
    assert_query_error(postmap(postfix_dir, "k", table(shared, "inet", "nosuchmap")), "permanent")
    assert_found(postmap(postfix_dir, "100%", table(shared, "inet", "virtual")), "percent")


@pytest.mark.postfix
def test_value_filling_the_reply_limit_reaches_postfix_whole(
    postfix_dir: Path, shared: Served, transport: str
) -> None:
    """'OK ' + 99997 bytes is a 100000-byte payload: Postfix 3.7 takes it, value intact."""
    assert_found(postmap(postfix_dir, "fits", table(shared, transport, "big")), FITS)


@pytest.mark.postfix
def test_oversize_value_is_a_temporary_error_never_a_truncated_ok(
    postfix_dir: Path, shared: Served, transport: str
) -> None:
    """A value one byte too long for the limit: TEMP (defer), and no part of it is printed."""
    result = postmap(postfix_dir, "over", table(shared, transport, "big"))
    assert_query_error(result, "temporary")
    assert b"ooo" not in result.stderr


# --- raw sockets ------------------------------------------------------------------------


def connect(srv: Served, transport: str = "inet") -> SocketmapConn:
    """A raw connection to SRV's first inet (or first unix) listener."""
    if transport == "inet":
        index = next(i for i, e in enumerate(srv.endpoints) if not e.startswith("unix:"))
        return SocketmapConn(("127.0.0.1", srv.port(index)))
    index = next(i for i, e in enumerate(srv.endpoints) if e.startswith("unix:"))
    return SocketmapConn(srv.path(index))


@pytest.fixture
def own(launch: Launch, tmp_path: Path) -> Served:
    """A server of this test's own (inet + unix), for tests that break connections or tables."""
    return launch(
        "--maps",
        maps_dir(tmp_path),
        "--listen",
        "socketmap:127.0.0.1:0",
        "--listen",
        f"socketmap:unix:{tmp_path / 'sm.sock'}",
    )


def test_request_split_byte_by_byte_is_answered_once(shared: Served, transport: str) -> None:
    """A request sent one byte per packet gets exactly one reply."""
    with connect(shared, transport) as conn:
        for byte in socketmap.request(b"virtual", b"with space"):
            conn.send(bytes([byte]))
        assert conn.read_payload() == b"OK space value"
        assert conn.ask_payload(b"virtual", b"100%") == b"OK percent"


def test_coalesced_requests_are_answered_in_order(shared: Served, transport: str) -> None:
    """Several requests in one packet: one reply each, in order, whatever the outcome."""
    requests = [
        (b"virtual", b"alice@example.com"),
        (b"nosuchmap", b"k"),
        (b"virtual", b"nobody"),
        (b"aliases", b"postmaster"),
        (b"big", b"over"),
    ]
    with connect(shared, transport) as conn:
        conn.send(b"".join(socketmap.request(name, key) for name, key in requests))
        replies = [conn.read_payload() for _ in requests]
    assert replies[0] == b"OK alice@mail.example.com"
    assert replies[1].startswith(b"PERM ")
    assert replies[2] == b"NOTFOUND "
    assert replies[3] == b"OK root"
    assert replies[4].startswith(b"TEMP ")


def test_many_pipelined_requests_on_one_connection_are_all_answered(shared: Served) -> None:
    """Hundreds of requests sent without reading: every reply arrives, in order."""
    count = 500
    keys = [b"100%" if i % 2 else b"missing-%d" % i for i in range(count)]
    with connect(shared) as conn:
        conn.send(b"".join(socketmap.request(b"virtual", key) for key in keys))
        replies = [conn.read_payload() for _ in keys]
    assert replies == [b"OK percent" if i % 2 else b"NOTFOUND " for i in range(count)]


def test_split_and_coalesced_at_once(shared: Served) -> None:
    """A packet ending mid-request, the next finishing it and starting another: all answered."""
    stream = b"".join(socketmap.request(b"virtual", k) for k in [b"100%", b"a b", b"a%20b"])
    with connect(shared) as conn:
        for start in range(0, len(stream), 7):
            conn.send(stream[start : start + 7])
        replies = [conn.read_payload() for _ in range(3)]
    assert replies == [b"OK percent", b"OK a space b", b"OK literal percent-20"]


def test_unknown_map_keeps_the_connection_open(shared: Served, transport: str) -> None:
    """PERM is an answer, not a hang-up: the same connection serves the next request."""
    with connect(shared, transport) as conn:
        assert conn.ask_payload(b"nosuchmap", b"alice@example.com").startswith(b"PERM ")
        assert conn.ask_payload(b"virtual", b"alice@example.com") == b"OK alice@mail.example.com"


def test_request_of_the_largest_size_is_answered(shared: Served) -> None:
    """A request payload of MAX_REQUEST bytes is read whole and answered."""
    key = b"k" * (MAX_REQUEST - len(b"virtual "))
    with connect(shared) as conn:
        assert conn.ask_payload(b"virtual", key) == b"NOTFOUND "


def test_oversize_reply_over_raw_socket_is_temp(shared: Served) -> None:
    """The payload would be 100001 bytes: TEMP, never a truncated OK."""
    with connect(shared) as conn:
        assert conn.ask_payload(b"big", b"over").startswith(b"TEMP ")
        assert conn.ask_payload(b"big", b"fits") == b"OK " + FITS


@pytest.mark.parametrize(
    "garbage",
    [b"x", b"5:virtual,", b"3:abcd,", b"-1:", b":,"],
    ids=["non-digit", "length-too-short", "no-comma", "minus", "no-digits"],
)
def test_malformed_netstring_closes_that_connection_only(
    own: Served, transport: str, garbage: bytes
) -> None:
    """Requests before the garbage are answered, then the server hangs up; others go on."""
    with connect(own, transport) as bystander, connect(own, transport) as offender:
        assert bystander.ask_payload(b"virtual", b"100%") == b"OK percent"
        offender.send(socketmap.request(b"virtual", b"a b") + garbage)
        assert offender.read_payload() == b"OK a space b"
        offender.read_eof()
        assert bystander.ask_payload(b"virtual", b"with space") == b"OK space value"
    with connect(own, transport) as newcomer:
        assert newcomer.ask_payload(b"aliases", b"postmaster") == b"OK root"
    own.wait_for_logs(r"WARNING: .*closing")


def test_oversize_request_is_notfound_and_not_kept(own: Served) -> None:
    """A 1 MB request for a known map: no table holds such a key, so NOTFOUND (what
    Postfix's own lmdb: says); the bytes are dropped as they arrive; the connection stays."""
    with connect(own) as conn:
        assert conn.ask_payload(b"virtual", b"k" * 1_000_000) == b"NOTFOUND "
        assert conn.ask_payload(b"virtual", b"100%") == b"OK percent"
    with connect(own) as conn:
        assert conn.ask_payload(b"virtual", b"100%") == b"OK percent"


# --- several maps; tables changing under a running server --------------------------------


@pytest.mark.postfix
def test_table_published_into_the_directory_is_served_without_restart(
    postfix_dir: Path, own: Served, tmp_path: Path
) -> None:
    """A NAME.lmdb that appears while the server runs is served from the next lookup."""
    where = table(own, "inet", "relocated")
    assert_query_error(postmap(postfix_dir, "alice", where), "permanent")
    make_table(tmp_path / "maps" / "relocated.lmdb", {"alice": "alice@new.example.com"})
    assert_found(postmap(postfix_dir, "ALICE", where), "alice@new.example.com")
    assert_found(
        postmap(postfix_dir, "alice", table(own, "unix", "relocated")), "alice@new.example.com"
    )


@pytest.mark.postfix
def test_rebuilt_table_is_seen_on_the_next_lookup(
    postfix_dir: Path, own: Served, tmp_path: Path
) -> None:
    """A table replaced by rename (os.replace): the next lookup gets the new value."""
    where = table(own, "unix", "aliases")
    assert_found(postmap(postfix_dir, "postmaster", where), "root")
    make_table(tmp_path / "maps" / "aliases.lmdb", {"postmaster": "hostmaster"})
    assert_found(postmap(postfix_dir, "postmaster", where), "hostmaster")
    assert_not_found(postmap(postfix_dir, "root", where))


def test_rebuilt_table_is_seen_on_an_open_connection(own: Served, tmp_path: Path) -> None:
    """The same connection sees the new table after a rename, without reconnecting."""
    with connect(own) as conn:
        assert conn.ask_payload(b"aliases", b"postmaster") == b"OK root"
        make_table(tmp_path / "maps" / "aliases.lmdb", {"postmaster": "hostmaster"})
        assert conn.ask_payload(b"aliases", b"postmaster") == b"OK hostmaster"


@pytest.mark.postfix
def test_tcp_listener_bound_to_a_map_beside_a_socketmap_listener(
    postfix_dir: Path, launch: Launch, tmp_path: Path
) -> None:
    """tcp:HOST:PORT=NAME serves map NAME (not --db), HOST:PORT the --db, socketmap every map."""
    db = make_table(tmp_path / "legacy.lmdb", {"alice@example.com": "from --db"})
    srv = launch(
        "--db",
        db,
        "--maps",
        maps_dir(tmp_path),
        "--listen",
        "tcp:127.0.0.1:0=aliases",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "socketmap:127.0.0.1:0",
    )
    aliases_tcp, db_tcp = f"tcp:127.0.0.1:{srv.port(0)}", f"tcp:127.0.0.1:{srv.port(1)}"
    assert_found(postmap(postfix_dir, "Postmaster", aliases_tcp), "root")
    assert_not_found(postmap(postfix_dir, "alice@example.com", aliases_tcp))
    assert_found(postmap(postfix_dir, "alice@example.com", db_tcp), "from --db")
    assert_not_found(postmap(postfix_dir, "postmaster", db_tcp))
    for name, key, value in [
        ("virtual", "with space", "space value"),
        ("aliases", "postmaster", "root"),
        ("legacy", "ALICE@example.com", "from --db"),
    ]:
        assert_found(postmap(postfix_dir, key, table(srv, "inet", name, 2)), value)


@pytest.mark.postfix
def test_tcp_listener_for_a_map_not_yet_published_defers_then_serves(
    postfix_dir: Path, launch: Launch, tmp_path: Path
) -> None:
    """tcp:...=NAME before NAME.lmdb exists answers 400 (query error), then serves it."""
    directory = maps_dir(tmp_path)
    srv = launch("--maps", directory, "--listen", "tcp:127.0.0.1:0=later")
    tcp = f"tcp:127.0.0.1:{srv.port()}"
    result = postmap(postfix_dir, "key", tcp)
    assert result.returncode != 0
    assert b"query error" in result.stderr, result.stderr
    make_table(directory / "later.lmdb", {"key": "value now"})
    assert_found(postmap(postfix_dir, "key", tcp), "value now")


@pytest.mark.postfix
def test_db_listener_still_works_and_socketmap_serves_the_db_by_its_stem(
    postfix_dir: Path, server: StartServer, tmp_path: Path
) -> None:
    """--db PATH --listen HOST:PORT is tcp_table as before; socketmap names it by its stem."""
    db = make_table(tmp_path / "virtual.lmdb", VIRTUAL)
    srv = server(db, "--listen", "127.0.0.1:0", "--listen", "socketmap:127.0.0.1:0")
    socketmap_at = srv.wait_for_log(r"INFO: (\S+) serves socketmap").group(1)
    assert_found(postmap(postfix_dir, "100%", f"tcp:127.0.0.1:{srv.port}"), "percent")
    where = f"socketmap:inet:{socketmap_at}:virtual"
    assert_found(postmap(postfix_dir, "Alice@Example.com", where), "alice@mail.example.com")
    other = f"socketmap:inet:{socketmap_at}:aliases"
    assert_query_error(postmap(postfix_dir, "root", other), "permanent")


# --- systemd's sockets, bound by FileDescriptorName= -------------------------------------


@pytest.fixture
def activated() -> Iterator[list[Activated]]:
    processes: list[Activated] = []
    yield processes
    for process in processes:
        log = "\n".join(process.logs)
        assert process.stop() == 0, log
        assert "Traceback" not in log, log


@pytest.mark.postfix
def test_inherited_sockets_are_bound_by_their_names(
    postfix_dir: Path, tmp_path: Path, activated: list[Activated]
) -> None:
    """Sockets named socketmap, tcp=aliases and tcp_table each serve their protocol and map."""
    directory = tmp_path / "maps"
    directory.mkdir()
    make_table(directory / "aliases.lmdb", ALIASES)
    db = make_table(tmp_path / "virtual.lmdb", VIRTUAL)
    sock_path = tmp_path / "sm.sock"
    listeners = [unix_listener(sock_path), tcp_listener("127.0.0.1"), tcp_listener("127.0.0.1")]
    try:
        srv = Activated(
            exec_start(db, f"--maps {directory}"),
            listeners,
            ["socketmap", "tcp=aliases", "tcp_table"],
        )
        activated.append(srv)
        for name in ("socketmap", "tcp=aliases", "tcp_table"):
            srv.wait_for_log(f"inherited socket '{name}' from systemd")
        aliases_tcp = f"tcp:127.0.0.1:{listeners[1].getsockname()[1]}"
        db_tcp = f"tcp:127.0.0.1:{listeners[2].getsockname()[1]}"
        sm = f"socketmap:unix:{sock_path}"
        assert_found(
            postmap(postfix_dir, "alice@example.com", f"{sm}:virtual"), VIRTUAL["alice@example.com"]
        )
        assert_found(postmap(postfix_dir, "postmaster", f"{sm}:aliases"), "root")
        assert_found(postmap(postfix_dir, "postmaster", aliases_tcp), "root")
        assert_not_found(postmap(postfix_dir, "alice@example.com", aliases_tcp))
        assert_found(
            postmap(postfix_dir, "alice@example.com", db_tcp), VIRTUAL["alice@example.com"]
        )
        assert_not_found(postmap(postfix_dir, "postmaster", db_tcp))
    finally:
        for listener in listeners:
            listener.close()


# --- unix socket files ---------------------------------------------------------------------


def test_unix_socket_file_is_removed_on_sigterm(launch: Launch, tmp_path: Path) -> None:
    """The socket file --listen socketmap:unix:PATH created is gone after a clean stop."""
    path = tmp_path / "sm.sock"
    srv = launch("--maps", maps_dir(tmp_path), "--listen", f"socketmap:unix:{path}")
    assert stat.S_ISSOCK(path.lstat().st_mode)
    srv.check_clean_exit()
    assert not path.exists()


def test_unix_socket_is_connectable_by_every_local_user(launch: Launch, tmp_path: Path) -> None:
    """Mode 0666 like a loopback port (Postfix runs as another user); units set tighter modes."""
    path = tmp_path / "sm.sock"
    launch("--maps", maps_dir(tmp_path), "--listen", f"socketmap:unix:{path}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666


def test_stale_socket_file_is_replaced_at_start(launch: Launch, tmp_path: Path) -> None:
    """A socket file nobody listens on (left by a crash) is replaced; the server answers there."""
    path = tmp_path / "sm.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert stat.S_ISSOCK(path.lstat().st_mode)
    srv = launch("--maps", maps_dir(tmp_path), "--listen", f"socketmap:unix:{path}")
    with connect(srv, "unix") as conn:
        assert conn.ask_payload(b"virtual", b"100%") == b"OK percent"


def test_regular_file_at_the_socket_path_is_never_removed(tmp_path: Path) -> None:
    """A non-socket file at PATH is not the server's to delete: it refuses to start."""
    path = tmp_path / "sm.sock"
    path.write_text("precious")
    result = run_to_exit("--maps", maps_dir(tmp_path), "--listen", f"socketmap:unix:{path}")
    assert result.returncode != 0
    assert "cannot listen" in result.stderr, result.stderr
    assert path.read_text() == "precious"


def test_live_server_socket_is_not_taken_over(launch: Launch, tmp_path: Path) -> None:
    """A second server on the same PATH refuses to start; the first keeps serving there."""
    path = tmp_path / "sm.sock"
    directory = maps_dir(tmp_path)
    first = launch("--maps", directory, "--listen", f"socketmap:unix:{path}")
    result = run_to_exit("--maps", directory, "--listen", f"socketmap:unix:{path}")
    assert result.returncode != 0
    assert "cannot listen" in result.stderr, result.stderr
    with connect(first, "unix") as conn:
        assert conn.ask_payload(b"virtual", b"100%") == b"OK percent"


def test_stopping_leaves_a_socket_file_that_another_server_now_owns(
    launch: Launch, tmp_path: Path
) -> None:
    """Server A's socket file was replaced by server B's: stopping A must not delete B's."""
    path = tmp_path / "sm.sock"
    directory = maps_dir(tmp_path)
    old = launch("--maps", directory, "--listen", f"socketmap:unix:{path}")
    path.unlink()  # e.g. a tmpfiles clean-up, or an admin tidying up
    new = launch("--maps", directory, "--listen", f"socketmap:unix:{path}")
    old.check_clean_exit()
    assert path.exists(), "stopping the old server removed the new server's socket"
    with connect(new, "unix") as conn:
        assert conn.ask_payload(b"virtual", b"100%") == b"OK percent"


def test_failed_start_removes_the_socket_files_it_created(tmp_path: Path) -> None:
    """--listen unix:PATH then an address in use: the server exits 1 and PATH is gone."""
    path = tmp_path / "sm.sock"
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_to_exit(
            "--maps",
            maps_dir(tmp_path),
            "--listen",
            f"socketmap:unix:{path}",
            "--listen",
            f"socketmap:127.0.0.1:{port}",
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr, result.stderr
    assert not path.exists()


# --- tcpmap-query speaks socketmap ----------------------------------------------------------

TCPMAP_QUERY = Path(sys.executable).parent / "tcpmap-query"


def tcpmap_query(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The installed tcpmap-query console script."""
    return subprocess.run(
        [str(TCPMAP_QUERY), *args], input=stdin, capture_output=True, timeout=30, check=False
    )


def test_tcpmap_query_prints_the_value(shared: Served, transport: str) -> None:
    """-s socketmap:...:NAME KEY prints the value and exits 0."""
    result = tcpmap_query("-s", table(shared, transport, "virtual"), "Jürgen@Example.de")
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert result.stdout == "Grüße aus Köln\n".encode()


def test_tcpmap_query_sends_keys_raw(shared: Served) -> None:
    """Keys with spaces and % go raw, as Postfix sends them."""
    result = tcpmap_query("-s", table(shared, "inet", "virtual"), "a%20b")
    assert result.stdout == b"literal percent-20\n", result.stderr
    result = tcpmap_query("-s", table(shared, "inet", "virtual"), "with space")
    assert result.stdout == b"space value\n", result.stderr


def test_tcpmap_query_not_found_exits_1(shared: Served, transport: str) -> None:
    """NOTFOUND: nothing printed, exit 1."""
    result = tcpmap_query("-s", table(shared, transport, "virtual"), "nobody")
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"")


def test_tcpmap_query_perm_exits_2(shared: Served, transport: str) -> None:
    """PERM (unknown map): exit 2 with the server's reason on stderr."""
    result = tcpmap_query("-s", table(shared, transport, "nosuchmap"), "alice@example.com")
    assert (result.returncode, result.stdout) == (2, b"")
    assert b"PERM" in result.stderr
    assert b"nosuchmap" in result.stderr


def test_tcpmap_query_temp_exits_2(shared: Served) -> None:
    """TEMP (value too long): exit 2, nothing on stdout."""
    result = tcpmap_query("-s", table(shared, "inet", "big"), "over")
    assert (result.returncode, result.stdout) == (2, b"")
    assert b"TEMP" in result.stderr


def test_tcpmap_query_reads_the_largest_reply(shared: Served) -> None:
    """A 100000-byte reply payload is read whole."""
    result = tcpmap_query("-s", table(shared, "unix", "big"), "fits")
    assert (result.returncode, result.stdout) == (0, FITS + b"\n"), result.stderr


def test_tcpmap_query_batch_over_one_socketmap_connection(shared: Served) -> None:
    """Keys on stdin: KEY<TAB>VALUE for each found key; exit 0 when any was found."""
    result = tcpmap_query(
        "-s", table(shared, "unix", "virtual"), "-", stdin=b"100%\nnobody\nMIXED@example.com\n"
    )
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert result.stdout == b"100%\tpercent\nMIXED@example.com\tmixed\n"


def test_tcpmap_query_without_a_server_exits_2(tmp_path: Path) -> None:
    """No socket at PATH: exit 2 (an error, not 'not found')."""
    result = tcpmap_query("-s", f"socketmap:unix:{tmp_path / 'none.sock'}:virtual", "k")
    assert result.returncode == 2
    assert result.stdout == b""
