"""The read side of an LMDB table: open, look up, notice replacement, close.

Tables built by tcpmap-build are published by rename and never written again, so
they are read lock-free with one long read transaction. Files without our build
record (made by postmap/postalias) may be rewritten in place by postmap, so
each lookup takes Postfix's shared fcntl lock around its own transaction
(lmdb_table(5), postfix-maps.md 4.4).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from .dbformat import MAX_KEY_BYTES, META_KEYS, BuildInfo, count, fold, not_a_table
from .watch import DirectoryWatch, Watcher, watch

log = logging.getLogger(__name__)

_WARM_CHUNK = 1 << 20
_RECHECK = 1.0  # seconds: stat at least this often even if the watch saw nothing
# How long a lookup waits for a new file's check before it is answered from the
# current file (the check of a 10M-key table takes about 1.3 s).
CHECK_PATIENCE = 2.0
_CHECK_POLL = 0.002


class TableError(Exception):
    """The table cannot answer: missing, unreadable, corrupt. Maps to 400."""


# Checks a newly published file (PATH, an fd open on it) before it is served;
# raises TableError. See verify.py.
Checker = Callable[[Path, int], None]


@dataclass(frozen=True, slots=True)
class Signature:
    """What identifies one version of the file at a path."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Table:
    """One open LMDB file. Use Table.open()."""

    def __init__(
        self,
        path: Path,
        env: Any,
        fd: int,
        *,
        signature: Signature,
        info: BuildInfo | None,
        folded: bool,
    ) -> None:
        self.path = path
        self.signature = signature
        self.info = info
        self.folded = folded
        self.records: int = info.records if info else env.stat()["entries"]
        self._env = env
        self._fd = fd
        # Our own files are immutable: one read transaction serves every lookup.
        self._txn = env.begin() if info else None

    @classmethod
    def open(
        cls, path: Path, *, fold_keys: bool | None = None, warm: bool = False, fd: int | None = None
    ) -> Table:
        """Open PATH read-only; raises TableError with a reason an admin can act on.

        fold_keys overrides folding; by default it comes from the build record,
        or is on for files without one (postmap's default). With FD (from
        open_file), the table takes it over, and closes it on failure too.
        """
        if fd is None:
            fd = open_file(path)
        try:
            return cls._open_fd(path, fd, fold_keys, warm)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _open_fd(cls, path: Path, fd: int, fold_keys: bool | None, warm: bool) -> Table:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TableError(f"{path} is not a regular file")
        if warm:
            _warm(fd, st.st_size)
        try:
            env = lmdb.open(
                _same_file(path, fd),
                subdir=False,
                readonly=True,
                lock=False,
                max_dbs=0,
                max_readers=1,
            )
        except lmdb.Error as exc:
            raise TableError(not_a_table(path, fd, _reason(exc))) from None
        try:
            # Postfix's rule for every read transaction (lmdb_table(5)): a shared
            # fcntl lock keeps a postmap rewriting the file in place out meanwhile.
            fcntl.lockf(fd, fcntl.LOCK_SH)
            try:
                _check_size(path, env, st.st_size)
                info = _read_info(env)
            except lmdb.Error as exc:
                raise TableError(f"{path} is corrupt: {_reason(exc)}") from None
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        except BaseException:
            env.close()
            raise
        folded = fold_keys if fold_keys is not None else (info.folded if info else True)
        return cls(path, env, fd, signature=Signature.of(st), info=info, folded=folded)

    def get(self, key: bytes) -> bytes | None:
        """The value for KEY (folded as the table was built), or None.

        Raises TableError for a stored value Postfix could not use (empty).
        """
        if self.folded:
            key = fold(key)
        if len(key) > MAX_KEY_BYTES or not key:
            return None  # longer than any key LMDB can hold
        try:
            txn = self._txn
            value: bytes | None = (
                txn.get(key + b"\x00") if txn is not None else self._get_locked(key)
            )
        except lmdb.Error as exc:
            raise TableError(f"{self.path}: lookup failed: {_reason(exc)}") from None
        if value is None:
            return None
        # Postfix copies the value up to the first NUL (vstring_strncpy).
        value = value.partition(b"\x00")[0]
        if not value:
            raise TableError(f"{self.path}: empty value stored for this key")
        return value

    def _get_locked(self, key: bytes) -> bytes | None:
        # Postfix writes key+NUL by default; postmap -n writes bare keys. Try
        # both, in Postfix's order (dict_lmdb.c).
        fcntl.lockf(self._fd, fcntl.LOCK_SH)
        try:
            with self._env.begin() as txn:
                value: bytes | None = None
                if len(key) < MAX_KEY_BYTES:
                    value = txn.get(key + b"\x00")
                if value is None:
                    value = txn.get(key)
                return value
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def walk(self, *, second_half: bool) -> bytes | None:
        """Read half the records (every page a lookup of them can reach).

        Two processes share a check this way, one half each. Returns where the
        halves meet: for the first half, the key after its last record; for the
        second, its first record's key (None past either end). The halves cover
        the table if the two agree; a record count that lies cannot hide pages.
        """
        try:
            with self._env.begin() as txn:
                entries = txn.stat()["entries"]
                count = entries // 2 if second_half else entries - entries // 2
                cursor = txn.cursor()
                records = cursor.iterprev() if second_half else cursor.iternext()
                # Each key and value is copied out; deque and zip keep the loop in C.
                last = collections.deque(zip(range(count), records, strict=False), maxlen=1)
                walked = last[0][0] + 1 if last else 0
                if walked != count:
                    raise TableError(f"{self.path} is corrupt: {entries} records claimed")
                key: bytes | None = last[0][1][0] if last else None
                if second_half:
                    return key
                moved = cursor.set_key(key) and cursor.next() if key is not None else cursor.first()
                return cursor.key() if moved else None
        except lmdb.Error as exc:
            raise TableError(f"{self.path} is corrupt: {_reason(exc)}") from None

    def describe(self) -> str:
        syntax = f"{self.info.syntax} syntax" if self.info else "built by Postfix"
        folding = "folded" if self.folded else "case-sensitive"
        return f"{self.path}: {count(self.records, 'record')} ({syntax}, {folding})"

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._env.close()
        os.close(self._fd)


def open_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TableError(f"cannot open {path}: {exc.strerror}") from None


def _same_file(path: Path, fd: int) -> str:
    """A path to the very file FD is open on: the path itself may be renamed over
    between os.open() and lmdb.open(); /proc/self/fd/N cannot be."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(path)


def _warm(fd: int, size: int) -> None:
    """Read the file once so lookups never stall the hub on a page fault."""
    buffer = bytearray(_WARM_CHUNK)
    offset = 0
    while offset < size:
        got = os.preadv(fd, [buffer], offset)
        if got <= 0:
            break
        offset += got


def _check_size(path: Path, env: Any, size: int) -> None:
    # A truncated file would map pages past its end: touching them is SIGBUS.
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if needed > size:
        raise TableError(f"{path} is truncated: {size} bytes, its pages need {needed}")


def _read_info(env: Any) -> BuildInfo | None:
    with env.begin() as txn:
        raw = next(filter(None, map(txn.get, META_KEYS)), None)  # this version's, or 0.1's
    if raw is None:
        return None
    try:
        return BuildInfo.decode(bytes(raw))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable build record in the table")
        return None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class LiveTable:
    """The table at a path, reopened whenever the file there changes.

    Every lookup first looks for a change at the path (watch.py: an inotify
    watch on the directory, a stat when it saw something), so a table published
    by rename is served from the very next lookup. While the file is
    missing or bad, lookups raise TableError; a good file is picked up by itself.
    """

    def __init__(
        self,
        path: Path,
        *,
        fold_keys: bool | None = None,
        warm: bool = True,
        check: Checker | None = None,
        watch_directory: bool = True,
        sleep: Callable[[float], object] | None = None,
        watcher: Watcher = watch,
    ) -> None:
        """SLEEP (gevent.sleep in the server) lets a lookup wait for another's check."""
        self.path = path
        self._sleep = sleep
        self._fold_keys = fold_keys
        self._warm = warm
        self._check = check
        self._refreshing = False
        self._watching = watch_directory
        self._watcher = watcher
        self._watch: DirectoryWatch | None = None
        self._checked = 0.0  # when the path was last stat-ed
        self._table: Table | None = None
        self._seen: Signature | None = None  # what we last tried to open
        self._error = f"{path} has not been opened yet"

    @property
    def table(self) -> Table | None:
        return self._table

    @property
    def error(self) -> str | None:
        return None if self._table else self._error

    def lookup(self, key: bytes) -> bytes | None:
        # Stat only when the directory's watch saw something happen, or once a
        # second anyway; and always while there is no good table.
        watch = self._watch
        if (
            watch is None
            or self._refreshing  # a new file is being checked: wait for it
            or self._table is None
            or watch.changed()
            or time.monotonic() - self._checked > _RECHECK
        ):
            self.refresh()
        if self._table is None:
            raise TableError(self._error)
        return self._table.get(key)

    def refresh(self, *, force: bool = False) -> None:
        """Reopen if the file at the path is not the one we hold (or if forced)."""
        if self._refreshing:
            # Another greenlet is checking a new file. Wait for it (cooperatively),
            # so that no lookup after a publication gets the old data; but not
            # longer than CHECK_PATIENCE: then serve the current file meanwhile,
            # and look again on the next lookup (what the watch saw is consumed).
            if self._sleep is not None:
                deadline = time.monotonic() + CHECK_PATIENCE
                while self._refreshing and time.monotonic() < deadline:
                    self._sleep(_CHECK_POLL)
            self._checked = 0.0
            return
        if self._watch is None and self._watching:
            self._watch = self._watcher(self.path.parent)
        self._checked = time.monotonic()
        try:
            st = os.stat(self.path)
        except OSError as exc:
            missing = exc.errno == errno.ENOENT
            reason = f"{self.path} is missing" if missing else f"{self.path}: {exc.strerror}"
            if self._table is not None or self._error != reason:
                self._drop(reason)
            self._seen = None
            return
        seen = self._seen
        if (  # the hot path, once per lookup: compare without building a Signature
            not force
            and seen is not None
            and st.st_ino == seen.ino
            and st.st_mtime_ns == seen.mtime_ns
            and st.st_size == seen.size
            and st.st_ctime_ns == seen.ctime_ns
            and st.st_dev == seen.dev
        ):
            return
        current = Signature.of(st)
        self._seen = current
        self._reopen(current)

    def _reopen(self, current: Signature) -> None:
        self._refreshing = True
        try:
            fd = open_file(self.path)
            try:
                if self._check is not None:
                    self._check(self.path, fd)  # may yield: the old table serves meanwhile
            except BaseException:
                os.close(fd)
                raise
            # Close the old table first. python-lmdb 3 refuses to open an inode
            # it already has open, and after a quick series of renames the file
            # now at the path may be one we hold. A lookup never yields midway,
            # so none is in flight here.
            if self._table is not None:
                self._table.close()
                self._table = None
            # A check has just read the whole file: the page cache is warm already.
            warm = self._warm and self._check is None
            new = Table.open(self.path, fold_keys=self._fold_keys, warm=warm, fd=fd)
        except TableError as exc:
            self._drop(str(exc))
            return
        finally:
            self._refreshing = False
        self._table = new
        # Record what we opened, not what we statted: if the file moved again
        # in between, the next lookup sees the difference and reopens.
        self._seen = new.signature
        log.info("opened %s", new.describe(), extra={"TABLE": str(self.path)})
        if new.info is not None and new.info.long_values:
            log.warning(
                "%s holds %s too long for a tcp_table reply (tcpmap-build --long-values): "
                "tcp_table lookups of those keys are answered 400; socketmap answers them",
                self.path,
                count(new.info.long_values, "value"),
                extra={"TABLE": str(self.path)},
            )

    def _drop(self, reason: str) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None
        if reason != self._error:
            log.warning("table unavailable: %s", reason, extra={"TABLE": str(self.path)})
        self._error = reason

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
