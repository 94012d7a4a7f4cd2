"""Running under systemd: inherited sockets, sd_notify, restarts, and the unit files.

No PID 1 systemd is needed: systemd-socket-activate and a small harness pass
listening sockets exactly as systemd does (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from activation import (
    SERVICE_UNIT,
    SOCKET_UNIT,
    Activated,
    NotifySocket,
    exec_start,
    free_port,
    tcp_listener,
    unit_setting,
    unix_listener,
)
from conftest import MakeTable
from postfix_tools import run_postfix

from tcpmap_lmdb import protocol

TABLE = {"alice@example.com": "alice@example.net", "Bob Smith": "bob, robert"}
SYSTEMD_TOOLS = "needs systemd's tools: apt-get install systemd (they are on every Debian system)"


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{tool} missing: {SYSTEMD_TOOLS}", pytrace=False)
    pytest.skip(f"{tool} missing: {SYSTEMD_TOOLS}")


@pytest.fixture
def db(tmp_path: Path, make_table: MakeTable) -> Path:
    return make_table(tmp_path / "virtual.lmdb", TABLE)


@pytest.fixture
def started() -> Iterator[list[Activated]]:
    processes: list[Activated] = []
    yield processes
    for process in processes:
        if process.proc.poll() is None:
            process.stop()


def lookup(address: tuple[str, int] | str, key: bytes, timeout: float = 10.0) -> bytes:
    """One lookup on a new connection; the raw reply line."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    if isinstance(address, tuple) and ":" in address[0]:
        family = socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(protocol.request(key))
        return sock.makefile("rb").readline()


def postmap_q(postfix_dir: Path, key: str, table: str) -> subprocess.CompletedProcess[bytes]:
    return run_postfix("postmap", postfix_dir, "-q", key, table)


# --- starting from systemd's sockets --------------------------------------------------


def test_systemd_socket_activate_starts_it_on_first_connection(
    db: Path, postfix_dir: Path, tmp_path: Path
) -> None:
    """systemd-socket-activate with the unit's ExecStart=: Postfix's client gets answers."""
    tool = require("systemd-socket-activate")
    port = free_port()
    proc = subprocess.Popen(
        [tool, "-l", f"127.0.0.1:{port}", "--fdname=tcp_table", *exec_start(db)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # The tool execs the server only when the first connection arrives, and
        # that connection waits in the backlog until the server accepts it.
        result = postmap_q(postfix_dir, "Alice@Example.com", f"tcp:127.0.0.1:{port}")
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"alice@example.net\n"
        result = postmap_q(postfix_dir, "bob smith", f"tcp:127.0.0.1:{port}")
        assert result.stdout == b"bob, robert\n"
    finally:
        proc.terminate()
        code = proc.wait(15)
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    assert code == 0, log
    assert "inherited socket 'tcp_table' from systemd" in log


def test_every_passed_socket_is_served(
    db: Path, tmp_path: Path, postfix_dir: Path, started: list[Activated]
) -> None:
    """IPv4, IPv6 and a unix socket passed together are all served, by name."""
    v4, v6 = tcp_listener("127.0.0.1"), tcp_listener("::1")
    unix = unix_listener(tmp_path / "tcpmap.sock")
    server = Activated(exec_start(db), [v4, v6, unix], ["v4", "v6", "local"])
    started.append(server)
    for name in ("v4", "v6", "local"):
        server.wait_for_log(f"inherited socket '{name}' from systemd")
    v4_port, v6_port = v4.getsockname()[1], v6.getsockname()[1]
    result = postmap_q(postfix_dir, "alice@example.com", f"tcp:127.0.0.1:{v4_port}")
    assert result.stdout == b"alice@example.net\n", result.stderr
    result = postmap_q(postfix_dir, "alice@example.com", f"tcp:[::1]:{v6_port}")
    assert result.stdout == b"alice@example.net\n", result.stderr
    # Postfix's tcp: client is inet-only; speak the protocol over the unix socket directly.
    assert lookup(str(tmp_path / "tcpmap.sock"), b"alice@example.com") == b"200 alice@example.net\n"


def test_listen_flag_is_ignored_when_systemd_passes_sockets(
    db: Path, started: list[Activated]
) -> None:
    """Sockets from systemd win over --listen, with a warning saying so."""
    v4 = tcp_listener("127.0.0.1")
    unused = free_port()
    server = Activated(exec_start(db, f"--listen 127.0.0.1:{unused}"), [v4], ["tcp_table"])
    started.append(server)
    server.wait_for_log("--listen is ignored")
    assert lookup(v4.getsockname(), b"alice@example.com") == b"200 alice@example.net\n"
    with pytest.raises(ConnectionRefusedError):
        lookup(("127.0.0.1", unused), b"alice@example.com")


# --- sd_notify -----------------------------------------------------------------------


def test_notifications_arrive_in_lifecycle_order(
    db: Path, tmp_path: Path, started: list[Activated]
) -> None:
    """READY (with STATUS), then RELOADING and READY on SIGHUP, then STOPPING on SIGTERM."""
    notify = NotifySocket(tmp_path / "notify.sock")
    v4 = tcp_listener("127.0.0.1")
    server = Activated(exec_start(db), [v4], ["tcp_table"], env={"NOTIFY_SOCKET": str(notify.path)})
    started.append(server)
    try:
        (ready,) = notify.wait_for("READY")
        assert ready["READY"] == "1"
        assert "virtual.lmdb: 2 records" in ready["STATUS"]
        # READY comes after the table is open: the first lookup is answered from it.
        assert lookup(v4.getsockname(), b"alice@example.com") == b"200 alice@example.net\n"
        server.proc.send_signal(signal.SIGHUP)
        reload = notify.wait_for("READY")
        assert [m for m in reload if "RELOADING" in m], reload
        assert "1 lookups" in reload[-1]["STATUS"]
        server.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING")
        assert server.stop() == 0
    finally:
        notify.close()


def test_status_reports_an_unavailable_table(tmp_path: Path, started: list[Activated]) -> None:
    """A missing table still gets READY (lookups answer 400) with the reason in STATUS."""
    notify = NotifySocket(tmp_path / "notify.sock")
    v4 = tcp_listener("127.0.0.1")
    missing = tmp_path / "missing.lmdb"
    server = Activated(
        exec_start(missing), [v4], ["tcp_table"], env={"NOTIFY_SOCKET": str(notify.path)}
    )
    started.append(server)
    try:
        (ready,) = notify.wait_for("READY")
        assert "table unavailable" in ready["STATUS"] and "missing" in ready["STATUS"]
        assert lookup(v4.getsockname(), b"alice@example.com").startswith(b"400 ")
    finally:
        notify.close()


def test_watchdog_pings_at_half_the_interval(
    db: Path, tmp_path: Path, started: list[Activated]
) -> None:
    """WATCHDOG_USEC=400000 gives WATCHDOG=1 about every 0.2 s."""
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    server = Activated(exec_start(db), [tcp_listener("127.0.0.1")], ["tcp_table"], env=env)
    started.append(server)
    try:
        notify.wait_for("READY")
        times = []
        for arrived, fields in notify.messages(timeout=2.0):
            if "WATCHDOG" in fields:
                times.append(arrived)
            if len(times) == 8:
                break
        assert len(times) == 8
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert 0.15 <= statistics.median(gaps) <= 0.3, gaps
    finally:
        notify.close()


def test_no_watchdog_pings_for_another_pid(
    db: Path, tmp_path: Path, started: list[Activated]
) -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ours."""
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
    server = Activated(exec_start(db), [tcp_listener("127.0.0.1")], ["tcp_table"], env=env)
    started.append(server)
    try:
        notify.wait_for("READY")
        assert [f for _, f in notify.messages(timeout=0.5) if "WATCHDOG" in f] == []
    finally:
        notify.close()


# --- restarts ------------------------------------------------------------------------


def test_restart_with_the_same_socket_refuses_no_connection(
    db: Path, started: list[Activated]
) -> None:
    """Stop and start the server while a client keeps connecting: nothing is refused."""
    listener = tcp_listener("127.0.0.1")
    address = listener.getsockname()
    first = Activated(exec_start(db), [listener], ["tcp_table"])
    started.append(first)
    first.wait_for_log("listening on")
    stop = threading.Event()
    outcomes: list[str] = []

    def client() -> None:
        deadline = time.monotonic() + 30  # bounded, whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                reply = lookup(address, b"alice@example.com", timeout=20)
            except ConnectionRefusedError:
                outcomes.append("refused")
                continue
            except OSError as exc:  # reset by a stopping server: Postfix retries
                outcomes.append(f"retry: {exc}")
                continue
            if reply == b"":  # closed before answering: Postfix reconnects and asks again
                outcomes.append("retry: EOF")
                continue
            outcomes.append("ok" if reply == b"200 alice@example.net\n" else f"bad {reply!r}")

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: outcomes.count("ok") >= 20)
        assert first.stop() == 0
        before = len(outcomes)
        second = Activated(exec_start(db), [listener], ["tcp_table"])
        started.append(second)
        wait_until(lambda: outcomes[before:].count("ok") >= 20)
    finally:
        stop.set()
        thread.join(40)
    assert "refused" not in outcomes
    assert [o for o in outcomes if o.startswith("bad")] == []
    assert second.stop() == 0


def wait_until(condition: object, timeout: float = 20.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)  # polling a condition with a deadline, not synchronising by sleep


# --- the unit files ------------------------------------------------------------------


@pytest.fixture
def units(tmp_path: Path) -> tuple[Path, ...]:
    """Every unit, with ExecStart='s binary pointed at this checkout (verify checks it exists).

    The service comes last.
    """
    server = exec_start(Path("/var/lib/tcpmap/virtual.lmdb"))[0]
    sockets = []
    for unit in sorted(SERVICE_UNIT.parent.glob("*.socket")):
        sockets.append(tmp_path / unit.name)
        sockets[-1].write_text(unit.read_text())
    service = tmp_path / "tcpmap.service"
    service.write_text(SERVICE_UNIT.read_text().replace("/usr/bin/tcpmap-server", server))
    return (*sockets, service)


def test_units_verify_clean(units: tuple[Path, ...]) -> None:
    """systemd-analyze verify: exit 0 and not one warning (typos only warn)."""
    tool = require("systemd-analyze")
    result = subprocess.run(
        [tool, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=units[0].parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_service_exposure_is_at_most_one(units: tuple[Path, ...]) -> None:
    """systemd-analyze security --offline: overall exposure 1.0 or lower."""
    tool = require("systemd-analyze")
    result = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=10", str(units[-1])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=units[0].parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level for tcpmap.service" in result.stdout


def test_socket_unit_listens_on_loopback_only() -> None:
    """The shipped socket listens on 127.0.0.1 and [::1], port 4242, never a wildcard."""
    assert unit_setting(SOCKET_UNIT, "ListenStream") == ["127.0.0.1:4242", "[::1]:4242"]
    assert unit_setting(SOCKET_UNIT, "BindIPv6Only") == ["ipv6-only"]
    assert unit_setting(SOCKET_UNIT, "Accept") == ["no"]


def test_service_reload_sends_sighup() -> None:
    """systemctl reload maps to SIGHUP, which re-opens the table."""
    assert unit_setting(SERVICE_UNIT, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert unit_setting(SERVICE_UNIT, "Type") == ["notify"]
