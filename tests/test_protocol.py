"""The tcp_table codec and responder, fed bytes directly (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpmap_lmdb import protocol
from tcpmap_lmdb.responder import Responder
from tcpmap_lmdb.sessions import Output, TcpTableSession
from tcpmap_lmdb.table import TableError

# Twisted's PostfixTCPMapQuoteTests.testData: (raw, quoted, *other accepted spellings).
TWISTED_QUOTE_VECTORS = [
    (b"foo", b"foo"),
    (b"foo bar", b"foo%20bar"),
    (b"foo\tbar", b"foo%09bar"),
    (b"foo\nbar", b"foo%0Abar", b"foo%0abar"),
    (b"foo\r\nbar", b"foo%0D%0Abar", b"foo%0D%0abar", b"foo%0d%0Abar", b"foo%0d%0abar"),
    (b"foo ", b"foo%20"),
    (b" foo", b"%20foo"),
]

TWISTED_DATA = {b"foo": b"ThisIs Foo", b"bar": b" bar really is found\r\n"}

# Twisted's ValidTests chat table, in order, with our replies. The codes are
# Twisted's; the texts are ours (always hex-quoted). One row differs on
# purpose: see test_request_keys_are_decoded_unlike_twisted.
TWISTED_CHAT = [
    (b"get", 400),
    (b"get foo bar", 500),
    (b"put", 400),
    (b"put foo", 400),
    (b"put foo bar baz", 500),
    (b"put foo bar", 500),
    (b"get foo", b"200 ThisIs%20Foo\n"),
    (b"get bar", b"200 %20bar%20really%20is%20found%0D%0A\n"),
    (b"get baz", b"500 not%20found\n"),
    (b"foo", 400),
]


def responder(data: dict[bytes, bytes]) -> Responder:
    return Responder(data.get)


def assert_valid_reply(line: bytes) -> None:
    """The reply grammar of postfix-maps.md 1.3, as Postfix's client checks it."""
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert len(line) <= protocol.MAX_REPLY
    assert b"\r" not in line
    code, text = protocol.parse_reply(line[:-1])
    assert line[3:4] == b" "
    assert code in (200, 400, 500)
    if code == 200:
        assert text


@pytest.mark.parametrize(("raw", "quoted"), [v[:2] for v in TWISTED_QUOTE_VECTORS])
def test_quote_matches_twisted_vectors(raw: bytes, quoted: bytes) -> None:
    """quote() gives Twisted's upper-case %XX spelling for its vectors."""
    assert protocol.quote(raw) == quoted


@pytest.mark.parametrize("vector", TWISTED_QUOTE_VECTORS)
def test_unquote_accepts_every_case_spelling(vector: tuple[bytes, ...]) -> None:
    """unquote() decodes upper, lower and mixed-case hex alike."""
    raw, *spellings = vector
    for spelling in spellings:
        assert protocol.unquote(spelling) == raw


def test_quote_follows_postfix_hex_quote_for_every_byte() -> None:
    """Exactly 0x21-0x24 and 0x26-0x7E pass literally; all else is %XX (hex_quote.c)."""
    for byte in range(1, 256):
        literal = 0x21 <= byte <= 0x7E and byte != 0x25
        expected = bytes([byte]) if literal else b"%%%02X" % byte
        assert protocol.quote(bytes([byte])) == expected


def test_quote_matches_postfix_on_the_wire() -> None:
    """The bytes postmap -q put on the wire for 'Foo Bar%é:@/x' (postfix-maps.md 1.2)."""
    assert protocol.request("Foo Bar%é:@/x".encode()) == b"get Foo%20Bar%25%C3%A9:@/x\n"


@pytest.mark.parametrize("bad", [b"%", b"%4", b"%zz", b"100% bad", b"a%g1", b"%%41"])
def test_unquote_rejects_malformed_escapes(bad: bytes) -> None:
    """'%' must be followed by two hex digits, as in Postfix's hex_unquote()."""
    with pytest.raises(protocol.ProtocolError):
        protocol.unquote(bad)


def test_unquote_copies_other_bytes_verbatim() -> None:
    """Spaces, tabs, CR and 8-bit bytes are copied as they are."""
    assert protocol.unquote(b"a b\t\r\xe9%41") == b"a b\t\r\xe9A"


@pytest.mark.parametrize(("line", "expected"), TWISTED_CHAT)
def test_twisted_chat_table(line: bytes, expected: bytes | int) -> None:
    """Twisted's ValidTests exchange gives the same reply codes here."""
    reply = responder(TWISTED_DATA).answer(line)
    assert_valid_reply(reply)
    if isinstance(expected, int):
        assert int(reply[:3]) == expected
    else:
        assert reply == expected


def test_request_keys_are_decoded_unlike_twisted() -> None:
    """get foo%20bar looks up 'foo bar' (Twisted would look up 'foo%20bar')."""
    reply = responder({b"foo bar": b"found"}).answer(b"get foo%20bar")
    assert reply == b"200 found\n"


def test_not_found_is_500() -> None:
    """A missing key is 500, and the text is quoted."""
    assert responder({}).answer(b"get nothing") == protocol.NOT_FOUND


def test_put_is_refused_as_read_only() -> None:
    """put with a key and a value is answered 500 (the table is read-only)."""
    assert responder({}).answer(b"put k v") == protocol.READ_ONLY


@pytest.mark.parametrize("line", [b"get", b"GET foo", b"", b"lookup foo", b"get %2"])
def test_bad_requests_are_400(line: bytes) -> None:
    """Unknown commands, a missing key and a malformed escape answer 400."""
    reply = responder({b"foo": b"x"}).answer(line)
    assert reply.startswith(b"400 ")
    assert_valid_reply(reply)


def test_an_empty_key_is_not_found() -> None:
    """`get ` (postmap -q - sends it for a blank line) is a lookup, answered as lmdb:
    answers it: 500 (no table holds an empty key: test_table)."""
    assert responder({b"foo": b"x"}).answer(b"get ") == protocol.NOT_FOUND


def test_key_with_nul_is_400() -> None:
    """%00 cannot come from Postfix (keys are C strings): a bad request."""
    assert responder({}).answer(b"get a%00b").startswith(b"400 ")


def test_trailing_cr_is_ignored() -> None:
    """A telnet user's CRLF works; Postfix itself never sends CR."""
    assert responder({b"foo": b"x"}).answer(b"get foo\r") == b"200 x\n"


def test_table_error_is_400_with_its_reason() -> None:
    """Database trouble is temporary (400), never 'not found' (500)."""

    def broken(key: bytes) -> bytes | None:
        raise TableError("/var/lib/tcpmap/virtual.lmdb is missing")

    reply = Responder(broken).answer(b"get foo")
    assert reply == b"400 /var/lib/tcpmap/virtual.lmdb%20is%20missing\n"


def test_internal_fault_is_400() -> None:
    """Any unexpected exception defers the mail instead of bouncing it."""

    def buggy(key: bytes) -> bytes | None:
        raise RuntimeError("boom")

    reply = Responder(buggy).answer(b"get foo")
    assert reply.startswith(b"400 ")


def test_largest_value_that_fits_is_200() -> None:
    """'200 ' + 4091 bytes + LF is exactly 4096: accepted by Postfix, so sent."""
    value = b"a" * 4091
    reply = responder({b"k": value}).answer(b"get k")
    assert reply == b"200 " + value + b"\n"
    assert len(reply) == protocol.MAX_REPLY


def test_value_one_byte_too_long_is_400() -> None:
    """A reply that would exceed 4096 bytes is never sent; the lookup is deferred."""
    reply = responder({b"k": b"a" * 4092}).answer(b"get k")
    assert reply == protocol.VALUE_TOO_LONG


def test_value_that_grows_when_quoted_is_checked_after_quoting() -> None:
    """1364 spaces quote to a 4097-byte reply: too long, though the raw value is short."""
    assert responder({b"k": b" " * 1364}).answer(b"get k") == protocol.VALUE_TOO_LONG
    assert len(responder({b"k": b" " * 1363}).answer(b"get k")) == 4094


def test_empty_value_is_never_200() -> None:
    """found() refuses an empty value: Postfix daemons treat it as an error."""
    assert protocol.found(b"") is None


def test_long_error_text_is_cut_without_breaking_an_escape() -> None:
    """A 400 text is truncated to the reply limit and still hex-decodes."""
    for filler in range(3):
        reply = protocol.temporary("x" * filler + "%" * 3000)
        assert_valid_reply(reply)


@pytest.mark.parametrize(
    "line",
    [b"200", b"20 x", b"2000x", b"abc x", b"200x", b"500 100% bad"],
)
def test_parse_reply_rejects_what_postfix_calls_malformed(line: bytes) -> None:
    """No separator, non-digits or a bad escape: Postfix would disconnect."""
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_reply(line)


def test_parse_reply_keeps_extra_whitespace() -> None:
    """Only byte 3 is the separator: '200   lead' is '  lead' (postfix-maps.md 1.3)."""
    assert protocol.parse_reply(b"200   lead") == (200, b"  lead")
    assert protocol.parse_reply(b"200\tvalue") == (200, b"value")


# --- framing ----------------------------------------------------------------

STREAM = b"get foo\nget bar\nput a b\nget baz\n"


def frame(chunks: list[bytes]) -> list[protocol.Line]:
    buffer = protocol.LineBuffer()
    lines: list[protocol.Line] = []
    for chunk in chunks:
        lines.extend(buffer.feed(chunk))
    assert buffer.pending == 0
    return lines


def test_every_two_way_split_gives_the_same_requests() -> None:
    """Splitting the stream at any byte gives the same lines."""
    expected = STREAM.split(b"\n")[:-1]
    for cut in range(len(STREAM) + 1):
        assert frame([STREAM[:cut], STREAM[cut:]]) == expected


def test_byte_by_byte_gives_the_same_requests() -> None:
    """Feeding one byte at a time gives the same lines."""
    assert frame([bytes([b]) for b in STREAM]) == STREAM.split(b"\n")[:-1]


@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    data=st.data(),
)
def test_any_chunking_gives_the_same_requests(lines: list[bytes], data: st.DataObject) -> None:
    """Property: however the stream is cut, the framed lines are the same."""
    lines = [b"get " + line for line in lines]  # a stream must start as a request
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert frame(chunks) == lines


def test_partial_line_is_held_back() -> None:
    """Bytes without LF are not a request yet."""
    buffer = protocol.LineBuffer()
    assert buffer.feed(b"get fo") == []
    assert buffer.pending == 6
    assert buffer.feed(b"o\n") == [b"get foo"]


def test_longest_allowed_line_passes() -> None:
    """A line of MAX_REQUEST bytes including its LF is accepted."""
    line = b"get " + b"a" * (protocol.MAX_REQUEST - 5)
    assert protocol.LineBuffer().feed(line + b"\n") == [line]


def test_an_over_long_line_is_dropped_as_it_arrives_and_given_at_its_lf() -> None:
    """A line over MAX_REQUEST is not held: its bytes go as they come; its LF gives OverLong
    with its first bytes, and the lines after it frame as usual."""
    buffer = protocol.LineBuffer()
    assert buffer.feed(b"get " + b"a" * (protocol.MAX_REQUEST - 4)) == []
    assert buffer.pending == 0
    for _ in range(100):
        assert buffer.feed(b"a" * 10_000) == []
        assert buffer.pending == 0
    assert buffer.feed(b"\nget b\n") == [protocol.OverLong(b"get "), b"get b"]


def test_lines_around_an_over_long_one_come_out_in_order() -> None:
    """Complete requests before and after an over-long line, in one read."""
    data = b"get a\nget b\n" + b"x" * protocol.MAX_REQUEST + b"\nget c\n"
    assert protocol.LineBuffer().feed(data) == [
        b"get a",
        b"get b",
        protocol.OverLong(b"xxxx"),
        b"get c",
    ]


@pytest.mark.parametrize(
    ("head", "reply"),
    [
        (b"get ", protocol.NOT_FOUND),
        (b"put ", protocol.LINE_TOO_LONG),
        (b"xxxx", protocol.LINE_TOO_LONG),
    ],
)
def test_an_over_long_get_is_not_found_and_anything_else_is_400(head: bytes, reply: bytes) -> None:
    """No table holds a key that long (dbformat.MAX_LOOKUP_KEY): a get is 500, the rest 400."""
    assert protocol.over_long(protocol.OverLong(head)) == reply


@pytest.mark.parametrize(
    "first", [b"12:virtual k", b"1", b"\x16\x03\x01", b"GET / HTTP/1.1", b"\n"]
)
def test_a_stream_that_cannot_start_a_request_is_the_wrong_protocol(first: bytes) -> None:
    """The first bytes must begin "get" or "put": anything else, as soon as it is seen."""
    with pytest.raises(protocol.WrongProtocol):
        protocol.LineBuffer().feed(first)


def test_a_netstring_is_named_as_a_socketmap_client() -> None:
    with pytest.raises(protocol.WrongProtocol, match="looks like a socketmap client"):
        protocol.LineBuffer().feed(b"12:virtual k")


def test_the_first_bytes_are_judged_across_reads_and_only_once() -> None:
    """ "g", "e", "t x" make a request; later lines are only judged as requests."""
    buffer = protocol.LineBuffer()
    assert buffer.feed(b"g") == []
    assert buffer.feed(b"e") == []
    assert buffer.feed(b"t x\n12:y\n") == [b"get x", b"12:y"]


# --- properties ---------------------------------------------------------------


@given(st.binary())
def test_quote_round_trips(raw: bytes) -> None:
    """unquote(quote(x)) == x for any bytes."""
    assert protocol.unquote(protocol.quote(raw)) == raw


@given(st.binary())
def test_quoted_text_is_one_safe_token(raw: bytes) -> None:
    """Quoted text never holds whitespace, CR, LF, controls or 8-bit bytes."""
    quoted = protocol.quote(raw)
    assert all(0x21 <= b <= 0x7E for b in quoted)


@given(st.binary(min_size=1, max_size=1500))
def test_found_replies_parse_back(value: bytes) -> None:
    """A 200 reply, when it fits, parses back to the value (Postfix's view)."""
    reply = protocol.found(value)
    if reply is None:
        assert len(protocol.quote(value)) + 5 > protocol.MAX_REPLY
        return
    assert_valid_reply(reply)
    assert protocol.parse_reply(reply[:-1]) == (200, value)


@given(st.binary(min_size=1).filter(lambda k: b"\x00" not in k))
def test_request_round_trips_through_the_parser(key: bytes) -> None:
    """What Postfix sends for a key parses back to that key."""
    line = protocol.request(key)
    assert protocol.parse_request(line[:-1]) == protocol.Get(key)


@given(st.binary(max_size=200))
def test_any_line_gets_a_valid_reply(line: bytes) -> None:
    """Whatever arrives, the reply obeys the grammar and is never a bogus 200."""
    data = {b"foo": b"bar"}
    reply = responder(data).answer(line.replace(b"\n", b""))
    assert_valid_reply(reply)
    if reply.startswith(b"200"):
        assert protocol.parse_request(line.rstrip(b"\r")) == protocol.Get(b"foo")


@given(st.binary(max_size=40).map(lambda b: b"get " + b) | st.binary(max_size=40))
def test_plain_get_agrees_with_the_full_parser(line: bytes) -> None:
    """The hot path's key is the parser's key; lines it declines, the parser handles."""
    key = protocol.plain_get(line)
    if key is not None:
        assert protocol.parse_request(line) == protocol.Get(key)


@pytest.mark.parametrize(
    "line", [b"get a%20b", b"get a\r", b"get a\x00b", b"get ", b"get", b"put a b", b"GET a"]
)
def test_plain_get_declines_what_needs_the_parser(line: bytes) -> None:
    assert protocol.plain_get(line) is None


@given(st.binary(max_size=60))
def test_found_quotes_like_reply(value: bytes) -> None:
    line = protocol.found(value)
    expected = protocol.reply(200, value)
    assert line == (expected if value and len(expected) <= protocol.MAX_REPLY else None)


def _general_path(data: bytes, buffered: bytes) -> list[Output]:
    session = TcpTableSession(responder(TWISTED_DATA))
    if buffered:
        list(session.receive_framed(buffered))
    return list(session.receive_framed(data))


@given(
    st.binary(max_size=30) | st.sampled_from([b"get foo\n", b"get bar\n", b"get foo", b"\n"]),
    st.sampled_from([b"", b"get f", b"get foo\n"]),
)
def test_one_whole_line_is_answered_as_the_general_path_would(data: bytes, buffered: bytes) -> None:
    """The shortcut for one complete line gives exactly the framed path's outputs."""
    session = TcpTableSession(responder(TWISTED_DATA))
    if buffered:
        list(session.receive(buffered))
    assert list(session.receive(data)) == _general_path(data, buffered)


def test_whole_line_takes_only_one_complete_line_with_nothing_buffered() -> None:
    buffer = protocol.LineBuffer(limit=10)
    assert buffer.whole_line(b"get a\n") is None  # the first bytes are judged by feed()
    assert buffer.feed(b"get a\n") == [b"get a"]
    assert buffer.whole_line(b"get a\n") == b"get a"
    assert buffer.whole_line(b"get a\nget b\n") is None  # two lines
    assert buffer.whole_line(b"get a") is None  # no LF yet
    assert buffer.whole_line(b"") is None
    assert buffer.whole_line(b"get abcdef\n") is None  # over the limit: the framer says so
    buffer.feed(b"get")
    assert buffer.whole_line(b" a\n") is None  # the start of the line is buffered
