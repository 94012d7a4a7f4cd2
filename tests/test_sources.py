"""The source parsers: logical lines, postmap and aliases syntax, detection.

Vectors come from postfix-maps.md sections 3.1 and 3.2 (Postfix's own tests
and observations with Postfix 3.7); tests/test_build_postfix.py checks the
same inputs against the real postmap and postalias.
"""

from __future__ import annotations

import pytest

from tcpmap_lmdb import sources
from tcpmap_lmdb.sources import Entry, LogicalLine, Problem, Syntax


def lines_of(text: bytes) -> list[bytes]:
    """Physical lines the way iterating over a binary file yields them."""
    return text.splitlines(keepends=True)


def logical(text: bytes) -> list[LogicalLine | Problem]:
    return list(sources.logical_lines(lines_of(text)))


def parsed(text: bytes, syntax: Syntax = "postmap") -> list[Entry | Problem]:
    _, items = sources.parse(lines_of(text), syntax)
    return list(items)


def pairs(text: bytes, syntax: Syntax = "postmap") -> list[tuple[bytes, bytes]]:
    return [(i.key, i.value) for i in parsed(text, syntax) if isinstance(i, Entry)]


def problems(text: bytes, syntax: Syntax = "postmap") -> list[tuple[int, str]]:
    return [(i.lineno, i.reason) for i in parsed(text, syntax) if isinstance(i, Problem)]


# --- logical lines (readllines) ------------------------------------------------


def test_blank_and_whitespace_lines_are_skipped() -> None:
    """Empty and whitespace-only lines produce nothing."""
    assert logical(b"\n   \n\t\n") == []


def test_comment_lines_are_skipped() -> None:
    """A line whose first non-whitespace character is '#' is a comment."""
    assert logical(b"# one\n   # two\na b\n") == [LogicalLine(3, "a b")]


def test_hash_elsewhere_is_data() -> None:
    """'#' after the first non-whitespace character is not a comment (3.1 vector)."""
    assert pairs(b"key1 value # not a comment\n") == [(b"key1", b"value # not a comment")]


def test_continuation_keeps_leading_whitespace() -> None:
    """A continuation line's LF is dropped and its leading whitespace kept (3.1 vector)."""
    text = b"Multi line\n  continued here\n\tand more\n"
    assert pairs(text) == [(b"Multi", b"line  continued here\tand more")]


def test_comment_inside_logical_line_does_not_end_it() -> None:
    """readlline.c's vector: "abc\\n#def\\n ghi" is the logical line "abc ghi"."""
    assert logical(b"abc\n#def\n ghi") == [LogicalLine(1, "abc ghi")]


def test_blank_line_inside_logical_line_does_not_end_it() -> None:
    """A blank line between a line and its continuation is skipped."""
    assert logical(b"a b\n\n  c\n") == [LogicalLine(1, "a b  c")]


def test_logical_line_reports_its_first_line() -> None:
    """Each logical line carries the number of the physical line it starts on."""
    text = b"# header\na 1\n  more\n\nb 2\n"
    assert logical(text) == [LogicalLine(2, "a 1  more"), LogicalLine(5, "b 2")]


def test_leading_continuation_is_an_error() -> None:
    """A continuation with nothing before it is an error, with its line number."""
    text = b"# comment\n  orphan\n\tmore orphan\nk v\n"
    assert logical(text) == [
        Problem(2, "logical line must not start with whitespace"),
        LogicalLine(4, "k v"),
    ]


def test_crlf_keeps_the_cr_inside_a_continued_line() -> None:
    """As postmap's readllines(): only the LF goes; the split trims a CR at the end."""
    assert logical(b"a b\r\n  c\r\n") == [LogicalLine(1, "a b\r  c\r")]
    assert pairs(b"a b\r\n  c\r\nd e\r\n") == [(b"a", b"b\r  c"), (b"d", b"e")]


def test_last_line_without_newline() -> None:
    """The last line needs no LF."""
    assert logical(b"a b\nc d") == [LogicalLine(1, "a b"), LogicalLine(2, "c d")]


def test_non_utf8_line_is_an_error() -> None:
    """Input that is not UTF-8 is reported with its physical line number."""
    text = b"a 1\nb \xe9t\xe9\nc 3\n"
    assert logical(text) == [
        LogicalLine(1, "a 1"),
        Problem(2, "non-UTF-8 input at byte 3"),
        LogicalLine(3, "c 3"),
    ]


def test_non_utf8_continuation_spoils_its_logical_line() -> None:
    """A bad continuation line makes the whole logical line an error."""
    assert logical(b"a 1\n  \xff\nb 2\n") == [
        Problem(2, "non-UTF-8 input at byte 3"),
        LogicalLine(3, "b 2"),
    ]


def test_non_utf8_comment_is_ignored() -> None:
    """Comments are never decoded: old Latin-1 comments do not break a build."""
    assert logical(b"# caf\xe9\na b\n") == [LogicalLine(2, "a b")]


def test_nul_byte_is_an_error() -> None:
    """A NUL byte cannot be stored in a C string: it is an error."""
    assert logical(b"a b\x00c\n") == [Problem(1, "NUL byte in input")]


# --- postmap syntax -----------------------------------------------------------

# src/postmap/quote_test.in and .ref (postfix-maps.md 3.1), plus observed vectors.
POSTMAP_VECTORS = [
    (b'"aa bb" cc', b'"aa bb"', b"cc"),
    (b"gg\\ hh ii", b"gg\\ hh", b"ii"),
    (b'"gg\\"hh" ii', b'"gg\\"hh"', b"ii"),
    (b'"jj@kk" ll', b'"jj@kk"', b"ll"),
    (b"mm@nn@oo pp", b"mm@nn@oo", b"pp"),
    (b"@oo pp", b"@oo", b"pp"),
    (b"ABC\tDEF", b"ABC", b"DEF"),
    (b"key   spaced   value  ", b"key", b"spaced   value"),
    (b'aa "bb cc', b"aa", b'"bb cc'),
    (b'"a b"c d', b'"a b"c', b"d"),
    (b"vt\x0bval", b"vt", b"val"),
    (b"ff\x0cval", b"ff", b"val"),
    ("a\u00a0b c".encode(), "a\u00a0b".encode(), b"c"),
    ("ÄBC x".encode(), "ÄBC".encode(), b"x"),
]


@pytest.mark.parametrize(("line", "key", "value"), POSTMAP_VECTORS)
def test_postmap_vectors(line: bytes, key: bytes, value: bytes) -> None:
    """postmap's key/value split: quotes and backslashes stay in the key."""
    assert pairs(line + b"\n") == [(key, value)]


def test_unbalanced_quote_is_an_error() -> None:
    """quote_test vector: '"dd ee ff' is rejected as unbalanced."""
    assert problems(b'"dd ee ff\n') == [(1, "unbalanced '\"' in '\"dd ee ff'")]


def test_missing_value_is_an_error() -> None:
    """A key without a value does not have the "key whitespace value" format."""
    assert problems(b"onlykey\n") == [(1, "expected format: key whitespace value")]


def test_trailing_backslash_leaves_no_value() -> None:
    """A backslash at the end escapes nothing and the line has no value."""
    assert problems(b"xy\\\n") == [(1, "expected format: key whitespace value")]


def test_key_ending_in_colon_warns_but_is_stored() -> None:
    """'key: value' in postmap syntax warns "is this an alias file?" and is still stored."""
    items = parsed(b"abc:  val\n")
    warning = 'record is in "key: value" format; is this an alias file?'
    assert items == [Problem(1, warning, fatal=False), Entry(1, b"abc:", b"val")]


def test_crlf_value_has_no_cr() -> None:
    """The value of a CRLF line ends before the CR."""
    assert pairs(b"k v\r\n") == [(b"k", b"v")]


def test_all_errors_are_reported() -> None:
    """Parsing goes on after a bad line, so every bad line is reported."""
    text = b'a 1\nbad\nb 2\n"open\nc\\\n'
    assert problems(text) == [
        (2, "expected format: key whitespace value"),
        (4, "unbalanced '\"' in '\"open'"),
        (5, "expected format: key whitespace value"),
    ]
    assert pairs(text) == [(b"a", b"1"), (b"b", b"2")]


def test_keys_are_not_folded_by_the_parser() -> None:
    """The parser returns keys as written; folding is the builder's job."""
    assert pairs(b"MiXeD Value\n") == [(b"MiXeD", b"Value")]


# --- aliases syntax -------------------------------------------------------------

# postfix-maps.md 3.2 vectors, then lines observed with postalias 3.7.
ALIAS_VECTORS = [
    ("a: a, b,c ,\n  d@example.com", "a", "a, b, c, d@example.com"),
    (
        'a: "|/bin/cmd arg", /dev/null, :include:/etc/x',
        "a",
        '"|/bin/cmd arg", /dev/null, :include:/etc/x',
    ),
    ('"Quoted Name": v', "Quoted Name", "v"),
    ("a: x  y", "a", "x y"),
    ("a: x @ example.com", "a", "x@example.com"),
    ("a: a,,b", "a", "a, , b"),
    ("a: a,", "a", "a, "),
    ("a: ,a", "a", ", a"),
    ("a: Joe <joe@x.org>, (comment) foo", "a", "Joe <joe@x.org>, (comment) foo"),
    ("a: foo (a, b) bar", "a", "foo (a, b) bar"),
    ('a: "a,b" ,c', "a", '"a,b", c'),
    ("a:x", "a", "x"),
    ("a : y", "a", "y"),
    ("a: <>", "a", "<>"),
    ("a: a . b", "a", "a.b"),
    ('a: "x"y', "a", '"x" y'),
    ("a: [1.2.3.4]", "a", "[1.2.3.4]"),
    ("a: ö@x, Ü", "a", "ö@x, Ü"),
    ('a: ""', "a", '""'),
    ("a: a\\,b", "a", '"a,b"'),
    ("a: a\\ b", "a", '"a b"'),
    ("a: <a, b>", "a", "<a, b>"),
    ("a: x:y", "a", "x:y"),
    ("a: foo\\", "a", "foo"),
    ('a: "unbal', "a", '"unbal"'),
    ("a: (unbal", "a", "(unbal"),
    ("a: a\tb", "a", "a b"),
    ('a: "a\tb"', "a", '"a b"'),
    ("a: a\x0bb", "a", '"a\x0bb"'),
    ("a: [1\\]2]", "a", "[1]2]"),
    ("a: (x\\) y) z", "a", "(x\\) y) z"),
    ("a: |/bin/cmd arg", "a", "|/bin/cmd arg"),
    ('a: "x\\"y", "p\\\\q"', "a", '"x\\"y", "p\\\\q"'),
    ('a: \\"x', "a", '"\\"x"'),
    ("a: <a@b> (C), Joe Q. Public <j@x>", "a", "<a@b>(C), Joe Q.Public <j@x>"),
    ("a!b: y", "a!b", "y"),
    ("f1 f2: x", "f1 f2", "x"),
    ("f3 (c): y", "f3 (c)", "y"),
    ("[dl]: z", "[dl]", "z"),
    ('"q\\"k": w', 'q"k', "w"),
    ("f4::x", "f4", ":x"),
]


@pytest.mark.parametrize(("line", "name", "value"), ALIAS_VECTORS)
def test_alias_vectors(line: str, name: str, value: str) -> None:
    """postalias's name/value split and value normalization (tok822)."""
    assert pairs(line.encode() + b"\n", "aliases") == [(name.encode(), value.encode())]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("user@example.com: x", "name must be local"),
        ("a%b: x", "name must be local"),
        ("no colon here", "need name:value pair"),
        (": novalue", "need name:value pair"),
        ("noname:", "need name:value pair"),
        (",f9: x", "need name:value pair"),
        ("a, b: c", "need name:value pair"),
    ],
)
def test_alias_errors(line: str, reason: str) -> None:
    """Lines postalias refuses are errors with postalias's wording."""
    assert problems(line.encode() + b"\n", "aliases") == [(1, reason)]


# --- detection --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "syntax"),
    [
        ("root: admin", "aliases"),
        ("postmaster:\troot", "aliases"),
        ("root:admin", "aliases"),
        ('"Quoted Name": v', "aliases"),
        ("user@example.com  local", "postmap"),
        ("example.com smtp:[mx.example.com]:25", "postmap"),
        ("[mx]:25 relay", "postmap"),
        ("key value: with colon", "postmap"),
    ],
)
def test_detect_syntax(first: str, syntax: str) -> None:
    """ "name: value" (or "name:value") means aliases; anything else postmap."""
    assert sources.detect_syntax(first) == syntax


def test_auto_uses_the_first_entry() -> None:
    """Detection skips comments, blank lines and bad lines before the first entry."""
    detected, items = sources.parse(lines_of(b"# aliases\n\n\xff\nroot: admin, Joe\n"))
    assert detected == "aliases"
    assert list(items) == [
        Problem(3, "non-UTF-8 input at byte 1"),
        Entry(4, b"root", b"admin, Joe"),
    ]


def test_auto_on_empty_input_is_postmap() -> None:
    """An empty (or comment-only) source is read as postmap syntax."""
    detected, items = sources.parse(lines_of(b"# nothing\n"))
    assert (detected, list(items)) == ("postmap", [])


def test_explicit_syntax_is_not_second_guessed() -> None:
    """--format postmap on an aliases-looking file stores postmap keys, with a warning."""
    detected, items = sources.parse(lines_of(b"root: admin\n"), "postmap")
    assert detected == "postmap"
    assert [i for i in items if isinstance(i, Entry)] == [Entry(1, b"root:", b"admin")]
