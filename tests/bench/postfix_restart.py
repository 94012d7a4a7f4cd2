"""What one server restart costs a real Postfix, with and without the file descriptor store.

Run as root: `.venv/bin/pytest -s tests/bench/postfix_restart.py`. A Postfix
instance (tests/postfix_mta.py) takes a burst of BURST messages over parallel
SMTP sessions, so that many of its cleanup processes hold a connection to the
map; the server is restarted the way `systemctl restart` does it (SIGTERM, then
a new process), with the connections handed over (store) or closed (no store,
as before issue 15); a second burst follows. It prints the number of connected
processes, Postfix's "unexpected EOF" warnings, deferrals, and the seconds the
second burst took to be delivered.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from activation import tcp_listener
from conftest import MakeTable
from postfix_mta import DOMAIN, Options, PostfixMTA
from test_handoff import TIMEOUT, FakeManager, start

BURST = 60


@pytest.mark.parametrize("store", [False, True], ids=["no-store", "store"])
def test_restart_cost(tmp_path: Path, make_table: MakeTable, store: bool) -> None:
    manager = FakeManager(tmp_path / "notify")
    db = make_table(tmp_path / "virtual.lmdb", {f"info@{DOMAIN}": "alice@localhost"})
    listener = tcp_listener("127.0.0.1")
    server = start(db, manager, listener)
    mta = PostfixMTA(Options(f"tcp:127.0.0.1:{listener.getsockname()[1]}"))

    def burst() -> list[str]:
        ids = [f"<{os.urandom(8).hex()}@tcpmap-test.invalid>" for _ in range(BURST)]
        threads = [threading.Thread(target=mta.send, args=([f"info@{DOMAIN}"], i)) for i in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return ids

    try:
        for message_id in burst():
            mta.wait_delivered("alice", message_id, timeout=120)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(TIMEOUT) == 0
        connected = len(manager.names())
        stored = manager.take_store() if store else []
        if not store:
            manager.close_store()  # a restart without the store: every connection closes
        server = start(db, manager, listener, stored)
        started = time.monotonic()
        for message_id in burst():
            mta.wait_delivered("alice", message_id, timeout=120)
        took = time.monotonic() - started
        log = mta.log()
        print(
            f"\n{'store' if store else 'no store'}: {connected} Postfix processes connected; "
            f"{len(re.findall('unexpected EOF', log))} 'unexpected EOF' warnings; "
            f"{log.count('status=deferred')} deferred; {BURST} messages after the restart "
            f"delivered in {took:.2f} s"
        )
    finally:
        mta.stop()
        server.stop()
        listener.close()
        manager.close()
