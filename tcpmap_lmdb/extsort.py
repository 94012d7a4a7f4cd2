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
from typing import BinaryIO, NamedTuple

# Estimated bytes a record costs in a run beyond its key and value bytes: two
# bytes objects, list slots, its line number, and the sort's index and key arrays.
RECORD_COST = 220
# Default run budget: what a run may use in memory (estimated) before it is
# sorted and spilled; with the merge's read buffers, the build stays under 256 MiB.
RUN_BYTES = 96 << 20
# What the merge reads ahead from all runs together, in records; spread over the runs.
MERGE_RECORDS = 400_000
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


class Batch(NamedTuple):
    """Records in key order, equal keys adjacent and in file order; line(i) gives
    the source line of keys[i] (slow: for duplicates only)."""

    keys: list[bytes]
    values: list[bytes]
    line: Callable[[int], int]


class Sorter:
    """Collects records in file order, then yields them merged in key order."""

    def __init__(self, directory: Path, run_bytes: int = RUN_BYTES) -> None:
        self.directory = directory  # where spilled runs go
        self.run_bytes = run_bytes
        self.records = 0  # every record added, duplicates included
        self.key_bytes = 0
        self.value_bytes = 0
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

    def add(self, keys: list[bytes], values: list[bytes], lines: array[int]) -> None:
        """Add records in file order; may sort and spill the run being gathered."""
        key_bytes, value_bytes = sum(map(len, keys)), sum(map(len, values))
        self.records += len(keys)
        self.key_bytes += key_bytes
        self.value_bytes += value_bytes
        self._keys += keys
        self._values += values
        self._lines += lines
        self._pending += key_bytes + value_bytes + RECORD_COST * len(keys)
        if self._pending >= self.run_bytes:
            self.on_sort()
            self._spill(self._sorted_run())

    def merged(self) -> Iterator[Batch]:
        """Every record added, in key order (stable), a batch at a time."""
        self.on_sort()
        last = self._sorted_run()
        if not self._runs:
            yield Batch(last.keys or [], last.values or [], (last.lines or array("Q")).__getitem__)
            return
        self._spill(last)
        yield from _merge(self, self._runs)

    def close(self) -> None:
        """Drop every run and close the temporary file (which removes it)."""
        self._keys, self._values, self._lines, self._runs = [], [], array("Q"), []
        if self._file is not None:
            self._file.close()
            self._file = None

    def _sorted_run(self) -> _Run:
        keys, values, lines = self._keys, self._values, self._lines
        self._keys, self._values, self._lines, self._pending = [], [], array("Q"), 0
        if not all(map(operator.le, keys, islice(keys, 1, None))):
            order = sorted(range(len(keys)), key=keys.__getitem__)
            keys = [keys[i] for i in order]
            values = [values[i] for i in order]
            lines = array("Q", [lines[i] for i in order])
        return _Run(len(keys), keys, values, lines)

    def _spill(self, run: _Run) -> None:
        """Append RUN to the temporary file, in pages that never split equal keys."""
        if run.count == 0:
            return
        if self._file is None:
            # O_TMPFILE when the filesystem allows it; else a name unlinked at once.
            # Closed by close(), not by a with: it lives as long as the sorter.
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix=".tcpmap-build-")  # noqa: SIM115
        keys, values, lines = run.keys, run.values, run.lines
        assert keys is not None and values is not None and lines is not None
        start = 0
        while start < run.count:
            end = min(start + PAGE, run.count)
            while end < run.count and keys[end] == keys[end - 1]:
                end += 1
            records: list[bytes] = [b""] * (2 * (end - start))
            records[0::2], records[1::2] = keys[start:end], values[start:end]
            data = b"\n".join(records) + b"\n"
            self._write(data)
            run.pages.append((self._size - len(data), len(data), end - start))
            start = end
        run.lines_offset = self._size
        self._write(lines.tobytes())
        run.keys = run.values = run.lines = None
        self._runs.append(run)

    def _write(self, data: bytes) -> None:
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
