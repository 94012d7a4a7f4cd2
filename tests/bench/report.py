"""Results of one bench run: medians, the table (text and markdown), the chart, the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .data import HIT_RATIO
from .procs import Run

ROOT = Path(__file__).resolve().parents[2]
IDLE_CONNECTIONS = 10_000  # held open for the memory rows
SCALE_CONNECTIONS = (16, 64)
COMPILED = "compiled"  # tcpmap-server with its hot path compiled by mypyc (.venv-compiled)
FLOOR = "floor"  # tests/bench/floor.py lmdb: gevent, a greenlet per connection, a bare LMDB get
# Targets of issue 16, for the compiled server: (connections, minimum ratio of
# lookups/s to Twisted's); the pure-Python server is the reference beside it.
RATE_TARGETS = {1: 1.15, 16: 2.0, 64: 2.0}
P99_TARGET = (64, 0.6)  # p99 at 64 connections at most 0.6x Twisted's
RSS_TARGET_MIB = 64.0
COLD_TARGET_MS = 150.0
SCALE_TARGET = 0.90  # 10M-key lookups/s at least 90% of the 1M-key figure
BUILD_TARGETS = {"shuffled": 1.5, "sorted": 2.0}  # issue 17: records/s over postmap's
BUILD_RSS_TARGET_MIB = 256
METERED = "tcpmap-metrics"  # tcpmap-server with --listen metrics:...: it times lookups
PLAIN_AFTER = "tcpmap-again"  # tcpmap-server as "tcpmap", started after METERED
METRICS_TARGET = 0.97  # issue 13: metrics cost at most 3% of lookups/s
HEADROOM_TARGET = 3.0  # the load generator drives the trivial responder this far past us
LABELS = {"tcpmap": "tcpmap-server", "twisted": "Twisted", "trivial": "trivial (C)"}
CHART_LABELS = {
    COMPILED: "tcpmap-server, compiled (mypyc)",
    "tcpmap": "tcpmap-server, pure Python",
    "twisted": "Twisted",
    FLOOR: "floor: gevent + bare LMDB get",
    "trivial": "trivial (C)",
}
Memory = tuple[dict[str, int], dict[str, int]]  # (idle server, with the connections)


@dataclass
class Row:
    measure: str
    ours: str
    peer: str = "-"
    ceiling: str = "-"
    ratio: str = "-"
    of_ceiling: str = "-"
    of_floor: str = "-"
    target: str = "-"
    holds: bool | None = None
    why: str = ""  # beside a target that does not hold: the measured reason


@dataclass
class Results:
    repeats: int
    seconds: float
    connections: list[int]
    runs: dict[tuple[str, int], list[Run]] = field(default_factory=dict)
    # (lines, "sorted" or "shuffled", tool) -> [(records/s, peak RSS MiB)] per run
    builds: dict[tuple[int, str, str], list[tuple[float, float]]] = field(default_factory=dict)
    memory: dict[str, list[Memory]] = field(default_factory=dict)
    cold: list[float] = field(default_factory=list)
    # table records -> (file bytes, [snapshot seconds], the same compiled,
    # [(server VmRSS, snapshot memfd) KiB])
    snapshots: dict[int, tuple[int, list[float], list[float], list[tuple[int, int]]]] = field(
        default_factory=dict
    )
    cold_compiled: list[float] = field(default_factory=list)
    reload: list[float] = field(default_factory=list)
    machine: str = ""
    elapsed: float = 0.0
    server_path: str = ""

    def add_run(self, name: str, conns: int, run: Run) -> None:
        self.runs.setdefault((name, conns), []).append(run)

    def median(self, name: str, conns: int, attribute: str) -> float | None:
        runs = self.runs.get((name, conns))
        if not runs:
            return None
        values: list[float] = [getattr(run, attribute) for run in runs]
        return statistics.median(values)

    def rows(self) -> list[Row]:
        rows: list[Row] = []
        for conns in self.connections:
            rows += self._lookup_rows(conns)
        rows += self._headroom_rows()
        rows += self._scale_rows()
        rows += self._socketmap_rows()
        rows += self._metrics_rows()
        rows += self._build_rows()
        rows += self._memory_rows()
        rows += self._snapshot_rows()
        if self.cold:
            cold = statistics.median(self.cold)
            rows.append(Row("cold start to first reply, ms", f"{cold:.0f}"))
            if self.cold_compiled:
                compiled = statistics.median(self.cold_compiled)
                rows.append(
                    Row(
                        "  compiled (peer: pure Python)",
                        f"{compiled:.0f}",
                        f"{cold:.0f}",
                        ratio=_ratio(compiled, cold),
                        target=f"<= {COLD_TARGET_MS:.0f} ms",
                        holds=compiled <= COLD_TARGET_MS,
                        why=self._cold_why(),
                    )
                )
        if self.reload:
            reload = statistics.median(self.reload)
            rows.append(Row("reload (SIGHUP) to serving the re-checked table, ms", f"{reload:.0f}"))
        return rows

    def _cold_why(self) -> str:
        """What a cold start spends before its first reply, beyond Python's start."""
        if not self.snapshots:
            return ""
        records, (size, _, compiled, _) = min(self.snapshots.items())
        return (
            f"the copy and check of the {records / 1e6:g}M-key table ({size / 2**20:.0f} MiB) "
            f"before it is served take {statistics.median(compiled) * 1000:.0f} ms alone, "
            "compiled (the snapshot row; issue 11)"
        )

    def _lookup_rows(self, conns: int) -> list[Row]:
        """Pure Python (the reference), then compiled, which the targets are for."""
        plural = "s" if conns > 1 else ""
        peer, ceiling, floor = (
            self.median(name, conns, "rate") for name in ("twisted", "trivial", FLOOR)
        )
        rows = []
        for name, suffix in (("tcpmap", ""), (COMPILED, ", compiled")):
            ours = self.median(name, conns, "rate")
            if ours is None:
                continue
            rate = Row(
                f"lookups/s, {conns} connection{plural}{suffix}", _k(ours), _k(peer), _k(ceiling)
            )
            rate.ratio, rate.of_ceiling = _ratio(ours, peer), _ratio(ours, ceiling)
            rate.of_floor = f"{_ratio(ours, floor)} of {_k(floor)}" if floor else "-"
            if name == COMPILED and conns in RATE_TARGETS and peer:
                rate.target = f">= {RATE_TARGETS[conns]:.2f}x Twisted"
                rate.holds = ours / peer >= RATE_TARGETS[conns]
                if floor:
                    rate.why = f"the floor does {floor / peer:.2f}x Twisted"
            per_cpu = Row(
                f"  lookups per CPU-second of the server{suffix}",
                _k(self.per_cpu(name, conns)),
                _k(self.per_cpu("twisted", conns)),
                _k(self.per_cpu("trivial", conns)),
            )
            per_cpu.ratio = _ratio(self.per_cpu(name, conns), self.per_cpu("twisted", conns))
            per_cpu.of_ceiling = _ratio(self.per_cpu(name, conns), self.per_cpu("trivial", conns))
            per_cpu.of_floor = _ratio(self.per_cpu(name, conns), self.per_cpu(FLOOR, conns))
            latency = Row(
                f"p50 / p99 / p99.9 us, {conns} connection{plural}{suffix}",
                self._latency(name, conns),
                self._latency("twisted", conns),
                self._latency("trivial", conns),
            )
            ours_p99 = self.median(name, conns, "p99")
            peer_p99 = self.median("twisted", conns, "p99")
            if conns == P99_TARGET[0] and ours_p99 is not None and peer_p99:
                latency.ratio = f"p99 {ours_p99 / peer_p99:.2f}x"
                if name == COMPILED:
                    latency.target = f"p99 <= {P99_TARGET[1]}x Twisted"
                    latency.holds = ours_p99 / peer_p99 <= P99_TARGET[1]
                    if floor_p99 := self.median(FLOOR, conns, "p99"):
                        latency.why = (
                            f"the floor (gevent and a bare LMDB get, nothing else) has a p99 "
                            f"of {floor_p99 / peer_p99:.2f}x Twisted's"
                        )
            rows += [rate, per_cpu, latency]
        return rows

    def per_cpu(self, name: str, conns: int) -> float | None:
        """Median lookups per second of the server's CPU time: what one core answers
        when the server has it all, even on a machine others are using too."""
        runs = self.runs.get((name, conns))
        if not runs:
            return None
        return statistics.median(run.rate / run.server_cpu for run in runs if run.server_cpu)

    def _latency(self, name: str, conns: int) -> str:
        values = [self.median(name, conns, a) for a in ("p50", "p99", "p999")]
        if any(v is None for v in values):
            return "-"
        return " / ".join(f"{v:.0f}" for v in values if v is not None)

    def _headroom_rows(self) -> list[Row]:
        ours = {c: r for c in self.connections if (r := self.median("tcpmap", c, "rate"))}
        ceiling = [r for c in self.connections if (r := self.median("trivial", c, "rate"))]
        if not ours or not ceiling:
            return []
        peak = max(ours, key=ours.__getitem__)
        loadgen = self.median("tcpmap", peak, "loadgen_cpu") or 0.0
        server = self.median("tcpmap", peak, "server_cpu") or 0.0
        ratio = max(ceiling) / ours[peak]
        return [
            Row(
                f"peak lookups/s (at {peak}: server CPU {server:.0%}, loadgen CPU {loadgen:.0%})",
                _k(ours[peak]),
                ceiling=_k(max(ceiling)),
                of_ceiling=_ratio(ours[peak], max(ceiling)),
                target=f"trivial >= {HEADROOM_TARGET:.0f}x ours",
                holds=ratio >= HEADROOM_TARGET,
                why=(
                    f"the trivial server fills its core at {_k(max(ceiling))}: what closed-loop "
                    "loopback TCP costs on 2 vCPUs, not the load generator "
                    f"({loadgen:.0%} of its core against ours)"
                ),
            )
        ]

    def _scale_rows(self) -> list[Row]:
        rows = []
        for conns in SCALE_CONNECTIONS:
            large, small = (self.median(n, conns, "rate") for n in ("tcpmap-10M", "tcpmap"))
            if large is None or not small:
                continue
            rows.append(
                Row(
                    f"lookups/s, 10M keys (peer: 1M keys), {conns} connections",
                    _k(large),
                    _k(small),
                    ratio=_ratio(large, small),
                    target=f">= {SCALE_TARGET:.2f}x",
                    holds=large / small >= SCALE_TARGET,
                )
            )
        return rows

    def _socketmap_rows(self) -> list[Row]:
        """The same server and table over socketmap_table(5), against tcp_table."""
        rows = []
        for conns in SCALE_CONNECTIONS:
            sockmap, tcp = (self.median(n, conns, "rate") for n in ("tcpmap-socketmap", "tcpmap"))
            if sockmap is None or not tcp:
                continue
            p50, p99 = (self.median("tcpmap-socketmap", conns, a) for a in ("p50", "p99"))
            latency = f" (p50 {p50:.0f} / p99 {p99:.0f} us)" if p50 and p99 else ""
            rows.append(
                Row(
                    f"socketmap lookups/s (peer: tcp_table), {conns} connections",
                    _k(sockmap) + latency,
                    _k(tcp),
                    ratio=_ratio(sockmap, tcp),
                )
            )
        return rows

    def _metrics_rows(self) -> list[Row]:
        """The same server and table with a metrics listener, against without: the
        geometric mean of two servers without, one started before it and one after."""
        rows = []
        for conns in SCALE_CONNECTIONS:
            metered, before, after = (
                self.median(n, conns, "rate") for n in (METERED, "tcpmap", PLAIN_AFTER)
            )
            if metered is None or not before or not after:
                continue
            plain = (before * after) ** 0.5
            rows.append(
                Row(
                    f"lookups/s with metrics on (peer: off, started before and after it: "
                    f"{_k(before)}, {_k(after)}), {conns} connections",
                    _k(metered),
                    _k(plain),
                    ratio=_ratio(metered, plain),
                    target=f">= {METRICS_TARGET:.2f}x",
                    holds=metered / plain >= METRICS_TARGET,
                )
            )
        return rows

    def _build_rows(self) -> list[Row]:
        rows = []
        for records, order in sorted({case[:2] for case in self.builds}):
            ours = self.builds.get((records, order, "tcpmap-build"))
            peer = self.builds.get((records, order, "postmap"))
            if not ours or not peer:
                continue
            rate, theirs = (statistics.median(r for r, _ in runs) for runs in (ours, peer))
            peak, peak_peer = (statistics.median(m for _, m in runs) for runs in (ours, peer))
            lines = f"{records / 1e6:g}M lines {order}"
            target = BUILD_TARGETS[order]
            rows.append(
                Row(
                    f"build records/s, {lines} (peer: postmap lmdb:)",
                    _k(rate),
                    _k(theirs),
                    ratio=_ratio(rate, theirs),
                    target=f">= {target:.1f}x postmap",
                    holds=rate >= target * theirs,
                )
            )
            rows.append(
                Row(
                    f"  build peak RSS MiB, {lines}",
                    f"{peak:.0f}",
                    f"{peak_peer:.0f}",
                    ratio=_ratio(peak, peak_peer),
                    target=f"<= {BUILD_RSS_TARGET_MIB} MiB",
                    holds=peak <= BUILD_RSS_TARGET_MIB,
                )
            )
        return rows

    def _memory_rows(self) -> list[Row]:
        ours, peer = self.memory.get("tcpmap"), self.memory.get("twisted")
        if not ours:
            return []
        compiled = self.memory.get(COMPILED)
        per_connection = Row(
            "anonymous KB per idle connection (peer: pure Python)",
            f"{_per_connection(compiled):.2f}" if compiled else "-",
            f"{_per_connection(ours):.2f}",
            ratio=_ratio(_per_connection(compiled), _per_connection(ours)) if compiled else "-",
            target="compiled <= pure Python's (+1%, the noise)",
            holds=_per_connection(compiled) <= _per_connection(ours) * 1.01 if compiled else None,
        )
        rss = _mib([held["VmRSS"] for _, held in ours])
        theirs = _mib([held["VmRSS"] for _, held in peer]) if peer else None
        private = _mib([held["VmRSS"] - held["RssTable"] for _, held in ours])
        return [
            Row(
                "RSS MiB, 10,000 idle connections, 1M keys",
                f"{rss:.1f}",
                f"{theirs:.1f}" if theirs else "-",
                ratio=_ratio(rss, theirs),
                target=f"<= {RSS_TARGET_MIB:.0f} MiB",
                holds=rss <= RSS_TARGET_MIB,
                why=(
                    f"{IDLE_CONNECTIONS:,} greenlets alone take "
                    f"{_per_connection(ours) * IDLE_CONNECTIONS / 1024:.0f} MiB "
                    f"({_per_connection(ours):.1f} KB each), and the table's snapshot "
                    f"{_mib([held['RssTable'] for _, held in ours]):.0f} MiB"
                ),
            ),
            Row(
                "  the same less the table's snapshot (a private sealed copy), MiB",
                f"{private:.1f}",
                f"{theirs:.1f}" if theirs else "-",
                ratio=_ratio(private, theirs),
            ),
            Row(
                "  anonymous: with the connections / before, MiB",
                _anon(ours),
                _anon(peer),
            ),
            per_connection,
        ]

    def _snapshot_rows(self) -> list[Row]:
        rows = []
        for records, (size, seconds, compiled, rss) in sorted(self.snapshots.items()):
            taken = statistics.median(seconds)
            fast = statistics.median(compiled)
            server = _mib([total for total, _ in rss])
            table = _mib([snapshot for _, snapshot in rss])
            rows.append(
                Row(
                    f"table snapshot, {records / 1e6:g}M keys ({size / 2**20:.0f} MiB): copy + "
                    "check s (MB/s), pure Python / compiled; server RSS MiB + the snapshot's "
                    "memfd MiB",
                    f"{taken:.2f} ({size / taken / 1e6:.0f}) / {fast:.2f} "
                    f"({size / fast / 1e6:.0f}); {server:.1f} + {table:.1f}",
                )
            )
        return rows

    def problems(self) -> list[str]:
        """Runs that do not compare like with like: errors, or another hit ratio."""
        found = []
        for (name, conns), runs in sorted(self.runs.items()):
            for run in runs:
                answered = run.ok + run.notfound
                hits = run.ok / max(1, answered)
                expected = 0.0 if name == "trivial" else HIT_RATIO
                if run.errors or run.other or abs(hits - expected) > 0.01:
                    found.append(
                        f"{name} at {conns} connections: {run.errors} errors, {run.other} "
                        f"malformed, hits {hits:.1%} (expected {expected:.0%})"
                    )
        return found

    def failures(self) -> list[str]:
        return [row.measure for row in self.rows() if row.holds is False]

    def quiet(self) -> tuple[float, float]:
        """Median and worst share of a core used by other processes during the runs."""
        shares = [run.foreign_cpu for runs in self.runs.values() for run in runs]
        return (statistics.median(shares), max(shares)) if shares else (0.0, 0.0)


def _anon(memory: list[Memory] | None) -> str:
    if not memory:
        return "-"
    held = _mib([after["RssAnon"] for _, after in memory])
    idle = _mib([before["RssAnon"] for before, _ in memory])
    return f"{held:.1f} / {idle:.1f}"


def _per_connection(memory: list[Memory]) -> float:
    """Median anonymous memory each idle connection adds, KB (1000 bytes)."""
    added = [after["RssAnon"] - before["RssAnon"] for before, after in memory]
    return statistics.median(added) * 1024 / 1000 / IDLE_CONNECTIONS


def _mib(kib: list[int]) -> float:
    return statistics.median(kib) / 1024


def _k(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def describe(run: Run) -> str:
    hits = run.ok / max(1, run.ok + run.notfound)
    text = f"{run.rate:9,.0f}/s  p50 {run.p50:7.0f}  p99 {run.p99:7.0f}  p99.9 {run.p999:7.0f} us"
    text += f"  hits {hits:.0%}  cpu: server {run.server_cpu:.0%}"
    text += f" loadgen {run.loadgen_cpu:.0%} others {run.foreign_cpu:.0%}"
    if run.errors or run.other:
        text += f"  ERRORS {run.errors} OTHER {run.other}"
    return text


HEADER = (
    "measure",
    "tcpmap-lmdb",
    "peer",
    "trivial",
    "ours/peer",
    "ours/trivial",
    "ours/floor",
    "target",
    "holds",
)


def _cells(row: Row) -> tuple[str, ...]:
    holds = "" if row.holds is None else ("yes" if row.holds else "NO")
    if row.holds is False and row.why:
        holds = f"NO: {row.why}"
    return (
        row.measure,
        row.ours,
        row.peer,
        row.ceiling,
        row.ratio,
        row.of_ceiling,
        row.of_floor,
        row.target,
        holds,
    )


def table(results: Results) -> str:
    """The plain-text table for the terminal."""
    lines = [HEADER, *(_cells(row) for row in results.rows())]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def markdown(results: Results) -> str:
    head = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    body = ["| " + " | ".join(_cells(row)) + " |" for row in results.rows()]
    median_share, worst_share = results.quiet()
    notes = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {results.machine}.",
        "",
        f"Medians of {results.repeats} runs; each lookup run is {results.seconds:g} s after "
        "a warm-up, closed loop (one request in flight per connection, like Postfix), "
        "80% hits and 20% misses spread over the whole table, the same keys for every server. "
        "Peer is Twisted's PostfixTCPMapServer over a dict unless the row says otherwise; "
        "trivial is a C epoll server that answers `500 ` to every line (the ceiling); "
        "floor is tests/bench/floor.py (gevent, a greenlet per connection, a bare LMDB get: "
        "the floor of the architecture). Rows marked compiled are the same server with its "
        "hot path compiled by mypyc (.venv-compiled, `make compiled`); the targets are theirs. "
        "Servers run on CPU 0, the C load generator on CPU 1. "
        f"Other processes used a median {median_share:.0%} (worst {worst_share:.0%}) "
        f"of one core during the lookup runs. The whole bench took {results.elapsed:.0f} s.",
    ]
    if results.server_path:
        notes += ["", f"tcpmap-server ran from PYTHONPATH={results.server_path}."]
    if problems := results.problems():
        notes += ["", "Runs that did not compare like with like:", *(f"- {p}" for p in problems)]
    return "\n".join(["# Benchmark results", "", *head, *body, "", *notes, ""])


def chart(results: Results, path: Path) -> None:
    """Lookups/s and p50/p99 latency against connections, for every server measured.

    Each marker is the median of the runs at that point, its bar the lowest and
    highest run; only measured points are drawn, no lines between them.
    """
    import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    fig, (rate_ax, latency_ax) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110)
    for index, (name, label) in enumerate(CHART_LABELS.items()):
        xs = [c for c in results.connections if results.runs.get((name, c))]
        if not xs:
            continue
        color = f"C{index}"
        _points(rate_ax, results, name, xs, attribute="rate", color=color, label=label)
        for attribute, marker in (("p50", "o"), ("p99", "^")):  # us, shown in ms
            _points(latency_ax, results, name, xs, attribute=attribute, color=color, marker=marker)
    for ax in (rate_ax, latency_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results.connections, [str(c) for c in results.connections])
        ax.set_xlabel("connections (closed loop, one request in flight each)")
        ax.grid(True, alpha=0.3)
    rate_ax.set_ylabel("thousand lookups/s")
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_title("throughput")
    rate_ax.legend(fontsize="small")
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("ms (circle: p50, triangle: p99)")
    latency_ax.set_title("latency")
    fig.suptitle(
        f"tcp_table lookups, 1M-key table, loopback, 2 cores: median of {results.repeats} runs, "
        "bars from the lowest to the highest run",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _points(
    ax: object,
    results: Results,
    name: str,
    xs: list[int],
    *,
    attribute: str,
    **style: object,
) -> None:
    """One server's medians at XS, with the lowest and highest run as the bar."""
    # lookups/s in thousands, latencies in ms
    values = [[getattr(run, attribute) / 1000 for run in results.runs[(name, c)]] for c in xs]
    mids = [statistics.median(v) for v in values]
    low = [m - min(v) for m, v in zip(mids, values, strict=True)]
    high = [max(v) - m for m, v in zip(mids, values, strict=True)]
    # Each server a little to the side of the measured count, so that none hides another.
    dodge = 2 ** (0.05 * (list(CHART_LABELS).index(name) - len(CHART_LABELS) // 2))
    style.setdefault("marker", "o")
    ax.errorbar(  # type: ignore[attr-defined]
        [x * dodge for x in xs], mids, yerr=[low, high], linestyle="none", capsize=3, **style
    )


def write(results: Results, text_table: str, out: Path) -> None:
    del text_table  # the markdown table is built from the same rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(results))
    if results.runs:
        chart(results, out / "lookups.png")


def machine() -> str:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    distro = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            distro = line.split("=", 1)[1].strip('"')
    versions = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "python"),
            "-c",
            "import sys, gevent, lmdb; print(sys.version.split()[0], gevent.__version__, "
            "lmdb.__version__)",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    python, gevent, lmdb = [*versions, "?", "?", "?"][:3]
    return (
        f"{os.cpu_count()} x {model or platform.processor()}, {mem:.0f} GiB RAM, {distro}, "
        f"Linux {platform.release()}, CPython {python}, gevent {gevent}, lmdb {lmdb}"
    )
