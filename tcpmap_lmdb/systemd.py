"""systemd integration: inherited sockets, sd_notify, journal logging (systemd-python).

Everything here degrades to a no-op when the process was not started by
systemd, so the server runs the same from a shell.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

import gevent.socket
from systemd import daemon

log = logging.getLogger(__name__)

# Names of connections kept in the file descriptor store (handoff.py).
CONNECTION_PREFIX = "conn."

SYSLOG_IDENTIFIER = "tcpmap-server"
# syslog(3)'s LOG_MAIL: rsyslog files the lines in /var/log/mail.log, beside Postfix's.
SYSLOG_FACILITY = 2


@dataclass(frozen=True)
class Listener:
    name: str  # FileDescriptorName= of the socket unit ("unknown" when unnamed), or FDNAME=
    sock: gevent.socket.socket


def inherited_sockets() -> tuple[list[Listener], list[Listener]]:
    """What systemd passed (LISTEN_FDS), in order: (listening sockets, connections).

    Connections are those the previous instance left in the file descriptor
    store (handoff.py; their names start with ``conn.``). Listeners arrive
    blocking unless the unit sets NonBlocking=yes, and a blocking listener
    freezes the gevent hub in accept() (engineering-notes.md finding 1):
    gevent.socket.socket(fileno=...) makes each one non-blocking.
    """
    fds = daemon.listen_fds_with_names(unset_environment=True)
    listeners: list[Listener] = []
    connections: list[Listener] = []
    for fd, name in sorted(fds.items()):
        sock = gevent.socket.socket(fileno=fd)
        stored = name.startswith(CONNECTION_PREFIX) and not _listening(sock)
        (connections if stored else listeners).append(Listener(name, sock))
    return listeners, connections


def _listening(sock: gevent.socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


class Notifier:
    """sd_notify(3) messages; silent when NOTIFY_SOCKET is not set."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.watchdog_interval = _watchdog_interval()

    def _send(self, message: str) -> None:
        if self.enabled:
            daemon.notify(message)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={_one_line(status)}")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")


def _watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WatchdogSec=, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def under_journal() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def setup_logging(verbose: bool) -> None:
    """Journal with structured fields under systemd; plain stderr otherwise."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if under_journal():
        from systemd.journal import JournalHandler  # noqa: PLC0415 - only under systemd

        handler = JournalHandler(
            SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, SYSLOG_FACILITY=str(SYSLOG_FACILITY)
        )
        # The journal adds the time, the unit and the priority itself.
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"{SYSLOG_IDENTIFIER}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
