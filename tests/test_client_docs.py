"""Every tcpmap-query command the documentation shows works, run as written.

The commands are collected from README.md (shell blocks and inline code), the
tcpmap-query(1) man page's EXAMPLES, and comments in examples/ and systemd/.
They run in a network namespace of their own (docs_examples.py), so the
documented addresses (127.0.0.1:4242, [::1]:4242, ...) are used literally,
against a real tcpmap-server started with the README's own command line. The
man page's installed paths (/var/lib/tcpmap/, /var/spool/postfix/private/) are
the only substitution: they become directories of the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

README = ROOT / "README.md"
MAN_PAGE = ROOT / "packaging" / "man" / "tcpmap-query.1"
COMMAND = re.compile(r"(?:\.venv/bin/)?tcpmap-query\s.*")
# A synopsis or a sketch, not a command: placeholders such as KEY, TABLE, HOST:PORT, "...".
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b|\.\.\.")
MAN_PATHS = {"/var/lib/tcpmap/": "build/", "/var/spool/postfix/private/": "private/"}


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S)


def readme_commands() -> list[str]:
    text = README.read_text()
    found = [
        line.strip()
        for block in _shell_blocks(text)
        for line in block.splitlines()
        if COMMAND.fullmatch(line.strip())
    ]
    # inline: a command, not the mention of an option (`tcpmap-query --dump`)
    found += [
        span
        for span in re.findall(r"`([^`\n]+)`", text)
        if COMMAND.fullmatch(span) and not all(word.startswith("-") for word in span.split()[1:])
    ]
    return [command for command in found if not PLACEHOLDER.search(command.partition("#")[0])]


def man_commands() -> list[str]:
    text = MAN_PAGE.read_text()
    examples = re.search(r"^\.EX\n(.*?)^\.EE", text, flags=re.M | re.S)
    assert examples is not None
    commands = []
    for roff in examples.group(1).splitlines():
        command = roff.replace("\\-", "-").replace("\\(aq", "'")
        for installed, here in MAN_PATHS.items():
            command = command.replace(installed, here)
        commands.append(command)
    return commands


def comment_commands() -> list[str]:
    """tcpmap-query commands in the comments of examples/ and systemd/ files."""
    found = []
    for path in sorted([*ROOT.glob("examples/*"), *ROOT.glob("systemd/*")]):
        for line in path.read_text(errors="replace").splitlines():
            match = re.search(r"#.*?((?:\.venv/bin/)?tcpmap-query\s.*)", line)
            if match and not PLACEHOLDER.search(match.group(1)):
                found.append(match.group(1).strip())
    return found


def readme_server() -> list[str]:
    """The arguments of the README's tcpmap-server line that serves build/virtual.lmdb."""
    for block in _shell_blocks(README.read_text()):
        for line in block.splitlines():
            if line.startswith("tcpmap-server --db build/virtual.lmdb "):
                return line.split()[1:]
    raise AssertionError("README.md shows no `tcpmap-server --db build/virtual.lmdb ...` line")


def test_commands_are_found() -> None:
    """The collection itself: the README's examples and the man page's are all there."""
    readme = readme_commands()
    assert (
        ".venv/bin/tcpmap-query info@example.com        # alice@example.net, bob@example.net"
        in (readme)
    )
    assert any(c.startswith("tcpmap-query info@example.com tcp:127.0.0.1:4242") for c in readme)
    assert len(readme) >= 9
    assert len(man_commands()) >= 6


def test_documented_commands_work(tmp_path: Path) -> None:
    """Each command exits 0, prints something, and nothing on stderr (no note, no error)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        why = "needs unshare(1) and ip(8): apt-get install util-linux iproute2"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    commands = readme_commands() + man_commands() + comment_commands()
    (tmp_path / "private").mkdir()
    (tmp_path / "keys.txt").write_text("info@example.com\nsales@example.com\n")
    server = [
        *readme_server(),
        # the man page's examples: IPv6 loopback, and the chroot's unix socket
        "--listen",
        "[::1]:4242",
        "--listen",
        f"socketmap:unix:{tmp_path}/private/tcpmap",
    ]
    done = subprocess.run(
        ["unshare", "-r", "-n", sys.executable, str(ROOT / "tests" / "docs_examples.py"), tmp_path],
        input=json.dumps({"server": server, "commands": commands}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT / "tests",
        # its imports (conftest), also under PYTHONSAFEPATH=1 (make test-compiled)
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )
    if done.returncode != 0 and "unshare failed" in done.stderr:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no network namespace: {done.stderr}")
        pytest.skip(
            f"no network namespace here (run as root, or allow user namespaces): {done.stderr}"
        )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(commands), done.stderr
    previous = ""
    for command, result in zip(commands, results, strict=True):
        assert (result["rc"], result["err"]) == (0, ""), (command, result)
        assert result["out"], command
        comment = command.partition("#")[2].strip()
        if comment.startswith("the same"):
            assert result["out"] == previous, command
        elif "@" in comment:
            assert result["out"] == comment + "\n", command
        previous = result["out"]
