"""Shared test fixtures: real LMDB tables in tmp dirs, a real server on loopback, raw sockets.

Nothing here mocks what the project owns: tables are written with python-lmdb
in Postfix's format (postfix-maps.md 4), the server is the real program in a
subprocess, and clients are plain stdlib sockets.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol, Self, overload

import lmdb
import pytest
from postfix_tools import postfix_config_dir, require_postfix

from tcpmap_lmdb import dbformat, protocol, socketmap
from tcpmap_lmdb.compiled import describe as describe_hot_path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0  # a cold interpreter importing gevent, on a loaded CI box
STOP_TIMEOUT = 15.0
REPLY_TIMEOUT = 5.0


# --- which form of the hot path is under test ---------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """With TCPMAP_EXPECT_COMPILED=1 (make test-compiled), stop unless the compiled
    hot path is what runs: here, and in a server started as the tests start one
    (an interpreter in the checkout, which must not import the source tree)."""
    del config
    if os.environ.get("TCPMAP_EXPECT_COMPILED") != "1":
        return
    compiled, line = describe_hot_path()
    child = subprocess.run(
        [sys.executable, "-m", "tcpmap_lmdb.compiled", "--require"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=START_TIMEOUT,
        check=False,
    )
    if not compiled or child.returncode != 0:
        pytest.exit(
            f"TCPMAP_EXPECT_COMPILED=1, but here: {line}; a server: "
            f"{(child.stdout + child.stderr).strip()} (PYTHONSAFEPATH=1 unset?)",
            returncode=3,
        )


# --- tables -----------------------------------------------------------------

Entries = Mapping[str, str] | Mapping[bytes, bytes]


def _bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else text


def make_table(path: Path, entries: Entries, *, folded: bool = True, info: bool = True) -> Path:
    """Publish a Postfix-format LMDB table at PATH, atomically, as tcpmap-build would.

    Keys are folded (unless folded=False) and stored with one trailing NUL,
    values with one trailing NUL; info=True adds our build record. The file is
    written beside PATH and renamed into place, so a server never sees it half done.
    """
    records = {}
    for key, value in entries.items():
        raw = _bytes(key)
        records[dbformat.stored_key(dbformat.fold(raw) if folded else raw)] = dbformat.stored_value(
            _bytes(value)
        )
    if info:
        build = dbformat.BuildInfo(
            folded=folded,
            syntax="postmap",
            records=len(entries),
            source=str(path.with_suffix("")),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        records[dbformat.META_KEY] = build.encode()
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        env = lmdb.open(temp, subdir=False, lock=False, map_size=1 << 26)
        try:
            with env.begin(write=True) as txn:
                cursor = txn.cursor()
                cursor.putmulti(sorted(records.items()), append=True)
            env.sync(True)
        finally:
            env.close()
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


class MakeTable(Protocol):
    def __call__(
        self, path: Path, entries: Entries, *, folded: bool = True, info: bool = True
    ) -> Path: ...


@pytest.fixture(name="make_table")
def make_table_fixture() -> MakeTable:
    """make_table(path, entries, *, folded=True, info=True) -> path."""
    return make_table


def raw_items(db: Path) -> dict[bytes, bytes]:
    """Every record of an LMDB file, META_KEY included, exactly as stored."""
    env = lmdb.open(str(db), subdir=False, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


# --- replies and raw sockets --------------------------------------------------


def check_reply(line: bytes) -> tuple[int, bytes]:
    """Assert LINE (LF included) is a reply Postfix's client accepts; (code, decoded text).

    tcp_table(5) and postfix-maps.md 1.3: 3 digits, one SP, text that
    hex-decodes, LF; at most 4096 bytes; never CR; never 200 with an empty value.
    """
    assert line.endswith(b"\n"), f"reply not LF-terminated: {line[:100]!r}"
    assert len(line) <= protocol.MAX_REPLY, f"reply of {len(line)} bytes: {line[:100]!r}"
    assert b"\r" not in line, f"reply contains CR: {line[:100]!r}"
    assert line.count(b"\n") == 1, f"reply contains an inner LF: {line[:100]!r}"
    assert re.fullmatch(rb"[245]\d\d ", line[:4]), f"bad status or separator: {line[:100]!r}"
    text = line[4:-1]
    decoded = protocol.unquote(text)  # raises ProtocolError: Postfix says "malformed reply"
    code = int(line[:3])
    if code // 100 == 2:
        assert decoded.partition(b"\x00")[0], f"200 with an empty value: {line[:100]!r}"
    return code, decoded


class RawConn:
    """A client socket and what it has received but not yet read as replies."""

    def __init__(self, where: tuple[str, int] | Path, timeout: float) -> None:
        if isinstance(where, Path):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(where))
        else:
            self.sock = socket.create_connection(where, timeout=timeout)
            # Requests go out when we send them, so split requests really arrive split.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _receive(self, deadline: float, timeout: float) -> None:
        """Add the next bytes to the buffer; fails at DEADLINE (TIMEOUT from the start) or EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no reply within {timeout}s; have {self._buffer[:100]!r}")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"server closed the connection; have {self._buffer[:100]!r}")
        self._buffer += chunk

    def read_eof(self, timeout: float = REPLY_TIMEOUT, *, reset_ok: bool = False) -> None:
        """Wait until the server hangs up (RESET_OK: a reset counts); nothing may arrive first."""
        assert self._buffer == b"", f"unread data: {self._buffer!r}"
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            if reset_ok:
                return
            raise
        assert data == b"", f"expected EOF, got {data[:100]!r}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Conn(RawConn):
    """One tcp_table connection on loopback; every reply read is checked by check_reply."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = REPLY_TIMEOUT):
        super().__init__((host, port), timeout)

    def read_line(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """The next reply line, LF included; fails on EOF, timeout or an over-long line."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            assert len(self._buffer) < protocol.MAX_REPLY, f"no LF in {len(self._buffer)} bytes"
            self._receive(deadline, timeout)
        line, _, self._buffer = self._buffer.partition(b"\n")
        check_reply(line + b"\n")
        return line + b"\n"

    def exchange(self, data: bytes) -> bytes:
        """Send DATA, read exactly one reply line, and check nothing else came with it."""
        self.send(data)
        line = self.read_line()
        assert self._buffer == b"", f"more than one reply: {line!r} then {self._buffer!r}"
        return line

    def ask(self, key: bytes | str) -> tuple[int, bytes]:
        """Look KEY up as Postfix does (hex-quoted get); (code, decoded text)."""
        return check_reply(self.exchange(protocol.request(_bytes(key))))


# --- socketmap replies and a raw client --------------------------------------------

SOCKETMAP_STATUSES = {b"OK", b"NOTFOUND", b"TEMP", b"PERM"}


def check_socketmap_reply(payload: bytes) -> tuple[bytes, bytes]:
    """Assert PAYLOAD (one reply netstring's data) is a reply Postfix's client accepts.

    socketmap_table(5), postfix-maps.md 2.1: at most 100000 bytes; a status word, SP,
    then text; OK carries a non-empty value, TEMP and PERM a reason, NOTFOUND nothing.
    """
    assert len(payload) <= socketmap.MAX_REPLY, f"reply of {len(payload)} bytes"
    status, sep, text = payload.partition(b" ")
    assert sep == b" ", f"no SP after the status: {payload[:100]!r}"
    assert status in SOCKETMAP_STATUSES, f"unknown status: {payload[:100]!r}"
    if status == b"NOTFOUND":
        assert text == b"", f"NOTFOUND with text: {payload[:100]!r}"
    else:
        assert text, f"{status!r} without a value or reason: {payload[:100]!r}"
    return status, text


def split_netstrings(data: bytes) -> list[bytes]:
    """The payloads of a byte stream that must be nothing but canonical netstrings."""
    payloads = []
    limit = len(str(socketmap.MAX_REPLY))
    while data:
        match = re.match(rb"(0|[1-9][0-9]{0,%d}):" % (limit - 1), data)
        assert match, f"not a netstring length: {data[:20]!r}"
        start = match.end()
        end = start + int(match.group(1))
        assert len(data) > end, f"netstring cut short: {data[:100]!r}"
        assert data[end : end + 1] == b",", f"netstring not ended by ',': {data[:100]!r}"
        payloads.append(data[start:end])
        data = data[end + 1 :]
    return payloads


class SocketmapConn(RawConn):
    """One raw socketmap connection; every reply read is checked as Postfix's client reads it.

    WHERE is a port on 127.0.0.1, a (host, port), or the path of a unix socket.
    """

    def __init__(self, where: int | tuple[str, int] | Path, timeout: float = REPLY_TIMEOUT) -> None:
        super().__init__(("127.0.0.1", where) if isinstance(where, int) else where, timeout)

    def read_payload(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """The payload of the next reply netstring, checked."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.match(rb"(\d{1,7}):", self._buffer)
            if match and len(self._buffer) > match.end() + int(match.group(1)):
                end = match.end() + int(match.group(1)) + 1
                (payload,) = split_netstrings(self._buffer[:end])
                self._buffer = self._buffer[end:]
                check_socketmap_reply(payload)
                return payload
            assert match or len(self._buffer) < 8, f"bad reply: {self._buffer[:100]!r}"
            self._receive(deadline, timeout)

    def read_reply(self, timeout: float = REPLY_TIMEOUT) -> tuple[bytes, bytes]:
        """The next reply, checked: (status, text)."""
        return check_socketmap_reply(self.read_payload(timeout))

    def ask_payload(self, name: bytes, key: bytes) -> bytes:
        """Look KEY up in map NAME as Postfix's dict_sockmap does; nothing else may arrive."""
        self.send(socketmap.request(name, key))
        payload = self.read_payload()
        assert self._buffer == b"", f"more than one reply: {payload!r} then {self._buffer!r}"
        return payload

    def ask(self, name: bytes, key: bytes) -> tuple[bytes, bytes]:
        """ask_payload(), as (status, text)."""
        return check_socketmap_reply(self.ask_payload(name, key))


# --- the server -----------------------------------------------------------------

# Runs the real CLI entry point (what .venv/bin/tcpmap-server runs) under the
# interpreter running the tests.
_ENTRY_POINTS = {  # pyproject.toml [project.scripts]
    "tcpmap-server": ("server_cli", "server_main"),
    "tcpmap-build": ("cli", "build_main"),
    "tcpmap-query": ("cli", "query_main"),
}


def command(program: str, *args: str | Path) -> list[str]:
    """The argv that runs PROGRAM (tcpmap-server, tcpmap-build, tcpmap-query) with ARGS in
    a fresh interpreter, as the installed command would."""
    module, main = _ENTRY_POINTS[program]
    launcher = f"from tcpmap_lmdb.{module} import {main}; raise SystemExit({main}())"
    return [sys.executable, "-c", launcher, *map(str, args)]


def server_command(*args: str | Path) -> list[str]:
    """The argv that runs tcpmap-server with ARGS in a fresh interpreter."""
    return command("tcpmap-server", *args)


@overload
def run_command(
    program: str,
    *args: str | Path,
    stdin: bytes | None = None,
    timeout: float = 60,
    text: Literal[False] = False,
) -> subprocess.CompletedProcess[bytes]: ...
@overload
def run_command(
    program: str, *args: str | Path, timeout: float = 60, text: Literal[True]
) -> subprocess.CompletedProcess[str]: ...
def run_command(
    program: str,
    *args: str | Path,
    stdin: bytes | None = None,
    timeout: float = 60,
    text: bool = False,
) -> subprocess.CompletedProcess[Any]:
    """PROGRAM ARGS as a user runs it (command()), to its end: output captured, the
    exit status left to the caller; TEXT: output as str."""
    return subprocess.run(
        command(program, *args),
        input=stdin,
        capture_output=True,
        text=text,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


class LoggedProcess:
    """A child process whose output lines are collected as they come, to wait for."""

    wait_timeout = REPLY_TIMEOUT  # the default for wait_for_log(s)

    def __init__(self, proc: subprocess.Popen[bytes], stream: IO[bytes] | None) -> None:
        """PROC writes its log to STREAM (one of its pipes)."""
        self.proc = proc
        self.logs: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._collect, args=(stream,), daemon=True)
        self._reader.start()

    def _collect(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        for raw in stream:
            with self._changed:
                self.logs.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def mark(self) -> int:
        """A position in the log: pass it as since= to wait for lines logged after now."""
        with self._changed:
            return len(self.logs)

    def wait_for_logs(
        self, pattern: str, count: int = 1, timeout: float | None = None, since: int = 0
    ) -> list[re.Match[str]]:
        """The first COUNT log lines from SINCE on that match PATTERN (re.search), waiting."""
        regex = re.compile(pattern)
        timeout = self.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for line in self.logs[since:] if (m := regex.search(line))]
                if len(matches) >= count:
                    return matches[:count]
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "the process exited" if self._eof else f"{timeout}s passed"
                    log = "\n".join(self.logs)
                    raise AssertionError(f"{count} x {pattern!r} not logged; {why}. Log:\n{log}")
                self._changed.wait(remaining)

    def wait_for_log(
        self, pattern: str, timeout: float | None = None, since: int = 0
    ) -> re.Match[str]:
        """The first log line from SINCE on that matches PATTERN (re.search), waiting for it."""
        return self.wait_for_logs(pattern, 1, timeout, since)[0]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait (bounded), return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout}s after SIGTERM") from None
        self._reader.join(timeout)
        return returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def check_clean_exit(self) -> None:
        """Stop it; it must exit 0 without a traceback."""
        returncode = self.stop()
        log = "\n".join(self.logs)
        assert returncode == 0, f"exit status {returncode}. Log:\n{log}"
        assert "Traceback" not in log, log


def start_server(args: Sequence[str | Path], prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """tcpmap-server ARGS (run through PREFIX, e.g. setpriv), its log on stdout."""
    return subprocess.Popen(
        [*prefix, *server_command(*args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


_LISTENING = re.compile(r"INFO: listening on (\S+):(\d+)$")


class ServerProcess(LoggedProcess):
    """tcpmap-server --db DB ARGS, started through PREFIX; up once it listens."""

    def __init__(self, db: Path, args: tuple[str, ...], prefix: Sequence[str] = ()) -> None:
        self.db = db
        proc = start_server(("--db", db, *args), prefix)
        super().__init__(proc, proc.stdout)
        try:
            match = self.wait_for_log(_LISTENING.pattern, timeout=START_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        self.host = match.group(1)
        self.port = int(match.group(2))
        self.address = ("127.0.0.1", self.port)

    def connect(self, timeout: float = REPLY_TIMEOUT) -> Conn:
        return Conn(self.port, timeout=timeout)


class StartServer(Protocol):
    def __call__(self, db: Path, *args: str) -> ServerProcess: ...


def assert_refused_beyond_loopback(*args: str | Path) -> None:
    """tcpmap-server ARGS must exit 2 at start, explaining why, before listening."""
    result = subprocess.run(
        server_command(*args),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "authentication" in result.stderr
    assert "--allow-remote" in result.stderr
    assert "listening on" not in result.stderr


@pytest.fixture
def server() -> Iterator[StartServer]:
    """server(db, *args) starts tcpmap-server on 127.0.0.1:0; teardown stops it, expects 0."""
    started: list[ServerProcess] = []

    def start(db: Path, *args: str) -> ServerProcess:
        if not any(arg == "--listen" or arg.startswith("--listen=") for arg in args):
            args = ("--listen", "127.0.0.1:0", *args)
        process = ServerProcess(db, args)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.returncode is None:
            process.check_clean_exit()
        assert not [line for line in process.logs if "Traceback" in line], "\n".join(process.logs)


# --- Postfix's own tools ------------------------------------------------------------


@pytest.fixture
def postfix_dir(tmp_path: Path) -> Path:
    """A config dir for `postmap -c DIR`; skips without Postfix (fails under CI=true)."""
    require_postfix()
    return postfix_config_dir(tmp_path)
