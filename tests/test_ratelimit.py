"""The per-client warning budget (ratelimit.py), on a clock the test moves."""

from __future__ import annotations

from tcpmap_lmdb.ratelimit import WarningLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_few_warnings_of_a_client_pass_and_the_rest_are_counted() -> None:
    """5 of 1,000 pass; 995 are counted, and reported once when the window ends."""
    clock = Clock()
    limiter = WarningLimiter(burst=5, window=10.0, clock=clock)
    assert sum(limiter.allow("127.0.0.1") for _ in range(1000)) == 5
    assert limiter.expired() == []  # the window is still open
    clock.now += 10.0
    assert limiter.expired() == [("127.0.0.1", 995)]
    assert limiter.expired() == []
    assert limiter.suppressed == 995


def test_clients_have_budgets_of_their_own() -> None:
    """One noisy client does not use up another's warnings."""
    limiter = WarningLimiter(burst=2, window=10.0, clock=Clock())
    for _ in range(50):
        limiter.allow("10.0.0.1")
    assert limiter.allow("10.0.0.2")


def test_a_new_window_gives_a_new_budget_after_the_summary() -> None:
    """After the summary, the client's next warnings pass again; a quiet window leaves no
    summary and no state behind."""
    clock = Clock()
    limiter = WarningLimiter(burst=1, window=10.0, clock=clock)
    assert limiter.allow("c")
    assert not limiter.allow("c")
    clock.now += 11.0
    assert not limiter.allow("c")  # counted in the old window: its summary is not out yet
    assert limiter.expired() == [("c", 2)]
    assert limiter.allow("c")
    clock.now += 11.0
    assert limiter.expired() == []
    assert limiter._budgets == {}


def test_many_clients_together_get_a_bounded_share() -> None:
    """A local user can pick any of 127/8 as its address: 200 clients of 10 warnings each
    get at most TOTAL lines in the window, and the summaries name BURST clients and one
    line for the rest, so the journal sees at most TOTAL + BURST + 1 lines per window."""
    clock = Clock()
    limiter = WarningLimiter(burst=5, window=10.0, total=50, clock=clock)
    clients = [f"127.1.0.{n}" for n in range(200)]
    shown = sum(limiter.allow(client) for _ in range(10) for client in clients)
    assert shown == 50
    clock.now += 10.0
    summaries = limiter.expired()
    assert len(summaries) == 5 + 1
    assert summaries[-1] == ("195 other clients", 2000 - 50 - sum(n for _, n in summaries[:5]))
    assert sum(n for _, n in summaries) == limiter.suppressed == 2000 - 50
    assert limiter.allow("127.1.0.1")  # a new window: a new share
