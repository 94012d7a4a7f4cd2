"""External merge sort of a table's records, in bounded memory.

Records come in file order as three parallel sequences: stored keys, stored
values (both with their trailing NUL, never containing LF) and source line
numbers. They are gathered into a run until its estimated size reaches the
budget; the run is then sorted by key (stably: equal keys stay in file order)
and, unless it is the only one, appended to one anonymous temporary file
(O_TMPFILE where the filesystem has it: it has no name, so no exit path, not
even SIGKILL, can leave it behind). The runs are then merged in key order, a
batch at a time: from every run, the records up to the smallest of the runs'
current last keys; C's sort merges these sorted pieces (timsort finds them),
which is several times faster than a heap merge in Python.

Equal keys are never split between two reads of a run, so every record with a
given key is in the same batch, in file order: the caller resolves duplicates
(build.py). Line numbers are only read back for them.

A source already in key order needs no sort: while every run is strictly
increasing and follows the one before, runs go straight to a Sink (the table
being written), and nothing is spilled. If a later run breaks the order, the
sink gives its records back and they become the first spilled run.
"""

from __future__ import annotations

import operator
import os
import tempfile
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

# Estimated bytes a record costs in a run beyond its key and value bytes: two
# bytes objects, list slots, its line number, and the sort's index and key arrays.
RECORD_COST = 220
# Default run budget: what a run may use in memory (estimated) before it is
# sorted and spilled; with the merge's read buffers, the build stays under 256 MiB.
RUN_BYTES = 96 << 20
# What the merge reads ahead from all runs together, in records; spread over the runs.
MERGE_RECORDS = 200_000
PAGE = 1024  # records per page in a spilled run: the unit of the merge's reads
_LINE_BYTES = array("Q").itemsize


@dataclass
class _Run:
    """A sorted run: in memory (keys set), or spilled into the sorter's file."""

    count: int
    keys: list[bytes] | None = None
    values: list[bytes] | None = None
    lines: array[int] | None = None
    pages: list[tuple[int, int, int]] = field(default_factory=list)  # offset, bytes, records
    lines_offset: int = 0
    ordered: bool = False  # strictly increasing as it was read (no sort was needed)


class Batch(NamedTuple):
    """Records in key order, equal keys adjacent and in file order; line(i) gives
    the source line of keys[i] (slow: for duplicates only)."""

    keys: list[bytes]
    values: list[bytes]
    line: Callable[[int], int]


class Sink(Protocol):
    """Where records in key order can go at once (build.TableWriter)."""

    def append(self, keys: list[bytes], values: list[bytes]) -> None: ...

    def recall(self) -> Iterator[tuple[list[bytes], list[bytes]]]:
        """Every record appended, in order; the sink is then empty."""
        ...


class Sorter:
    """Collects records in file order, then yields them merged in key order."""

    def __init__(
        self, directory: Path, run_bytes: int = RUN_BYTES, sink: Sink | None = None
    ) -> None:
        self.directory = directory  # where spilled runs go
        self.run_bytes = run_bytes
        self.sink = sink
        self.sunk = 0  # records handed to the sink
        self._sunk_last = b""  # the last key handed to it
        self._sunk_lines: _Run | None = None  # their line numbers, in the temporary file
        self.records = 0  # every record added, duplicates included
        # Called before a run is sorted (and spilled): the build's "sorting" phase.
        self.on_sort: Callable[[], None] = lambda: None
        self._keys: list[bytes] = []
        self._values: list[bytes] = []
        self._lines: array[int] = array("Q")
        self._pending = 0  # estimated bytes of the run being gathered
        self._runs: list[_Run] = []
        self._file: BinaryIO | None = None
        self._size = 0

    @property
    def spilled(self) -> int:
        """How many runs are in the temporary file."""
        return sum(1 for run in self._runs if run.keys is None)

    def add(
        self, keys: list[bytes], values: list[bytes], lines: array[int], payload: int = -1
    ) -> None:
        """Add records in file order (PAYLOAD: about their keys' and values' bytes, if
        known); may sort and spill the run being gathered, or give them to the sink."""
        if payload < 0:
            payload = sum(map(len, keys)) + sum(map(len, values))
        self.records += len(keys)
        if not self._keys and self._continues_sink(keys):
            self._sink(keys, values, lines)  # straight from the parser: still in the cache
            return
        self._keys += keys
        self._values += values
        self._lines += lines
        self._pending += payload + RECORD_COST * len(keys)
        if self._pending >= self.run_bytes:
            self.on_sort()
            self._finish(self._sorted_run())

    def merged(self) -> Iterator[Batch]:
        """Every record added and not handed to the sink, in key order (stable), a batch
        at a time."""
        self.on_sort()
        last = self._sorted_run()
        if not self._runs and not self.sunk:
            yield Batch(last.keys or [], last.values or [], (last.lines or array("Q")).__getitem__)
            return
        self._finish(last)
        if self._runs:
            yield from _merge(self, self._runs)

    def _finish(self, run: _Run) -> None:
        """Hand a sorted run to the sink if it continues what the sink has, else spill it."""
        keys = run.keys
        assert keys is not None and run.values is not None and run.lines is not None
        if not keys:
            return
        if run.ordered and self._continues_sink(keys[:1]):
            self._sink(keys, run.values, run.lines)
            return
        if self.sunk:
            self._recall()
        self._spill(run)

    def _continues_sink(self, keys: list[bytes]) -> bool:
        """Whether KEYS, non-empty, may go to the sink: strictly increasing, after all it has,
        and nothing spilled yet."""
        return (
            self.sink is not None
            and not self._runs
            and bool(keys)
            and keys[0] > self._sunk_last
            and all(map(operator.lt, keys, islice(keys, 1, None)))
        )

    def _sink(self, keys: list[bytes], values: list[bytes], lines: array[int]) -> None:
        assert self.sink is not None
        if self._sunk_lines is None:
            self._sunk_lines = _Run(0, lines_offset=self._offset())
        self._write(lines.tobytes())  # for duplicates, should the order break later
        self.sink.append(keys, values)
        self.sunk += len(keys)
        self._sunk_last = keys[-1]

    def _recall(self) -> None:
        """The sink's records become the first spilled run (they came first in the file)."""
        assert self.sink is not None and self._sunk_lines is not None
        run = self._sunk_lines
        for keys, values in self.sink.recall():
            self._write_pages(run, keys, values)
        run.count, self.sunk, self._sunk_lines = self.sunk, 0, None
        self._runs.append(run)

    def close(self) -> None:
        """Drop every run and close the temporary file (which removes it)."""
        self._keys, self._values, self._lines, self._runs = [], [], array("Q"), []
        if self._file is not None:
            self._file.close()
            self._file = None

    def _sorted_run(self) -> _Run:
        keys, values, lines = self._keys, self._values, self._lines
        self._keys, self._values, self._lines, self._pending = [], [], array("Q"), 0
        # Strictly increasing as read: a run the sink may take.
        ordered = all(map(operator.lt, keys, islice(keys, 1, None)))
        if not ordered and not all(map(operator.le, keys, islice(keys, 1, None))):
            order = sorted(range(len(keys)), key=keys.__getitem__)
            keys = [keys[i] for i in order]
            values = [values[i] for i in order]
            lines = array("Q", [lines[i] for i in order])
        return _Run(len(keys), keys, values, lines, ordered=ordered)

    def _spill(self, run: _Run) -> None:
        """Append RUN to the temporary file: its pages, then its line numbers."""
        if run.count == 0:
            return
        assert run.keys is not None and run.values is not None and run.lines is not None
        self._write_pages(run, run.keys, run.values)
        run.lines_offset = self._offset()
        self._write(run.lines.tobytes())
        run.keys = run.values = run.lines = None
        self._runs.append(run)

    def _write_pages(self, run: _Run, keys: list[bytes], values: list[bytes]) -> None:
        """Append pages of RUN's records to the temporary file; a page never ends
        between two equal keys (a merge batch then holds all of a key's records)."""
        start = 0
        while start < len(keys):
            end = min(start + PAGE, len(keys))
            while end < len(keys) and keys[end] == keys[end - 1]:
                end += 1
            records: list[bytes] = [b""] * (2 * (end - start))
            records[0::2], records[1::2] = keys[start:end], values[start:end]
            data = b"\n".join(records) + b"\n"
            run.pages.append((self._offset(), len(data), end - start))
            self._write(data)
            start = end

    def _offset(self) -> int:
        """Where the next write goes in the temporary file, created on first use."""
        if self._file is None:
            # O_TMPFILE when the filesystem allows it; else a name unlinked at once.
            # Closed by close(), not by a with: it lives as long as the sorter.
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix=".tcpmap-build-")  # noqa: SIM115
        return self._size

    def _write(self, data: bytes) -> None:
        self._offset()
        assert self._file is not None
        view = memoryview(data)
        while view:
            written = os.pwrite(self._file.fileno(), view, self._size)
            self._size += written
            view = view[written:]

    def _read(self, offset: int, size: int) -> bytes:
        assert self._file is not None
        data = os.pread(self._file.fileno(), size, offset)
        if len(data) != size:
            raise OSError(f"short read from the temporary run file: {len(data)} of {size}")
        return data

    def _line(self, run: _Run, index: int) -> int:
        raw = self._read(run.lines_offset + _LINE_BYTES * index, _LINE_BYTES)
        return array("Q", raw)[0]


class _Cursor:
    """Where the merge is in one spilled run: its current records and the next page."""

    def __init__(self, sorter: Sorter, run: _Run, pages_per_read: int) -> None:
        self.sorter, self.run, self.pages_per_read = sorter, run, pages_per_read
        self.next_page = 0
        self.base = 0  # index in the run of keys[0]
        self.keys: list[bytes] = []
        self.values: list[bytes] = []
        self.pos = 0

    def fill(self) -> bool:
        """Read the next pages once the current ones are used up; False at the end."""
        if self.pos < len(self.keys):
            return True
        pages = self.run.pages[self.next_page : self.next_page + self.pages_per_read]
        if not pages:
            return False
        self.next_page += len(pages)
        self.base += len(self.keys)
        offset = pages[0][0]
        size = pages[-1][0] + pages[-1][1] - offset
        parts = self.sorter._read(offset, size).split(b"\n")
        self.keys, self.values, self.pos = parts[0:-1:2], parts[1::2], 0
        return True

    def line(self, index: int) -> int:
        return self.sorter._line(self.run, self.base + index)


def _merge(sorter: Sorter, runs: list[_Run]) -> Iterator[Batch]:
    pages_per_read = max(1, MERGE_RECORDS // (len(runs) * PAGE))
    cursors = [_Cursor(sorter, run, pages_per_read) for run in runs]
    while True:
        cursors = [cursor for cursor in cursors if cursor.fill()]
        if not cursors:
            return
        bound = min(cursor.keys[-1] for cursor in cursors)
        pieces = []
        for cursor in cursors:  # in run order, which is file order
            start = cursor.pos
            end = bisect_right(cursor.keys, bound, start)
            if end > start:
                pieces.append((cursor, start, end))
                cursor.pos = end
        yield _batch(pieces)


def _batch(pieces: list[tuple[_Cursor, int, int]]) -> Batch:
    if len(pieces) == 1:
        cursor, start, end = pieces[0]
        return Batch(
            cursor.keys[start:end], cursor.values[start:end], lambda i: cursor.line(start + i)
        )
    keys: list[bytes] = []
    values: list[bytes] = []
    offsets = []
    for cursor, start, end in pieces:
        offsets.append(len(keys))
        keys += cursor.keys[start:end]
        values += cursor.values[start:end]
    order = sorted(range(len(keys)), key=keys.__getitem__)

    def line(i: int) -> int:
        at = order[i]
        piece = bisect_right(offsets, at) - 1
        cursor, start, _ = pieces[piece]
        return cursor.line(start + at - offsets[piece])

    return Batch([keys[i] for i in order], [values[i] for i in order], line)
