#!/usr/bin/env bash
# Build a PgBouncer newer than bookworm's 1.18 (which cannot keep prepared
# statements in transaction mode) from Debian trixie's source package, for
# t/manual/pgbouncer-prepared.t and bench/pgbouncer.sh (PGBOUNCER_NEW):
#
#   scripts/build-pgbouncer.sh      prints the binary's path on stdout
#
# The source comes through a private apt configuration derived at run time
# from the system's own Debian stanza (/etc/apt/sources.list.d/
# debian.sources: its first stanza, as deb-src, suite trixie), the way
# scripts/install-deps.sh fetches Test::Nginx from sid; trixie is never
# added to the system's sources.  The build dependencies come from bookworm
# (libevent-dev, libc-ares-dev, libssl-dev, pkg-config); PgBouncer is built
# with its own ./configure && make, not Debian's packaging (its patches,
# Debian's security fixes among them, are applied by apt-get source), without
# docs, systemd or PAM.  Only the binary is kept:
#
#   build/pgbouncer-src/     the unpacked source package (and the .dsc)
#   build/pgbouncer/pgbouncer
#
# Idempotent: when build/pgbouncer/pgbouncer exists and says it is at least
# MIN_VERSION (1.21, the first to track protocol-level prepared statements
# in transaction mode: max_prepared_statements), it does nothing.
#
# Environment:
#   PGB_SUITE      the Debian suite to take the source from (trixie)
#   PGB_FORCE=1    build again even if the binary is there
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

SUITE=${PGB_SUITE:-trixie}
MIN_VERSION=1.21
src_dir=$top/build/pgbouncer-src
out_dir=$top/build/pgbouncer
binary=$out_dir/pgbouncer

log() { echo "build-pgbouncer: $*" >&2; }
die() { log "$*"; exit 1; }

# version_of BINARY: "1.24.1", or nothing
version_of() {
    "$1" --version 2>/dev/null | awk 'NR == 1 && $1 == "PgBouncer" {print $2}'
}

# version_ge A B: A >= B (dotted numbers)
version_ge() {
    [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$2" ]
}

if [ "${PGB_FORCE:-0}" != 1 ] && [ -x "$binary" ]; then
    v=$(version_of "$binary")
    if [ -n "$v" ] && version_ge "$v" "$MIN_VERSION"; then
        log "PgBouncer $v is built: $binary"
        echo "$binary"
        exit 0
    fi
    log "$binary says '${v:-nothing}': building again"
fi

t_start=$(date +%s)

# --- build dependencies, from bookworm -------------------------------------

deps=(build-essential pkg-config libevent-dev libc-ares-dev libssl-dev dpkg-dev)
missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' \
        || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: install them (as root)"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# --- the source package, through a private apt configuration ---------------

tmp=$(mktemp -d "${TMPDIR:-/tmp}/aq-pgb-apt.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/sources.list.d" "$tmp/lists/partial" "$tmp/cache/archives/partial"
# The first stanza of the system's Debian source, as deb-src of $SUITE.
awk 'BEGIN { RS = ""; ORS = "\n\n" } NR == 1' /etc/apt/sources.list.d/debian.sources \
    | sed -e "s/^Suites:.*/Suites: $SUITE/" -e 's/^Types:.*/Types: deb-src/' \
    > "$tmp/sources.list.d/$SUITE-src.sources"
grep -q "^Suites: $SUITE\$" "$tmp/sources.list.d/$SUITE-src.sources" \
    || die "no Debian stanza in /etc/apt/sources.list.d/debian.sources"
opts=(-o "Dir::Etc::sourcelist=/dev/null"
      -o "Dir::Etc::sourceparts=$tmp/sources.list.d"
      -o "Dir::State::lists=$tmp/lists"
      -o "Dir::Cache=$tmp/cache"
      -o "APT::Get::List-Cleanup=0"
      # the lists are in our private directory, which apt's _apt user
      # cannot reach: download as ourselves (apt would fall back to it,
      # with a warning)
      -o "APT::Sandbox::User=$(id -un)")
log "fetching the $SUITE source index"
apt-get "${opts[@]}" update -qq
pkg_version=$(apt-get "${opts[@]}" source --print-uris pgbouncer 2>/dev/null \
              | awk '$2 ~ /^pgbouncer_.*\.dsc$/ {print $2}' \
              | sed -E 's/^pgbouncer_(.*)\.dsc$/\1/')
[ -n "$pkg_version" ] || die "no pgbouncer source package in $SUITE"
upstream=${pkg_version%-*}
upstream=${upstream#*:}
log "pgbouncer $pkg_version from $SUITE"

rm -rf "$src_dir"
mkdir -p "$src_dir"
# apt checks every file against the signed index; dpkg-source then only
# warns that it cannot check the .dsc's own signature (no debian-keyring).
(cd "$src_dir" && apt-get "${opts[@]}" source -qq pgbouncer >"$src_dir/apt-source.log" 2>&1) \
    || { cat "$src_dir/apt-source.log" >&2; die "apt-get source pgbouncer failed"; }
tree=$(find "$src_dir" -mindepth 1 -maxdepth 1 -type d -name 'pgbouncer-*' | head -1)
[ -n "$tree" ] && [ -f "$tree/configure" ] || die "no unpacked source tree in $src_dir"

# --- ./configure && make (not Debian's packaging) --------------------------

log "configure (log: $tree/aq-configure.log)"
# c-ares for DNS as Debian's package has it (bookworm's 1.18 is recent
# enough); no systemd, PAM or docs (the man pages need pandoc)
(cd "$tree" && ./configure --prefix=/usr/local --with-cares --without-systemd \
     --without-pam >aq-configure.log 2>&1) \
    || { tail -30 "$tree/aq-configure.log" >&2; die "configure failed"; }
log "make (log: $tree/aq-make.log)"
(cd "$tree" && make -j"$(nproc)" pgbouncer >aq-make.log 2>&1) \
    || { tail -30 "$tree/aq-make.log" >&2; die "make failed"; }

mkdir -p "$out_dir"
cp "$tree/pgbouncer" "$binary.tmp"
mv -f "$binary.tmp" "$binary"
v=$(version_of "$binary")
[ -n "$v" ] && version_ge "$v" "$MIN_VERSION" \
    || die "the built binary says '${v:-nothing}', not $MIN_VERSION or later"
echo "$pkg_version" > "$out_dir/debian-source-version"
log "PgBouncer $v (Debian source $pkg_version) built in $(( $(date +%s) - t_start )) s: $binary"
echo "$binary"
