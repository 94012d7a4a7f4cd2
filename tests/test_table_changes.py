"""Tables that change under a running server (issue 11): no crash, no false 400, no stall.

Each test runs the real server in a subprocess and changes its table the way admins and
Postfix's own tools do: cp over it in place, postmap -i/-d, a writer that grows it under
Postfix's exclusive fcntl lock or holds that lock for seconds, a FIFO renamed onto it,
links to it in --maps, descriptors running out, a check child killed, a SIGHUP racing a
new map, the server killed mid-check. Load is paced (about 1,000 lookups/s) and bounded.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from activation import NotifySocket
from conftest import (
    REPLY_TIMEOUT,
    Conn,
    ServerProcess,
    SocketmapConn,
    StartServer,
    make_table,
)
from postfix_tools import run_postfix
from test_faults import CheckerChild, big_tables  # noqa: F401 - a fixture

RATE = 1000.0  # lookups per second, per paced client
LOAD_SECONDS = 20.0  # no paced client runs longer, whatever happens


def eventually(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll CONDITION until it holds; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.01)


def _answers(conn: Conn, key: str, value: str) -> bool:
    return conn.ask(key) == (200, value.encode())


class Paced:
    """A client thread asking KEYS in turn at RATE lookups/s until stopped (LOAD_SECONDS at
    most); every reply (key, code, text) is kept. A context manager."""

    def __init__(self, port: int, keys: list[str], rate: float = RATE) -> None:
        self.port, self.keys, self.rate = port, keys, rate
        self.replies: list[tuple[str, int, bytes]] = []
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        started = time.monotonic()
        try:
            with Conn(self.port) as conn:
                for step in range(int(self.rate * LOAD_SECONDS)):
                    if self._stop.is_set():
                        return
                    key = self.keys[step % len(self.keys)]
                    code, text = conn.ask(key)
                    self.replies.append((key, code, text))
                    pause = started + (step + 1) / self.rate - time.monotonic()
                    if pause > 0:
                        self._stop.wait(pause)
        except BaseException as exc:
            self.failure = exc

    def codes(self) -> Counter[int]:
        return Counter(code for _, code, _ in self.replies)

    def __enter__(self) -> Paced:
        self._thread.start()
        eventually(lambda: len(self.replies) >= 10 or self.failure is not None, what="load")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(LOAD_SECONDS + 5)
        assert not self._thread.is_alive()


# --- 1. copied over in place ------------------------------------------------------------------


def test_cp_over_a_served_table_at_1000_lookups_a_second(
    server: StartServer, tmp_path: Path
) -> None:
    """`cp` (and truncate, `>`) onto the served file, 20 rounds, under 1,000 lookups/s: no
    crash; every reply is the old value, the new value or 400; each round's data is served
    once its copy is complete."""
    filler = {f"filler{i:06d}": "f" * 100 for i in range(20_000)}  # a 3 MB file: cp takes a while
    keys = [f"key{i:02d}" for i in range(50)]
    for version in ("old", "new"):
        make_table(tmp_path / f"{version}.lmdb", {**filler, **{k: f"{version}-{k}" for k in keys}})
    db = tmp_path / "virtual.lmdb"
    shutil.copyfile(tmp_path / "old.lmdb", db)
    srv = server(db)
    with Paced(srv.port, keys) as load, srv.connect() as probe:
        for round_ in range(20):
            version = "new" if round_ % 2 == 0 else "old"
            if round_ % 5 == 4:
                os.truncate(db, 0)  # what `> file` does before a copy
            subprocess.run(
                ["cp", str(tmp_path / f"{version}.lmdb"), str(db)], check=True, timeout=30
            )
            eventually(functools.partial(_answers, probe, "key07", f"{version}-key07"))
    assert load.failure is None, load.failure
    for key, code, text in load.replies:
        assert (code, text) in ((200, f"old-{key}".encode()), (200, f"new-{key}".encode())) or (
            code == 400 and str(db).encode() in text
        ), (key, code, text)
    assert load.codes()[200], load.codes()
    assert srv.proc.poll() is None


# --- 2. edited in place by postmap -i / -d -------------------------------------------------------


def test_postmap_i_and_d_on_a_served_table_under_load(
    server: StartServer, tmp_path: Path, postfix_dir: Path
) -> None:
    """40 one-line `postmap -i`, a 3,000-line `postmap -i` and a 1,500-line `postmap -d` on
    a served 5,000-key table while a client looks up keys in both versions at 1,000/s: no
    400 at all; the additions are served; the "opened" line gives the real record count."""
    source = tmp_path / "virtual"
    source.write_text("".join(f"user{i:04d}@example.com mailbox-{i}\n" for i in range(5000)))
    assert run_postfix("postmap", postfix_dir, f"lmdb:{source}").returncode == 0
    db = tmp_path / "virtual.lmdb"
    srv = server(db)
    stable = [f"user{i:04d}@example.com" for i in range(0, 5000, 7)]
    with Paced(srv.port, stable) as load:
        for n in range(40):
            line = f"new{n}@example.com v{n}\n".encode()
            result = run_postfix("postmap", postfix_dir, "-i", f"lmdb:{source}", stdin=line)
            assert result.returncode == 0, result.stderr
        lines = "".join(f"bulk{i:04d}@example.com b{i}\n" for i in range(3000)).encode()
        assert (
            run_postfix("postmap", postfix_dir, "-i", f"lmdb:{source}", stdin=lines).returncode == 0
        )
        gone = "".join(f"bulk{i:04d}@example.com\n" for i in range(1500)).encode()
        assert (
            run_postfix("postmap", postfix_dir, "-d", "-", f"lmdb:{source}", stdin=gone).returncode
            == 0
        )
        eventually(lambda: len(load.replies) > 3000, what="3,000 lookups")
    assert load.failure is None, load.failure
    expected = {key: f"mailbox-{int(key[4:8])}".encode() for key in stable}
    wrong = [(k, c, t) for k, c, t in load.replies if (c, t) != (200, expected[k])]
    assert wrong == [], wrong[:5]
    with srv.connect() as conn:
        eventually(lambda: conn.ask("bulk2999@example.com") == (200, b"b2999"), what="bulk")
        assert conn.ask("new39@example.com") == (200, b"v39")
        assert conn.ask("bulk0000@example.com")[0] == 500
    srv.wait_for_log(rf"opened {db}: {5000 + 40 + 1500} records \(built by Postfix")


# --- 3. grown in place under the lock -------------------------------------------------------------

_GROWER = """
import fcntl, os, sys, time, lmdb
path = sys.argv[1]
# lmdb.open before the lock: python-lmdb 3.x opens and closes the file in it, which
# drops a lock taken before (POSIX drops a process's fcntl locks at any close).
env = lmdb.open(path, subdir=False, lock=False, map_size=1 << 30)
fd = os.open(path, os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
with env.begin(write=True) as txn:
    for i in range(150_000):
        txn.put(b"grown%06d@example.com\\0" % i, b"g%d-%s\\0" % (i, b"x" * 100))
env.sync(True)
print("grown", flush=True)
time.sleep(float(sys.argv[2]))
fcntl.lockf(fd, fcntl.LOCK_UN)
env.close()  # not before: closing any descriptor of the file drops the lock (POSIX)
"""


@contextlib.contextmanager
def writer(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_growth_in_place_under_the_lock_serves_the_new_value(
    server: StartServer, tmp_path: Path
) -> None:
    """A writer that follows lmdb_table(5) locks a 1,000-key table, grows it to 151,000 keys
    (past python-lmdb's default 10 MiB map) in place and keeps the lock 1 s more: a lookup
    sent before the growth gets its value (not MDB_MAP_RESIZED); lookups while the lock is
    held are answered at once from the version before (no lookup waits for a writer), and
    the new keys are served once the writer lets go."""
    db = make_table(
        tmp_path / "virtual.lmdb", {f"key{i:04d}": f"v{i}" for i in range(1000)}, info=False
    )
    srv = server(db)
    with srv.connect() as conn, writer(_GROWER, str(db), "1.0") as grower:
        assert conn.ask("key0999") == (200, b"v999")
        assert grower.stdin is not None and grower.stdout is not None
        assert grower.stdout.readline() == "locked\n"
        conn.send(b"get key0998\n")  # sent while the table is locked, before it grows
        grower.stdin.write("go\n")
        grower.stdin.flush()
        assert conn.read_line() == b"200 v998\n"
        assert grower.stdout.readline() == "grown\n"
        started = time.monotonic()
        assert conn.ask("key0997") == (200, b"v997")  # the lock is still held
        assert time.monotonic() - started < 0.5
        eventually(
            lambda: conn.ask("grown149999@example.com") == (200, b"g149999-" + b"x" * 100),
            what="the grown table",
        )
        assert conn.ask("key0999") == (200, b"v999")
    srv.wait_for_log(rf"opened {db}: 151000 records")


# --- 4. locked by a writer; 5. not a regular file ------------------------------------------------

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
if sys.argv[3] == "changed":
    os.utime(fd)  # a change the server sees: its snapshot waits for the lock
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def two_maps(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    """A server with a socketmap listener on --maps DIR holding maps "a" and "b"."""
    maps = tmp_path / "maps"
    maps.mkdir()
    for name in ("a", "b"):
        make_table(maps / f"{name}.lmdb", {"key": f"{name}-value"}, info=False)
    srv = ServerProcess(maps / "a.lmdb", ("--maps", str(maps), "--listen", "socketmap:127.0.0.1:0"))
    try:
        yield srv, maps
    finally:
        srv.kill()


def _socketmap_port(srv: ServerProcess) -> int:
    return int(srv.wait_for_log(r"INFO: 127\.0\.0\.1:(\d+) serves socketmap").group(1))


@pytest.mark.parametrize("change", ["unchanged", "changed"])
def test_a_writer_holding_the_lock_3s_delays_no_other_map(
    two_maps: tuple[ServerProcess, Path], change: str
) -> None:
    """While a writer holds map a's lock for 3 s (having changed it or not), map b answers
    every lookup within 50 ms; map a answers too (from its snapshot), within CHECK_PATIENCE."""
    srv, maps = two_maps
    port = _socketmap_port(srv)
    with SocketmapConn(port) as conn_a, SocketmapConn(port) as conn_b:
        assert conn_a.ask(b"a", b"key") == (b"OK", b"a-value")
        with writer(_HOLDER, str(maps / "a.lmdb"), "3", change) as holder:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "locked\n"
            conn_a.send(b"5:a key,")  # its snapshot now waits for the lock
            slowest, asked = 0.0, 0
            deadline = time.monotonic() + 5
            while holder.poll() is None and time.monotonic() < deadline:  # the 3 s hold
                started = time.monotonic()
                assert conn_b.ask(b"b", b"key") == (b"OK", b"b-value")
                slowest = max(slowest, time.monotonic() - started)
                asked += 1
                time.sleep(0.02)
            assert asked > 50, asked
            assert slowest < 0.05, f"map b took {slowest * 1000:.0f} ms"
            assert conn_a.read_reply(timeout=REPLY_TIMEOUT) == (b"OK", b"a-value")
    assert srv.stop() == 0


_CHANGER = """
import fcntl, os, sys, time, lmdb
path = sys.argv[1]
# lmdb.open first: python-lmdb 3.x opens and closes the file in it, which would drop
# a lock taken before (POSIX drops a process's fcntl locks at any close of the file).
env = lmdb.open(path, subdir=False, lock=False)
fd = os.open(path, os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)  # as an lmdb_table(5) writer does
with env.begin(write=True) as txn:
    txn.put(b"key\\0", b"a-new\\0")
env.sync(True)
print("changed", flush=True)
time.sleep(float(sys.argv[2]))
fcntl.lockf(fd, fcntl.LOCK_UN)
env.close()  # not before: closing any descriptor of the file drops the lock (POSIX)
"""

# What a lookup may take while a writer holds a changed table's lock: no lookup waits
# for the writer, so this is the server's own time plus a loaded test machine's.
LOCKED_LOOKUP_BOUND = 0.25  # seconds


class Timed(threading.Thread):
    """Asks ASK() every 10 ms until stopped (LOAD_SECONDS at most); keeps the slowest time
    and every reply that is not EXPECTED."""

    def __init__(self, ask: Callable[[], tuple[bytes, bytes]], expected: tuple[bytes, bytes]):
        super().__init__()
        self.ask, self.expected = ask, expected
        self.slowest, self.count = 0.0, 0
        self.wrong: list[tuple[bytes, bytes]] = []
        self.failure: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + LOAD_SECONDS
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                reply = self.ask()
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.count += 1
                if reply != self.expected:
                    self.wrong.append(reply)
                self.stop.wait(0.01)
        except BaseException as exc:
            self.failure = exc


def test_a_writer_holding_a_changed_tables_lock_stalls_no_lookup(
    two_maps: tuple[ServerProcess, Path],
) -> None:
    """A writer changes map a and keeps its exclusive lock 3 s: every lookup on map a (on an
    open connection and on new ones) and on map b is answered within LOCKED_LOOKUP_BOUND,
    map a from the version before; one warning names the table and the wait; once the
    writer lets go, map a's new value is served without SIGHUP."""
    srv, maps = two_maps
    port = _socketmap_port(srv)
    table = maps / "a.lmdb"

    def ask_new_connection() -> tuple[bytes, bytes]:
        with SocketmapConn(port) as fresh:
            return fresh.ask(b"a", b"key")

    with SocketmapConn(port) as conn_a, SocketmapConn(port) as conn_b:
        assert conn_a.ask(b"a", b"key") == (b"OK", b"a-value")
        mark = srv.mark()
        clients = {
            "map a": Timed(lambda: conn_a.ask(b"a", b"key"), (b"OK", b"a-value")),
            "map a, new connections": Timed(ask_new_connection, (b"OK", b"a-value")),
            "map b": Timed(lambda: conn_b.ask(b"b", b"key"), (b"OK", b"b-value")),
        }
        with writer(_CHANGER, str(table), "3") as holder:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "changed\n"
            for client in clients.values():
                client.start()
            with contextlib.suppress(subprocess.TimeoutExpired):
                holder.wait(5)  # the 3 s hold
            for client in clients.values():
                client.stop.set()
                client.join(LOAD_SECONDS + 5)
        figures = ", ".join(
            f"{what}: {c.slowest * 1000:.0f} ms ({c.count} lookups)" for what, c in clients.items()
        )
        print(f"slowest lookups during a 3 s hold: {figures}")
        for what, client in clients.items():
            assert client.failure is None, (what, client.failure)
            assert client.slowest < LOCKED_LOOKUP_BOUND, figures
            assert client.count > 20, figures
            # During the hold: the version from before (the writer's change lands only at
            # the very end, after the stop, if at all).
            assert client.wrong in ([], [(b"OK", b"a-new")]), (what, client.wrong[:5])
        warning = srv.wait_for_log(rf"WARNING: {table}: a writer has held its lock for", since=mark)
        assert "serving the version from before" in warning.string
        eventually(lambda: conn_a.ask(b"a", b"key") == (b"OK", b"a-new"), what="new value")
    assert len([line for line in srv.logs[mark:] if "a writer has held" in line]) == 1
    assert srv.stop() == 0


def test_fifo_at_a_table_path_blocks_nothing(two_maps: tuple[ServerProcess, Path]) -> None:
    """A FIFO renamed onto a.lmdb, or made as c.lmdb: maps a and c answer TEMP naming the path
    and saying FIFO, map b keeps answering, and SIGTERM stops the server."""
    srv, maps = two_maps
    port = _socketmap_port(srv)
    fifo = maps / ".fifo"
    os.mkfifo(fifo)
    with SocketmapConn(port) as conn:
        assert conn.ask(b"a", b"key") == (b"OK", b"a-value")
        os.replace(fifo, maps / "a.lmdb")
        status, text = conn.ask(b"a", b"key")
        assert status == b"TEMP", text
        assert f"{maps / 'a.lmdb'} is not a regular file: it is a FIFO".encode() in text
        for _ in range(20):
            assert conn.ask(b"b", b"key") == (b"OK", b"b-value")
        os.mkfifo(maps / "c.lmdb")  # a map first asked for while it is a FIFO
        status, text = conn.ask(b"c", b"key")
        assert status == b"TEMP", text
        assert f"{maps / 'c.lmdb'} is not a regular file: it is a FIFO".encode() in text
        assert conn.ask(b"b", b"key") == (b"OK", b"b-value")
    assert srv.stop(timeout=10) == 0


# --- 6. two names for one file ----------------------------------------------------------------


def test_symlink_and_hard_link_in_maps_each_serve_the_file(tmp_path: Path) -> None:
    """alias.lmdb -> virtual.lmdb and a hard link hard.lmdb: all three maps answer, never
    "already open in this process"; a republished virtual is seen through the symlink."""
    maps = tmp_path / "maps"
    maps.mkdir()
    virtual = make_table(maps / "virtual.lmdb", {"key": "one"})
    (maps / "alias.lmdb").symlink_to("virtual.lmdb")
    os.link(virtual, maps / "hard.lmdb")
    srv = ServerProcess(virtual, ("--maps", str(maps), "--listen", "socketmap:127.0.0.1:0"))
    try:
        with SocketmapConn(_socketmap_port(srv)) as conn:
            for name in (b"virtual", b"alias", b"hard", b"virtual", b"alias"):
                assert conn.ask(name, b"key") == (b"OK", b"one"), name
            make_table(virtual, {"key": "two"})
            assert conn.ask(b"alias", b"key") == (b"OK", b"two")
            assert conn.ask(b"virtual", b"key") == (b"OK", b"two")
            assert conn.ask(b"hard", b"key") == (b"OK", b"one")
        srv.check_clean_exit()
    finally:
        srv.kill()


# --- 7. a transient failure is not remembered ---------------------------------------------------


def _fds(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


def test_emfile_at_publication_then_the_new_table_is_served(
    server: StartServer, tmp_path: Path
) -> None:
    """The server runs out of descriptors as a new table is published: it keeps serving the
    old one; once descriptors are free again the new one is served within seconds, no SIGHUP."""
    db = make_table(tmp_path / "virtual.lmdb", {"key": "old"})
    srv = server(db)
    pid = srv.proc.pid
    with srv.connect() as conn:
        assert conn.ask("key") == (200, b"old")
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # A soft limit at the lowest free descriptor number: nothing new can be opened
        # (the descriptors above it stay open: the listener, this connection).
        open_now = set(_fds(pid))
        lowest_free = min(set(range(max(open_now) + 2)) - open_now)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            mark = srv.mark()
            make_table(db, {"key": "new"})
            assert conn.ask("key") == (200, b"old")
            srv.wait_for_log(r"WARNING: cannot open .* yet, retrying in .*open files", since=mark)
            assert conn.ask("key") == (200, b"old")
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        eventually(lambda: conn.ask("key") == (200, b"new"), timeout=5, what="the new table")


def test_check_child_killed_then_the_table_is_served(
    server: StartServer,
    tmp_path: Path,
    big_tables: tuple[Path, Path],  # noqa: F811
) -> None:
    """The check child of a new table dies of SIGKILL (the OOM killer): the table is checked
    again and served within seconds, without SIGHUP."""
    db = tmp_path / "virtual.lmdb"
    shutil.copyfile(big_tables[0], db)
    srv = server(db)
    with srv.connect() as trigger, srv.connect() as other:
        assert trigger.ask("alice@example.com") == (200, b"one")
        temp = db.with_name(".two.tmp")
        shutil.copyfile(big_tables[1], temp)
        os.replace(temp, db)
        trigger.send(b"get alice@example.com\n")
        CheckerChild.find(srv, db).signal(signal.SIGKILL)
        assert trigger.read_line() in (b"200 one\n", b"200 two\n")
        srv.wait_for_log(r"WARNING: cannot open .* yet, retrying in .*SIGKILL")
        eventually(lambda: other.ask("alice@example.com") == (200, b"two"), timeout=5, what="two")


# --- 10. reload races; no check child outlives the server --------------------------------------


def test_a_map_requested_during_a_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGHUP while new maps are asked for: the reload ends with READY=1, every map answers,
    no traceback."""
    maps = tmp_path / "maps"
    maps.mkdir()
    filler = {f"filler{i:06d}": "f" * 40 for i in range(100_000)}
    for n in range(4):
        make_table(maps / f"big{n}.lmdb", {**filler, "key": f"big{n}"})
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    srv = ServerProcess(
        maps / "big0.lmdb", ("--maps", str(maps), "--listen", "socketmap:127.0.0.1:0")
    )
    try:
        notify.wait_for("READY")
        for n in range(40):
            make_table(maps / f"new{n}.lmdb", {"key": f"new{n}"})
        with SocketmapConn(_socketmap_port(srv)) as conn:
            srv.signal(signal.SIGHUP)
            for n in range(40):
                assert conn.ask(f"new{n}".encode(), b"key") == (b"OK", f"new{n}".encode())
        seen = notify.wait_for("READY", timeout=20)
        assert any("RELOADING" in fields for fields in seen), seen
        srv.check_clean_exit()
    finally:
        srv.kill()
        notify.close()


def test_no_check_child_outlives_a_killed_server(
    server: StartServer,
    tmp_path: Path,
    big_tables: tuple[Path, Path],  # noqa: F811
) -> None:
    """The server dies of SIGKILL while a check child is stopped: the child dies too."""
    db = tmp_path / "virtual.lmdb"
    shutil.copyfile(big_tables[0], db)
    srv = server(db)
    with srv.connect() as trigger:
        assert trigger.ask("alice@example.com") == (200, b"one")
        temp = db.with_name(".two.tmp")
        shutil.copyfile(big_tables[1], temp)
        os.replace(temp, db)
        trigger.send(b"get alice@example.com\n")
        child = CheckerChild.find(srv, db)
        child.signal(signal.SIGSTOP)
        srv.kill()
        eventually(lambda: not _alive(child.pid), timeout=5, what=f"child {child.pid} gone")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has died; only its parent's wait is missing
