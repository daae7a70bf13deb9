#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for development, tests and benchmarks.
#
#   scripts/pg.sh start DIR [PORT]   initdb (once), start, create database
#                                    "annotation_queue" with sql/ applied
#                                    (with PG_REMAKE=1: made again when
#                                    sql/ changed since); prints the
#                                    conninfo on stdout
#   scripts/pg.sh stop DIR           stop it (immediate)
#   scripts/pg.sh apply CONNINFO     apply sql/ in order to a database
#
# The server listens on 127.0.0.1 and on a unix socket in DIR.  As root it
# runs as the postgres user, since initdb refuses root.
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
top=$(cd "$(dirname "$0")/.." && pwd)

as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 - <<'PY' 2>/dev/null || perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1", LocalPort => 0)->sockport'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
}

apply() {
    local dsn=$1 f
    for f in "$top"/sql/[0-9]*.sql; do
        psql -X -q -v ON_ERROR_STOP=1 -d "$dsn" -f "$f" >/dev/null
    done
}

cmd=${1:-}
case "$cmd" in
start)
    dir=${2:?usage: pg.sh start DIR [PORT]}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$dir"
        chmod 700 "$dir"
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust \
            --no-sync -E UTF8 --locale=C >/dev/null
    fi
    port=${3:-}
    if [ -f "$dir/port" ] && [ -z "$port" ]; then
        port=$(cat "$dir/port")
    fi
    [ -n "$port" ] || port=$(free_port)
    echo "$port" | as_pg tee "$dir/port" >/dev/null
    # autovacuum_naptime=10s: what README's "Running a busy queue" asks of
    # a server with a busy queue (sql/005_autovacuum.sql)
    if ! as_pg "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/postgresql.log" -w \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c autovacuum_naptime=10s -c max_connections=${PG_MAX_CONNECTIONS:-200}" \
            start >/dev/null
    fi
    dsn="host=127.0.0.1 port=$port user=postgres"
    # PG_REMAKE=1 (make run's cluster, kept between runs): a database made
    # from an older sql/ is made again: it is throwaway, and half-migrated
    # it would fail at the first statement that needs what is new.  Never
    # on a standby (read-only; its primary's database is the one that
    # counts)
    sum=$(cat "$top"/sql/[0-9]*.sql | sha256sum | cut -d' ' -f1)
    if [ "${PG_REMAKE:-0}" = 1 ] \
        && [ "$(psql -X -qtA -d "$dsn dbname=annotation_queue" \
                     -c 'SELECT NOT pg_is_in_recovery()' 2>/dev/null)" = t ] \
        && [ "$(cat "$dir/sql.sum" 2>/dev/null)" != "$sum" ]
    then
        echo "pg.sh: sql/ changed since $dir was made: database annotation_queue made again" >&2
        psql -X -q -d "$dsn dbname=postgres" \
             -c 'DROP DATABASE annotation_queue WITH (FORCE)' >/dev/null
    fi
    if ! psql -X -qtA -d "$dsn dbname=annotation_queue" -c 'SELECT 1' >/dev/null 2>&1; then
        psql -X -q -d "$dsn dbname=postgres" -c 'CREATE DATABASE annotation_queue' >/dev/null
        apply "$dsn dbname=annotation_queue"
        echo "$sum" | as_pg tee "$dir/sql.sum" >/dev/null
    fi
    echo "$dsn dbname=annotation_queue"
    ;;
stop)
    dir=${2:?usage: pg.sh stop DIR}
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    ;;
apply)
    apply "${2:?usage: pg.sh apply CONNINFO}"
    ;;
*)
    echo "usage: pg.sh start DIR [PORT] | stop DIR | apply CONNINFO" >&2
    exit 2
    ;;
esac
