"""Typed configuration and its defaults: the one place defaults live."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

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


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


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


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"{whole!r}: port must be a number from 0 to 65535")
    return int(text)


DEFAULT_LISTEN = Address(DEFAULT_HOST, DEFAULT_PORT)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    db: Path
    # Empty: the sockets systemd passes, or DEFAULT_LISTEN when there are none.
    listen: tuple[Address, ...] = ()
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    fold_keys: bool | None = None  # None: as the table was built
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if self.idle_timeout <= 0:
            raise ConfigError("--idle-timeout must be positive")
        if self.max_connections < 1:
            raise ConfigError("--max-connections must be at least 1")
        remote = [str(a) for a in self.listen if not a.is_loopback]
        if remote and not self.allow_remote:
            raise ConfigError(
                f"refusing to listen on non-loopback {', '.join(remote)}: tcp_table has no "
                "authentication, so anyone who can connect can read the whole table. "
                "Use --allow-remote if a firewall protects the port."
            )
