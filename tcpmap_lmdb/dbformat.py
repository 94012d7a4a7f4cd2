"""The on-disk conventions shared by the builder and the reader.

A table is a Postfix-compatible LMDB file (postfix-maps.md section 4): one file
``NAME.lmdb`` (no subdirectory), the unnamed main database, keys and values each
stored with one trailing NUL, keys folded to lowercase unless built with folding off.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

# lmdb:NAME is the file NAME.lmdb (postfix-maps.md 4.1); NAME is also its map name.
SUFFIX = ".lmdb"

# LMDB's default MDB_MAXKEYSIZE, which includes the trailing NUL Postfix stores.
MAX_KEY_BYTES = 511
# Case folding (fold() below) shrinks a key at most threefold: U+212A KELVIN SIGN
# is 3 bytes of UTF-8 and folds to "k" (checked over every code point). So a
# lookup key longer than this cannot fold to a key any table can hold.
MAX_LOOKUP_KEY = 3 * (MAX_KEY_BYTES - 1)

# How the build is recorded. postmap -s and postalias -s print every key up to
# its first NUL (dict_lmdb_sequence copies it as a C string): this one prints as
# "#tcpmap-lmdb", so a dump reads back as a comment line, in either syntax, with
# no warning. The bytes after the NUL keep every lookup away from it: Postfix
# looks up a C string KEY as "KEY\0" or "KEY" (dict_lmdb.c), never with more.
META_KEY = b"#tcpmap-lmdb\x00build record"
# Before 0.2: printed as an empty key ("warning: empty lookup key value is not allowed").
OLD_META_KEY = b"\x00tcpmap-lmdb\x00"
META_KEYS = (META_KEY, OLD_META_KEY)
META_VERSION = 1

# What a file that is not an LMDB table is, from its first 16 bytes: Berkeley DB
# keeps its magic number at offset 12 (db.h: DB_HASHMAGIC, DB_BTREEMAGIC), in
# the byte order of the host that wrote it.
_BERKELEY_DB = {
    (0x00061561).to_bytes(4, "little"): "hash",
    (0x00061561).to_bytes(4, "big"): "hash",
    (0x00053162).to_bytes(4, "little"): "btree",
    (0x00053162).to_bytes(4, "big"): "btree",
}
_LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")  # mdb.c MDB_MAGIC, at offset 16


def table_path(name: str | Path) -> Path:
    """The table file NAME means, spelt as main.cf names it or as a file.

    ``lmdb:/etc/postfix/virtual`` and ``/etc/postfix/virtual`` mean
    ``/etc/postfix/virtual.lmdb`` (lmdb_table(5): the file is NAME.lmdb), as
    does a NAME that does not exist (a table not built yet). A NAME ending in
    .lmdb, or an existing file without a NAME.lmdb beside it, is that file.
    """
    text = str(name).removeprefix("lmdb:")
    path = Path(text)
    if text.endswith(SUFFIX):
        return path
    beside = Path(text + SUFFIX)
    if beside.exists() or not path.exists():
        return beside
    return path


# Compressed files, by their magic numbers: gzip (RFC 1952), xz (its file format
# spec, 2.1.1.1), bzip2 ("BZh" and a block size digit), zstd (RFC 8878, 3.1.1);
# and the command that decompresses each.
COMPRESSED = (
    (b"\x1f\x8b", "gzip", "zcat"),
    (b"\xfd7zXZ\x00", "xz", "xzcat"),
    (b"BZh", "bzip2", "bzcat"),
    (b"\x28\xb5\x2f\xfd", "zstd", "zstdcat"),
)


def not_a_table(path: Path, head: bytes | int, reason: str = "") -> str:
    """Why the file at PATH is no LMDB table, and what to do about it.

    HEAD is the file's first 64 bytes, or a descriptor open on it. REASON is
    LMDB's own error, said only for a file that has LMDB's magic number (a
    damaged table); it never names the /proc/self/fd path it was opened by.
    """
    if isinstance(head, int):
        head = os.pread(head, 64, 0)
    what = f"{path} is not a readable LMDB file"
    for magic, compression, cat in COMPRESSED:  # before the text test: bzip2 may pass it
        if head.startswith(magic):
            table = path.with_suffix("") if path.suffix else Path(f"{path}.lmdb")
            return (
                f"{what}: it is {compression}-compressed data; if it is a table, decompress "
                f"it first ({cat} {path} > {table}), else build one with `tcpmap-build SOURCE`"
            )
    if head and b"\x00" not in head:
        return (
            f"{what}: it is a text file, a table source perhaps; build a table from it "
            f"with `tcpmap-build {path}` and serve {path}{SUFFIX}"
        )
    # Postfix names the file of hash:NAME or btree:NAME NAME.db: its source is NAME.
    source = path.with_suffix("") if path.suffix == ".db" else "SOURCE"
    build = f"build one with `tcpmap-build {source}`"
    if not head:
        return f"{what}: it is empty; {build}"
    kind = _BERKELEY_DB.get(head[12:16])
    if kind is not None:
        return f"{what}: it is a Berkeley DB {kind} file (Postfix's {kind}: type); {build}"
    if head[16:20] == _LMDB_MAGIC:
        detail = reason.rpartition(": ")[2] if reason.startswith("/") else reason
        return f"{what}: it is a damaged LMDB file ({detail or 'unreadable'}); {build} again"
    return f"{what}; {build}"


def count(number: int, noun: str) -> str:
    """ "1 record", "2 records": NOUN must pluralise with an s."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def map_name(path: Path) -> str:
    """The map name of a table file: virtual.lmdb -> virtual."""
    return path.name.removesuffix(SUFFIX)


# How the keys of a table are folded, when it is built and when it is searched:
# "utf8", Postfix with smtputf8_enable = yes (fold); "ascii", Postfix with
# smtputf8_enable = no (fold_ascii); "none", postmap -f (keys as written).
Folding = Literal["utf8", "ascii", "none"]
# What --fold, --no-fold and --fold-ascii say: fold as the keys show (True), not at
# all (False), ASCII only ("ascii"); None: as the table was built.
FoldKeys = bool | Literal["ascii"] | None


def fold(key: bytes) -> bytes:
    """Fold a key the way Postfix folds fixed-key tables (FOLD_FIX) with
    smtputf8_enable = yes (its default from compatibility_level 1 on).

    ASCII keys are lowercased. UTF-8 keys get full Unicode case folding
    (Postfix's dict_utf8 wrapper uses ICU's casefold(), Python's str.casefold()
    implements the same mapping, so "Straße" folds to "strasse"). Bytes that
    are not UTF-8 only have their ASCII letters lowercased (Postfix refuses
    such keys then: they are never stored, so never found).
    """
    if key.isascii():
        return key.lower()
    try:
        return key.decode("utf-8").casefold().encode("utf-8")
    except UnicodeDecodeError:
        return key.lower()


def fold_ascii(key: bytes) -> bytes:
    """Fold a key the way Postfix does with smtputf8_enable = no: ASCII letters are
    lowercased, every other byte is kept (dict_lmdb.c under DICT_FLAG_FOLD_FIX calls
    lowercase(), which changes only ISUPPER() bytes, ASCII ones; no dict_utf8 wrapper)."""
    return key.lower()


def folded_ascii_only(key: bytes) -> bool:
    """Whether the stored key KEY (without its NUL) proves its table was not folded
    as smtputf8_enable = yes folds: it is not ASCII, and it is not UTF-8 or UTF-8
    case folding changes it. Postfix with that setting stores neither (dict_utf8.c:
    invalid UTF-8 keys are skipped, the others casefolded)."""
    if key.isascii():
        return False
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return text.casefold() != text


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
    long_values: int = 0  # values too long for a tcp_table reply (tcpmap-build --long-values)

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
            long_values=int(data.get("long_values", 0)),
        )
