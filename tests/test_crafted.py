"""Crafted and damaged tables (tests/lmdb_craft.py): refused with a reason, never a crash.

Each crafted file patches a real table where a lookup follows a pointer: node offsets in
leaf and branch pages, key and value sizes, overflow page numbers and counts, page numbers
past the end, page flags and database flags LMDB would read differently, a cycle and an
exponentially shared graph of pages. verify.check must refuse each, fast; a server given
each (at start, or published while it serves) answers 400 naming the file and the reason,
keeps answering, and serves the next good file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import Conn, StartServer
from lmdb_craft import BIG_VALUE, CRAFTERS, base_table

from tcpmap_lmdb import verify
from tcpmap_lmdb.table import Table

VALUE_150 = b"value-150-" + b"v" * 30
PROBES = ("c", "a", "key000", "key150", "key299", "big", "missing")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return base_table(tmp_path_factory.mktemp("base") / "base.lmdb")


@pytest.fixture(params=["pure", "compiled"])
def records_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify's loop over leaf records has a form for each form of the module
    (verify._COMPILED): run both here. In the compiled module the constant is built in,
    and both run the compiled form."""
    monkeypatch.setattr(verify, "_COMPILED", request.param == "compiled")


def publish(db: Path, data: bytes) -> None:
    temp = db.with_name(f".{db.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, db)


@pytest.mark.usefixtures("records_form")
def test_base_table_passes_the_check(base: bytes, tmp_path: Path) -> None:
    """The table the crafters start from is sound: 301 records, every one found."""
    assert verify.check(Path("base"), base, len(base)) == verify.Checked(301)
    db = tmp_path / "base.lmdb"
    db.write_bytes(base)
    table = Table.open(db, fold_keys=False)
    try:
        assert table.records == 301
        assert table.get(b"key150") == VALUE_150
        assert table.get(b"big") == BIG_VALUE
    finally:
        table.close()


@pytest.mark.usefixtures("records_form")
@pytest.mark.parametrize("name", list(CRAFTERS))
def test_crafted_file_is_refused_by_the_check(base: bytes, name: str) -> None:
    """Every crafted file is refused, with a reason naming the file, within 1 s."""
    craft, reason = CRAFTERS[name]
    data = craft(base)
    started = time.monotonic()
    with pytest.raises(verify.Corrupt, match=reason) as refused:
        verify.check(Path("/crafted.lmdb"), data, len(data))
    assert time.monotonic() - started < 1.0
    assert "/crafted.lmdb is corrupt" in str(refused.value)


@pytest.mark.parametrize("name", ["halves-meet", "cycle", "shared-graph"])
def test_server_started_on_a_crafted_file_listens_and_answers_400(
    server: StartServer, tmp_path: Path, base: bytes, name: str
) -> None:
    """A server started on a crafted file (the issue's, a cycle, a shared graph) listens,
    answers 400 naming the file, then serves a good file published over it."""
    craft, reason = CRAFTERS[name]
    db = tmp_path / "virtual.lmdb"
    publish(db, craft(base))
    srv = server(db, "--no-fold")
    with srv.connect() as conn:
        for key in PROBES:
            code, text = conn.ask(key)
            assert code == 400, (key, text)
            assert str(db).encode() in text and reason.encode() in text, text
        publish(db, base)
        assert conn.ask("key150") == (200, VALUE_150)


def test_server_refuses_every_crafted_publication_and_survives(
    server: StartServer, tmp_path: Path, base: bytes
) -> None:
    """Each crafted file published over a served table: 400 with the reason for every probe,
    on a connection open throughout; the good file after each is served again."""
    db = tmp_path / "virtual.lmdb"
    publish(db, base)
    srv = server(db, "--no-fold")
    with srv.connect() as conn:
        for name, (craft, reason) in CRAFTERS.items():
            publish(db, craft(base))
            for key in PROBES:
                code, text = conn.ask(key)
                assert code == 400, (name, key, text)
                assert reason.encode() in text, (name, text)
            publish(db, base)
            assert conn.ask("key150") == (200, VALUE_150), name
        with Conn(srv.port) as fresh:
            assert fresh.ask("key299") == (200, b"value-299-" + b"v" * 30)
    assert srv.proc.poll() is None
