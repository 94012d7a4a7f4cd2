"""The fast path for postmap sources: a block of plain lines split and folded at once.

Going line by line through sources.py and build.load costs a few microseconds
a line, about six times what postmap needs. Most large tables are generated
files of plain "key value" lines. For those, a block is split with a few
bytes methods over the whole block (no Python code runs per line); blocks
with other whitespace, comments or blank lines are split a line at a time
with bytes methods; blocks with continuation lines, quotes or backslashes,
and any block the general path would have something to say about (a bad
line, a warning), are declined (None) and go through sources.py.

Duplicate keys are not this module's business: it returns every entry in
file order, and the build's merge resolves duplicates (build.py).
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from tcpmap_lmdb.dbformat import fold

# Bytes per block read from the source: small enough that a block's temporary
# objects reuse memory the previous block freed.
BLOCK = 1 << 20
# Lines readllines() treats specially: blank, comment or continuation. (Each
# pattern starts with a literal: an alternation would be scanned 30x slower.)
_SPECIAL_LINE = re.compile(rb"\n[ \t\r\x0b\x0c\n#]")
_CONTINUATION = re.compile(rb"\n[ \t\r\x0b\x0c]")
_STARTS_SPECIAL = frozenset(b" \t\r\x0b\x0c\n#")
_STARTS_CONTINUATION = frozenset(b" \t\r\x0b\x0c")
# A plain line is "KEY SP VALUE LF" and has none of these bytes: other
# whitespace, quotes and backslashes (they steer postmap.c's split), NUL (an error),
# a byte order mark (an error at the start of a line).
_NOT_PLAIN = (b"\t", b"\r", b"\x0b", b"\x0c", b'"', b"\\", b"\0", b"\xef\xbb\xbf")


class Split(NamedTuple):
    """A block's entries in file order: stored keys and values (trailing NUL), and
    each entry's line number counted from 1 at the block's first line."""

    keys: list[bytes]
    values: list[bytes]
    lines: array[int]  # typecode "Q"
    payload: int = -1  # about the bytes of all keys and values, if known without counting


def blocks(stream: BinaryIO, size: int = BLOCK) -> Iterator[bytes]:
    """The stream in blocks of whole logical lines, each about SIZE bytes or more.

    A block ends only before a line that starts a logical line (not blank, not a
    comment, not a continuation), so each block parses on its own: readllines()
    never joins lines across two blocks.
    """
    pending = b""
    while True:
        data = stream.read(size)
        if not data:
            if pending:
                yield pending
            return
        pending += data
        end = _last_logical_start(pending)
        if end > 0:
            yield pending[:end]
            pending = pending[end:]


def _last_logical_start(data: bytes) -> int:
    """Offset of the last line in DATA that starts a logical line and is followed by
    a byte (so it is known to start one); 0 if there is none."""
    newline = len(data) - 1
    while True:
        newline = data.rfind(b"\n", 0, newline)
        if newline < 0:
            return 0
        if data[newline + 1] not in _STARTS_SPECIAL:
            return newline + 1


def split_block(block: bytes, fold_keys: bool, first_line: int = 1) -> Split | None:
    """The entries of a block of postmap source that starts at line FIRST_LINE, or
    None where sources.py must read it."""
    if not block.endswith(b"\n"):
        block += b"\n"  # a last line without LF is the same entry
    split = _split_plain(block, first_line) or _split_lines(block, first_line)
    if split is None:
        return None
    if fold_keys:
        keys = split.keys
        if block.isascii():
            keys = list(map(bytes.lower, keys))
        else:
            keys = [fold(key[:-1]) + b"\0" for key in keys]
        split = split._replace(keys=keys)
    return split


def _split_plain(block: bytes, first_line: int) -> Split | None:
    """Keys and values of a block made only of plain "KEY SP VALUE" lines; else None.

    Each LF becomes NUL LF LF and each space NUL LF: one split on LF then gives
    KEY NUL, VALUE NUL and an empty string for every line, in C. Any line with
    no space or more than one breaks that rhythm, and is caught by the count and
    the empty strings' places; empty keys or values by their length.
    """
    if not _maybe_plain(block):
        return None
    parts = block.replace(b"\n", b"\0\n\n").replace(b" ", b"\0\n").split(b"\n")
    count = block.count(b"\n")
    if len(parts) != 3 * count + 1 or any(parts[2::3]):
        return None
    keys, values = parts[0:-1:3], parts[1::3]
    if min(map(len, keys)) < 2 or min(map(len, values)) < 2:
        return None  # an empty key (a leading space) or value (a trailing space)
    # Each space and LF became a NUL: the keys and values are as long as the block.
    return Split(keys, values, array("Q", range(first_line, first_line + count)), len(block))


def _maybe_plain(block: bytes) -> bool:
    """Whether the block may be all plain lines: none of the bytes, line starts or
    pairs that make a line anything else (what only the split can tell is left to it)."""
    if any(byte in block for byte in _NOT_PLAIN):
        return False
    if block[0] in _STARTS_SPECIAL or (b"#" in block and b"\n#" in block):
        return False  # blank lines, comments, continuations: _split_lines
    if b":" in block and b": " in block:
        return False  # a key ending in ':' : postmap's "is this an alias file?" warning
    if block.isascii():
        return True
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _split_lines(block: bytes, first_line: int) -> Split | None:
    """Keys and values of a block of one-line entries (comments and blank lines
    allowed) split line by line; None for any other block.
    """
    entry_lines = _entry_lines(block, first_line)
    if entry_lines is None:
        return None
    lines, numbers = entry_lines
    # The key ends at the first whitespace and the value is trimmed at both
    # ends, as postmap.c splits a line without quotes or backslashes.
    pairs = [line.split(None, 1) for line in lines]
    try:
        values = [pair[1].rstrip() + b"\0" for pair in pairs]
    except IndexError:
        return None  # a line without a value
    if b":" in block and any(key.endswith(b":") for key, _ in pairs):
        return None  # postmap's "is this an alias file?" warning
    keys = [pair[0] + b"\0" for pair in pairs]
    return Split(keys, values, numbers)


def _entry_lines(block: bytes, first_line: int) -> tuple[list[bytes], array[int]] | None:
    """The block's lines that are entries, and their line numbers, if each is a whole
    entry in UTF-8 that bytes.split() splits as postmap.c does; None otherwise.
    """
    lines = block.split(b"\n")
    lines.pop()  # the block ends with LF
    numbers = array("Q", range(first_line, first_line + len(lines)))
    text = block
    if block[0] in _STARTS_SPECIAL or _SPECIAL_LINE.search(block):
        if block[0] in _STARTS_CONTINUATION or _CONTINUATION.search(block):
            return None  # continuation lines make one entry of several lines
        # readllines() skips blank lines and comments (which need not be UTF-8)
        kept = [i for i, line in enumerate(lines) if line and not line.startswith(b"#")]
        lines = [lines[i] for i in kept]
        numbers = array("Q", [first_line + i for i in kept])
        text = b"\n".join(lines)
    if b'"' in text or b"\\" in text or b"\0" in text:
        return None  # quotes and backslashes change postmap.c's split; NUL is an error
    if text.startswith(b"\xef\xbb\xbf") or b"\n\xef\xbb\xbf" in text:
        return None  # a line starting with a byte order mark is an error
    if not text.isascii():
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return lines, numbers
