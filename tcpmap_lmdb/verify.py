"""Check a table before it is served, in a child process that may crash.

LMDB trusts its file: a page pointer or an overflow count that leads past the
end of the file makes it read beyond the mapping, and the kernel kills the
reader with SIGBUS. A tampered or damaged table must cost a 400, not the
server. So a forked child first opens the file as the server would and walks
every record (every page a lookup can reach); the parent opens the file only
if the child comes back clean, and otherwise reports the child's reason.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from .table import Checker, Table, TableError

_POLL = 0.005  # seconds between looks at the child; the hub serves meanwhile
_FAILED = 3  # the child's exit status when it found a problem (reason on the pipe)
_MAX_REASON = 4000


def in_child(
    sleep: Callable[[float], object] = time.sleep, forget: Callable[[], None] = lambda: None
) -> Checker:
    """A Checker that walks the table in a forked child.

    SLEEP is how the parent waits: the server passes gevent.sleep, so lookups
    go on from the table already open while a newly published one is checked.
    FORGET runs first in the child and closes the tables inherited from the
    parent (python-lmdb refuses to open a file a second time in one process).
    """

    def check(path: Path, fd: int) -> None:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns to the caller
            os.close(reader)
            os._exit(_child(path, fd, writer, forget))
        os.close(writer)
        try:
            status = _wait(pid, sleep)
            reason = os.read(reader, _MAX_REASON).decode("utf-8", "replace")
        except BaseException:  # the server is stopping: the check dies with it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        finally:
            os.close(reader)
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            raise TableError(f"{path} is corrupt: reading it crashed a check ({name})")
        if os.WEXITSTATUS(status) != 0:
            raise TableError(reason or f"{path} failed its check")

    return check


def _child(path: Path, fd: int, writer: int, forget: Callable[[], None]) -> int:
    try:
        forget()
        _close_all_but(fd, writer)  # client and listening sockets belong to the server
        table = Table.open(path, fd=os.dup(fd))
        try:
            table.walk()
        finally:
            table.close()
        return 0
    except TableError as exc:
        os.write(writer, str(exc).encode("utf-8")[:_MAX_REASON])
    except Exception as exc:  # any failure means: do not serve this file
        os.write(writer, f"{path} failed its check: {exc}".encode()[:_MAX_REASON])
    return _FAILED


def _close_all_but(*keep: int) -> None:
    """Close every descriptor but KEEP; stdin, stdout and stderr go to /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    low = 3
    for fd in sorted({*keep, null}):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    os.close(null)


def _wait(pid: int, sleep: Callable[[float], object]) -> int:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        sleep(_POLL)
