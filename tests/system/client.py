"""A tcp_table client that connects over and over, for the restart checks of inside.sh.

Runs on the container's own python3 (stdlib only). Every lookup uses a new
connection, so every lookup goes through the listening socket. It counts the
outcomes until the --stop file appears (or after MAX_SECONDS), prints them and
exits 0 only if no connection was refused and no reply was wrong. A reset by a
stopping server is counted as a retry, not a failure: Postfix retries those.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready", type=Path, required=True, help="created after a few answers")
    parser.add_argument("--stop", type=Path, required=True, help="stop once this exists")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("key")
    parser.add_argument("value")
    args = parser.parse_args()
    wanted = f"200 {args.value}\n".encode()
    outcomes: Counter[str] = Counter()
    firsts: dict[str, str] = {}
    deadline = time.monotonic() + MAX_SECONDS
    while not args.stop.exists() and time.monotonic() < deadline:
        try:
            reply = lookup(args.host, args.port, args.key)
            outcome, detail = ("ok", "") if reply == wanted else ("bad", repr(reply))
        except ConnectionRefusedError as exc:
            outcome, detail = "refused", str(exc)
        except OSError as exc:
            outcome, detail = "retry", str(exc)
        outcomes[outcome] += 1
        firsts.setdefault(outcome, detail)
        if outcomes["ok"] == READY_AFTER:
            args.ready.touch()
    print(" ".join(f"{name}={outcomes[name]}" for name in ("ok", "retry", "refused", "bad")))
    for outcome, detail in firsts.items():
        if detail:
            print(f"first {outcome}: {detail}")
    return 0 if outcomes["ok"] >= READY_AFTER and not outcomes["refused"] + outcomes["bad"] else 1


if __name__ == "__main__":
    sys.exit(main())
