"""Quoted alias names: tcpmap-build stores the form the installed postalias stores.

Postfix 3.11 and earlier (Debian 12's 3.7, Debian 13's 3.10) store an aliases(5)
name in the internal, unquoted form: `"Foo Bar": x` is the key `foo bar`.
Postfix 3.12 (snapshot 20260312 on, HISTORY and postalias(1)) stores the
external, quoted form `"foo bar"`, and falls back to the internal form when
looking up. tcpmap-build asks `postconf -dh mail_version` (--alias-names auto).
These tests run against Postfix 3.7 on the host and 3.10 in the Debian 13 tree
(make test-trixie-stack).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import raw_items
from postfix_tools import postfix_config_dir, require_postfix, run_postfix

from tcpmap_lmdb import build, postfix
from tcpmap_lmdb.dbformat import META_KEY

QUOTED = b'"Quoted Name": v\n"q\\"k": w\n"a@b": x\nplain: y\n'
POSTALIAS_EXTRAS = {b"@\x00", b"YP_LAST_MODIFIED", b"YP_MASTER_NAME"}


@pytest.mark.parametrize(
    ("mail_version", "form"),
    [
        ("3.7.11", "internal"),  # Debian 12
        ("3.10.13", "internal"),  # Debian 13
        ("3.11.2", "internal"),
        ("3.12-20260305", "internal"),  # a 3.12 snapshot before the change
        ("3.12-20260312", "external"),  # the change (HISTORY)
        ("3.12.0", "external"),
        ("3.13-20270101", "external"),
        ("4.0.1", "external"),
    ],
)
def test_alias_name_form_by_mail_version(mail_version: str, form: str) -> None:
    assert postfix.alias_names_for(mail_version) == form


@pytest.mark.parametrize("mail_version", ["", "three", "3", "3.x.1", "3.12-2026"])
def test_a_bad_mail_version_is_an_error_naming_it(mail_version: str) -> None:
    with pytest.raises(ValueError, match="mail_version"):
        postfix.alias_names_for(mail_version)


def stored(tmp_path: Path, *options: str) -> dict[bytes, bytes]:
    src = tmp_path / "aliases"
    src.write_bytes(QUOTED)
    out = tmp_path / "ours.lmdb"
    assert build.main(["-q", "-o", str(out), *options, str(src)]) == 0
    records = raw_items(out)
    records.pop(META_KEY)
    return records


@pytest.mark.parametrize(
    ("form", "keys"),
    [
        ("internal", {b"quoted name\x00", b'q"k\x00', b"a@b\x00", b"plain\x00"}),
        ("external", {b'"quoted name"\x00', b'"q\\"k"\x00', b'"a@b"\x00', b"plain\x00"}),
    ],
)
def test_alias_names_option_stores_that_form(tmp_path: Path, form: str, keys: set[bytes]) -> None:
    """--alias-names internal|external: the keys; the values do not change."""
    records = stored(tmp_path, "--alias-names", form)
    assert set(records) == keys
    assert sorted(records.values()) == [b"v\x00", b"w\x00", b"x\x00", b"y\x00"]


def test_auto_stores_what_the_installed_postalias_stores(tmp_path: Path) -> None:
    """The default (auto) gives byte for byte the records of this host's postalias."""
    require_postfix()
    config = postfix_config_dir(tmp_path)
    theirs_src = tmp_path / "theirs"
    theirs_src.write_bytes(QUOTED)
    done = run_postfix("postalias", config, f"lmdb:{theirs_src}")
    assert done.returncode == 0, done.stderr.decode()
    theirs = raw_items(Path(f"{theirs_src}.lmdb"))
    for extra in POSTALIAS_EXTRAS:
        theirs.pop(extra, None)
    version = run_postfix("postconf", config, "-dh", "mail_version").stdout.decode().strip()
    form = postfix.alias_names_for(version)
    # What the installed postalias stores is the form its version says.
    assert (b'"quoted name"\x00' in theirs) == (form == "external"), (version, theirs)
    assert stored(tmp_path) == theirs
    print(f"Postfix {version}: postalias stores {form} names; so does tcpmap-build")
