"""Keep client connections across a restart in systemd's file descriptor store.

Postfix holds one connection to the map per process for the process's whole
life; closing it costs that process a warning ("unexpected EOF") and about a
second. So on SIGTERM the server answers what each connection has already
sent, then hands every idle connection to systemd (sd_pid_notify_with_fds(3):
``FDSTORE=1`` with ``FDNAME=``) and exits. What systemd then does with the
store (systemd's docs/FILE_DESCRIPTOR_STORE.md, systemd.service(5)):

- a restart job (``systemctl restart``, ``try-restart`` as a package upgrade
  runs it) keeps the store: the next instance gets the connections back after
  the socket unit's listeners, in ``LISTEN_FDS``/``LISTEN_FDNAMES``;
- a stop (``systemctl stop``, package removal) deactivates the unit fully, and
  systemd closes everything in the store: clients see EOF, as they did before;
- a connection whose client hangs up while stored (POLLHUP) is dropped by
  systemd itself;
- without ``FileDescriptorStoreMax=`` (or outside systemd) nothing is stored,
  and the connections close at exit, as they always did.

The name of a stored connection says which listener it came from, so the next
instance serves it with the same protocol and map: ``conn.`` followed by the
listener's own name (``conn.tcp_table``, ``conn.tcp=virtual``,
``conn.socketmap``). A stored descriptor is a duplicate: systemd keeps its copy
until told to drop it (``FDSTOREREMOVE=1``), so a new instance removes the
names it adopted at once, or closing such a connection later would not reach
the client.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable, Iterable, Mapping, Sequence

from .config import SOCKETMAP, Binding
from .systemd import CONNECTION_PREFIX as PREFIX

# The kernel passes at most SCM_MAX_FD (253) descriptors in one message.
MAX_FDS_PER_MESSAGE = 253
BARRIER_TIMEOUT = 5.0  # seconds to wait for systemd to take the messages

# systemd.daemon.notify(message, unset_environment=False, pid=0, fds=None) -> bool
Notify = Callable[..., bool]


def fd_name(binding: Binding) -> str:
    """The FDNAME= of a connection accepted on a listener serving BINDING.

    Names may hold any printable ASCII but ':' (sd_pid_notify_with_fds(3));
    map names are ``[A-Za-z0-9_][A-Za-z0-9_.+-]*`` (maps.py).
    """
    if binding.protocol == SOCKETMAP:
        return PREFIX + SOCKETMAP
    return f"{PREFIX}tcp={binding.map}" if binding.map else f"{PREFIX}tcp_table"


def binding_of(name: str) -> Binding | None:
    """The binding a stored connection named NAME was served with; None: not a connection."""
    if not name.startswith(PREFIX):
        return None
    return Binding.from_fd_name(name[len(PREFIX) :])


def _default_notify() -> Notify:
    from systemd import daemon  # noqa: PLC0415 - python-systemd, loaded once per handoff

    notify: Notify = daemon.notify
    return notify


class FdStore:
    """The service's file descriptor store, reached through $NOTIFY_SOCKET.

    ``enabled`` is False outside systemd; then store() stores nothing.
    """

    def __init__(self, notify: Notify | None = None) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notify = notify

    def _send(self, message: str, fds: Sequence[int] = ()) -> bool:
        if self._notify is None:
            self._notify = _default_notify()
        return bool(self._notify(message, fds=list(fds)) if fds else self._notify(message))

    def store(self, connections: Mapping[str, Sequence[int]]) -> int:
        """Hand the descriptors to systemd, by name; the number sent.

        The caller still owns (and closes) its descriptors: the store keeps
        duplicates. Waits until systemd has read the messages (BARRIER=1), so
        that they are not lost if the process exits right after.
        """
        if not self.enabled:
            return 0
        sent = 0
        for name, fds in connections.items():
            for start in range(0, len(fds), MAX_FDS_PER_MESSAGE):
                batch = fds[start : start + MAX_FDS_PER_MESSAGE]
                if self._send(f"FDSTORE=1\nFDNAME={name}", batch):
                    sent += len(batch)
        if sent:
            self.barrier()
        return sent

    def forget(self, names: Iterable[str]) -> None:
        """Drop every stored descriptor called one of NAMES from the store."""
        if not self.enabled:
            return
        for name in sorted(set(names)):
            self._send(f"FDSTOREREMOVE=1\nFDNAME={name}")

    def barrier(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        """sd_notify_barrier(3): True once systemd has processed what was sent before.

        systemd closes the write end of a pipe it got with BARRIER=1 after
        reading every earlier message; the read end then reports POLLHUP.
        """
        reader, writer = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                sent = self._send("BARRIER=1", [writer])
            finally:
                os.close(writer)
            if not sent:
                return False
            poll = select.poll()
            poll.register(reader, select.POLLHUP)
            with contextlib.suppress(InterruptedError):
                return bool(poll.poll(timeout * 1000))
            return False
        finally:
            os.close(reader)
