#!/usr/bin/env bash
# The module with prepared statements through PgBouncer 1.21+ in transaction
# mode (t/manual/pgbouncer-prepared.t): builds trixie's PgBouncer
# (scripts/build-pgbouncer.sh, once; about a minute) and runs the suite with
# it (AQ_PGBOUNCER).
#
#   scripts/test-pgbouncer-new.sh              the built module (scripts/test.sh)
#   scripts/test-pgbouncer-new.sh -v           options go to prove
#   MODULE=/path/to/module.so scripts/test-pgbouncer-new.sh
#                                              another build of the module
#                                              (scripts/test.sh always loads
#                                              build/'s): the suite alone,
#                                              with prove, the same way
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

suite=t/manual/pgbouncer-prepared.t
binary=$("$top/scripts/build-pgbouncer.sh")
export AQ_PGBOUNCER=$binary

if [ -z "${MODULE:-}" ]; then
    exec "$top/scripts/test.sh" "$@" "$suite"
fi

[ -f "$MODULE" ] || { echo "test-pgbouncer-new: $MODULE is missing" >&2; exit 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/aq-test-pgb.XXXXXX")
chmod 711 "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/servroot"
rc=0
# the suite runs its own PostgreSQL cluster (AQ::Faults::own_cluster)
TMPDIR="$tmp" AQ_TEST_SERVROOT_BASE="$tmp/servroot" \
    TEST_NGINX_BINARY="${TEST_NGINX_BINARY:-/usr/sbin/nginx}" \
    TEST_NGINX_LOAD_MODULES="$MODULE" \
    prove -I t/lib "$@" "$suite" || rc=$?
if [ "$rc" -ne 0 ]; then
    rm -rf "$top/t/servroot-failed"
    mkdir -p "$top/t/servroot-failed"
    cp -r "$tmp/servroot"/. "$top/t/servroot-failed/" 2>/dev/null || true
    cp "$tmp"/aq-faults-*/pg/postgresql.log "$top/t/servroot-failed/" 2>/dev/null || true
    echo "test-pgbouncer-new: failed; nginx server roots and PgBouncer's logs are in" \
         "t/servroot-failed/" >&2
fi
exit "$rc"
