"""Minimal Debian trees (debootstrap), one per release, cached in /var/cache/tcpmap-test.

One tree per release serves both tests that need one: the booted-container
system test of the .deb (tests/test_system_deb.py) and the suite on that
release's own Python stack (scripts/test-debian-stack.sh, in the tree with
systemd-nspawn). A tree is never changed after it is built: the system test
boots a copy, the suite runs on a volatile overlay of it.

    python3 tests/debian_tree.py trixie      # builds it if needed; prints its path

Needs root and debootstrap; building one takes a few minutes, from the mirror
this machine's apt uses (deb.debian.org for releases it does not list).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

SUITES = ("bookworm", "trixie")  # Debian 12 (oldstable), Debian 13 (stable)
# systemd as PID 1; the package's dependencies; Postfix; the tools the checks use;
# the test suite's own stack (pytest, hypothesis, a venv with setuptools for
# the install of the checkout; make, for the Makefile test); and what building
# the .deb needs (packaging/debian/control's Build-Depends, with the release's
# own mypyc in python3-mypy) and lintian. The container has no network: every
# package it needs is here. debootstrap does not resolve virtual packages, so
# the provider of lintian's perl-openssl-abi-3 (via libnet-ssleay-perl) is named.
PACKAGES = ",".join(
    (
        "systemd,systemd-sysv,dbus,procps,iproute2,util-linux",
        "python3,python3-gevent,python3-lmdb,python3-systemd,python3-prometheus-client",
        "postfix,postfix-lmdb",
        "python3-pytest,python3-hypothesis,python3-venv,python3-setuptools,python3-wheel,make",
        "build-essential,debhelper,dh-python,pybuild-plugin-pyproject,python3-all-dev",
        "python3-mypy,lintian,perl-openssl-defaults",
    )
)
CACHE = Path("/var/cache/tcpmap-test")
STALE_AFTER = 86400.0  # seconds: a tree for another package list is removed after this


def debian_mirror(suite: str) -> str:
    """The Debian mirror this machine's apt uses for SUITE, or deb.debian.org."""
    fmt = "$(REPO_URI) $(RELEASE)"
    targets = subprocess.run(
        ["apt-get", "indextargets", "--format", fmt, "Identifier: Packages"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    uris = [line.split()[0] for line in targets if line.endswith(f" {suite}")]
    return uris[0] if uris else "http://deb.debian.org/debian/"


def tree_path(suite: str) -> Path:
    """Where the tree of SUITE with PACKAGES from its mirror is (or will be) cached."""
    key = f"{suite} {debian_mirror(suite)} {PACKAGES}"
    return CACHE / f"{suite}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def debian_tree(suite: str, timeout: float) -> Path:
    """The cached tree of SUITE, built first if missing, never half built.

    Raises subprocess.CalledProcessError (output captured) if debootstrap fails,
    subprocess.TimeoutExpired after TIMEOUT seconds.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: one of {', '.join(SUITES)}")
    tree = tree_path(suite)
    if tree.is_dir():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    building = CACHE / f".{tree.name}.{os.getpid()}"
    try:
        debootstrap = ["debootstrap", "--variant=minbase", f"--include={PACKAGES}"]
        subprocess.run(
            [*debootstrap, suite, str(building), debian_mirror(suite)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        building.rename(tree)  # atomic: an interrupted run leaves no half cache
    finally:
        remove(building)
    # Trees for other package lists or mirrors: another checkout (a branch in another
    # worktree) may be using one right now, so only those built a day ago go.
    for stale in CACHE.glob(f"{suite}-*"):
        if stale != tree and time.time() - stale.stat().st_mtime > STALE_AFTER:
            remove(stale)
    return tree


def remove(path: Path) -> None:
    """rm -rf PATH, never crossing into a /proc or /dev a killed debootstrap left mounted."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SUITES:
        print(f"usage: debian_tree.py {'|'.join(SUITES)}", file=sys.stderr)
        return 2
    try:
        print(debian_tree(argv[0], timeout=1800))
    except subprocess.CalledProcessError as error:
        print(f"debootstrap {argv[0]} failed:\n{error.stdout}{error.stderr}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
