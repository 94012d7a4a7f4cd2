"""Room for clients: connection slots at --max-connections, and memory for replies.

Server glue for two limits, so that neither can be used up by clients that
never let go: a newcomer at --max-connections closes the connection idle
longest (BacklogWatch), and replies held for clients that do not read them are
bounded all together (OutputBudget).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import gevent
import gevent.socket

_Holder = TypeVar("_Holder", bound=Hashable)


class BacklogWatch:
    """At --max-connections, watches the listening sockets for a connection waiting.

    StreamServer stops accepting while its pool is full, so a newcomer would
    wait in the listen queue until some connection closed on its own (up to
    --idle-timeout). Instead, as soon as a listening socket is readable while
    the pool is full, the connection idle longest is closed; its slot frees,
    StreamServer accepts again, and the newcomer is served. One eviction per
    newcomer: the watch stops, and the next full pool starts it again.
    """

    RETRY = 0.1  # seconds: every connection busy, none can go yet; look again

    def __init__(
        self,
        socks: list[gevent.socket.socket],
        full: Callable[[], bool],
        evict: Callable[[], bool],
    ) -> None:
        """Watch SOCKS; FULL says whether every slot is taken, EVICT closes the connection
        idle longest (False if none can go now)."""
        self._full = full
        self._evict = evict
        loop = gevent.get_hub().loop
        self._watchers = [loop.io(sock.fileno(), 1) for sock in socks]
        self._timer: Any = None
        self._active = False
        self._closed = False

    def start(self) -> None:
        if self._active or self._closed:
            return
        self._active = True
        for watcher in self._watchers:
            watcher.start(self._waiting)

    def _stop(self) -> None:
        self._active = False
        for watcher in self._watchers:
            watcher.stop()

    def _waiting(self) -> None:
        """Runs in the hub: a connection is waiting in a listen queue."""
        self._stop()
        if not self._full():
            return  # a slot is free: StreamServer accepts it itself
        if not self._evict():
            self._timer = gevent.get_hub().loop.timer(self.RETRY)
            self._timer.start(self.start)

    def close(self) -> None:
        self._stop()
        self._closed = True
        for watcher in self._watchers:
            watcher.close()
        if self._timer is not None:
            self._timer.close()


class OutputBudget(Generic[_Holder]):
    """Reply bytes held for clients that have not read them, all connections together.

    Over ``budget``, the holders that have held longest are closed (CLOSE, which
    says whether it could) until the total fits again: a client that does not
    read its replies loses its connection rather than hold memory or stall
    others, and one that reads (Postfix) is not on the list for long. A holder
    chosen stops counting at once: it is about to let go, so no one else need
    go for it.
    """

    def __init__(self, budget: int, close: Callable[[_Holder], bool]) -> None:
        self.budget = budget  # bytes
        self.held = 0  # bytes, now
        self._close = close
        self._holders: dict[_Holder, int] = {}  # in the order they began to hold

    def hold(self, holder: _Holder, size: int) -> None:
        """HOLDER could not send SIZE bytes at once: count them until release()."""
        self.held += size
        self._holders[holder] = size
        for victim, held in list(self._holders.items()):
            if self.held <= self.budget:
                break
            if victim is not holder and self._close(victim):
                self.release(victim, held)

    def release(self, holder: _Holder, size: int) -> None:
        if self._holders.pop(holder, None) is not None:
            self.held -= size
