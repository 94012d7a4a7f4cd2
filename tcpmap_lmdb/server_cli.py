"""tcpmap-server's command line: parsed, then the table's check starts before the server loads.

The console script imports this module, not cli.py: what it imports before the
check of --db starts (snapshot.start_check) is on every cold start's path, and
the query side's modules (client, table, lmdb) are not needed there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__, snapshot
from .config import (
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
    DEFAULT_STOP_TIMEOUT,
    LISTEN_FORMS,
    ConfigError,
    ListenSpec,
    ServerConfig,
    connections_problem,
    seconds_problem,
)
from .dbformat import table_path

__all__ = ["server_main", "server_parser"]


def _listen(text: str) -> ListenSpec:
    try:
        return ListenSpec.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(*, zero: bool) -> Callable[[str], float]:
    """An argparse type: a number of seconds (config.seconds_problem), named as typed."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        problem = seconds_problem(value, zero=zero)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value

    return parse


def _connections(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    problem = connections_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return value


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
    group.add_argument(
        "--fold-ascii",
        dest="fold_keys",
        action="store_const",
        const="ascii",
        default=None,
        help="lowercase ASCII letters only, as Postfix does with smtputf8_enable = no "
        "(by default: when the table's keys show it)",
    )


def server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcpmap-server",
        description="Answer Postfix tcp_table(5) and socketmap_table(5) lookups from LMDB tables.",
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        help="the table for tcp_table listeners, e.g. /var/lib/tcpmap/virtual.lmdb, or as "
        "main.cf names it: lmdb:/var/lib/tcpmap/virtual (socketmap serves it as map 'virtual')",
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
        help=f"repeatable: {LISTEN_FORMS}. Default: the sockets systemd passes, else "
        f"{DEFAULT_HOST}:{DEFAULT_PORT} (tcp_table with --db, socketmap with only --maps)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_seconds(zero=False),
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection idle this long (default %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=_connections,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once; more wait in the listen queue (default %(default)s)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=_seconds(zero=True),
        default=DEFAULT_STOP_TIMEOUT,
        metavar="SECONDS",
        help="on SIGTERM, time allowed to answer requests already read; 0: none "
        "(default %(default)s)",
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


def _db_option(text: str | None, maps: Path | None) -> Path | None:
    """--db as given (lmdb:NAME, NAME or NAME.lmdb), or None.

    systemd passes an unset TCPMAP_DB as --db "": with --maps that means no
    --db; without, it is an error that says where the setting lives.
    """
    if text is None:
        return None
    if not text.strip():
        if maps is not None:
            return None
        raise ConfigError(
            "--db is empty (is TCPMAP_DB set in /etc/default/tcpmap?): "
            "give a table with --db PATH, or a directory of tables with --maps DIR"
        )
    return table_path(text)


def server_main(argv: list[str] | None = None) -> int:
    args = server_parser().parse_args(argv)
    try:
        config = ServerConfig(
            db=_db_option(args.db, args.maps),
            maps=args.maps,
            listen=tuple(args.listen or ()),
            idle_timeout=args.idle_timeout,
            max_connections=args.max_connections,
            stop_timeout=args.stop_timeout,
            fold_keys=args.fold_keys,
            allow_remote=args.allow_remote,
            verbose=args.verbose,
        )
    except ConfigError as exc:
        print(f"tcpmap-server: {exc}", file=sys.stderr)
        return 2
    # The check of the table (snapshot.py), most of a cold start, starts now: in a
    # child, on another core, while the server's modules are imported.
    started = _start_check(config.db)
    try:
        # Only the server pays for importing gevent and systemd-python.
        from .listeners import ListenError  # noqa: PLC0415
        from .server import run  # noqa: PLC0415
        from .systemd import setup_logging  # noqa: PLC0415

        setup_logging(args.verbose)
        try:
            return run(config, started)
        except (ListenError, ConfigError) as exc:
            print(f"tcpmap-server: {exc}", file=sys.stderr)
            return 1
    finally:
        snapshot.cancel_all(started)  # if the server stopped before it opened the table


def _start_check(db: Path | None) -> dict[Path, snapshot.Check]:
    """The check of DB begun (snapshot.start_check), by path; none if it cannot start:
    the server tries again, and says why."""
    if db is None:
        return {}
    try:
        return {db: snapshot.start_check(db)}
    except snapshot.SnapshotRetry:
        return {}
