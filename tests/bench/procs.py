"""Processes of the bench: compiling the C tools, the servers, the load generator, CPU use.

Everything listens on 127.0.0.1 only, on a port the kernel picks (each server
logs "listening on 127.0.0.1:PORT"), and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT = 120.0  # Twisted reads 10M lines into a dict in well under this
CLK_TCK = os.sysconf("SC_CLK_TCK")


def compile_tool(name: str, out_dir: Path) -> Path:
    """gcc -O2 tests/bench/NAME.c into OUT_DIR/NAME."""
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / name
    source = HERE / f"{name}.c"
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(binary), str(source)]
    subprocess.run(cmd, check=True)
    return binary


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


class Server:
    """A server subprocess; its stderr is collected, its port read from its log."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        ready: re.Pattern[str] = LISTENING,
    ) -> None:
        self.name = name
        self._pattern = ready
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        self.log_times: list[float] = []  # when each line of log arrived
        self._logged = threading.Condition()
        self._port: int | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._logged:
                self.log.append(line)
                self.log_times.append(time.monotonic())
                self._logged.notify_all()
            match = self._pattern.search(line)
            if match and self._port is None:
                self._port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    def wait_for_log(self, text: str, after: int, timeout: float) -> float:
        """When (time.monotonic()) a line containing TEXT was logged, from line AFTER on."""
        deadline = time.monotonic() + timeout
        with self._logged:
            while True:
                for index in range(after, len(self.log)):
                    if text in self.log[index]:
                        return self.log_times[index]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.name} did not log {text!r}: {self.log[-5:]}")
                self._logged.wait(left)

    def port(self, timeout: float = START_TIMEOUT) -> int:
        self._ready.wait(timeout)
        if self._port is None:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self.log[-5:]}")
        return self._port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._reader.join(timeout)


def wait_answering(port: int, key: str, timeout: float = 300.0) -> None:
    """Wait until the server answers KEY with 200: a table is opened (and checked)
    after the server starts listening, and lookups before that are 400."""
    deadline = time.monotonic() + timeout
    last = b""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(f"get {key}\n".encode())
                last = sock.recv(4096)
                if last.startswith(b"200 "):
                    return
        except OSError as exc:
            last = str(exc).encode()
        time.sleep(0.2)
    raise RuntimeError(f"no 200 for {key} from port {port} in {timeout:.0f} s: {last!r}")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy (user, nice, system) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return sum(int(x) for x in fields[1:4]) / CLK_TCK


def others_cpu(ours: set[int]) -> dict[int, float]:
    """CPU seconds of every process not in OURS, by pid (the ones alive now)."""
    used = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in ours:
            try:
                used[int(entry.name)] = process_cpu(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
    return used


def memory(pid: int, table: Path) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem in KiB, and RssTable: the resident pages of
    TABLE's mmap (the server maps a sealed memfd copy of it, named tcpmap:NAME: see
    tcpmap_lmdb/snapshot.py; the peer maps nothing), and Snapshot: that memfd's size in
    memory, which RSS counts only as far as lookups have touched it."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[name] = int(rest.split()[0])
    out["RssTable"] = 0
    in_table = False
    targets = {str(table.resolve()), f"/memfd:tcpmap:{table.name}"}
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            fields = line.split()
            in_table = len(fields) > 5 and fields[5] in targets
        elif in_table and first == "Rss:":
            out["RssTable"] += int(line.split()[1])
    # The snapshot's own memory, mapped or not: the memfd's allocated blocks (LMDB
    # holds a second descriptor on it: count each inode once).
    held = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(f"/memfd:tcpmap:{table.name} "):
                st = fd.stat()
                held[st.st_ino] = st.st_blocks // 2
    out["Snapshot"] = sum(held.values())
    return out


@dataclass
class Run:
    """One closed-loop run of the load generator against one server."""

    rate: float
    p50: float  # microseconds
    p99: float
    p999: float
    ok: int
    notfound: int
    other: int
    errors: int
    server_cpu: float  # share of one core the server used
    loadgen_cpu: float  # share of one core the load generator used
    foreign_cpu: float  # share of one core used by processes not ours


def load_run(
    loadgen: Path,
    *,
    port: int,
    requests: Path,
    connections: int,
    warmup: float,
    seconds: float,
    server_pid: int,
    cpu: int | None,
    ours: set[int],
    socketmap: str | None = None,
) -> Run:
    argv = [str(loadgen), "run", "127.0.0.1", str(port), str(requests), str(connections)]
    argv += [str(warmup), str(seconds)]
    others0 = others_cpu(ours)
    busy0, server0 = machine_busy(), process_cpu(server_pid)
    before = os.times()
    limit = warmup + seconds + 60
    env = {**os.environ, "LOADGEN_SOCKETMAP": socketmap} if socketmap else None
    result = subprocess.run(
        pinned(argv, cpu), check=False, capture_output=True, text=True, timeout=limit, env=env
    )
    after = os.times()
    busy1, server1 = machine_busy(), process_cpu(server_pid)
    # Two views of the others: /proc/stat sees processes that came and went, the
    # per-process scan sees softirq-free CPU of the long-lived ones.
    others1 = others_cpu(ours)
    scanned = sum(used - others0.get(pid, 0.0) for pid, used in others1.items())
    if result.returncode not in (0, 1) or "rate=" not in result.stdout:
        raise RuntimeError(f"loadgen failed: {result.stderr.strip()}")
    fields = dict(item.split("=", 1) for item in result.stdout.split())
    elapsed = warmup + seconds
    loadgen_seconds = after.children_user - before.children_user
    loadgen_seconds += after.children_system - before.children_system
    used_by_us = (server1 - server0) + loadgen_seconds
    return Run(
        rate=float(fields["rate"]),
        p50=float(fields["p50_us"]),
        p99=float(fields["p99_us"]),
        p999=float(fields["p999_us"]),
        ok=int(fields["ok"]),
        notfound=int(fields["notfound"]),
        other=int(fields["other"]),
        errors=int(fields["errors"]),
        server_cpu=(server1 - server0) / elapsed,
        loadgen_cpu=loadgen_seconds / elapsed,
        foreign_cpu=max(0.0, (busy1 - busy0 - used_by_us) / elapsed, scanned / elapsed),
    )


def wait_for_quiet(threshold: float, max_wait: float, interval: float = 1.0) -> float:
    """Wait until the machine's busy CPU is below THRESHOLD (share of one core) for two
    intervals running, or MAX_WAIT seconds; the last measured busy share."""
    deadline = time.monotonic() + max_wait
    quiet = 0
    while True:
        busy0 = machine_busy()
        time.sleep(interval)
        share = (machine_busy() - busy0) / interval
        quiet = quiet + 1 if share < threshold else 0
        if quiet >= 2 or time.monotonic() >= deadline:
            return share
