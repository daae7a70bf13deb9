#!/usr/bin/env bash
# Build and install Citus 13.2.2 for PostgreSQL 15, for make test-citus and
# make bench-citus (see ../shared/vendor/README.md):
#
#   scripts/build-citus.sh        builds build/citus-13.2.2 and installs it
#                                 into PostgreSQL 15's lib and extension
#                                 directories (needs root)
#
# Idempotent: when PostgreSQL 15 already has the citus extension (an
# installed package, or an earlier run), it does nothing.
#
# Environment:
#   CITUS_TARBALL   the source (../shared/vendor/citus-13.2.2.tar.gz)
#   CITUS_PATCH     the PostgreSQL 15 minor-release patch beside it
#   PG_CONFIG       /usr/lib/postgresql/15/bin/pg_config
#   CITUS_FORCE=1   build and install again
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

VERSION=13.2.2
TARBALL=${CITUS_TARBALL:-$top/../shared/vendor/citus-$VERSION.tar.gz}
PATCH=${CITUS_PATCH:-$(dirname "$TARBALL")/citus-$VERSION-pg15-minor.patch}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
tree=$top/build/citus-$VERSION

log() { echo "build-citus: $*" >&2; }
die() { log "$*"; exit 1; }

[ -x "$PG_CONFIG" ] || die "no $PG_CONFIG (PostgreSQL 15 server)"
ext_dir=$("$PG_CONFIG" --sharedir)/extension
lib_dir=$("$PG_CONFIG" --pkglibdir)

if [ "${CITUS_FORCE:-0}" != 1 ] && [ -f "$ext_dir/citus.control" ] \
   && [ -f "$lib_dir/citus.so" ]; then
    log "citus is installed for PostgreSQL 15 ($(awk -F"'" \
        '/default_version/ {print $2}' "$ext_dir/citus.control"))"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "installing into $lib_dir needs root"
[ -f "$TARBALL" ] || die "no $TARBALL"

deps=(postgresql-server-dev-15 liblz4-dev libzstd-dev libcurl4-openssl-dev
      libkrb5-dev libselinux1-dev libxslt1-dev libpam0g-dev libreadline-dev)
missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' \
        || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
fi

t_start=$(date +%s)
rm -rf "$tree"
mkdir -p "$top/build"
tar -xzf "$TARBALL" -C "$top/build"
[ -f "$tree/configure" ] || die "no configure in $tree"
if [ -f "$PATCH" ]; then
    log "applying $(basename "$PATCH")"
    (cd "$tree" && patch -p1 -s < "$PATCH")
fi
log "configure (log: $tree/aq-configure.log)"
(cd "$tree" && ./configure PG_CONFIG="$PG_CONFIG" >aq-configure.log 2>&1) \
    || { tail -30 "$tree/aq-configure.log" >&2; die "configure failed"; }
log "make (log: $tree/aq-make.log)"
(cd "$tree" && nice -n 19 make -j2 >aq-make.log 2>&1) \
    || { tail -30 "$tree/aq-make.log" >&2; die "make failed"; }
(cd "$tree" && make install >aq-install.log 2>&1) \
    || { tail -30 "$tree/aq-install.log" >&2; die "make install failed"; }
log "Citus $VERSION built and installed in $(( $(date +%s) - t_start )) s"
