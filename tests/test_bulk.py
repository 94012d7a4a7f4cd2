"""The fast path (bulk.py) against the general path (sources.py + build.checked_entries).

The fast path may decline any block (None); when it answers, its entries must
be the general path's, byte for byte and line for line, and the general path
must have had nothing to say about the block.
"""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from conftest import raw_items
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpmap_lmdb import build, bulk, sources
from tcpmap_lmdb.dbformat import META_KEY, BuildInfo


def general(block: bytes, fold_keys: bool, first_line: int) -> tuple[bulk.Split, int, str]:
    """The general path's entries for a block, its bad line count and messages."""
    messages = io.StringIO()
    report = build.Reporter("src")
    with contextlib.redirect_stderr(messages):
        items = sources.parse(io.BytesIO(block), "postmap")[1]
        split = build.checked_entries(items, report, fold_keys=fold_keys, first_line=first_line)
    return split, report.errors, messages.getvalue()


def fast(data: bytes, fold_keys: bool, block: int = bulk.BLOCK) -> list[bulk.Split | None]:
    """The fast path's answer for each block of DATA, checked against the general path's:
    the same entries and line numbers, and nothing the general path would have said."""
    answers = []
    first_line = 1
    for chunk in bulk.blocks(io.BytesIO(data), block):
        got = bulk.split_block(chunk, fold_keys, first_line)
        if got is not None:
            split, errors, messages = general(chunk, fold_keys, first_line)
            assert (split[:3], errors, messages) == (got[:3], 0, "")
            if got.payload >= 0 and chunk.isascii():
                assert got.payload == sum(map(len, got.keys)) + sum(map(len, got.values))
        answers.append(got)
        first_line += chunk.count(b"\n")
    assert b"".join(bulk.blocks(io.BytesIO(data), block)) == data
    return answers


# Each is taken by the fast path, some of it in blocks sources.py parses.
TAKEN = {
    "plain": "b 2\na 1\nC 3\n",
    "no final newline": "a 1\nb 2",
    "value with spaces and hash": "a x  y # not a comment\n",
    "other whitespace": "a\t1\nb\x0b2\nc\x0c3\nd \t 4\n",
    "trailing whitespace": "a 1 \nb 2\t\n",
    "crlf": "a 1\r\nB 2 and more \r\n",
    "cr inside": "a\rb c\n",
    "colon inside key": "a:b 1\n",
    "colon in value": "a Subject: x\n",
    "utf-8": "Straße 1\nÄBC 2\nİx 3\n",
    "comment": "# header\na 1\n#\nb 2\n",
    "blank lines": "\na 1\n\nb 2\n",
    "non-utf-8 comment": b"# caf\xe9\na 1\n",
    "empty": "",
    "comments only": "# nothing\n",
    "duplicate": "a 1\nb 2\na 3\n",  # duplicates are resolved by the merge
    "duplicate after folding": "A 1\na 2\n",
    "duplicate by full case folding": "Straße 1\nSTRASSE 2\n",
}

# Each is good input that only sources.py parses (the fast path declines a block of it).
PARSED = {
    "whitespace-only line": "\na 1\n\n  \nb 2\n",
    "continuation": "a 1\n  and more\n\tmore\nb 2\n",
    "comment inside continuation": "a 1\n# c\n  more\n",
    "quoted key": '"a b" 1\nc 2\n',
    "backslash key": "a\\ b 1\n",
    "quote in value": 'a "x"\n',
}

# Each makes the general path say something: the fast path leaves its block alone.
DECLINED = {
    "no value": "a 1\nb\n",
    "only whitespace after key": "a 1\nb  \t\n",
    "key ends in colon": "a: 1\n",
    "key ends in colon, tab": "a:\t1\n",
    "nul": "a 1\nb \0\n",
    "non-utf-8": b"a \xff\n",
    "leading continuation": "  a 1\nb 2\n",
    "unbalanced quote": '"a 1\n',
    "continued colon key": "a:\n  1\n",
}


@pytest.mark.parametrize("fold_keys", [True, False])
@pytest.mark.parametrize("text", TAKEN.values(), ids=TAKEN.keys())
def test_fast_path_takes(text: str | bytes, fold_keys: bool) -> None:
    """Common inputs, special lines included, take the fast path to the general path's entries."""
    data = text if isinstance(text, bytes) else text.encode()
    for block in (1, 5, bulk.BLOCK):
        assert None not in fast(data, fold_keys, block)


@pytest.mark.parametrize(
    "text", [*PARSED.values(), *DECLINED.values()], ids=[*PARSED.keys(), *DECLINED.keys()]
)
def test_fast_path_declines(text: str | bytes) -> None:
    """What only sources.py parses, and whatever the general path would report, is left to it."""
    data = text if isinstance(text, bytes) else text.encode()
    assert None in fast(data, fold_keys=True)


@pytest.mark.parametrize(
    ("text", "plain", "split"),
    [
        (b"a 1\nB 2\n", True, True),  # one space per line: split in one go
        (b"a 1\nb  2\n", False, True),  # two spaces: line by line
        (b"a\t1\nb 2\n", False, True),  # a tab: line by line
        (b"a 1\nb 2 3\n", False, True),  # a space in the value: line by line
        (b"# caf\xe9\n\na 1\n#\nb 2\n", False, True),  # comments, blank lines: line by line
        (b"a 1\n  more\n", False, False),  # a continuation line: sources.py joins it
        (b'"a b" 1\n', False, False),  # quotes: sources.py splits the line
    ],
)
def test_which_blocks_are_split_in_bulk(text: bytes, plain: bool, split: bool) -> None:
    """Plain lines are split all at once; other one-line entries line by line; the rest
    (continuations, quotes) by sources.py."""
    assert (bulk._split_plain(text, 1) is not None) == plain
    assert (bulk._split_lines(text, 1) is not None) == split


def test_blocks_end_before_a_logical_line() -> None:
    """A block never ends before a continuation or comment line: each parses on its own."""
    data = b"a 1\n  more\n# c\n\tmore\nb 2\nc 3\n"
    assert list(bulk.blocks(io.BytesIO(data), 1)) == [
        b"a 1\n  more\n# c\n\tmore\n",
        b"b 2\n",
        b"c 3\n",
    ]


def test_line_numbers_follow_the_blocks() -> None:
    """Entries carry their line numbers in the file, across blocks and skipped lines."""
    data = b"a 1\n# c\n\nb 2\nc 3\n"
    lines = [list(s.lines) for s in fast(data, fold_keys=True, block=1) if s is not None]
    assert lines == [[1], [4], [5]]


# --- random input -------------------------------------------------------------------------

_PIECES = [b"a", b"B", b"k9", b"\xc3\x9f", b"SS", b"\xc4\xb0", b"#", b'"', b"\\", b":", b"x y"]
_SPACE = [b" ", b"\t", b"  ", b"\r", b"\x0b", b"\x0c"]
_WORD = st.lists(st.sampled_from(_PIECES), min_size=1, max_size=3).map(b"".join)
_LINE = st.one_of(
    # mostly well-formed "key value" lines, some with a leading or trailing space
    st.tuples(
        st.sampled_from([b"", b"", b"", b" ", b"\t", b"#"]),
        _WORD,
        st.sampled_from(_SPACE),
        _WORD,
        st.sampled_from([b"", b"", b" ", b"\r"]),
    ).map(b"".join),
    # and anything at all made of the same pieces
    st.lists(st.sampled_from([*_PIECES, *_SPACE, b"\xff", b"\0"]), max_size=6).map(b"".join),
)
_SOURCE = st.tuples(st.lists(_LINE, max_size=12), st.booleans()).map(
    lambda lines_final: b"\n".join(lines_final[0]) + (b"\n" if lines_final[1] else b"")
)


@settings(max_examples=400, deadline=None)
@given(data=_SOURCE, fold_keys=st.booleans(), block=st.sampled_from([1, 4, 16, bulk.BLOCK]))
def test_random_sources_agree(data: bytes, fold_keys: bool, block: int) -> None:
    """On random sources the fast path gives the general path's records, or declines."""
    fast(data, fold_keys, block)


# --- whole builds ---------------------------------------------------------------------------


def build_both(tmp: Path, data: bytes, *options: str) -> None:
    """Build with and without the fast path: same exit status, messages and records."""
    src = tmp / "src"
    src.write_bytes(data)
    results = []
    for fast_path in (True, False):
        out = tmp / f"{fast_path}.lmdb"
        messages = io.StringIO()
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stderr(messages))
            if not fast_path:
                stack.enter_context(mock.patch.object(bulk, "split_block", return_value=None))
            status = build.main(["-o", str(out), *options, str(src)])
        shown = messages.getvalue().replace(str(out), "OUT")
        results.append((status, shown, stored(out) if out.exists() else None))
    assert results[0] == results[1]


def stored(db: Path) -> dict[bytes, bytes]:
    """Every record as stored; from the build record, what does not change between builds."""
    items = raw_items(db)
    info = BuildInfo.decode(items[META_KEY])
    items[META_KEY] = f"{info.folded} {info.syntax} {info.records} {info.source}".encode()
    return items


LIMITS = {
    "key at the limit": "a 1\n" + "k" * 510 + " v\n",
    "key over the limit": "a 1\n" + "k" * 511 + " v\n",
    "key over the limit once folded": "a 1\n" + "İ" * 255 + " v\n",
    "value at the reply limit": "a 1\nk " + "a" * 4091 + "\n",
    "value over the reply limit": "a 1\nk " + "%" * 1364 + "\n",
    "value quoted just within": "a 1\nk " + "%" * 1363 + "\n",
}


ALL = [*TAKEN, *PARSED, *DECLINED, *LIMITS]


@pytest.mark.parametrize("options", [(), ("-f",), ("-r",), ("-w",), ("--check",)])
@pytest.mark.parametrize(
    "text",
    [*TAKEN.values(), *PARSED.values(), *DECLINED.values(), *LIMITS.values()],
    ids=[*TAKEN, *PARSED, *DECLINED, *LIMITS],
)
def test_builds_agree(tmp_path: Path, text: str | bytes, options: tuple[str, ...]) -> None:
    """tcpmap-build says and stores the same with the fast path as without it."""
    build_both(tmp_path, text if isinstance(text, bytes) else text.encode(), *options)


@settings(max_examples=100, deadline=None)
@given(data=_SOURCE, options=st.sampled_from([(), ("-f",), ("-r",)]))
def test_random_builds_agree(data: bytes, options: tuple[str, ...]) -> None:
    """The same for random sources, through main() and LMDB."""
    with tempfile.TemporaryDirectory() as tmp:
        build_both(Path(tmp), data, *options)


def test_garbage_collector_is_restored(tmp_path: Path) -> None:
    """The build pauses the cyclic GC only while it runs."""
    (tmp_path / "src").write_bytes(b"a 1\n")
    assert gc.isenabled()
    assert build.main(["-q", str(tmp_path / "src")]) == 0
    assert gc.isenabled()
