"""The read side of an LMDB table: open, look up, notice replacement, close.

Every table is served from a private sealed snapshot of its file (snapshot.py),
checked before it is mapped (verify.py): nothing a writer, cp, truncate or a
damaged disk does to the file can touch what a lookup reads. A snapshot never
changes, so one read transaction serves every lookup, without a lock.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

from .dbformat import (
    MAX_KEY_BYTES,
    META_KEYS,
    BuildInfo,
    Folding,
    FoldKeys,
    count,
    fold,
    fold_ascii,
)
from .snapshot import Locked, Signature, Snapshot, SnapshotRetry, TableError, Taker, take
from .watch import DirectoryWatch, Watcher, watch

__all__ = ["CHECK_PATIENCE", "LiveTable", "Signature", "Table", "TableError"]

log = logging.getLogger(__name__)

_RECHECK = 1.0  # seconds: stat at least this often even if the watch saw nothing
# How long a lookup waits for a new file's check before it is answered from the
# current file (the check of a 10M-key table takes about 3 s).
CHECK_PATIENCE = 2.0
_CHECK_POLL = 0.002
# A snapshot that failed for a reason other than the file (SnapshotRetry) is
# taken again after RETRY_FIRST seconds, doubling up to RETRY_MAX.
RETRY_FIRST = 0.1
RETRY_MAX = 10.0
# A new version that a writer keeps locked (Locked) is tried again after
# LOCK_RETRY_FIRST seconds, doubling up to LOCK_RETRY_MAX: once the writer lets
# go, its change is served within about a second. A writer that holds the lock
# for LOCK_WARN_AFTER seconds gets one warning.
LOCK_RETRY_FIRST = 0.05
LOCK_RETRY_MAX = 1.0
LOCK_WARN_AFTER = 2.0


class Table:
    """One open snapshot of a table file. Use Table.open()."""

    def __init__(
        self,
        path: Path,
        env: Any,
        snapshot: Snapshot,
        *,
        info: BuildInfo | None,
        folding: Folding,
    ) -> None:
        self.path = path
        self.signature = snapshot.signature
        self.info = info
        self.folding: Folding = folding
        self.unfolded = snapshot.unfolded  # the key that showed ASCII-only folding
        self._fold = _FOLDERS[folding]
        # The records a lookup can find: the check's count, less our build record.
        self.records = snapshot.records - (info is not None)
        self._env = env
        self._fd = snapshot.fd
        self._txn: Any = env.begin()  # a snapshot never changes: one transaction serves all

    @classmethod
    def open(cls, path: Path, *, fold_keys: FoldKeys = None, take: Taker = take) -> Table:
        """Snapshot PATH, check it and open it; raises TableError with a reason an
        admin can act on, or SnapshotRetry (snapshot.py) when it may work later.

        fold_keys overrides folding; by default it comes from the build record,
        or is on for files without one (postmap's default). How keys are folded
        follows the keys themselves (Table.folding_of), unless fold_keys is
        "ascii" (Postfix with smtputf8_enable = no, whatever the keys show).
        """
        return cls.from_snapshot(path, take(path), fold_keys=fold_keys)

    @classmethod
    def from_snapshot(cls, path: Path, snapshot: Snapshot, *, fold_keys: FoldKeys = None) -> Table:
        """Open SNAPSHOT (checked and sealed) of PATH; it is closed on failure too."""
        try:
            try:
                env = lmdb.open(
                    f"/proc/self/fd/{snapshot.fd}",
                    subdir=False,
                    readonly=True,
                    lock=False,
                    max_dbs=0,
                    max_readers=1,
                )
            except lmdb.Error as exc:
                # The bytes passed the check: what failed is the open (fds, memory).
                raise SnapshotRetry(f"cannot open {path}: {_reason(exc)}") from None
            try:
                info = _read_info(env)
            except BaseException:
                env.close()
                raise
        except BaseException:
            os.close(snapshot.fd)
            raise
        folding: Folding
        if fold_keys == "ascii":
            folding = "ascii"
        elif fold_keys if fold_keys is not None else (info.folded if info else True):
            folding = cls.folding_of(snapshot)
        else:
            folding = "none"
        return cls(path, env, snapshot, info=info, folding=folding)

    @staticmethod
    def folding_of(snapshot: Snapshot) -> Folding:
        """How to fold lookups in a folded table: as its keys were folded.

        Postfix folds keys alike when it stores and when it looks up, but two
        ways (dbformat.Folding): UTF-8 case folding with smtputf8_enable = yes
        (postmap's default, and tcpmap-build's), ASCII only with = no. A key
        that UTF-8 folding would change (snapshot.unfolded: "Ünïcode", "ß", not
        UTF-8) can only have been stored by the second: lookups then fold ASCII
        only too, as Postfix's lmdb: client with that setting does. A table
        without such a key is searched with UTF-8 folding. For a table that
        smtputf8_enable = no built from keys UTF-8 folding leaves alone, the
        two differ only for lookup keys with non-ASCII capitals ("Ü" finds
        "ü"), which Postfix with = no would not find: --fold-ascii says so.
        """
        return "ascii" if snapshot.unfolded is not None else "utf8"

    @property
    def folded(self) -> bool:
        return self.folding != "none"

    def get(self, key: bytes) -> bytes | None:
        """The value for KEY (folded as the table's keys are: folding), or None.

        Raises TableError for a stored value Postfix could not use (empty).
        """
        if self._fold is not None:
            key = self._fold(key)
        if len(key) > MAX_KEY_BYTES or not key:
            return None  # longer than any key LMDB can hold
        try:
            txn = self._txn
            if self.info is not None:
                value: bytes | None = txn.get(key + b"\x00")
            else:
                # Postfix writes key+NUL by default; postmap -n writes bare keys.
                # Try both, in Postfix's order (dict_lmdb.c).
                value = txn.get(key + b"\x00") if len(key) < MAX_KEY_BYTES else None
                if value is None:
                    value = txn.get(key)
        except lmdb.Error as exc:
            raise TableError(f"{self.path}: lookup failed: {_reason(exc)}") from None
        if value is None:
            return None
        # Postfix copies the value up to the first NUL (vstring_strncpy).
        value = value.partition(b"\x00")[0]
        if not value:
            raise TableError(f"{self.path}: empty value stored for this key")
        return value

    def describe(self) -> str:
        syntax = f"{self.info.syntax} syntax" if self.info else "built by Postfix"
        folding = _FOLDINGS[self.folding]
        return f"{self.path}: {count(self.records, 'record')} ({syntax}, {folding})"

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._env.close()
        os.close(self._fd)


_FOLDERS: dict[Folding, Callable[[bytes], bytes] | None] = {
    "utf8": fold,
    "ascii": fold_ascii,
    "none": None,
}
_FOLDINGS: dict[Folding, str] = {
    "utf8": "folded",
    "ascii": "folded ASCII only",
    "none": "case-sensitive",
}


def _read_info(env: Any) -> BuildInfo | None:
    with env.begin() as txn:
        # This version's record, or 0.1's; typed for Debian 12's mypyc, which infers None.
        raw: bytes | None = next(filter(None, map(txn.get, META_KEYS)), None)
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
    by rename, or changed in place, is served from the very next lookup. While
    the file is missing or bad, lookups raise TableError; a good file is picked
    up by itself. A snapshot that failed for another reason (SnapshotRetry:
    descriptors, memory, a killed check) is taken again with back-off, and the
    table served before stays served meanwhile. So is a new version a writer
    keeps locked (Locked): no lookup waits for a writer.
    """

    def __init__(
        self,
        path: Path,
        *,
        fold_keys: FoldKeys = None,
        take: Taker = take,
        watch_directory: bool = True,
        sleep: Callable[[float], object] | None = None,
        watcher: Watcher = watch,
    ) -> None:
        """TAKE makes a snapshot (snapshot.in_child in the server); SLEEP
        (gevent.sleep there) lets a lookup wait for another's snapshot."""
        self.path = path
        self._sleep = sleep
        self._fold_keys = fold_keys
        self._take = take
        self._refreshing = False
        self._watching = watch_directory
        self._watcher = watcher
        self._watch: DirectoryWatch | None = None
        self._watched: tuple[int, int] | None = None  # (st_dev, st_ino) of its directory
        self._checked = 0.0  # when the path was last stat-ed
        self._table: Table | None = None
        self._seen: Signature | None = None  # what we last opened or found bad
        self._retry_at: float | None = None  # when to take a failed snapshot again
        self._backoff = RETRY_FIRST
        self._locked_since: float | None = None  # when a writer's lock first stopped us
        self._lock_backoff = LOCK_RETRY_FIRST
        self._lock_warned = False
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
            or (self._retry_at is not None and time.monotonic() >= self._retry_at)
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
        if self._watching:
            self._watch_directory()
        now = self._checked = time.monotonic()
        try:
            st = os.stat(self.path)
        except OSError as exc:
            missing = exc.errno == errno.ENOENT
            reason = f"{self.path} is missing" if missing else f"{self.path}: {exc.strerror}"
            if self._table is not None or self._error != reason:
                self._drop(reason)
            self._seen = None
            self._retry_at = None
            return
        seen = self._seen
        if (  # compare without building a Signature
            not force
            and seen is not None
            and st.st_ino == seen.ino
            and st.st_mtime_ns == seen.mtime_ns
            and st.st_size == seen.size
            and st.st_ctime_ns == seen.ctime_ns
            and st.st_dev == seen.dev
            and (self._retry_at is None or now < self._retry_at)
        ):
            return
        self._reopen(Signature.of(st))

    def _watch_directory(self) -> None:
        """Watch the directory the path is in now. One replaced (a symlink on the way
        flipped to another directory, or a directory renamed into its place) is
        another inode, of which the old watch sees nothing: watch that one instead.
        The directory is stat-ed before it is watched, so a replacement in between
        is seen by the next refresh (within a second) and watched then. Without
        inotify (no watch could be made) every lookup stats the path anyway, and
        there is nothing to re-arm."""
        if self._watched is not None and self._watch is None:
            return
        try:
            st = os.stat(self.path.parent)
        except OSError:
            return  # no directory: the path's own stat says so
        identity = (st.st_dev, st.st_ino)
        if identity == self._watched:
            return
        if self._watch is not None:
            self._watch.close()
        self._watch = self._watcher(self.path.parent)
        self._watched = identity

    def _reopen(self, current: Signature) -> None:
        self._refreshing = True
        try:
            new = Table.from_snapshot(
                self.path, self._take(self.path), fold_keys=self._fold_keys
            )  # may yield: the old table serves meanwhile
        except Locked as exc:
            self._wait_for_writer(current, str(exc))
            return
        except (SnapshotRetry, OSError) as exc:
            self._lock_released()
            self._postpone(current, str(exc))
            return
        except TableError as trouble:  # not exc: mypyc gives a name one type per function
            # The file is bad: it is retried once it changes.
            self._lock_released()
            self._seen = current
            self._retry_at = None
            self._backoff = RETRY_FIRST
            self._drop(str(trouble))
            return
        finally:
            self._refreshing = False
        self._lock_released()
        if self._table is not None:
            self._table.close()  # a lookup never yields midway: none is in flight
        self._table = new
        # Record what we copied, not what we statted: if the file moved again
        # in between, the next lookup sees the difference and reopens. It must
        # look: a copy begun before the directory was watched (server_cli's early
        # check) may predate a publication no watch event tells of.
        self._seen = new.signature
        if new.signature != current:
            self._checked = 0.0
        self._retry_at = None
        self._backoff = RETRY_FIRST
        log.info("opened %s", new.describe(), extra={"TABLE": str(self.path)})
        if new.folding == "ascii" and new.unfolded is not None:
            log.info(
                "%s: keys are folded ASCII only, as Postfix does with smtputf8_enable = no "
                "(key %r is not as UTF-8 case folding leaves it): lookups are folded the same way",
                self.path,
                new.unfolded.removesuffix(b"\x00").decode("utf-8", "backslashreplace"),
                extra={"TABLE": str(self.path)},
            )
        if new.info is not None and new.info.long_values:
            log.warning(
                "%s holds %s too long for a tcp_table reply (tcpmap-build --long-values): "
                "tcp_table lookups of those keys are answered 400; socketmap answers them",
                self.path,
                count(new.info.long_values, "value"),
                extra={"TABLE": str(self.path)},
            )

    def _wait_for_writer(self, current: Signature, reason: str) -> None:
        """A writer holds the lock: try again soon, keep serving what we have, and
        warn once if the writer keeps the lock for LOCK_WARN_AFTER seconds."""
        now = time.monotonic()
        if self._locked_since is None:
            self._locked_since = now
        self._seen = current
        self._retry_at = now + self._lock_backoff
        self._lock_backoff = min(self._lock_backoff * 2, LOCK_RETRY_MAX)
        waited = now - self._locked_since
        if waited >= LOCK_WARN_AFTER and not self._lock_warned:
            self._lock_warned = True
            serving = (
                "serving the version from before until it lets go"
                if self._table is not None
                else "its lookups fail until it lets go"
            )
            log.warning(
                "%s: a writer has held its lock for %.1fs; %s",
                self.path,
                waited,
                serving,
                extra={"TABLE": str(self.path)},
            )
        if self._table is None:
            self._error = f"{reason} (retrying)"

    def _lock_released(self) -> None:
        """The end of a wait for a writer, if there was one."""
        if self._locked_since is None:
            return
        if self._lock_warned:
            log.info(
                "%s: the writer let go of its lock after %.1fs",
                self.path,
                time.monotonic() - self._locked_since,
                extra={"TABLE": str(self.path)},
            )
        self._locked_since = None
        self._lock_backoff = LOCK_RETRY_FIRST
        self._lock_warned = False

    def _postpone(self, current: Signature, reason: str) -> None:
        """Take the snapshot again after a back-off; keep serving what we have."""
        self._seen = current
        self._retry_at = time.monotonic() + self._backoff
        log.warning(
            "cannot open %s yet, retrying in %.1fs: %s",
            self.path,
            self._backoff,
            reason,
            extra={"TABLE": str(self.path)},
        )
        self._backoff = min(self._backoff * 2, RETRY_MAX)
        if self._table is None:
            self._error = f"{reason} (retrying)"

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
        self._watched = None
