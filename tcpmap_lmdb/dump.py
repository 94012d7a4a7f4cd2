"""A table file's records and build record, for tcpmap-query --dump and --info.

Reads as Postfix's own readers do (dict_lmdb.c): read-only, no lock file, and
Postfix's shared fcntl lock around the read transaction, since a postmap may
rewrite a file it built in place (lmdb_table(5)).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from .dbformat import META_KEYS, BuildInfo, not_a_table
from .table import TableError


@dataclass(frozen=True, slots=True)
class Summary:
    """What --info prints about a table file."""

    path: Path
    records: int  # counted in the file now, the build record left out
    size: int  # bytes
    modified: float  # st_mtime: when it was published (a rename keeps the build's)
    info: BuildInfo | None  # None: built by postmap/postalias, or unreadable

    def lines(self) -> list[str]:
        """NAME: VALUE lines, as `postconf` prints settings."""
        built = self.info
        out = [
            f"file: {self.path}",
            f"records: {self.records}",
            f"size: {self.size} bytes",
        ]
        if built is None:
            out.append("built by: Postfix (postmap or postalias), no build record")
        else:
            out += [
                f"built at: {built.built_at}",
                f"source: {built.source}",
                f"syntax: {built.syntax}",
                f"keys: {'folded to lowercase' if built.folded else 'case-sensitive (-f)'}",
                f"records when built: {built.records}",
            ]
            if built.long_values:
                out.append(f"values too long for tcp_table: {built.long_values}")
        return out


@contextmanager
def _reading(path: Path) -> Iterator[Any]:
    """A read transaction on PATH; TableError saying what the file is when not a table."""
    fd = open_file(path)
    try:
        try:
            env = lmdb.open(
                str(path), subdir=False, readonly=True, lock=False, max_dbs=0, max_readers=1
            )
        except lmdb.Error as exc:
            raise TableError(not_a_table(path, fd, str(exc))) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH)
            with env.begin(buffers=False) as txn:
                yield txn
        except lmdb.Error as exc:
            raise TableError(f"{path} is corrupt: {exc}") from None
        finally:
            env.close()
    finally:
        os.close(fd)


def records(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of the table, as `postmap -s` prints them: up to the first NUL.

    The build record is left out.
    """
    with _reading(path) as txn:
        for key, value in txn.cursor():
            if key in META_KEYS:
                continue
            yield key.partition(b"\x00")[0], value.partition(b"\x00")[0]


def summary(path: Path) -> Summary:
    with _reading(path) as txn:
        entries = txn.stat()["entries"]
        raw = [txn.get(key) for key in META_KEYS]
    found = [value for value in raw if value is not None]
    info = None
    if found:
        try:
            info = BuildInfo.decode(found[0])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            info = None
    st = os.stat(path)
    return Summary(path, entries - len(found), st.st_size, st.st_mtime, info)


def open_file(path: Path) -> int:
    """A descriptor on the table file at PATH; TableError naming it if there is none.

    O_NONBLOCK: a FIFO at PATH must not hang the command (it is then refused as
    not a table).
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TableError(f"cannot open {path}: {exc.strerror}") from None
