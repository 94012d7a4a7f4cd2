"""Per-client warning budget, so one client cannot flood the journal.

journald drops a service's messages beyond RateLimitBurst= (10000 by default)
per RateLimitIntervalSec= (30 s), and it drops them blindly: a client that earns
thousands of warnings a second would hide the lines that matter. So each client
gets BURST warnings per WINDOW; the rest are only counted, and reported in one
summary line when the window ends. A local user can take any of 127/8 as its
address, so all clients together also get at most TOTAL lines per window, and
the summaries name BURST clients and put the rest in one line. Lifecycle and
table events never come here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

BURST = 5  # warnings logged per client per window
TOTAL = 50  # warnings logged per window, all clients together
WINDOW = 10.0  # seconds


@dataclass(slots=True)
class _Budget:
    started: float  # time.monotonic() when the window began
    shown: int = 0
    suppressed: int = 0


class WarningLimiter:
    """Which warnings to log: the first ``burst`` per client in each ``window`` seconds,
    and ``total`` at most for all clients together in each window.

    A client is whatever key the caller picks (a peer address without its port,
    a unix peer's uid). ``suppressed`` counts every warning not logged, since
    start (a counter for metrics).
    """

    def __init__(
        self,
        burst: int = BURST,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
        total: int = TOTAL,
    ) -> None:
        self.burst = burst
        self.window = window
        self.total = total
        self.suppressed = 0
        self._clock = clock
        self._budgets: dict[str, _Budget] = {}
        self._all = _Budget(clock() - window)  # all clients' window: only .shown is used

    def allow(self, client: str) -> bool:
        """Whether to log a warning about CLIENT now; if not, it is counted."""
        now = self._clock()
        budget = self._budgets.get(client)
        if budget is None or now - budget.started >= self.window:
            if budget is not None and budget.suppressed:
                return self._count(budget)  # its summary is still due: expired() gives it
            budget = self._budgets[client] = _Budget(now)
        if now - self._all.started >= self.window:
            self._all = _Budget(now)
        if budget.shown < self.burst and self._all.shown < self.total:
            budget.shown += 1
            self._all.shown += 1
            return True
        return self._count(budget)

    def _count(self, budget: _Budget) -> bool:
        budget.suppressed += 1
        self.suppressed += 1
        return False

    def expired(self) -> list[tuple[str, int]]:
        """(client, warnings suppressed) for each window that has ended with some, the
        first ``burst`` of them, then ("N other clients", their sum) for the rest; forgets
        every ended window, so memory stays bounded by the clients of one window."""
        now = self._clock()
        ended = [c for c, b in self._budgets.items() if now - b.started >= self.window]
        summaries = []
        for client in ended:
            budget = self._budgets.pop(client)
            if budget.suppressed:
                summaries.append((client, budget.suppressed))
        if len(summaries) > self.burst:
            rest = summaries[self.burst :]
            summaries[self.burst :] = [(f"{len(rest)} other clients", sum(n for _, n in rest))]
        return summaries
