"""Typed configuration and its defaults: the one place defaults live."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .dbformat import FoldKeys, map_name

DEFAULT_PORT = 4242
DEFAULT_HOST = "127.0.0.1"
# Twisted's PostfixTCPMapServer uses 600 s. Postfix never hangs up an idle
# connection itself, and a server-side close costs it a warning and a 1 s retry
# on the next lookup (postfix-maps.md 1.5), so keep this long.
DEFAULT_IDLE_TIMEOUT = 600.0
# Every Postfix process using the map holds one connection: 100 smtpd plus
# cleanup, trivial-rewrite and friends is several hundred on a busy host.
DEFAULT_MAX_CONNECTIONS = 1000
# On SIGTERM, how long requests already read may take to be answered.
DEFAULT_STOP_TIMEOUT = 5.0
# Reply bytes held for clients that do not read them, all connections together:
# over it, the server reads and answers nothing more until some are sent. Each
# connection holds at most sessions.OUTPUT_LIMIT (128 KiB) of its own.
DEFAULT_OUTPUT_BUDGET = 32 * 1024 * 1024
# Each connection is an open file, and Linux lets a process open at most
# fs.nr_open files (1048576 unless raised): more connections cannot be served.
MAX_CONNECTIONS_LIMIT = 1024 * 1024


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


MAX_SECONDS = 1e9  # about 31 years: beyond it, socket and timer deadlines overflow


def seconds_problem(value: float, *, zero: bool) -> str | None:
    """Why VALUE cannot be a timeout in seconds (None if it can).

    NaN and infinities never can, nor more than MAX_SECONDS (Python's socket
    timeouts overflow past about 9.2e9 s); 0 only where ZERO says it means something.
    """
    if not 0 <= value <= MAX_SECONDS or (value == 0 and not zero):  # NaN fails both
        low = "0 or more" if zero else "above 0"
        return f"must be a number of seconds, {low}, at most {MAX_SECONDS:.0e}"
    return None


def connections_problem(value: int) -> str | None:
    """Why VALUE cannot be --max-connections (None if it can)."""
    if not 1 <= value <= MAX_CONNECTIONS_LIMIT:
        return (
            f"must be from 1 to {MAX_CONNECTIONS_LIMIT} (each connection is an open file, "
            "and Linux allows a process at most fs.nr_open of them)"
        )
    return None


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """HOST:PORT, [IPV6]:PORT, or a bare PORT on 127.0.0.1."""
        if text.isdigit():
            return cls(DEFAULT_HOST, _port(text, text))
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ConfigError(f"{text!r}: expected [IPV6]:PORT")
        else:
            host, sep, port = text.rpartition(":")
            if not sep or not host:
                raise ConfigError(f"{text!r}: expected HOST:PORT")
            if ":" in host:
                raise ConfigError(f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
        return cls(host, _port(port, text))

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _number(value: float) -> str:
    """VALUE as an admin would write it: 5, 0.5, nan, inf."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"{whole!r}: port must be a number from 0 to 65535")
    return int(text)


TCP_TABLE = "tcp"
SOCKETMAP = "socketmap"
METRICS = "metrics"  # Prometheus /metrics over HTTP, not a map protocol


@dataclass(frozen=True, slots=True)
class Binding:
    """What a listener serves: tcp_table bound to one map, or socketmap (map per request)."""

    protocol: str  # TCP_TABLE, SOCKETMAP or METRICS
    map: str | None = None  # tcp_table only; None: the --db table

    @classmethod
    def from_fd_name(cls, name: str) -> Binding:
        """The binding of a socket systemd passed, from its FileDescriptorName=.

        ``socketmap`` serves socketmap; ``metrics`` serves Prometheus metrics;
        ``tcp=NAME`` serves tcp_table from map NAME; any other name
        (``tcp_table``, the unit's name) serves tcp_table from the --db table.
        """
        if name in (SOCKETMAP, METRICS):
            return cls(name)
        if name.startswith("tcp="):
            return cls(TCP_TABLE, name[4:])
        return cls(TCP_TABLE)

    def __str__(self) -> str:
        if self.protocol in (SOCKETMAP, METRICS):
            return self.protocol
        return f"tcp_table ({self.map})" if self.map else "tcp_table"


# Every --listen spelling, for errors: Postfix's own (inet:, unix:, socketmap:inet:) and ours.
LISTEN_FORMS = (
    "HOST:PORT, tcp:HOST:PORT or inet:HOST:PORT (tcp_table, the --db table); "
    "tcp:HOST:PORT=NAME (tcp_table, map NAME); socketmap:HOST:PORT, socketmap:inet:HOST:PORT, "
    "socketmap:unix:PATH or unix:PATH (socketmap, every map); "
    "metrics:HOST:PORT (Prometheus /metrics); [::1]:PORT for IPv6"
)


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """One --listen: where (an inet address or a unix socket path) and what."""

    binding: Binding
    address: Address | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ListenSpec:
        """One of LISTEN_FORMS; raises ConfigError naming them all.

        Postfix's tcp_table client connects over TCP only, so ``unix:PATH``
        (master.cf's spelling) can only mean socketmap.
        """
        try:
            return cls._parse(text)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; accepted forms: {LISTEN_FORMS}") from None

    @classmethod
    def _parse(cls, text: str) -> ListenSpec:
        kind, colon, rest = text.partition(":")
        if kind == "unix" or (kind == SOCKETMAP and rest.startswith("unix:")):
            path = rest.removeprefix("unix:") if kind == SOCKETMAP else rest
            if not path:
                raise ConfigError(f"{text!r}: no socket path")
            return cls(Binding(SOCKETMAP), path=Path(path))
        if kind == METRICS:
            return cls(Binding(METRICS), address=Address.parse(rest.removeprefix("inet:")))
        if kind == SOCKETMAP:
            rest = rest.removeprefix("inet:")
            if rest.count(":") > 1 and not rest.startswith("["):
                # socketmap:inet:HOST:PORT:NAME is how main.cf names one map of it.
                raise ConfigError(
                    f"{text!r}: a socketmap listener serves every map; "
                    "drop the map name (main.cf's :NAME goes in Postfix, not here)"
                )
            return cls(Binding(SOCKETMAP), address=Address.parse(rest))
        if colon and kind in (TCP_TABLE, "inet"):
            text_rest = rest
        elif colon and kind.isalpha() and kind != "localhost" and not rest.isdigit():
            raise ConfigError(f"{text!r}: unknown listener type {kind!r}")
        else:
            text_rest = text
        where, sep, name = text_rest.partition("=")
        if sep and not name:
            raise ConfigError(f"{text!r}: no map name after '='")
        return cls(Binding(TCP_TABLE, name or None), address=Address.parse(where))

    def __str__(self) -> str:
        where = f"unix:{self.path}" if self.path else str(self.address)
        return f"{where} ({self.binding})"


DEFAULT_LISTEN = Address(DEFAULT_HOST, DEFAULT_PORT)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    db: Path | None = None  # one table, served by plain tcp_table listeners
    maps: Path | None = None  # a directory of NAME.lmdb tables
    # Empty: the sockets systemd passes, or the default listener when there are none.
    listen: tuple[ListenSpec, ...] = ()
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    output_budget: int = DEFAULT_OUTPUT_BUDGET  # bytes
    fold_keys: FoldKeys = None  # None: as each table was built
    allow_remote: bool = False
    verbose: bool = False  # -v: log every lookup

    def __post_init__(self) -> None:
        if self.db is None and self.maps is None:
            raise ConfigError("give a table with --db PATH, or a directory of tables with --maps")
        problems = [
            ("--idle-timeout", self.idle_timeout, seconds_problem(self.idle_timeout, zero=False)),
            # 0: on SIGTERM, close at once without answering requests already read.
            ("--stop-timeout", self.stop_timeout, seconds_problem(self.stop_timeout, zero=True)),
            ("--max-connections", self.max_connections, connections_problem(self.max_connections)),
            (
                "output_budget",
                self.output_budget,
                None if self.output_budget > 0 else "must be at least 1 byte",
            ),
        ]
        for option, value, problem in problems:
            if problem is not None:
                raise ConfigError(f"{option} {_number(value)}: {problem}")
        for spec in self.listen:
            self.check_binding(spec.binding, str(spec))
        remote = [str(s.address) for s in self.listen if s.address and not s.address.is_loopback]
        if remote and not self.allow_remote:
            raise ConfigError(
                f"refusing to listen on non-loopback {', '.join(remote)}: tcp_table and "
                "socketmap have no authentication, so anyone who can connect can read every "
                "table. Use --allow-remote if a firewall protects the port."
            )

    def check_binding(self, binding: Binding, where: str) -> None:
        """Raise ConfigError if BINDING cannot be served with these tables."""
        if binding.protocol == METRICS:
            return
        if binding.protocol == TCP_TABLE and binding.map is None and self.db is None:
            raise ConfigError(f"{where}: a tcp_table listener needs --db, or a map: tcp:...=NAME")
        if binding.map is not None and self.maps is None and binding.map != self.db_name:
            raise ConfigError(f"{where}: map {binding.map!r} needs --maps DIR")

    @property
    def db_name(self) -> str | None:
        """The map name of --db: its file name without .lmdb."""
        return None if self.db is None else map_name(self.db)

    @property
    def listeners(self) -> tuple[ListenSpec, ...]:
        """What to bind when systemd passes no socket: the --listen ones, after the default
        map listener when none of them serves maps (metrics listeners alone do not replace it:
        --listen metrics:... adds metrics to a server, it does not stop it serving maps)."""
        if any(spec.binding.protocol != METRICS for spec in self.listen):
            return self.listen
        return (self.default_listen, *self.listen)

    @property
    def default_listen(self) -> ListenSpec:
        """tcp_table for --db; socketmap when only --maps is given."""
        binding = Binding(TCP_TABLE) if self.db is not None else Binding(SOCKETMAP)
        return ListenSpec(binding, address=DEFAULT_LISTEN)
