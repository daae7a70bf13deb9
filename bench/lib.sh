# What bench/run.sh (make bench) and bench/flat.sh (make bench-flat) share:
# sourced by them after they set top, PGBIN, NGINX and MODULE.
#
#   bench_needs [perf]            install wrk, pgbench, curl (and perf)
#   bench_workdir NAME            $work, and a cleanup on exit that stops
#                                 nginx ($nginx_pid) and PostgreSQL
#   bench_keys ORG N              bench.keys: N keys of ORG, by index i, the
#                                 plaintext (for wrk) and the digest (pgbench)
#   bench_statements              $work/claim.sql and $work/claim.pgbench
#   bench_start_nginx DSN WORKERS POOL
#                                 $nginx_pid, $url, $errlog
#   log, die, median, sum, log_problems

log() { printf '%s\n' "bench: $*" >&2; }
die() { log "$*"; exit 1; }

median() {
    printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1}
        END {if (NR == 0) {print 0; exit}
             if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
sum() { printf '%s\n' "$@" | awk '{s += $1} END {print s + 0}'; }

bench_needs() {
    local need=()
    command -v wrk >/dev/null || need+=(wrk)
    [ -x "$PGBIN/pgbench" ] || need+=(postgresql-15 postgresql-contrib)
    command -v curl >/dev/null || need+=(curl)
    if [ "${1:-}" = perf ] && ! command -v perf >/dev/null; then
        need+=(linux-perf)
    fi
    if [ ${#need[@]} -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || die "missing ${need[*]}: install them (as root)"
        log "installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends "${need[@]}" >/dev/null
        }
    fi
    PGBENCH=$PGBIN/pgbench
    [ -f "$MODULE" ] || die "no module at $MODULE: run make first"
}

bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$nginx_pid" ]; then
        kill -QUIT "$nginx_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$nginx_pid" 2>/dev/null || break; sleep 0.1; done
    fi
    "$top/scripts/pg.sh" stop "$work/pg" || true
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        log "kept $work"
    else
        rm -rf "$work"
    fi
    exit $rc
}

bench_workdir() {
    work=$(mktemp -d "/tmp/$1.XXXXXX")
    chmod 755 "$work"
    nginx_pid=
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_keys() {   # org n (psql_ of the caller)
    psql_ -v org="$1" -v keys="$2" <<'SQL'
CREATE SCHEMA bench;
CREATE TABLE bench.keys (
    i       integer PRIMARY KEY,
    key     text    NOT NULL,
    digest  bytea   NOT NULL
);
INSERT INTO bench.keys (i, key, digest)
SELECT g, k, annotation_queue.key_hash(k)
  FROM (SELECT g, annotation_queue.create_api_key(:'org', 'rater ' || g) AS k
          FROM generate_series(1, :keys) AS g) AS s;
SQL
}

# the module's statement, extracted from the header now: as it is (for
# PREPARE) and as a pgbench script with a new key per transaction
bench_statements() {
    "$top/bench/claim-sql.pl" "$top/src/ngx_aq_sql.h" > "$work/claim.sql"
    {
        echo '\set k :client_id + :nclients * :n + 1'
        echo '\set n :n + 1'
        "$top/bench/claim-sql.pl" --pgbench "$top/src/ngx_aq_sql.h"
    } > "$work/claim.pgbench"
}

bench_start_nginx() {   # dsn workers pool
    local port conf_dsn
    port=$(perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1", LocalPort => 0)->sockport')
    mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
    conf_dsn=${1//\\/\\\\}
    conf_dsn=${conf_dsn//\"/\\\"}
    cat > "$work/nginx/nginx.conf" <<CONF
load_module $MODULE;

worker_processes $2;
error_log logs/error.log notice;
pid logs/nginx.pid;

events {
    worker_connections 4096;
}

http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;

    annotation_queue_database "$conf_dsn";
    annotation_queue_pool_size $3;

    server {
        listen 127.0.0.1:$port backlog=4096;

        location = /api/v1/annotations/queue {
            annotation_queue_claim;
        }
    }
}
CONF
    "$NGINX" -q -t -p "$work/nginx" -c nginx.conf
    "$NGINX" -p "$work/nginx" -c nginx.conf
    for _ in $(seq 50); do [ -s "$work/nginx/logs/nginx.pid" ] && break; sleep 0.1; done
    nginx_pid=$(cat "$work/nginx/logs/nginx.pid")
    url=http://127.0.0.1:$port/api/v1/annotations/queue
    errlog=$work/nginx/logs/error.log
}

log_problems() { grep -cE '\[(error|crit|alert|emerg)\]' "$errlog" || true; }
