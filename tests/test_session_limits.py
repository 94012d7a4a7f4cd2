"""What one connection's session may hold, fed bytes directly (sans-io; issue 12).

Memory is measured with tracemalloc: what the session allocates and keeps, or
its peak while answering, against the bytes it was given.
"""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MakeTable

from tcpmap_lmdb import protocol, socketmap
from tcpmap_lmdb.maps import Maps
from tcpmap_lmdb.responder import Responder, SocketmapResponder
from tcpmap_lmdb.sessions import SocketmapSession, TcpTableSession

HUGE = b"h" * 99_000
OUTPUT_LIMIT = 128 * 1024  # README, Limits: replies held per connection


@pytest.fixture
def maps(tmp_path: Path, make_table: MakeTable) -> Iterator[Maps]:
    make_table(tmp_path / "virtual.lmdb", {b"huge": HUGE, b"alice": b"here"})
    opened = Maps(directory=tmp_path)
    yield opened
    opened.close()


def kept_per_byte(session: SocketmapSession | TcpTableSession, data: bytes) -> float:
    """Bytes the session keeps after DATA arrives one byte per read, per byte received.

    Each byte goes through a real socket pair, so each read is a fresh bytes
    object as the server's are (a one-byte slice would be CPython's cached one).
    """
    sender, receiver = socket.socketpair()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(len(data)):
            sender.send(data[i : i + 1])
            chunk = receiver.recv(65536)
            assert not any(replies for replies, _, _ in session.receive(chunk))
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        sender.close()
        receiver.close()
    return kept / len(data)


def test_a_netstring_trickled_a_byte_at_a_time_costs_under_two_bytes_per_byte(
    maps: Maps,
) -> None:
    """100,000 bytes of one request, one byte per read: at most 2 bytes kept per byte (was 56)."""
    session = SocketmapSession(SocketmapResponder(maps))
    data = b"100000:virtual " + b"k" * (100_000 - 15)
    assert kept_per_byte(session, data) <= 2.0


def test_a_line_trickled_a_byte_at_a_time_costs_under_two_bytes_per_byte() -> None:
    """A request line, one byte per read, up to the line limit: at most 2 bytes kept per byte."""
    session = TcpTableSession(Responder({b"alice": b"here"}.get))
    data = b"get " + b"k" * (protocol.MAX_REQUEST - 6)
    assert kept_per_byte(session, data) <= 2.0


def test_a_never_reading_client_gets_replies_in_bounded_batches(maps: Maps) -> None:
    """2,000 pipelined requests for a 99 KB value: every output is at most OUTPUT_LIMIT bytes,
    so the server holds no more than that while the client does not read (it was 6 MB)."""
    session = SocketmapSession(SocketmapResponder(maps))
    request = socketmap.request(b"virtual", b"huge")
    outputs = session.receive(request * 2000)
    answered = 0
    for replies, requests, close in outputs:
        assert close is None
        assert len(replies) <= OUTPUT_LIMIT
        answered += requests
    assert answered == 2000


def test_pipelined_tiny_requests_are_not_all_held_at_once(maps: Maps) -> None:
    """64 KiB of 7-byte requests (one read) peaks at a small multiple of the read, not 7x."""
    session = SocketmapSession(SocketmapResponder(maps))
    data = socketmap.request(b"virtual", b"x") * (65536 // 12)
    tracemalloc.start()
    try:
        outputs = iter(session.receive(data))
        first = next(outputs)
        peak = tracemalloc.get_traced_memory()[1]
        rest = list(outputs)
    finally:
        tracemalloc.stop()
    assert sum(n for _, n, _ in [first, *rest]) == 65536 // 12
    assert peak < 2 * len(data) + OUTPUT_LIMIT, f"peak {peak} for a {len(data)}-byte read"
