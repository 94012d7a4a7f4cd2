"""tcpmap-build: turn a postmap(1) or aliases(5) source into a Postfix-compatible LMDB table.

Everything is parsed and checked first; a single bad line means nothing is
written. Postmap sources take bulk.py's fast path when it can build them; the
rest, and every source with something to report, go line by line. The table
is then written to a temporary file beside the target and renamed onto it, so
readers see either the old table or the complete new one (design.md decision
5), never a partial file, even after a crash or Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import gc
import glob
import io
import os
import re
import secrets
import signal
import stat
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import lmdb

from tcpmap_lmdb import __version__, bulk, protocol, socketmap, sources
from tcpmap_lmdb.dbformat import (
    MAX_KEY_BYTES,
    META_KEY,
    BuildInfo,
    count,
    fold,
    stored_key,
    stored_value,
)

PROG = "tcpmap-build"
MAX_REPORTED_ERRORS = 100  # print this many bad lines, then only count them
# The file grows only as pages are written (never writemap=True), so a generous
# map costs nothing; doubling covers what the estimate misses (overflow pages).
_MIN_MAP_SIZE = 1 << 20
_MAX_MAP_SIZE = 1 << 40
_RECORD_OVERHEAD = 64  # node header, page pointer, page headers, with margin
# Records per write transaction. LMDB refuses a transaction that dirties more
# than 128k pages (MDB_TXN_FULL), and keeps them all in memory until commit; a
# record takes at most 3 (a leaf share plus 2 overflow pages for a 4 KB value).
BATCH = 20_000
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Each value byte quotes to at most 3 ("%XX"): shorter values always fit a reply.
_ALWAYS_FITS = (protocol.MAX_REPLY - len(b"200 \n")) // 3

Duplicates = Literal["warn", "first", "last"]
# Records in stored form, as write_table takes them: a dict from the general
# path, or the fast path's lists, already in key order.
Records = dict[bytes, bytes] | bulk.KeyOrdered


@dataclass
class Loaded:
    """Checked records in stored (NUL-terminated) form, and how many lines were bad."""

    records: dict[bytes, bytes] = field(default_factory=dict)
    first_line: dict[bytes, int] = field(default_factory=dict)  # kept only to warn
    errors: int = 0


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


def too_long_for_tcp_table(records: Records) -> int:
    """How many values a tcp_table reply cannot hold (with --long-values)."""
    values = records.values if isinstance(records, bulk.KeyOrdered) else records.values()
    return sum(1 for v in values if len(v) > _ALWAYS_FITS + 1 and not protocol.fits(v[:-1]))


def load(
    items: Iterable[sources.Entry | sources.Problem],
    name: str,
    *,
    fold_keys: bool = True,
    duplicates: Duplicates = "warn",
    long_values: bool = False,
) -> Loaded:
    """Fold, check and de-duplicate entries; report problems on stderr as NAME:LINE: reason."""
    table = Loaded()
    for item in items:
        if isinstance(item, sources.Problem):
            if item.fatal:
                _error(table, name, item.lineno, item.reason)
            else:
                _report(name, item.lineno, item.reason)
            continue
        key = fold(item.key) if fold_keys else item.key
        reason = check_entry(key, item.value, long_values=long_values)
        if reason is not None:
            _error(table, name, item.lineno, reason)
            continue
        skey = stored_key(key)
        if skey not in table.records:
            table.records[skey] = stored_value(item.value)
            if duplicates == "warn":
                table.first_line[skey] = item.lineno
        elif duplicates == "last":
            table.records[skey] = stored_value(item.value)
        elif duplicates == "warn":
            shown = key.decode("utf-8", "backslashreplace")
            first = table.first_line[skey]
            message = f'duplicate key "{shown}" (first at line {first}): keeping the first'
            _report(name, item.lineno, message)
    return table


def _report(name: str, lineno: int, message: str) -> None:
    print(f"{name}:{lineno}: {message}", file=sys.stderr)


def _error(table: Loaded, name: str, lineno: int, reason: str) -> None:
    table.errors += 1
    if table.errors <= MAX_REPORTED_ERRORS:
        _report(name, lineno, reason)


# --- writing ----------------------------------------------------------------


def write_table(
    target: Path,
    records: Records,
    info: BuildInfo,
    *,
    map_size: int | None = None,
    mode: int | None = None,
) -> None:
    """Atomically replace target with an LMDB file holding records and info.

    On any failure, KeyboardInterrupt included, the previous target is left as
    it was and the temporary file is removed. map_size is the initial LMDB map
    size (default: estimated from the records); it doubles whenever it is full.
    mode is the file's mode (default: the old table's, or 0644 less the umask).
    """
    mode = _publish_mode(target) if mode is None else mode
    _remove_stale_temporaries(target)
    # Named before it exists: a Ctrl-C landing while it is being created still
    # finds it to remove (with mkstemp the name would only be known afterwards).
    # The PID in the name lets a later build remove it if this one is SIGKILLed.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd, ours, published = -1, True, False
    try:
        try:
            fd = os.open(tmp, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            ours = False  # someone else's file, however unlikely: leave it alone
            raise
        try:
            _write_lmdb(tmp, records, info.encode(), map_size or _estimate_map_size(records))
        except lmdb.Error as exc:
            # LMDB reports a short write on a full disk as EIO. Look while the
            # temporary still holds the space: once it is removed, it is free again.
            if _nearly_full(fd):
                raise OSError(errno.ENOSPC, f"No space left on device ({exc})") from exc
            raise
        os.fsync(fd)
        os.fchmod(fd, mode)  # created 0600; the server user must be able to read it
        os.replace(tmp, target)
        published = True
        _fsync_directory(target.parent)  # make the rename itself durable
    finally:
        if fd >= 0:
            os.close(fd)
        if ours and not published:
            tmp.unlink(missing_ok=True)


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


def _estimate_map_size(records: Records) -> int:
    keys, values = (
        (records.keys, records.values)
        if isinstance(records, bulk.KeyOrdered)
        else (records.keys(), records.values())
    )
    payload = sum(map(len, keys)) + sum(map(len, values))
    return max(_MIN_MAP_SIZE, 2 * (payload + _RECORD_OVERHEAD * len(records)))


def _write_lmdb(path: Path, records: Records, meta: bytes, map_size: int) -> None:
    # Postfix's own layout (postfix-maps.md 4.1): one file, no lock file.
    env = lmdb.open(
        str(path), subdir=False, lock=False, map_size=map_size, sync=False, metasync=False
    )
    try:
        keys, values = _in_key_order(records)
        for start in range(0, len(keys), BATCH):
            _append(env, keys[start : start + BATCH], values[start : start + BATCH])
        with env.begin(write=True) as txn:  # not in key order: not with the appends
            txn.put(META_KEY, meta)
        env.sync(True)
    finally:
        env.close()


def _append(env: lmdb.Environment, keys: list[bytes], values: list[bytes]) -> None:
    """Store a batch of records, in key order, in one transaction.

    Append mode is fast and packs pages full, but silently skips a key that is
    not greater than the one before it: every record must count as added.
    """
    while True:
        try:
            with env.begin(write=True) as txn:
                # A zip, not a list of pairs: it reuses one tuple (a third faster).
                records = zip(keys, values, strict=True)
                _, added = txn.cursor().putmulti(records, append=True)
                if added != len(keys):
                    raise RuntimeError(f"LMDB added {added} of {len(keys)} records: keys unsorted")
            return
        except lmdb.MapFullError:
            # The transaction was aborted; grow the map as Postfix does, and redo it.
            map_size = env.info()["map_size"]
            if map_size >= _MAX_MAP_SIZE:
                raise
            env.set_mapsize(map_size * 2)


def _in_key_order(records: Records) -> tuple[list[bytes], list[bytes]]:
    """All keys and all values, in key order."""
    if isinstance(records, bulk.KeyOrdered):
        return records.keys, records.values
    keys = sorted(records)
    return keys, list(map(records.__getitem__, keys))


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
    except KeyboardInterrupt:
        # The table is the old one or, if the rename was already done, the new one.
        print(f"{PROG}: interrupted", file=sys.stderr)
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
    syntax, records, errors = _load(_read(args), args, name)
    if errors:
        hidden = errors - MAX_REPORTED_ERRORS
        more = f" ({hidden} not shown)" if hidden > 0 else ""
        lines = "line" if errors == 1 else "lines"
        if syntax == "aliases" and args.format == "auto":
            print(
                f"{PROG}: {name}: read as aliases(5) syntax, since its first entry is "
                '"name: value"; is this a postmap table? Then use --format postmap',
                file=sys.stderr,
            )
        print(f"{PROG}: {name}: {errors} bad {lines}{more}; nothing written", file=sys.stderr)
        return 1
    how = f"{syntax} syntax, {'folded' if args.fold else 'not folded'}"
    if args.check:
        done = f"{name}: {count(len(records), 'record')} OK ({how})"
    else:
        info = BuildInfo(
            folded=args.fold,
            syntax=syntax,
            records=len(records),
            source="stdin" if name == "stdin" else os.path.abspath(args.file),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            long_values=too_long_for_tcp_table(records) if args.long_values else 0,
        )
        _publish(target, records, info, args.mode)
        done = f"wrote {count(len(records), 'record')} to {target} ({how})"
    if not args.quiet:
        print(f"{PROG}: {done}", file=sys.stderr)
    if not args.check:
        _warn_unreadable(target)
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


def _read(args: argparse.Namespace) -> bytes:
    try:
        if args.file == "-":
            return sys.stdin.buffer.read()
        with open(args.file, "rb") as stream:
            return stream.read()
    except OSError as exc:
        raise _Failed(f"{args.file}: {exc.strerror or exc}") from exc


def _load(data: bytes, args: argparse.Namespace, name: str) -> tuple[sources.Syntax, Records, int]:
    """The syntax, the records and the number of bad lines."""
    syntax, items = sources.parse(io.BytesIO(data), args.format)
    if syntax == "postmap":
        fast = bulk.postmap_records(data, fold_keys=args.fold)
        if fast is not None and _all_fit(fast, args.long_values):
            return syntax, fast, 0
    table = load(
        items, name, fold_keys=args.fold, duplicates=args.duplicates, long_values=args.long_values
    )
    return syntax, table.records, table.errors


def _all_fit(records: bulk.KeyOrdered, long_values: bool) -> bool:
    """Whether check_entry passes every record; in C unless a record is near a limit."""
    keys, values = records.keys, records.values  # stored: with their trailing NUL
    short_keys = max(map(len, keys), default=0) <= MAX_KEY_BYTES
    if short_keys and max(map(len, values), default=0) <= _ALWAYS_FITS + 1:
        return True  # neither is ever empty (KeyOrdered)
    return all(
        check_entry(k[:-1], v[:-1], long_values=long_values) is None
        for k, v in zip(keys, values, strict=True)
    )


def _publish(target: Path, records: Records, info: BuildInfo, mode: int | None) -> None:
    try:
        write_table(target, records, info, mode=mode)
    except OSError as exc:
        raise _Failed(f"{target}: {exc.strerror or exc}") from exc
    except lmdb.Error as exc:  # e.g. "mdb_txn_commit: No space left on device"
        raise _Failed(f"{target}: {exc}") from exc


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
