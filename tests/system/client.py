"""A tcp_table client for the restart checks of inside.sh.

Runs on the container's own python3 (stdlib only). By default every lookup
uses a new connection, so every lookup goes through the listening socket; a
reset by a stopping server is counted as a retry, not a failure: Postfix
retries those. With --persistent N it holds N connections, as Postfix's
processes do, and sends its lookups over them in turn: then an EOF or a reset
is a failure (what the file descriptor store must prevent), and the
connection is opened again.

It counts the outcomes until the --stop file appears (or after MAX_SECONDS),
prints them and exits 0 only if nothing failed. The --ready file is created
after READY_AFTER answers, and again whenever it is removed and READY_AFTER
more answers have come: a caller removes it and waits for it to see progress.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections import Counter
from pathlib import Path

MAX_SECONDS = 120.0  # bounded, whatever happens
READY_AFTER = 20  # answers before --ready is created: the client is in its stride
TIMEOUT = 30.0  # a restart may hold a connection in the listen queue for seconds


def lookup(host: str, port: int, key: str) -> bytes:
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(f"get {key}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed before a whole reply")
            reply += chunk
        return reply


def ask(sock: socket.socket, key: str) -> bytes:
    sock.sendall(f"get {key}\n".encode())
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionResetError("EOF before a whole reply")
        reply += chunk
    return reply


class Persistent:
    """N connections used in turn; one that fails is opened again."""

    def __init__(self, host: str, port: int, count: int) -> None:
        self.address = (host, port)
        self.conns: list[socket.socket | None] = [None] * count
        self.turn = 0

    def lookup(self, key: str) -> bytes:
        slot = self.turn % len(self.conns)
        self.turn += 1
        sock = self.conns[slot]
        if sock is None:
            sock = self.conns[slot] = socket.create_connection(self.address, timeout=TIMEOUT)
        try:
            return ask(sock, key)
        except OSError:
            sock.close()
            self.conns[slot] = None
            raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready", type=Path, required=True, help="created after a few answers")
    parser.add_argument("--stop", type=Path, required=True, help="stop once this exists")
    parser.add_argument("--persistent", type=int, metavar="N", help="hold N connections")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("key")
    parser.add_argument("value")
    args = parser.parse_args()
    wanted = f"200 {args.value}\n".encode()
    outcomes: Counter[str] = Counter()
    firsts: dict[str, str] = {}
    persistent = Persistent(args.host, args.port, args.persistent) if args.persistent else None
    deadline = time.monotonic() + MAX_SECONDS
    progress = 0
    while not args.stop.exists() and time.monotonic() < deadline:
        try:
            if persistent is not None:
                reply = persistent.lookup(args.key)
            else:
                reply = lookup(args.host, args.port, args.key)
            outcome, detail = ("ok", "") if reply == wanted else ("bad", repr(reply))
        except ConnectionRefusedError as exc:
            outcome, detail = "refused", str(exc)
        except OSError as exc:
            outcome, detail = ("eof" if persistent else "retry"), str(exc)
        outcomes[outcome] += 1
        firsts.setdefault(outcome, detail)
        progress = progress + 1 if outcome == "ok" and not args.ready.exists() else 0
        if progress >= READY_AFTER:
            args.ready.touch()
            progress = 0
    names = ("ok", "retry", "eof", "refused", "bad")
    print(" ".join(f"{name}={outcomes[name]}" for name in names))
    for outcome, detail in firsts.items():
        if detail:
            print(f"first {outcome}: {detail}")
    failures = outcomes["refused"] + outcomes["bad"] + outcomes["eof"]
    return 0 if outcomes["ok"] >= READY_AFTER and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
