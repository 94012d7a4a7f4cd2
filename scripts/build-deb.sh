#!/bin/sh
# Build the Debian package into dist/tcpmap-lmdb_VERSION_ARCH.deb and lint it (make deb).
#
#   sh scripts/build-deb.sh
#   TCPMAP_DEB_VERSION=0.1.0+test1 sh scripts/build-deb.sh   # same code, another version
#   TCPMAP_DEB_DEST=DIR sh scripts/build-deb.sh              # put the .deb in DIR, not dist/
#   TCPMAP_DEB_TREE=DIR sh scripts/build-deb.sh              # build in a Debian tree (root)
#
# The package is architecture-specific: its hot path is compiled by the
# release's own mypyc (python3-mypy) for the release's own Python (3.11 in
# Debian 12, 3.13 in Debian 13), so it is built once per release. Without
# TCPMAP_DEB_TREE it is built on this machine, for its release. TCPMAP_DEB_TREE
# names a root tree of another release that holds the build dependencies
# (tests/debian_tree.py makes one): the build and lintian then run in it, the
# release's own, under systemd-nspawn, on a throw-away overlay, with no network.
#
# The build runs in a staged copy of the tree (build/deb/), with packaging/debian/
# as its debian/, and with a clean environment: the pyenv shims first on this
# machine's PATH must not leak into pybuild. lintian fails the build on any error
# or warning. Missing build dependencies are installed with apt (as root).
set -eu
cd "$(dirname "$0")/.."

if [ -z "${TCPMAP_DEB_TREE:-}" ]; then
    sh scripts/system-deps.sh deb
else
    sh scripts/system-deps.sh deb-tree
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
changelog_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$changelog_version" != "$version" ]; then
    echo "build-deb: pyproject.toml says $version, packaging/debian/changelog $changelog_version:" >&2
    echo "build-deb: add a changelog entry for $version (dch -v $version)" >&2
    exit 1
fi
deb_version=${TCPMAP_DEB_VERSION:-$version}
dest=${TCPMAP_DEB_DEST:-dist}

# A clean tree: the project's own files, tracked or new, never ignored ones
# (.venv, caches, built tables), plus debian/.
stage=build/deb
tree=$stage/tcpmap-lmdb-$deb_version
rm -rf "$stage"
mkdir -p "$tree"
# shellcheck disable=SC2016 # the inner script's "$f" is for the inner sh
git ls-files -z --cached --others --exclude-standard -- \
        pyproject.toml setup.py README.md tcpmap_lmdb systemd examples packaging/man |
    xargs -0 sh -c 'for f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done' existing |
    tar --null -T - -cf - | tar -xf - -C "$tree"
cp -a packaging/debian "$tree/debian"

if [ "$deb_version" != "$version" ]; then
    changelog=$tree/debian/changelog
    maintainer=$(dpkg-parsechangelog -l "$changelog" -S Maintainer)
    # One second after the entry it follows: newer, as lintian wants, and reproducible.
    date=$(date -R -u -d "@$(($(dpkg-parsechangelog -l "$changelog" -S Timestamp) + 1))")
    {
        printf 'tcpmap-lmdb (%s) unstable; urgency=medium\n\n' "$deb_version"
        printf '  * Build of %s as %s (TCPMAP_DEB_VERSION).\n\n' "$version" "$deb_version"
        printf ' -- %s  %s\n\n' "$maintainer" "$date"
        cat "$changelog"
    } > "$changelog.new"
    mv "$changelog.new" "$changelog"
fi

# Build, then lint what was built: -I shows the informational tags too; only
# errors and warnings fail. The same commands on this machine or in the tree.
# shellcheck disable=SC2016 # for the inner sh
build='dpkg-buildpackage -us -uc -b && lintian -I --fail-on error,warning ../tcpmap-lmdb_*.deb'
clean_env="env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8"
if [ -z "${TCPMAP_DEB_TREE:-}" ]; then
    echo "build-deb: building tcpmap-lmdb $deb_version in $tree"
    # shellcheck disable=SC2086 # clean_env is words
    (cd "$tree" && $clean_env HOME="${HOME:-/root}" sh -ec "$build")
else
    release=$(. "$TCPMAP_DEB_TREE/etc/os-release" && echo "$PRETTY_NAME")
    echo "build-deb: building tcpmap-lmdb $deb_version in $tree, in $TCPMAP_DEB_TREE ($release)"
    # --keep-unit: no system bus needed; --volatile=overlay: the tree stays as it is.
    # shellcheck disable=SC2086 # clean_env is words
    systemd-nspawn --quiet --console=pipe -D "$TCPMAP_DEB_TREE" --volatile=overlay \
        --register=no --keep-unit --private-network --bind="$PWD/$stage:/build" \
        --chdir="/build/$(basename "$tree")" $clean_env HOME=/root sh -ec "$build"
fi
echo "build-deb: lintian clean"

deb=$(cd "$stage" && echo tcpmap-lmdb_"$deb_version"_*.deb)
# Which form it ships: setup.py builds pure Python, saying why, if mypyc cannot compile.
compiled=$(dpkg-deb -c "$stage/$deb" | grep -o 'tcpmap_lmdb/[^ ]*\.so$' | sort)
if [ -n "$compiled" ]; then
    echo "build-deb: $deb ships the hot path compiled:" $compiled
else
    echo "build-deb: $deb ships the hot path as pure Python (mypyc did not compile it; see above)"
fi
mkdir -p "$dest"
mv "$stage/$deb" "$dest/$deb"
echo "build-deb: $dest/$deb"
