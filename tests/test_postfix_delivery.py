"""Real mail through a real Postfix whose lookups our server answers (tests/postfix_mta.py).

postmap -q shows the protocol works; these show mail is delivered: smtplib
sends, Postfix's cleanup maps the recipient through tcp:, socketmap:inet: or
socketmap:unix: (chrooted), local(8) writes mailbox files, and the test reads
the Message-IDs back. Needs root and Postfix; skipped otherwise, except under
CI=true, where that is a failure. About a minute.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LoggedProcess, ServerProcess, start_server
from postfix_mta import DOMAIN, Options, PostfixMTA
from postfix_tools import require_postfix

require_postfix()
pytestmark = pytest.mark.postfix

if os.geteuid() != 0:
    WHY = "runs a Postfix MTA, which needs root: run as root (make test in CI does)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {WHY}", pytrace=False)
    pytest.skip(WHY, allow_module_level=True)

# The virtual alias table: one alias, a two-address alias, as an admin writes it.
VIRTUAL = f"info@{DOMAIN} alice@localhost\nteam@{DOMAIN} alice@localhost, bob@localhost\n"
UNIX_SOCKET = "private/tcpmap"  # in the queue directory, where a chrooted cleanup sees it


def build(source: Path, text: str, db: Path) -> None:
    """tcpmap-build -o DB SOURCE, as the admin runs it: in a child process."""
    source.write_text(text)
    subprocess.run(
        [sys.executable, "-m", "tcpmap_lmdb.build", "-q", "-o", str(db), str(source)],
        check=True,
        timeout=60,
    )


def new_id() -> str:
    return f"<{uuid.uuid4().hex}@tcpmap-test.invalid>"


class UnixServer(LoggedProcess):
    """tcpmap-server serving socketmap on a unix socket; up once it listens."""

    def __init__(self, db: Path, path: Path) -> None:
        proc = start_server(("--db", db, "--listen", f"socketmap:unix:{path}"))
        super().__init__(proc, proc.stdout)
        try:
            self.wait_for_log(f"listening on unix:{re.escape(str(path))}$")
        except BaseException:
            self.kill()
            raise


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """virtual.lmdb built from VIRTUAL (socketmap serves it as map "virtual")."""
    db = tmp_path / "virtual.lmdb"
    build(tmp_path / "virtual", VIRTUAL, db)
    return db


@pytest.fixture
def started() -> Iterator[list[PostfixMTA | LoggedProcess]]:
    """Things to stop at teardown, last started first; servers must exit cleanly."""
    things: list[PostfixMTA | LoggedProcess] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, PostfixMTA):
            thing.stop()
        elif thing.proc.poll() is None:
            thing.check_clean_exit()


def assert_no_bounce(mta: PostfixMTA) -> None:
    log = mta.log()
    assert "status=bounced" not in log, log
    assert "status=sent" in log, log


# --- aliases delivered through each kind of table ----------------------------------


@pytest.mark.parametrize("kind", ["tcp", "socketmap-inet", "socketmap-unix-chroot"])
def test_aliases_are_delivered(
    kind: str, table: Path, started: list[PostfixMTA | LoggedProcess]
) -> None:
    """An alias reaches its user, in any case; a two-address alias reaches both."""
    mta: PostfixMTA
    if kind == "socketmap-unix-chroot":
        # The socket lives in the queue directory: make the instance first.
        mta = PostfixMTA(Options(f"socketmap:unix:{UNIX_SOCKET}:virtual", chroot=True))
        started.append(mta)
        started.append(UnixServer(table, mta.queue / UNIX_SOCKET))
    else:
        listen = "127.0.0.1:0" if kind == "tcp" else "socketmap:127.0.0.1:0"
        server = ServerProcess(table, ("--listen", listen))
        started.append(server)
        maps = {"tcp": f"tcp:127.0.0.1:{server.port}"}
        maps["socketmap-inet"] = f"socketmap:inet:127.0.0.1:{server.port}:virtual"
        mta = PostfixMTA(Options(maps[kind]))
        started.append(mta)

    alias, mixed_case, team = new_id(), new_id(), new_id()
    mta.send([f"info@{DOMAIN}"], alias)
    mta.send([f"InFo@{DOMAIN.upper()}"], mixed_case)
    mta.send([f"team@{DOMAIN}"], team)
    for message_id in (alias, mixed_case, team):
        mta.wait_delivered("alice", message_id)
    mta.wait_delivered("bob", team)
    mta.wait_queue_empty()
    assert sorted(mta.message_ids("alice")) == sorted([alias, mixed_case, team])
    assert mta.message_ids("bob") == [team]
    assert_no_bounce(mta)


# --- check_recipient_access -----------------------------------------------------------


def test_access_reject_is_5xx_at_rcpt(
    tmp_path: Path, table: Path, started: list[PostfixMTA | LoggedProcess]
) -> None:
    """check_recipient_access tcp:...: REJECT refuses the recipient with 5xx at RCPT."""
    access = tmp_path / "access.lmdb"
    build(tmp_path / "access", f"blocked@{DOMAIN} REJECT\n", access)
    virtual = ServerProcess(table, ("--listen", "127.0.0.1:0"))
    started.append(virtual)
    access_server = ServerProcess(access, ("--listen", "127.0.0.1:0"))
    started.append(access_server)
    mta = PostfixMTA(
        Options(f"tcp:127.0.0.1:{virtual.port}", access_map=f"tcp:127.0.0.1:{access_server.port}")
    )
    started.append(mta)

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        mta.send([f"blocked@{DOMAIN}"], new_id(), port=mta.access)
    ((code, text),) = refused.value.recipients.values()
    assert 500 <= code < 600, (code, text)
    assert b"Access denied" in text
    # The same listener lets an unlisted recipient through, to delivery.
    allowed = new_id()
    mta.send([f"info@{DOMAIN}"], allowed, port=mta.access)
    mta.wait_delivered("alice", allowed)


# --- nothing is ever bounced ------------------------------------------------------------


def test_outages_defer_and_nothing_bounces(
    tmp_path: Path, table: Path, started: list[PostfixMTA | LoggedProcess]
) -> None:
    """Server stopped, table missing, table deleted while serving: deferred, then delivered."""
    server = ServerProcess(table, ("--listen", "127.0.0.1:0"))
    mta = PostfixMTA(Options(f"tcp:127.0.0.1:{server.port}"))
    started.append(mta)
    port = server.port
    source = tmp_path / "virtual"

    # 1. The server is stopped: every lookup fails (Postfix retries ~10 s), mail waits.
    server.check_clean_exit()
    stopped = new_id()
    mta.send([f"info@{DOMAIN}"], stopped)
    (entry,) = mta.wait_deferred(1)
    assert entry["queue_name"] == "deferred"

    # 2. The server starts without its table: it answers 400, mail waits.
    table.unlink()
    server = ServerProcess(table, ("--listen", f"127.0.0.1:{port}"))
    started.append(server)
    missing = new_id()
    mta.send([f"info@{DOMAIN}"], missing)
    mta.wait_deferred(2)
    server.wait_for_log(f"table unavailable: {re.escape(str(table))} is missing")  # it answered
    build(source, VIRTUAL, table)
    mta.flush()
    mta.wait_delivered("alice", stopped)
    mta.wait_delivered("alice", missing)
    mta.wait_queue_empty()

    # 3. The table is deleted while the server serves it (and Postfix is connected).
    seen = len(mta.log())
    table.unlink()
    deleted = new_id()
    mta.send([f"team@{DOMAIN}"], deleted)
    mta.wait_deferred(1)
    # Postfix reached the server, which answered 400 (with it stopped, connects fail).
    since = mta.log()[seen:]
    assert f'lookup error for "team@{DOMAIN}"' in since, since
    assert "Connection refused" not in since, since
    build(source, VIRTUAL, table)
    mta.flush()
    mta.wait_delivered("alice", deleted)
    mta.wait_delivered("bob", deleted)
    mta.wait_queue_empty()

    assert sorted(mta.message_ids("alice")) == sorted([stopped, missing, deleted])
    assert mta.message_ids("bob") == [deleted]
    log = mta.log()
    assert log.count("status=deferred") >= 3, log
    assert_no_bounce(mta)


# --- tables rebuilt while mail flows -----------------------------------------------------

MESSAGES = 200
SESSIONS = 8  # parallel SMTP sessions
REBUILDS = 5  # one after every MESSAGES / (REBUILDS + 1) messages sent


def test_rebuilds_while_mail_flows(
    tmp_path: Path, table: Path, started: list[PostfixMTA | LoggedProcess]
) -> None:
    """200 messages over 8 SMTP sessions, 5 rebuilds: each delivered once, old or new target."""
    server = ServerProcess(table, ("--listen", "127.0.0.1:0"))
    started.append(server)
    mta = PostfixMTA(Options(f"tcp:127.0.0.1:{server.port}"))
    started.append(mta)
    source = tmp_path / "virtual"
    targets = ["alice", "bob"]

    lock = threading.Lock()
    sent: list[str] = []  # in the order the server accepted them
    after_last_rebuild: list[str] = []
    rebuilt = 0
    errors: list[BaseException] = []
    per_rebuild = MESSAGES // (REBUILDS + 1)

    def session(count: int) -> None:
        nonlocal rebuilt
        try:
            with smtplib.SMTP("127.0.0.1", mta.front, local_hostname="client.invalid") as smtp:
                for _ in range(count):
                    message_id = new_id()
                    with lock:  # the table generation before the message is sent
                        generation = rebuilt
                    smtp.sendmail(
                        "sender@tcpmap-test.invalid",
                        [f"info@{DOMAIN}"],
                        f"Message-ID: {message_id}\r\nSubject: load\r\n\r\nload\r\n",
                    )
                    with lock:  # a rebuild every per_rebuild messages, as mail flows
                        sent.append(message_id)
                        if generation == REBUILDS:  # queued after the last rebuild
                            after_last_rebuild.append(message_id)
                        elif rebuilt < REBUILDS and len(sent) % per_rebuild == 0:
                            rebuilt += 1
                            target = targets[rebuilt % 2]
                            build(source, f"info@{DOMAIN} {target}@localhost\n", table)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=session, args=(MESSAGES // SESSIONS,)) for _ in range(SESSIONS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert len(sent) == MESSAGES and rebuilt == REBUILDS

    mta.wait_queue_empty(timeout=240)
    delivered = mta.message_ids("alice") + mta.message_ids("bob")
    assert sorted(delivered) == sorted(sent), "each message exactly once"
    final = targets[REBUILDS % 2]
    assert set(after_last_rebuild) <= set(mta.message_ids(final)), "the last rebuild is used"
    assert after_last_rebuild, "some mail was sent after the last rebuild"
    assert_no_bounce(mta)
