"""The bench driver: data, servers, load, build, memory, cold start, scale; one table.

    .venv/bin/python -m tests.bench [--quick] [--repeats N] [--server-path DIR] ...

Run in the bench environment (tests/bench/__main__.py sees to that). Results go
to stdout, tests/bench/results.md and tests/bench/lookups.png.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import procs, report
from .data import DataSet, build_source
from .procs import Run, Server

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROJECT_BIN = ROOT / ".venv" / "bin"
# The same package with its hot path compiled by mypyc (make compiled).
COMPILED_BIN = ROOT / ".venv-compiled" / "bin"
SERVER_CPU, LOADGEN_CPU = 0, 1  # one core each: neither steals the other's
IDLE_CONNECTIONS = report.IDLE_CONNECTIONS
# Times snapshot.take() (copy into a sealed memfd, then verify.check) of argv[1].
SNAPSHOT_TIMER = """
import sys, time
from pathlib import Path
from tcpmap_lmdb import snapshot
started = time.perf_counter()
taken = snapshot.take(Path(sys.argv[1]))
print(time.perf_counter() - started, taken.records)
"""
SATURATED_FROM, SATURATED_CPU = 16, 0.9
ACTIVATE_READY = re.compile(r"Listening on 127\.0\.0\.1:(\d+)")
POSTFIX_MAIN_CF = "compatibility_level = 3.6\n"
SOCKETMAP = "tcpmap-socketmap"  # tcpmap-server answering socketmap_table(5), same table
METERED = report.METERED  # tcpmap-server with a metrics listener (it times lookups), same table


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    parser.add_argument("--connections", default="1,16,64,256", help="comma-separated")
    parser.add_argument("--keys", type=int, default=1_000_000, help="table size")
    parser.add_argument("--scale-keys", type=int, default=10_000_000, help="large table size")
    parser.add_argument("--cold-runs", type=int, default=7, help="socket-activated starts")
    parser.add_argument(
        "--build-sizes",
        default="2000000,10000000",
        help="comma-separated source sizes (lines) for the build bench",
    )
    parser.add_argument(
        "--only",
        default="lookups,scale,build,memory,cold,snapshot,reload",
        help="comma-separated subset of lookups,scale,build,memory,cold,snapshot,reload",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 repeat of 1 s, no 10M table: a smoke test"
    )
    parser.add_argument("--data", type=Path, default=ROOT / ".venv-bench" / "data")
    parser.add_argument(
        "--server-path",
        type=Path,
        help="a directory holding another tcpmap_lmdb package to bench (PYTHONPATH)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and loadgen")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.10,
        help="redo a run when other processes used more than this share of a core",
    )
    parser.add_argument(
        "--min-server-cpu",
        type=float,
        default=SATURATED_CPU,
        help=f"redo a run (from {SATURATED_FROM} connections) where the server had less of a core",
    )
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md/lookups.png go")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target of issue 5 is missed"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.seconds, args.warmup, args.cold_runs = 1, 1.0, 0.5, 3
        args.only = args.only.replace("scale", "")
    if args.quick:
        args.build_sizes = "200000"
    args.connections = [int(c) for c in args.connections.split(",")]
    args.build_sizes = [int(n) for n in args.build_sizes.split(",")]
    args.only = set(filter(None, args.only.split(",")))
    return args


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results = report.Results(
            repeats=args.repeats, seconds=args.seconds, connections=args.connections
        )
        self.bin = args.data / "bin"
        self.loadgen = procs.compile_tool("loadgen", self.bin)
        self.trivial = procs.compile_tool("trivial", self.bin)
        self.small = DataSet(args.data, args.keys)
        self.large = DataSet(args.data, args.scale_keys)
        self.env = {"PYTHONPATH": str(args.server_path)} if args.server_path else {}
        self.ours: set[int] = {os.getpid()}
        self.server_cpu = None if args.no_pin else SERVER_CPU
        self.loadgen_cpu = None if args.no_pin else LOADGEN_CPU

    # --- servers --------------------------------------------------------------

    def tcpmap(
        self, data: DataSet, *extra: str, cpu: int | None = None, bin_dir: Path = PROJECT_BIN
    ) -> Server:
        argv = [str(bin_dir / "tcpmap-server"), "--db", str(data.table)]
        argv += ["--listen", "127.0.0.1:0", *extra]
        return Server(f"tcpmap-server ({bin_dir.parent.name})", procs.pinned(argv, cpu), self.env)

    def floor(self, data: DataSet, cpu: int | None = None) -> Server:
        """gevent and a bare LMDB get: what tcpmap-server's own work is measured from."""
        argv = [str(PROJECT_BIN / "python"), str(HERE / "floor.py"), "lmdb", "0", str(data.table)]
        return Server("floor", procs.pinned(argv, cpu))

    def tcpmap_socketmap(self, data: DataSet, cpu: int | None = None) -> Server:
        argv = [str(PROJECT_BIN / "tcpmap-server"), "--db", str(data.table)]
        argv += ["--listen", "socketmap:127.0.0.1:0"]
        return Server("tcpmap-server (socketmap)", procs.pinned(argv, cpu), self.env)

    def twisted(self, data: DataSet, cpu: int | None = None) -> Server:
        argv = [sys.executable, str(HERE / "twisted_server.py"), str(data.source), "0"]
        return Server("Twisted", procs.pinned(argv, cpu))

    def trivial_server(self, cpu: int | None = None) -> Server:
        argv = [str(self.trivial), "127.0.0.1", "0"]
        return Server("trivial", procs.pinned(argv, cpu))

    # --- lookups and scale --------------------------------------------------------

    def lookups(self) -> None:
        cpu = self.server_cpu
        servers: dict[str, tuple[Server, DataSet]] = {}
        if "lookups" in self.args.only:
            servers["tcpmap"] = (self.tcpmap(self.small, cpu=cpu), self.small)
            compiled = self.tcpmap(self.small, cpu=cpu, bin_dir=COMPILED_BIN)
            servers[report.COMPILED] = (compiled, self.small)
            servers["twisted"] = (self.twisted(self.small, cpu=cpu), self.small)
            servers["trivial"] = (self.trivial_server(cpu=cpu), self.small)
            servers[report.FLOOR] = (self.floor(self.small, cpu=cpu), self.small)
            servers[SOCKETMAP] = (self.tcpmap_socketmap(self.small, cpu=cpu), self.small)
            metered = self.tcpmap(self.small, "--listen", "metrics:127.0.0.1:0", cpu=cpu)
            servers[METERED] = (metered, self.small)
            # The same server as "tcpmap", started after METERED: what is left between
            # two identical processes (start order, memory placement) is not the metrics.
            servers[report.PLAIN_AFTER] = (self.tcpmap(self.small, cpu=cpu), self.small)
        if "scale" in self.args.only:
            if "tcpmap" not in servers:
                servers["tcpmap"] = (self.tcpmap(self.small, cpu=cpu), self.small)
            servers["tcpmap-10M"] = (self.tcpmap(self.large, cpu=cpu), self.large)
        try:
            ports = {name: server.port() for name, (server, _) in servers.items()}
            for name, (_, data) in servers.items():
                if name not in ("trivial", SOCKETMAP):
                    procs.wait_answering(ports[name], data.hit_key())
            self.ours = {os.getpid(), *(server.pid for server, _ in servers.values())}
            procs.wait_for_quiet(0.1, 60)
            for repeat in range(self.args.repeats):
                for conns in self.args.connections:
                    names = list(servers)
                    shift = repeat % len(names)  # no server always runs first
                    for name in names[shift:] + names[:shift]:
                        if not self.wanted(name, conns):
                            continue
                        server, data = servers[name]
                        socketmap = data.table.stem if name == SOCKETMAP else None
                        run = self.measure(ports[name], server.pid, data, conns, socketmap)
                        self.results.add_run(name, conns, run)
                        print(f"  {name:11s} {conns:4d} conns: {report.describe(run)}", flush=True)
        finally:
            for server, _ in servers.values():
                server.stop()

    def wanted(self, name: str, conns: int) -> bool:
        if name in ("tcpmap-10M", SOCKETMAP, METERED, report.PLAIN_AFTER):
            return conns in report.SCALE_CONNECTIONS
        if "lookups" in self.args.only:
            return True
        return name == "tcpmap" and conns in report.SCALE_CONNECTIONS

    def measure(
        self, port: int, pid: int, data: DataSet, conns: int, socketmap: str | None = None
    ) -> Run:
        """One run; redone (four times at most) when other processes disturbed it."""
        for _ in range(5):
            run = procs.load_run(
                self.loadgen,
                port=port,
                requests=data.requests,
                connections=conns,
                warmup=self.args.warmup,
                seconds=self.args.seconds,
                server_pid=pid,
                cpu=self.loadgen_cpu,
                ours=self.ours,
                socketmap=socketmap,
            )
            # From 16 connections on, every server here saturates its core when the
            # machine is quiet: less means something else had the core.
            starved = conns >= SATURATED_FROM and run.server_cpu < self.args.min_server_cpu
            if run.foreign_cpu <= self.args.max_foreign and not starved:
                break
            print(
                f"  (others used {run.foreign_cpu:.0%} of a core, the server "
                f"{run.server_cpu:.0%}: waiting for quiet, redoing)",
                flush=True,
            )
            procs.wait_for_quiet(0.1, 120)
        return run

    # --- build -------------------------------------------------------------------------

    def build(self) -> None:
        """tcpmap-build against postmap lmdb: on the same files, in key order and shuffled:
        records/s and peak RSS (/usr/bin/time's %M)."""
        for records in self.args.build_sizes:
            for order in ("shuffled", "sorted"):
                self.build_case(records, order)

    def build_case(self, records: int, order: str) -> None:
        source_file = build_source(self.args.data / "build", records, order)
        with tempfile.TemporaryDirectory(prefix="tcpmap-bench-", dir=self.args.data) as tmp:
            work = Path(tmp)
            (work / "main.cf").write_text(POSTFIX_MAIN_CF)
            source = work / "source"
            os.link(source_file, source)  # postmap writes SOURCE.lmdb beside it
            ours = work / "ours.lmdb"
            tools: dict[str, tuple[list[str], Path]] = {
                "tcpmap-build": (
                    [str(PROJECT_BIN / "tcpmap-build"), "-q", "-o", str(ours), str(source)],
                    ours,
                ),
                "postmap": (["postmap", "-c", str(work), f"lmdb:{source}"], work / "source.lmdb"),
            }
            repeats = self.args.repeats if records <= 2_000_000 else 1
            procs.wait_for_quiet(0.1, 60)
            for repeat in range(repeats):
                names = list(tools) if repeat % 2 == 0 else list(reversed(tools))
                for name in names:
                    argv, output = tools[name]
                    output.unlink(missing_ok=True)
                    seconds, peak_kib = timed_run(argv, limit=3600)
                    rate = records / seconds
                    case = (records, order, name)
                    self.results.builds.setdefault(case, []).append((rate, peak_kib / 1024))
                    print(
                        f"  {name:12s} {records:,} {order}: {seconds:.2f} s, {rate:,.0f} "
                        f"records/s, peak RSS {peak_kib / 1024:.0f} MiB",
                        flush=True,
                    )

    # --- memory ------------------------------------------------------------------------

    def memory(self) -> None:
        starts: dict[str, Callable[[], Server]] = {
            "tcpmap": lambda: self.tcpmap(self.small, "--max-connections", "10100"),
            report.COMPILED: lambda: self.tcpmap(
                self.small, "--max-connections", "10100", bin_dir=COMPILED_BIN
            ),
            "twisted": lambda: self.twisted(self.small),
        }
        procs.wait_for_quiet(0.1, 60)
        for _ in range(self.args.repeats):
            for name, start in starts.items():
                server = start()
                try:
                    port = server.port()
                    procs.wait_answering(port, self.small.hit_key())
                    idle = procs.memory(server.pid, self.small.table)
                    held = self.hold(port, server.pid)
                finally:
                    server.stop()
                self.results.memory.setdefault(name, []).append((idle, held))
                print(
                    f"  {name:8s} RSS idle {idle['VmRSS'] / 1024:.1f} MiB, with "
                    f"{IDLE_CONNECTIONS} connections {held['VmRSS'] / 1024:.1f} MiB (anon "
                    f"{held['RssAnon'] / 1024:.1f}, file {held['RssFile'] / 1024:.1f}, of it "
                    f"the table's mmap {held['RssTable'] / 1024:.1f})",
                    flush=True,
                )

    def hold(self, port: int, pid: int) -> dict[str, int]:
        argv = [str(self.loadgen), "hold", "127.0.0.1", str(port), str(self.small.requests)]
        holder = subprocess.Popen(
            [*argv, str(IDLE_CONNECTIONS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert holder.stdin is not None and holder.stdout is not None
        try:
            ready, _, _ = select.select([holder.stdout], [], [], 120)
            line = holder.stdout.readline().decode() if ready else ""
            if not line.startswith("ready"):
                raise RuntimeError(f"could not open {IDLE_CONNECTIONS} connections: {line!r}")
            time.sleep(1.0)  # let the server settle after the last reply
            return procs.memory(pid, self.small.table)
        finally:
            holder.stdin.close()
            holder.wait(30)

    # --- the table snapshot ------------------------------------------------------------

    def snapshot(self) -> None:
        """What serving a table costs (snapshot.py): the copy and check of the 1M-key table
        (and of the 10M one with scale), timed in a fresh interpreter, and the RSS of a
        server that serves it and the memory its snapshot holds (a memfd, outside RSS
        until lookups touch it)."""
        sets = [self.small, self.large] if "scale" in self.args.only else [self.small]
        for data in sets:
            size = data.table.stat().st_size
            seconds: dict[Path, list[float]] = {PROJECT_BIN: [], COMPILED_BIN: []}
            rss = []
            for _ in range(self.args.repeats):
                for bin_dir, taken in seconds.items():
                    # -P: the compiled install, not the checkout's .py files.
                    argv = [str(bin_dir / "python"), "-P", "-c", SNAPSHOT_TIMER, str(data.table)]
                    out = subprocess.run(
                        argv,
                        check=True,
                        capture_output=True,
                        text=True,
                        env={**os.environ, **self.env},
                    ).stdout
                    taken.append(float(out.split()[0]))
                server = self.tcpmap(data)
                try:
                    procs.wait_answering(server.port(), data.hit_key())
                    held = procs.memory(server.pid, data.table)
                finally:
                    server.stop()
                rss.append((held["VmRSS"], held["Snapshot"]))
                print(
                    f"  {data.records:,} keys, {size / 2**20:.0f} MiB: snapshot "
                    f"{seconds[PROJECT_BIN][-1]:.2f} s (compiled "
                    f"{seconds[COMPILED_BIN][-1]:.2f} s), "
                    f"server RSS {held['VmRSS'] / 1024:.1f} MiB, "
                    f"snapshot in memory {held['Snapshot'] / 1024:.1f} MiB (mapped and "
                    f"resident {held['RssTable'] / 1024:.1f})",
                    flush=True,
                )
            self.results.snapshots[data.records] = (
                size,
                seconds[PROJECT_BIN],
                seconds[COMPILED_BIN],
                rss,
            )

    # --- cold start ------------------------------------------------------------------

    def cold(self) -> None:
        """Pure Python and compiled in turns, so both see the same machine."""
        procs.wait_for_quiet(0.1, 60)
        for _ in range(self.args.cold_runs):
            for bin_dir, results in (
                (PROJECT_BIN, self.results.cold),
                (COMPILED_BIN, self.results.cold_compiled),
            ):
                millis = self.cold_start(bin_dir)
                results.append(millis)
                print(f"  {bin_dir.parent.name}: first reply after {millis:.1f} ms", flush=True)

    def cold_start(self, bin_dir: Path) -> float:
        """Milliseconds from connect() on a socket-activated port to the first reply."""
        server_argv = [str(bin_dir / "tcpmap-server"), "--db", str(self.small.table)]
        port = free_port()
        argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=tcp_table"]
        # The tool passes the daemon only the variables named with -E.
        argv += [f"--setenv={name}={value}" for name, value in self.env.items()]
        activator = Server("activate", [*argv, *server_argv], self.env, ACTIVATE_READY)
        try:
            activator.port()
            result = subprocess.run(
                [str(self.loadgen), "cold", "127.0.0.1", str(port), self.small.hit_key()],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        finally:
            activator.stop()
        fields = dict(item.split("=", 1) for item in result.stdout.split())
        if fields.get("reply") != "200":
            raise RuntimeError(f"cold start: unexpected reply {result.stdout!r}")
        return float(fields["first_reply_us"]) / 1000

    # --- reload ----------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP until the table, re-opened and re-checked, serves (compiled server)."""
        server = self.tcpmap(self.small, bin_dir=COMPILED_BIN)
        try:
            procs.wait_answering(server.port(), self.small.hit_key())
            procs.wait_for_quiet(0.1, 60)
            for _ in range(self.args.cold_runs):
                logged = len(server.log)
                began = time.monotonic()
                server.proc.send_signal(signal.SIGHUP)
                millis = (server.wait_for_log("INFO: opened ", logged, 60.0) - began) * 1000
                self.results.reload.append(millis)
                print(f"  SIGHUP to serving the re-checked table: {millis:.1f} ms", flush=True)
        finally:
            server.stop()


def timed_run(argv: list[str], limit: float) -> tuple[float, int]:
    """Seconds ARGV took to exit 0, and its peak RSS in KiB. A blocking wait:
    subprocess.run(timeout=) polls with sleeps of up to 50 ms, which rounds a
    sub-second build. The peak comes from /usr/bin/time's %M: a child of this
    (large) process would count this process's memory too, from before its exec."""
    with tempfile.NamedTemporaryFile("r", prefix="tcpmap-bench-time-") as peak:
        began = time.monotonic()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", peak.name, *argv])
        killer = threading.Timer(limit, proc.kill)
        killer.start()
        try:
            code = proc.wait()
        finally:
            killer.cancel()
        seconds = time.monotonic() - began
        if code != 0:
            raise subprocess.CalledProcessError(code, argv)
        return seconds, int(peak.read().split()[-1])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Let `finally:` stop the servers when make or the user interrupts.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    bench = Bench(args)
    build = [str(PROJECT_BIN / "tcpmap-build")]
    bench.small.prepare(build)
    if "scale" in args.only:
        bench.large.prepare(build)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("lookups", bench.lookups),
        ("build", bench.build),
        ("memory", bench.memory),
        ("cold", bench.cold),
        ("snapshot", bench.snapshot),
        ("reload", bench.reload),
    ]
    for name, step in steps:
        if name in args.only or (name == "lookups" and "scale" in args.only):
            print(f"bench: {name}", flush=True)
            step()
    results = bench.results
    results.machine = report.machine()
    results.elapsed = time.monotonic() - began
    results.server_path = str(args.server_path) if args.server_path else ""
    table = report.table(results)
    print(table)
    for problem in results.problems():
        print(f"bench: PROBLEM: {problem}")
    report.write(results, table, args.out)
    print(
        f"bench: wrote {args.out / 'results.md'} and {args.out / 'lookups.png'} "
        f"in {results.elapsed:.0f} s"
    )
    if results.problems() or (args.strict and results.failures()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
