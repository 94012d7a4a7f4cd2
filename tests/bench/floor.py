"""The floor of the architecture: gevent, one greenlet per connection, and nothing else.

    .venv/bin/python tests/bench/floor.py empty PORT
    .venv/bin/python tests/bench/floor.py lmdb PORT TABLE

"empty" answers every read with `500 x` per line, without parsing or looking
anything up; "lmdb" answers one `get KEY` per read with a bare LMDB get (ASCII
lowercase, no %XX decoding, no checks). Each waits exactly as tcpmap-server's
_Wire does, so they measure what gevent and the LMDB lookup cost before any of
tcpmap-server's own work. Drive them with the bench's load generator, e.g.

    taskset -c 0 .venv/bin/python tests/bench/floor.py empty 7001 &
    taskset -c 1 .venv-bench/data/bin/loadgen run 127.0.0.1 7001 \\
        .venv-bench/data/1000000/requests 64 1 3

Not a server: no limits, no timeouts, no errors handled. Loopback only.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable

import gevent
import gevent.socket
import greenlet
import lmdb
from gevent.server import StreamServer

NOT_FOUND = b"500 not%20found\n"


def empty(data: bytes) -> bytes:
    return b"500 x\n" * data.count(b"\n")


def lmdb_answer(table: str) -> Callable[[bytes], bytes]:
    env = lmdb.open(table, subdir=False, readonly=True, lock=False)
    get = env.begin().get

    def answer(data: bytes) -> bytes:
        value = get(data[4:-1].lower() + b"\x00")
        return NOT_FOUND if value is None else b"200 " + value[:-1] + b"\n"

    return answer


def serve(port: int, answer: Callable[[bytes], bytes]) -> None:
    hub = gevent.get_hub()
    switch = greenlet.greenlet.switch

    def handle(sock: gevent.socket.socket, _address: object) -> None:
        raw = socket.socket(fileno=sock.detach())  # the bare socket, as in tcpmap-server
        raw.setblocking(False)
        read = hub.loop.io(raw.fileno(), 1)
        resume = gevent.getcurrent().switch
        try:
            while True:
                read.start(resume)
                try:
                    switch(hub)
                finally:
                    read.stop()
                data = raw.recv(65536)
                if not data:
                    return
                raw.send(answer(data))
        except OSError:
            return

    server = StreamServer(("127.0.0.1", port), handle)
    server.start()  # PORT 0: any; the bench reads the port from this line
    print(f"floor: listening on 127.0.0.1:{server.server_port}", file=sys.stderr, flush=True)
    server.serve_forever()


def main(argv: list[str]) -> None:
    mode, port = argv[0], int(argv[1])
    serve(port, empty if mode == "empty" else lmdb_answer(argv[2]))


if __name__ == "__main__":
    main(sys.argv[1:])
