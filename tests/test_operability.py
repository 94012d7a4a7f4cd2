"""Operability: Postfix's spellings, errors that name the thing and the fix, day-2 tools.

Real files, real servers on loopback, and Postfix's own postmap/postalias for the
dump round trip.
"""

from __future__ import annotations

import bz2
import gzip
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
from activation import free_port
from conftest import ROOT, MakeTable, ServerProcess, StartServer, raw_items, server_command
from conftest import make_table as make_table_module
from conftest import run_command as run
from postfix_tools import run_postfix

from tcpmap_lmdb import build, dbformat, sources
from tcpmap_lmdb.cli import query_main, server_parser
from tcpmap_lmdb.client import TableName
from tcpmap_lmdb.config import Binding, ConfigError, ListenSpec
from tcpmap_lmdb.table import Table, TableError

SOURCE = b"alice@example.com alice@example.net\nbob@example.com bob@example.net\n"


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """TMP/virtual (the source) built into TMP/virtual.lmdb by tcpmap-build."""
    source = tmp_path / "virtual"
    source.write_bytes(SOURCE)
    assert build.main(["-q", str(source)]) == 0
    return source


# --- Postfix's spellings -----------------------------------------------------------


def test_build_takes_mains_cf_spelling(tmp_path: Path) -> None:
    """tcpmap-build lmdb:/path/virtual builds /path/virtual.lmdb, as postmap does."""
    source = tmp_path / "virtual"
    source.write_bytes(SOURCE)
    assert build.main(["-q", f"lmdb:{source}"]) == 0
    assert (tmp_path / "virtual.lmdb").is_file()


def test_build_refuses_other_table_types(tmp_path: Path) -> None:
    """hash:FILE is not silently read as a file named 'hash:FILE'."""
    result = run("tcpmap-build", f"hash:{tmp_path / 'virtual'}")
    assert result.returncode == 2
    assert b"lmdb: tables only" in result.stderr


@pytest.mark.parametrize("spelling", ["{p}", "lmdb:{p}", "{p}.lmdb"])
def test_table_path_takes_mains_cf_spellings(built: Path, spelling: str) -> None:
    """--db NAME, --db lmdb:NAME and --db NAME.lmdb all mean NAME.lmdb."""
    assert dbformat.table_path(spelling.format(p=built)) == Path(f"{built}.lmdb")


def test_table_path_of_a_table_not_built_yet(tmp_path: Path) -> None:
    """A NAME that does not exist means NAME.lmdb, the file a build will make."""
    assert dbformat.table_path(tmp_path / "new") == tmp_path / "new.lmdb"


@pytest.mark.parametrize(
    ("text", "binding", "where"),
    [
        ("inet:127.0.0.1:4242", Binding("tcp"), "127.0.0.1:4242"),
        ("unix:/run/tcpmap.sock", Binding("socketmap"), "unix:/run/tcpmap.sock"),
        ("socketmap:inet:127.0.0.1:4243", Binding("socketmap"), "127.0.0.1:4243"),
        ("socketmap:unix:/run/x", Binding("socketmap"), "unix:/run/x"),
        ("tcp:[::1]:4242=virtual", Binding("tcp", "virtual"), "[::1]:4242"),
        ("localhost:4242", Binding("tcp"), "localhost:4242"),
    ],
)
def test_listen_takes_postfix_spellings(text: str, binding: Binding, where: str) -> None:
    """--listen inet:HOST:PORT and unix:PATH, as master.cf and main.cf spell them."""
    spec = ListenSpec.parse(text)
    assert spec.binding == binding
    assert str(spec).startswith(where)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("socketmap:inet:127.0.0.1:4243:virtual", "serves every map"),
        ("milter:127.0.0.1:1", "unknown listener type 'milter'"),
        ("unix:", "no socket path"),
        ("tcp:127.0.0.1:4242=", "no map name"),
    ],
)
def test_ambiguous_listen_names_the_accepted_forms(text: str, reason: str) -> None:
    """A spelling we cannot take is refused with every form we can."""
    with pytest.raises(ConfigError) as caught:
        ListenSpec.parse(text)
    assert reason in str(caught.value)
    assert "accepted forms: HOST:PORT" in str(caught.value)
    assert "unix:PATH" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("tcp:127.0.0.1:4242", "tcp:127.0.0.1:4242"),
        ("127.0.0.1:4242", "tcp:127.0.0.1:4242"),
        ("socketmap:inet:127.0.0.1:4243:virtual", "socketmap:inet:127.0.0.1:4243:virtual"),
        ("socketmap:unix:/run/x.sock:virtual", "socketmap:unix:/run/x.sock:virtual"),
        ("lmdb:/etc/postfix/virtual", "lmdb:/etc/postfix/virtual"),
    ],
)
def test_query_takes_mains_cf_table_names(text: str, shown: str) -> None:
    """-s takes every table name main.cf would use for us."""
    assert str(TableName.parse(text)) == shown


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("socketmap:inet:127.0.0.1:4243", "no map name after the port"),
        ("socketmap:unix:/run/x.sock", "no map name after the socket path"),
        ("socketmap:127.0.0.1:4243:virtual", "expected socketmap:inet:... or socketmap:unix:..."),
        ("hash:/etc/aliases", "unknown table type 'hash'"),
        ("regexp:/etc/postfix/x:y", "unknown table type 'regexp'"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("localhost:smtp", "port must be a number"),
    ],
)
def test_a_bad_table_name_says_what_is_wrong(text: str, reason: str) -> None:
    """-s with a table name we cannot ask: what is wrong with it, then every form we take."""
    with pytest.raises(ValueError, match="accepted forms: tcp:HOST:PORT") as caught:
        TableName.parse(text)
    assert reason in str(caught.value)


def test_query_names_accepted_forms_for_a_bad_table() -> None:
    """-s socketmap:127.0.0.1:4243 (no inet:, no map) is refused with the forms."""
    result = run("tcpmap-query", "-s", "socketmap:127.0.0.1:4243", "k")
    assert result.returncode == 2
    assert b"accepted forms: tcp:HOST:PORT" in result.stderr


def test_query_in_postmap_order_queries_the_table(
    built: Path, server: StartServer, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """tcpmap-query KEY tcp:HOST:PORT (postmap -q's order) looks KEY up there, not two keys."""
    srv = server(Path(f"{built}.lmdb"))
    assert query_main(["alice@example.com", f"tcp:127.0.0.1:{srv.port}"]) == 0
    assert capsysbinary.readouterr().out == b"alice@example.net\n"


def test_query_lmdb_table_name(built: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """-s lmdb:NAME reads NAME.lmdb directly, as postmap -q KEY lmdb:NAME does."""
    assert query_main(["-s", f"lmdb:{built}", "bob@example.com"]) == 0
    assert capsysbinary.readouterr().out == b"bob@example.net\n"


# --- errors that name the address, the file, the key --------------------------------


def test_connection_refused_names_the_table() -> None:
    """postmap's wording: 'connect to TCP map 127.0.0.1:PORT: Connection refused'."""
    port = free_port()
    result = run("tcpmap-query", "-s", f"tcp:127.0.0.1:{port}", "k")
    assert result.returncode == 2
    assert result.stderr == f"tcpmap-query: connect to TCP map 127.0.0.1:{port}: ".encode() + (
        b"Connection refused\n"
    )


def test_listen_error_names_the_address(built: Path) -> None:
    """Address in use: the error says which address, and exits 1 without a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            server_command("--db", f"{built}.lmdb", "--listen", f"127.0.0.1:{port}"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def _damaged_lmdb(path: Path) -> Path:
    """An LMDB file whose meta pages are overwritten past the magic number."""
    make_table_module(path, {"k": "v"})
    with open(path, "r+b") as file:
        file.seek(20)
        file.write(b"\xff" * 100)
        file.seek(4096 + 20)
        file.write(b"\xff" * 100)
    return path


def _berkeley_db(path: Path, magic: int) -> Path:
    """The first bytes of a Berkeley DB file: its magic number at offset 12."""
    path.write_bytes(bytes(12) + magic.to_bytes(4, "little") + bytes(4080))
    return path


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(b"") and p, "it is empty"),
        (lambda p: p.write_bytes(SOURCE) and p, "it is a text file, a table source perhaps"),
        (_damaged_lmdb, "it is a damaged LMDB file"),
        (lambda p: _berkeley_db(p, 0x00061561), "it is a Berkeley DB hash file"),
        (lambda p: _berkeley_db(p, 0x00053162), "it is a Berkeley DB btree file"),
        (lambda p: p.write_bytes(gzip.compress(SOURCE)) and p, "it is gzip-compressed data"),
        (lambda p: p.write_bytes(bz2.compress(SOURCE)) and p, "it is bzip2-compressed data"),
    ],
)
def test_not_a_table_says_what_the_file_is(tmp_path: Path, make: object, says: str) -> None:
    """--db on a non-LMDB file: what it is and `tcpmap-build`, never /proc/self/fd/N."""
    path = tmp_path / "virtual.db"
    make(path)  # type: ignore[operator]
    with pytest.raises(TableError) as caught:
        Table.open(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a readable LMDB file: {says}")
    assert "tcpmap-build" in message
    assert "/proc/self" not in message
    assert "Bad file descriptor" not in message


def test_berkeley_db_suggests_building_from_its_source(tmp_path: Path) -> None:
    """virtual.db is hash:virtual: build from virtual."""
    path = _berkeley_db(tmp_path / "virtual.db", 0x00061561)
    with pytest.raises(TableError, match=rf"tcpmap-build {tmp_path / 'virtual'}`"):
        Table.open(path)


def test_query_decodes_reasons_names_the_key_and_goes_on(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    """A 400 for one key: its decoded reason with the key, then the next key is answered."""
    db = make_table(tmp_path / "virtual.lmdb", {"long": "a b" * 1100, "short": "ok"})
    srv = server(db)
    result = run("tcpmap-query", "-s", f"tcp:127.0.0.1:{srv.port}", "long", "short")
    assert result.returncode == 2
    assert result.stdout == b"short\tok\n"
    assert b"tcpmap-query: long: tcp:127.0.0.1:" in result.stderr
    assert b"answered 400: value too long for a tcp_table reply" in result.stderr
    assert b"%20" not in result.stderr


def test_empty_db_is_a_configuration_error() -> None:
    """systemd's --db "" (TCPMAP_DB unset) says where the setting lives."""
    result = subprocess.run(
        server_command("--db", ""), capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "TCPMAP_DB" in result.stderr
    assert "not a regular file" not in result.stderr


def test_empty_db_with_maps_means_no_db(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    """--db "" --maps DIR: serve the directory (socketmap), as if --db were not given."""
    make_table(tmp_path / "virtual.lmdb", {"k": "v"})
    srv = server(Path(""), "--maps", str(tmp_path), "--listen", "socketmap:127.0.0.1:0")
    srv.wait_for_log(r"serves socketmap")


@pytest.mark.parametrize("program", ["tcpmap-build", "tcpmap-query"])
def test_version(program: str) -> None:
    """--version on every command (tcpmap-server's is in its parser)."""
    result = run(program, "--version")
    assert (result.returncode, result.stdout) == (0, f"{program} 0.1.0\n".encode())


def test_server_version() -> None:
    with pytest.raises(SystemExit) as caught:
        server_parser().parse_args(["--version"])
    assert caught.value.code == 0


def test_one_record_is_singular(tmp_path: Path) -> None:
    """'wrote 1 record', not '1 records'."""
    source = tmp_path / "one"
    source.write_bytes(b"a b\n")
    result = run("tcpmap-build", str(source))
    assert b"wrote 1 record to" in result.stderr


# --- umask --------------------------------------------------------------------------


def test_build_warns_when_others_cannot_read(tmp_path: Path) -> None:
    """Under umask 077 the table is 0600: a warning names --mode and umask."""
    source = tmp_path / "virtual"
    source.write_bytes(SOURCE)
    old = os.umask(0o077)
    try:
        result = run("tcpmap-build", str(source))
    finally:
        os.umask(old)
    assert result.returncode == 0
    assert b"is mode 0600" in result.stderr
    assert b"--mode 0644" in result.stderr
    assert b"umask" in result.stderr


def test_build_mode_option(tmp_path: Path) -> None:
    """--mode 0644 under umask 077: world-readable, no warning."""
    source = tmp_path / "virtual"
    source.write_bytes(SOURCE)
    old = os.umask(0o077)
    try:
        result = run("tcpmap-build", "--mode", "0644", str(source))
    finally:
        os.umask(old)
    assert b"warning" not in result.stderr
    assert (tmp_path / "virtual.lmdb").stat().st_mode & 0o777 == 0o644


# --- format detection -----------------------------------------------------------------


def test_virtual_table_with_colons_is_postmap_syntax(tmp_path: Path) -> None:
    """'postmaster@example.com: admin' has a domain in the name: postmap, with its hint."""
    source = tmp_path / "virtual"
    source.write_bytes(b"postmaster@example.com: admin@example.net\n")
    result = run("tcpmap-build", str(source))
    assert result.returncode == 0, result.stderr
    assert b"is this an alias file?" in result.stderr
    assert b"postmap syntax" in result.stderr
    assert b"name must be local" not in result.stderr


def test_unclear_detection_gives_the_hint(tmp_path: Path) -> None:
    """Read as aliases from a local first name, then refused: say how to read it as postmap."""
    source = tmp_path / "virtual"
    source.write_bytes(b"root: admin\nuser@example.com: x\n")
    result = run("tcpmap-build", str(source))
    assert result.returncode == 1
    assert b"--format postmap" in result.stderr


# --- the build record and postmap -s -------------------------------------------------


@pytest.mark.parametrize("tool", ["postmap", "postalias"])
def test_dump_has_no_warning_and_the_record_is_a_comment(
    postfix_dir: Path, built: Path, tool: str
) -> None:
    """postmap -s / postalias -s: no warning; the build record prints as a '#' line."""
    result = run_postfix(tool, postfix_dir, "-s", f"lmdb:{built}")
    assert result.returncode == 0
    assert result.stderr == b""
    lines = result.stdout.splitlines()
    assert [line for line in lines if not line.startswith(b"#tcpmap-lmdb")] == [
        (b"alice@example.com:\t" if tool == "postalias" else b"alice@example.com\t")
        + b"alice@example.net",
        (b"bob@example.com:\t" if tool == "postalias" else b"bob@example.com\t")
        + b"bob@example.net",
    ]


def test_postmap_dump_builds_again_with_both_tools(
    postfix_dir: Path, built: Path, tmp_path: Path
) -> None:
    """A postmap -s dump of our table builds with tcpmap-build and with postmap, same records."""
    dump = run_postfix("postmap", postfix_dir, "-s", f"lmdb:{built}").stdout
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.write_bytes(dump)
    theirs.write_bytes(dump)
    assert build.main(["-q", str(ours)]) == 0
    assert run_postfix("postmap", postfix_dir, f"lmdb:{theirs}").returncode == 0
    mine = raw_items(Path(f"{ours}.lmdb"))
    mine.pop(dbformat.META_KEY)
    assert mine == raw_items(Path(f"{theirs}.lmdb"))
    assert mine == {
        b"alice@example.com\0": b"alice@example.net\0",
        b"bob@example.com\0": b"bob@example.net\0",
    }


def test_query_dump_matches_postmap_s(postfix_dir: Path, tmp_path: Path) -> None:
    """tcpmap-query --dump prints what postmap -s prints, less the build record."""
    source = tmp_path / "virtual"
    source.write_bytes(b"# postfix built\nk1 v 1\nK2 v2\n")
    assert run_postfix("postmap", postfix_dir, f"lmdb:{source}").returncode == 0
    theirs = run_postfix("postmap", postfix_dir, "-s", f"lmdb:{source}").stdout
    result = run("tcpmap-query", "--dump", f"lmdb:{source}")
    assert (result.returncode, result.stdout) == (0, theirs)


def test_query_dump_leaves_the_build_record_out(built: Path) -> None:
    result = run("tcpmap-query", "--dump", str(built))
    assert (
        result.stdout == b"alice@example.com\talice@example.net\nbob@example.com\tbob@example.net\n"
    )


def test_dump_through_a_server_says_why_not() -> None:
    """tcp_table and socketmap have no request that lists keys: say so, exit 2."""
    result = run("tcpmap-query", "--dump", "tcp:127.0.0.1:4242")
    assert result.returncode == 2
    assert b"no request that lists keys" in result.stderr


def test_query_info(built: Path) -> None:
    """--info: the build record, the live count, the size."""
    result = run("tcpmap-query", "--info", f"lmdb:{built}")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert f"file: {built}.lmdb\n" in out
    assert "records: 2\n" in out
    assert f"size: {Path(f'{built}.lmdb').stat().st_size} bytes\n" in out
    assert f"source: {built}\n" in out
    assert "syntax: postmap\n" in out
    assert "keys: folded to lowercase\n" in out
    assert "built at: 20" in out


def test_postmap_cannot_look_up_the_build_record(postfix_dir: Path, built: Path) -> None:
    """The printed name of the record finds nothing: Postfix never sends bytes after a NUL."""
    for key in ("#tcpmap-lmdb", "#tcpmap-lmdb build record"):
        done = run_postfix("postmap", postfix_dir, "-q", key, f"lmdb:{built}")
        assert done.returncode == 1, done


def test_old_build_record_is_still_read(tmp_path: Path) -> None:
    """Tables built before the '#' record keep their build record (folding, syntax)."""
    path = tmp_path / "old.lmdb"
    info = dbformat.BuildInfo(False, "postmap", 1, "/src", "2026-01-01T00:00:00+00:00")
    env = lmdb.open(str(path), subdir=False, lock=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(dbformat.OLD_META_KEY, info.encode())
        txn.put(b"Key\0", b"v\0")
    env.close()
    table = Table.open(path)
    try:
        assert table.info == info
        assert table.get(b"Key") == b"v"
        assert table.get(b"key") is None  # built with -f: case-sensitive
    finally:
        table.close()


def test_unreadable_new_build_record_is_ignored(tmp_path: Path) -> None:
    """A '#tcpmap-lmdb' record that is not our JSON leaves Postfix's defaults."""
    path = tmp_path / "odd.lmdb"
    env = lmdb.open(str(path), subdir=False, lock=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(dbformat.META_KEY, b"not json\0")
        txn.put(b"k\0", b"v\0")
    env.close()
    table = Table.open(path)
    try:
        assert table.info is None
        assert table.get(b"K") == b"v"
    finally:
        table.close()


# --- values too long for tcp_table ------------------------------------------------------


def test_long_values_refused_by_default_with_the_option_named(tmp_path: Path) -> None:
    source = tmp_path / "lists"
    source.write_bytes(b"list " + b"a" * 5000 + b"\n")
    result = run("tcpmap-build", str(source))
    assert result.returncode == 1
    assert b"--long-values" in result.stderr


def test_long_values_served_over_socketmap_and_400_on_tcp_table(
    tmp_path: Path, server: StartServer
) -> None:
    """--long-values: socketmap answers the whole value; tcp_table 400, logged once."""
    source = tmp_path / "lists"
    value = b"a" * 50_000
    source.write_bytes(b"list " + value + b"\nshort s\n")
    assert build.main(["-q", "--long-values", str(source)]) == 0
    sock = tmp_path / "sm.sock"
    srv = server(
        Path(f"{source}.lmdb"), "--listen", "127.0.0.1:0", "--listen", f"socketmap:unix:{sock}"
    )
    tcp = f"tcp:127.0.0.1:{srv.port}"
    for _ in range(2):
        result = run("tcpmap-query", "-s", tcp, "list", "short")
        assert result.stdout == b"short\ts\n"
        assert b"value too long for a tcp_table reply" in result.stderr
    result = run("tcpmap-query", "-s", f"socketmap:unix:{sock}:lists", "list")
    assert (result.returncode, result.stdout) == (0, value + b"\n")
    srv.wait_for_log(r"map lists: the value of key list \(50000 bytes\) does not fit")
    srv.stop()
    assert sum("does not fit a tcp_table reply" in line for line in srv.logs) == 1
    info = run("tcpmap-query", "--info", str(source)).stdout
    assert b"values too long for tcp_table: 1\n" in info


# --- CRLF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["postmap", "postalias"])
def test_crlf_source_matches_postfix_byte_for_byte(
    postfix_dir: Path, tmp_path: Path, tool: str
) -> None:
    """A CR ending a continued line stays in the value, as postmap/postalias keep it."""
    text = (
        b"k1 v1\r\nk2 v2a\r\n  v2b\r\nk3\r\n v3\r\n# c\r\n\r\nk4 v4\t\r\n"
        if tool == "postmap"
        else b'a: b,\r\n  c\r\nd: "x\r\n y"\r\n'
    )
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.write_bytes(text)
    theirs.write_bytes(text)
    syntax = "postmap" if tool == "postmap" else "aliases"
    assert build.main(["-q", "--format", syntax, str(ours)]) == 0
    assert run_postfix(tool, postfix_dir, f"lmdb:{theirs}").returncode == 0
    mine = raw_items(Path(f"{ours}.lmdb"))
    mine.pop(dbformat.META_KEY)
    expected = raw_items(Path(f"{theirs}.lmdb"))
    for extra in (b"@\0", b"YP_LAST_MODIFIED", b"YP_MASTER_NAME"):
        expected.pop(extra, None)
    assert mine == expected
    if tool == "postmap":
        assert mine[b"k2\0"] == b"v2a\r  v2b\0"


# --- logging ----------------------------------------------------------------------------


def test_verbose_logs_every_tcp_table_lookup(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    """-v: one line per lookup: client, map, key as sent, result, microseconds."""
    db = make_table(tmp_path / "virtual.lmdb", {"a b@example.com": "found it"})
    srv = server(db, "-v")
    with srv.connect() as conn:
        assert conn.ask("a b@example.com")[0] == 200
        assert conn.ask("nobody")[0] == 500
        client = f"127.0.0.1:{conn.sock.getsockname()[1]}"
    srv.wait_for_log(rf"{client}: tcp_table map virtual key a%20b@example.com: found, \d+ us$")
    srv.wait_for_log(rf"{client}: tcp_table map virtual key nobody: not found, \d+ us$")


def test_verbose_logs_every_socketmap_lookup(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    """-v on socketmap: the map named in the request, the key, the reason of a PERM."""
    db = make_table(tmp_path / "virtual.lmdb", {"k": "v"})
    srv = server(db, "-v", "--listen", "socketmap:127.0.0.1:0")
    table = f"socketmap:inet:127.0.0.1:{srv.port}"
    run("tcpmap-query", "-s", f"{table}:virtual", "k")
    run("tcpmap-query", "-s", f"{table}:nosuch", "k")
    srv.wait_for_log(r"127\.0\.0\.1:\d+: socketmap map virtual key k: found, \d+ us$")
    srv.wait_for_log(r"socketmap map nosuch key k: permanent: unknown map 'nosuch', \d+ us$")


def test_no_lookup_lines_without_verbose(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    db = make_table(tmp_path / "virtual.lmdb", {"k": "v"})
    srv = server(db)
    with srv.connect() as conn:
        assert conn.ask("k")[0] == 200
    srv.stop()
    assert not [line for line in srv.logs if "key k" in line]


def test_listener_for_a_missing_map_warns_at_start_and_on_change(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    """tcp:...=virtal (a typo): warned at start; its appearance and loss logged once each."""
    db = make_table(tmp_path / "virtual.lmdb", {"k": "v"})
    srv = server(db, "--maps", str(tmp_path), "--listen", "tcp:127.0.0.1:0=virtal")
    srv.wait_for_log(r"WARNING: a tcp_table listener serves map virtal, but there is no virtal")
    with srv.connect() as conn:
        assert conn.ask("k")[0] == 400
        assert conn.ask("k")[0] == 400
        make_table(tmp_path / "virtal.lmdb", {"k": "typo"})
        assert conn.ask("k") == (200, b"typo")
        srv.wait_for_log(r"map virtal: virtal\.lmdb is there now")
        since = srv.mark()
        (tmp_path / "virtal.lmdb").unlink()
        assert conn.ask("k")[0] == 400
        assert conn.ask("k")[0] == 400
    srv.wait_for_log(r"WARNING: table unavailable: .*virtal\.lmdb is missing", since=since)
    srv.stop()
    assert sum("no virtal.lmdb" in line for line in srv.logs) == 1, srv.logs
    assert sum("virtal.lmdb is missing" in line for line in srv.logs) == 1, srv.logs


def test_maps_directory_missing_warns_at_start(
    tmp_path: Path, make_table: MakeTable, server: StartServer
) -> None:
    db = make_table(tmp_path / "virtual.lmdb", {"k": "v"})
    srv = server(db, "--maps", str(tmp_path / "nope"))
    srv.wait_for_log(rf"WARNING: --maps {tmp_path / 'nope'} does not exist")


def test_table_unreadable_by_the_server_user_warns_at_start(
    tmp_path: Path, make_table: MakeTable
) -> None:
    """A 0600 table the server's user cannot read: a warning naming it and the reason."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("runs the server as nobody: needs root and setpriv (util-linux)")
    db = make_table(tmp_path / "virtual.lmdb", {"k": "v"})
    db.chmod(0o600)
    prefix = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    srv = ServerProcess(db, ("--listen", "127.0.0.1:0"), prefix=prefix)
    try:
        srv.wait_for_log(rf"WARNING: table unavailable: (cannot open )?{db}: Permission denied")
    finally:
        srv.stop()


def test_long_values_warned_when_the_table_opens(tmp_path: Path, server: StartServer) -> None:
    source = tmp_path / "lists"
    source.write_bytes(b"list " + b"a" * 5000 + b"\n")
    assert build.main(["-q", "--long-values", str(source)]) == 0
    srv = server(Path(f"{source}.lmdb"))
    srv.wait_for_log(r"WARNING: .*lists\.lmdb holds 1 value too long for a tcp_table reply")


def test_journal_fields_name_the_mail_facility(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the journal, every entry carries SYSLOG_FACILITY=2 (mail)."""
    import logging  # noqa: PLC0415

    from tcpmap_lmdb import systemd as sd  # noqa: PLC0415

    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        sd.setup_logging(False)
        handler = root.handlers[0]
        assert type(handler).__name__ == "JournalHandler"
        assert handler._extra["SYSLOG_FACILITY"] == "2"  # type: ignore[attr-defined]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_unit_logs_to_the_mail_facility() -> None:
    unit = (ROOT / "systemd" / "tcpmap.service").read_text()
    assert "\nSyslogFacility=mail\n" in unit


def test_make_run_installs_only_what_running_needs() -> None:
    """make run installs the package alone; the dev extra (linters, pytest) comes with check."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("needs make")

    def steps(target: str) -> str:
        argv = [make, "-n", "-B", target]
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    run_steps, check_steps = steps("run"), steps("check")
    assert "pip install -q -e .\n" in run_steps
    assert "[dev]" not in run_steps
    assert "pip install -q -e '.[dev]'" in check_steps


def test_query_db_names_a_bad_record_and_goes_on(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """--db: a key whose stored value Postfix cannot use is named; the next key is answered."""
    path = tmp_path / "odd.lmdb"
    env = lmdb.open(str(path), subdir=False, lock=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"empty\0", b"\0")
        txn.put(b"good\0", b"v\0")
    env.close()
    assert query_main(["--db", str(path), "empty", "good"]) == 2
    out, err = capsysbinary.readouterr()
    assert out == b"good\tv\n"
    assert b"tcpmap-query: empty: " in err
    assert b"empty value stored" in err


@pytest.mark.parametrize(
    ("first", "syntax"),
    [
        ("postmaster@example.com: admin@example.net", "postmap"),
        ("postmaster@example.com:admin@example.net", "postmap"),
        ("@example.com: catchall@example.net", "postmap"),
        ('"user@example.com": local', "aliases"),  # quoted: a local name to postalias
        ("root: admin@example.net", "aliases"),  # unclear: aliases, with the hint on failure
    ],
)
def test_detection_decides_from_a_domain_in_the_name(first: str, syntax: str) -> None:
    """A name with a domain cannot be an aliases(5) name: postmap syntax."""
    assert sources.detect_syntax(first) == syntax


def test_query_with_only_a_table_is_a_usage_error() -> None:
    """tcpmap-query tcp:127.0.0.1:4242 (no key) is not a lookup of the key 'tcp:...'."""
    result = run("tcpmap-query", "tcp:127.0.0.1:4242")
    assert result.returncode == 2
    assert b"names a table: give the KEY first" in result.stderr
