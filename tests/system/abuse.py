"""Hostile clients against the installed, hardened tcpmap.service, for inside.sh.

Runs on the container's own python3 (stdlib only), bounded in count and time.
Each case prints "ok CASE" or "FAIL CASE: why"; the exit status is 0 only if
all passed. The cases are the robustness suite's (tests/test_robustness.py,
test_limits.py) in miniature: garbage requests, an over-long line, a client
that never reads, a connection flood, a bad netstring; a control client must be
answered promptly throughout.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import sys
import threading
import time

HOST, PORT = "127.0.0.1", 4242
KEY, VALUE = b"alice@example.com", sys.argv[1].encode() if len(sys.argv) > 1 else b""
TIMEOUT = 10.0
REPLY = re.compile(rb"[0-9]{3} ([\x21-\x24\x26-\x7e]|%[0-9A-Fa-f]{2})*\n")


def connect() -> socket.socket:
    return socket.create_connection((HOST, PORT), timeout=TIMEOUT)


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def control() -> float:
    """One lookup on a new connection: the right answer, and how long it took."""
    started = time.monotonic()
    with connect() as sock:
        sock.sendall(b"get " + KEY + b"\n")
        reply = read_line(sock)
    if reply != b"200 " + VALUE + b"\n":
        raise AssertionError(f"control lookup answered {reply!r}")
    return time.monotonic() - started


def garbage() -> None:
    """300 random request lines: every reply obeys the grammar, none is a 200."""
    rng = random.Random(20261125)  # noqa: S311 - reproducible test input, not a secret
    with connect() as sock:
        # A good request first: a stream that starts with garbage is refused and closed.
        sock.sendall(b"get " + KEY + b"\n")
        if read_line(sock) != b"200 " + VALUE + b"\n":
            raise AssertionError("the first lookup failed")
        for _ in range(300):
            line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            line = line.replace(b"\n", b"")
            if line.startswith(b"get "):
                line = b"x" + line
            sock.sendall(line + b"\n")
            reply = read_line(sock)
            if not REPLY.fullmatch(reply) or len(reply) > 4096 or reply.startswith(b"2"):
                raise AssertionError(f"{line[:40]!r} was answered {reply[:80]!r}")
    control()


def over_long_line() -> None:
    """A 100 kB get line (no table has such a key): dropped as it comes, 500 at its LF, and
    the connection stays."""
    with connect() as sock:
        sock.sendall(b"get " + b"a" * 100_000 + b"\n")
        reply = read_line(sock)
        if not reply.startswith(b"500 "):
            raise AssertionError(f"answered {reply[:80]!r}")
        sock.sendall(b"get " + KEY + b"\n")
        if read_line(sock) != b"200 " + VALUE + b"\n":
            raise AssertionError("the connection did not go on")
    control()


def never_reads() -> None:
    """A client pipelining 50,000 gets without reading; the control client stays prompt."""
    hog = connect()
    stop = threading.Event()

    def pipeline() -> None:
        with contextlib.suppress(OSError):  # we hang up on it ourselves
            hog.sendall((b"get " + KEY + b"\n") * 50_000)
        stop.set()

    sender = threading.Thread(target=pipeline, daemon=True)
    sender.start()
    slowest = max(control() for _ in range(20))
    hog.close()
    sender.join(TIMEOUT)
    if slowest > 1.0:
        raise AssertionError(f"the control client waited {slowest:.2f} s")


def flood() -> None:
    """300 connections at once, each asking once: all answered right."""
    socks = [connect() for _ in range(300)]
    try:
        for sock in socks:
            sock.sendall(b"get " + KEY + b"\n")
        for sock in socks:
            reply = read_line(sock)
            if reply != b"200 " + VALUE + b"\n":
                raise AssertionError(f"answered {reply!r}")
    finally:
        for sock in socks:
            sock.close()
    control()


CASES = {
    "garbage requests": garbage,
    "over-long line": over_long_line,
    "a client that never reads": never_reads,
    "connection flood": flood,
}


def main() -> int:
    failed = 0
    deadline = time.monotonic() + 120  # bounded, whatever happens
    for name, case in CASES.items():
        if time.monotonic() > deadline:
            print(f"FAIL {name}: out of time")
            failed += 1
            continue
        try:
            case()
        except (AssertionError, OSError) as exc:
            print(f"FAIL {name}: {exc}")
            failed += 1
        else:
            print(f"ok {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
