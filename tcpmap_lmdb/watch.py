"""Cheap change detection for a table's path: inotify on its directory.

Stat-ing the path before every lookup is exact but costs a path walk and a
stat_result each time (about a fifth of the server's time per lookup under
load). The kernel queues an inotify event before rename(2), unlink(2),
chmod(2) or a write returns, so one poll(2) with a zero timeout answers "did
anything happen in that directory since the last look?" just as exactly, for
a fifth of the price. The caller stats only then, and at least once a second
anyway (a directory renamed away or replaced is not seen by its watch).

Under an event loop even that poll(2) is too dear: the server lets its loop
drain the watch (``drive``), and ``changed`` then only reads a flag.
"""

from __future__ import annotations

import ctypes
import os
import select
from collections.abc import Callable
from pathlib import Path

# <sys/inotify.h>
_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENTS = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc  # noqa: PLW0603 - one handle on the C library for the process
    if _libc is None:
        # The process's own symbols, libc's among them. find_library("c") would
        # run ldconfig -p: a fork and exec on every server start.
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


class DirectoryWatch:
    """Tells whether anything happened in a directory since the last call."""

    __slots__ = ("_changed", "_fd", "_poll", "_stop")

    def __init__(self, directory: Path) -> None:
        libc = _load_libc()
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        if libc.inotify_add_watch(fd, os.fsencode(directory), _EVENTS) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self._fd: int = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._changed: bool | None = None  # set: an event loop drains the watch
        self._stop: Callable[[], None] | None = None

    def fileno(self) -> int:
        return self._fd

    def drive(self, stop: Callable[[], None]) -> None:
        """An event loop calls drain() whenever fileno() is readable; STOP ends that."""
        self._changed = True  # whatever happened before the loop watched
        self._stop = stop

    def drain(self) -> None:
        """Consume the queued events (the event loop's callback)."""
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        if self._changed is not None:
            self._changed = True

    def changed(self) -> bool:
        """True if events arrived since the last call (they are consumed)."""
        if self._changed is not None:
            changed, self._changed = self._changed, False
            return changed
        if not self._poll.poll(0):
            return False
        self.drain()
        return True

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
        os.close(self._fd)


Watcher = Callable[[Path], DirectoryWatch | None]


def watch(directory: Path) -> DirectoryWatch | None:
    """A watch on DIRECTORY, or None where inotify is not available (then stat each time)."""
    try:
        return DirectoryWatch(directory)
    except (OSError, AttributeError):
        return None
