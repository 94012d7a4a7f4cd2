"""Postfix's own lookups over lmdb:, tcp: and socketmap:, side by side on the same table.

    .venv/bin/python -m tests.bench.postfix_maps [--keys 100000] [--lookups 50000] [--runs 3]

One table built by tcpmap-build; `postmap -q - TYPE:NAME` reads the bench's
request keys (80% hits) on stdin and looks each up, one at a time, as a Postfix
daemon does: in process with lmdb:, through tcpmap-server with tcp: and
socketmap: (one connection, request then reply). Prints lookups/s, the best of
RUNS, for each. Needs postmap (Postfix with postfix-lmdb). Loopback only;
bounded by RUNS x 3 postmap runs of at most 120 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import procs
from .data import DataSet

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
POSTMAP_LIMIT = 120.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.postfix_maps", description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000, help="table size")
    parser.add_argument("--lookups", type=int, default=50_000, help="keys per postmap run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / ".venv-bench" / "data")
    args = parser.parse_args(argv)
    postmap = shutil.which("postmap", path="/usr/sbin:/usr/local/sbin:/usr/bin")
    if postmap is None:
        print("postmap not found: apt-get install postfix postfix-lmdb", file=sys.stderr)
        return 2
    data = DataSet(args.data, args.keys)
    data.prepare([str(BIN / "tcpmap-build")])
    keys = b"\n".join(data.requests.read_bytes().split(b"\n")[: args.lookups]) + b"\n"
    with tempfile.TemporaryDirectory(prefix="tcpmap-bench-") as tmp:
        config = Path(tmp)
        (config / "main.cf").write_text("compatibility_level = 3.6\n")
        an_hour_ago = time.time() - 3600  # postconf waits for a main.cf under a second old
        os.utime(config / "main.cf", (an_hour_ago, an_hour_ago))
        table = data.table.with_suffix("")  # lmdb:NAME is NAME.lmdb
        argv_base = [str(BIN / "tcpmap-server"), "--db", str(data.table)]
        tcp = procs.Server("tcp", [*argv_base, "--listen", "127.0.0.1:0"])
        socketmap = procs.Server("socketmap", [*argv_base, "--listen", "socketmap:127.0.0.1:0"])
        try:
            tcp_port, socketmap_port = tcp.port(), socketmap.port()
            procs.wait_answering(tcp_port, data.hit_key())
            maps = {
                "lmdb:": f"lmdb:{table}",
                "tcp: (tcpmap-server)": f"tcp:127.0.0.1:{tcp_port}",
                "socketmap: (tcpmap-server)": f"socketmap:inet:127.0.0.1:{socketmap_port}:table",
            }
            found = {}
            for name, spec in maps.items():
                rates = []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    result = subprocess.run(
                        [postmap, "-c", str(config), "-q", "-", spec],
                        input=keys,
                        capture_output=True,
                        timeout=POSTMAP_LIMIT,
                        check=False,
                    )
                    elapsed = time.perf_counter() - started
                    if result.returncode not in (0, 1) or result.stderr:
                        raise RuntimeError(f"postmap {spec}: {result.stderr.decode()[:300]}")
                    rates.append(args.lookups / elapsed)
                    found[name] = result.stdout.count(b"\n")
                print(
                    f"{name:42} {max(rates):>9,.0f} lookups/s "
                    f"(best of {args.runs}; {found[name]:,} of {args.lookups:,} found)",
                    flush=True,
                )
            if len(set(found.values())) != 1:
                raise RuntimeError(f"the three answered differently: {found}")
        finally:
            tcp.stop()
            socketmap.stop()
    print(
        f"postmap {_version(postmap, config)}: one process, one key at a time, "
        f"{args.keys:,}-key table, keys as in tests/bench (80% found)"
    )
    return 0


def _version(postmap: str, config: Path) -> str:
    postconf = Path(postmap).with_name("postconf")
    result = subprocess.run(
        [str(postconf), "-c", str(config), "-d", "-h", "mail_version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout.strip() or "(version unknown)"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
