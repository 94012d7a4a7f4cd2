"""What the metrics cost: lookups/s with a metrics listener against without, interleaved A/B.

    .venv/bin/python -m tests.bench.metrics_cost [--rounds 8] [--seconds 2] [--connections 16]

Two servers on the same table, one with --listen metrics:127.0.0.1:0, are
loaded in turn by the bench's load generator (tests/bench/loadgen.c), on CPU 0
(server) and CPU 1 (load generator), closed loop, the bench's 80/20 keys. A
and B alternate, so drift on a shared machine falls on both; the figure is the
median of the per-round ratios B/A. The metrics server is scraped once per
round, so its counters are read as Prometheus would. Prints one line per round
and the summary; needs gcc and taskset. Bounded: ROUNDS x 2 x (SECONDS + 1 s).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from tcpmap_lmdb.config import Binding

from . import procs
from .data import DataSet

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
METRICS_READY = r"127\.0\.0\.1:(\d+) serves metrics"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.metrics_cost", description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=ROOT / ".venv-bench" / "data")
    args = parser.parse_args(argv)
    data = DataSet(args.data, args.keys)
    data.prepare([str(BIN / "tcpmap-build")])
    loadgen = procs.compile_tool("loadgen", args.data / "bin")
    base = [str(BIN / "tcpmap-server"), "--db", str(data.table), "--listen", "127.0.0.1:0"]
    plain = procs.Server("metrics off", procs.pinned(base, 0))
    metered = procs.Server(
        "metrics on", procs.pinned([*base, "--listen", "metrics:127.0.0.1:0"], 0)
    )
    try:
        ports = {server.name: server.port() for server in (plain, metered)}
        for port in ports.values():
            procs.wait_answering(port, data.hit_key())
        metrics_port = _metrics_port(metered)
        rates: dict[str, list[float]] = {plain.name: [], metered.name: []}
        cpu_us: dict[str, list[float]] = {plain.name: [], metered.name: []}
        ratios = []
        for round_ in range(args.rounds):
            order = (plain, metered) if round_ % 2 == 0 else (metered, plain)
            for server in order:
                run = procs.load_run(
                    loadgen,
                    port=ports[server.name],
                    requests=data.requests,
                    connections=args.connections,
                    warmup=0.5,
                    seconds=args.seconds,
                    server_pid=server.pid,
                    cpu=1,
                    ours={os.getpid(), plain.pid, metered.pid},
                )
                rates[server.name].append(run.rate)
                # Server CPU per lookup: steadier than lookups/s on a shared machine.
                cpu_us[server.name].append(run.server_cpu / run.rate * 1e6)
            _scrape(metrics_port)
            ratio = rates[metered.name][-1] / rates[plain.name][-1]
            ratios.append(ratio)
            print(
                f"round {round_ + 1}: off {rates[plain.name][-1]:,.0f}/s, "
                f"on {rates[metered.name][-1]:,.0f}/s, on/off {ratio:.3f}; server CPU per "
                f"lookup off {cpu_us[plain.name][-1]:.2f} us, on {cpu_us[metered.name][-1]:.2f} us",
                flush=True,
            )
        off, on = statistics.median(rates[plain.name]), statistics.median(rates[metered.name])
        cost = 1 - statistics.median(ratios)
        print(
            f"lookups/s at {args.connections} connections, median of {args.rounds} rounds: "
            f"metrics off {off:,.0f}, on {on:,.0f}; median on/off {statistics.median(ratios):.3f}"
            f" (cost {cost:.1%}; the rounds range {min(ratios):.3f} to {max(ratios):.3f})"
        )
        cpu_off, cpu_on = (
            statistics.median(cpu_us[plain.name]),
            statistics.median(cpu_us[metered.name]),
        )
        print(
            f"server CPU per lookup, median: metrics off {cpu_off:.2f} us, on {cpu_on:.2f} us "
            f"(+{cpu_on / cpu_off - 1:.1%}, so {1 - cpu_off / cpu_on:.1%} fewer lookups/s "
            "on a saturated core)"
        )
        _micro(data)
    finally:
        plain.stop()
        metered.stop()
    return 0


def _micro(data: DataSet, lookups: int = 100_000, rounds: int = 11) -> None:
    """In one process: the server glue answering one request per read (a real session,
    responder and table; the socket is a stand-in that takes every reply), without and
    with the metrics' timing, interleaved; nanoseconds per lookup."""
    from tcpmap_lmdb.config import ServerConfig  # noqa: PLC0415
    from tcpmap_lmdb.maps import Maps  # noqa: PLC0415
    from tcpmap_lmdb.server import Server, _IdleWatch  # noqa: PLC0415

    class Sink:  # _Wire's socket (sock.send), for _send_all
        def __init__(self) -> None:
            self.sock = self

        def send(self, reply: bytes) -> int:
            return len(reply)

    config = ServerConfig(db=data.table)
    maps = Maps({"table": data.table})
    maps.open_all()
    server = Server(config, maps, [])
    handle = server._handler(Binding("tcp"), maps)
    session = handle.__self__._new_session()  # type: ignore[attr-defined]
    keys = data.requests.read_bytes().split(b"\n")[:lookups]
    requests = [b"get " + key + b"\n" for key in keys if key]
    watch, wire = _IdleWatch(600.0), Sink()
    serves = {"off": server._serve, "on": server._serve_timed}
    timings: dict[str, list[float]] = {"off": [], "on": []}
    for round_ in range(rounds):
        for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            serve = serves[name]
            started = time.process_time_ns()  # CPU time: a shared machine's waits left out
            for request in requests:
                serve(wire, None, session, request, watch)  # type: ignore[arg-type]
            timings[name].append((time.process_time_ns() - started) / len(requests))
    watch.close()
    maps.close()
    off, on = min(timings["off"]), min(timings["on"])
    print(
        f"in process, CPU per lookup (server glue, session, responder, table), best of "
        f"{rounds}: metrics off {off:.0f} ns, on {on:.0f} ns: +{on - off:.0f} ns "
        f"(+{on / off - 1:.1%})"
    )


def _metrics_port(server: procs.Server, timeout: float = 30.0) -> int:
    """The metrics listener's port, from the server's log (polled, up to TIMEOUT)."""
    pattern = re.compile(METRICS_READY)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(server.log):
            if match := pattern.search(line):
                return int(match.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"no metrics listener in the log: {server.log[-5:]}")


def _scrape(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        if b"tcpmap_lookups_total" not in reply.read():
            raise RuntimeError("the scrape has no tcpmap_lookups_total")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
