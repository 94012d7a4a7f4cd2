"""The socketmap_table(5) codec, session and responder, fed bytes directly (no sockets).

Facts are from postfix-maps.md section 2: netstrings ``LEN:DATA,`` (leading
zeros allowed), requests ``name SP key`` with the key raw, replies ``OK value``,
``NOTFOUND ``, ``TEMP reason``, ``PERM reason``, payload at most 100000 bytes.
The responder runs against real LMDB tables written in tmp_path.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import MakeTable
from hypothesis import given
from hypothesis import strategies as st

from tcpmap_lmdb import socketmap
from tcpmap_lmdb.maps import Maps
from tcpmap_lmdb.responder import SocketmapResponder
from tcpmap_lmdb.sessions import OUTPUT_LIMIT, SocketmapSession
from tcpmap_lmdb.socketmap import (
    MAX_REPLY,
    MAX_REQUEST,
    NOT_FOUND,
    BadRequest,
    Lookup,
    NetstringBuffer,
    NetstringError,
    OverLong,
    Payload,
    WrongProtocol,
    netstring,
    parse_request,
)

STATUS_WORDS = {b"OK", b"NOTFOUND", b"TEMP", b"PERM"}


def frame_all(data: bytes) -> list[Payload]:
    """Every payload in DATA, fed at once to a fresh buffer."""
    return NetstringBuffer().feed(data)


def feed_chunks(chunks: list[bytes], buffer: NetstringBuffer | None = None) -> list[Payload]:
    """Every payload from feeding CHUNKS in order to one buffer."""
    buffer = buffer or NetstringBuffer()
    return [payload for chunk in chunks for payload in buffer.feed(chunk)]


def until_error(buffer: NetstringBuffer, data: bytes) -> tuple[list[Payload], NetstringError]:
    """The payloads DATA gives before its framing error, and the error."""
    seen: list[Payload] = []
    with pytest.raises(NetstringError) as caught:
        seen.extend(buffer.payloads(data))
    return seen, caught.value


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """DATA split at the given offsets (sorted, duplicates allowed: empty chunks)."""
    bounds = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def reply_payload(reply: bytes) -> bytes:
    """The payload of one reply netstring, checked the way Postfix's client reads it."""
    length, colon, rest = reply.partition(b":")
    assert colon and length.isdigit(), reply[:40]
    assert rest.endswith(b","), reply[-40:]
    payload = rest[:-1]
    assert len(payload) == int(length)
    assert len(payload) <= MAX_REPLY, f"reply payload of {len(payload)} bytes"
    assert payload.partition(b" ")[0] in STATUS_WORDS, payload[:40]
    return payload


# --- netstring framing --------------------------------------------------------


def test_netstring_frames_length_colon_data_comma() -> None:
    """netstring() writes what Postfix's netstring_put writes: "%ld:" DATA ","."""
    assert netstring(b"virtual alice") == b"13:virtual alice,"


def test_one_netstring_gives_its_payload() -> None:
    """A complete netstring gives its payload and leaves nothing buffered."""
    buffer = NetstringBuffer()
    assert buffer.feed(b"13:virtual alice,") == [b"virtual alice"]
    assert buffer.feed(b"5:a bcd,") == [b"a bcd"]


def test_empty_payload_is_a_netstring() -> None:
    """0:, is a valid, empty netstring (the request parser rejects it, not the framer)."""
    assert frame_all(b"0:,") == [b""]


def test_leading_zeros_in_the_length_are_accepted() -> None:
    """Postfix's reader takes 0014:... as 14 bytes ([EMP] in postfix-maps.md 2.1); so do we."""
    assert frame_all(b"0014:OK hello world,") == [b"OK hello world"]


def test_several_netstrings_in_one_feed_all_come_out_in_order() -> None:
    """Coalesced requests are all framed, in the order sent."""
    stream = b"".join(netstring(p) for p in [b"m a", b"", b"m b,c:d", b"m e"])
    assert frame_all(stream) == [b"m a", b"", b"m b,c:d", b"m e"]


def test_incomplete_netstring_waits_for_more() -> None:
    """Digits, colon, part of the payload, payload without comma: nothing yet, no error."""
    buffer = NetstringBuffer()
    for part in [b"1", b"3:", b"virt", b"ual alice"]:
        assert buffer.feed(part) == []
    assert buffer.feed(b",") == [b"virtual alice"]


@pytest.mark.parametrize(
    "bad",
    [b"x:abc,", b"-1:,", b"+1:a,", b" 1:a,", b"1 :a,", b"1\n:a,", b"0x1:a,", b"\xd9\xa1:a,"],
    ids=["letter", "minus", "plus", "space-before", "space-after", "lf", "hex", "arabic-one"],
)
def test_non_digit_in_the_length_is_an_error(bad: bytes) -> None:
    """Anything but ASCII digits before the colon is NETSTRING_ERR_FORMAT."""
    with pytest.raises(NetstringError):
        frame_all(bad)


def test_colon_without_digits_is_an_error() -> None:
    """':,' has no length: refused (Postfix's reader would take it as 0, but never sends it)."""
    with pytest.raises(NetstringError):
        frame_all(b":,")


def test_missing_colon_is_an_error_at_the_first_non_digit() -> None:
    """5abcde, lacks the colon: rejected as soon as 'a' arrives, without waiting for more."""
    buffer = NetstringBuffer()
    assert buffer.feed(b"5") == []
    with pytest.raises(NetstringError):
        buffer.feed(b"a")


def test_a_length_that_never_ends_is_rejected() -> None:
    """Digits without a colon are not buffered forever: a long run is an error."""
    with pytest.raises(NetstringError):
        frame_all(b"1" * 1000)


@pytest.mark.parametrize("bad", [b"3:abcd,", b"3:abc;", b"3:abc:", b"0:x", b"3:abc\n"])
def test_missing_comma_after_the_payload_is_an_error(bad: bytes) -> None:
    """The byte after LEN bytes of payload must be ',' ("input format error")."""
    with pytest.raises(NetstringError):
        frame_all(bad)


def test_missing_comma_is_detected_when_it_arrives_byte_by_byte() -> None:
    """Fed one byte at a time, the wrong terminator is still caught."""
    buffer = NetstringBuffer()
    for byte in b"3:abc":
        assert buffer.feed(bytes([byte])) == []
    with pytest.raises(NetstringError):
        buffer.feed(b"x")


def test_length_at_the_limit_is_accepted() -> None:
    """A payload of exactly MAX_REQUEST bytes is framed whole."""
    payload = b"m " + b"k" * (MAX_REQUEST - 2)
    assert frame_all(netstring(payload)) == [payload]


def test_a_longer_payload_is_given_as_its_head_when_its_comma_arrives() -> None:
    """MAX_REQUEST + 1 bytes: OverLong with the first MAX_REQUEST bytes, no error."""
    payload = b"m " + b"k" * (MAX_REQUEST - 1)
    assert frame_all(netstring(payload)) == [OverLong(payload[:MAX_REQUEST])]


def test_a_huge_length_is_no_error_and_its_payload_is_not_kept() -> None:
    """A well-formed netstring of 10 MB: its bytes go as they come, then OverLong; the
    stream goes on after it."""
    buffer = NetstringBuffer()
    assert buffer.feed(b"010000000:m ") == []
    for _ in range(99):
        assert buffer.feed(b"k" * 100_000) == []
    assert buffer.feed(b"k" * 99_998) == []
    assert buffer.feed(b"," + netstring(b"m a")) == [
        OverLong(b"m " + b"k" * (MAX_REQUEST - 2)),
        b"m a",
    ]


def test_custom_limit_is_enforced() -> None:
    """NetstringBuffer(limit=5) frames 5-byte payloads; a 6-byte one is OverLong."""
    assert NetstringBuffer(limit=5).feed(b"5:hello,") == [b"hello"]
    assert NetstringBuffer(limit=5).feed(b"6:hello!,") == [OverLong(b"hello")]


@pytest.mark.parametrize("first", [b"get alice\n", b"g", b"x", b":", b"\x16\x03"])
def test_a_stream_that_cannot_start_a_netstring_is_the_wrong_protocol(first: bytes) -> None:
    """The first byte must be a digit: anything else is WrongProtocol, at once."""
    with pytest.raises(WrongProtocol) as caught:
        NetstringBuffer().feed(first)
    assert caught.value.first == first[:4]


def test_a_tcp_table_client_is_named_as_the_likely_mistake() -> None:
    """'get ...' on a socketmap listener: the message says what it looks like."""
    with pytest.raises(WrongProtocol, match="looks like a tcp_table client"):
        NetstringBuffer().feed(b"get alice\n")


def test_payloads_before_a_bad_netstring_come_out_before_the_error() -> None:
    """The requests that arrived complete before the garbage are given first, in order."""
    seen, _ = until_error(NetstringBuffer(), b"3:m a,3:m b,x3:m c,")
    assert seen == [b"m a", b"m b"]


def test_payloads_given_by_earlier_feeds_are_not_repeated() -> None:
    """Only what this feed completed comes out of it: nothing is answered twice."""
    buffer = NetstringBuffer()
    assert buffer.feed(b"3:m a,3:m") == [b"m a"]
    seen, _ = until_error(buffer, b" b,!")
    assert seen == [b"m b"]


# --- every chunking ---------------------------------------------------------------

STREAM_PAYLOADS = [b"virtual alice@example.com", b"", b"m k,e:y", b"m 100%", b"x " + b"9" * 12]
STREAM = b"".join(netstring(p) for p in STREAM_PAYLOADS) + b"0003:m z,"
STREAM_EXPECTED = [*STREAM_PAYLOADS, b"m z"]


def test_every_two_way_split_of_a_stream_frames_the_same() -> None:
    """Cut anywhere (including before the first and after the last byte): same payloads."""
    for point in range(len(STREAM) + 1):
        assert feed_chunks(cut(STREAM, [point])) == STREAM_EXPECTED, point


def test_every_three_way_split_of_a_stream_frames_the_same() -> None:
    """Cut at any two places: same payloads."""
    for first, second in itertools.combinations_with_replacement(range(len(STREAM) + 1), 2):
        assert feed_chunks(cut(STREAM, [first, second])) == STREAM_EXPECTED, (first, second)


def test_byte_by_byte_stream_frames_the_same() -> None:
    """One byte per feed: each payload comes out exactly when its comma arrives."""
    buffer = NetstringBuffer()
    out: list[Payload] = []
    for offset in range(len(STREAM)):
        got = buffer.feed(STREAM[offset : offset + 1])
        if got:
            assert STREAM[offset : offset + 1] == b","
        out.extend(got)
    assert out == STREAM_EXPECTED


payloads_strategy = st.lists(st.binary(max_size=300), max_size=8)


@given(payloads=payloads_strategy, data=st.data())
def test_netstrings_round_trip_under_any_chunking(
    payloads: list[bytes], data: st.DataObject
) -> None:
    """netstring(x) for any payloads, cut anywhere, is framed back to exactly those payloads."""
    stream = b"".join(netstring(p) for p in payloads)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert feed_chunks(cut(stream, points)) == payloads


@given(payloads=payloads_strategy, garbage=st.binary(min_size=1, max_size=20), data=st.data())
def test_payloads_before_garbage_survive_any_chunking(
    payloads: list[bytes], garbage: bytes, data: st.DataObject
) -> None:
    """Returned payloads plus the error's .payloads are exactly the good prefix, however cut."""
    if garbage[:1].isdigit():
        garbage = b"!" + garbage  # a leading digit could start a valid netstring
    stream = b"".join(netstring(p) for p in payloads) + garbage
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    buffer = NetstringBuffer()
    seen: list[Payload] = []
    with pytest.raises(NetstringError):
        for chunk in cut(stream, points):
            seen.extend(buffer.payloads(chunk))
        seen.extend(buffer.payloads(b"!"))  # garbage that only began a length: its verdict
    assert seen == payloads


# --- requests -------------------------------------------------------------------------


def test_request_is_name_space_key() -> None:
    """The name is up to the first space; the key is the rest."""
    assert parse_request(b"virtual alice@example.com") == Lookup(b"virtual", b"alice@example.com")


@pytest.mark.parametrize(
    "key",
    [b"with space", b" leading", b"trailing ", b"100%", b"a%20b", b"%41", b"Mixed Case Key%"],
    ids=["space", "leading-space", "trailing-space", "percent", "pct20", "pct41", "postfix-emp"],
)
def test_key_is_raw_with_spaces_and_percent_kept(key: bytes) -> None:
    """No %XX decoding, no trimming, case kept: the key is the bytes Postfix sent."""
    assert parse_request(b"m " + key) == Lookup(b"m", key)


def test_utf8_key_is_kept_as_bytes() -> None:
    """A UTF-8 key arrives and stays as its bytes."""
    key = "Jürgen@Straße.de".encode()
    assert parse_request(b"virtual " + key).key == key


@pytest.mark.parametrize(
    "payload",
    [b"", b"virtual", b" alice", b" ", b"  "],
    ids=["empty", "no-space", "empty-name", "space-only", "two-spaces"],
)
def test_request_without_name_is_bad(payload: bytes) -> None:
    """Missing space or empty name: BadRequest."""
    with pytest.raises(BadRequest):
        parse_request(payload)


def test_request_builder_is_what_postfix_sends() -> None:
    """request() gives netstring("name key"), as dict_sockmap's "%s %s"."""
    assert socketmap.request(b"mymap", b"Mixed Case Key%") == b"21:mymap Mixed Case Key%,"


@given(
    name=st.binary(min_size=1, max_size=30).filter(lambda n: b" " not in n),
    key=st.binary(min_size=1, max_size=200),
)
def test_request_round_trips(name: bytes, key: bytes) -> None:
    """Framing request(name, key) and parsing it gives back name and key exactly."""
    (payload,) = frame_all(socketmap.request(name, key))
    assert isinstance(payload, bytes)
    assert parse_request(payload) == Lookup(name, key)


# --- replies ----------------------------------------------------------------------------


def test_ok_reply_carries_the_value_after_one_space() -> None:
    """OK SP value, framed; Postfix takes everything after the first space."""
    assert socketmap.ok(b"hello world") == b"14:OK hello world,"


def test_largest_value_that_fits_is_ok() -> None:
    """'OK ' + 99997 bytes is a 100000-byte payload: Postfix 3.7 accepts it, so it is sent."""
    reply = socketmap.ok(b"v" * (MAX_REPLY - 3))
    assert reply is not None
    assert len(reply_payload(reply)) == MAX_REPLY


def test_value_one_byte_too_long_is_not_ok() -> None:
    """A 100001-byte payload fails in Postfix ("input exceeds size limit"): never built."""
    assert socketmap.ok(b"v" * (MAX_REPLY - 2)) is None


def test_empty_value_is_never_ok() -> None:
    """'OK ' with nothing after is an error to Postfix's daemons: refused."""
    assert socketmap.ok(b"") is None


def test_value_too_long_reply_is_temp() -> None:
    """The reply for an unsendable value is TEMP (defer), not NOTFOUND."""
    assert reply_payload(socketmap.VALUE_TOO_LONG).startswith(b"TEMP ")


def test_not_found_reply() -> None:
    """NOTFOUND followed by a space: [EMP] not found, no error."""
    assert NOT_FOUND == b"9:NOTFOUND ,"


def test_temporary_reply_text() -> None:
    """TEMP SP reason, UTF-8."""
    assert socketmap.temporary("table müde") == netstring("TEMP table müde".encode())


def test_permanent_reply_text() -> None:
    """PERM SP reason."""
    assert socketmap.permanent("unknown map 'x'") == b"20:PERM unknown map 'x',"


@pytest.mark.parametrize("build", [socketmap.temporary, socketmap.permanent])
def test_long_error_text_is_cut_to_the_reply_limit(build: Callable[[str], bytes]) -> None:
    """A reason of any length gives a payload within 100000 bytes."""
    reply = build("r" * (2 * MAX_REPLY))
    assert len(reply_payload(reply)) == MAX_REPLY


def test_parse_reply_splits_at_the_first_space() -> None:
    """(status, rest) as dict_sockmap's split_at: the value may contain spaces."""
    assert socketmap.parse_reply(b"OK hello world") == (b"OK", b"hello world")
    assert socketmap.parse_reply(b"NOTFOUND") == (b"NOTFOUND", b"")


# --- the responder, over real tables --------------------------------------------------------

VIRTUAL = {
    "alice@example.com": "alice@mail.example.com",
    "with space": "space value",
    "100%": "percent",
    "a%20b": "literal percent-20",
    "jürgen@example.de": "Grüße aus Köln",
    "Straße": "street",
}


@pytest.fixture
def tables(tmp_path: Path, make_table: MakeTable) -> Path:
    """A maps directory with virtual (folded), exact (case-sensitive) and postfix (no record)."""
    directory = tmp_path / "maps"
    directory.mkdir()
    make_table(directory / "virtual.lmdb", VIRTUAL)
    make_table(directory / "exact.lmdb", {"Alice": "capital"}, folded=False)
    make_table(directory / "postfix.lmdb", {"bob": "no build record"}, info=False)
    return directory


@pytest.fixture
def maps(tables: Path) -> Iterator[Maps]:
    opened = Maps(directory=tables)
    yield opened
    opened.close()


def answer(maps: Maps, payload: bytes) -> bytes:
    """The reply payload for one request payload, checked as Postfix would read it."""
    return reply_payload(SocketmapResponder(maps).answer(payload))


def test_found_key_is_ok_with_its_value(maps: Maps) -> None:
    """A key in the named map: OK and the value."""
    assert answer(maps, b"virtual alice@example.com") == b"OK alice@mail.example.com"


def test_missing_key_is_notfound(maps: Maps) -> None:
    """A key not in the map: NOTFOUND."""
    assert answer(maps, b"virtual nobody@example.com") == b"NOTFOUND "


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"with space", b"space value"),
        (b"100%", b"percent"),
        (b"a%20b", b"literal percent-20"),
        ("JÜRGEN@Example.DE".encode(), "Grüße aus Köln".encode()),
        (b"STRASSE", b"street"),
        (b"ALICE@EXAMPLE.COM", b"alice@mail.example.com"),
    ],
    ids=["space", "percent", "no-pct-decoding", "utf-8-folded", "eszett-casefold", "ascii-folded"],
)
def test_keys_are_looked_up_raw_and_folded_as_built(maps: Maps, key: bytes, value: bytes) -> None:
    """Raw keys (spaces, %) are found; a folded table matches any case, Unicode included."""
    assert answer(maps, b"virtual " + key) == b"OK " + value


def test_pct20_is_not_decoded_to_a_space(maps: Maps) -> None:
    """'a%20b' is not 'a b': the socketmap key is never %XX-decoded."""
    assert answer(maps, b"virtual a b") == b"NOTFOUND "


def test_case_sensitive_table_matches_exact_case_only(maps: Maps) -> None:
    """A table built without folding finds 'Alice' but not 'alice'."""
    assert answer(maps, b"exact Alice") == b"OK capital"
    assert answer(maps, b"exact alice") == b"NOTFOUND "


def test_table_without_build_record_is_folded_like_postmap(maps: Maps) -> None:
    """A Postfix-made file (no record) folds keys, as postmap builds it."""
    assert answer(maps, b"postfix BOB") == b"OK no build record"


def test_each_request_selects_its_map(maps: Maps) -> None:
    """The same key in two maps gives each map's own answer."""
    assert answer(maps, b"exact Alice") == b"OK capital"
    assert answer(maps, b"virtual Alice") == b"NOTFOUND "


def test_key_with_nul_is_notfound(maps: Maps) -> None:
    """Postfix keys are C strings: a NUL cannot match, and is not an error."""
    assert answer(maps, b"virtual alice@example.com\x00x") == b"NOTFOUND "


def test_unknown_map_is_perm(maps: Maps) -> None:
    """A map name with no NAME.lmdb is a configuration error: PERM naming the map."""
    payload = answer(maps, b"nosuchmap alice@example.com")
    assert payload.startswith(b"PERM ")
    assert b"nosuchmap" in payload


def test_unknown_map_without_a_directory_is_perm(tmp_path: Path, make_table: MakeTable) -> None:
    """With only --db, any other name is PERM."""
    opened = Maps({"virtual": make_table(tmp_path / "virtual.lmdb", VIRTUAL)})
    try:
        assert answer(opened, b"virtual 100%") == b"OK percent"
        assert answer(opened, b"aliases root").startswith(b"PERM ")
    finally:
        opened.close()


@pytest.mark.parametrize("name", [b"../secret", b"..", b".hidden", b"sub/virtual", b"\xff"])
def test_names_that_are_not_file_names_are_perm(
    maps: Maps, tables: Path, make_table: MakeTable, name: bytes
) -> None:
    """A name with '/', a leading dot or bad UTF-8 never opens a file, even one that exists."""
    make_table(tables.parent / "secret.lmdb", {"k": "leaked"})
    make_table(tables / ".hidden.lmdb", {"k": "leaked"})
    (tables / "sub").mkdir()
    make_table(tables / "sub" / "virtual.lmdb", {"k": "leaked"})
    assert answer(maps, name + b" k").startswith(b"PERM ")


def test_missing_file_of_a_known_map_is_temp(tmp_path: Path) -> None:
    """The --db table's file is missing: database trouble, TEMP (defer), never PERM."""
    opened = Maps({"virtual": tmp_path / "virtual.lmdb"})
    try:
        payload = answer(opened, b"virtual alice@example.com")
        assert payload.startswith(b"TEMP ")
        assert b"missing" in payload
    finally:
        opened.close()


def test_map_whose_file_vanishes_after_use_is_temp(maps: Maps, tables: Path) -> None:
    """A directory map served once and then removed answers TEMP, not PERM or NOTFOUND."""
    assert answer(maps, b"virtual 100%") == b"OK percent"
    (tables / "virtual.lmdb").unlink()
    assert answer(maps, b"virtual 100%").startswith(b"TEMP ")


def test_corrupt_table_is_temp(tables: Path, maps: Maps) -> None:
    """A NAME.lmdb that is not LMDB: TEMP."""
    (tables / "broken.lmdb").write_bytes(b"not an lmdb file" * 512)
    assert answer(maps, b"broken k").startswith(b"TEMP ")


def test_map_published_later_is_found_without_reopening(
    maps: Maps, tables: Path, make_table: MakeTable
) -> None:
    """NAME.lmdb added to the directory after a PERM is served on the next request."""
    assert answer(maps, b"aliases root").startswith(b"PERM ")
    make_table(tables / "aliases.lmdb", {"root": "admin@example.com"})
    assert answer(maps, b"aliases root") == b"OK admin@example.com"


def test_republished_table_is_seen_on_the_next_request(
    maps: Maps, tables: Path, make_table: MakeTable
) -> None:
    """A table replaced by rename: the next request gets the new value."""
    assert answer(maps, b"exact Alice") == b"OK capital"
    make_table(tables / "exact.lmdb", {"Alice": "replaced"}, folded=False)
    assert answer(maps, b"exact Alice") == b"OK replaced"


def test_empty_stored_value_is_temp_never_ok(
    tables: Path, maps: Maps, make_table: MakeTable
) -> None:
    """A stored empty value cannot be sent as OK: TEMP."""
    make_table(tables / "empty.lmdb", {"k": ""})
    assert answer(maps, b"empty k").startswith(b"TEMP ")


def test_value_filling_the_reply_exactly_is_ok(
    tables: Path, maps: Maps, make_table: MakeTable
) -> None:
    """A 99997-byte value makes a 100000-byte payload: OK with the whole value."""
    value = b"v" * (MAX_REPLY - 3)
    make_table(tables / "big.lmdb", {b"k": value})
    assert answer(maps, b"big k") == b"OK " + value


def test_value_one_byte_over_is_temp_never_truncated(
    tables: Path, maps: Maps, make_table: MakeTable
) -> None:
    """A 99998-byte value does not fit: TEMP, not a cut-down OK."""
    make_table(tables / "big.lmdb", {b"k": b"v" * (MAX_REPLY - 2)})
    assert answer(maps, b"big k") == reply_payload(socketmap.VALUE_TOO_LONG)


@pytest.mark.parametrize("payload", [b"virtual", b" alice", b""])
def test_malformed_request_is_perm(maps: Maps, payload: bytes) -> None:
    """A well-framed request that is not 'name key' is PERM (a broken client)."""
    assert answer(maps, payload).startswith(b"PERM ")


def test_answer_all_keeps_request_order(maps: Maps) -> None:
    """Replies for coalesced requests come back in request order."""
    replies = SocketmapResponder(maps).answer_all(
        [b"virtual 100%", b"nope k", b"virtual nobody", b"exact Alice"]
    )
    assert replies == b"".join(
        [
            netstring(b"OK percent"),
            socketmap.permanent("unknown map 'nope'"),
            NOT_FOUND,
            netstring(b"OK capital"),
        ]
    )


# --- the session: framing and answering together ----------------------------------------------


def test_session_answers_a_request_split_byte_by_byte(maps: Maps) -> None:
    """Bytes trickled one at a time give one reply, when the comma arrives."""
    session = SocketmapSession(SocketmapResponder(maps))
    replies = b""
    for byte in socketmap.request(b"virtual", b"100%"):
        for reply, _, close in session.receive(bytes([byte])):
            assert close is None
            replies += reply
    assert replies == netstring(b"OK percent")


def test_session_answers_coalesced_requests_in_batches(maps: Maps) -> None:
    """Many requests in one read are all answered in order, in outputs of at most
    OUTPUT_LIMIT bytes."""
    reply = netstring(b"OK percent")
    count = 2 * OUTPUT_LIMIT // len(reply)
    outputs = list(
        SocketmapSession(SocketmapResponder(maps)).receive(
            socketmap.request(b"virtual", b"100%") * count
        )
    )
    assert len(outputs) >= 2
    assert all(len(replies) <= OUTPUT_LIMIT for replies, _, _ in outputs)
    assert sum(requests for _, requests, _ in outputs) == count
    assert b"".join(replies for replies, _, _ in outputs) == reply * count
    assert all(close is None for _, _, close in outputs)


def test_session_answers_what_came_before_a_framing_error_then_closes(maps: Maps) -> None:
    """Good requests before the garbage are answered; then the connection must close, silently."""
    session = SocketmapSession(SocketmapResponder(maps))
    outputs = list(session.receive(socketmap.request(b"virtual", b"100%") + b"bogus"))
    assert b"".join(replies for replies, _, _ in outputs) == netstring(b"OK percent")
    assert [close is None for _, _, close in outputs[:-1]] == [True] * (len(outputs) - 1)
    assert outputs[-1][2] is not None


def test_responder_reply_for_every_map_state_is_postfix_valid(
    maps: Maps, tables: Path, make_table: MakeTable
) -> None:
    """Every outcome (OK, NOTFOUND, TEMP, PERM) is a netstring Postfix can read."""
    make_table(tables / "big.lmdb", {b"k": b"v" * MAX_REPLY})
    os.symlink(tables / "missing-target.lmdb", tables / "dangling.lmdb")
    for payload in [b"virtual 100%", b"virtual x", b"big k", b"nope k", b"dangling k", b"x"]:
        reply = SocketmapResponder(maps).answer(payload)
        assert frame_all(reply) == [reply_payload(reply)]
