"""Start tcpmap-server exactly as systemd would, without a PID 1 systemd.

The command line comes from systemd/tcpmap.service (ExecStart=), with only the
installed path of the binary replaced by this environment's, and the
EnvironmentFile= variables filled in.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from conftest import LoggedProcess

ROOT = Path(__file__).resolve().parent.parent
SERVICE_UNIT = ROOT / "systemd" / "tcpmap.service"
SOCKET_UNIT = ROOT / "systemd" / "tcpmap.socket"
INSTALLED_SERVER = "/usr/bin/tcpmap-server"


def unit_setting(unit: Path, key: str) -> list[str]:
    """Every value of KEY= in a unit file, in order."""
    values = []
    for line in unit.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            values.append(value.strip())
    return values


def exec_start(db: Path, options: str = "") -> list[str]:
    """The unit's ExecStart= as argv, for this checkout."""
    (command,) = unit_setting(SERVICE_UNIT, "ExecStart")
    env = {"TCPMAP_DB": str(db), "TCPMAP_OPTIONS": options}
    argv: list[str] = []
    for word in shlex.split(command):
        # systemd: ${VAR} is one word; a lone $VAR splits at whitespace.
        if (match := re.fullmatch(r"\$(\w+)", word)) is not None:
            argv.extend(env[match.group(1)].split())
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    assert argv[0] == INSTALLED_SERVER, f"ExecStart= runs {argv[0]}"
    argv[0] = str(Path(sys.executable).parent / "tcpmap-server")
    return argv


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def tcp_listener(host: str, port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(128)
    return sock


class Activated(LoggedProcess):
    """A server process started with listening sockets passed as fds 3, 4, ...

    The sockets stay open in this process too, as systemd keeps them: when the
    server exits, new connections wait in the backlog instead of being refused.
    """

    wait_timeout = 10.0

    def __init__(
        self,
        argv: Sequence[str],
        listeners: Sequence[socket.socket],
        names: Sequence[str],
        env: dict[str, str] | None = None,
    ) -> None:
        fds = [s.fileno() for s in listeners]
        targets = list(range(3, 3 + len(fds)))

        def move_fds() -> None:
            # dup to a high range first so moving one fd never clobbers another
            high = [os.dup2(fd, 100 + i) for i, fd in enumerate(fds)]
            for fd, target in zip(high, targets, strict=True):
                os.dup2(fd, target)

        environ = {
            **os.environ,
            **(env or {}),
            "LISTEN_FDS": str(len(fds)),
            "LISTEN_FDNAMES": ":".join(names),
        }
        # sd_listen_fds() checks LISTEN_PID == getpid(): let the shell set it, then exec.
        proc = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *argv],
            preexec_fn=move_fds,  # noqa: PLW1509 - fds must be moved between fork and exec
            pass_fds=targets,
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        super().__init__(proc, proc.stderr)

    def stop(self, timeout: float = 10.0) -> int:
        return super().stop(timeout)


class NotifySocket:
    """A datagram NOTIFY_SOCKET, as systemd provides, collecting messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))

    def messages(self, timeout: float) -> Iterator[tuple[float, dict[str, str]]]:
        """(arrival time, fields) for each datagram, until TIMEOUT passes without one."""
        self._sock.settimeout(timeout)
        while True:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            yield time.monotonic(), fields

    def wait_for(self, key: str, timeout: float = 10.0) -> list[dict[str, str]]:
        """All messages up to and including the first that has KEY."""
        seen = []
        deadline = time.monotonic() + timeout
        for _, fields in self.messages(timeout):
            seen.append(fields)
            if key in fields:
                return seen
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"no {key} in notifications: {seen}")

    def close(self) -> None:
        self._sock.close()
