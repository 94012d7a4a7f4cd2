#!/bin/sh
# Install the Debian/Ubuntu packages a target needs, only those missing.
#   venv: what building systemd-python in .venv needs
#   test: venv's and system's, plus Postfix's own tools (the real client in the tests),
#         and /usr/bin/time (the build bench's peak memory)
#   deb: what building the Debian package needs (scripts/build-deb.sh)
#   deb-tree: what building it in another release's tree needs here (TCPMAP_DEB_TREE)
#   system: what the system test of the package needs (tests/test_system_deb.py)
#   debian-stack: Debian 12's own Python stack (scripts/test-debian-stack.sh)
set -eu

venv_pkgs="python3-venv python3-dev gcc pkg-config libsystemd-dev"
deb_pkgs="debhelper dh-python pybuild-plugin-pyproject python3-all-dev python3-mypy python3-setuptools lintian"
deb_tree_pkgs="dpkg-dev systemd-container"
system_pkgs="debootstrap systemd-container"
test_pkgs="$venv_pkgs $system_pkgs postfix postfix-lmdb time"
debian_stack_pkgs="python3-venv python3-gevent python3-lmdb python3-systemd python3-prometheus-client python3-mypy python3-wheel"

case "${1:-}" in
    venv) wanted=$venv_pkgs ;;
    test) wanted=$test_pkgs ;;
    deb) wanted=$deb_pkgs ;;
    deb-tree) wanted=$deb_tree_pkgs ;;
    system) wanted=$system_pkgs ;;
    debian-stack) wanted=$debian_stack_pkgs ;;
    *) echo "usage: $0 venv|test|deb|deb-tree|system|debian-stack" >&2; exit 2 ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "system-deps: not a Debian/Ubuntu system; install by hand: $wanted" >&2
    exit 0
fi

missing=""
for pkg in $wanted; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = installed ] || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: missing packages:$missing" >&2
    echo "system-deps: run as root, or: sudo apt-get install$missing" >&2
    exit 1
fi

echo "system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# Postfix is only a client in the tests: install it without configuring mail.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get update -q
apt-get install -y -q --no-install-recommends $missing
