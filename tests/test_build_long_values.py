"""--long-values: the count of values too long for tcp_table is right whatever the input order.

A source already in key order goes straight into the table (extsort's sink);
a shuffled one is sorted in runs and merged; one that is in order only at first
is given back by the sink and merged. The build record, --info and the build's
own summary must count the same values in every case.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tcpmap_lmdb import build, dump

SHORT = 30_000  # records with short values: several sort runs at the small budget below
LONG = {
    b"key000007": b"a" * 4092,  # one byte over a reply: "200 " + 4092 + LF = 4097
    b"key012345": b"%" * 1400,  # 1400 bytes, but 4200 quoted: too long
    b"key029999": b"b" * 50_000,
}
FITS = {b"key020000": b"a" * 4091}  # exactly a full reply: not counted


def lines() -> list[bytes]:
    records = {b"key%06d" % i: b"value%06d" % i for i in range(SHORT)}
    records |= LONG | FITS
    return [key + b" " + value + b"\n" for key, value in sorted(records.items())]


def _shuffled(ls: list[bytes]) -> list[bytes]:
    return random.Random(17).sample(ls, len(ls))  # noqa: S311 - test data


def _sorted_then_not(ls: list[bytes]) -> list[bytes]:
    """In key order for most of the file, then not: the sink gives its records back."""
    return ls[: len(ls) * 3 // 4] + ls[len(ls) * 3 // 4 :][::-1]


ORDERS: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "sorted": list,
    "shuffled": _shuffled,
    "sorted, then not": _sorted_then_not,
}


@pytest.mark.parametrize("run_bytes", [None, "200000"])
@pytest.mark.parametrize("order", ORDERS)
def test_long_values_counted_in_every_order(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    order: str,
    run_bytes: str | None,
) -> None:
    """The build record, --info and the warning count 3 in every order, one run or many."""
    if run_bytes is not None:
        monkeypatch.setenv("TCPMAP_BUILD_RUN_BYTES", run_bytes)  # many runs
    source = tmp_path / "lists"
    source.write_bytes(b"".join(ORDERS[order](lines())))
    assert build.main(["--long-values", str(source)]) == 0
    err = capsys.readouterr().err
    summary = dump.summary(Path(f"{source}.lmdb"))
    assert summary.records == SHORT  # LONG and FITS replace some of them
    assert summary.info is not None
    assert summary.info.long_values == len(LONG)
    assert "values too long for tcp_table: 3" in summary.lines()
    assert (
        "tcpmap-build: warning: 3 values too long for a tcp_table reply "
        "(tcp_table lookups of them are answered 400; socketmap serves them)\n"
    ) in err


def test_no_warning_when_every_value_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value that exactly fills a reply is not counted and not warned about."""
    source = tmp_path / "lists"
    source.write_bytes(b"k " + b"a" * 4091 + b"\n")
    assert build.main(["--long-values", str(source)]) == 0
    assert "warning:" not in capsys.readouterr().err
    info = dump.summary(Path(f"{source}.lmdb")).info
    assert info is not None and info.long_values == 0


def test_duplicates_count_only_the_value_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A long value that loses to a duplicate is not in the table, nor in the count."""
    source = tmp_path / "lists"
    source.write_bytes(b"k short\nk " + b"a" * 5000 + b"\nl " + b"a" * 5000 + b"\n")
    assert build.main(["-q", "--long-values", str(source)]) == 0
    info = dump.summary(Path(f"{source}.lmdb")).info
    assert info is not None and info.long_values == 1
    assert build.main(["-q", "-r", "--long-values", str(source)]) == 0
    info = dump.summary(Path(f"{source}.lmdb")).info
    assert info is not None and info.long_values == 2
    err = capsys.readouterr().err
    assert "warning: 1 value too long for a tcp_table reply" in err  # printed with -q too
    assert "warning: 2 values too long for a tcp_table reply" in err


def test_check_counts_them_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check warns with the same count, and writes nothing."""
    source = tmp_path / "lists"
    source.write_bytes(b"".join(lines()))
    assert build.main(["--check", "--long-values", str(source)]) == 0
    assert "warning: 3 values too long for a tcp_table reply" in capsys.readouterr().err
    assert not Path(f"{source}.lmdb").exists()
