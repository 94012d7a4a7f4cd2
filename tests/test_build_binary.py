"""tcpmap-build given a table or other binary file instead of its text source.

The inputs are real: tables written by tcpmap-build and by Postfix's own postmap
(lmdb:, hash:, btree:), a gzip-compressed source, and a program binary. Each is
refused before anything is written, with one line that says what the file is.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_command
from postfix_tools import postfix_config_dir, run_postfix

from tcpmap_lmdb import build

SOURCE = b"alice@example.com alice@example.net\nbob@example.com bob@example.net\n"


def tcpmap_build(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return run_command("tcpmap-build", *args, stdin=stdin)


def ours(tmp: Path) -> Path:
    (tmp / "virtual").write_bytes(SOURCE)
    assert build.main(["-q", str(tmp / "virtual")]) == 0
    return tmp / "virtual.lmdb"


def postmap_table(kind: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / "virtual").write_bytes(SOURCE)
        done = run_postfix("postmap", postfix_config_dir(tmp), f"{kind}:{tmp / 'virtual'}")
        assert done.returncode == 0, done.stderr
        return tmp / f"virtual.{'lmdb' if kind == 'lmdb' else 'db'}"

    return make


def encoded(encode: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    """The source, ENCODEd (compressed, or in another encoding)."""

    def make(tmp: Path) -> Path:
        path = tmp / "virtual.encoded"
        path.write_bytes(encode(SOURCE))
        return path

    return make


def cdb(tmp: Path) -> Path:
    """SOURCE as a cdb table, written as cr.yp.to/cdb/cdb.txt lays it out (Postfix's cdb:
    type, through tinycdb; its postmap module is not installed here, so written by hand)."""
    records = [line.split(b" ", 1) for line in SOURCE.splitlines()]
    body = b""
    tables: list[list[tuple[int, int]]] = [[] for _ in range(256)]
    for key, value in records:
        h = 5381
        for byte in key:
            h = ((h << 5) + h ^ byte) & 0xFFFFFFFF
        tables[h & 255].append((h, 2048 + len(body)))
        body += struct.pack("<II", len(key), len(value)) + key + value
    header, hashes, position = b"", b"", 2048 + len(body)
    for entries in tables:
        slots = [(0, 0)] * (2 * len(entries))
        for h, where in entries:
            at = (h >> 8) % len(slots)
            while slots[at][1]:
                at = (at + 1) % len(slots)
            slots[at] = (h, where)
        header += struct.pack("<II", position, len(slots))
        hashes += b"".join(struct.pack("<II", *slot) for slot in slots)
        position += 8 * len(slots)
    path = tmp / "virtual.cdb"
    path.write_bytes(header + body + hashes)
    return path


def program(tmp: Path) -> Path:
    return Path(os.path.realpath(sys.executable))  # an ELF binary: NUL bytes at once


# (input maker, what the message must say it is, whether it needs Postfix)
INPUTS = {
    "tcpmap-build's lmdb": (ours, "this is an LMDB table, not a source file", False),
    "postmap's lmdb": (postmap_table("lmdb"), "this is an LMDB table, not a source file", True),
    "postmap's hash": (postmap_table("hash"), "this is a Berkeley DB hash file", True),
    "postmap's btree": (postmap_table("btree"), "this is a Berkeley DB btree file", True),
    "cdb": (cdb, "this is a cdb table (Postfix's cdb: type)", False),
    "gzip": (encoded(gzip.compress), "this is gzip-compressed data", False),
    "xz": (encoded(lzma.compress), "this is xz-compressed data", False),
    "bzip2": (encoded(bz2.compress), "this is bzip2-compressed data", False),
    "UTF-16": (encoded(lambda text: text.decode().encode("utf-16")), "this is UTF-16 text", False),
    # postmap would keep the mark as part of the first key, which no lookup then finds
    "UTF-8 with a BOM": (
        encoded(lambda text: b"\xef\xbb\xbf" + text),
        "this is UTF-8 text starting with a byte order mark",
        False,
    ),
    "program": (program, "this is binary data (a NUL byte in its first line", False),
}


@pytest.fixture
def postfix_if(request: pytest.FixtureRequest) -> None:
    if INPUTS[request.node.callspec.params["kind"]][2]:
        request.getfixturevalue("postfix_dir")  # skips without Postfix (fails under CI=true)


@pytest.mark.usefixtures("postfix_if")
@pytest.mark.parametrize("kind", INPUTS)
def test_binary_input_is_refused_and_the_output_untouched(tmp_path: Path, kind: str) -> None:
    """One line saying what the file is; exit 1; the old table and the directory as they were."""
    make, says, _ = INPUTS[kind]
    given = make(tmp_path)
    output = tmp_path / "out.lmdb"
    (tmp_path / "old").write_bytes(b"old k\n")
    assert build.main(["-q", "-o", str(output), str(tmp_path / "old")]) == 0
    before = output.read_bytes(), output.stat().st_ino, output.stat().st_mtime_ns
    result = tcpmap_build("-o", str(output), str(given))
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"tcpmap-build: {given}: {says}"), err
    assert "Traceback" not in err
    assert (output.read_bytes(), output.stat().st_ino, output.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_lmdb_table_as_its_own_source_default_output(tmp_path: Path) -> None:
    """tcpmap-build virtual.lmdb: refused, no virtual.lmdb.lmdb, and the fix named."""
    table = ours(tmp_path)
    result = tcpmap_build(str(table))
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert err == (
        f"tcpmap-build: {table}: this is an LMDB table, not a source file; give the text "
        f"file it was built from (tcpmap-query --dump {table} prints its records)\n"
    )
    assert not Path(f"{table}.lmdb").exists()


def test_lmdb_table_on_stdin(tmp_path: Path) -> None:
    """A table piped in (-) is recognised too, and no output is created."""
    table = ours(tmp_path)
    result = tcpmap_build("-o", str(tmp_path / "x.lmdb"), "-", stdin=table.read_bytes())
    assert result.returncode == 1
    assert result.stderr.decode().startswith("tcpmap-build: stdin: this is an LMDB table")
    assert not (tmp_path / "x.lmdb").exists()


def test_check_refuses_binary_input_too(tmp_path: Path) -> None:
    """--check says the same as a build."""
    table = ours(tmp_path)
    result = tcpmap_build("--check", str(table))
    assert result.returncode == 1
    assert b"this is an LMDB table" in result.stderr


@pytest.mark.parametrize("line", [2, 901])
def test_stray_nul_in_a_text_source_is_a_line_error(tmp_path: Path, line: int) -> None:
    """A text source with a NUL after its first line keeps its FILE:LINE error."""
    source = tmp_path / "virtual"
    lines = [b"key%05d value\n" % i for i in range(1000)]
    lines[line - 1] = b"bad\x00key value\n"
    source.write_bytes(b"".join(lines))
    result = tcpmap_build(str(source))
    assert result.returncode == 1
    assert f"{source}:{line}: NUL byte in input".encode() in result.stderr
    assert b"binary" not in result.stderr
