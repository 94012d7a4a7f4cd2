"""argparse front ends: tcpmap-server, tcpmap-query (tcpmap-build lives in build.py)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from . import __version__
from .config import (
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
    DEFAULT_STOP_TIMEOUT,
    ConfigError,
    ListenSpec,
    ServerConfig,
)
from .table import Table, TableError

__all__ = ["build_main", "query_main", "server_main"]


def build_main(argv: list[str] | None = None) -> int:
    """tcpmap-build (in build.py; imported here only when used)."""
    from .build import main  # noqa: PLC0415 - the server starts faster without it

    return main(argv)


def _listen(text: str) -> ListenSpec:
    try:
        return ListenSpec.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fold_option(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--fold",
        dest="fold_keys",
        action="store_true",
        default=None,
        help="lowercase lookup keys even if the table's build record says otherwise",
    )
    group.add_argument(
        "--no-fold",
        dest="fold_keys",
        action="store_false",
        default=None,
        help="look keys up as sent (for tables built with postmap -f)",
    )


def server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcpmap-server",
        description="Answer Postfix tcp_table(5) and socketmap_table(5) lookups from LMDB tables.",
    )
    parser.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        help="the table for tcp_table listeners, e.g. /var/lib/tcpmap/virtual.lmdb "
        "(socketmap serves it as map 'virtual')",
    )
    parser.add_argument(
        "--maps",
        type=Path,
        metavar="DIR",
        help="serve every DIR/NAME.lmdb as map NAME (new files need no restart)",
    )
    parser.add_argument(
        "--listen",
        type=_listen,
        action="append",
        metavar="SPEC",
        help="repeatable: HOST:PORT or tcp:HOST:PORT (tcp_table, the --db table), "
        "tcp:HOST:PORT=NAME (tcp_table, map NAME), socketmap:HOST:PORT, socketmap:unix:PATH; "
        "[::1]:PORT for IPv6. Default: the sockets systemd passes, else "
        f"{DEFAULT_HOST}:{DEFAULT_PORT} (tcp_table with --db, socketmap with only --maps)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection idle this long (default %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once; more wait in the listen queue (default %(default)s)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT,
        metavar="SECONDS",
        help="on SIGTERM, time allowed to answer requests already read (default %(default)s)",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow non-loopback addresses (tcp_table has no authentication)",
    )
    _fold_option(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def server_main(argv: list[str] | None = None) -> int:
    args = server_parser().parse_args(argv)
    from .systemd import setup_logging  # noqa: PLC0415

    setup_logging(args.verbose)
    try:
        config = ServerConfig(
            db=args.db,
            maps=args.maps,
            listen=tuple(args.listen or ()),
            idle_timeout=args.idle_timeout,
            max_connections=args.max_connections,
            stop_timeout=args.stop_timeout,
            fold_keys=args.fold_keys,
            allow_remote=args.allow_remote,
        )
    except ConfigError as exc:
        print(f"tcpmap-server: {exc}", file=sys.stderr)
        return 2
    # Only the server pays for importing gevent and systemd-python.
    from .server import run  # noqa: PLC0415

    try:
        return run(config)
    except OSError as exc:
        print(f"tcpmap-server: cannot listen: {exc}", file=sys.stderr)
        return 1


def query_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcpmap-query",
        description="Look keys up like `postmap -q`: through a tcp_table or socketmap server, "
        "or in a file. "
        "Exit 0 if any key was found, 1 if none, 2 on error.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "-s",
        "--server",
        default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
        metavar="TABLE",
        help="the server, as Postfix names it: HOST:PORT or tcp:HOST:PORT (tcp_table), "
        "socketmap:inet:HOST:PORT:NAME or socketmap:unix:PATH:NAME (default %(default)s)",
    )
    source.add_argument("--db", type=Path, help="look up in this LMDB file directly")
    _fold_option(parser)
    parser.add_argument(
        "keys",
        nargs="+",
        metavar="KEY",
        help="keys to look up; '-' reads one key per line from stdin",
    )
    return parser


def _keys(arguments: list[str]) -> Iterator[bytes]:
    for argument in arguments:
        if argument == "-":
            for line in sys.stdin.buffer:
                yield line.rstrip(b"\r\n")
        else:
            yield argument.encode("utf-8", "surrogateescape")


def query_main(argv: list[str] | None = None) -> int:
    from .client import LookupFailed  # noqa: PLC0415 - the server starts faster without it

    args = query_parser().parse_args(argv)
    # Like postmap: one key given prints the value; a list prints KEY<TAB>VALUE.
    one_key = len(args.keys) == 1 and args.keys[0] != "-"
    out = sys.stdout.buffer
    found_any = False
    try:
        with _lookup_function(args) as lookup:
            for key in _keys(args.keys):
                value = lookup(key)
                if value is None:
                    continue
                found_any = True
                out.write(value + b"\n" if one_key else key + b"\t" + value + b"\n")
    except (LookupFailed, TableError, OSError) as exc:
        out.flush()
        print(f"tcpmap-query: {exc}", file=sys.stderr)
        return 2
    return 0 if found_any else 1


@contextlib.contextmanager
def _lookup_function(args: argparse.Namespace) -> Iterator[Callable[[bytes], bytes | None]]:
    if args.db is not None:
        table = Table.open(args.db, fold_keys=args.fold_keys)
        try:
            yield table.get
        finally:
            table.close()
    else:
        from .client import LookupFailed, connect  # noqa: PLC0415

        try:
            client = connect(args.server)
        except ValueError as exc:
            raise LookupFailed(str(exc)) from None
        try:
            yield client.lookup
        finally:
            client.close()
