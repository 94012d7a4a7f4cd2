"""Twisted's PostfixTCPMapServer on loopback, serving a postmap source file from a dict.

Run by the bench driver with the bench environment's Python (Twisted is not a
dependency of the project). This is the original Python implementation of
tcp_table, used exactly as its docs show: PostfixTCPMapDictServerFactory over a
dict of bytes keys. Twisted never %XX-decodes the request key, so the bench only
uses keys and values that need no quoting: then both servers see the same bytes.

    python twisted_server.py SOURCE PORT
"""

from __future__ import annotations

import resource
import sys

from twisted.internet import epollreactor  # type: ignore[import-not-found,unused-ignore]

epollreactor.install()

from twisted.internet import reactor  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
from twisted.protocols import postfix  # type: ignore[import-not-found,unused-ignore]  # noqa: E402

BACKLOG = 1024  # as tcpmap-server; Twisted's default of 50 drops SYNs in the memory run


def load(path: str) -> dict[bytes, bytes]:
    """KEY VALUE lines, split at the first whitespace, as postmap does."""
    data: dict[bytes, bytes] = {}
    with open(path, "rb") as source:
        for line in source:
            key, _, value = line.rstrip(b"\n").partition(b" ")
            data[key] = value
    return data


def main() -> None:
    source, port = sys.argv[1], int(sys.argv[2])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one fd per connection
    factory = postfix.PostfixTCPMapDictServerFactory(load(source))
    listener = reactor.listenTCP(port, factory, backlog=BACKLOG, interface="127.0.0.1")
    print(
        f"twisted: {len(factory)} keys; listening on 127.0.0.1:{listener.getHost().port}",
        file=sys.stderr,
        flush=True,
    )
    reactor.run()


if __name__ == "__main__":
    main()
