"""tcpmap_lmdb.table: Table.get conventions and LiveTable reopen/error behaviour, on real files."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import MakeTable, make_table
from hypothesis import given, settings
from hypothesis import strategies as st
from postfix_tools import run_postfix

from tcpmap_lmdb import dbformat, snapshot, verify
from tcpmap_lmdb.snapshot import Signature, Snapshot, SnapshotRetry
from tcpmap_lmdb.table import RETRY_FIRST, LiveTable, Table, TableError
from tcpmap_lmdb.watch import DirectoryWatch

SOURCE = 'Foo bar baz\nAlpha@Example.COM  x y\n"quoted key" q\nStraße s\n'


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "virtual.lmdb"


def get(path: Path, key: str | bytes, *, fold_keys: bool | None = None) -> bytes | None:
    """Open PATH, look KEY up, close."""
    table = Table.open(path, fold_keys=fold_keys)
    try:
        return table.get(key.encode() if isinstance(key, str) else key)
    finally:
        table.close()


def lookup_error(table: LiveTable, key: bytes = b"key") -> str:
    """The TableError message LiveTable.lookup raises."""
    with pytest.raises(TableError) as excinfo:
        table.lookup(key)
    return str(excinfo.value)


# --- our own files ------------------------------------------------------------


def test_get_finds_a_key_whatever_its_case(db: Path, make_table: MakeTable) -> None:
    """A folded table answers a lookup in any case."""
    make_table(db, {"Alice@Example.com": "alice@mail"})
    assert get(db, "ALICE@example.COM") == b"alice@mail"


def test_get_folds_non_ascii_keys_fully(db: Path, make_table: MakeTable) -> None:
    """Non-ASCII keys get full Unicode case folding, like Postfix's ICU folding (ß -> ss)."""
    make_table(db, {"Straße@Example.de": "street"})
    assert get(db, "STRASSE@example.de") == b"street"
    assert get(db, "straße@EXAMPLE.DE") == b"street"


def test_get_returns_none_for_a_missing_key(db: Path, make_table: MakeTable) -> None:
    """A key that is not in the table is None, not an error."""
    make_table(db, {"alice": "a"})
    assert get(db, "bob") is None


def test_get_stores_keys_with_one_trailing_nul(db: Path, make_table: MakeTable) -> None:
    """A key is found as stored with its NUL; the NUL is not part of the key."""
    make_table(db, {"alice": "a"})
    assert get(db, b"alice\x00") is None
    assert get(db, "alice") == b"a"


def test_unfolded_table_is_case_sensitive(db: Path, make_table: MakeTable) -> None:
    """A table whose build record says folded=False looks keys up exactly as sent."""
    make_table(db, {"Alice": "a"}, folded=False)
    table = Table.open(db)
    try:
        assert not table.folded
        assert table.get(b"Alice") == b"a"
        assert table.get(b"alice") is None
    finally:
        table.close()


def test_fold_keys_false_overrides_the_build_record(db: Path, make_table: MakeTable) -> None:
    """fold_keys=False looks up exactly as sent even in a folded table."""
    make_table(db, {"alice": "a"})
    assert get(db, "Alice", fold_keys=False) is None
    assert get(db, "alice", fold_keys=False) == b"a"


def test_fold_keys_true_overrides_the_build_record(db: Path, make_table: MakeTable) -> None:
    """fold_keys=True folds lookups even in a table built without folding."""
    make_table(db, {"alice": "a"}, folded=False)
    assert get(db, "ALICE", fold_keys=True) == b"a"


def test_file_without_build_record_folds_like_postmap(db: Path, make_table: MakeTable) -> None:
    """Without a build record the table is treated as Postfix's: folded, lookups locked."""
    make_table(db, {"alice": "a"}, info=False)
    table = Table.open(db)
    try:
        assert table.info is None
        assert table.folded
        assert table.get(b"ALICE") == b"a"
    finally:
        table.close()


def test_build_record_is_read(db: Path, make_table: MakeTable) -> None:
    """The build record gives the record count, and the record is not counted as data."""
    make_table(db, {"a": "1", "b": "2", "c": "3"})
    table = Table.open(db)
    try:
        assert table.info is not None
        assert table.info.records == 3
        assert table.records == 3
        assert "3 records" in table.describe()
    finally:
        table.close()


def test_unreadable_build_record_is_ignored(db: Path, make_table: MakeTable) -> None:
    """A META_KEY value that is not ours leaves a usable table with Postfix defaults."""
    make_table(db, {b"alice": b"a", dbformat.OLD_META_KEY[:-1]: b"not json"}, info=False)
    table = Table.open(db)
    try:
        assert table.info is None
        assert table.get(b"Alice") == b"a"
    finally:
        table.close()


def test_value_is_cut_at_the_first_nul(db: Path, make_table: MakeTable) -> None:
    """Like Postfix's vstring_strncpy, a value ends at its first NUL."""
    make_table(db, {b"key": b"ab\x00cd"})
    assert get(db, "key") == b"ab"


def test_value_with_spaces_and_8bit_bytes_comes_back_verbatim(
    db: Path, make_table: MakeTable
) -> None:
    """Values are returned byte for byte (quoting is the protocol's job, not the table's)."""
    value = "smtp:[relay.example]:587 %é\t\r\n".encode()
    make_table(db, {b"key": value})
    assert get(db, "key") == value


def test_empty_stored_value_is_a_table_error(db: Path, make_table: MakeTable) -> None:
    """An empty value cannot be served (Postfix rejects it): a TableError naming the file."""
    make_table(db, {"empty": ""})
    with pytest.raises(TableError, match=str(db)):
        get(db, "empty")


def test_value_of_only_a_nul_is_a_table_error(db: Path, make_table: MakeTable) -> None:
    """A value that is empty up to its first NUL is as unusable as an empty one."""
    make_table(db, {b"key": b"\x00rest"})
    with pytest.raises(TableError):
        get(db, "key")


def test_longest_storable_key_is_found(db: Path, make_table: MakeTable) -> None:
    """A 510-byte key (511 with its NUL, LMDB's MDB_MAXKEYSIZE) is found."""
    key = "k" * (dbformat.MAX_KEY_BYTES - 1)
    make_table(db, {key: "long"})
    assert get(db, key) == b"long"


@pytest.mark.parametrize("length", [511, 512, 1000, 5000])
def test_key_longer_than_lmdb_can_hold_is_not_found(
    db: Path, make_table: MakeTable, length: int
) -> None:
    """A key LMDB could never store is simply not found (no LMDB error)."""
    make_table(db, {"k": "v"})
    assert get(db, "k" * length) is None


@pytest.mark.parametrize("info", [True, False])
def test_over_long_key_is_not_found_with_or_without_build_record(
    db: Path, make_table: MakeTable, info: bool
) -> None:
    """Both lookup paths (one long transaction, locked per lookup) treat long keys alike."""
    make_table(db, {"k": "v"}, info=info)
    assert get(db, "k" * 511) is None
    assert get(db, "k" * 4000) is None


def test_empty_key_is_not_found(db: Path, make_table: MakeTable) -> None:
    """An empty key is never found."""
    make_table(db, {"k": "v"})
    assert get(db, "") is None


_keys = st.binary(min_size=1, max_size=200).filter(lambda b: b"\x00" not in b)
_values = st.binary(min_size=1, max_size=300).filter(lambda b: b"\x00" not in b)


@settings(max_examples=30, deadline=None)
@given(entries=st.dictionaries(_keys, _values, min_size=1, max_size=20), probe=_keys)
def test_any_table_round_trips(entries: dict[bytes, bytes], probe: bytes) -> None:
    """Every key of an unfolded table gives back its value; other keys give None."""
    with tempfile.TemporaryDirectory() as directory:
        path = make_table(Path(directory) / "t.lmdb", entries, folded=False)
        table = Table.open(path)
        try:
            for key, value in entries.items():
                assert table.get(key) == value
            assert table.get(probe) == entries.get(probe)
        finally:
            table.close()


# --- files made by Postfix's own tools ---------------------------------------------


def postmap_table(postfix_dir: Path, tmp_path: Path, *flags: str, source: str = SOURCE) -> Path:
    """Build tmp_path/map.lmdb from SOURCE with the real `postmap [FLAGS] lmdb:`."""
    text = tmp_path / "map"
    text.write_text(source)
    result = run_postfix("postmap", postfix_dir, *flags, f"lmdb:{text}")
    assert result.returncode == 0, result.stderr
    return tmp_path / "map.lmdb"


@pytest.mark.postfix
@pytest.mark.parametrize("flags", [(), ("-N",), ("-n",)], ids=["default", "-N", "-n"])
def test_postmap_built_file_is_read(
    postfix_dir: Path, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    """Files from postmap, with or without the trailing NUL (-N / -n), answer like Postfix."""
    path = postmap_table(postfix_dir, tmp_path, *flags)
    table = Table.open(path)
    try:
        assert table.info is None
        assert table.get(b"FOO") == b"bar baz"
        assert table.get(b"alpha@example.com") == b"x y"
        assert table.get(b"STRASSE") == b"s"
        assert table.get("Straße".encode()) == b"s"
        assert table.get(b'"quoted key"') == b"q"
        assert table.get(b"quoted key") is None
        assert table.get(b"missing") is None
    finally:
        table.close()


@pytest.mark.postfix
def test_postmap_f_file_needs_folding_off(postfix_dir: Path, tmp_path: Path) -> None:
    """`postmap -f` keeps the case of keys: found as written with fold_keys=False only."""
    path = postmap_table(postfix_dir, tmp_path, "-f")
    assert get(path, "Foo") is None  # default: folded, like a plain postmap file
    assert get(path, "Foo", fold_keys=False) == b"bar baz"
    assert get(path, "foo", fold_keys=False) is None


@pytest.mark.postfix
def test_postalias_built_file_is_read(postfix_dir: Path, tmp_path: Path) -> None:
    """A postalias file is served: folded keys, full values, its '@' marker record."""
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: root\nAlice: alice@example.com, bob\n")
    result = run_postfix("postalias", postfix_dir, f"lmdb:{aliases}")
    assert result.returncode == 0, result.stderr
    table = Table.open(tmp_path / "aliases.lmdb")
    try:
        assert table.get(b"Postmaster") == b"root"
        assert table.get(b"alice") == b"alice@example.com, bob"
        assert table.get(b"@") == b"@"
        assert table.get(b"bob") is None
        assert "built by Postfix" in table.describe()
    finally:
        table.close()


@pytest.mark.postfix
def test_live_table_sees_postmap_rewriting_in_place(postfix_dir: Path, tmp_path: Path) -> None:
    """postmap rewrites its file in place (same inode); the next lookup sees the new data."""
    path = postmap_table(postfix_dir, tmp_path, source="foo one\n")
    inode = path.stat().st_ino
    table = LiveTable(path)
    try:
        assert table.lookup(b"foo") == b"one"
        postmap_table(postfix_dir, tmp_path, source="foo two\nbar three\n")
        assert path.stat().st_ino == inode
        assert table.lookup(b"foo") == b"two"
        assert table.lookup(b"bar") == b"three"
    finally:
        table.close()


# --- LiveTable: the file at a path, as it changes ----------------------------------


def test_live_table_serves_the_file(db: Path, make_table: MakeTable) -> None:
    """A LiveTable looks keys up in the file at its path."""
    make_table(db, {"alice": "a"})
    table = LiveTable(db)
    try:
        assert table.lookup(b"Alice") == b"a"
        assert table.lookup(b"bob") is None
        assert table.error is None
    finally:
        table.close()


def test_replacement_by_rename_is_seen_on_the_next_lookup(db: Path, make_table: MakeTable) -> None:
    """A table published by rename answers the very next lookup: no signal, no delay."""
    make_table(db, {"alice": "old", "gone": "x"})
    table = LiveTable(db)
    try:
        assert table.lookup(b"alice") == b"old"
        make_table(db, {"alice": "new", "bob": "b"})
        assert table.lookup(b"alice") == b"new"
        assert table.lookup(b"bob") == b"b"
        assert table.lookup(b"gone") is None
    finally:
        table.close()


def test_many_replacements_are_each_seen(db: Path, make_table: MakeTable) -> None:
    """Every one of a quick series of publications is served right after it lands."""
    table = LiveTable(db)
    try:
        for generation in range(20):
            make_table(db, {"key": f"v{generation}"})
            assert table.lookup(b"key") == f"v{generation}".encode()
    finally:
        table.close()


@pytest.mark.parametrize("how", ["symlink flipped", "renamed in place"])
def test_a_replaced_directory_is_watched_again(tmp_path: Path, how: str) -> None:
    """After the table's directory is replaced (a symlink to a release directory
    flipped, or the directory renamed away and another renamed into its place), a
    publication in the new directory is served on the very next lookup, as before."""
    one, two, maps = tmp_path / "one", tmp_path / "two", tmp_path / "maps"
    one.mkdir()
    two.mkdir()
    if how == "symlink flipped":
        maps.symlink_to(one)
    else:
        one.rename(maps)
    make_table(maps / "t.lmdb", {"key": "one"})
    table = LiveTable(maps / "t.lmdb")
    try:
        assert table.lookup(b"key") == b"one"
        make_table(two / "t.lmdb", {"key": "two"})
        if how == "symlink flipped":
            (tmp_path / "maps.new").symlink_to(two)
            (tmp_path / "maps.new").rename(maps)  # atomic, as ln -sfn is not
        else:
            maps.rename(tmp_path / "maps.old")
            two.rename(maps)
        table.refresh()  # a flip is seen within a second, or at once by a refresh (SIGHUP)
        assert table.lookup(b"key") == b"two"
        make_table(maps / "t.lmdb", {"key": "three"})
        assert table.lookup(b"key") == b"three"
    finally:
        table.close()


def test_missing_at_start_is_a_table_error_then_recovers(db: Path, make_table: MakeTable) -> None:
    """No file yet: lookups raise TableError saying so; once a file appears it is served."""
    table = LiveTable(db)
    try:
        message = lookup_error(table)
        assert str(db) in message
        assert "missing" in message
        assert table.error == message
        make_table(db, {"key": "value"})
        assert table.lookup(b"key") == b"value"
        assert table.error is None
    finally:
        table.close()


def test_deleted_while_serving_is_a_table_error(db: Path, make_table: MakeTable) -> None:
    """A file deleted under a serving table makes lookups fail (400), not answer stale data."""
    make_table(db, {"key": "value"})
    table = LiveTable(db)
    try:
        assert table.lookup(b"key") == b"value"
        db.unlink()
        assert "missing" in lookup_error(table)
        assert table.table is None
        make_table(db, {"key": "again"})
        assert table.lookup(b"key") == b"again"
    finally:
        table.close()


def test_garbage_file_is_a_table_error_naming_the_path(db: Path) -> None:
    """A file that is not LMDB gives a TableError that names the file."""
    db.write_bytes(b"this is not an LMDB file\n" * 500)
    with pytest.raises(TableError, match=str(db)):
        Table.open(db)
    table = LiveTable(db)
    try:
        assert str(db) in lookup_error(table)
    finally:
        table.close()


def test_empty_file_is_a_table_error(db: Path) -> None:
    """A zero-byte file (a build that never wrote) is a TableError."""
    db.touch()
    with pytest.raises(TableError, match=str(db)):
        Table.open(db)


def test_replaced_by_garbage_then_good_file(db: Path, make_table: MakeTable) -> None:
    """A bad publication makes lookups fail; the next good one is served again."""
    make_table(db, {"key": "one"})
    table = LiveTable(db)
    try:
        assert table.lookup(b"key") == b"one"
        garbage = db.with_name("garbage")
        garbage.write_bytes(os.urandom(3 * 4096))
        garbage.replace(db)
        assert str(db) in lookup_error(table)
        make_table(db, {"key": "two"})
        assert table.lookup(b"key") == b"two"
    finally:
        table.close()


@pytest.fixture
def big_table(tmp_path: Path) -> Path:
    """A valid table of many pages."""
    entries = {f"user{i:05d}@example.com": f"mailbox {i} " * 8 for i in range(3000)}
    return make_table(tmp_path / "big.lmdb", entries)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.05, 0.5, 0.99])
def test_truncated_file_is_a_table_error(big_table: Path, tmp_path: Path, fraction: float) -> None:
    """A truncated copy of a valid table is refused at open (no SIGBUS on a later lookup)."""
    copy = tmp_path / "truncated.lmdb"
    shutil.copyfile(big_table, copy)
    size = copy.stat().st_size
    os.truncate(copy, int(size * fraction))
    with pytest.raises(TableError, match=str(copy)):
        Table.open(copy)


def test_truncated_by_one_byte_is_a_table_error(big_table: Path, tmp_path: Path) -> None:
    """Even one missing byte at the end is detected."""
    copy = tmp_path / "truncated.lmdb"
    shutil.copyfile(big_table, copy)
    os.truncate(copy, copy.stat().st_size - 1)
    with pytest.raises(TableError, match="truncated"):
        Table.open(copy)


def test_truncated_publication_is_a_table_error_for_a_live_table(
    big_table: Path, tmp_path: Path
) -> None:
    """A live table replaced by a truncated file fails lookups instead of crashing."""
    db = tmp_path / "live.lmdb"
    shutil.copyfile(big_table, db)
    table = LiveTable(db)
    try:
        assert table.lookup(b"user02999@example.com") == b"mailbox 2999 " * 8
        partial = tmp_path / "partial"
        shutil.copyfile(big_table, partial)
        os.truncate(partial, partial.stat().st_size // 2)
        partial.replace(db)
        assert "truncated" in lookup_error(table, b"user02999@example.com")
    finally:
        table.close()


def test_directory_at_the_path_is_a_table_error(db: Path) -> None:
    """A directory where the file should be is refused with a reason naming it."""
    db.mkdir()
    with pytest.raises(TableError, match="not a regular file"):
        Table.open(db)
    table = LiveTable(db)
    try:
        assert str(db) in lookup_error(table)
    finally:
        table.close()


def test_path_through_a_regular_file_is_a_table_error(tmp_path: Path) -> None:
    """A stat error other than ENOENT (here ENOTDIR) is reported with its reason."""
    parent = tmp_path / "file"
    parent.write_text("not a directory")
    table = LiveTable(parent / "virtual.lmdb")
    try:
        message = lookup_error(table)
        assert str(parent / "virtual.lmdb") in message
        assert "Not a directory" in message
    finally:
        table.close()


_PERMISSION_PROBE = """\
import sys
from pathlib import Path
from tcpmap_lmdb.table import LiveTable, TableError
table = LiveTable(Path(sys.argv[1]))
try:
    table.lookup(b"key")
except TableError as exc:
    print("TableError:", exc)
else:
    print("read the file")
"""


def test_unreadable_file_is_a_table_error(db: Path, make_table: MakeTable) -> None:
    """A file the server may not read gives a TableError saying permission is denied."""
    make_table(db, {"key": "value"})
    db.chmod(0)
    argv = [sys.executable, "-c", _PERMISSION_PROBE, str(db)]
    if os.geteuid() == 0:
        # chmod 000 does not stop root: run the probe as root without the
        # capabilities that bypass file permissions.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing to drop DAC caps")
        argv = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0 and "setpriv" in result.stderr:
        pytest.skip(f"cannot drop capabilities here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("TableError:"), result.stdout
    assert str(db) in result.stdout
    assert "Permission denied" in result.stdout


def test_forced_refresh_reopens_the_same_file(db: Path, make_table: MakeTable) -> None:
    """refresh(force=True) (what SIGHUP does) reopens an unchanged file and keeps serving."""
    make_table(db, {"key": "value"})
    table = LiveTable(db)
    try:
        assert table.lookup(b"key") == b"value"
        before = table.table
        table.refresh(force=True)
        assert table.table is not None
        assert table.table is not before
        assert table.lookup(b"key") == b"value"
    finally:
        table.close()


def test_error_state_clears_when_file_is_fixed_in_place(db: Path) -> None:
    """A garbage file overwritten in place with a good table is picked up (new signature)."""
    db.write_bytes(b"garbage")
    table = LiveTable(db)
    try:
        lookup_error(table)
        good = make_table(db.with_name("good.lmdb"), {"key": "value"})
        db.write_bytes(good.read_bytes())
        assert table.lookup(b"key") == b"value"
    finally:
        table.close()


# --- the directory watch, polled and loop-driven ------------------------------------------------


def test_polled_watch_sees_a_rename_once(tmp_path: Path) -> None:
    directory_watch = DirectoryWatch(tmp_path)
    try:
        assert not directory_watch.changed()
        (tmp_path / "new").write_bytes(b"x")
        os.replace(tmp_path / "new", tmp_path / "map.lmdb")
        assert directory_watch.changed()
        assert not directory_watch.changed()  # the events were consumed
    finally:
        directory_watch.close()


def test_driven_watch_reads_only_what_its_loop_drained(tmp_path: Path) -> None:
    """Driven, changed() makes no system call: it reports what drain() saw."""
    stopped = []
    directory_watch = DirectoryWatch(tmp_path)
    directory_watch.drive(stop=lambda: stopped.append(True))
    assert directory_watch.changed()  # whatever happened before the loop watched
    assert not directory_watch.changed()
    (tmp_path / "map.lmdb").write_bytes(b"x")
    assert not directory_watch.changed()  # the loop has not drained it yet
    directory_watch.drain()
    assert directory_watch.changed()
    assert not directory_watch.changed()
    directory_watch.close()
    assert stopped == [True]


# --- the check before a table is served (verify.py, snapshot.py) ---------------------------------


def _set_record_count(path: Path, entries: int) -> None:
    """Overwrite the main database's record count in both LMDB meta pages."""
    page_size = 4096
    offset = 16 + 24 + 48 + 32  # page header, meta fields, the free-list db, md_entries
    with path.open("r+b") as file:
        for page in (0, 1):
            file.seek(page * page_size + offset)
            file.write(entries.to_bytes(8, "little"))


@pytest.mark.parametrize("count", [0, 1, 2, 3, 101])
def test_check_passes_every_sound_table(tmp_path: Path, count: int) -> None:
    """The check in a child passes sound tables and counts their records."""
    db = make_table(tmp_path / "t.lmdb", {f"k{n:04d}": f"v{n}" for n in range(count)}, info=False)
    taken = snapshot.in_child()(db)
    os.close(taken.fd)
    assert taken.records == count


def _exited(pid: int) -> bool:
    """Whether child PID has exited (a zombie, not reaped yet): /proc/PID/stat's state."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_check_started_early_is_taken_once(tmp_path: Path) -> None:
    """A check begun before the server loads (server_cli: snapshot.start_check) is what the
    first take of its table gets: a copy of the file as it was then, whose signature tells
    a later refresh that the file moved on. The next take checks the file again."""
    db = make_table(tmp_path / "t.lmdb", {"k": "v1"}, info=False)
    started = {db: snapshot.start_check(db)}
    check = started[db]
    deadline = time.monotonic() + 10
    while not _exited(check.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    make_table(tmp_path / "new.lmdb", {"k": "v2", "k2": "v2"}, info=False).rename(db)
    take = snapshot.in_child(started=started)
    early = take(db)
    os.close(early.fd)
    assert early.records == 1 and early.signature.ino != os.stat(db).st_ino
    assert started == {}
    with pytest.raises(ChildProcessError):  # reaped
        os.waitpid(check.pid, os.WNOHANG)
    again = take(db)
    os.close(again.fd)
    assert again.records == 2 and again.signature == Signature.of(os.stat(db))


def test_a_publication_during_the_early_check_is_served_on_the_first_lookup(
    tmp_path: Path,
) -> None:
    """The early check (server_cli) copies the file before the server watches its
    directory: a table published meanwhile (tcpmap-build while the service starts) makes
    no inotify event the server sees. The first lookup after the open must still get
    it, as any lookup after a publication does, not the early copy for up to a second."""
    db = make_table(tmp_path / "t.lmdb", {"k": "v1"}, info=False)
    started = {db: snapshot.start_check(db)}
    deadline = time.monotonic() + 10
    while not _exited(started[db].pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    make_table(tmp_path / "new.lmdb", {"k": "v2"}, info=False).rename(db)
    table = LiveTable(db, take=snapshot.in_child(started=started))
    try:
        table.refresh()  # server.run: maps.open_all(), before READY
        assert started == {}
        assert table.lookup(b"k") == b"v2"
    finally:
        table.close()


def test_checks_left_over_are_cancelled(db: Path) -> None:
    """A check begun for a table that is not opened after all (server.run: the file went
    away meanwhile) is cancelled: its child killed and reaped, its memfd closed."""
    make_table(db, {"key": "value"}, info=False)
    started = {db: snapshot.start_check(db)}
    memfd = started[db].memfd
    snapshot.cancel_all(started)
    assert started == {}
    assert Path(f"/proc/self/task/{os.getpid()}/children").read_text().split() == []
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(memfd)


@pytest.mark.parametrize(
    ("head", "reason"),
    [(b"", "is not a readable LMDB file"), (b"# a source line\n" * 8, "it is a text file")],
)
def test_a_file_that_is_not_lmdb_is_refused_before_it_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head: bytes, reason: str
) -> None:
    """The copy is memory (a memfd): a big file that is no table (--db at a log, a sparse
    file of zeros) must be refused from its first bytes, not copied whole first (a 200 GB
    sparse file filled the host's memory). The real sendfile runs; the spy counts it."""
    path = tmp_path / "big.lmdb"
    with path.open("wb") as file:
        file.write(head)
        file.truncate(256 << 20)  # sparse: no disk, but 256 MB in a copy
    copied: list[int] = []
    real = os.sendfile

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        copied.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", sendfile)
    with pytest.raises(TableError, match=reason):
        snapshot.take(path)
    assert copied == []


def test_a_sparse_table_is_copied_sparse(tmp_path: Path) -> None:
    """LMDB with MDB_WRITEMAP (python-lmdb writemap=True) makes the file as long as its
    map: a 12 KB table in a 1 GB file, the rest a hole. The copy keeps the hole a hole
    (SEEK_DATA/SEEK_HOLE): it was 1 GB of memory for as long as the table was served."""
    import lmdb  # noqa: PLC0415

    path = tmp_path / "t.lmdb"
    env = lmdb.open(str(path), subdir=False, writemap=True, map_size=1 << 30, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"key\x00", b"value\x00")
    env.close()
    assert os.stat(path).st_size == 1 << 30
    taken = snapshot.take(path)
    held = os.fstat(taken.fd)
    table = Table.from_snapshot(path, taken)  # owns the memfd
    try:
        assert held.st_size == 1 << 30 and taken.records == 1
        assert held.st_blocks * 512 < 1 << 20
        assert table.get(b"key") == b"value"
    finally:
        table.close()


@pytest.mark.parametrize("claimed", [2, 99, 103, 1000])
def test_a_table_that_lies_about_its_record_count_is_served_with_the_real_count(
    tmp_path: Path, claimed: int
) -> None:
    """The record count in the meta pages is not trusted: the check counts the records."""
    db = make_table(tmp_path / "t.lmdb", {f"k{n:04d}": f"v{n}" for n in range(101)}, info=False)
    _set_record_count(db, claimed)
    table = Table.open(db)
    try:
        assert table.records == 101
        assert table.get(b"k0100") == b"v100"
    finally:
        table.close()


def test_a_failed_snapshot_is_retried_with_back_off_without_a_change(db: Path) -> None:
    """A snapshot that fails for a reason other than the file (here: descriptors ran out)
    is taken again after the back-off, though the file never changed; meanwhile lookups
    say why and that it is being retried."""
    make_table(db, {"key": "value"})
    failures = [SnapshotRetry(f"cannot check {db}: pipe: Too many open files")]

    def flaky(path: Path) -> Snapshot:
        if failures:
            raise failures.pop()
        return snapshot.take(path)

    table = LiveTable(db, take=flaky, watch_directory=False)
    try:
        message = lookup_error(table)
        assert "Too many open files" in message and "retrying" in message
        deadline = time.monotonic() + 10 * RETRY_FIRST
        while table.table is None:
            assert time.monotonic() < deadline, "not retried"
            with contextlib.suppress(TableError):
                table.lookup(b"key")
            time.sleep(RETRY_FIRST / 10)
        assert table.lookup(b"key") == b"value"
    finally:
        table.close()


def test_a_bad_file_is_not_retried_until_it_changes(db: Path) -> None:
    """A verdict on the file (here: not LMDB) is kept, without another snapshot, until the
    file at the path changes."""
    db.write_bytes(b"not an LMDB file" * 300)
    taken: list[Path] = []

    def counting(path: Path) -> Snapshot:
        taken.append(path)
        return snapshot.take(path)

    table = LiveTable(db, take=counting, watch_directory=False)
    try:
        for _ in range(5):
            assert "is not a readable LMDB file" in lookup_error(table)
        assert len(taken) == 1
        make_table(db, {"key": "value"})
        assert table.lookup(b"key") == b"value"
        assert len(taken) == 2
    finally:
        table.close()


_LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_check_past_its_time_limit_is_killed_and_retried(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot whose child runs longer than its limit (here its check hangs, as on a
    stalled disk; the limit is 0.5 s) fails as a retry, about when the limit passes, and
    its child is gone."""
    make_table(db, {"key": "value"}, info=False)
    monkeypatch.setattr(snapshot, "TIME_FLOOR", 0.5)

    def hanging_check(*args: object) -> int:
        time.sleep(30)  # in the forked child only
        return 0

    monkeypatch.setattr(verify, "check", hanging_check)
    started = time.monotonic()
    with pytest.raises(SnapshotRetry, match="took longer than"):
        snapshot.in_child()(db)
    assert time.monotonic() - started < 3
    assert Path(f"/proc/self/task/{os.getpid()}/children").read_text().split() == []


def test_a_check_never_waits_for_a_writers_lock(db: Path) -> None:
    """While a writer holds the exclusive lock, the server's check (in_child) and
    take(wait=False) give up at once with Locked naming the file; take() waits, as
    Postfix's readers do (tcpmap-query)."""
    make_table(db, {"key": "value"}, info=False)
    argv = [sys.executable, "-c", _LOCK_HOLDER, str(db), "10"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
            for attempt in (snapshot.in_child(), functools.partial(snapshot.take, wait=False)):
                started = time.monotonic()
                with pytest.raises(snapshot.Locked, match=f"{db} is locked by a writer"):
                    attempt(db)
                assert time.monotonic() - started < 1
            children = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
            assert children == [str(holder.pid)]
        finally:
            holder.kill()


def test_a_table_locked_at_first_open_fails_at_once_then_is_served(db: Path) -> None:
    """A table a writer holds locked when it is first opened: lookups fail at once (TEMP,
    saying why), never wait; once the writer lets go, it is served without a change to
    the file and without SIGHUP (the retry is due by itself)."""
    make_table(db, {"key": "value"}, info=False)
    argv = [sys.executable, "-c", _LOCK_HOLDER, str(db), "30"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as holder:
        table = LiveTable(db, take=snapshot.in_child())
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
            started = time.monotonic()
            assert lookup_error(table) == f"{db} is locked by a writer (retrying)"
            assert lookup_error(table) == f"{db} is locked by a writer (retrying)"
            assert time.monotonic() - started < 1
            holder.kill()
            holder.wait()
            deadline = time.monotonic() + 5
            while table.table is None and time.monotonic() < deadline:
                with contextlib.suppress(TableError):
                    table.lookup(b"key")
                time.sleep(0.01)
            assert table.lookup(b"key") == b"value"
        finally:
            holder.kill()
            table.close()
