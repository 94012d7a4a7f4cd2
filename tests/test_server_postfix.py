"""tcpmap-server with Postfix's own tcp_table client: `postmap -q KEY tcp:127.0.0.1:PORT`.

postmap -q exits 0 and prints the value when found, exits 1 silently when not
found (500), and exits 1 with `fatal: ... query error` on a temporary error
(400): postfix-maps.md 1.5.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import ServerProcess, StartServer, make_table
from postfix_tools import postfix_config_dir, require_postfix, run_postfix

pytestmark = pytest.mark.postfix
require_postfix()

TABLE = {
    "alice@example.com": "alice@mail.example.com",
    "Mixed@Example.COM": "mixed",
    "with space": "space",
    "100%": "percent",
    "jürgen@example.de": "Grüße aus Köln",
    "Straße@Example.de": "street",
    "relay": "smtp:[relay.example.com]:587 with spaces",
}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return postfix_config_dir(tmp_path)


@pytest.fixture
def srv(server: StartServer, tmp_path: Path) -> ServerProcess:
    return server(make_table(tmp_path / "virtual.lmdb", TABLE))


def query(config: Path, srv: ServerProcess, key: str) -> subprocess.CompletedProcess[bytes]:
    """`postmap -q KEY tcp:127.0.0.1:PORT`."""
    return run_postfix("postmap", config, "-q", key, f"tcp:127.0.0.1:{srv.port}")


def assert_found(result: subprocess.CompletedProcess[bytes], value: str) -> None:
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert result.stdout == value.encode() + b"\n"


def test_found_key_prints_the_value(config: Path, srv: ServerProcess) -> None:
    """A key in the table: postmap prints its value and exits 0, without warnings."""
    assert_found(query(config, srv, "alice@example.com"), "alice@mail.example.com")


def test_missing_key_exits_1_silently(config: Path, srv: ServerProcess) -> None:
    """A key not in the table: postmap prints nothing and exits 1 (not found, not an error)."""
    result = query(config, srv, "nobody@example.com")
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("with space", "space"),
        ("100%", "percent"),
        ("jürgen@example.de", "Grüße aus Köln"),
        ("JÜRGEN@EXAMPLE.DE", "Grüße aus Köln"),
        ("MIXED@example.com", "mixed"),
        ("Alice@Example.Com", "alice@mail.example.com"),
        ("STRASSE@EXAMPLE.DE", "street"),
        ("Straße@Example.de", "street"),
    ],
    ids=["space", "percent", "utf-8", "utf-8-upper", "mixed-case", "capitalised", "ss", "eszett"],
)
def test_keys_postfix_encodes_are_found(
    config: Path, srv: ServerProcess, key: str, value: str
) -> None:
    """Keys Postfix %XX-encodes (space, %, UTF-8) or sends in mixed case are found."""
    assert_found(query(config, srv, key), value)


def test_value_with_spaces_reaches_postfix_intact(config: Path, srv: ServerProcess) -> None:
    """A value with spaces and brackets is decoded by Postfix to exactly the stored text."""
    assert_found(query(config, srv, "relay"), "smtp:[relay.example.com]:587 with spaces")


def test_batch_mode_answers_every_key_in_order(config: Path, srv: ServerProcess) -> None:
    """`postmap -q -` (one connection, many keys) prints KEY<TAB>VALUE for each found key."""
    keys = ["alice@example.com", "nobody", "with space", "MIXED@EXAMPLE.COM", "100%", "relay"]
    result = run_postfix(
        "postmap",
        config,
        "-q",
        "-",
        f"tcp:127.0.0.1:{srv.port}",
        stdin="".join(f"{key}\n" for key in keys).encode(),
    )
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert result.stdout.decode().splitlines() == [
        "alice@example.com\talice@mail.example.com",
        "with space\tspace",
        "MIXED@EXAMPLE.COM\tmixed",
        "100%\tpercent",
        "relay\tsmtp:[relay.example.com]:587 with spaces",
    ]


def test_a_blank_line_in_batch_mode_is_not_found_as_with_lmdb(
    config: Path, srv: ServerProcess, server: StartServer, tmp_path: Path
) -> None:
    """`postmap -q -` sends a blank line as an empty key (`get `). Over lmdb: that is
    not found; over tcp: and socketmap: it must be too, not a 400 that ends postmap with a fatal
    query error and loses the keys after it. (Postfix's daemons never ask for an
    empty key: maps_find() returns before the lookup.)"""
    stdin = b"alice@example.com\n\nrelay\n"
    lmdb_table = make_table(tmp_path / "same.lmdb", TABLE)
    sockmap = server(lmdb_table, "--listen", "socketmap:127.0.0.1:0")
    answers = [
        run_postfix("postmap", config, "-q", "-", spec, stdin=stdin)
        for spec in (
            f"lmdb:{lmdb_table.with_suffix('')}",
            f"tcp:127.0.0.1:{srv.port}",
            f"socketmap:inet:127.0.0.1:{sockmap.port}:same",
        )
    ]
    for result in answers:
        assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert answers[1].stdout == answers[2].stdout == answers[0].stdout
    assert answers[0].stdout.decode().splitlines() == [
        "alice@example.com\talice@mail.example.com",
        "relay\tsmtp:[relay.example.com]:587 with spaces",
    ]


def test_missing_database_is_a_query_error_not_not_found(
    config: Path, server: StartServer, tmp_path: Path
) -> None:
    """Without its file the server answers 400: postmap fails with a query error (defer)."""
    srv = server(tmp_path / "missing.lmdb")
    result = query(config, srv, "alice@example.com")
    assert result.returncode != 0
    assert result.stdout == b""
    assert b"query error" in result.stderr, result.stderr


def test_serves_a_file_built_by_postmap(config: Path, server: StartServer, tmp_path: Path) -> None:
    """A table made by `postmap lmdb:` is served: folded keys, quoted keys, values with spaces."""
    source = tmp_path / "virtual"
    source.write_text('Foo@Example.com  bar baz\n"quoted key" q\nStraße s\n')
    built = run_postfix("postmap", config, f"lmdb:{source}")
    assert built.returncode == 0, built.stderr
    srv = server(tmp_path / "virtual.lmdb")
    assert_found(query(config, srv, "FOO@example.COM"), "bar baz")
    assert_found(query(config, srv, '"quoted key"'), "q")
    assert_found(query(config, srv, "STRASSE"), "s")
    assert query(config, srv, "quoted key").returncode == 1


def test_serves_a_postmap_f_file_with_no_fold(
    config: Path, server: StartServer, tmp_path: Path
) -> None:
    """A case-preserving `postmap -f` table is served as written with --no-fold."""
    source = tmp_path / "exact"
    source.write_text("Foo bar\n")
    built = run_postfix("postmap", config, "-f", f"lmdb:{source}")
    assert built.returncode == 0, built.stderr
    srv = server(tmp_path / "exact.lmdb", "--no-fold")
    assert_found(query(config, srv, "Foo"), "bar")
    assert query(config, srv, "foo").returncode == 1


def test_serves_a_file_built_by_postalias(
    config: Path, server: StartServer, tmp_path: Path
) -> None:
    """A table made by `postalias lmdb:` is served, values with commas and spaces intact."""
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: root\nAlice: alice@example.com, bob\n")
    built = run_postfix("postalias", config, f"lmdb:{aliases}")
    assert built.returncode == 0, built.stderr
    srv = server(tmp_path / "aliases.lmdb")
    assert_found(query(config, srv, "Postmaster"), "root")
    assert_found(query(config, srv, "alice"), "alice@example.com, bob")
    assert query(config, srv, "bob").returncode == 1


def test_postmap_sees_a_republished_table(
    config: Path, server: StartServer, tmp_path: Path
) -> None:
    """After the table is replaced by rename, Postfix's next lookup gets the new value."""
    db = make_table(tmp_path / "virtual.lmdb", {"alice": "old"})
    srv = server(db)
    assert_found(query(config, srv, "alice"), "old")
    make_table(db, {"alice": "new"})
    assert_found(query(config, srv, "alice"), "new")
