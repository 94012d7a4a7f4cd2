"""The fast path for postmap sources: plain lines split and folded a block at a time.

Going line by line through sources.py and build.load costs a few microseconds
a line, about six times what postmap needs. Most large tables are generated
files of plain "key value" lines, which bytes methods and list comprehensions
split much faster (comments and blank lines are simply dropped). Blocks
with continuation lines, quotes or backslashes still go through sources.py.

The result is only ever a table the general path would build without a word:
wherever it would report something (a bad line, a warning, a duplicate key),
the answer is None and the caller runs the general path, so every message
and every byte written stay exactly its own.
"""

from __future__ import annotations

import io
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from tcpmap_lmdb import sources
from tcpmap_lmdb.dbformat import fold, stored_key, stored_value

# Bytes per block: small enough that a block's temporary objects reuse memory
# the previous block freed (fewer page faults: 20% faster than all at once).
BLOCK = 1 << 17
# A line that starts a logical line: blocks end only before one.
_LOGICAL_START = re.compile(rb"\n(?=[^ \t\r\x0b\x0c\n#])")
# Lines readllines() treats specially: blank, comment or continuation. (Each
# pattern starts with a literal: an alternation would be scanned 30x slower.)
_SPECIAL_LINE = re.compile(rb"\n[ \t\r\x0b\x0c\n#]")
_CONTINUATION = re.compile(rb"\n[ \t\r\x0b\x0c]")
_STARTS_SPECIAL = frozenset(b" \t\r\x0b\x0c\n#")
_STARTS_CONTINUATION = frozenset(b" \t\r\x0b\x0c")


@dataclass(frozen=True)
class KeyOrdered:
    """Stored records (trailing NUL, never empty) in strictly increasing key order."""

    keys: list[bytes]
    values: list[bytes]

    def __len__(self) -> int:
        return len(self.keys)


def postmap_records(data: bytes, *, fold_keys: bool, block: int = BLOCK) -> KeyOrdered | None:
    """The records of a postmap source, or None where the general path must build it."""
    if b"\0" in data:
        return None  # an error (except in a comment): rare either way
    keys: list[bytes] = []
    values: list[bytes] = []
    for chunk in _blocks(data, block):
        split = _split(chunk, fold_keys)
        if split is None:
            split = _parse(chunk, fold_keys)
            if split is None:
                return None
        keys += split[0]
        values += split[1]
    if not _increasing(keys):
        pairs = sorted(zip(keys, values, strict=True))
        keys, values = [k for k, _ in pairs], [v for _, v in pairs]
        if not _increasing(keys):
            return None  # two keys fold alike: the general path reports it
    return KeyOrdered(keys, values)


def _blocks(data: bytes, size: int) -> Iterator[bytes]:
    """The data in blocks of whole logical lines, each about size bytes."""
    start = 0
    while start < len(data):
        boundary = _LOGICAL_START.search(data, start + size)
        end = boundary.end() if boundary else len(data)
        yield data[start:end]
        start = end


def _split(chunk: bytes, fold_keys: bool) -> tuple[list[bytes], list[bytes]] | None:
    """Stored keys and values of a block of one-line entries (comments and blank
    lines allowed), or None for any other block: sources.py then reads it.
    """
    lines = _entry_lines(chunk)
    if lines is None:
        return None
    # The key ends at the first whitespace and the value is trimmed at both
    # ends, as postmap.c splits a line without quotes or backslashes.
    pairs = [line.split(None, 1) for line in lines]
    try:
        values = [pair[1].rstrip() + b"\0" for pair in pairs]
    except IndexError:
        return None  # a line without a value
    if b":" in chunk and any(key.endswith(b":") for key, _ in pairs):
        return None  # postmap's "is this an alias file?" warning
    if not fold_keys:
        keys = [pair[0] + b"\0" for pair in pairs]
    elif chunk.isascii():
        keys = [pair[0].lower() + b"\0" for pair in pairs]
    else:
        keys = [fold(pair[0]) + b"\0" for pair in pairs]
    return keys, values


def _entry_lines(chunk: bytes) -> list[bytes] | None:
    """The block's lines that are entries, if each is a whole entry in UTF-8 that
    bytes.split() splits as postmap.c does; None otherwise.
    """
    lines = chunk.split(b"\n")
    if chunk.endswith(b"\n"):
        lines.pop()
    text = chunk
    if chunk[0] in _STARTS_SPECIAL or _SPECIAL_LINE.search(chunk):
        if chunk[0] in _STARTS_CONTINUATION or _CONTINUATION.search(chunk):
            return None  # continuation lines make one entry of several lines
        # readllines() skips blank lines and comments (which need not be UTF-8)
        lines = [line for line in lines if line and not line.startswith(b"#")]
        text = b"\n".join(lines)
    if b'"' in text or b"\\" in text:
        return None  # quotes and backslashes change postmap.c's split
    if not text.isascii():
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return lines


def _parse(chunk: bytes, fold_keys: bool) -> tuple[list[bytes], list[bytes]] | None:
    """Stored keys and values of a block as sources.py reads it; None on any problem."""
    keys, values = [], []
    for item in sources.parse(io.BytesIO(chunk), "postmap")[1]:
        if isinstance(item, sources.Problem):
            return None
        keys.append(stored_key(fold(item.key) if fold_keys else item.key))
        values.append(stored_value(item.value))
    return keys, values


def _increasing(keys: list[bytes]) -> bool:
    return all(map(operator.lt, keys, islice(keys, 1, None)))
