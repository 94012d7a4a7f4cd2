"""argparse front ends: tcpmap-query; tcpmap-server's is server_cli.py, tcpmap-build's build.py."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from . import __version__
from .client import (
    DEFAULT_TIMEOUT,
    TABLE_FORMS,
    LookupFailed,
    ServerFailed,
    TableName,
    connect,
    served_tables,
)
from .config import DEFAULT_HOST, DEFAULT_PORT, Address, ConfigError
from .dbformat import FoldKeys, table_path
from .server_cli import _fold_option, _seconds, server_main, server_parser
from .table import Table, TableError

__all__ = ["build_main", "query_main", "server_main", "server_parser"]


def build_main(argv: list[str] | None = None) -> int:
    """tcpmap-build (in build.py; imported here only when used)."""
    from .build import main  # noqa: PLC0415 - the server starts faster without it

    return main(argv)


def query_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcpmap-query",
        description="Look keys up like `postmap -q`: through a tcp_table or socketmap server, "
        "or in a table file; list a table file like `postmap -s`. "
        "Exit 0 if any key was found, 1 if none, 2 on error.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "-s",
        "--server",
        metavar="TABLE",
        help=f"the table, as main.cf names it: {TABLE_FORMS} "
        f"(default tcp:{DEFAULT_HOST}:{DEFAULT_PORT}). postmap's order works too, with the "
        "table's type: KEY... tcp:HOST:PORT (a bare HOST:PORT there is a key)",
    )
    source.add_argument("--db", metavar="PATH", help="look up in this table file directly")
    source.add_argument(
        "--dump",
        metavar="TABLE",
        help="print every record of a table file as KEY<TAB>VALUE, like `postmap -s` "
        "(not through a server: tcp_table and socketmap cannot list keys)",
    )
    source.add_argument(
        "--info",
        metavar="TABLE",
        help="print a table file's build record (when, source, syntax, folding), "
        "its record count and size; with metrics:HOST:PORT, the tables a running server "
        "serves (its metrics listener): file, records, since when",
    )
    _fold_option(parser)
    parser.add_argument(
        "--timeout",
        type=_seconds(zero=False),
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up on a server that has not answered in this time (default %(default)g, "
        "as Postfix's tcp: and socketmap: clients)",
    )
    parser.add_argument(
        "keys",
        nargs="*",
        metavar="KEY",
        help="keys to look up; '-' reads one key per line from stdin",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _keys(arguments: list[str]) -> Iterator[bytes]:
    for argument in arguments:
        if argument == "-":
            for line in sys.stdin.buffer:
                yield line.rstrip(b"\r\n")
        else:
            yield argument.encode("utf-8", "surrogateescape")


def _show(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def query_main(argv: list[str] | None = None) -> int:
    """Run tcpmap-query; the exit status: 0 found, 1 none found, 2 error, 130 interrupted."""
    try:
        status = _query(argv)
        sys.stdout.flush()
    except KeyboardInterrupt:
        print("tcpmap-query: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (| head): nothing to say, and nothing left to flush
        # at exit (Python docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    return status


def _query(argv: list[str] | None) -> int:
    parser = query_parser()
    args = parser.parse_args(argv)
    if args.dump is not None or args.info is not None:
        if args.keys:
            parser.error("--dump and --info take no keys")
        return _inspect(args.dump, args.info, args.timeout)
    server_given = args.server is not None or args.db is not None
    table = _table_name(parser, args)
    if not server_given and args.server is None:  # no table given, not even after the keys
        _note_addresses_taken_as_keys(args.keys)
    if table.type == "lmdb":
        assert table.path is not None
        mistake = _address_for_a_file("--db" if args.db is not None else "lmdb:", table.path)
        if mistake is not None:
            print(f"tcpmap-query: {mistake}", file=sys.stderr)
            return 2
    # Like postmap: one key given prints the value; a list prints KEY<TAB>VALUE.
    one_key = len(args.keys) == 1 and args.keys[0] != "-"
    out = sys.stdout.buffer
    found_any = failed = False
    try:
        with _lookup_function(table, args.fold_keys, args.timeout) as lookup:
            for key in _keys(args.keys):
                try:
                    value = lookup(key)
                except ServerFailed:
                    raise
                except (LookupFailed, TableError) as exc:  # this key; the others go on
                    out.flush()
                    print(f"tcpmap-query: {_show(key)}: {exc}", file=sys.stderr)
                    failed = True
                    continue
                if value is None:
                    continue
                found_any = True
                out.write(value + b"\n" if one_key else key + b"\t" + value + b"\n")
    except (LookupFailed, TableError) as exc:
        out.flush()
        print(f"tcpmap-query: {exc}", file=sys.stderr)
        return 2
    if failed:
        return 2
    return 0 if found_any else 1


def _table_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TableName:
    """The table to query, from -s, --db, or postmap's KEY... TABLE order (taken off the keys)."""
    # postmap -q KEY TABLE: a last argument that can only be a table names one.
    if args.keys and TableName.looks_like(args.keys[-1]):
        if len(args.keys) == 1:
            parser.error(f"{args.keys[0]!r} names a table: give the KEY first (KEY... TABLE)")
        if args.server is not None or args.db is not None:
            parser.error(f"{args.keys[-1]!r} names a table, and so does -s/--db: give one")
        args.server = args.keys.pop()
    if not args.keys:
        parser.error("give at least one KEY (or - to read keys from stdin)")
    if args.db is not None:
        return TableName("lmdb", path=args.db)
    try:
        return TableName.parse(args.server or f"tcp:{DEFAULT_HOST}:{DEFAULT_PORT}")
    except ValueError as exc:
        parser.error(str(exc))


def _inspect(dump: str | None, info: str | None, timeout: float) -> int:
    from . import dump as tables  # noqa: PLC0415

    name = dump if dump is not None else info
    assert name is not None
    if info is not None and info.startswith("metrics:"):
        return _server_info(info, timeout)
    mistake = _address_for_a_file(f"--{'dump' if dump is not None else 'info'}", name)
    if mistake is not None:
        print(f"tcpmap-query: {mistake}", file=sys.stderr)
        return 2
    path = table_path(name)
    out = sys.stdout.buffer
    try:
        if dump is not None:
            for key, value in tables.records(path):
                out.write(key + b"\t" + value + b"\n")
        else:
            out.write("".join(f"{line}\n" for line in tables.summary(path).lines()).encode())
    except TableError as exc:
        out.flush()
        print(f"tcpmap-query: {exc}", file=sys.stderr)
        return 2
    return 0


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def _note_addresses_taken_as_keys(keys: list[str]) -> None:
    """postmap's KEY TABLE order needs the table's type: KEY HOST:PORT is two keys."""
    for key in keys:
        if _looks_like_address(key):
            print(
                f"tcpmap-query: note: {key} is taken as a key; did you mean -s {key}?",
                file=sys.stderr,
            )


def _looks_like_address(text: str) -> bool:
    """Whether TEXT, a key, reads as HOST:PORT or [IPV6]:PORT (a table meant with -s)."""
    if ":" not in text:
        return False
    try:
        address = Address.parse(text)
    except ConfigError:
        return False
    return address.port > 0 and (":" in address.host or bool(_HOST_NAME.fullmatch(address.host)))


_ADDRESS_TYPES = ("tcp", "socketmap", "inet", "metrics")


def _address_for_a_file(option: str, text: str) -> str | None:
    """Why TEXT, given to OPTION (--dump, --info, --db, lmdb:), is an address and not the
    table file OPTION reads, and what to give instead; None if it may be a file.

    A file that exists is a file, however its name looks.
    """
    if Path(text).exists() or table_path(text).exists():
        return None
    kind, _, rest = text.partition(":")
    if kind in _ADDRESS_TYPES and TableName.looks_like(text):
        what = f"{text} is a server address"
    elif kind == "metrics":
        what = f"{text} is a metrics listener's address"
    else:
        if kind == "inet":
            text = rest
        try:
            address = Address.parse(text)
        except ConfigError:
            return None
        if ":" not in text:
            return None  # a bare number is a port to Address.parse, but may be a file name
        what = f"{'inet:' if kind == 'inet' else ''}{text} is an address"
        text = f"tcp:{address}"
    reads = "names" if option == "lmdb:" else "reads"
    if option == "--dump":
        fix = (
            "tcp_table and socketmap have no request that lists keys; run --dump on the "
            "server's host with its table file"
        )
    elif option == "--info":
        fix = "for what a running server serves, ask its metrics listener: --info metrics:HOST:PORT"
    else:
        fix = f"to look keys up through the server, give -s {text}"
    return f"{option} {reads} an LMDB table file; {what}: {fix}"


def _server_info(spec: str, timeout: float) -> int:
    """--info metrics:HOST:PORT: what a running server serves, from its metrics."""
    try:
        address = Address.parse(spec.removeprefix("metrics:"))
    except ConfigError as exc:
        print(f"tcpmap-query: --info {exc}", file=sys.stderr)
        return 2
    try:
        tables = served_tables(address, timeout)
    except ServerFailed as exc:
        print(f"tcpmap-query: {exc}", file=sys.stderr)
        return 2
    for table in tables:
        print("\n".join(table))
    return 0


@contextlib.contextmanager
def _lookup_function(
    name: TableName, fold_keys: FoldKeys, timeout: float
) -> Iterator[Callable[[bytes], bytes | None]]:
    if name.type == "lmdb":
        assert name.path is not None
        table = Table.open(table_path(name.path), fold_keys=fold_keys)
        try:
            yield table.get
        finally:
            table.close()
    else:
        client = connect(name, timeout)
        try:
            yield client.lookup
        finally:
            client.close()
