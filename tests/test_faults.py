"""Faults: a broken table under a running server, republishing under load, a builder that dies.

The server runs with a tcp_table and a socketmap listener on the same --db table, so every
fault is checked in both protocols: tcp_table answers 400 and socketmap TEMP, each with a
reason naming the file (never 500 or NOTFOUND, which would bounce mail), the server never
crashes, and publishing a good file is picked up by the next lookup without a restart.
Each server test ends by stopping the server: exit 0 and no Traceback in its log.
The builder's faults (full disk, signals mid-write, read-only directory) must leave the
live table byte for byte, no temporary file, and one clear line of error.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest
from conftest import (
    REPLY_TIMEOUT,
    ROOT,
    STOP_TIMEOUT,
    Conn,
    ServerProcess,
    SocketmapConn,
    make_table,
)
from postfix_tools import postfix_config_dir, require_postfix, run_postfix

from tcpmap_lmdb import build, sessions
from tcpmap_lmdb.table import CHECK_PATIENCE

GOOD = {f"user{i:04d}@example.com": f"mailbox-{i:04d}" for i in range(2000)}
GOOD |= {"alice@example.com": "alice@mail.example.com", "bob": "bob-value"}
SMALL = {"alice@example.com": "alice@mail.example.com", "bob": "bob-value"}
KEYS = ("alice@example.com", "nobody@example.com")  # one in the table, one not
LISTENERS = ("--listen", "tcp:127.0.0.1:0", "--listen", "socketmap:127.0.0.1:0")
# Root without the capabilities that bypass file permissions: a chmod 000 table or a
# mode 555 directory stops it, as it stops any unprivileged user. (Running as nobody
# would also need the checkout to be readable by nobody, which a clone in a private
# temporary directory is not.)
UNPRIVILEGED = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")

# --- servers ------------------------------------------------------------------------------------


@dataclass
class Dual:
    """A server with a tcp_table and a socketmap listener, both on the --db table."""

    srv: ServerProcess
    db: Path
    tcp_port: int
    sm_port: int

    def connections(self) -> tuple[Conn, SocketmapConn]:
        return Conn(self.tcp_port), SocketmapConn(self.sm_port)


Start = Callable[..., Dual]


@pytest.fixture
def start() -> Iterator[Start]:
    """start(db, *args, unprivileged=False) -> Dual; teardown kills leftovers only."""
    started: list[ServerProcess] = []

    def run(db: Path, *args: str, unprivileged: bool = False) -> Dual:
        args = (*LISTENERS, *args)
        srv = ServerProcess(db, args, prefix=UNPRIVILEGED if unprivileged else ())
        started.append(srv)
        tcp = srv.wait_for_log(r"INFO: 127\.0\.0\.1:(\d+) serves tcp_table ")
        sm = srv.wait_for_log(r"INFO: 127\.0\.0\.1:(\d+) serves socketmap ")
        return Dual(srv, db, int(tcp.group(1)), int(sm.group(1)))

    yield run
    for srv in started:
        srv.kill()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory of its own, outside tmp_path, for the tests without DAC capabilities."""
    path = Path(tempfile.mkdtemp(prefix="tcpmap-faults-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        path.chmod(0o755)
        shutil.rmtree(path)


# --- what a fault must look like, and recovery ---------------------------------------------------


def assert_refused(dual: Dual, reason: bytes, *opened: Conn | SocketmapConn) -> None:
    """Every lookup, on connections open before the fault and on new ones, in both protocols:
    400 / TEMP with REASON and the file's path; never 500, NOTFOUND or a hang-up."""
    path = str(dual.db).encode()
    tcp, sm = dual.connections()
    with tcp, sm:
        for conn in (*opened, tcp, sm):
            for key in KEYS:
                if isinstance(conn, Conn):
                    code, text = conn.ask(key)
                    assert code == 400, f"{key}: {code} {text!r}"
                else:
                    status, text = conn.ask(b"virtual", key.encode())
                    assert status == b"TEMP", f"{key}: {status!r} {text!r}"
                assert reason in text, text
                assert path in text, text
    assert dual.srv.proc.poll() is None


def assert_served(dual: Dual, table: dict[str, str], *opened: Conn | SocketmapConn) -> None:
    """Both protocols answer from TABLE, on the given connections and on new ones."""
    tcp, sm = dual.connections()
    with tcp, sm:
        for conn in (*opened, tcp, sm):
            for key in ("alice@example.com", "bob"):
                if isinstance(conn, Conn):
                    assert conn.ask(key) == (200, table[key].encode())
                else:
                    assert conn.ask(b"virtual", key.encode()) == (b"OK", table[key].encode())
            if isinstance(conn, Conn):
                assert conn.ask("nobody@example.com")[0] == 500
            else:
                assert conn.ask(b"virtual", b"nobody@example.com")[0] == b"NOTFOUND"


def publish(db: Path, data: bytes) -> None:
    """Put DATA at DB the way a table is published: written beside it, renamed over it."""
    temp = db.with_name(f".{db.name}.damaged")
    temp.write_bytes(data)
    os.replace(temp, db)


# --- the faults -------------------------------------------------------------------------------


def missing(db: Path, good: bytes) -> None:
    db.unlink(missing_ok=True)


def truncated(db: Path, good: bytes) -> None:
    publish(db, good[: len(good) // 2])


def truncated_in_place(db: Path, good: bytes) -> None:
    os.truncate(db, len(good) // 2)


def noise(size: int) -> bytes:
    """SIZE bytes that look random, the same every run."""
    return hashlib.shake_256(b"tcpmap-lmdb corrupt table").digest(size)


def corrupt(db: Path, good: bytes) -> None:
    publish(db, noise(len(good)))


def corrupt_in_place(db: Path, good: bytes) -> None:
    with db.open("r+b") as file:
        file.write(noise(len(good)))


def gzipped(db: Path, good: bytes) -> None:
    publish(db, gzip.compress(good))


def text_file(db: Path, good: bytes) -> None:
    publish(db, "".join(f"{key} {value}\n" for key, value in GOOD.items()).encode())


def sqlite_file(db: Path, good: bytes) -> None:
    temp = db.with_name(".sqlite.tmp")
    with sqlite3.connect(temp) as connection:
        connection.execute("CREATE TABLE map (key TEXT PRIMARY KEY, value TEXT)")
        connection.executemany("INSERT INTO map VALUES (?, ?)", GOOD.items())
    connection.close()
    os.replace(temp, db)


def berkeley_db(db: Path, good: bytes) -> None:
    """What `postmap hash:` writes: a Berkeley DB hash file."""
    require_postfix()
    source = db.with_name("source")
    source.write_text("".join(f"{key} {value}\n" for key, value in SMALL.items()))
    result = run_postfix("postmap", postfix_config_dir(db.parent), f"hash:{source}")
    assert result.returncode == 0, result.stderr
    os.replace(source.with_name("source.db"), db)


FAULTS: dict[str, tuple[Callable[[Path, bytes], None], bytes]] = {
    "missing": (missing, b"is missing"),
    "truncated": (truncated, b"is truncated"),
    "corrupt": (corrupt, b"is not a readable LMDB file"),
    "gzip": (gzipped, b"is not a readable LMDB file"),
    "text": (text_file, b"is not a readable LMDB file"),
    "sqlite": (sqlite_file, b"is not a readable LMDB file"),
    "berkeley-db": (berkeley_db, b"is not a readable LMDB file"),
}
IN_PLACE: dict[str, tuple[Callable[[Path, bytes], None], bytes]] = {
    "truncated-in-place": (truncated_in_place, b"is truncated"),
    "corrupt-in-place": (corrupt_in_place, b"is not a readable LMDB file"),
}


@pytest.fixture
def good(tmp_path: Path) -> bytes:
    """A good table of 2002 records: big enough that half of it still holds the meta pages."""
    return make_table(tmp_path / "good.lmdb", GOOD).read_bytes()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_at_start_answers_400_then_recovers(
    start: Start, tmp_path: Path, good: bytes, fault: str
) -> None:
    """A server started on a missing or broken table answers 400/TEMP; a good file fixes it."""
    damage, reason = FAULTS[fault]
    db = tmp_path / "virtual.lmdb"
    publish(db, good)
    damage(db, good)
    dual = start(db)
    dual.srv.wait_for_log(f"WARNING: table unavailable: .*{re.escape(reason.decode())}")
    tcp, sm = dual.connections()
    with tcp, sm:
        assert_refused(dual, reason, tcp, sm)
        make_table(db, SMALL)
        assert_served(dual, SMALL, tcp, sm)
    dual.srv.check_clean_exit()


@pytest.mark.parametrize("fault", list(FAULTS | IN_PLACE))
def test_fault_while_serving_answers_400_then_recovers(
    start: Start, tmp_path: Path, good: bytes, fault: str
) -> None:
    """A table deleted, truncated, corrupted or replaced under a serving server: 400/TEMP on
    open and new connections, then the next good publication is served, no restart."""
    damage, reason = (FAULTS | IN_PLACE)[fault]
    db = tmp_path / "virtual.lmdb"
    publish(db, good)
    dual = start(db)
    tcp, sm = dual.connections()
    with tcp, sm:
        assert_served(dual, GOOD, tcp, sm)
        mark = dual.srv.mark()
        damage(db, good)
        assert_refused(dual, reason, tcp, sm)
        dual.srv.wait_for_log(
            f"WARNING: table unavailable: .*{re.escape(reason.decode())}", since=mark
        )
        make_table(db, SMALL)
        assert_served(dual, SMALL, tcp, sm)
    dual.srv.check_clean_exit()


@pytest.mark.parametrize("when", ["at-start", "while-serving"])
def test_permission_denied_answers_400_until_readable(
    start: Start, shared_dir: Path, when: str
) -> None:
    """A server without DAC capabilities on a chmod 000 table: 400/TEMP "Permission denied";
    chmod 644 and the next lookup is served."""
    db = make_table(shared_dir / "virtual.lmdb", SMALL)
    db.chmod(0o000 if when == "at-start" else 0o644)
    dual = start(db, unprivileged=True)
    tcp, sm = dual.connections()
    with tcp, sm:
        if when == "while-serving":
            assert_served(dual, SMALL, tcp, sm)
            db.chmod(0o000)
        assert_refused(dual, b"Permission denied", tcp, sm)
        dual.srv.wait_for_log(r"WARNING: table unavailable: cannot open .*: Permission denied")
        db.chmod(0o644)
        assert_served(dual, SMALL, tcp, sm)
    dual.srv.check_clean_exit()


# --- intact meta pages over a broken B-tree -------------------------------------------------------


def zero_data_pages(db: Path, good: bytes) -> None:
    """Keep both meta pages, zero every page after them: the B-tree is gone."""
    page = _page_size(db)
    publish(db, good[: 2 * page] + bytes(len(good) - 2 * page))


def wild_leaf_pointers(db: Path, good: bytes) -> None:
    """Point every node of every leaf page 64 KiB ahead: past the end of a small file."""
    page = _page_size(db)
    data = bytearray(good)
    for offset in range(2 * page, len(data), page):
        flags, lower = struct.unpack_from("<HH", data, offset + 10)  # mp_flags, mp_lower
        if flags & 0x02:  # P_LEAF
            for index in range((lower - 16) // 2):
                struct.pack_into("<H", data, offset + 16 + 2 * index, 0xFFF8)
    publish(db, bytes(data))


def _page_size(db: Path) -> int:
    env = lmdb.open(str(db), subdir=False, readonly=True, lock=False)
    try:
        return int(env.stat()["psize"])
    finally:
        env.close()


def _corrupt_under_server(
    start: Start, tmp_path: Path, corrupt: Callable[[Path, bytes], None], when: str
) -> None:
    """Corrupt a table at start or while serving: 400/TEMP naming it, then recovery."""
    good = make_table(tmp_path / "good.lmdb", SMALL).read_bytes()
    db = tmp_path / "virtual.lmdb"
    publish(db, good)
    if when == "at-start":
        corrupt(db, good)
    dual = start(db)
    tcp, sm = dual.connections()
    with tcp, sm:
        if when == "while-serving":
            assert_served(dual, SMALL, tcp, sm)
            corrupt(db, good)
        try:
            assert_refused(dual, b"", tcp, sm)
        except EOFError:
            status = dual.srv.proc.wait(timeout=5)
            pytest.fail(
                f"the server died (exit status {status}); log:\n" + "\n".join(dual.srv.logs)
            )
        make_table(db, SMALL)
        assert_served(dual, SMALL, tcp, sm)
    dual.srv.check_clean_exit()


@pytest.mark.parametrize("when", ["at-start", "while-serving"])
def test_zeroed_pages_with_intact_meta_answer_400(start: Start, tmp_path: Path, when: str) -> None:
    """Meta pages fine, B-tree zeroed (LMDB says MDB_CORRUPTED): 400/TEMP naming the file."""
    _corrupt_under_server(start, tmp_path, zero_data_pages, when)


@pytest.mark.parametrize("when", ["at-start", "while-serving"])
def test_wild_page_pointers_answer_400_not_sigbus(start: Start, tmp_path: Path, when: str) -> None:
    """Meta pages fine, leaf node offsets pointing past EOF: 400/TEMP, not a dead server."""
    _corrupt_under_server(start, tmp_path, wild_leaf_pointers, when)


# --- republishing under load --------------------------------------------------------------------

VERSIONS = {
    version: {
        f"key{i:03d}@example.com": f"{version}:key{i:03d}:" + version * 40 for i in range(200)
    }
    for version in ("v1", "v2")
}
PUBLICATIONS = 100
LOAD_LIMIT = 20.0  # seconds the clients may run, whatever happens
RAPID_LIMIT = 3.0  # seconds of back-to-back publications
RAPID_COUNT = 100_000  # and at most this many


class LookupLoad:
    """Four client threads looking keys up flat out, each answer checked to be v1's or v2's
    value for that key. A context manager: the load runs inside the with block."""

    def __init__(self, dual: Dual, kind: str) -> None:
        self.dual, self.kind = dual, kind
        self.errors: list[str] = []
        self.seen: Counter[str] = Counter()
        self.switches = 0  # answers whose version differs from the client's previous answer
        self._done = threading.Event()
        self._going = threading.Event()  # set once the clients have made 100 lookups
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(4)]

    def _client(self, number: int) -> None:
        keys = sorted(VERSIONS["v1"])
        deadline = time.monotonic() + LOAD_LIMIT
        last = None
        try:
            conn = (
                Conn(self.dual.tcp_port) if self.kind == "tcp" else SocketmapConn(self.dual.sm_port)
            )
            with conn:
                for step in itertools.count():
                    if self._done.is_set() or time.monotonic() >= deadline:
                        break
                    key = keys[(number * 50 + step * 7) % len(keys)]  # each its own order
                    if isinstance(conn, Conn):
                        code, value = conn.ask(key)
                        ok = code == 200
                    else:
                        status, value = conn.ask(b"virtual", key.encode())
                        ok = status == b"OK"
                    version = value[:2].decode("ascii", "replace")
                    if not ok or VERSIONS.get(version, {}).get(key, "").encode() != value:
                        self.errors.append(f"{key}: {value[:300]!r}")
                        return
                    self.seen[version] += 1
                    self.switches += last is not None and version != last
                    last = version
                    if self.lookups >= 100:
                        self._going.set()
        except Exception as exc:  # a hang-up, a timeout, a malformed reply
            self.errors.append(f"client {number}: {exc!r}")

    @property
    def lookups(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> LookupLoad:
        for thread in self._threads:
            thread.start()
        assert self._going.wait(timeout=REPLY_TIMEOUT) or self.errors, "the clients never got going"
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=LOAD_LIMIT + 5)
        assert not any(thread.is_alive() for thread in self._threads)


def _sources(tmp_path: Path, filler: int = 0) -> dict[str, Path]:
    """A source per version; FILLER more records (never looked up) make the tables bigger."""
    padding = "".join(f"filler{i:06d} {'f' * 200}\n" for i in range(filler))
    sources = {}
    for version, table in VERSIONS.items():
        sources[version] = tmp_path / f"{version}.txt"
        sources[version].write_text("".join(f"{k} {v}\n" for k, v in table.items()) + padding)
    return sources


@pytest.mark.parametrize("kind", ["tcp", "socketmap"])
def test_republishing_under_load_loses_no_lookup(start: Start, tmp_path: Path, kind: str) -> None:
    """Four clients looking up flat out while tcpmap-build republishes the table 100 times,
    alternating v1 and v2: every answer is v1's or v2's value for that key, never anything else."""
    sources = _sources(tmp_path)
    db = tmp_path / "virtual.lmdb"
    assert build.main(["-q", "-o", str(db), str(sources["v1"])]) == 0
    dual = start(db)
    with LookupLoad(dual, kind) as load:
        started, before = time.monotonic(), load.lookups
        for number in range(PUBLICATIONS):
            version = "v2" if number % 2 == 0 else "v1"
            assert build.main(["-q", "-o", str(db), str(sources[version])]) == 0
            assert time.monotonic() - started < LOAD_LIMIT - 5, "publishing is too slow"
        during = load.lookups - before
    assert load.errors == []
    assert load.seen["v1"] and load.seen["v2"]
    # Lookups wait while each new file is checked, so they overlap the publications
    # less than one each; enough that the versions switch back and forth under load.
    assert during >= PUBLICATIONS // 4, f"only {during} lookups overlapped the publications"
    assert load.switches >= 5, f"versions switched only {load.switches} times"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.txt", "v2.txt", "virtual.lmdb"]
    dual.srv.check_clean_exit()


@pytest.mark.parametrize("kind", ["tcp", "socketmap"])
def test_back_to_back_publications_lose_no_lookup(start: Start, tmp_path: Path, kind: str) -> None:
    """Two tables built by tcpmap-build, published by rename back to back for up to 3 s while
    four clients look up flat out: no lookup fails, every answer is v1's or v2's."""
    # 5 MB tables, published by hard link and rename: a publication costs microseconds,
    # reading a table in on reopen about a millisecond, so renames land inside reopens.
    sources = _sources(tmp_path, filler=20_000)
    built = {version: tmp_path / f"{version}.lmdb" for version in sources}
    for version, source in sources.items():
        assert build.main(["-q", "-o", str(built[version]), str(source)]) == 0
    db = tmp_path / "virtual.lmdb"
    os.link(built["v1"], db)
    dual = start(db)
    temp = tmp_path / ".virtual.lmdb.tmp"
    publications = 0
    with LookupLoad(dual, kind) as load:
        deadline = time.monotonic() + RAPID_LIMIT
        while not load.errors and time.monotonic() < deadline and publications < RAPID_COUNT:
            os.link(built["v2" if publications % 2 == 0 else "v1"], temp)
            os.replace(temp, db)
            publications += 1
    assert load.errors == [], f"after {publications} publications and {load.lookups} lookups"
    assert load.seen["v1"] and load.seen["v2"]
    dual.srv.check_clean_exit()


# --- while a new table is checked (snapshot.py, verify.py) ---------------------------------------
# The server copies and checks each new version of a file in a forked child before serving
# it. The child is stopped with SIGSTOP here: a stand-in, without timing, for the seconds
# the check of a big table takes.


@pytest.fixture(scope="module")
def big_tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 12 MB tables (300,000 records), alice@example.com "one" in the first, "two" in the
    second: big enough that their check lasts long enough to be caught."""
    root = tmp_path_factory.mktemp("big")
    filler = {f"filler{i:07d}": "f" * 20 for i in range(300_000)}
    first = make_table(root / "one.lmdb", {**filler, "alice@example.com": "one"})
    second = make_table(root / "two.lmdb", {**filler, "alice@example.com": "two"})
    return first, second


@dataclass(frozen=True)
class CheckerChild:
    """The server's forked child checking a table, known by PID and command line."""

    pid: int
    cmdline: bytes

    @classmethod
    def find(cls, srv: ServerProcess, table: Path) -> CheckerChild:
        """The server's child snapshotting TABLE, once it has closed the server's sockets
        (snapshot.py names the copies it maps tcpmap:NAME)."""
        children = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children")
        copy = f"/memfd:tcpmap:{table.name} "
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            assert time.monotonic() < deadline, "no child checking the table appeared"
            for pid in children.read_text().split():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
                    # Past its fork: it has closed the server's sockets (and maps the
                    # server's snapshots until it exits).
                    closed = not any(link.startswith("socket:") for link in links)
                    if closed and (
                        str(table) in links or copy in Path(f"/proc/{pid}/maps").read_text()
                    ):
                        return cls(int(pid), Path(f"/proc/{pid}/cmdline").read_bytes())

    def signal(self, signum: int) -> None:
        """Send SIGNUM if PID is still this child, never to a process that took the number over."""
        try:
            if Path(f"/proc/{self.pid}/cmdline").read_bytes() != self.cmdline:
                return
            os.kill(self.pid, signum)
        except (FileNotFoundError, ProcessLookupError):
            pass  # gone already


@contextlib.contextmanager
def stalled_check(
    dual: Dual, big_tables: tuple[Path, Path], trigger: Conn
) -> Iterator[CheckerChild]:
    """Publish the second big table; TRIGGER's next lookup starts its check, whose child is
    stopped for the duration of the with block (then continued). Yields the child."""
    temp = dual.db.with_name(".two.tmp")
    shutil.copyfile(big_tables[1], temp)
    os.replace(temp, dual.db)
    trigger.send(b"get alice@example.com\n")
    checker = CheckerChild.find(dual.srv, dual.db)
    checker.signal(signal.SIGSTOP)
    try:
        yield checker
    finally:
        checker.signal(signal.SIGCONT)


@pytest.fixture
def big_db(tmp_path: Path, big_tables: tuple[Path, Path]) -> Path:
    db = tmp_path / "virtual.lmdb"
    shutil.copyfile(big_tables[0], db)
    return db


def test_clients_are_answered_from_the_current_table_during_a_check(
    start: Start, big_db: Path, big_tables: tuple[Path, Path]
) -> None:
    """While a new file's check hangs, other clients wait for it at most CHECK_PATIENCE, then
    are answered from the current file; once the check passes, the new file is served."""
    dual = start(big_db)
    with Conn(dual.tcp_port) as trigger, Conn(dual.tcp_port) as other:
        assert trigger.ask("alice@example.com") == (200, b"one")
        with stalled_check(dual, big_tables, trigger):
            for _ in range(2):
                started = time.monotonic()
                assert other.ask("alice@example.com") == (200, b"one")
                waited = time.monotonic() - started
                assert CHECK_PATIENCE <= waited < CHECK_PATIENCE + 2, waited
            with SocketmapConn(dual.sm_port) as sm:
                assert sm.ask(b"virtual", b"alice@example.com") == (b"OK", b"one")
        assert trigger.read_line() == b"200 two\n"
        assert other.ask("alice@example.com") == (200, b"two")
    dual.srv.check_clean_exit()


def test_hang_ups_take_effect_at_once_during_a_check(
    start: Start, big_db: Path, big_tables: tuple[Path, Path]
) -> None:
    """A connection the server closes (its first bytes are not a request) gets its 400 and
    EOF while a new table is being checked, not when the check ends."""
    dual = start(big_db)
    with Conn(dual.tcp_port) as trigger, Conn(dual.tcp_port) as victim:  # open before the check
        with stalled_check(dual, big_tables, trigger):
            victim.send(b"x" * 100)
            assert victim.read_line() == sessions.TO_OTHER_CLIENT
            victim.read_eof(timeout=2)
        assert trigger.read_line() == b"200 two\n"
    dual.srv.check_clean_exit()


def test_port_refuses_connections_once_the_server_exits_during_a_check(
    start: Start, big_db: Path, big_tables: tuple[Path, Path]
) -> None:
    """SIGTERM while a new table is being checked: the server exits 0 within its stop timeout
    and its port refuses connections from then on."""
    dual = start(big_db, "--stop-timeout", "0.5")
    address = ("127.0.0.1", dual.tcp_port)
    with Conn(dual.tcp_port) as trigger:
        assert trigger.ask("alice@example.com") == (200, b"one")
        with stalled_check(dual, big_tables, trigger) as checker:
            try:
                dual.srv.signal(signal.SIGTERM)
                assert dual.srv.proc.wait(timeout=STOP_TIMEOUT) == 0
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(address, timeout=REPLY_TIMEOUT).close()
            finally:
                checker.signal(signal.SIGKILL)


# --- the builder's own faults -------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _has_cap_sys_admin() -> bool:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^CapEff:\s+([0-9a-f]+)$", status, re.MULTILINE)
    if match is None:
        return False
    return bool(int(match.group(1), 16) & (1 << 21))  # bit 21: CAP_SYS_ADMIN


def _mount(*args: str) -> None:
    """mount(8) ARGS, or skip; under CI=true as root with CAP_SYS_ADMIN a failure fails.

    Mounting needs CAP_SYS_ADMIN: a plain user, or root in an unprivileged container,
    cannot, and that is a fact of the machine, not a bug (skip). CI runs as root with the
    privileges its systemd-nspawn system test needs, so there it must work.
    """
    result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return
    why = f"cannot mount ({' '.join(args)}): {result.stderr.strip()}"
    if os.environ.get("CI") == "true" and os.geteuid() == 0 and _has_cap_sys_admin():
        pytest.fail(f"CI=true, root with CAP_SYS_ADMIN, and still {why}")
    pytest.skip(why)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a build runs out of disk space for real."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_keeps_serving_the_old_table(
    tiny_fs: Path, start: Start, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A build that fills the disk fails with a clear error; the server never stops answering
    from the old table, no temporary file is left, and a build that fits then works."""
    db = tiny_fs / "virtual.lmdb"
    small = tmp_path / "small"
    small.write_text("".join(f"{k} {v}\n" for k, v in SMALL.items()))
    assert build.main(["-q", "-o", str(db), str(small)]) == 0
    dual = start(db)
    big = tmp_path / "big"
    big.write_text("".join(f"key{i} {'v' * 200}\n" for i in range(2000)))  # ~420 KB of records
    before = _snapshot(tiny_fs)
    tcp, sm = dual.connections()
    with tcp, sm:
        assert_served(dual, SMALL, tcp, sm)
        assert build.main(["-q", "-o", str(db), str(big)]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"tcpmap-build: {db}: ")
        assert error.count("\n") == 1
        assert _snapshot(tiny_fs) == before
        assert_served(dual, SMALL, tcp, sm)
        changed = {**SMALL, "bob": "rebuilt after the failure"}
        small.write_text("".join(f"{k} {v}\n" for k, v in changed.items()))
        assert build.main(["-q", "-o", str(db), str(small)]) == 0
        assert_served(dual, changed, tcp, sm)
    assert [p.name for p in tiny_fs.iterdir()] == ["virtual.lmdb"]
    dual.srv.check_clean_exit()


@pytest.mark.parametrize(
    ("size", "records"),
    [
        ("256k", 2_000),
        ("8m", 6_000),
    ],
)
def test_disk_full_error_says_the_disk_is_full(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str, records: int
) -> None:
    """The error for a full disk says so, in the words of ENOSPC (LMDB itself says EIO)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount))
    try:
        big = tmp_path / "big"
        value = "v" * (200 if size == "256k" else 2000)
        big.write_text("".join(f"key{i} {value}\n" for i in range(records)))
        assert build.main(["-q", "-o", str(mount / "map.lmdb"), str(big)]) == 1
        assert "No space left on device" in capsys.readouterr().err
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def big_build(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A built table, then a source big enough to take a while to write (120 MB)."""
    source = tmp_path / "map"
    source.write_text("old value\n")
    assert build.main(["-q", str(source)]) == 0
    source.write_text("".join(f"key{i:06d} {'v' * 4000}\n" for i in range(30_000)))
    return source, tmp_path / "map.lmdb", _snapshot(tmp_path)


def _temporary_bytes(directory: Path) -> int:
    """How much the build's temporary file in DIRECTORY holds so far (0 if there is none)."""
    total = 0
    for path in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):  # renamed or removed since the glob
            total += path.stat().st_size
    return total


def _kill_mid_write(source: Path, signum: int) -> tuple[subprocess.Popen[str], str]:
    """Start a build of SOURCE, send SIGNUM once its temporary file holds data; (child, stderr)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tcpmap_lmdb.build", str(source)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while _temporary_bytes(source.parent) < 1 << 20:
            assert child.poll() is None, "the build ended before it had written 1 MiB"
            assert time.monotonic() < deadline, "the build never started writing"
            time.sleep(0.002)  # poll gently: the child needs the CPU
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    return child, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_terminated_mid_write_leaves_the_table_and_no_temporary(
    big_build: tuple[Path, Path, dict[str, bytes]], signum: int
) -> None:
    """SIGTERM or SIGHUP while writing: non-zero exit, the table byte for byte, no temp file."""
    source, _, before = big_build
    child, err = _kill_mid_write(source, signum)
    assert child.returncode != 0, "the build finished before the signal; make the source larger"
    assert "tcpmap-build: interrupted" in err
    assert _snapshot(source.parent) == before
    assert [p.name for p in source.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_sigkilled_build_leaves_a_temporary_the_next_build_removes(
    big_build: tuple[Path, Path, dict[str, bytes]],
) -> None:
    """SIGKILL cannot be cleaned up after: the table is intact, `.map.lmdb.PID.RANDOM.tmp`
    is left, and the next build of that table removes it and succeeds."""
    source, _, before = big_build
    child, _ = _kill_mid_write(source, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    leftovers = [p.name for p in source.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1, leftovers
    assert re.fullmatch(rf"\.map\.lmdb\.{child.pid}\.[0-9a-f]{{12}}\.tmp", leftovers[0])
    assert {k: v for k, v in _snapshot(source.parent).items() if k in before} == before
    source.write_text("new value\n")
    assert build.main(["-q", str(source)]) == 0
    assert sorted(p.name for p in source.parent.iterdir()) == ["map", "map.lmdb"]


def test_temporary_of_a_running_build_is_kept(tmp_path: Path) -> None:
    """A temporary file whose PID is alive (a build in progress) is left alone."""
    source = tmp_path / "map"
    source.write_text("key value\n")
    running = tmp_path / f".map.lmdb.{os.getpid()}.0123456789ab.tmp"
    running.write_bytes(b"a build in progress")
    assert build.main(["-q", str(source)]) == 0
    assert running.read_bytes() == b"a build in progress"


def test_temporary_of_another_table_is_kept(tmp_path: Path) -> None:
    """Building map.lmdb never touches temporaries of a table whose name extends it."""
    source = tmp_path / "map"
    source.write_text("key value\n")
    other = tmp_path / f".map.lmdb.20240101.{os.getpid()}.0123456789ab.tmp"
    other.write_bytes(b"a build of map.lmdb.20240101 in progress")
    assert build.main(["-q", str(source)]) == 0
    assert other.exists()


def test_read_only_directory_for_an_unprivileged_builder(shared_dir: Path) -> None:
    """Building into a directory it may not write: exit 1, one line naming the table, intact."""
    source = shared_dir / "map"
    source.write_text("old value\n")
    assert build.main(["-q", str(source)]) == 0
    source.write_text("new value\n")
    shared_dir.chmod(0o555)  # no one may write here (without DAC_OVERRIDE)
    before = _snapshot(shared_dir)
    result = subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-m", "tcpmap_lmdb.build", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"tcpmap-build: {shared_dir / 'map.lmdb'}: Permission denied\n"
    assert _snapshot(shared_dir) == before


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory holding a built table, then bind-mounted read-only onto itself."""
    directory = tmp_path / "ro"
    directory.mkdir()
    (directory / "map").write_text("old value\n")
    assert build.main(["-q", str(directory / "map")]) == 0
    _mount("--bind", str(directory), str(directory))
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_read_only_file_system(read_only_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Even root cannot write a read-only mount: exit 1, one line naming the table, table intact."""
    before = _snapshot(read_only_dir)
    output = read_only_dir.parent / "elsewhere"
    output.write_text("new value\n")
    target = read_only_dir / "map.lmdb"
    assert build.main(["-q", "-o", str(target), str(output)]) == 1
    assert capsys.readouterr().err == f"tcpmap-build: {target}: Read-only file system\n"
    assert _snapshot(read_only_dir) == before
