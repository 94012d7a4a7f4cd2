"""Several tables in one service: maps by name.

A map NAME is the table ``NAME.lmdb``: the one given with --db, or one in the
--maps directory. Maps in the directory are opened on first use, so adding a
``NAME.lmdb`` file there needs no restart.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from .dbformat import SUFFIX, FoldKeys, map_name
from .snapshot import Taker, take
from .table import LiveTable
from .watch import Watcher, watch

# What a map name may be: it becomes a file name, so no '/', no leading dot.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,200}")


class UnknownMap(LookupError):
    """No such map: a configuration error (socketmap PERM), not a temporary one."""


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


class Maps:
    """The maps a server knows: fixed tables plus every NAME.lmdb in a directory."""

    def __init__(
        self,
        tables: dict[str, Path] | None = None,
        directory: Path | None = None,
        *,
        fold_keys: FoldKeys = None,
        take: Taker = take,
        sleep: Callable[[float], object] | None = None,
        watcher: Watcher = watch,
    ) -> None:
        self.directory = directory
        # Every table, fixed or found in the directory, is opened the same way.
        self._live = functools.partial(
            LiveTable, fold_keys=fold_keys, take=take, sleep=sleep, watcher=watcher
        )
        self._fixed = dict(tables or {})
        self._open: dict[str, LiveTable] = {}
        for name, path in self._fixed.items():
            self._open[name] = self._live(path)

    def get(self, name: str) -> LiveTable:
        """The map called NAME; raises UnknownMap when there is none."""
        table = self._open.get(name)
        if table is not None:
            return table
        if self.directory is None or not valid_name(name):
            raise UnknownMap(name)
        path = self.directory / f"{name}{SUFFIX}"
        if not _is_table(path):
            raise UnknownMap(name)
        table = self._open[name] = self._live(path)
        return table

    def open_all(self) -> None:
        """Open the fixed tables and every table in the directory (before READY)."""
        for name in self._fixed:
            self._open[name].refresh()
        if self.directory is not None:
            for path in sorted(self.directory.glob(f"*{SUFFIX}")):
                name = map_name(path)
                if valid_name(name) and _is_table(path):
                    self.get(name).refresh()

    def refresh_all(self, *, force: bool = False) -> None:
        # A copy: a lookup for a new map may add one while a refresh yields.
        for table in list(self._open.values()):
            table.refresh(force=force)

    def __iter__(self) -> Iterator[tuple[str, LiveTable]]:
        return iter(sorted(self._open.items()))

    def close(self) -> None:
        for table in list(self._open.values()):
            table.close()


def _is_table(path: Path) -> bool:
    """Whether PATH names a map: anything but a directory (a FIFO or a device there is a
    map whose lookups are refused with a reason, TEMP, not an unknown map, PERM)."""
    return path.exists() and not path.is_dir()
