"""tcpmap-build on sources larger than its memory: the external sort, its temporary runs, the
progress line. A small run budget (TCPMAP_BUILD_RUN_BYTES) forces many runs on a small file."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, raw_items
from hypothesis import given, settings
from hypothesis import strategies as st
from postfix_tools import postfix_config_dir, run_postfix, tool

from tcpmap_lmdb import build, extsort, progress
from tcpmap_lmdb.dbformat import META_KEY

SMALL_RUNS = "4096"  # bytes of estimated run size: a run every dozen records or so


def shuffled_source(
    path: Path,
    records: int,
    *,
    duplicates: int = 0,
    seed: int = 17,
    shuffle: bool = True,
    chunks: int = 0,
) -> Path:
    """RECORDS plain "key value" lines in random order (or in key order; or, with CHUNKS,
    in chunks of that many lines in key order, the chunks in reverse: cheap to sort), plus
    DUPLICATES repeated keys (in other case, with other values) spread over the file."""
    rng = random.Random(seed)  # noqa: S311 - test data
    lines = [f"user{i:07d}@example.com d{i % 97}/u{i}\n" for i in range(records)]
    if chunks:
        lines = [
            line
            for start in range(records - records % chunks, -1, -chunks)
            for line in lines[start : start + chunks]
        ]
    elif shuffle:
        rng.shuffle(lines)
    for n in range(duplicates):
        at = rng.randrange(len(lines) + 1)
        lines.insert(at, f"USER{rng.randrange(records):07d}@Example.COM dup{n}\n")
    path.write_text("".join(lines))
    return path


def build_with(
    monkeypatch: pytest.MonkeyPatch, run_bytes: str | None, *args: str | Path
) -> tuple[int, str]:
    """build.main in-process with the given run budget; (status, stderr)."""
    if run_bytes is None:
        monkeypatch.delenv("TCPMAP_BUILD_RUN_BYTES", raising=False)
    else:
        monkeypatch.setenv("TCPMAP_BUILD_RUN_BYTES", run_bytes)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = build.main([str(a) for a in args])
    return status, err.getvalue()


def without_build_time(data: bytes) -> bytes:
    """The file's bytes with the build record's time blanked (it is the only difference)."""
    return re.sub(rb'"built_at": "[^"]*"', lambda m: b"x" * len(m.group()), data)


# --- the sorter itself -----------------------------------------------------------------------


def test_sorter_merges_many_runs_stably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sixty spilled runs merge into key order; equal keys stay in file order, in one
    batch, with their line numbers, even across the merge's page boundaries."""
    monkeypatch.setattr(extsort, "PAGE", 3)
    rng = random.Random(5)  # noqa: S311 - test data
    records = [(b"k%03d\0" % rng.randrange(300), b"v%d\0" % line, line) for line in range(1, 3001)]
    sorter = extsort.Sorter(tmp_path, run_bytes=2000)
    for start in range(0, len(records), 50):
        chunk = records[start : start + 50]
        sorter.add(
            [k for k, _, _ in chunk],
            [v for _, v, _ in chunk],
            array("Q", [n for _, _, n in chunk]),
        )
    assert sorter.spilled == 60  # one run per add: 50 records cost more than 2000 bytes
    got: list[tuple[bytes, bytes, int]] = []
    for batch in sorter.merged():
        assert batch.keys == sorted(batch.keys)
        batch_keys = set(batch.keys)
        assert not batch_keys & {k for k, _, _ in got}, "a key split over two batches"
        got += [
            (k, v, batch.line(i))
            for i, (k, v) in enumerate(zip(batch.keys, batch.values, strict=True))
        ]
    sorter.close()
    assert got == sorted(records, key=lambda r: r[0])  # stable: file order within a key
    assert list(tmp_path.iterdir()) == []


def test_sorter_hands_ordered_runs_to_the_sink(tmp_path: Path) -> None:
    """Runs in key order go straight into the table (nothing is spilled); when a later run
    breaks the order, the table gives them back and they are merged first, in file order."""
    keys = [b"k%05d\0" % i for i in range(3000)]
    later = [b"k%05d\0" % i for i in range(1, 3000, 7)]  # after them in the file, duplicates
    with build.TableWriter(tmp_path / "t.lmdb", 1 << 20) as writer:
        sorter = extsort.Sorter(tmp_path, run_bytes=2000, sink=writer)
        for start in range(0, 3000, 50):
            lines = array("Q", range(start + 1, start + 51))
            sorter.add(keys[start : start + 50], [b"first\0"] * 50, lines)
        assert (sorter.sunk, sorter.spilled) == (3000, 0)
        sorter.add(later, [b"later\0"] * len(later), array("Q", range(3001, 3001 + len(later))))
        assert (sorter.sunk, sorter.spilled) == (0, 2)
        merged = [
            (k, v, b.line(i))
            for b in sorter.merged()
            for i, (k, v) in enumerate(zip(b.keys, b.values, strict=True))
        ]
        sorter.close()
    expected = [(k, b"first\0", i + 1) for i, k in enumerate(keys)]
    expected += [(k, b"later\0", 3001 + i) for i, k in enumerate(later)]
    assert merged == sorted(expected, key=lambda r: r[0])
    assert list(tmp_path.iterdir()) == []


# --- the same table, however many runs -------------------------------------------------------


def test_many_runs_give_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built in one run or in hundreds, the table is the same file byte for byte (but for the
    time in the build record), and the same warnings are printed, in line order."""
    src = shuffled_source(tmp_path / "map", 30_000, duplicates=40)
    one = tmp_path / "one.lmdb"
    many = tmp_path / "many.lmdb"
    status, err_one = build_with(monkeypatch, None, "-o", one, src)
    assert status == 0
    status, err_many = build_with(monkeypatch, SMALL_RUNS, "-o", many, src)
    assert status == 0
    assert without_build_time(one.read_bytes()) == without_build_time(many.read_bytes())
    assert err_many.replace("many.lmdb", "one.lmdb") == err_one
    warnings = err_one.splitlines()[:-1]
    assert len(warnings) == 40
    numbers = [int(w.split(":")[1]) for w in warnings]
    assert numbers == sorted(numbers)


@pytest.mark.parametrize("order", ["sorted", "sorted, then appended"])
def test_sources_in_key_order_give_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """A source in key order (written straight into the table), or in key order with unsorted
    lines appended (the table is read back into the sort): the same file as one run."""
    src = shuffled_source(tmp_path / "map", 20_000, shuffle=False)
    if order != "sorted":
        with src.open("a") as tail:  # new entries, and changed ones, at the end
            tail.writelines(f"user{i:07d}@example.com changed{i}\n" for i in range(30, 20_000, 997))
            tail.writelines(f"new{i}@example.org n\n" for i in range(500, 0, -1))
    files = []
    for budget in (None, SMALL_RUNS):
        out = tmp_path / f"{budget}.lmdb"
        status, err = build_with(monkeypatch, budget, "-o", out, src)
        assert status == 0
        files.append((without_build_time(out.read_bytes()), err.replace(out.name, "OUT")))
    assert files[0] == files[1]
    assert files[0][1].count("duplicate key") == (0 if order == "sorted" else 21)


@pytest.mark.parametrize("options", [(), ("-r",), ("-w",), ("-f",)])
def test_duplicates_across_runs_resolve_as_in_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: tuple[str, ...]
) -> None:
    """A key first seen in one run and again in runs far later: the first in file order wins
    (the last with -r), and the warning names both lines."""
    lines = ["b 1\n", "A first\n"] + [f"k{i:05d} x\n" for i in range(3000)] + ["a second\n"]
    lines += [f"m{i:05d} y\n" for i in range(3000)] + ["a third\n"]
    src = tmp_path / "map"
    src.write_text("".join(lines))
    out = tmp_path / "out.lmdb"
    status, err = build_with(monkeypatch, SMALL_RUNS, *options, "-o", out, src)
    assert status == 0
    value = raw_items(out).get(b"a\0")
    if options == ("-f",):
        assert (value, raw_items(out)[b"A\0"]) == (b"second\0", b"first\0")
        return
    assert value == (b"third\0" if options == ("-r",) else b"first\0")
    warned = [line for line in err.splitlines() if "duplicate key" in line]
    if options:
        assert warned == []
    else:
        assert warned == [
            f'{src}:3003: duplicate key "a" (first at line 2): keeping the first',
            f'{src}:6004: duplicate key "a" (first at line 2): keeping the first',
        ]


@pytest.mark.skipif(tool("postmap") is None, reason="needs Postfix's postmap")
@pytest.mark.parametrize("options", [(), ("-r",), ("-w",)])
def test_many_runs_store_what_postmap_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: tuple[str, ...]
) -> None:
    """With hundreds of runs and duplicates spread over them, the records are postmap's."""
    src = shuffled_source(tmp_path / "map", 5_000, duplicates=300)
    done = run_postfix("postmap", postfix_config_dir(tmp_path), *options, f"lmdb:{src}")
    assert done.returncode == 0, done.stderr.decode()
    out = tmp_path / "ours.lmdb"
    assert build_with(monkeypatch, SMALL_RUNS, "-q", *options, "-o", out, src)[0] == 0
    ours = raw_items(out)
    ours.pop(META_KEY)
    assert ours == raw_items(Path(f"{src}.lmdb"))


_LINE = st.sampled_from(["a 1", "A 2", "b 3", "b\t4", "c  5", "# x", "", "  cont", "d", "é 6"])


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(_LINE, max_size=60), options=st.sampled_from([(), ("-r",), ("-w",)]))
def test_random_sources_same_with_many_runs(lines: list[str], options: tuple[str, ...]) -> None:
    """Random sources (bad lines, duplicates, continuations): the same status, messages and
    records with a run every few records as with one run."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as monkeypatch:
        src = Path(tmp) / "src"
        src.write_text("\n".join(lines) + "\n")
        results = []
        for budget in (None, "300"):
            out = Path(tmp) / f"{budget}.lmdb"
            status, err = build_with(monkeypatch, budget, *options, "-o", out, src)
            items = raw_items(out) if out.exists() else None
            if items is not None:
                items.pop(META_KEY)
            results.append((status, err.replace(str(out), "OUT"), items))
        assert results[0] == results[1]


def test_run_budget_must_be_a_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run budget that is not a positive number is one clear line, exit 1."""
    src = shuffled_source(tmp_path / "map", 10)
    status, err = build_with(monkeypatch, "lots", src)
    assert (status, err) == (
        1,
        "tcpmap-build: TCPMAP_BUILD_RUN_BYTES=lots: not a positive number of bytes\n",
    )


def test_tmpdir_option_puts_runs_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tmpdir names where runs go: a directory that does not exist fails there, naming it."""
    src = shuffled_source(tmp_path / "map", 2000)
    missing = tmp_path / "nope"
    status, err = build_with(monkeypatch, SMALL_RUNS, "--tmpdir", missing, src)
    assert status == 1
    assert err == f"tcpmap-build: {missing}: No such file or directory (temporary sort runs)\n"
    assert not (tmp_path / "map.lmdb").exists()
    status, _ = build_with(monkeypatch, SMALL_RUNS, "-q", "--tmpdir", tmp_path, src)
    assert status == 0
    assert len(raw_items(tmp_path / "map.lmdb")) == 2001


# --- interruptions and full disks: no run file, the old table intact ---------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs of our own: what a build leaves in it, space included, can be measured."""
    mount = tmp_path / "fs"
    mount.mkdir()
    yield from _mounted(mount, "64m")


def _mounted(mount: Path, size: str) -> Iterator[Path]:
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        why = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"CI=true, root, and still {why}")
        pytest.skip(why)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def used_blocks(directory: Path) -> int:
    fs = os.statvfs(directory)
    return fs.f_blocks - fs.f_bfree


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def run_files(pid: int, directory: Path) -> int:
    """How many files without a name (the sort's runs) in DIRECTORY process PID has open."""
    return len(_run_file_sizes(pid, directory))


def _run_file_sizes(pid: int, directory: Path) -> list[int]:
    sizes = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith(f"{directory}/") and link.endswith(" (deleted)"):
                sizes.append(fd.stat().st_size)
    return sizes


def source_position(pid: int, source: Path) -> int:
    """How far process PID has read SOURCE (it keeps it open until the end); -1 if not open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(source):
                return int(Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split()[1])
    return -1


def source_read(pid: int, source: Path) -> bool:
    return source_position(pid, source) >= source.stat().st_size


def reading_past_a_run(pid: int, source: Path, seen: list[int]) -> bool:
    """Whether PID has spilled a run and read another 2 MiB since: it is then most likely
    reading (the signal would otherwise land in the spill of the first run)."""
    position = source_position(pid, source)
    if not seen:
        if run_files(pid, source.parent) > 0:
            seen.append(position)
        return False
    return seen[0] + (2 << 20) <= position < source.stat().st_size


def spilling_the_last_run(pid: int, source: Path, seen: list[int]) -> bool:
    """Whether PID has read all its source and its run file has grown since: it is
    spilling the last run, which it has just sorted (the "sorting" phase)."""
    if output_written(source.parent):
        return True  # too late: try again
    size = sum(_run_file_sizes(pid, source.parent))
    if not seen:
        if source_read(pid, source):
            seen.append(size)
        return False
    return size > seen[0]


def output_written(directory: Path) -> bool:
    """Whether a build's temporary table in DIRECTORY holds at least 1 MiB."""
    total = 0
    for path in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total >= 1 << 20


PHASE_REACHED: dict[str, Callable[[int, Path, list[int]], bool]] = {
    "reading": reading_past_a_run,
    "sorting": spilling_the_last_run,
    "writing": lambda pid, src, _: output_written(src.parent),
}
# sorting: one run spilled while reading, and a last run of about 180,000 records to sort.
PHASE_BUDGET = {"reading": "8000000", "sorting": "60000000", "writing": "20000000"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", ["reading", "sorting", "writing"])
def test_interrupted_in_each_phase(tmpfs: Path, phase: str, signum: int) -> None:
    """SIGINT or SIGTERM while reading, sorting or writing: exit 130, the message names the
    phase, the old table is intact byte for byte, and no run file is left: every block the
    build used is free again."""
    src = tmpfs / "map"
    src.write_text("old value\n")
    assert build.main(["-q", str(src)]) == 0
    # While reading, runs in chunks of key order take little sorting: reading goes on.
    shuffled_source(src, 400_000, chunks=5000 if phase == "reading" else 0)
    before, used = snapshot(tmpfs), used_blocks(tmpfs)
    env = {**os.environ, "TCPMAP_BUILD_RUN_BYTES": PHASE_BUDGET[phase]}
    hit = []
    for _ in range(5):  # the phase may end between our look and the signal: try again
        child = subprocess.Popen(
            [sys.executable, "-m", "tcpmap_lmdb.build", str(src)],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            seen: list[int] = []
            while not PHASE_REACHED[phase](child.pid, src, seen):
                assert child.poll() is None, "the build ended before the phase"
                assert time.monotonic() < deadline, f"the build never reached {phase}"
                time.sleep(0.001)  # poll gently: the child needs the CPU
            child.send_signal(signum)
            _, err = child.communicate(timeout=60)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == 130, err
        assert snapshot(tmpfs) == before
        assert used_blocks(tmpfs) == used
        hit.append(err.strip())
        if err.strip() == f"tcpmap-build: interrupted (while {phase})":
            return
    pytest.fail(f"never interrupted while {phase}: {hit}")


def test_sigkill_leaves_no_run_file(tmpfs: Path) -> None:
    """Even SIGKILL leaves no run file (they have no name): only the table's temporary file,
    which the next build removes; then every block is free again."""
    src = tmpfs / "map"
    src.write_text("old value\n")
    assert build.main(["-q", str(src)]) == 0
    shuffled_source(src, 400_000)
    used = used_blocks(tmpfs)
    env = {**os.environ, "TCPMAP_BUILD_RUN_BYTES": "1000000"}
    child = subprocess.Popen([sys.executable, "-m", "tcpmap_lmdb.build", str(src)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (output_written(tmpfs) and run_files(child.pid, tmpfs) > 0):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        child.kill()
    finally:
        child.kill()
        child.wait()
    leftovers = [p for p in tmpfs.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the table's: the next build removes it (test_faults)
    leftovers[0].unlink()
    assert used_blocks(tmpfs) == used


@pytest.mark.parametrize(
    ("size", "shuffle", "where"),
    [
        ("2m", True, "runs"),  # sorting: the runs (4.4 MB) do not fit
        ("7m", True, "table"),  # writing: the runs fit, not the table (4.7 MB) too
        ("3m", False, "table"),  # reading: a source in key order goes straight to the table
    ],
    ids=["sorting", "writing", "reading"],
)
def test_disk_full_in_each_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str, shuffle: bool, where: str
) -> None:
    """A full disk while spilling runs, or writing the table (after the sort, or while
    reading a source in key order): exit 1, one line naming the directory of the runs or
    the table, the old table intact, all space free again."""
    mount = tmp_path / "fs"
    mount.mkdir()
    for fs in _mounted(mount, size):
        db = fs / "map.lmdb"
        small = shuffled_source(tmp_path / "s", 10)
        assert build_with(monkeypatch, None, "-q", "-o", db, small)[0] == 0
        before, used = snapshot(fs), used_blocks(fs)
        src = shuffled_source(tmp_path / "big", 100_000, shuffle=shuffle)  # 3.5 MB of source
        status, err = build_with(monkeypatch, "2000000", "-o", db, src)
        assert status == 1
        expected = (
            f"{fs}: No space left on device (temporary sort runs)"
            if where == "runs"
            else f"{db}: No space left on device"
        )
        assert err.startswith(f"tcpmap-build: {expected}"), err
        assert err.count("\n") == 1
        assert snapshot(fs) == before
        assert used_blocks(fs) == used


# --- the progress line ------------------------------------------------------------------------


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, io.TextIOWrapper]]:
    """A pseudo-terminal (master fd, slave stream) for stderr, and progress shown at once.

    The test puts the stream in sys.stderr itself: pytest sets its own capture again
    between the fixtures and the test."""
    master, slave = pty.openpty()
    stream = io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), write_through=True)
    monkeypatch.setattr(progress, "AFTER", 0.0)
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    try:
        yield master, stream
    finally:
        stream.close()
        os.close(master)


def read_terminal(master: int) -> str:
    """Everything written to the terminal so far (the build has returned: it is all there)."""
    chunks = []
    while select.select([master], [], [], 0)[0]:
        chunks.append(os.read(master, 1 << 16))
    return b"".join(chunks).decode()


def test_progress_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: tuple[int, io.TextIOWrapper]
) -> None:
    """On a terminal: the phases with the records read, redrawn in place, erased before the
    summary line."""
    master, stream = terminal
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("TCPMAP_BUILD_RUN_BYTES", "1000000")
    src = shuffled_source(tmp_path / "map", 20_000)
    assert build.main([str(src)]) == 0
    shown = read_terminal(master)
    draws = [d for d in shown.split("\r") if d.startswith("tcpmap-build: ")]
    phases = [d.split(":")[1].strip() for d in draws if "records read" in d]
    assert {"reading", "sorting", "writing"} <= set(phases) and phases[-1] == "writing"
    assert any(d.startswith("tcpmap-build: writing: 20,000 records read") for d in draws)
    assert shown.endswith(
        f"\r\x1b[Ktcpmap-build: wrote 20000 records to {src}.lmdb (postmap syntax, folded)\r\n"
    )


def test_no_progress_with_quiet(tmp_path: Path, terminal: tuple[int, io.TextIOWrapper]) -> None:
    """-q: nothing at all, even on a terminal."""
    master, _ = terminal
    assert build.main(["-q", str(shuffled_source(tmp_path / "map", 20_000))]) == 0
    assert read_terminal(master) == ""


def test_no_progress_when_not_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """stderr not a terminal (a log, a pipe): only the summary line."""
    monkeypatch.setattr(progress, "AFTER", 0.0)
    src = shuffled_source(tmp_path / "map", 20_000)
    assert build.main([str(src)]) == 0
    assert capsys.readouterr().err == (
        f"tcpmap-build: wrote 20000 records to {src}.lmdb (postmap syntax, folded)\n"
    )


def test_progress_estimates_time_left() -> None:
    """Halfway through a phase that has run 4 s, about 4 s are left."""
    line = progress.Progress(io.StringIO(), enabled=True, source_bytes=1000)
    line.start("writing", 1_000_000)
    line.advance(500_000, records=1_000_000)
    began = line._phase_began
    assert line.line(began + 4) == "writing: 1,000,000 records read, 50%, ETA 4 s"
