"""Case folding of lookup keys against tables built by postmap under either smtputf8_enable.

Postfix folds the keys of an lmdb: table (DICT_FLAG_FOLD_FIX) when it stores them and
when it looks them up, but not always the same way: with smtputf8_enable = yes, the
dict_utf8 wrapper casefolds a key with ICU (Unicode full case folding, "Ü" -> "ü",
"ß" -> "ss"); with smtputf8_enable = no, dict_lmdb lowercases ASCII letters only and
keeps every other byte (src/util/dict_utf8.c, casefold.c, dict_lmdb.c, lowercase.c). A
table built one way is searched the same way by `postmap -q` with that setting. Each
test here builds a table with the real postmap under a setting and asks the same keys
of the table layer and of `postmap -q` with that setting: the answers must be equal.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from conftest import StartServer, make_table, raw_items
from hypothesis import given, settings
from hypothesis import strategies as st
from postfix_tools import postfix_config_dir, require_postfix, run_postfix

from tcpmap_lmdb import build, verify
from tcpmap_lmdb.dbformat import META_KEY, fold, fold_ascii, folded_ascii_only
from tcpmap_lmdb.table import Table

require_postfix()
pytestmark = pytest.mark.postfix

# Mixed-case non-ASCII keys, keys that fold to other lengths, and plain ASCII ones.
ABG = "\u0391\u0392\u0393"  # GREEK CAPITAL ALPHA, BETA, GAMMA
SOURCE = "".join(
    f"{line}\n"
    for line in (
        "Ünïcode@Example.COM u1",
        f"{ABG}@x g1",
        "Straße@x s1",
        "Alpha@Example.COM a1",
        "ǅemal@x d1",
        "kelvin@x k1",
    )
)
QUERIES = [
    "Ünïcode@Example.COM",
    "ünïcode@example.com",
    "ÜNÏCODE@EXAMPLE.COM",
    "Ünïcode@example.com",
    f"{ABG}@x",
    "αβγ@x",
    f"{ABG}@X",
    "Straße@x",
    "straße@x",
    "STRASSE@x",
    "strasse@x",
    "ALPHA@example.com",
    "alpha@example.com",
    "ǅemal@x",
    "ǆemal@x",
    "Ǆemal@x",
    "Kelvin@x",
    "\u212aelvin@x",  # KELVIN SIGN: folds to "k" under UTF-8 folding only
    "nothing@x",
]


def config_for(tmp_path: Path, smtputf8: str) -> Path:
    """A `postmap -c` directory whose main.cf sets smtputf8_enable = SMTPUTF8."""
    parent = tmp_path / f"smtputf8-{smtputf8}"
    parent.mkdir()
    config = postfix_config_dir(parent)
    main_cf = config / "main.cf"
    main_cf.write_text(f"compatibility_level = 3.6\nsmtputf8_enable = {smtputf8}\n")
    an_hour_ago = time.time() - 3600  # Postfix will not read a main.cf younger than 1 s
    os.utime(main_cf, (an_hour_ago, an_hour_ago))
    return config


def postmap_build(config: Path, directory: Path, source: str, *flags: str) -> Path:
    """directory/map.lmdb, built from SOURCE by `postmap -c CONFIG [FLAGS] lmdb:`."""
    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "map"
    text.write_text(source)
    done = run_postfix("postmap", config, *flags, f"lmdb:{text}")
    assert done.returncode == 0, done.stderr.decode()
    return directory / "map.lmdb"


def postmap_q(config: Path, table: Path, key: str) -> bytes | None:
    """What Postfix's own lmdb: client finds: `postmap -c CONFIG -q KEY lmdb:TABLE`."""
    done = run_postfix("postmap", config, "-q", key, f"lmdb:{table.with_suffix('')}")
    assert done.returncode in (0, 1), done.stderr.decode()
    return done.stdout.rstrip(b"\n") if done.returncode == 0 else None


def ours(table: Path, keys: list[str]) -> dict[str, bytes | None]:
    opened = Table.open(table)
    try:
        return {key: opened.get(key.encode()) for key in keys}
    finally:
        opened.close()


@pytest.mark.parametrize("smtputf8", ["yes", "no"])
def test_a_postmap_table_answers_as_postmap_q_with_its_setting(
    tmp_path: Path, smtputf8: str
) -> None:
    """A table built by postmap with smtputf8_enable = yes or no: every key, in every case,
    is found (or not) as `postmap -q` with the same setting finds it."""
    config = config_for(tmp_path, smtputf8)
    table = postmap_build(config, tmp_path / "t", SOURCE)
    theirs = {key: postmap_q(config, table, key) for key in QUERIES}
    assert theirs["Ünïcode@Example.COM"] == b"u1"  # the reproduction: both settings
    assert ours(table, QUERIES) == theirs


def test_a_postmap_smtputf8_no_table_updated_with_postmap_i(tmp_path: Path) -> None:
    """A table built with smtputf8_enable = no from ASCII keys, then given a non-ASCII key
    by `postmap -i` with that setting: the new key is found as postmap -q finds it."""
    config = config_for(tmp_path, "no")
    table = postmap_build(config, tmp_path / "t", "Alpha@Example.COM a1\n")
    done = run_postfix(
        "postmap", config, "-i", f"lmdb:{table.with_suffix('')}", stdin=b"\xc3\x9cml@X u2\n"
    )
    assert done.returncode == 0, done.stderr.decode()
    keys = ["Üml@X", "üml@x", "Üml@x", "ALPHA@example.com"]
    theirs = {key: postmap_q(config, table, key) for key in keys}
    assert theirs["Üml@x"] == b"u2"
    assert ours(table, keys) == theirs


def test_a_table_holding_both_forms_of_a_key_is_searched_ascii_only(tmp_path: Path) -> None:
    """With smtputf8_enable = no, "Ünïcode@x" and "ünïcode@x" are two keys: each is found
    by its own spelling only, never the other's value (no false match)."""
    config = config_for(tmp_path, "no")
    table = postmap_build(config, tmp_path / "t", "Ünïcode@x upper\nünïcode@x lower\n")
    keys = ["Ünïcode@x", "ünïcode@x", "ÜNÏCODE@X", "üNÏCODE@X"]
    theirs = {key: postmap_q(config, table, key) for key in keys}
    assert theirs["Ünïcode@x"] == b"upper" and theirs["ünïcode@x"] == b"lower"
    assert ours(table, keys) == theirs


@pytest.mark.parametrize("smtputf8", ["yes", "no"])
def test_the_check_tells_how_the_keys_were_folded(tmp_path: Path, smtputf8: str) -> None:
    """verify.check reports a key UTF-8 case folding would change (here "ünïcode"'s "Ü"
    kept by ASCII-only folding), or None when every key is as UTF-8 folding leaves it."""
    table = postmap_build(config_for(tmp_path, smtputf8), tmp_path / "t", SOURCE)
    data = table.read_bytes()
    checked = verify.check(table, data, len(data))
    assert checked.records == 6
    if smtputf8 == "yes":
        assert checked.unfolded is None
    else:
        assert checked.unfolded is not None
        assert checked.unfolded.rstrip(b"\0") in {
            "Ünïcode@example.com".encode(),
            f"{ABG}@x".encode(),
            "straße@x".encode(),
            "ǅemal@x".encode(),
        }


def test_tcpmap_build_stores_what_postmap_with_smtputf8_stores(tmp_path: Path) -> None:
    """tcpmap-build folds as postmap with smtputf8_enable = yes (the default since
    compatibility level 1): the same records, and its table answers every key as
    `postmap -q` with that setting answers from the postmap-built table."""
    config = config_for(tmp_path, "yes")
    theirs_table = postmap_build(config, tmp_path / "theirs", SOURCE)
    (tmp_path / "ours").mkdir()
    source = tmp_path / "ours" / "map"
    source.write_text(SOURCE)
    assert build.main(["-q", str(source)]) == 0
    ours_table = source.with_name("map.lmdb")
    built = raw_items(ours_table)
    del built[META_KEY]
    assert built == raw_items(theirs_table)
    theirs = {key: postmap_q(config, theirs_table, key) for key in QUERIES}
    assert ours(ours_table, QUERIES) == theirs
    assert {key: postmap_q(config, ours_table, key) for key in QUERIES} == theirs


def test_the_server_finds_a_key_of_a_smtputf8_no_table(tmp_path: Path, server: StartServer) -> None:
    """The reproduction, over tcp_table: a table built by postmap with smtputf8_enable = no
    answers "Ünïcode@Example.COM" (it answered 500); the open log line says how it folds."""
    table = postmap_build(config_for(tmp_path, "no"), tmp_path / "t", SOURCE)
    srv = server(table)
    with srv.connect() as conn:
        assert conn.ask("Ünïcode@Example.COM") == (200, b"u1")
        assert conn.ask(f"{ABG}@X") == (200, b"g1")
        assert conn.ask("αβγ@x")[0] == 500
        assert conn.ask("ALPHA@example.com") == (200, b"a1")
    srv.wait_for_log(rf"opened {table}: 6 records \(built by Postfix, folded ASCII only")


def test_our_build_record_says_utf8_folding(tmp_path: Path) -> None:
    """A table with our build record (folded) is searched with UTF-8 folding."""
    table = make_table(tmp_path / "t.lmdb", {"Ünïcode@Example.COM": "u1"})
    assert ours(table, ["ÜNÏCODE@example.com"]) == {"ÜNÏCODE@example.com": b"u1"}


# Letters whose folding differs between the two settings, and ASCII ones.
LETTERS = "aAzZ\u00dc\u00fc\u00df\u0391\u03b1\u01c5\u01c6\u212ak\u0130i@."


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.text(LETTERS, min_size=1, max_size=6), min_size=1, max_size=8),
    probes=st.lists(st.text(LETTERS, min_size=1, max_size=6), max_size=8),
    folding=st.sampled_from(["utf8", "ascii"]),
)
def test_lookups_fold_as_the_keys_were_folded(
    keys: list[str], probes: list[str], folding: str
) -> None:
    """A table whose keys were stored folded one way (as Postfix does under either
    setting, first key wins) answers KEY as a lookup of KEY folded that way, whenever
    its keys show how (always for UTF-8 folding); never a key stored under another."""
    fold_one = fold if folding == "utf8" else fold_ascii
    stored: dict[bytes, bytes] = {}
    for number, key in enumerate(keys):
        stored.setdefault(fold_one(key.encode()), f"v{number}".encode())
    shows = folding == "utf8" or any(folded_ascii_only(key) for key in stored)
    with tempfile.TemporaryDirectory() as directory:
        path = make_table(Path(directory) / "t.lmdb", stored, folded=False, info=False)
        table = Table.open(path)
        try:
            assert table.folding == ("utf8" if not shows else folding)
            for probe in [*keys, *probes, *(key.upper() for key in keys)]:
                raw = probe.encode()
                expected = stored.get(fold_one(raw)) if shows else stored.get(fold(raw))
                assert table.get(raw) == expected, (probe, stored)
        finally:
            table.close()


def test_fold_ascii_for_a_table_whose_keys_do_not_show_it(
    tmp_path: Path, server: StartServer
) -> None:
    """A table smtputf8_enable = no built from keys UTF-8 folding leaves alone ("ünïcode")
    cannot show how it was folded: by default it is searched as = yes searches it ("Ü"
    finds "ü"); with --fold-ascii, as `postmap -q` with = no searches it."""
    config = config_for(tmp_path, "no")
    table = postmap_build(config, tmp_path / "t", "ünïcode@x lower\nAlpha@x a\n")
    keys = ["ünïcode@x", "Ünïcode@x", "ÜNÏCODE@X", "ALPHA@x"]
    theirs = {key: postmap_q(config, table, key) for key in keys}
    assert theirs == {"ünïcode@x": b"lower", "Ünïcode@x": None, "ÜNÏCODE@X": None, "ALPHA@x": b"a"}
    assert ours(table, keys) == {**theirs, "Ünïcode@x": b"lower", "ÜNÏCODE@X": b"lower"}
    srv = server(table, "--fold-ascii")
    with srv.connect() as conn:
        assert {key: conn.ask(key) for key in keys} == {
            key: (200, value) if value else (500, b"not found") for key, value in theirs.items()
        }
    srv.wait_for_log(rf"opened {table}: 2 records \(built by Postfix, folded ASCII only\)")
