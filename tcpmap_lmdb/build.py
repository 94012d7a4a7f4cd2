"""tcpmap-build: turn a postmap(1) or aliases(5) source into a Postfix-compatible LMDB table.

The source is read a block at a time and every line is checked first; a single
bad line means nothing is written. Postmap blocks of plain lines take bulk.py's
fast path; the rest go line by line through sources.py. The checked records go
to an external merge sort (extsort.py), so memory stays bounded whatever the
size of the source; the merge resolves duplicate keys as postmap does and feeds
the LMDB writer in key order. The table is written to a temporary file beside
the target and renamed onto it, so readers see either the old table or the
complete new one (design.md decision 5), never a partial file, even after a
crash or Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import gc
import glob
import io
import operator
import os
import re
import secrets
import signal
import stat
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain, compress, count, islice
from pathlib import Path
from typing import BinaryIO, Literal, get_args

import lmdb

from tcpmap_lmdb import __version__, bulk, extsort, protocol, socketmap, sources
from tcpmap_lmdb.dbformat import (
    MAX_KEY_BYTES,
    META_KEY,
    BuildInfo,
    fold,
    stored_key,
    stored_value,
)
from tcpmap_lmdb.dbformat import count as plural  # itertools.count is count here
from tcpmap_lmdb.postfix import AliasNames, installed_alias_names
from tcpmap_lmdb.progress import Phase, Progress

PROG = "tcpmap-build"
PHASES = get_args(Phase)
MAX_REPORTED_ERRORS = 100  # print this many bad lines, then only count them
_MIN_MAP_SIZE = 1 << 20
_MAX_MAP_SIZE = 1 << 40
# Records per write transaction. LMDB refuses a transaction that dirties more
# than 128k pages (MDB_TXN_FULL), and keeps them all in memory until commit; a
# record takes at most 3 (a leaf share plus 2 overflow pages for a 4 KB value).
BATCH = 20_000
_REOPEN_EVERY = 32  # transactions between two reopenings of the table's LMDB map
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Each value byte quotes to at most 3 ("%XX"): shorter values always fit a reply.
_ALWAYS_FITS = (protocol.MAX_REPLY - len(b"200 \n")) // 3

Duplicates = Literal["warn", "first", "last"]
# Warnings about duplicate keys are printed sorted by line, this many at a time.
_WARNINGS_HELD = 10_000


# --long-values: a socketmap reply is "OK " and the value (socketmap_table(5)).
_SOCKETMAP_VALUE = socketmap.MAX_REPLY - len(b"OK ")


def check_entry(key: bytes, value: bytes, *, long_values: bool = False) -> str | None:
    """Why Postfix could not use this (already folded) entry, or None if it can.

    With long_values, a value may fill a socketmap reply even if it cannot fit
    a tcp_table one (the server then answers it 400 on tcp_table).
    """
    if not key:
        return "empty key"  # postalias accepts '"": x'; no lookup can find it
    if len(stored_key(key)) > MAX_KEY_BYTES:
        return f"key too long: {len(key)} bytes, the LMDB limit is {MAX_KEY_BYTES - 1}"
    if not value:
        return "empty value"  # Postfix daemons treat an empty lookup result as an error
    if long_values:
        if len(value) > _SOCKETMAP_VALUE:
            return f"value too long: {len(value)} bytes, a socketmap reply holds {_SOCKETMAP_VALUE}"
    elif len(value) > _ALWAYS_FITS and not protocol.fits(value):
        return (
            f"value too long: its tcp_table reply would exceed {protocol.MAX_REPLY} bytes "
            "(--long-values allows up to socketmap's limit)"
        )
    return None


def too_long_for_tcp_table(values: Iterable[bytes]) -> int:
    """How many stored VALUES (with their NUL) a tcp_table reply cannot hold (--long-values)."""
    return sum(1 for v in values if len(v) > _ALWAYS_FITS + 1 and not protocol.fits(v[:-1]))


class Reporter:
    """Messages about the source, on stderr as NAME:LINE: message.

    Bad lines are printed at once, the first MAX_REPORTED_ERRORS of them, and
    counted. Duplicate keys are found only when the sorted runs are merged, in
    key order: their warnings are held and printed sorted by line.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.errors = 0
        self.before_print: Callable[[], None] = lambda: None  # erases a progress line
        self._held: list[tuple[int, str]] = []

    def error(self, lineno: int, reason: str) -> None:
        self.errors += 1
        if self.errors <= MAX_REPORTED_ERRORS:
            self.warn(lineno, reason)

    def warn(self, lineno: int, message: str) -> None:
        self.before_print()
        print(f"{self.name}:{lineno}: {message}", file=sys.stderr)

    def hold(self, lineno: int, message: str) -> None:
        self._held.append((lineno, message))
        if len(self._held) >= _WARNINGS_HELD:
            self.flush()

    def flush(self) -> None:
        for lineno, message in sorted(self._held):
            self.warn(lineno, message)
        self._held = []


def checked_entries(
    items: Iterable[sources.Entry | sources.Problem],
    report: Reporter,
    *,
    fold_keys: bool = True,
    first_line: int = 1,
    long_values: bool = False,
) -> bulk.Split:
    """Fold and check the entries of a block that starts at FIRST_LINE; report its
    problems. The result keeps every good entry, duplicates included, in file order."""
    keys: list[bytes] = []
    values: list[bytes] = []
    lines = array("Q")
    base = first_line - 1
    for item in items:
        if isinstance(item, sources.Problem):
            if item.fatal:
                report.error(base + item.lineno, item.reason)
            else:
                report.warn(base + item.lineno, item.reason)
            continue
        key = fold(item.key) if fold_keys else item.key
        reason = check_entry(key, item.value, long_values=long_values)
        if reason is not None:
            report.error(base + item.lineno, reason)
            continue
        keys.append(stored_key(key))
        values.append(stored_value(item.value))
        lines.append(base + item.lineno)
    return bulk.Split(keys, values, lines)


def distinct(
    batch: extsort.Batch, duplicates: Duplicates, report: Reporter
) -> tuple[list[bytes], list[bytes]]:
    """A merged batch with one record per key: the first in file order wins, or the
    last with "last"; with "warn", each later one is reported naming the first's line."""
    keys, values = batch.keys, batch.values
    if all(map(operator.lt, keys, islice(keys, 1, None))):
        return keys, values
    dropped = set()
    first = last = -1  # the current group of equal keys: its first and latest index
    first_line = 0
    # indexes i where keys[i] == keys[i - 1], found in C
    for i in compress(count(1), map(operator.eq, keys, islice(keys, 1, None))):
        if i - 1 != last:
            first, first_line = i - 1, 0
        last = i
        if duplicates == "last":
            dropped.add(i - 1)
            continue
        dropped.add(i)
        if duplicates == "warn":
            first_line = first_line or batch.line(first)
            shown = keys[i][:-1].decode("utf-8", "backslashreplace")
            message = f'duplicate key "{shown}" (first at line {first_line}): keeping the first'
            report.hold(batch.line(i), message)
    kept = [i for i in range(len(keys)) if i not in dropped]
    return [keys[i] for i in kept], [values[i] for i in kept]


# --- reading ----------------------------------------------------------------------


def read_source(
    stream: BinaryIO,
    sorter: extsort.Sorter,
    report: Reporter,
    progress: Progress,
    *,
    syntax: sources.Syntax | Literal["auto"] = "auto",
    fold_keys: bool = True,
    alias_names: AliasNames | Callable[[], AliasNames] = "internal",
    long_values: bool = False,
) -> sources.Syntax:
    """Read, split and check every line of STREAM into SORTER; the syntax (detected
    from the first logical line for "auto"). Once a line is bad, nothing more is
    sorted: the rest is only checked, to report every bad line. ALIAS_NAMES: the
    stored form of quoted aliases(5) names (postfix.py), or what finds it."""
    detected: sources.Syntax | None = None if syntax == "auto" else syntax
    first_line, done = 1, 0
    # Blocks well within a run, so that a run is not much larger than its budget.
    for block in bulk.blocks(stream, max(1, min(bulk.BLOCK, sorter.run_bytes // 8))):
        if detected is None:
            detected = _detect_syntax(block)
        split = None
        if (detected or "postmap") == "postmap":
            split = bulk.split_block(block, fold_keys, first_line)
            if split is not None and not _all_fit(split, long_values):
                split = None
        if split is None:
            if detected == "aliases" and callable(alias_names):
                try:  # once, and only for aliases(5) sources
                    alias_names = alias_names()
                except ValueError as exc:  # from postconf: the installed postalias's form
                    raise _Failed(f"--alias-names auto: {exc}") from exc
            items = sources.parse(io.BytesIO(block), detected or "postmap", alias_names)[1]
            split = checked_entries(
                items, report, fold_keys=fold_keys, first_line=first_line, long_values=long_values
            )
        if not report.errors:
            sorter.add(*split)
            progress.phase = "reading"  # sorter.add may have sorted a run
        # A plain block (its payload known) is all entries, one a line.
        first_line += len(split.keys) if split.payload >= 0 else block.count(b"\n")
        done += len(block)
        progress.advance(done, sorter.records)
    return detected or "postmap"


def _detect_syntax(block: bytes) -> sources.Syntax | None:
    """The syntax of the block's first logical line, None if it has none."""
    for item in sources.logical_lines(io.BytesIO(block)):
        if isinstance(item, sources.LogicalLine):
            return sources.detect_syntax(item.text)
    return None


def _all_fit(split: bulk.Split, long_values: bool = False) -> bool:
    """Whether check_entry passes every record; in C unless a record is near a limit."""
    keys, values = split.keys, split.values  # stored: with their trailing NUL
    short_keys = max(map(len, keys), default=0) <= MAX_KEY_BYTES
    if short_keys and max(map(len, values), default=0) <= _ALWAYS_FITS + 1:
        return True  # neither is ever empty (bulk.split_block)
    return all(
        check_entry(k[:-1], v[:-1], long_values=long_values) is None
        for k, v in zip(keys, values, strict=True)
    )


# --- writing ----------------------------------------------------------------


def write_table(
    target: Path,
    records: Iterable[tuple[list[bytes], list[bytes]]],
    info: Callable[[int], BuildInfo],
    *,
    map_size: int = _MIN_MAP_SIZE,
) -> int:
    """Atomically replace target with an LMDB file holding records and the build record.

    RECORDS are batches of stored keys and values, in strictly increasing key
    order across batches; INFO(n) gives the build record for n records. Returns
    how many records were written. See TableWriter.
    """
    with TableWriter(target, map_size) as writer:
        for keys, values in records:
            writer.append(keys, values)
        return writer.publish(info)


class TableWriter:
    """A new table for TARGET, written beside it and published by rename.

    Records are appended in strictly increasing key order and committed in
    transactions of exactly BATCH records, so the file is the same however the
    records were handed over. The build record is written last with a plain put
    (its count is known only then). MAP_SIZE is the initial LMDB map size; it
    doubles whenever it is full.

    A target that is a symbolic link is kept: the file it leads to is replaced
    (published_path). Leaving the with block without publish(), on any error
    or KeyboardInterrupt, removes the temporary file and leaves the target as
    it was. Errors are _Failed("TARGET: reason").
    """

    def __init__(self, target: Path, map_size: int, *, count_long: bool = False) -> None:
        """COUNT_LONG: count values too long for a tcp_table reply (--long-values)."""
        self.target = target
        self.written = 0
        self.long_values = 0  # of those appended, when COUNT_LONG
        self._count_long = count_long
        self._map_size = map_size
        self._path = target
        self._tmp: Path | None = None
        self._fd = -1
        self._env: lmdb.Environment | None = None
        self._keys: list[bytes] = []
        self._values: list[bytes] = []
        self._commits = 0  # transactions since the file was started

    def __enter__(self) -> TableWriter:
        with self._errors():
            self._path = published_path(self.target)
            _remove_stale_temporaries(self._path)
            # Named before it exists: a Ctrl-C landing while it is being created still
            # finds it to remove (with mkstemp the name would only be known afterwards).
            # The PID in the name lets a later build remove it if this one is SIGKILLed.
            name = f".{self._path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
            try:
                self._tmp = self._path.with_name(name)
                self._fd = os.open(self._tmp, _CREATE_FLAGS, 0o600)
                self._open()
            except FileExistsError:
                self._tmp = None  # someone else's file, however unlikely: leave it alone
                raise
            except BaseException:
                self.__exit__()  # a with block calls it only once __enter__ returned
                raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def append(self, keys: list[bytes], values: list[bytes]) -> None:
        """Records after every record appended so far, in strictly increasing key order."""
        if self._count_long:
            self.long_values += too_long_for_tcp_table(values)
        self._keys += keys
        self._values += values
        if len(self._keys) >= BATCH:
            full = len(self._keys) - len(self._keys) % BATCH
            with self._errors():
                for start in range(0, full, BATCH):
                    self._commit_batch(start, start + BATCH)
            del self._keys[:full], self._values[:full]

    def recall(self) -> Iterator[tuple[list[bytes], list[bytes]]]:
        """Every record appended, in order, a batch at a time; the table then starts again
        empty. (For a source that was in key order only at first: extsort.Sorter.)"""
        assert self._env is not None and self._tmp is not None
        with self._env.begin() as txn:
            records = txn.cursor().iternext()
            while chunk := list(islice(records, BATCH)):
                yield [k for k, _ in chunk], [v for _, v in chunk]
        yield self._keys, self._values
        self._env.close()
        self._env = None
        os.ftruncate(self._fd, 0)
        self.written, self._commits, self._keys, self._values = 0, 0, [], []
        self.long_values = 0
        with self._errors():
            self._open()

    def publish(self, info: Callable[[int], BuildInfo], mode: int | None = None) -> int:
        """Write the rest and the build record INFO(count), make the file durable and rename
        it onto the target; the number of records. MODE: the file's mode (default: the
        old table's, or 0644 less the umask)."""
        assert self._tmp is not None
        tmp = self._tmp
        with self._errors():
            if self._keys:
                self._commit_batch(0, len(self._keys))
            env = self._env
            assert env is not None
            # Not appended: wherever META_KEY sorts, a plain put finds its place.
            _commit(env, lambda txn: txn.put(META_KEY, info(self.written).encode()))
            env.sync(True)
            env.close()
            self._env = None
            os.fsync(self._fd)
            # Created 0600; the server's user must be able to read it.
            os.fchmod(self._fd, _publish_mode(self._path) if mode is None else mode)
            os.replace(tmp, self._path)
            self._tmp = None
            _fsync_directory(self._path.parent)  # make the rename itself durable
        return self.written

    def _open(self, map_size: int | None = None) -> None:
        assert self._tmp is not None
        # Postfix's own layout (postfix-maps.md 4.1): one file, no lock file.
        self._env = lmdb.open(
            str(self._tmp),
            subdir=False,
            lock=False,
            map_size=map_size or self._map_size,
            sync=False,
            metasync=False,
        )

    def _commit_batch(self, start: int, end: int) -> None:
        assert self._env is not None
        _append(self._env, self._keys[start:end], self._values[start:end])
        self.written += end - start
        self._commits += 1
        if self._commits % _REOPEN_EVERY == 0:
            # Each transaction reads the B-tree's right edge through LMDB's map, and
            # the kernel maps 16 pages around each such fault: without this, the
            # map's resident pages grew with the table (390 MiB RSS at 50M lines).
            map_size = self._env.info()["map_size"]
            self._env.close()
            self._open(map_size)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """OSError and lmdb.Error as _Failed naming the target; a full disk as ENOSPC."""
        try:
            yield
        except OSError as exc:
            raise _Failed(f"{self.target}: {exc.strerror or exc}") from exc
        except lmdb.Error as exc:
            # LMDB reports a short write on a full disk as EIO. Look while the
            # temporary still holds the space: once it is removed, it is free again.
            if self._fd >= 0 and _nearly_full(self._fd):
                raise _Failed(f"{self.target}: No space left on device ({exc})") from exc
            raise _Failed(f"{self.target}: {exc}") from exc


_MAX_SYMLINKS = 40  # Linux's limit on links followed in one lookup (path_resolution(7))


def published_path(target: Path) -> Path:
    """The file a build of TARGET replaces: TARGET, or where its chain of symbolic links ends.

    postmap opens its output through a link, so the link stays and the served file
    changes; a rename onto the link itself would replace the link instead. Each
    link's text is taken relative to the link's own directory. The end of the
    chain need not exist (a dangling link: the table is created there). Raises
    OSError(ELOOP) after _MAX_SYMLINKS links, as open(2) does.
    """
    path = target
    for _ in range(_MAX_SYMLINKS):
        try:
            text = os.readlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return path  # nothing there yet: created by the rename
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return path  # not a link
            raise
        path = path.parent / text  # an absolute text replaces the whole path
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(target))


def _remove_stale_temporaries(target: Path) -> None:
    """Remove temporary files that killed builds (SIGKILL, power loss) left behind."""
    # Exactly our own names, .NAME.PID.HEX.tmp: not those of a table whose
    # name merely starts with NAME (map.lmdb vs map.lmdb.20240101).
    ours = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]{{12}}\.tmp")
    for path in target.parent.glob(f"{glob.escape(f'.{target.name}.')}*.tmp"):
        match = ours.fullmatch(path.name)
        if match is not None and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _publish_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)  # reading the umask means setting it: restore at once
        os.umask(umask)
        return 0o644 & ~umask


def _estimate_map_size(source_bytes: int | None) -> int:
    """The initial map size for a source of that many bytes (None: unknown, stdin).

    A record stores about its source line plus a node header, a little more
    for the shortest lines. A short estimate only costs a doubling (the
    transaction is redone); a long one nothing, as the file grows only as
    pages are written (never writemap=True).
    """
    if source_bytes is None:
        return _MIN_MAP_SIZE << 6
    return max(_MIN_MAP_SIZE, 4 * source_bytes)


def _append(env: lmdb.Environment, keys: list[bytes], values: list[bytes]) -> None:
    """Store a batch of records, in key order, in one transaction.

    Append mode is fast and packs pages full, but silently skips a key that is
    not greater than the one before it: every record must count as added.
    """

    def append(txn: lmdb.Transaction) -> None:
        # A zip, not a list of pairs: it reuses one tuple (a third faster).
        records = zip(keys, values, strict=True)
        _, added = txn.cursor().putmulti(records, append=True)
        if added != len(keys):
            raise RuntimeError(f"LMDB added {added} of {len(keys)} records: keys unsorted")

    _commit(env, append)


def _commit(env: lmdb.Environment, change: Callable[[lmdb.Transaction], object]) -> None:
    """Run CHANGE in a write transaction and commit it, growing the map while it is full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                change(txn)
            return
        except lmdb.MapFullError:
            # The transaction was aborted; grow the map as Postfix does, and redo it.
            map_size = env.info()["map_size"]
            if map_size >= _MAX_MAP_SIZE:
                raise
            env.set_mapsize(map_size * 2)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- command line -------------------------------------------------------------


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build a Postfix-compatible LMDB table (FILE.lmdb) from a postmap "
        "or aliases source file, atomically.",
    )
    parser.add_argument("file", metavar="FILE", help="source file, or - for stdin")
    parser.add_argument("-o", "--output", metavar="PATH", help="output file (default FILE.lmdb)")
    parser.add_argument(
        "--format",
        choices=("auto", "postmap", "aliases"),
        default="auto",
        help="source syntax (default: auto, detected from the first entry)",
    )
    parser.add_argument(
        "--alias-names",
        choices=("auto", "internal", "external"),
        default="auto",
        help="aliases syntax: store quoted names unquoted (internal, postalias 3.11 and "
        "earlier) or quoted (external, 3.12 on); default: auto, as the installed postalias",
    )
    parser.add_argument(
        "-f", dest="fold", action="store_false", help="do not fold keys to lowercase (postmap -f)"
    )
    # Without -r or -w a duplicate key is reported and its first value kept (like postmap).
    dups = parser.add_mutually_exclusive_group()
    dups.add_argument(
        "-r",
        dest="duplicates",
        action="store_const",
        const="last",
        help="duplicate keys: the last value wins, silently (postmap -r)",
    )
    dups.add_argument(
        "-w",
        dest="duplicates",
        action="store_const",
        const="first",
        help="duplicate keys: the first value wins, silently (postmap -w)",
    )
    parser.add_argument(
        "--mode",
        type=_octal_mode,
        metavar="MODE",
        help="the table's file mode, e.g. 0644 (default: the old table's, else 0644 less the "
        "umask); the packaged server runs as a dynamic user, who needs it world-readable",
    )
    parser.add_argument(
        "--long-values",
        action="store_true",
        help="allow values up to socketmap's 100000-byte reply, for tables served over "
        "socketmap; tcp_table lookups of longer ones than its 4096-byte reply answer 400",
    )
    parser.add_argument("--check", action="store_true", help="validate only, write nothing")
    parser.add_argument(
        "--tmpdir",
        metavar="DIR",
        help="where the sort spills its runs, for sources larger than memory "
        "(default: the output's directory)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(duplicates="warn")
    return parser


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an octal mode such as 0644") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an octal mode such as 0644")
    return mode


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _arg_parser()
    args = parser.parse_args(argv)
    # main.cf's spelling: postmap lmdb:/etc/postfix/virtual builds virtual.lmdb.
    kind, colon, rest = args.file.partition(":")
    if colon and kind == "lmdb":
        args.file = rest
    elif colon and kind.isalpha() and "/" not in kind and not Path(args.file).exists():
        parser.error(f"{args.file}: {PROG} builds lmdb: tables only (lmdb:{rest})")
    if args.file == "-" and args.output is None and not args.check:
        parser.error("reading stdin (FILE is -) needs -o PATH")
    return args


class _Failed(Exception):
    """The build cannot go on; the message is "PATH: reason"."""


def main(argv: list[str] | None = None) -> int:
    """Run tcpmap-build; the exit status: 0 built, 1 bad input or I/O error, 2 usage."""
    try:
        args = _parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage or help
        return exc.code if isinstance(exc.code, int) else 2
    previous = _interrupt_on_termination()
    try:
        with _gc_paused():
            return _build(args)
    except _Failed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # The table is the old one or, if the rename was already done, the new one.
        phase = f" (while {exc.args[0]})" if exc.args and exc.args[0] in PHASES else ""
        print(f"{PROG}: interrupted{phase}", file=sys.stderr)
        return 130
    finally:
        _restore_signals(previous)


_TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def _interrupt_on_termination() -> dict[int, object]:
    """SIGTERM and SIGHUP clean up like Ctrl-C: no temporary file is left behind."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _raise_interrupt) for signum in _TERMINATING}


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _restore_signals(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC, which would otherwise scan the heap again and again while
    a build creates millions of objects (parsing ran 5x slower); a build makes no cycles.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _build(args: argparse.Namespace) -> int:
    name = "stdin" if args.file == "-" else args.file
    target = Path(args.output if args.output is not None else args.file + ".lmdb")
    if not target.name:  # "/" or "."
        raise _Failed(f"{target}: not a file name")
    if not args.check and name != "stdin" and _same_file(args.file, target):
        raise _Failed(f"{target}: is the source file; refusing to overwrite it")
    with _opened(args) as stream, ExitStack() as stack:
        # Before anything is written: a table or a binary file is not a source.
        if (instead := sources.not_a_source(_head(stream), name)) is not None:
            raise _Failed(f"{name}: this is {instead.what}, not a source file; {instead.fix}")
        source_bytes = _size(stream)
        # The table is written from the start: a source in key order goes
        # straight into it. Until it is published, it is a temporary file.
        writer = None
        if not args.check:
            writer = stack.enter_context(
                TableWriter(target, _estimate_map_size(source_bytes), count_long=args.long_values)
            )
        tmpdir = Path(args.tmpdir) if args.tmpdir else _run_directory(target)
        sorter = stack.enter_context(
            closing(extsort.Sorter(tmpdir, run_bytes=_run_bytes(), sink=writer))
        )
        enabled = not args.quiet and sys.stderr.isatty()
        progress = Progress(sys.stderr, enabled=enabled, source_bytes=source_bytes)
        stack.callback(progress.finish)
        sorter.on_sort = lambda: progress.start("sorting")
        report = Reporter(name)
        report.before_print = progress.finish
        job = _Job(args, name, sorter, report, progress, writer)
        try:
            return _sort_and_write(job, stream)
        except KeyboardInterrupt as exc:
            raise KeyboardInterrupt(progress.phase) from exc
        except OSError as exc:  # the table's own errors are _Failed already
            if progress.phase == "reading":
                raise _Failed(f"{name}: {exc.strerror or exc}") from exc
            raise _Failed(f"{tmpdir}: {exc.strerror or exc} (temporary sort runs)") from exc


@dataclass(frozen=True)
class _Job:
    args: argparse.Namespace
    name: str  # the source, as messages name it
    sorter: extsort.Sorter
    report: Reporter
    progress: Progress
    writer: TableWriter | None  # None: --check


def _sort_and_write(job: _Job, stream: BinaryIO) -> int:
    args, report = job.args, job.report
    syntax = read_source(
        stream,
        job.sorter,
        report,
        job.progress,
        syntax=args.format,
        fold_keys=args.fold,
        alias_names=installed_alias_names if args.alias_names == "auto" else args.alias_names,
        long_values=args.long_values,
    )
    if report.errors:
        hidden = report.errors - MAX_REPORTED_ERRORS
        more = f" ({hidden} not shown)" if hidden > 0 else ""
        lines = "line" if report.errors == 1 else "lines"
        if syntax == "aliases" and args.format == "auto":
            print(
                f"{PROG}: {job.name}: read as aliases(5) syntax, since its first entry is "
                '"name: value"; is this a postmap table? Then use --format postmap',
                file=sys.stderr,
            )
        message = f"{job.name}: {report.errors} bad {lines}{more}; nothing written"
        print(f"{PROG}: {message}", file=sys.stderr)
        return 1
    how = f"{syntax} syntax, {'folded' if args.fold else 'not folded'}"
    records = _distinct_batches(job)
    if job.writer is None:
        count = long_values = 0
        for keys, values in records:
            count += len(keys)
            long_values += too_long_for_tcp_table(values) if args.long_values else 0
        report.flush()
        done = f"{job.name}: {plural(count, 'record')} OK ({how})"
    else:
        writer = job.writer
        for keys, values in records:
            writer.append(keys, values)

        def info(count: int) -> BuildInfo:
            return BuildInfo(
                folded=args.fold,
                syntax=syntax,
                records=count,
                source="stdin" if job.name == "stdin" else os.path.abspath(args.file),
                built_at=datetime.now(UTC).isoformat(timespec="seconds"),
                long_values=writer.long_values,  # read once all are written
            )

        count = job.writer.publish(info, args.mode)
        long_values = writer.long_values
        report.flush()
        done = f"wrote {plural(count, 'record')} to {job.writer.target} ({how})"
    job.progress.finish()
    if not args.quiet:
        print(f"{PROG}: {done}", file=sys.stderr)
    if long_values:
        print(
            f"{PROG}: warning: {plural(long_values, 'value')} too long for a tcp_table reply "
            "(tcp_table lookups of them are answered 400; socketmap serves them)",
            file=sys.stderr,
        )
    if job.writer is not None:
        _warn_unreadable(job.writer.target)
    return 0


def _warn_unreadable(target: Path) -> None:
    """Warn when others cannot read the table: the packaged tcpmap.service runs as a
    dynamic user (DynamicUser=yes), so it would defer all the table's mail."""
    mode = stat.S_IMODE(target.stat().st_mode)
    if mode & 0o004:
        return
    print(
        f"{PROG}: warning: {target} is mode {mode:04o}: a server running as another user "
        f"(the packaged tcpmap.service runs as a dynamic user) cannot read it. "
        f"Run `chmod 644 {target}`, build with --mode 0644, or set umask 022",
        file=sys.stderr,
    )


def _distinct_batches(job: _Job) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """The merged records, one per key, for the writer; the progress line follows them.

    The first batch is taken at once: the last run is sorted (and the runs
    spilled) then, in the "sorting" phase.
    """
    merged = job.sorter.merged()
    first = next(merged, None)
    job.progress.start("writing", job.sorter.records - job.sorter.sunk)
    return _counted(chain([first], merged) if first else merged, job)


def _counted(
    merged: Iterator[extsort.Batch], job: _Job
) -> Iterator[tuple[list[bytes], list[bytes]]]:
    done = 0
    for batch in merged:
        done += len(batch.keys)
        yield distinct(batch, job.args.duplicates, job.report)
        job.progress.advance(done)


@contextmanager
def _opened(args: argparse.Namespace) -> Iterator[BinaryIO]:
    if args.file == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = open(args.file, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise _Failed(f"{args.file}: {exc.strerror or exc}") from exc
    with stream:
        yield stream


def _head(stream: BinaryIO) -> bytes:
    """The stream's first bytes, left unread: sources.HEAD_BYTES, or what one read gave
    (a pipe may deliver less)."""
    if not isinstance(stream, io.BufferedReader):
        return b""  # not from _opened: nothing to look at without consuming it
    try:
        return stream.peek(sources.HEAD_BYTES)[: sources.HEAD_BYTES]
    except OSError as exc:
        raise _Failed(f"{stream.name}: {exc.strerror or exc}") from exc


def _size(stream: BinaryIO) -> int | None:
    """The source's size in bytes if it is a regular file (for the ETA)."""
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


_RUN_BYTES_ENV = "TCPMAP_BUILD_RUN_BYTES"


def _run_bytes() -> int:
    """The sort's run budget: extsort.RUN_BYTES, or TCPMAP_BUILD_RUN_BYTES (tests, tuning)."""
    raw = os.environ.get(_RUN_BYTES_ENV)
    if raw is None:
        return extsort.RUN_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise _Failed(f"{_RUN_BYTES_ENV}={raw}: not a positive number of bytes")
    return value


def _run_directory(target: Path) -> Path:
    """Where sort runs are spilled by default: beside the published table."""
    try:
        return published_path(target).parent
    except OSError:
        return target.parent  # the link loop is reported when the table is written


def _nearly_full(fd: int) -> bool:
    try:
        fs = os.fstatvfs(fd)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < 1 << 20  # under 1 MiB left for us


def _same_file(source: str, target: Path) -> bool:
    try:
        return os.path.samefile(source, target)
    except OSError:
        return False  # one of them does not exist (yet)


if __name__ == "__main__":
    sys.exit(main())
