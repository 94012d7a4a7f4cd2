"""Check a table before it is served, in a child process that may crash.

LMDB trusts its file: a page pointer or an overflow count that leads past the
end of the file makes it read beyond the mapping, and the kernel kills the
reader with SIGBUS. A tampered or damaged table must cost a 400, not the
server. So forked children first open the file as the server would and walk
every record (every page a lookup can reach), half each; the parent opens the
file only if both come back clean and their halves meet, and otherwise reports
the reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from .table import Checker, Table, TableError

_POLL = 0.001  # seconds between looks at a child; the hub serves meanwhile
_FAILED = 3  # the child's exit status when it found a problem (reason on the pipe)
_MAX_REASON = 4000


def in_child(
    sleep: Callable[[float], object] = time.sleep, forget: Callable[[], None] = lambda: None
) -> Checker:
    """A Checker that walks the table in two forked children.

    SLEEP is how the parent waits: the server passes gevent.sleep, so lookups
    go on from the table already open while a newly published one is checked.
    FORGET runs first in the child and closes the tables inherited from the
    parent (python-lmdb refuses to open a file a second time in one process).
    """

    def check(path: Path, fd: int) -> None:
        # Two children, one half of the table each: a check takes half the time
        # on two cores (startup waits for it).
        children = [_start(path, fd, forget, second_half=half) for half in (False, True)]
        try:
            results = [_result(path, child, sleep) for child in children]
        finally:  # on failure or a stop: the other half's check dies too
            for pid, reader in children:
                os.close(reader)
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == 0:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
        if results[0] != results[1]:
            raise TableError(f"{path} is corrupt: its halves do not meet")

    return check


def _start(
    path: Path, fd: int, forget: Callable[[], None], *, second_half: bool
) -> tuple[int, int]:
    """Fork a child that walks one half of the table: (pid, read end of its pipe)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns to the caller
        os.close(reader)
        os._exit(_child(path, fd, writer, forget, second_half=second_half))
    os.close(writer)
    return pid, reader


def _result(path: Path, child: tuple[int, int], sleep: Callable[[float], object]) -> bytes:
    """What the child reported (where its half meets the other), or TableError."""
    pid, reader = child
    status = _wait(pid, sleep)
    report = os.read(reader, _MAX_REASON)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise TableError(f"{path} is corrupt: reading it crashed a check ({name})")
    if os.WEXITSTATUS(status) != 0:
        raise TableError(report.decode("utf-8", "replace") or f"{path} failed its check")
    return report


def _child(
    path: Path, fd: int, writer: int, forget: Callable[[], None], *, second_half: bool
) -> int:
    try:
        forget()
        _close_all_but(fd, writer)  # client and listening sockets belong to the server
        table = Table.open(path, fd=os.dup(fd))
        try:
            meeting = table.walk(second_half=second_half)
        finally:
            table.close()
        os.write(writer, b"-" if meeting is None else b"=" + meeting)  # keys are < 512 bytes
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
