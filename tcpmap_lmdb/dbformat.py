"""The on-disk conventions shared by the builder and the reader.

A table is a Postfix-compatible LMDB file (postfix-maps.md section 4): one file
``NAME.lmdb`` (no subdirectory), the unnamed main database, keys and values each
stored with one trailing NUL, keys folded to lowercase unless built with folding off.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# lmdb:NAME is the file NAME.lmdb (postfix-maps.md 4.1); NAME is also its map name.
SUFFIX = ".lmdb"

# LMDB's default MDB_MAXKEYSIZE, which includes the trailing NUL Postfix stores.
MAX_KEY_BYTES = 511
# Case folding (fold() below) shrinks a key at most threefold: U+212A KELVIN SIGN
# is 3 bytes of UTF-8 and folds to "k" (checked over every code point). So a
# lookup key longer than this cannot fold to a key any table can hold.
MAX_LOOKUP_KEY = 3 * (MAX_KEY_BYTES - 1)

# How the build is recorded. The key starts with NUL, and Postfix looks up a
# C string KEY as "KEY\0" or "KEY", so no Postfix lookup can ever match it
# (`postmap -s` lists it as an empty key, with the JSON as its value).
META_KEY = b"\x00tcpmap-lmdb\x00"
META_VERSION = 1


def map_name(path: Path) -> str:
    """The map name of a table file: virtual.lmdb -> virtual."""
    return path.name.removesuffix(SUFFIX)


def fold(key: bytes) -> bytes:
    """Fold a key the way Postfix folds fixed-key tables (FOLD_FIX).

    ASCII keys are lowercased. UTF-8 keys get full Unicode case folding
    (Postfix uses ICU's, Python's str.casefold() implements the same mapping,
    so "Straße" folds to "strasse"). Bytes that are not UTF-8 only have their
    ASCII letters lowercased.
    """
    if key.isascii():
        return key.lower()
    try:
        return key.decode("utf-8").casefold().encode("utf-8")
    except UnicodeDecodeError:
        return key.lower()


def stored_key(key: bytes) -> bytes:
    """The LMDB key for a (folded) lookup key: Postfix's trailing-NUL form."""
    return key + b"\x00"


def stored_value(value: bytes) -> bytes:
    return value + b"\x00"


@dataclass(frozen=True)
class BuildInfo:
    """What the builder records about a table, under META_KEY."""

    folded: bool
    syntax: str  # "postmap" or "aliases"
    records: int
    source: str
    built_at: str  # ISO 8601, UTC
    version: int = META_VERSION

    def encode(self) -> bytes:
        return stored_value(json.dumps(asdict(self), sort_keys=True).encode("utf-8"))

    @classmethod
    def decode(cls, raw: bytes) -> BuildInfo:
        """Parse a META_KEY value; raises ValueError when it is not ours."""
        data = json.loads(raw.rstrip(b"\x00").decode("utf-8"))
        if not isinstance(data, dict) or data.get("version") != META_VERSION:
            raise ValueError(f"unsupported build record: {raw[:80]!r}")
        return cls(
            folded=bool(data["folded"]),
            syntax=str(data["syntax"]),
            records=int(data["records"]),
            source=str(data["source"]),
            built_at=str(data["built_at"]),
        )
