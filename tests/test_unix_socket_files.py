"""Unix socket files made by --listen socketmap:unix:PATH, against a local attacker (issue 12).

Anyone who can write the socket's directory (Postfix's private/ is such a place)
may rename a symlink over PATH at any moment. The server must create the file
with its final mode and never act on PATH after that, nor follow a symlink there.
The attacker is a separate process, so it really runs in parallel with bind_unix().
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from activation import Activated, unix_listener
from conftest import SocketmapConn, make_table, server_command

from tcpmap_lmdb import listeners

ROUNDS = 20_000  # bind_unix() calls while the attacker runs: a few seconds
DEADLINE = 30.0  # seconds: the most to go on past ROUNDS while no bind has happened

# Renames a fresh symlink to TARGET over PATH again and again, and every 20th
# time removes it for a moment (so that the server can bind now and then), as
# fast as it can, until STOP exists.
_ATTACKER = textwrap.dedent(
    """
    import os, sys, time
    path, target, stop = sys.argv[1:]
    spare = path + ".evil"
    print("ready", flush=True)
    rounds = 0
    while not os.path.exists(stop):
        rounds += 1
        try:
            os.symlink(target, spare)
        except FileExistsError:
            pass
        try:
            os.rename(spare, path)
            if rounds % 20 == 0:
                os.unlink(path)
                time.sleep(0.0002)  # a moment with the path free, so that binds happen
        except OSError:
            pass
    """
)


def test_a_symlink_renamed_over_the_socket_path_never_changes_its_targets_mode(
    tmp_path: Path,
) -> None:
    """While an attacker keeps renaming a symlink to a 0600 file over PATH, bind_unix()
    is called ROUNDS times: the file's mode never changes, and every socket bound has
    mode 0666 from the start."""
    target = tmp_path / "secret"
    target.write_text("root's")
    target.chmod(0o600)
    path = tmp_path / "sm.sock"
    stop = tmp_path / "stop"
    attacker = subprocess.Popen(
        [sys.executable, "-c", _ATTACKER, str(path), str(target), str(stop)],
        stdout=subprocess.PIPE,
    )
    bound = refused = 0
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + DEADLINE
        rounds = 0
        # ROUNDS at least, and on a loaded machine more, until some binds happened.
        while rounds < ROUNDS or (not bound and time.monotonic() < deadline):
            rounds += 1
            try:
                sock = listeners.bind_unix(path)
            except OSError:
                refused += 1  # a symlink was there: refusing is right
            else:
                bound += 1
                sock.close()
            assert stat.S_IMODE(target.stat().st_mode) == 0o600, f"after {bound} binds"
    finally:
        stop.touch()
        attacker.wait(10)
    assert bound > 0, "never bound: the attacker never let go of the path"
    assert refused > 0, "the attacker never won the path: the test proved nothing"


def test_a_symlink_at_the_socket_path_is_refused_not_followed(tmp_path: Path) -> None:
    """A symlink at PATH (to a stale socket or to a file) is neither followed nor removed."""
    dead = tmp_path / "dead.sock"
    listeners.bind_unix(dead).close()  # a socket nobody listens on
    path = tmp_path / "sm.sock"
    path.symlink_to(dead)
    with pytest.raises(OSError, match="not a socket"):
        listeners.bind_unix(path)
    assert path.is_symlink()
    assert stat.S_ISSOCK(dead.lstat().st_mode)


def test_the_socket_file_has_mode_0666_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    """Bound with its final mode under any umask; no temporary entry is left in the directory."""
    old = os.umask(0o077)
    try:
        sock = listeners.bind_unix(tmp_path / "sm.sock")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE((tmp_path / "sm.sock").lstat().st_mode) == 0o666
        assert sorted(p.name for p in tmp_path.iterdir()) == ["sm.sock"]
    finally:
        sock.close()


def test_a_socket_systemd_passes_keeps_its_mode_and_its_file(tmp_path: Path) -> None:
    """A unix socket from systemd (SocketMode=0600) is served as it is: its mode is not
    changed, nothing is created beside it, and it is not removed at the end."""
    maps = tmp_path / "maps"
    maps.mkdir()
    make_table(maps / "virtual.lmdb", {"alice": "here"})
    path = tmp_path / "sm.sock"
    listener = unix_listener(path)
    path.chmod(0o600)
    try:
        srv = Activated([*server_command("--maps", maps)], [listener], ["socketmap"])
        try:
            srv.wait_for_log("inherited socket 'socketmap' from systemd")
            with SocketmapConn(path) as conn:
                assert conn.ask(b"virtual", b"alice") == (b"OK", b"here")
        finally:
            assert srv.stop() == 0, "\n".join(srv.logs)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["maps", "sm.sock"]
    finally:
        listener.close()
