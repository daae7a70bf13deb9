#!/usr/bin/env bash
# make deb: build libnginx-mod-http-annotation-queue_<version>_<arch>.deb
# into build/deb/, the way Debian builds its own nginx modules
# (dh-sequence-nginx from nginx-dev; debian/rules says what each step does).
#
# The package is built with dpkg-buildpackage -b -us -uc on a copy of the
# files it is made of under build/deb/src/, so the working tree stays clean
# (no debian/.debhelper, debian/files, obj-* in it).
#
# The version is the VERSION file (debian/changelog's entry must match it;
# the package is native: its version is VERSION's as is).  Why not git
# describe: the repository has no tags, so it would give a bare commit hash,
# which dpkg cannot order (an upgrade must see a greater version), and it
# needs .git, which a copy or a release tarball does not have.  A release
# is a deliberate act: bump VERSION and add a changelog entry
# (dch -v <version>).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/build/deb
pkg=libnginx-mod-http-annotation-queue

# what the build needs on the machine (debian/control's Build-Depends, and
# dpkg-buildpackage itself); dh-sequence-nginx is provided by nginx-dev
build_pkgs=(build-essential dpkg-dev debhelper fakeroot nginx nginx-dev
            libpq-dev libjansson-dev libssl-dev)
missing=()
for p in "${build_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' \
        || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "build-deb: missing ${missing[*]} (run as root to install)" >&2
        exit 1
    fi
    echo "build-deb: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
fi

version=$(tr -d ' \n' < "$top/VERSION")
changelog_version=$(dpkg-parsechangelog -l "$top/debian/changelog" -S Version)
if [ "$version" != "$changelog_version" ]; then
    echo "build-deb: VERSION says $version, debian/changelog $changelog_version:" \
         "add a changelog entry (dch -v $version) or fix VERSION" >&2
    exit 1
fi

arch=$(dpkg-architecture -qDEB_HOST_ARCH)
deb=${pkg}_${version}_${arch}.deb

# the source package: the files the module and the package are made of
src=$out/src/$pkg-$version
rm -rf "$out/src"
mkdir -p "$src"
(cd "$top" && cp -a --parents config ngx_http_annotation_queue_module.c \
     src/*.c src/*.h sql debian VERSION README.md SECURITY.md openapi.yaml \
     "$src/")

(cd "$src" && dpkg-checkbuilddeps)

echo "build-deb: dpkg-buildpackage -b in ${src#"$top"/} (log: build/deb/build.log)"
if ! (cd "$src" && dpkg-buildpackage -b -us -uc) > "$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (build/deb/build.log)" >&2
    exit 1
fi

# the package, its debug symbols (-dbgsym) and the .changes naming both
rm -f "$out/$pkg"_*.deb "$out/$pkg"-dbgsym_*.deb "$out/$pkg"_*.changes \
      "$out/$pkg"_*.buildinfo
mv "$out/src/$deb" "$out/src/$pkg"-dbgsym_*.deb "$out/src/$pkg"_*.changes \
   "$out/src/$pkg"_*.buildinfo "$out/"
echo "build-deb: build/deb/$deb"
dpkg-deb --field "$out/$deb" Package Version Architecture Depends
dpkg-deb --contents "$out/$deb" | awk '{ print "  " $NF }' | grep -v '/$'
