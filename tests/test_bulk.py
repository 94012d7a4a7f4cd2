"""The fast path (bulk.py) against the general path (sources.py + build.load) on the same bytes.

The fast path may decline any input (None); when it answers, its records must
be the general path's, byte for byte, and the general path must have had
nothing to say about the input.
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


def general(data: bytes, fold_keys: bool) -> tuple[dict[bytes, bytes], int, str]:
    """The general path's records, bad line count and messages."""
    messages = io.StringIO()
    with contextlib.redirect_stderr(messages):
        _, items = sources.parse(io.BytesIO(data), "postmap")
        table = build.load(items, "src", fold_keys=fold_keys)
    return table.records, table.errors, messages.getvalue()


def fast(data: bytes, fold_keys: bool, block: int = bulk.BLOCK) -> dict[bytes, bytes] | None:
    """The fast path's records, checked to agree with the general path's, or None."""
    got = bulk.postmap_records(data, fold_keys=fold_keys, block=block)
    if got is None:
        return None
    assert got.keys == sorted(set(got.keys)), "keys must be strictly increasing"
    records = dict(zip(got.keys, got.values, strict=True))
    assert general(data, fold_keys) == (records, 0, "")
    return records


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
    "non-utf-8 comment": b"# caf\xe9\na 1\n",
    "blank lines": "\na 1\n\n  \nb 2\n",
    "continuation": "a 1\n  and more\n\tmore\nb 2\n",
    "comment inside continuation": "a 1\n# c\n  more\n",
    "quoted key": '"a b" 1\nc 2\n',
    "backslash key": "a\\ b 1\n",
    "quote in value": 'a "x"\n',
    "empty": "",
    "comments only": "# nothing\n",
}

# Each makes the general path say something: the fast path leaves it alone.
DECLINED = {
    "duplicate": "a 1\nb 2\na 3\n",
    "duplicate after folding": "A 1\na 2\n",
    "duplicate by full case folding": "Straße 1\nSTRASSE 2\n",
    "duplicate across blocks": "a 1\nc 3\n# x\nA 4\n",
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
    """Common inputs, special lines included, take the fast path to the general path's records."""
    data = text if isinstance(text, bytes) else text.encode()
    for block in (1, 5, bulk.BLOCK):
        assert fast(data, fold_keys, block) is not None


@pytest.mark.parametrize("text", DECLINED.values(), ids=DECLINED.keys())
def test_fast_path_declines(text: str | bytes) -> None:
    """Whatever the general path would report is left to it."""
    data = text if isinstance(text, bytes) else text.encode()
    for block in (1, 5, bulk.BLOCK):
        assert bulk.postmap_records(data, fold_keys=True, block=block) is None


@pytest.mark.parametrize(
    ("text", "split"),
    [
        (b"# caf\xe9\n\na 1\n#\nb 2\n", True),  # comments and blank lines are skipped in bulk
        (b"a 1\n  more\n", False),  # a continuation line: sources.py joins it
        (b'"a b" 1\n', False),  # quotes: sources.py splits the line
    ],
)
def test_which_blocks_are_split_in_bulk(text: bytes, split: bool) -> None:
    """Comments and blank lines keep a block on the fast split; continuations and quotes do not."""
    assert (bulk._split(text, fold_keys=True) is not None) == split


def test_fold_collision_is_not_a_duplicate_without_folding() -> None:
    """With -f, A and a are two keys."""
    assert fast(b"A 1\na 2\n", fold_keys=False) == {b"A\0": b"1\0", b"a\0": b"2\0"}


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
                stack.enter_context(mock.patch.object(bulk, "postmap_records", return_value=None))
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


ALL = [*TAKEN, *DECLINED, *LIMITS]


@pytest.mark.parametrize("options", [(), ("-f",), ("-r",), ("-w",), ("--check",)])
@pytest.mark.parametrize(
    "text",
    [*TAKEN.values(), *DECLINED.values(), *LIMITS.values()],
    ids=[*TAKEN, *DECLINED, *LIMITS],
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
