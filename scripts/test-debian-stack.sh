#!/bin/sh
# Run the test suite on Debian 12's own Python stack: /usr/bin/python3 with
# python3-gevent 22.10, python3-lmdb 1.4 and python3-systemd 235, what the .deb
# depends on. The venv (.venv-debian/) sees those through --system-site-packages
# and gets only pytest and hypothesis from PyPI, and the project without its
# dependencies. The package's system test (tests/test_system_deb.py) runs once,
# in the main suite. Extra arguments go to pytest. With TCPMAP_MYPYC=1 (make
# test) the suite runs against the hot path compiled as the .deb compiles it.
set -eu
cd "$(dirname "$0")/.."

sh scripts/system-deps.sh debian-stack

venv=.venv-debian
if [ ! -x "$venv/bin/pytest" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q pytest hypothesis
fi
if [ "${TCPMAP_MYPYC:-}" = 1 ]; then
    # The form the .deb ships: the hot path compiled by Debian's own mypyc
    # (python3-mypy), installed, not editable; conftest.py checks it is what runs,
    # and PYTHONSAFEPATH keeps the source tree off sys.path (see make test-compiled).
    TCPMAP_MYPYC=1 "$venv/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall .
    "$venv/bin/python" -P -m tcpmap_lmdb.compiled --require
    export PYTHONSAFEPATH=1 TCPMAP_EXPECT_COMPILED=1
else
    "$venv/bin/pip" install -q --no-deps -e .
fi

# Say which versions run, from the distribution's metadata.
"$venv/bin/python" -c 'import sys; from importlib.metadata import version as v
print("debian-stack: python", sys.version.split()[0], "gevent", v("gevent"), "lmdb", v("lmdb"),
      "systemd-python", v("systemd-python"), "prometheus-client", v("prometheus-client"))'
exec "$venv/bin/pytest" --ignore=tests/test_system_deb.py "$@"
