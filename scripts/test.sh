#!/usr/bin/env bash
# Runs the Test::Nginx suites of t/ against the built module.
#
#   scripts/test.sh                  the suites of t/*.t (make test)
#   scripts/test.sh t/topology/*.t   the topology suites (make test-topology)
#   scripts/test.sh t/010-claim.t    some suites
#   scripts/test.sh -v t/020-auth.t  options are passed to prove
#
# One throwaway PostgreSQL cluster serves the whole run: t/lib/AQ.pm gives
# each suite its own database, copied from the cluster's "annotation_queue"
# database (sql/ applied).  Each suite gets its own nginx server root and
# port, so two runs never collide.  When a suite fails, the server roots
# (nginx.conf, error.log) and the PostgreSQL log are kept in t/servroot-failed/.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

module="$top/build/ngx_http_annotation_queue_module.so"
if [ ! -f "$module" ]; then
    echo "test.sh: $module is missing; run make first" >&2
    exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/aq-test.XXXXXX")
# pg.sh runs PostgreSQL as the postgres user when we are root: it must be
# able to reach its directory inside ours.
chmod 711 "$tmp"

cleanup() {
    "$top/scripts/pg.sh" stop "$tmp/pg" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The mutant lists (make test-mutants) must match the code they break: a
# list left behind when the code moved fails here, in a second.
"$top/scripts/mutants.sh" --check

AQ_TEST_PG_DSN=$("$top/scripts/pg.sh" start "$tmp/pg")
export AQ_TEST_PG_DSN
export AQ_TEST_SERVROOT_BASE="$tmp/servroot"
export TEST_NGINX_BINARY="${TEST_NGINX_BINARY:-/usr/sbin/nginx}"
export TEST_NGINX_LOAD_MODULES="$module"
mkdir -p "$AQ_TEST_SERVROOT_BASE"

# Without a file or directory among the arguments, run every suite.
targets=-r
for arg in "$@"; do
    if [ -e "$arg" ]; then
        targets=
    fi
done

rc=0
if [ -n "$targets" ]; then
    # t/*.t: the suites of make test (t/manual/ holds the long checks that
    # have make targets of their own)
    prove -I t/lib "$@" t/*.t || rc=$?
else
    prove -I t/lib "$@" || rc=$?
fi

if [ "$rc" -ne 0 ]; then
    rm -rf "$top/t/servroot-failed"
    mkdir -p "$top/t/servroot-failed"
    cp -r "$AQ_TEST_SERVROOT_BASE"/. "$top/t/servroot-failed/" 2>/dev/null || true
    cp "$tmp/pg/postgresql.log" "$top/t/servroot-failed/" 2>/dev/null || true
    echo "test.sh: failed; nginx server roots and the PostgreSQL log are in t/servroot-failed/" >&2
fi
exit "$rc"
