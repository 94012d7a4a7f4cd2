"""tcpmap-build end to end: real source files in tmp_path, real LMDB files, main() in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest import raw_items
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpmap_lmdb import build
from tcpmap_lmdb.dbformat import META_KEY, BuildInfo, fold, stored_key, stored_value

# --- helpers -------------------------------------------------------------------


def source(tmp_path: Path, text: str | bytes, name: str = "map") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def run(*args: str | Path) -> int:
    return build.main([str(a) for a in args])


def records(db: Path) -> dict[bytes, bytes]:
    """The table as lookups see it: META_KEY left out, one trailing NUL stripped."""
    items = raw_items(db)
    items.pop(META_KEY)
    for key, value in items.items():
        assert key.endswith(b"\0") and value.endswith(b"\0")
    return {k[:-1]: v[:-1] for k, v in items.items()}


def build_info(db: Path) -> BuildInfo:
    return BuildInfo.decode(raw_items(db)[META_KEY])


def snapshot(directory: Path) -> dict[str, bytes]:
    """Names and contents of the files in a directory (to prove nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def run_module(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """tcpmap-build in a child process: the only way to give it a real stdin or signal."""
    return subprocess.run(
        [sys.executable, "-m", "tcpmap_lmdb.build", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def previous(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, bytes]]]:
    """A directory holding a good source, its built table and a snapshot of both."""
    src = source(tmp_path, "old value\n")
    assert run("-q", src) == 0
    yield src, tmp_path / "map.lmdb", snapshot(tmp_path)


# --- output naming and format ---------------------------------------------------


def test_output_is_file_dot_lmdb(tmp_path: Path) -> None:
    """virtual is built into virtual.lmdb, as postmap names it."""
    assert run(source(tmp_path, "a b\n", "virtual")) == 0
    assert (tmp_path / "virtual.lmdb").is_file()


def test_output_keeps_the_source_suffix(tmp_path: Path) -> None:
    """aliases.txt is built into aliases.txt.lmdb."""
    assert run(source(tmp_path, "a: b\n", "aliases.txt")) == 0
    assert (tmp_path / "aliases.txt.lmdb").is_file()


def test_output_option_chooses_the_path(tmp_path: Path) -> None:
    """-o PATH writes exactly PATH."""
    out = tmp_path / "elsewhere.db"
    assert run("-o", out, source(tmp_path, "a b\n")) == 0
    assert records(out) == {b"a": b"b"}


def test_records_are_stored_with_trailing_nul(tmp_path: Path) -> None:
    """Keys and values carry one trailing NUL, as postmap writes them."""
    assert run(source(tmp_path, "foo Bar Baz\n")) == 0
    assert raw_items(tmp_path / "map.lmdb") == {
        META_KEY: raw_items(tmp_path / "map.lmdb")[META_KEY],
        b"foo\x00": b"Bar Baz\x00",
    }


def test_no_lock_file_is_left(tmp_path: Path) -> None:
    """The build creates only FILE.lmdb: no -lock file, no temporary file."""
    src = source(tmp_path, "a b\n")
    assert run(src) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map", "map.lmdb"]


def test_build_info_is_recorded(tmp_path: Path) -> None:
    """META_KEY holds how the table was built: syntax, folding, count, source, time."""
    src = source(tmp_path, "root: admin\npostmaster: root\n", "aliases")
    assert run(src) == 0
    info = build_info(tmp_path / "aliases.lmdb")
    assert (info.folded, info.syntax, info.records) == (True, "aliases", 2)
    assert info.source == str(src.resolve())
    assert datetime.fromisoformat(info.built_at).utcoffset() is not None


def test_success_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A successful build prints one summary line on stderr."""
    assert run(source(tmp_path, "a b\nc d\n")) == 0
    out = tmp_path / "map.lmdb"
    assert capsys.readouterr().err == (
        f"tcpmap-build: wrote 2 records to {out} (postmap syntax, folded)\n"
    )


def test_quiet_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-q suppresses the summary line."""
    assert run("-q", source(tmp_path, "a b\n")) == 0
    assert capsys.readouterr() == ("", "")


def test_empty_source_builds_an_empty_table(tmp_path: Path) -> None:
    """A source with only comments gives a table with no records."""
    assert run(source(tmp_path, "# nothing yet\n")) == 0
    assert records(tmp_path / "map.lmdb") == {}


def test_aliases_are_normalized(tmp_path: Path) -> None:
    """Aliases values are stored as postalias normalizes them."""
    text = 'Root: a, b,c ,\n  d@example.com\n"Quoted Name": v\n'
    assert run(source(tmp_path, text)) == 0
    assert records(tmp_path / "map.lmdb") == {
        b"root": b"a, b, c, d@example.com",
        b"quoted name": b"v",
    }


def test_format_option_overrides_detection(tmp_path: Path) -> None:
    """--format postmap stores "root:" as the key of an aliases-looking line."""
    assert run("--format", "postmap", source(tmp_path, "root: admin\n")) == 0
    assert records(tmp_path / "map.lmdb") == {b"root:": b"admin"}


# --- folding ------------------------------------------------------------------------


def test_keys_are_folded(tmp_path: Path) -> None:
    """Postfix's map.in test: "ABC DEF" is found as abc."""
    assert run(source(tmp_path, "ABC\tDEF\n")) == 0
    assert records(tmp_path / "map.lmdb") == {b"abc": b"DEF"}


def test_utf8_keys_are_case_folded(tmp_path: Path) -> None:
    """ÄBC is stored as the bytes c3 a4 62 63 00."""
    assert run(source(tmp_path, "ÄBC x\n")) == 0
    assert b"\xc3\xa4bc\x00" in raw_items(tmp_path / "map.lmdb")


def test_full_case_folding_collides_strasse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Straße and STRASSE fold to the same key strasse: a duplicate."""
    assert run(source(tmp_path, "Straße y\nSTRASSE z\n")) == 0
    assert records(tmp_path / "map.lmdb") == {b"strasse": b"y"}
    assert 'map:2: duplicate key "strasse" (first at line 1)' in capsys.readouterr().err


def test_no_fold_keeps_case(tmp_path: Path) -> None:
    """-f stores keys exactly as written."""
    assert run("-f", source(tmp_path, "Straße y\nSTRASSE z\nABC DEF\n")) == 0
    db = tmp_path / "map.lmdb"
    assert records(db) == {"Straße".encode(): b"y", b"STRASSE": b"z", b"ABC": b"DEF"}
    assert build_info(db).folded is False


def test_values_are_never_folded(tmp_path: Path) -> None:
    """Only keys are folded."""
    assert run(source(tmp_path, "Key MiXeD VaLuE\n")) == 0
    assert records(tmp_path / "map.lmdb") == {b"key": b"MiXeD VaLuE"}


# --- duplicates ----------------------------------------------------------------------

ABB = "a 1\nb 2\nb 3\n"  # Postfix's src/postmap/lmdb_abb


def test_duplicate_warns_and_keeps_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """By default a duplicate is reported with both lines and the first value wins."""
    src = source(tmp_path, ABB)
    assert run(src) == 0
    assert records(tmp_path / "map.lmdb") == {b"a": b"1", b"b": b"2"}
    warning = f'{src}:3: duplicate key "b" (first at line 2): keeping the first\n'
    assert capsys.readouterr().err.startswith(warning)


def test_replace_duplicates_last_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-r: the last value wins, silently."""
    assert run("-r", "-q", source(tmp_path, ABB)) == 0
    assert records(tmp_path / "map.lmdb") == {b"a": b"1", b"b": b"3"}
    assert capsys.readouterr().err == ""


def test_ignore_duplicates_first_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-w: the first value wins, silently."""
    assert run("-w", "-q", source(tmp_path, ABB)) == 0
    assert records(tmp_path / "map.lmdb") == {b"a": b"1", b"b": b"2"}
    assert capsys.readouterr().err == ""


def test_replace_and_ignore_exclude_each_other(tmp_path: Path) -> None:
    """-r and -w together are a usage error."""
    assert run("-r", "-w", source(tmp_path, ABB)) == 2


# --- rejections ------------------------------------------------------------------------


def test_key_at_the_limit_is_accepted(tmp_path: Path) -> None:
    """A 510-byte key is 511 bytes stored: exactly LMDB's limit."""
    assert run(source(tmp_path, "k" * 510 + " v\n")) == 0


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ok 1\n" + "k" * 511 + " v\n", "key too long: 511 bytes, the LMDB limit is 510"),
        ("ok 1\nk " + "%" * 1364 + "\n", "value too long: its tcp_table reply would exceed 4096"),
        ('ok 1\n"unbalanced\n', "unbalanced '\"'"),
        ("ok 1\nnovalue\n", "expected format: key whitespace value"),
        ("ok 1\nbad \xff\n", "non-UTF-8 input"),
        ("ok 1\nnul \x00\n", "NUL byte in input"),
        ("ok 1\n\ufeffjoined v\n", "a byte order mark (EF BB BF) starts the line"),
        ("root: x\nuser@example.com: y\n", "name must be local"),
        ("root: x\nnocolon\n", "need name:value pair"),
        ('root: x\n"": y\n', "empty key"),
    ],
)
def test_rejection_leaves_target_unchanged(
    previous: tuple[Path, Path, dict[str, bytes]],
    capsys: pytest.CaptureFixture[str],
    text: str,
    reason: str,
) -> None:
    """A bad line is reported as FILE:LINE: reason, exit 1, and nothing is written."""
    src, _, before = previous
    src.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    capsys.readouterr()
    assert run(src) == 1
    err = capsys.readouterr().err
    assert f"{src}:2: {reason}" in err
    assert err.endswith(f"tcpmap-build: {src}: 1 bad line; nothing written\n")
    assert snapshot(src.parent) == {**before, "map": src.read_bytes()}


def test_limits_apply_to_the_folded_key(tmp_path: Path) -> None:
    """İ is 2 bytes but folds to 3: 255 of them fit only when not folded."""
    src = source(tmp_path, "İ" * 255 + " v\n")
    assert run(src) == 1
    assert run("-f", src) == 0


def test_value_at_the_reply_limit_is_accepted(tmp_path: Path) -> None:
    """ "200 " + 4091 bytes + LF is exactly 4096 bytes: allowed."""
    assert run(source(tmp_path, "k " + "a" * 4091 + "\n")) == 0
    assert records(tmp_path / "map.lmdb") == {b"k": b"a" * 4091}


def test_empty_value_is_rejected() -> None:
    """An empty value is refused (sources never produce one, but the check is explicit)."""
    assert build.check_entry(b"key", b"") == "empty value"


def test_every_bad_line_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All bad lines are reported, not only the first."""
    assert run(source(tmp_path, "a\nb 1\nc\nd\n")) == 1
    err = capsys.readouterr().err
    assert [line.split(": ")[0] for line in err.splitlines()[:3]] == [
        f"{tmp_path}/map:1",
        f"{tmp_path}/map:3",
        f"{tmp_path}/map:4",
    ]
    assert "3 bad lines; nothing written" in err


def test_bad_lines_reported_are_capped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Past MAX_REPORTED_ERRORS bad lines, the rest are only counted."""
    assert run(source(tmp_path, "bad\n" * 150)) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == build.MAX_REPORTED_ERRORS + 1
    assert err[-1].endswith("150 bad lines (50 not shown); nothing written")


def test_warnings_do_not_fail_the_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A postmap key ending in ':' warns with its line and is still stored."""
    assert run("--format", "postmap", source(tmp_path, "a 1\nabc: val\n")) == 0
    warning = 'map:2: record is in "key: value" format; is this an alias file?'
    assert warning in capsys.readouterr().err
    assert records(tmp_path / "map.lmdb") == {b"a": b"1", b"abc:": b"val"}


# --- stdin, --check, I/O errors --------------------------------------------------------


def test_stdin_needs_output_option() -> None:
    """FILE - without -o is a usage error (exit 2)."""
    assert run("-") == 2


def test_stdin_with_output(tmp_path: Path) -> None:
    """FILE - reads the source from stdin and -o names the table."""
    out = tmp_path / "from-stdin.lmdb"
    result = run_module("-", "-o", str(out), stdin=b"Key Value\n")
    assert result.returncode == 0, result.stderr
    assert records(out) == {b"key": b"Value"}
    assert build_info(out).source == "stdin"


def test_stdin_errors_are_named_stdin(tmp_path: Path) -> None:
    """Problems in stdin are reported as stdin:LINE."""
    result = run_module("-", "-o", str(tmp_path / "x.lmdb"), stdin=b"a 1\nbad\n")
    assert result.returncode == 1
    assert "stdin:2: expected format: key whitespace value" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_check_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check validates the source, reports the count and creates no file."""
    src = source(tmp_path, "a 1\nb 2\n")
    assert run("--check", src) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]
    assert (
        capsys.readouterr().err == f"tcpmap-build: {src}: 2 records OK (postmap syntax, folded)\n"
    )


def test_check_fails_on_bad_lines(tmp_path: Path) -> None:
    """--check exits 1 when a line is bad."""
    assert run("--check", source(tmp_path, "bad\n")) == 1


def test_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unreadable source is one line naming it, exit 1."""
    missing = tmp_path / "nope"
    assert run(missing) == 1
    assert capsys.readouterr().err == f"tcpmap-build: {missing}: No such file or directory\n"


def test_missing_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output directory that does not exist is one line naming the output, exit 1."""
    out = tmp_path / "no" / "such.lmdb"
    assert run("-o", out, source(tmp_path, "a b\n")) == 1
    assert capsys.readouterr().err == f"tcpmap-build: {out}: No such file or directory\n"


def test_output_must_name_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-o . names no file: one line, exit 1."""
    assert run("-o", ".", source(tmp_path, "a b\n")) == 1
    assert capsys.readouterr().err == "tcpmap-build: .: not a file name\n"


def test_refuses_to_overwrite_the_source(tmp_path: Path) -> None:
    """-o naming the source itself is refused and the source kept."""
    src = source(tmp_path, "a b\n")
    assert run("-o", src, src) == 1
    assert src.read_bytes() == b"a b\n"


# --- file mode -----------------------------------------------------------------------------


def test_new_table_is_world_readable(tmp_path: Path) -> None:
    """A new table gets 0644 minus the umask, so an unprivileged server can read it."""
    old = os.umask(0o022)
    try:
        assert run(source(tmp_path, "a b\n")) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "map.lmdb").stat().st_mode & 0o777 == 0o644


def test_new_table_honours_umask(tmp_path: Path) -> None:
    """A restrictive umask is respected."""
    old = os.umask(0o077)
    try:
        assert run(source(tmp_path, "a b\n")) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "map.lmdb").stat().st_mode & 0o777 == 0o600


def test_rebuild_keeps_the_existing_mode(previous: tuple[Path, Path, dict[str, bytes]]) -> None:
    """Rebuilding keeps the mode an administrator gave the table."""
    src, db, _ = previous
    db.chmod(0o640)
    assert run(src) == 0
    assert db.stat().st_mode & 0o777 == 0o640


# --- atomicity ------------------------------------------------------------------------------


def test_rebuild_replaces_the_table(previous: tuple[Path, Path, dict[str, bytes]]) -> None:
    """A successful rebuild publishes a new file (new inode) with the new records."""
    src, db, _ = previous
    inode = db.stat().st_ino
    src.write_text("new value\n")
    assert run(src) == 0
    assert records(db) == {b"new": b"value"}
    assert db.stat().st_ino != inode


def test_failed_rename_leaves_no_temp_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the final rename fails (target is a directory) nothing changes and no temp remains."""
    target = tmp_path / "map.lmdb"
    target.mkdir()
    (target / "keep").write_text("precious")
    assert run(source(tmp_path, "a b\n")) == 1
    assert capsys.readouterr().err.startswith(f"tcpmap-build: {target}: Is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map", "map.lmdb"]
    assert (target / "keep").read_text() == "precious"


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, to make a build run out of disk space for real."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_leaves_previous_table(
    tmp_path: Path, tiny_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Running out of space while writing keeps the old table byte for byte, and no temp file."""
    db = tiny_fs / "map.lmdb"
    assert run("-q", "-o", db, source(tmp_path, "old value\n")) == 0
    before = snapshot(tiny_fs)
    big = "".join(f"key{i} {'v' * 200}\n" for i in range(2000))  # ~420 KB of records
    assert run("-o", db, source(tmp_path, big)) == 1
    assert f"tcpmap-build: {db}: " in capsys.readouterr().err
    assert snapshot(tiny_fs) == before
    assert records(db) == {b"old": b"value"}


def test_interrupt_while_writing_leaves_previous_table(
    previous: tuple[Path, Path, dict[str, bytes]],
) -> None:
    """SIGINT during the write stage keeps the old table and removes the temp file."""
    src, db, before = previous
    # Large enough that writing lasts a good part of a second (the fast builder
    # writes about 10 records per microsecond).
    src.write_text("".join(f"key{i:07d} value{i}\n" for i in range(3_000_000)))
    before["map"] = src.read_bytes()
    child = subprocess.Popen(
        [sys.executable, "-m", "tcpmap_lmdb.build", str(src)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The temp file exists only once parsing is over and writing has begun.
        while not any(p.name.endswith(".tmp") for p in src.parent.iterdir()):
            assert child.poll() is None, "the build ended before it started writing"
            time.sleep(0.001)  # poll gently: the child needs the CPU
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    if child.returncode == 0:
        pytest.fail("the build finished before SIGINT arrived; make the source larger")
    assert child.returncode == 130
    assert "tcpmap-build: interrupted" in err
    assert snapshot(src.parent) == before
    assert records(db) == {b"old": b"value"}


# --- an output that is a symbolic link ------------------------------------------------------


def published_through(link: Path, target: Path, text: str) -> None:
    """Build text into LINK; the link is kept and TARGET gets the table, as a new file."""
    before = os.readlink(link)
    old_inode = target.stat().st_ino if target.exists() else None
    assert run("-q", "-o", link, source(link.parent, text, "src")) == 0
    assert os.readlink(link) == before, "the link itself must stay as it was"
    assert target.is_file() and not target.is_symlink()
    assert records(target) == {b"new": b"value"}
    assert target.stat().st_ino != old_inode  # renamed into place, not written in place
    for directory in {link.parent, target.parent}:
        assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


def test_symlinked_output_relative(tmp_path: Path) -> None:
    """-o LINK, LINK -> virtual.lmdb (relative): the table behind the link is replaced."""
    target = tmp_path / "virtual.lmdb"
    assert run("-q", "-o", target, source(tmp_path, "old value\n")) == 0
    (tmp_path / "link.lmdb").symlink_to("virtual.lmdb")
    published_through(tmp_path / "link.lmdb", target, "new value\n")


def test_symlinked_output_absolute_on_another_filesystem(tmp_path: Path) -> None:
    """LINK -> /abs/path on another filesystem: the temporary file is made beside the
    target (a rename from the link's directory would fail with EXDEV), and its mode kept."""
    shm = Path("/dev/shm")  # noqa: S108 (only a private TemporaryDirectory is made in it)
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        why = "needs /dev/shm on a filesystem other than the test's tmp_path"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, and the test {why}")
        pytest.skip(why)
    with tempfile.TemporaryDirectory(dir=shm) as served:
        target = Path(served) / "virtual.lmdb"
        assert run("-q", "-o", target, source(tmp_path, "old value\n")) == 0
        target.chmod(0o640)
        (tmp_path / "link.lmdb").symlink_to(target)
        published_through(tmp_path / "link.lmdb", target, "new value\n")
        assert target.stat().st_mode & 0o777 == 0o640


def test_symlinked_output_chain(tmp_path: Path) -> None:
    """LINK -> sub/hop -> ../real/virtual.lmdb: every link is followed, each relative to its
    own directory, and the table at the end of the chain is replaced."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "virtual.lmdb"
    assert run("-q", "-o", target, source(tmp_path, "old value\n")) == 0
    (tmp_path / "sub" / "hop").symlink_to("../real/virtual.lmdb")
    (tmp_path / "link.lmdb").symlink_to("sub/hop")
    published_through(tmp_path / "link.lmdb", target, "new value\n")
    assert os.readlink(tmp_path / "sub" / "hop") == "../real/virtual.lmdb"


def test_symlinked_output_dangling(tmp_path: Path) -> None:
    """A dangling LINK: the table is created where it points, as postmap does; the link stays."""
    (tmp_path / "link.lmdb").symlink_to("virtual.lmdb")
    published_through(tmp_path / "link.lmdb", tmp_path / "virtual.lmdb", "new value\n")


def test_symlinked_output_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A link loop is one line naming the output, exit 1; nothing is written."""
    link = tmp_path / "link.lmdb"
    link.symlink_to("other.lmdb")
    (tmp_path / "other.lmdb").symlink_to("link.lmdb")
    src = source(tmp_path, "new value\n")
    before = snapshot(tmp_path)
    assert run("-o", link, src) == 1
    assert capsys.readouterr().err == f"tcpmap-build: {link}: Too many levels of symbolic links\n"
    assert snapshot(tmp_path) == before
    assert os.readlink(link) == "other.lmdb"


# --- the LMDB writer ------------------------------------------------------------------------


def test_map_grows_when_full(tmp_path: Path) -> None:
    """Starting from a map far too small, the writer doubles it until everything fits."""
    keys = [stored_key(b"key%05d" % i) for i in range(2000)]
    batches = [(keys[:700], [stored_value(b"v" * 300)] * 700), (keys[700:], [b"w\0"] * 1300)]
    info = BuildInfo(folded=True, syntax="postmap", records=2000, source="test", built_at="now")
    written = build.write_table(tmp_path / "t.lmdb", batches, lambda n: info, map_size=64 * 1024)
    assert written == 2000
    assert len(records(tmp_path / "t.lmdb")) == 2000
    assert build_info(tmp_path / "t.lmdb") == info


def test_largest_values_and_many_batches(tmp_path: Path) -> None:
    """Values at the reply limit (overflow pages) over several write transactions all arrive."""
    count = build.BATCH * 2 + 7
    text = "".join(f"k{i} {'x' * (4091 if i % 50 == 0 else 9)}\n" for i in range(count))
    assert run("-q", source(tmp_path, text)) == 0
    got = records(tmp_path / "map.lmdb")
    assert len(got) == count
    assert (got[b"k0"], got[b"k1"]) == (b"x" * 4091, b"x" * 9)


# --- property ---------------------------------------------------------------------------------

# Keys: no ASCII whitespace, quote or backslash (those change postmap's split),
# no control characters, not starting with '#'. Values: the same plus inner spaces.
_TEXT = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"), exclude_characters='"\\ ')
_KEYS = st.text(_TEXT, min_size=1, max_size=40).filter(lambda k: not k.startswith("#"))
_VALUES = st.lists(st.text(_TEXT, min_size=1, max_size=20), min_size=1, max_size=5).map(" ".join)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(_KEYS, _VALUES), max_size=30))
def test_table_is_the_folded_source(entries: list[tuple[str, str]]) -> None:
    """Reading back a built table gives exactly the source's folded dict, first value winning."""
    expected: dict[bytes, bytes] = {}
    for key, value in entries:
        expected.setdefault(fold(key.encode()), value.encode())
    with tempfile.TemporaryDirectory() as tmp:
        src = source(Path(tmp), "".join(f"{k}\t{v}\n" for k, v in entries))
        assert run("-q", "-w", "--format", "postmap", src) == 0
        assert records(Path(tmp) / "map.lmdb") == expected
