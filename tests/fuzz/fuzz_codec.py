"""Coverage-guided fuzzing of both codecs with atheris: `make fuzz` (bounded in time).

Each input is a byte stream cut into chunks, fed to a tcp_table and a socketmap
session over small real tables; every reply must obey its grammar, a malformed
request must never get a success reply, and nothing may raise.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from tcpmap_lmdb import protocol, socketmap
    from tcpmap_lmdb.build import main as build_main
    from tcpmap_lmdb.maps import Maps
    from tcpmap_lmdb.responder import Responder, SocketmapResponder
    from tcpmap_lmdb.sessions import SocketmapSession, TcpTableSession

WORK = Path(tempfile.mkdtemp(prefix="tcpmap-fuzz-"))
(WORK / "virtual").write_text("alice@example.com alice@example.net\nfoo bar baz\n")
assert build_main(["-q", str(WORK / "virtual")]) == 0
MAPS = Maps({"virtual": WORK / "virtual.lmdb"}, WORK)
TCP = Responder(MAPS.get("virtual").lookup)
SOCKETMAP = SocketmapResponder(MAPS)
GOOD_KEYS = {b"alice@example.com", b"foo"}


def check_tcp_reply(line: bytes) -> None:
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line
    assert len(line) <= protocol.MAX_REPLY and b"\r" not in line, line
    code, text = protocol.parse_reply(line[:-1])
    assert code in (200, 400, 500), line
    if code == 200:
        assert text, line


def fuzz_tcp(chunks: list[bytes]) -> None:
    session = TcpTableSession(TCP)
    stream = b"".join(chunks)
    complete = stream.split(b"\n")[:-1]
    replies = b""
    for chunk in chunks:
        outputs = list(session.receive(chunk))
        replies += b"".join(replies for replies, _, _ in outputs)
        if any(close for _, _, close in outputs):
            break
    lines = replies.split(b"\n")[:-1]
    for request, reply in zip(complete, lines, strict=False):
        check_tcp_reply(reply + b"\n")
        if reply.startswith(b"200"):
            # Only a well-formed get of a stored key may succeed.
            parsed = protocol.parse_request(request)
            assert isinstance(parsed, protocol.Get), request
            assert parsed.key.lower() in GOOD_KEYS, request


def fuzz_socketmap(chunks: list[bytes]) -> None:
    session = SocketmapSession(SOCKETMAP)
    out = socketmap.NetstringBuffer(limit=socketmap.MAX_REPLY + 10)
    for chunk in chunks:
        outputs = list(session.receive(chunk))
        for payload in out.feed(b"".join(replies for replies, _, _ in outputs)):
            assert isinstance(payload, bytes), payload  # no reply is over the limit
            status, _ = socketmap.parse_reply(payload)
            assert status in (b"OK", b"NOTFOUND", b"TEMP", b"PERM"), payload
            assert len(payload) <= socketmap.MAX_REPLY
        if any(close for _, _, close in outputs):
            break


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    chunks = []
    while fdp.remaining_bytes():
        chunks.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64)))
    fuzz_tcp(chunks)
    fuzz_socketmap(chunks)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
