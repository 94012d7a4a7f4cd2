"""The bench data: one postmap source per table size, and one list of request keys per size.

Keys and values need no %XX quoting (Twisted never decodes a request key, and
quotes values with its own, wider rule), so every server sees and sends the
same bytes. Requests are 80% hits and 20% misses, drawn uniformly over the
whole table, shuffled, and the same file is replayed against every server.
Files are cached in the data directory and rebuilt when the recipe changes.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

RECIPE = "v1"  # bump when the generated data changes
REQUESTS = 1_000_000  # request keys per list; each connection starts at its own offset
HIT_RATIO = 0.8
SEED = 20260611
_CHUNK = 100_000


def key(i: int) -> str:
    return f"user{i:08d}@d{i % 100:02d}.example.com"


def miss(i: int) -> str:
    """Sorts right beside key(i), so misses are spread over the table too."""
    return f"user{i:08d}@d{(i + 1) % 100:02d}.example.com"


def value(i: int) -> str:
    return f"d{i % 100:02d}/user{i:08d}/"


def write_source(path: Path, records: int) -> None:
    """`key value` lines, postmap(1) syntax."""
    with open(path, "w", encoding="ascii") as out:
        for start in range(0, records, _CHUNK):
            stop = min(start + _CHUNK, records)
            out.writelines(f"{key(i)} {value(i)}\n" for i in range(start, stop))


def write_requests(path: Path, records: int) -> None:
    rng = random.Random(SEED + records)  # noqa: S311 - reproducible test data, not secrets
    hits = round(REQUESTS * HIT_RATIO)
    keys = [key(rng.randrange(records)) for _ in range(hits)]
    keys += [miss(rng.randrange(records)) for _ in range(REQUESTS - hits)]
    rng.shuffle(keys)
    path.write_text("\n".join(keys) + "\n", encoding="ascii")


def build_source(directory: Path, records: int, order: str) -> Path:
    """A postmap source of RECORDS `key value` lines in key order ("sorted") or in a
    random order ("shuffled"), for the build bench; cached in DIRECTORY."""
    path = directory / f"build-{records}-{order}-{RECIPE}"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    print(f"bench: writing {records:,} {order} lines to {path}", flush=True)
    numbers = list(range(records))
    if order == "shuffled":
        random.Random(SEED).shuffle(numbers)  # noqa: S311 - reproducible test data
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="ascii") as out:
        for start in range(0, records, _CHUNK):
            out.writelines(f"{key(i)} {value(i)}\n" for i in numbers[start : start + _CHUNK])
    partial.rename(path)
    return path


class DataSet:
    """The files for one table size, under DIR/SIZE/."""

    def __init__(self, directory: Path, records: int) -> None:
        self.records = records
        self.dir = directory / str(records)
        self.source = self.dir / "source"
        self.requests = self.dir / "requests"
        self.table = self.dir / "table.lmdb"
        self._stamp = self.dir / "recipe"

    def prepare(self, build: list[str]) -> None:
        """Write the source and request files and build the table, unless cached."""
        if self._stamp.exists() and self._stamp.read_text() == RECIPE and self.table.exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stamp.unlink(missing_ok=True)
        began = time.monotonic()
        print(f"bench: writing {self.records:,} records to {self.source}", flush=True)
        write_source(self.source, self.records)
        write_requests(self.requests, self.records)
        subprocess.run([*build, "-q", "-o", str(self.table), str(self.source)], check=True)
        self._stamp.write_text(RECIPE)
        print(f"bench: data for {self.records:,} keys ready in {time.monotonic() - began:.0f} s")

    def hit_key(self) -> str:
        """A key that is in the table (for single lookups)."""
        return key(self.records // 2)
