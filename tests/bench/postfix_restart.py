"""What one server restart costs a real Postfix, with and without the file descriptor store.

Run as root: `.venv/bin/pytest -s tests/bench/postfix_restart.py`. A Postfix
instance (tests/postfix_mta.py) takes a burst of BURST messages over parallel
SMTP sessions, so that many of its cleanup processes hold a connection to the
map; the server is restarted the way `systemctl restart` does it (SIGTERM, then
a new process), with the connections handed over (store) or closed (no store,
as before issue 15); a second burst follows. It prints the number of connected
processes, Postfix's "unexpected EOF" warnings, deferrals, and the seconds the
second burst took to be delivered.

test_restart_cost_smtpd holds SESSIONS SMTP sessions open on the instance's
`access` listener, whose smtpd runs check_recipient_access over tcp:, so that
SESSIONS smtpd processes each hold a connection to the map; after the restart
each session sends one more RCPT TO. It prints the connected processes, the
warnings, and the slowest and the median of those RCPT TO replies: the stall.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
from activation import Activated, tcp_listener
from conftest import MakeTable
from postfix_mta import DOMAIN, HOSTNAME, SENDER, Options, PostfixMTA
from test_handoff import TIMEOUT, FakeManager, start

BURST = 60
SESSIONS = 50


def restart(
    server: Activated, db: Path, manager: FakeManager, listener: socket.socket, store: bool
) -> tuple[Activated, int]:
    """What `systemctl restart` does: SIGTERM, then a new server with the connections the
    old one handed over (STORE), or with none (every connection closed, as before issue 15).
    The new server, and how many connections the old one handed over."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0
    connected = len(manager.names())
    stored = manager.take_store() if store else []
    if not store:
        manager.close_store()
    return start(db, manager, listener, stored), connected


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
        server, connected = restart(server, db, manager, listener, store)
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


@pytest.mark.parametrize("store", [False, True], ids=["no-store", "store"])
def test_restart_cost_smtpd(tmp_path: Path, make_table: MakeTable, store: bool) -> None:
    manager = FakeManager(tmp_path / "notify")
    recipient = f"rcpt@{DOMAIN}"
    db = make_table(tmp_path / "access.lmdb", {recipient: "OK"})
    listener = tcp_listener("127.0.0.1")
    server = start(db, manager, listener)
    address = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    mta = PostfixMTA(Options(address, access_map=address))
    sessions: list[smtplib.SMTP] = []

    def rcpt(smtp: smtplib.SMTP) -> float:
        """MAIL FROM, RCPT TO (one lookup in that session's smtpd), RSET: seconds for RCPT."""
        smtp.rset()
        smtp.mail(SENDER)
        started = time.monotonic()
        code, reply = smtp.rcpt(recipient)
        took = time.monotonic() - started
        assert code == 250, reply
        return took

    def in_parallel(work: list[smtplib.SMTP]) -> list[float]:
        times: list[float] = []
        threads = [threading.Thread(target=lambda s=s: times.append(rcpt(s))) for s in work]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(times) == len(work), "an RCPT TO went unanswered"
        return times

    try:
        for _ in range(SESSIONS):
            smtp = smtplib.SMTP("127.0.0.1", mta.access, local_hostname=HOSTNAME, timeout=120)
            smtp.ehlo()
            sessions.append(smtp)
        in_parallel(sessions)  # every smtpd now holds a connection to the map
        server, connected = restart(server, db, manager, listener, store)
        started = time.monotonic()
        times = in_parallel(sessions)
        took = time.monotonic() - started
        log = mta.log()
        print(
            f"\n{'store' if store else 'no store'}: {connected} smtpd processes connected; "
            f"{len(re.findall('unexpected EOF', log))} 'unexpected EOF' warnings; "
            f"RCPT TO after the restart: slowest {max(times):.3f} s, "
            f"median {statistics.median(times):.3f} s; all {SESSIONS} answered in {took:.2f} s"
        )
    finally:
        for smtp in sessions:
            smtp.close()
        mta.stop()
        server.stop()
        listener.close()
        manager.close()
