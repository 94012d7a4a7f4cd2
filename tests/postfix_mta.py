"""A real Postfix MTA for tests: its own config, queue and data directories, loopback only.

Mail enters over SMTP at `front` (127.0.0.1), is queued without address mapping,
and leaves the queue through Postfix's smtp client (content_filter) to `back`,
a second smtpd on 127.0.0.1 whose cleanup does the virtual alias lookups in
VIRTUAL_ALIAS_MAPS (our server). So a lookup that fails leaves the message
deferred in the queue, as after-queue filters do (FILTER_README). The cleanup
result goes to local(8), whose aliases(5) file turns user@localhost into a
mailbox file under `mail`, which the test reads. A third listener, `access`,
runs check_recipient_access ACCESS_MAP at RCPT time.

Facts this relies on (engineering-notes.md section 9, checked with Postfix 3.7
and 3.10 as root): `postfix -c DIR` needs no alternate_config_directories as
root; data_directory must belong to postfix and every parent of the queue must
be searchable (0755); without syslog, postlogd writes maillog_file; main.cf
must be older than a second or Postfix waits for it to settle; DNS is not
reachable, so no name lookups are made. The smtp client's loop check applies
to port 25 only (smtp_connect.c), so it does not see `back` as a loop.
"""

from __future__ import annotations

import json
import mailbox
import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from activation import free_port
from postfix_tools import REASON, tool

USERS = ("alice", "bob")  # local users, each with a mailbox file (aliases(5) file delivery)
HOSTNAME = "mta.tcpmap-test.invalid"  # myhostname; also smtplib's HELO name
DOMAIN = "example.com"  # the test-only virtual alias domain (virtual_alias_domains)
SENDER = "sender@tcpmap-test.invalid"
TIMEOUT = 60.0  # seconds for one postfix/postqueue command


@dataclass(frozen=True)
class Options:
    """What varies between instances: the lookup tables and chrooted services."""

    virtual_alias_maps: str  # e.g. tcp:127.0.0.1:PORT, socketmap:unix:private/tcpmap:virtual
    access_map: str = "static:OK"  # check_recipient_access table of the `access` listener
    chroot: bool = False  # `back` smtpd and its cleanup chrooted to the queue directory


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)  # polling a condition with a deadline


class PostfixMTA:
    """A running Postfix instance under a fresh 0755 directory; stop() removes it."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.base = Path(tempfile.mkdtemp(prefix="tcpmap-mta-"))
        self.base.chmod(0o755)
        self.config = self.base / "etc"
        self.queue = self.base / "spool"
        self.data = self.base / "data"
        self.mail = self.base / "mail"
        self.maillog = self.base / "maillog"
        self.front, self.back, self.access = free_port(), free_port(), free_port()
        try:
            self._configure()
            self._run("postfix", "start")
        except BaseException:
            self._remove()
            raise

    # --- set up and tear down ---------------------------------------------------

    def _configure(self) -> None:
        postfix = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam("nobody")
        for directory in (self.config, self.queue, self.data, self.mail):
            directory.mkdir(mode=0o755)
        os.chown(self.data, postfix.pw_uid, postfix.pw_gid)
        # File deliveries from a root-owned aliases file run as default_privs (nobody).
        os.chown(self.mail, nobody.pw_uid, nobody.pw_gid)
        chroot = "y" if self.options.chroot else "n"
        main_cf = self.config / "main.cf"
        main_cf.write_text(
            f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
myhostname = {HOSTNAME}
mydomain = tcpmap-test.invalid
myorigin = $myhostname
mydestination = localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtputf8_enable = no
biff = no
maillog_file = {self.maillog}
maillog_file_prefixes = {self.base}
alias_maps = lmdb:{self.config}/aliases
alias_database = $alias_maps
local_recipient_maps =
relayhost =
default_transport = error:this test sends no mail beyond localhost
virtual_alias_domains = {DOMAIN}
virtual_alias_maps = {self.options.virtual_alias_maps}
access_restrictions = check_recipient_access {self.options.access_map},
    permit_mynetworks, reject_unauth_destination
# Mail enters the queue unmapped, and leaves it for `back`, whose cleanup maps it.
content_filter = mapper:[127.0.0.1]:{self.back}
receive_override_options = no_address_mappings
smtpd_reject_unlisted_recipient = no
# Deferred mail is retried on postqueue -f; nothing waits for a timer.
queue_run_delay = 300s
minimal_backoff_time = 300s
maximal_backoff_time = 600s
delay_warning_time = 0
# No notices to the postmaster (a failed lookup is a "resource" problem): they would
# join the queue the tests count, and this instance delivers nothing beyond localhost.
notify_classes =
"""
        )
        (self.config / "master.cf").write_text(
            f"""\
127.0.0.1:{self.front} inet n - n - - smtpd
127.0.0.1:{self.access} inet n - n - - smtpd
  -o smtpd_recipient_restrictions=$access_restrictions
127.0.0.1:{self.back} inet n - {chroot} - - smtpd
  -o content_filter= -o receive_override_options= -o cleanup_service_name=mapcleanup
mapcleanup unix n - {chroot} - 0 cleanup
mapper    unix - - n - - smtp
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
local     unix - n n - - local
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""
        )
        aliases = self.config / "aliases"
        aliases.write_text("".join(f"{user}: {self.mail / user}\n" for user in USERS))
        self._run("postalias", f"lmdb:{aliases}")
        # Postfix waits for a main.cf younger than a second to settle: date it back.
        an_hour_ago = time.time() - 3600
        os.utime(main_cf, (an_hour_ago, an_hour_ago))

    def _run(self, name: str, *args: str) -> str:
        path = tool(name)
        assert path is not None, REASON
        done = subprocess.run(
            [path, "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, f"{name} {' '.join(args)}: {done.stderr}\n{self.log()}"
        return done.stdout

    def stop(self) -> None:
        """postfix stop, until the master has exited; then remove the directory."""
        try:
            self._run("postfix", "stop")
            _wait(lambda: not self._running(), TIMEOUT, "postfix stop")
        finally:
            self._remove()

    def _running(self) -> bool:
        status = subprocess.run(
            [tool("postfix") or "postfix", "-c", str(self.config), "status"],
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        return status.returncode == 0

    def _remove(self) -> None:
        if self._running():  # a start or stop that failed half way
            subprocess.run(
                [tool("postfix") or "postfix", "-c", str(self.config), "abort"],
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
        shutil.rmtree(self.base, ignore_errors=True)

    # --- mail in, mail out ---------------------------------------------------------

    def send(self, recipients: list[str], message_id: str, port: int | None = None) -> None:
        """One message over SMTP (smtplib) to `front` (or PORT); raises smtplib's errors."""
        with smtplib.SMTP(
            "127.0.0.1", port or self.front, local_hostname=HOSTNAME, timeout=TIMEOUT
        ) as smtp:
            smtp.sendmail(SENDER, recipients, message(recipients, message_id))

    def message_ids(self, user: str) -> list[str]:
        """Message-IDs in USER's mailbox file, in delivery order, duplicates kept."""
        path = self.mail / user
        if not path.exists():
            return []
        box = mailbox.mbox(path, create=False)
        try:
            return [str(msg["Message-ID"]) for msg in box]
        finally:
            box.close()

    def wait_delivered(self, user: str, message_id: str, timeout: float = TIMEOUT) -> None:
        _wait(
            lambda: message_id in self.message_ids(user),
            timeout,
            f"{message_id} delivered to {user}\n{self.log()[-3000:]}",
        )

    def queue_entries(self) -> list[dict[str, object]]:
        """postqueue -j: one JSON object per queued message (queue_name, recipients, ...)."""
        lines = self._run("postqueue", "-j").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def wait_deferred(self, count: int, timeout: float = TIMEOUT) -> list[dict[str, object]]:
        """Until COUNT messages wait in the deferred queue (and none elsewhere); them."""
        entries: list[dict[str, object]] = []

        def deferred() -> bool:
            nonlocal entries
            entries = self.queue_entries()
            return len(entries) == count and all(e["queue_name"] == "deferred" for e in entries)

        _wait(deferred, timeout, f"{count} deferred; queue: {entries}\n{self.log()[-3000:]}")
        return entries

    def flush(self) -> None:
        """postqueue -f: retry every deferred message now."""
        self._run("postqueue", "-f")

    def wait_queue_empty(self, timeout: float = TIMEOUT) -> None:
        _wait(lambda: not self.queue_entries(), timeout, f"an empty queue\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""


def message(recipients: list[str], message_id: str) -> str:
    return (
        f"From: {SENDER}\r\nTo: {', '.join(recipients)}\r\nSubject: tcpmap test\r\n"
        f"Message-ID: {message_id}\r\n\r\nbody of {message_id}\r\n"
    )
