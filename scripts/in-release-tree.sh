#!/bin/sh
# The inside half of scripts/test-release-tree.sh: runs in the release's tree,
# with the checkout at /src. Prints the release's versions, as installed and as
# the archive has them (apt-cache policy), then runs pytest; with TCPMAP_MYPYC=1,
# against the hot path compiled by the release's mypyc.
set -eu
. /etc/os-release
echo "in-release-tree: $PRETTY_NAME"
echo "in-release-tree: installed versions, and the archive's candidates (apt-cache policy):"
apt-cache policy postfix postfix-lmdb python3 python3-gevent python3-lmdb python3-systemd \
    python3-pytest python3-hypothesis | grep -E '^[^ ]|Installed|Candidate'

venv=/opt/tcpmap-venv
python3 -m venv --system-site-packages "$venv"
if [ "${TCPMAP_MYPYC:-}" = 1 ]; then
    # The form the .deb ships: the hot path compiled by the release's own mypyc
    # (python3-mypy), installed, not editable. pip builds in /src, which is a
    # throw-away overlay: build/ and the egg-info never reach the checkout.
    # conftest.py checks the compiled form is what runs, and PYTHONSAFEPATH keeps
    # the source tree off sys.path (see make test-compiled).
    TCPMAP_MYPYC=1 "$venv/bin/pip" install -q --no-deps --no-build-isolation --no-index /src
    "$venv/bin/python" -P -m tcpmap_lmdb.compiled --require
    export PYTHONSAFEPATH=1 TCPMAP_EXPECT_COMPILED=1
else
    "$venv/bin/pip" install -q --no-deps --no-build-isolation --no-index -e /src
fi
"$venv/bin/python" -c 'import sys; from importlib.metadata import version as v
print("in-release-tree: python", sys.version.split()[0], "gevent", v("gevent"), "lmdb", v("lmdb"),
      "systemd-python", v("systemd-python"), "pytest", v("pytest"), "hypothesis", v("hypothesis"),
      "mypy", v("mypy"))'
echo "in-release-tree: Postfix $(/usr/sbin/postconf -h -d mail_version)"
# systemd-nspawn hands its payload a full inheritable capability set; a root shell on a
# host has none. With them, a capability dropped from the bounding set (the tests'
# `setpriv --bounding-set=-dac_override`) survives execve, so clear them, as on a host.
exec setpriv --inh-caps=-all "$venv/bin/python" -m pytest -p no:cacheprovider \
    --ignore=tests/test_system_deb.py "$@"
