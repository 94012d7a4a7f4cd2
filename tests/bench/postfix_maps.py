"""Postfix's own lookups over lmdb:, tcp: and socketmap:, side by side on the same table.

    .venv/bin/python -m tests.bench.postfix_maps [--keys 100000] [--lookups 50000] [--runs 3]

One table built by tcpmap-build; `postmap -q - TYPE:NAME` reads the bench's
request keys (80% hits) on stdin and looks each up, one at a time, as a Postfix
daemon does: in process with lmdb:, through tcpmap-server with tcp: (pure Python
and, when `make compiled` has built it, compiled) and socketmap: (one
connection, request then reply), and through Twisted's tcp_table server serving
the same source from a dict. Prints lookups/s, the best of RUNS, for each, and
writes them to tests/bench/postfix_maps.md (--out). Needs postmap (Postfix with
postfix-lmdb) and the bench environment (Twisted: python -m tests.bench makes
it). Loopback only; bounded by RUNS x 5 postmap runs of at most 120 s.
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
COMPILED_BIN = ROOT / ".venv-compiled" / "bin"
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
POSTMAP_LIMIT = 120.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.postfix_maps", description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000, help="table size")
    parser.add_argument("--lookups", type=int, default=50_000, help="keys per postmap run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / ".venv-bench" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("postfix_maps.md"))
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
        socketmap_argv = [*argv_base, "--listen", "socketmap:127.0.0.1:0"]
        servers = {
            "tcp": procs.Server("tcp", [*argv_base, "--listen", "127.0.0.1:0"]),
            "socketmap": procs.Server("socketmap", socketmap_argv),
        }
        if (COMPILED_BIN / "tcpmap-server").exists():
            argv = [str(COMPILED_BIN / "tcpmap-server"), "--db", str(data.table)]
            servers["compiled"] = procs.Server("compiled", [*argv, "--listen", "127.0.0.1:0"])
        if BENCH_PYTHON.exists():
            argv = [str(BENCH_PYTHON), str(Path(__file__).with_name("twisted_server.py"))]
            servers["twisted"] = procs.Server("Twisted", [*argv, str(data.source), "0"])
        rows = []
        try:
            port = {name: server.port() for name, server in servers.items()}
            for name in ("tcp", "compiled", "twisted"):
                if name in port:
                    procs.wait_answering(port[name], data.hit_key())
            maps = {
                "lmdb: (in process)": f"lmdb:{table}",
                "tcp: (tcpmap-server)": f"tcp:127.0.0.1:{port['tcp']}",
                "tcp: (tcpmap-server, compiled)": f"tcp:127.0.0.1:{port.get('compiled')}",
                "socketmap: (tcpmap-server)": f"socketmap:inet:127.0.0.1:{port['socketmap']}:table",
                "tcp: (Twisted)": f"tcp:127.0.0.1:{port.get('twisted')}",
            }
            found = {}
            for name, spec in maps.items():
                if spec.endswith(":None"):
                    print(f"{name:42} not run (make compiled; python -m tests.bench)")
                    continue
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
                rows.append(f"| `{name}` | {max(rates):,.0f} | {found[name]:,} |")
            if len(set(found.values())) != 1:
                raise RuntimeError(f"the maps answered differently: {found}")
        finally:
            for server in servers.values():
                server.stop()
        what = (
            f"postmap {_version(postmap, config)}: one process, one key at a time, "
            f"{args.lookups:,} lookups, {args.keys:,}-key table, keys as in tests/bench "
            f"(80% found); best of {args.runs} runs, {time.strftime('%Y-%m-%d %H:%M')}"
        )
    print(what)
    lines = ["| map | lookups/s | found |", "|---|---|---|", *rows]
    args.out.write_text(f"`postmap -q -` batch lookups: {what}\n\n" + "\n".join(lines) + "\n")
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
