#!/bin/sh
# Run the test suite on Debian 12's own Python stack: /usr/bin/python3 with
# python3-gevent 22.10, python3-lmdb 1.4 and python3-systemd 235, what the .deb
# depends on. The venv (.venv-debian/) sees those through --system-site-packages
# and gets only pytest and hypothesis from PyPI, and the project without its
# dependencies. The package's system test (tests/test_system_deb.py) runs once,
# in the main suite. Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."

sh scripts/system-deps.sh debian-stack

venv=.venv-debian
if [ ! -x "$venv/bin/pytest" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q pytest hypothesis
fi
"$venv/bin/pip" install -q --no-deps -e .

# Say which versions run, from the distribution's metadata.
"$venv/bin/python" -c 'import sys; from importlib.metadata import version as v
print("debian-stack: python", sys.version.split()[0], "gevent", v("gevent"), "lmdb", v("lmdb"),
      "systemd-python", v("systemd-python"), "prometheus-client", v("prometheus-client"))'
exec "$venv/bin/pytest" --ignore=tests/test_system_deb.py "$@"
