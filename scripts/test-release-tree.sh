#!/bin/sh
# Run the test suite on another Debian release's own Python stack, inside its
# debootstrapped tree (tests/debian_tree.py, cached in /var/cache/tcpmap-test):
#
#   sh scripts/test-release-tree.sh trixie [PYTEST ARGS]    # pure Python
#   TCPMAP_MYPYC=1 sh scripts/test-release-tree.sh trixie   # compiled (make test-trixie-stack)
#
# The tree runs under systemd-nspawn, as root, with no network but its own
# loopback (--private-network), on a throw-away overlay (--volatile=overlay: the
# cached tree is never changed). The checkout is mounted at /src, also on a
# throw-away overlay, so nothing the run writes lands in it. There, a venv with
# --system-site-packages sees the release's python3, python3-gevent, python3-lmdb,
# python3-systemd, python3-pytest and python3-hypothesis, and gets only the
# project itself (pip install --no-deps -e, offline; with TCPMAP_MYPYC=1 a
# non-editable install with the hot path compiled by the release's mypyc).
# Postfix is the release's too. The package's system test
# (tests/test_system_deb.py) runs in the main suite, for every release. Needs root, debootstrap and systemd-nspawn; skips
# without them, except under CI=true, where that is a failure.
set -eu
cd "$(dirname "$0")/.."

suite=${1:?usage: $0 SUITE [PYTEST ARGS]}
shift
how="needs root, debootstrap and systemd-nspawn: apt-get install debootstrap systemd-container, run as root"
if [ "$(id -u)" -ne 0 ] || ! command -v systemd-nspawn >/dev/null || ! command -v debootstrap >/dev/null; then
    if [ "${CI:-}" = true ]; then
        echo "test-release-tree: CI=true: $how" >&2
        exit 1
    fi
    echo "test-release-tree: skipped the suite on $suite: $how" >&2
    exit 0
fi

sh scripts/system-deps.sh system
tree=$(python3 tests/debian_tree.py "$suite")
echo "test-release-tree: $suite tree $tree"
# --as-pid2: a stub init reaps the orphans (Postfix's daemons) and forwards signals.
exec systemd-nspawn --quiet --console=pipe -D "$tree" --volatile=overlay --register=no --keep-unit \
    --private-network --as-pid2 --overlay="$PWD::/src" --chdir=/src \
    --setenv=CI="${CI:-}" --setenv=TCPMAP_MYPYC="${TCPMAP_MYPYC:-}" \
    --setenv=HOME=/root --setenv=LANG=C.UTF-8 \
    /bin/sh /src/scripts/in-release-tree.sh "$@"
