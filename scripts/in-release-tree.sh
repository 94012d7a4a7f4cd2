#!/bin/sh
# The inside half of scripts/test-release-tree.sh: runs in the release's tree,
# with the checkout at /src. Prints the release's versions, as installed and as
# the archive has them (apt-cache policy), then runs pytest.
set -eu
. /etc/os-release
echo "in-release-tree: $PRETTY_NAME"
echo "in-release-tree: installed versions, and the archive's candidates (apt-cache policy):"
apt-cache policy postfix postfix-lmdb python3 python3-gevent python3-lmdb python3-systemd \
    python3-pytest python3-hypothesis | grep -E '^[^ ]|Installed|Candidate'

venv=/opt/tcpmap-venv
python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --no-deps --no-build-isolation --no-index -e /src
"$venv/bin/python" -c 'import sys; from importlib.metadata import version as v
print("in-release-tree: python", sys.version.split()[0], "gevent", v("gevent"), "lmdb", v("lmdb"),
      "systemd-python", v("systemd-python"), "pytest", v("pytest"), "hypothesis", v("hypothesis"))'
echo "in-release-tree: Postfix $(/usr/sbin/postconf -h -d mail_version)"
# systemd-nspawn hands its payload a full inheritable capability set; a root shell on a
# host has none. With them, a capability dropped from the bounding set (the tests'
# `setpriv --bounding-set=-dac_override`) survives execve, so clear them, as on a host.
exec setpriv --inh-caps=-all "$venv/bin/python" -m pytest -p no:cacheprovider \
    --ignore=tests/test_system_deb.py "$@"
