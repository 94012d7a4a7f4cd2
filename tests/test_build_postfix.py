"""Postfix compatibility of tcpmap-build, checked with Postfix's own postmap and postalias.

Two directions: postmap -q finds what tcpmap-build wrote, and for the same
source tcpmap-build stores exactly the records postmap/postalias store.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import raw_items
from hypothesis import given, settings
from hypothesis import strategies as st
from postfix_tools import postfix_config_dir, require_postfix, run_postfix

from tcpmap_lmdb import build, sources
from tcpmap_lmdb.dbformat import META_KEY, fold, stored_key, stored_value
from tcpmap_lmdb.sources import Syntax

require_postfix()
pytestmark = pytest.mark.postfix

# Records only postalias writes (postfix-maps.md 3.2): the "@" completeness
# marker and, on builds with NIS, two YP_ records without a trailing NUL.
POSTALIAS_EXTRAS = {b"@\x00", b"YP_LAST_MODIFIED", b"YP_MASTER_NAME"}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return postfix_config_dir(tmp_path)


def build_ours(directory: Path, name: str, text: bytes, *options: str) -> Path:
    """Build directory/name with tcpmap-build; return the map name (FILE.lmdb minus .lmdb)."""
    directory.mkdir(exist_ok=True)
    src = directory / name
    src.write_bytes(text)
    assert build.main(["-q", *options, str(src)]) == 0
    return src


def build_theirs(config: Path, directory: Path, name: str, text: bytes, *options: str) -> Path:
    """Build directory/name with postmap or postalias (options[0]); return the map name."""
    directory.mkdir(exist_ok=True)
    src = directory / name
    src.write_bytes(text)
    tool, *flags = options
    done = run_postfix(tool, config, *flags, f"lmdb:{src}")
    assert done.returncode == 0, done.stderr.decode()
    return src


def query(config: Path, key: str, table: Path) -> str:
    done = run_postfix("postmap", config, "-q", key, f"lmdb:{table}")
    assert done.returncode == 0, f"{key!r} not found: {done.stderr.decode()}"
    return done.stdout.decode().removesuffix("\n")


# --- postmap -q reads what we wrote --------------------------------------------

POSTMAP_SOURCE = """\
Alpha one
MiXeD Case Value
ÄBC x
Straße y
"aa bb" cc
gg\\ hh ii
"jj@kk" ll
user@Example.COM local
"""


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("alpha", "one"),
        ("ALPHA", "one"),
        ("mixed", "Case Value"),
        ("äbc", "x"),
        ("ÄBC", "x"),
        ("STRASSE", "y"),
        ("straße", "y"),
        ('"aa bb"', "cc"),
        ("gg\\ hh", "ii"),
        ('"JJ@kk"', "ll"),
        ("USER@example.com", "local"),
    ],
)
def test_postmap_finds_postmap_syntax_records(
    tmp_path: Path, config: Path, key: str, value: str
) -> None:
    """postmap -q KEY lmdb:TABLE finds every key tcpmap-build wrote, in any case."""
    table = build_ours(tmp_path / "ours", "virtual", POSTMAP_SOURCE.encode())
    assert query(config, key, table) == value


ALIASES_SOURCE = """\
Root: admin, Joe
"Quoted Name": v
postmaster:root
"""


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("root", "admin, Joe"),
        ("ROOT", "admin, Joe"),
        ("quoted name", "v"),
        ("Postmaster", "root"),
    ],
)
def test_postmap_finds_aliases_syntax_records(
    tmp_path: Path, config: Path, key: str, value: str
) -> None:
    """postmap -q finds names from an aliases source, quoted names in unquoted form."""
    table = build_ours(tmp_path / "ours", "aliases", ALIASES_SOURCE.encode())
    assert query(config, key, table) == value


def test_postmap_cannot_see_the_build_record(tmp_path: Path, config: Path) -> None:
    """The META_KEY record never answers a Postfix lookup."""
    table = build_ours(tmp_path / "ours", "virtual", POSTMAP_SOURCE.encode())
    done = run_postfix("postmap", config, "-q", "tcpmap-lmdb", f"lmdb:{table}")
    assert done.returncode == 1


# --- same records as postmap / postalias -------------------------------------------

POSTMAP_VECTORS = """\
# quote_test.in, less the unbalanced line
"aa bb" cc
gg\\ hh ii
"gg\\"hh" ii
"jj@kk" ll
mm@nn@oo pp
@oo pp
key1 value # not a comment
Multi line
  continued here
\tand more
abc
#def
 ghi
abc:  val
ÄBC x
Straße y
STRASSE z
ABC\tDEF
vt\x0bval
ff\x0cval2
a\u00a0b c
trailing   spaces\x20\x20\x20
"""

ALIASES_VECTORS = """\
a1: a, b,c ,
  d@example.com
a2: "|/bin/cmd arg", /dev/null, :include:/etc/x
a3: x  y
a4: x @ example.com
a5: a,,b
a6: a,
a7: ,a
a8: Joe <joe@x.org>, (comment) foo
a9: foo (a, b) bar
b1: "a,b" ,c
"Quoted Name": v
b2:x
b3 : y
b4: <>
b5: a . b
b6: "x"y
b7: [1.2.3.4]
b8: ö@x, Ü
b9: foo;bar
c1: ""
c2: a\\,b
c3: a\\ b
c4: <a, b>
c5: x:y
c6: foo\\
c7: "unbal
c8: (unbal
c9: <unbal
d1: a\tb
e1: "a\tb"
e2: a\x0bb
e3: [1\\]2]
e4: (a (b) c) d
e5: (x\\) y) z
a!b: y
e6: |/bin/cmd arg
e8: "x\\"y", "p\\\\q"
e9: a\\\tb
f1 f2: x
f3 (c): y
[dl]: z
"q\\"k": w
f4::x
f5: \\"x
f6: a.b.c @ d . e
f7: <a@b> (C), Joe Q. Public <j@x>
MixedCase: Value
"""

DUPLICATES = "a 1\nb 2\nb 3\nStraße 4\nSTRASSE 5\n"
ALIAS_DUPLICATES = "root: a\nRoot: b\npostmaster: c\n"


SAME_AS_POSTFIX = [
    ("postmap-vectors", POSTMAP_VECTORS, "postmap", ()),
    ("postmap-no-fold", POSTMAP_VECTORS, "postmap", ("-f",)),
    ("postmap-crlf", "a 1\r\nB 2 and more \r\n", "postmap", ()),
    ("postmap-dup-first", DUPLICATES, "postmap", ()),
    ("postmap-dup-replace", DUPLICATES, "postmap", ("-r",)),
    ("postmap-dup-ignore", DUPLICATES, "postmap", ("-w",)),
    ("aliases-vectors", ALIASES_VECTORS, "postalias", ()),
    ("aliases-no-fold", ALIASES_VECTORS, "postalias", ("-f",)),
    ("aliases-dup-first", ALIAS_DUPLICATES, "postalias", ()),
    ("aliases-dup-replace", ALIAS_DUPLICATES, "postalias", ("-r",)),
    ("aliases-dup-ignore", ALIAS_DUPLICATES, "postalias", ("-w",)),
]


@pytest.mark.parametrize(
    ("text", "tool", "options"),
    [case[1:] for case in SAME_AS_POSTFIX],
    ids=[case[0] for case in SAME_AS_POSTFIX],
)
def test_same_records_as_postfix(
    tmp_path: Path, config: Path, text: str, tool: str, options: tuple[str, ...]
) -> None:
    """tcpmap-build stores byte for byte the records postmap/postalias store."""
    theirs = build_theirs(config, tmp_path / "theirs", "table", text.encode(), tool, *options)
    ours = build_ours(tmp_path / "ours", "table", text.encode(), *options)
    expected = raw_items(Path(f"{theirs}.lmdb"))
    for extra in POSTALIAS_EXTRAS if tool == "postalias" else set():
        expected.pop(extra, None)
    got = raw_items(Path(f"{ours}.lmdb"))
    got.pop(META_KEY)
    assert got == expected


@pytest.mark.parametrize("tool", ["postmap", "tcpmap-build"])
def test_output_link_is_written_through(tmp_path: Path, config: Path, tool: str) -> None:
    """TABLE.lmdb a link to the served file: postmap keeps the link and replaces what it
    points at; tcpmap-build does the same (so a server of the served file sees the change)."""
    served = tmp_path / "served"
    served.mkdir()
    make = build_ours if tool == "tcpmap-build" else build_theirs_postmap(config)
    make(served, "virtual", b"old value\n")
    (tmp_path / "table.lmdb").symlink_to("served/virtual.lmdb")
    make(tmp_path, "table", b"new value\n")
    assert os.readlink(tmp_path / "table.lmdb") == "served/virtual.lmdb"
    got = raw_items(served / "virtual.lmdb")
    got.pop(META_KEY, None)
    assert got == {b"new\x00": b"value\x00"}


def build_theirs_postmap(config: Path) -> Callable[[Path, str, bytes], Path]:
    return lambda directory, name, text: build_theirs(config, directory, name, text, "postmap")


# --- random lines: the parsers against the real tools -------------------------------

# Mostly the characters that steer postmap's split and postalias's tokenizer.
_LINE = st.text(alphabet='ab,:@"\\()<>[];.|%!# \t\x0bé', min_size=1, max_size=16)


@settings(max_examples=150, deadline=None)
@given(syntax=st.sampled_from(["postmap", "aliases"]), line=_LINE)
def test_random_lines_parse_like_postfix(syntax: Syntax, line: str) -> None:
    """A random line gives the record postmap/postalias store, or none when they skip it."""
    text = line.encode() + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        config = postfix_config_dir(Path(tmp))
        src = Path(tmp) / "src"
        src.write_bytes(text)
        done = run_postfix("postmap" if syntax == "postmap" else "postalias", config, f"lmdb:{src}")
        assert done.returncode == 0, done.stderr.decode()
        theirs = raw_items(Path(f"{src}.lmdb"))
    for extra in POSTALIAS_EXTRAS if syntax == "aliases" else set():
        theirs.pop(extra, None)
    _, items = sources.parse([text], syntax)
    ours = {
        stored_key(fold(item.key)): stored_value(item.value)
        for item in items
        if isinstance(item, sources.Entry)
    }
    assert ours == theirs
