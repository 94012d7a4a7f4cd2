#!/bin/sh
# Build the Debian package into dist/tcpmap-lmdb_VERSION_all.deb and lint it (make deb).
#
#   sh scripts/build-deb.sh
#   TCPMAP_DEB_VERSION=0.1.0+test1 sh scripts/build-deb.sh   # same code, another version
#   TCPMAP_DEB_DEST=DIR sh scripts/build-deb.sh              # put the .deb in DIR, not dist/
#
# The build runs in a staged copy of the tree (build/deb/), with packaging/debian/
# as its debian/, and with a clean environment: the pyenv shims first on this
# machine's PATH must not leak into pybuild. lintian fails the build on any error
# or warning. Missing build dependencies are installed with apt (as root).
set -eu
cd "$(dirname "$0")/.."

sh scripts/system-deps.sh deb

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

echo "build-deb: building tcpmap-lmdb $deb_version in $tree"
(cd "$tree" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="${HOME:-/root}" LANG=C.UTF-8 \
    dpkg-buildpackage -us -uc -b)

deb=tcpmap-lmdb_${deb_version}_all.deb
mkdir -p "$dest"
mv "$stage/$deb" "$dest/$deb"
echo "build-deb: $dest/$deb"

# -I shows the informational tags too; only errors and warnings fail.
lintian -I --fail-on error,warning "$dest/$deb"
echo "build-deb: lintian clean"
