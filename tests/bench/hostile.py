"""What hostile clients cost the server: its RSS growth, per connection and in all.

    .venv/bin/python tests/bench/hostile.py never-reading 1000
    .venv/bin/python tests/bench/hostile.py trickling 1 --bytes 100000
    .venv/bin/python tests/bench/hostile.py trickling 1000 --bytes 2000

idle: each connection sends one request, then nothing. never-reading: each
connection (receive buffer 4 KiB) pipelines 4,000 socketmap requests for a
99 KB value and never reads. trickling: each connection sends a
socketmap request of 100,000 bytes one byte per TCP segment (round robin over
the connections, so the server has read each byte before the next comes),
stopping after --bytes. Prints the server's VmRSS before, at its peak, and the
growth per connection. The server is tcpmap-server from --source (a checkout's
top directory, default this one), on 127.0.0.1, with a fresh table in a
temporary directory. Loopback only; bounded by the counts given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def make_table(path: Path) -> None:
    """A Postfix-style table: keys and values with their trailing NUL."""
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"alice\x00", b"here\x00")
        txn.put(b"huge\x00", b"h" * 99_000 + b"\x00")
    env.close()


def start(source: Path, maps: Path, connections: int) -> tuple[subprocess.Popen[str], int]:
    code = "from tcpmap_lmdb.cli import server_main; raise SystemExit(server_main())"
    args = ["--maps", str(maps), "--listen", "socketmap:127.0.0.1:0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args, "--max-connections", str(connections + 10)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=maps,  # not a checkout: python -c puts the working directory first on sys.path
        env={**os.environ, "PYTHONPATH": str(source)},
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    raise RuntimeError("the server did not start")


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


class Clients(list[socket.socket]):
    """The hostile connections, and the server's RSS seen while they were opened."""

    peaks: list[int]


def open_clients(args: argparse.Namespace, port: int, sample: Callable[[], int]) -> Clients:
    """Open ARGS.connections clients of ARGS.kind and do what that kind does."""
    socks = Clients()
    socks.peaks = [0]
    if args.kind == "idle":
        for _ in range(args.connections):
            sock = connect(port)
            sock.send(b"13:virtual alice,")
            socks.append(sock)
    elif args.kind == "never-reading":
        request = b"12:virtual huge," * 4000
        for count in range(args.connections):
            sock = connect(port, rcvbuf=4096)
            with contextlib.suppress(BlockingIOError):
                sock.send(request)
            socks.append(sock)
            if count % 20 == 0:
                socks.peaks.append(sample())
    else:
        socks.extend(connect(port) for _ in range(args.connections))
        stream = b"100000:virtual " + b"k" * (100_000 - 15)
        for offset in range(min(args.bytes, len(stream))):
            for sock in socks:
                with contextlib.suppress(BlockingIOError):
                    sock.send(stream[offset : offset + 1])
            if args.connections == 1:
                time.sleep(0.00002)  # one byte per segment: let the server read it
            if offset % 100 == 0:
                socks.peaks.append(sample())
    return socks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["never-reading", "trickling", "idle"])
    parser.add_argument("connections", type=int)
    parser.add_argument("--bytes", type=int, default=100_000, help="trickled per connection")
    parser.add_argument("--source", type=Path, default=ROOT, help="where tcpmap_lmdb is")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to watch after")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 100), hard))
    with tempfile.TemporaryDirectory() as tmp:
        maps = Path(tmp)
        make_table(maps / "virtual.lmdb")
        proc, port = start(args.source, maps, args.connections)
        try:
            time.sleep(1.0)  # let the freshly started server settle
            base = peak = rss(proc.pid)
            socks = open_clients(args, port, lambda: rss(proc.pid))
            peak = max(peak, *socks.peaks)
            deadline = time.monotonic() + args.settle
            while time.monotonic() < deadline:
                peak = max(peak, rss(proc.pid))
                time.sleep(0.05)
            grown = peak - base
            print(
                f"{args.kind} x {args.connections}"
                + (f" ({args.bytes} bytes each)" if args.kind == "trickling" else "")
                + f": RSS {base / MiB:.1f} -> {peak / MiB:.1f} MiB,"
                f" +{grown / MiB:.1f} MiB, {grown / args.connections / 1024:.1f} KiB per connection"
            )
            for sock in socks:
                sock.close()
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
