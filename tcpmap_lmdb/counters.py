"""What the server counts for its metrics, as plain ints: metrics.py reads them at scrape.

The responders count their replies themselves (responder.py). What is here is
bound only when a metrics listener is configured (server.py): without one a
lookup runs no line of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from math import frexp
from pathlib import Path
from typing import TypeVar

from .dbformat import map_name
from .snapshot import Locked

_T = TypeVar("_T")

# Latency buckets are powers of two seconds: a duration's bucket is the binary
# exponent math.frexp gives, one C call, where a search of decimal bounds costs
# as much as all of a lookup's accounting should. 2**-18 s = 3.8 us ... 2**0 = 1 s.
LOW_EXPONENT, HIGH_EXPONENT = -18, 0
BUCKETS = tuple(2.0**e for e in range(LOW_EXPONENT, HIGH_EXPONENT + 1))  # upper bounds, seconds
# One read in this many is timed for the latency histogram (a power of two).
LATENCY_SAMPLE = 8
LATENCY_OFFSET = 1100  # frexp exponents of positive doubles are -1073 ... 1024
# Connection close reasons (tcpmap_connections_closed_total{reason}).
CLOSE_REASONS = ("client", "idle", "limit", "error", "shutdown")


class Latency:
    """A histogram of durations in seconds, kept in plain-int buckets by binary exponent."""

    __slots__ = ("by_exponent", "sum")

    def __init__(self) -> None:
        # by_exponent[LATENCY_OFFSET + e]: durations d with frexp(d)[1] == e: d < 2**e.
        self.by_exponent = [0] * (2 * LATENCY_OFFSET)
        self.sum = 0.0

    def observe_seconds(self, elapsed: float, count: int = 1) -> None:
        """COUNT requests took ELAPSED seconds (0 or less: the lowest bucket)."""
        self.by_exponent[LATENCY_OFFSET + frexp(elapsed)[1]] += count
        self.sum += elapsed * count

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound in seconds, observations at or below it), then (inf, all).

        frexp(d)[1] == e means d < 2**e: each one counts under the bound 2**e.
        """
        below = sum(self.by_exponent[: LATENCY_OFFSET + LOW_EXPONENT + 1])
        out = [(BUCKETS[0], below)]
        for exponent, bound in zip(
            range(LOW_EXPONENT + 1, HIGH_EXPONENT + 1), BUCKETS[1:], strict=True
        ):
            below += self.by_exponent[LATENCY_OFFSET + exponent]
            out.append((bound, below))
        out.append((float("inf"), sum(self.by_exponent)))
        return out


class CheckStats:
    """Checks of newly published tables, by map: run, failed, the last one's seconds."""

    def __init__(self) -> None:
        self.run: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.last_seconds: dict[str, float] = {}

    def counting(self, take: Callable[[Path], _T]) -> Callable[[Path], _T]:
        """TAKE (snapshot.Taker: copy and check a table file), counted. A take that found
        the file locked by a writer (snapshot.Locked) checked nothing: not counted."""

        def counted(path: Path) -> _T:
            name = map_name(path)
            started = time.monotonic()
            try:
                found = take(path)
            except Locked:
                raise
            except BaseException:
                self.failed[name] = self.failed.get(name, 0) + 1
                self._ran(name, started)
                raise
            self._ran(name, started)
            return found

        return counted

    def _ran(self, name: str, started: float) -> None:
        self.run[name] = self.run.get(name, 0) + 1
        self.last_seconds[name] = time.monotonic() - started


class ServerStats:
    """Counters of the connection glue, kept by server.Server (plain ints)."""

    __slots__ = ("accepted", "closed", "reloads", "warnings_suppressed")

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.reloads = 0
        self.warnings_suppressed = 0
