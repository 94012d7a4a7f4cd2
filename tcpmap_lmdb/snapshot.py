"""A private, sealed, checked copy of a table file: what the server maps.

An LMDB file mapped by the server can be shrunk or rewritten under the mapping
by anyone with write access (cp, truncate, rsync --inplace, postmap -i/-d, a
writer growing it): a shrink is SIGBUS before any inotify event arrives, and a
rewrite changes pages a lookup is reading. So the server maps a copy instead:
a memfd (memfd_create(2)) that holds the file's bytes, sealed with
F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL before it is checked
(verify.py) and served. Nobody, the server included, can change a sealed
memfd: what was checked is what is read. Each memfd is its own inode, so
python-lmdb 3.x's "already open in this process" check (by inode) never
meets the same file twice, whatever links point at it.

The copy is taken under Postfix's shared fcntl lock (lmdb_table(5)), so a
writer that follows the rules (postmap, postalias) is never seen halfway. The
server's check never waits for that lock (in_child): while a writer holds it
exclusively, the check gives up at once (Locked), the server keeps serving the
copy it has and tries again later (table.LiveTable).
Postfix's bulk writers (postmap, postmap -i) hold only a shared lock, and a
writer that takes none (cp, rsync --inplace) may be seen halfway: a copy during
which the size changed, or the mtime and the newest commit (mm_txnid) changed,
is thrown away and taken again.

take() does all of this in the calling process. in_child() does it in a
forked child, so that nothing that can block (opening a FIFO, waiting for a
writer's lock, reading a stalled disk, checking a big file) runs on the
server's event loop; the child is killed after a time that grows with the file
size, and dies with the server (PR_SET_PDEATHSIG).

Errors: TableError when the file itself is bad (missing, not a regular file,
unreadable, not LMDB, corrupt): retried when it changes. SnapshotRetry when
the attempt failed for another reason (descriptors or memory ran out, the
child was killed, the file changed while copied): retried with back-off.
Locked, a SnapshotRetry, when a writer held the lock (in_child only).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import verify
from .dbformat import not_a_table

MFD_NOEXEC_SEAL = 0x0008  # <linux/memfd.h>, Linux 6.3: never mappable PROT_EXEC
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_COPY_CHUNK = 1 << 30
_COPY_ATTEMPTS = 5  # copies that raced a writer before giving up (SnapshotRetry)
# The child's time: a floor, plus the copy and the check at a pessimistic
# 20 MB/s (measured: about 200 MB/s for the check, 1 GB/s for the copy).
TIME_FLOOR = 30.0
TIME_PER_BYTE = 1 / 20e6
_MAX_REPORT = 8192
# The longest a finished check waits to be noticed: part of every cold start
# (0.05 s cost a 1M-key table's cold start 25 ms on average).
_POLL_MAX = 0.005
# mdb.c MDB_meta, after the 16-byte page header: mm_psize (the free DB's md_pad)
# at 40, mm_txnid at 144 to 152.
_PSIZE, _TXNID, _META_END = 40, 144, 152


class TableError(Exception):
    """The table cannot answer: missing, unreadable, corrupt. Maps to 400."""


class SnapshotRetry(TableError):
    """Taking the snapshot failed for a reason other than the file: try again later."""


class Locked(SnapshotRetry):
    """A writer holds the file's fcntl lock (lmdb_table(5)): try again later."""


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


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


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A sealed memfd (FD, owned by the holder) with the checked bytes of the file."""

    fd: int
    signature: Signature  # of the file copied
    records: int  # leaf records found by the check
    # A stored key that shows the keys were folded ASCII only (verify.Checked), or None.
    unfolded: bytes | None = None


Taker = Callable[[Path], Snapshot]


def new_memfd(path: Path) -> int:
    """An empty memfd that may be sealed, named after PATH (visible in /proc/PID/maps)."""
    name = f"tcpmap:{path.name}"
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        return os.memfd_create(name, flags | MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # before Linux 6.3: no MFD_NOEXEC_SEAL
            raise
    return os.memfd_create(name, flags)


def take(path: Path, *, wait: bool = True) -> Snapshot:
    """Copy PATH into a new sealed memfd and check it, here; may block.

    WAIT: wait for a writer's lock, as Postfix's readers do; without it, a held
    lock raises Locked at once.
    """
    try:
        memfd = new_memfd(path)
    except OSError as exc:
        raise SnapshotRetry(f"cannot copy {path}: memfd_create: {exc.strerror}") from None
    try:
        signature, checked = _fill(path, memfd, wait=wait)
    except BaseException:
        os.close(memfd)
        raise
    return Snapshot(memfd, signature, checked.records, checked.unfolded)


def _fill(path: Path, memfd: int, *, wait: bool) -> tuple[Signature, verify.Checked]:
    """Copy PATH into MEMFD under the shared lock, seal it, check it."""
    for _ in range(_COPY_ATTEMPTS):
        signature = _copy(path, memfd, wait=wait)
        if signature is not None:
            break
        os.ftruncate(memfd, 0)
    else:
        raise SnapshotRetry(f"{path} kept changing while it was copied")
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, SEALS)
    size = signature.size
    if size == 0:
        raise TableError(not_a_table(path, b""))
    with mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ) as view:
        try:
            checked = verify.check(path, view, size)
        except verify.Corrupt as exc:
            raise TableError(str(exc)) from None
    return signature, checked


def _copy(path: Path, memfd: int, *, wait: bool) -> Signature | None:
    """Copy PATH into MEMFD; its Signature, or None if it changed meanwhile.

    Raises Locked if a writer holds the lock and not WAIT.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise TableError(f"{path} is missing") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP, errno.ENXIO):
            raise TableError(f"cannot open {path}: {exc.strerror}") from None
        raise SnapshotRetry(f"cannot open {path}: {exc.strerror}") from None
    try:
        os.lseek(memfd, 0, os.SEEK_SET)  # the memfd may be shared with a parent
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise TableError(f"{path} is not a regular file: it is {kind}")
        # Postfix's rule for readers (lmdb_table(5)): a shared fcntl lock keeps
        # postmap's in-place writes out while we read.
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH if wait else fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):  # fcntl(2): held by another
                raise
            raise Locked(f"{path} is locked by a writer") from None
        before = Signature.of(os.fstat(fd))
        # A file that is no table is refused from its meta pages, not copied whole
        # first: the copy is memory (a sparse file of zeros asked for all of it).
        try:
            verify.check_head(path, os.pread(fd, verify.HEAD_BYTES, 0), before.size)
        except verify.Corrupt as exc:
            # Postfix's writers hold only a shared lock: a commit that landed since the
            # stat (a newer meta page, pages past the size seen) is a new version, to
            # be copied again, not a bad file.
            if Signature.of(os.fstat(fd)) != before:
                return None
            raise TableError(str(exc)) from None
        if not _copy_data(fd, memfd, before.size):
            return None  # shrunk under us
        after = os.fstat(fd)
        if after.st_size != before.size:
            return None
        # An LMDB writer never touches the pages of the last commit; it only
        # reuses pages freed before it (mdb_page_alloc). A Postfix bulk writer
        # (postmap, postmap -i) holds only a shared lock while it writes, so
        # the copy may see its uncommitted pages, never a page of the tree the
        # copied meta page points to: the copy is sound unless a commit landed
        # meanwhile. A writer that knows nothing of LMDB (rsync --inplace)
        # moves the mtime (ctime also moves with link(2), chmod(2)).
        if after.st_mtime_ns != before.mtime_ns and _txnid(fd) != _txnid(memfd):
            return None
        return before
    finally:
        os.close(fd)  # releases the lock too


def _copy_data(fd: int, memfd: int, size: int) -> bool:
    """Copy the first SIZE bytes of FD into MEMFD, its holes left holes; False if
    FD ended before."""
    for start, end in _extents(fd, size):
        os.lseek(memfd, start, os.SEEK_SET)
        copied = start
        while copied < end:
            sent = os.sendfile(memfd, fd, copied, min(end - copied, _COPY_CHUNK))
            if sent == 0:
                return False
            copied += sent
    os.ftruncate(memfd, size)  # a hole at the end stays one
    return True


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of FD's first SIZE bytes that hold data, holes
    left out (lseek(2) SEEK_DATA, SEEK_HOLE): copied into a memfd, a hole would be
    memory. A file system without holes gives one range, the whole file."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from OFFSET on
                break
            return [(0, size)]  # no SEEK_DATA here: all of it
        if start >= size:
            break
        extents.append((start, end))
        offset = end
    return extents


def _txnid(fd: int) -> int | None:
    """The newest mm_txnid of the two meta pages of the LMDB file FD (None if unreadable)."""
    first = os.pread(fd, _META_END, 0)
    if len(first) < _META_END:
        return None
    psize = int.from_bytes(first[_PSIZE : _PSIZE + 4], "little")
    second = os.pread(fd, _META_END, psize)
    if len(second) < _META_END:
        return None
    return max(int.from_bytes(meta[_TXNID:_META_END], "little") for meta in (first, second))


# --- in a child process -------------------------------------------------------------


def in_child(
    sleep: Callable[[float], object] = time.sleep, started: dict[Path, Check] | None = None
) -> Taker:
    """A Taker that runs take() in a forked child; SLEEP is how the parent waits.

    The server passes gevent.sleep: lookups go on meanwhile. The memfd is made
    here and inherited, so the child's copy is the parent's; the parent serves
    it only once the child reports it checked and the seals are in place. The
    child never waits for a writer's lock: it raises Locked instead. A check
    already STARTED for a path (start_check) is taken from there, once.
    """
    early = started if started is not None else {}

    def take_in_child(path: Path) -> Snapshot:
        return (early.pop(path, None) or start_check(path)).result(sleep)

    return take_in_child


@dataclass(frozen=True, slots=True)
class Check:
    """A child checking PATH into MEMFD (start_check); its Snapshot from result()."""

    path: Path
    memfd: int  # ours; the child fills and seals it
    pid: int
    reader: int  # the pipe its report comes through
    started: float  # time.monotonic()
    limit: float  # seconds it may take, from STARTED: then it is killed

    def result(self, sleep: Callable[[float], object]) -> Snapshot:
        """Wait for the child (SLEEP between looks); its Snapshot, or the error it
        found (TableError, SnapshotRetry, Locked). The memfd is the Snapshot's, or closed."""
        path, memfd = self.path, self.memfd
        try:
            report = self._report(sleep)
            if "bad" in report:
                raise TableError(str(report["bad"]))
            if "locked" in report:
                raise Locked(str(report["locked"]))
            if "retry" in report:
                raise SnapshotRetry(str(report["retry"]))
            seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
            signature = Signature(*report["signature"])
            if seals & SEALS != SEALS or os.fstat(memfd).st_size != signature.size:
                raise SnapshotRetry(f"the check of {path} left no sealed copy")
            unfolded = report.get("unfolded")
            return Snapshot(
                memfd,
                signature,
                int(report["records"]),
                bytes.fromhex(unfolded) if isinstance(unfolded, str) else None,
            )
        except BaseException:
            os.close(memfd)
            raise

    def cancel(self) -> None:
        """Kill the child if it still runs; its memfd is closed."""
        self._end()
        os.close(self.memfd)

    def _report(self, sleep: Callable[[float], object]) -> dict[str, Any]:
        """The child's report, once it has exited; or SnapshotRetry."""
        path, pid = self.path, self.pid
        try:
            status = _wait(pid, sleep, self.started + self.limit)
            # Only from a child that has exited: its end of the pipe is closed, no wait.
            raw = os.read(self.reader, _MAX_REPORT) if status is not None else b""
        finally:
            self._end()
        if status is None:
            raise SnapshotRetry(f"the check of {path} took longer than {self.limit:.0f}s")
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            raise SnapshotRetry(f"the check of {path} was killed ({name})")
        try:
            report = json.loads(raw)
            assert isinstance(report, dict)
        except (ValueError, AssertionError):
            raise SnapshotRetry(f"the check of {path} failed (exit status {status})") from None
        return report

    def _end(self) -> None:
        """Close the pipe; kill the child if it still runs (stopped, or past its
        deadline), and reap it."""
        os.close(self.reader)
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)


def cancel_all(checks: dict[Path, Check]) -> None:
    """Cancel the checks left in CHECKS (those in_child did not take), and forget them."""
    while checks:
        checks.popitem()[1].cancel()


def start_check(path: Path) -> Check:
    """Fork a child that copies PATH into a new sealed memfd and checks it (take());
    raises SnapshotRetry if it cannot. Nothing here waits: see Check.result()."""
    try:
        limit = TIME_FLOOR + os.stat(path).st_size * TIME_PER_BYTE
    except OSError:
        limit = TIME_FLOOR
    try:
        memfd = new_memfd(path)
    except OSError as exc:
        raise SnapshotRetry(f"cannot check {path}: memfd_create: {exc.strerror}") from None
    try:
        reader, writer = os.pipe()
    except OSError as exc:
        os.close(memfd)
        raise SnapshotRetry(f"cannot check {path}: pipe: {exc.strerror}") from None
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in (memfd, reader, writer):
            os.close(fd)
        raise SnapshotRetry(f"cannot check {path}: fork: {exc.strerror}") from None
    if pid == 0:  # the child: never returns to the caller
        os._exit(_child(path, memfd, writer, parent))
    os.close(writer)
    return Check(path, memfd, pid, reader, time.monotonic(), limit)


def _child(path: Path, memfd: int, writer: int, parent: int) -> int:
    try:
        _die_with(parent)
        _close_all_but(memfd, writer)  # client and listening sockets belong to the server
        signature, checked = _fill(path, memfd, wait=False)
        unfolded = None if checked.unfolded is None else checked.unfolded[:1024].hex()
        report: dict[str, object] = {
            "signature": list(_fields(signature)),
            "records": checked.records,
            "unfolded": unfolded,
        }
    except Locked as exc:  # before its base classes
        report = {"locked": str(exc)}
    except SnapshotRetry as exc:  # before TableError, its base class
        report = {"retry": str(exc)}
    except TableError as exc:
        report = {"bad": str(exc)}
    except OSError as exc:  # descriptors, memory: try again later
        report = {"retry": f"cannot check {path}: {exc.strerror or exc}"}
    except Exception as exc:  # anything else: do not serve this copy
        report = {"retry": f"cannot check {path}: {exc!r}"}
    try:
        os.write(writer, json.dumps(report).encode()[:_MAX_REPORT])
    except OSError:
        return 1
    return 0


def _fields(signature: Signature) -> tuple[int, ...]:
    return (
        signature.dev,
        signature.ino,
        signature.size,
        signature.mtime_ns,
        signature.ctime_ns,
    )


def _die_with(parent: int) -> None:
    """SIGKILL this process when the server exits, however it exits (prctl(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


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


def _wait(pid: int, sleep: Callable[[float], object], deadline: float) -> int | None:
    """The child's exit status, or None if it still runs at DEADLINE (time.monotonic())."""
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        sleep(pause)
        pause = min(pause * 2, _POLL_MAX)
