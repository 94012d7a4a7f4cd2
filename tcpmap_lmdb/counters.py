"""What the server counts for its metrics: plain ints on the hot path, no library.

Bound only when a metrics listener is configured (server.py): without one a
lookup runs no line of this. metrics.py reads these at scrape time.
"""

from __future__ import annotations

import bisect
import time
from pathlib import Path

from .dbformat import map_name
from .responder import Responder, SocketmapResponder
from .table import Checker

# Upper bounds of the latency buckets, in seconds: a lookup inside the server
# takes some microseconds; the top ones catch a stalled hub.
BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1, 1.0)
_BOUNDS_NS = tuple(round(bound * 1e9) for bound in BUCKETS)

# Results by the first byte of a reply: tcp_table's status digit, socketmap's status word.
TCP_RESULTS = {ord("2"): "found", ord("5"): "notfound", ord("4"): "temporary"}
SOCKETMAP_RESULTS = {
    ord("O"): "found",
    ord("N"): "notfound",
    ord("T"): "temporary",
    ord("P"): "permanent",
}
# Connection close reasons (tcpmap_connections_closed_total{reason}).
CLOSE_REASONS = ("client", "idle", "limit", "error", "shutdown")


class LookupStats:
    """What the hot path counts: lookups by map and result, and their latency."""

    __slots__ = ("buckets", "socketmap", "sum_ns", "tcp")

    def __init__(self) -> None:
        self.tcp: dict[str, list[int]] = {}  # map -> counts by the reply's first byte
        self.socketmap: dict[tuple[bytes, int], int] = {}  # (map, status byte) -> count
        self.buckets = [0] * (len(_BOUNDS_NS) + 1)  # the last: over the top bound
        self.sum_ns = 0

    def tcp_counts(self, name: str) -> list[int]:
        return self.tcp.setdefault(name, [0] * 256)


class MeteredResponder(Responder):
    """A tcp_table Responder that counts each lookup and times it (bound only with metrics)."""

    __slots__ = ("_counts", "_inner", "_stats")

    def __init__(self, inner: Responder, stats: LookupStats, map_name: str) -> None:
        self._inner = inner
        self._stats = stats
        self._counts = stats.tcp_counts(map_name)

    def answer(self, line: bytes) -> bytes:
        started = time.perf_counter_ns()
        reply = self._inner.answer(line)
        elapsed = time.perf_counter_ns() - started
        self._counts[reply[0]] += 1
        stats = self._stats
        stats.buckets[bisect.bisect_left(_BOUNDS_NS, elapsed)] += 1
        stats.sum_ns += elapsed
        return reply

    def answer_all(self, lines: list[bytes]) -> bytes:
        return b"".join([self.answer(line) for line in lines])


class MeteredSocketmapResponder(SocketmapResponder):
    """A SocketmapResponder that counts and times each lookup, by the map it names."""

    __slots__ = ("_inner", "_stats")

    def __init__(self, inner: SocketmapResponder, stats: LookupStats) -> None:
        self._inner = inner
        self._stats = stats

    def answer(self, payload: bytes) -> bytes:
        started = time.perf_counter_ns()
        reply = self._inner.answer(payload)
        elapsed = time.perf_counter_ns() - started
        status = reply[reply.index(b":") + 1]
        # A PERM names a map that is not there: counted without the client's name for it.
        name = payload.partition(b" ")[0] if status != ord("P") else b""
        counts = self._stats.socketmap
        counts[name, status] = counts.get((name, status), 0) + 1
        stats = self._stats
        stats.buckets[bisect.bisect_left(_BOUNDS_NS, elapsed)] += 1
        stats.sum_ns += elapsed
        return reply

    def answer_all(self, payloads: list[bytes]) -> bytes:
        return b"".join([self.answer(payload) for payload in payloads])


class CheckStats:
    """Checks of newly published tables, by map: run, failed, the last one's seconds."""

    def __init__(self) -> None:
        self.run: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.last_seconds: dict[str, float] = {}

    def counting(self, check: Checker) -> Checker:
        """CHECK, counted."""

        def counted(path: Path, fd: int) -> None:
            name = map_name(path)
            started = time.monotonic()
            try:
                check(path, fd)
            except BaseException:
                self.failed[name] = self.failed.get(name, 0) + 1
                raise
            finally:
                self.run[name] = self.run.get(name, 0) + 1
                self.last_seconds[name] = time.monotonic() - started

        return counted


class ServerStats:
    """Counters of the connection glue, kept by server.Server (plain ints)."""

    __slots__ = ("accepted", "closed", "reloads", "warnings_suppressed")

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.reloads = 0
        self.warnings_suppressed = 0
