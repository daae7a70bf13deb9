#!/usr/bin/env bash
# Install what building, running and testing the module needs, on Debian
# bookworm.  Idempotent: it does nothing when everything is already there.
#
# Test::Nginx is not in bookworm.  Its .deb (pure Perl) is fetched from the
# sid suite through a private apt configuration derived at run time from the
# system's own source stanza; sid is never added to the system's sources.
set -euo pipefail

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: run as root (or install the packages by hand)" >&2
        exit 1
    fi
}

pkgs=(build-essential nginx nginx-dev libpq-dev libjansson-dev libssl-dev
      postgresql-15 postgresql-contrib libdbd-pg-perl libjson-pp-perl
      libipc-run-perl libtext-diff-perl libtest-longstring-perl
      liblist-moreutils-perl libtest-base-perl curl
      libjson-validator-perl libmojolicious-perl libyaml-libyaml-perl openssl
      pgbouncer nghttp2-client libprotocol-http2-perl libio-socket-ssl-perl)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' \
        || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    need_root
    echo "install-deps: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if ! perl -MTest::Nginx::Socket -e 1 2>/dev/null; then
    need_root
    echo "install-deps: fetching libtest-nginx-perl from the sid suite"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/sources.list.d" "$tmp/lists/partial" "$tmp/cache/archives/partial"
    # Copy the first stanza of the system's Debian source, switching the suite.
    awk 'BEGIN { RS = ""; ORS = "\n\n" } NR == 1' \
        /etc/apt/sources.list.d/debian.sources \
        | sed -e 's/^Suites:.*/Suites: sid/' > "$tmp/sources.list.d/sid.sources"
    opts=(-o "Dir::Etc::sourcelist=/dev/null"
          -o "Dir::Etc::sourceparts=$tmp/sources.list.d"
          -o "Dir::State::lists=$tmp/lists"
          -o "Dir::Cache=$tmp/cache"
          -o "APT::Get::List-Cleanup=0")
    apt-get "${opts[@]}" update -qq
    (cd "$tmp" && apt-get "${opts[@]}" download libtest-nginx-perl)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tmp"/libtest-nginx-perl_*.deb >/dev/null
fi

# Debian's nginx package starts a system server on port 80 where it can; the
# project never needs it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q nginx 2>/dev/null; then
    systemctl stop nginx || true
fi

# So does pgbouncer's (on port 6432, enabled at boot); t/topology/160-pgbouncer.t and
# bench/pgbouncer.sh start PgBouncers of their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q pgbouncer 2>/dev/null; then
    systemctl stop pgbouncer || true
fi
if [ "$(id -u)" -eq 0 ] && command -v systemctl >/dev/null 2>&1 \
   && systemctl is-enabled -q pgbouncer 2>/dev/null; then
    systemctl disable -q pgbouncer 2>/dev/null || true
fi
exit 0
