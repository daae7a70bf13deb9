#!/usr/bin/env bash
# A throwaway Citus cluster on this machine: a coordinator and two workers,
# for make test-citus and make bench-citus.
#
#   scripts/citus.sh start DIR      initdb (once) and start the three nodes,
#                                   create database "annotation_queue" on
#                                   each, register the workers, apply sql/
#                                   then sql/citus/ on the coordinator;
#                                   prints the coordinator's conninfo
#   scripts/citus.sh stop DIR       stop all three (immediate)
#   scripts/citus.sh stop-node DIR NODE    stop one (coordinator, worker1,
#   scripts/citus.sh start-node DIR NODE   worker2) / start it again
#   scripts/citus.sh port DIR NODE  the node's port
#
# Citus must be installed for PostgreSQL 15 (scripts/build-citus.sh).  The
# nodes listen on 127.0.0.1 and on unix sockets in DIR/<node>; as root they
# run as the postgres user, since initdb refuses root.
#
# Environment:
#   PG_MAX_CONNECTIONS   each node's max_connections (300)
#   CITUS_PG_OPTS        more -c options for every node
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
top=$(cd "$(dirname "$0")/.." && pwd)
NODES=(coordinator worker1 worker2)

as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1", LocalPort => 0)->sockport'
}

dsn() {
    echo "host=127.0.0.1 port=$(cat "$1/$2/port") user=postgres dbname=${3:-annotation_queue}"
}

psql_() {
    psql -X -q -v ON_ERROR_STOP=1 "$@"
}

start_node() {
    local dir=$1 node=$2 port
    port=$(cat "$dir/$node/port")
    if ! as_pg "$PGBIN/pg_ctl" -D "$dir/$node/data" status >/dev/null 2>&1; then
        as_pg "$PGBIN/pg_ctl" -D "$dir/$node/data" -l "$dir/$node/postgresql.log" -w \
            -o "-p $port -k $dir/$node -c listen_addresses=127.0.0.1 -c fsync=off -c shared_preload_libraries=citus -c max_connections=${PG_MAX_CONNECTIONS:-300} -c max_prepared_transactions=${PG_MAX_CONNECTIONS:-300} -c autovacuum_naptime=10s ${CITUS_PG_OPTS:-}" \
            start >/dev/null
    fi
}

stop_node() {
    local dir=$1 node=$2
    if [ -f "$dir/$node/data/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$dir/$node/data" -m immediate -w stop \
            >/dev/null 2>&1 || true
    fi
}

cmd=${1:-}
case "$cmd" in
start)
    dir=${2:?usage: citus.sh start DIR}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ -f "$($PGBIN/pg_config --pkglibdir)/citus.so" ] \
        || { echo "citus.sh: citus is not installed (scripts/build-citus.sh)" >&2; exit 1; }
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$dir"
        chmod 711 "$dir"
    fi
    fresh=0
    for node in "${NODES[@]}"; do
        if [ ! -f "$dir/$node/data/PG_VERSION" ]; then
            as_pg mkdir -p "$dir/$node"
            as_pg chmod 700 "$dir/$node"
            as_pg "$PGBIN/initdb" -D "$dir/$node/data" -U postgres -A trust \
                --no-sync -E UTF8 --locale=C >/dev/null
            free_port | as_pg tee "$dir/$node/port" >/dev/null
            fresh=1
        fi
        start_node "$dir" "$node"
    done
    if [ $fresh = 1 ]; then
        for node in "${NODES[@]}"; do
            psql_ -d "$(dsn "$dir" "$node" postgres)" \
                -c 'CREATE DATABASE annotation_queue' >/dev/null
            psql_ -d "$(dsn "$dir" "$node")" \
                -c 'CREATE EXTENSION citus' >/dev/null
        done
        c=$(dsn "$dir" coordinator)
        psql_ -d "$c" -c "SELECT citus_set_coordinator_host('127.0.0.1', $(cat "$dir/coordinator/port"))" >/dev/null
        for node in worker1 worker2; do
            psql_ -d "$c" -c "SELECT citus_add_node('127.0.0.1', $(cat "$dir/$node/port"))" >/dev/null
        done
        for f in "$top"/sql/[0-9]*.sql "$top"/sql/citus/*.sql; do
            PGOPTIONS="-c client_min_messages=error" psql_ -d "$c" -f "$f" >/dev/null
        done
    fi
    dsn "$dir" coordinator
    ;;
stop)
    dir=${2:?usage: citus.sh stop DIR}
    for node in "${NODES[@]}"; do
        stop_node "$dir" "$node"
    done
    ;;
stop-node)
    stop_node "${2:?usage: citus.sh stop-node DIR NODE}" "${3:?NODE}"
    ;;
start-node)
    start_node "${2:?usage: citus.sh start-node DIR NODE}" "${3:?NODE}"
    ;;
port)
    cat "${2:?usage: citus.sh port DIR NODE}/${3:?NODE}/port"
    ;;
*)
    echo "usage: citus.sh start DIR | stop DIR | stop-node DIR NODE | start-node DIR NODE | port DIR NODE" >&2
    exit 2
    ;;
esac
