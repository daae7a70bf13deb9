#!/usr/bin/env bash
# make bench-pgbouncer: the claim endpoint through PgBouncer (Debian
# bookworm's 1.18) against the module talking to PostgreSQL directly, with
# the settings each way needs, measured the way bench/run.sh measures the
# module (wrk, bench/claim.lua: a fresh key per claim, every run checked
# against the database, the claims put back after each run).  Five
# configurations, one nginx serving each on a port of its own (so that
# their pools are apart and stay open between runs):
#
#   direct          the defaults (statements prepared at connect,
#                   statement_timeout in the startup packet)
#   direct-noprep   annotation_queue_prepare off (unnamed statements)
#   direct-local    annotation_queue_statement_timeout local (set_config
#                   pipelined before each statement)
#   pgb-session     through PgBouncer, pool_mode session, statement_timeout
#                   local (prepare on)
#   pgb-transaction through PgBouncer, pool_mode transaction, prepare off,
#                   statement_timeout local
#   pgb124-transaction  only with PGBOUNCER_NEW=/path (a PgBouncer 1.21 or
#                   later: scripts/build-pgbouncer.sh builds trixie's
#                   1.24): through it, pool_mode transaction with
#                   max_prepared_statements = 100, prepare on (the
#                   default), statement_timeout local
#
# Each round runs every configuration at every level, the configurations
# in a rotated order each round (so that none always runs first, or right
# after another); the table shows the medians of the rounds.  PgBouncer's
# default_pool_size is the module's workers x pool size, so that it never
# makes nginx's connections wait: what differs is the hop and the work
# PgBouncer does for it.  See bench/README.md ("Through PgBouncer").
#
# Environment:
#   BENCH_QUICK=1        50k items, 3 s per run, 1 round (trying it out)
#   BENCH_ITEMS          items in the queue            (200000; quick 50000)
#   BENCH_KEYS           rater keys (10000 x duration, at least 10000)
#   BENCH_DURATION       seconds per measured run      (10; quick 3)
#   BENCH_WARMUP         seconds of warm-up per configuration and level (2)
#   BENCH_REPEAT         rounds, medians printed       (3; quick 1)
#   BENCH_CONNECTIONS    concurrency levels            ("8 64")
#   BENCH_CONFIGS        configurations to run         (all five, as above;
#                        six with PGBOUNCER_NEW)
#   PGBOUNCER_NEW        a PgBouncer 1.21+ for pgb124-transaction
#   BENCH_POOL_SIZE      annotation_queue_pool_size    (8 per worker)
#   BENCH_WORKERS        nginx worker_processes        (2)
#   BENCH_PGB_POOL       PgBouncer's default_pool_size (workers x pool size)
#   BENCH_KEEP=1         keep the work directory (logs, wrk outputs)
#   MODULE               the module .so (build/ngx_http_annotation_queue_module.so)
#   BENCH_COMMIT         the source named in the table (git describe)
#
# Exits 1 on any violation of bench/lib.sh's checks (an item claimed or
# answered twice, a key holding two items, a non-2xx answer, a socket
# error, an error-log line).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
NGINX=${NGINX:-/usr/sbin/nginx}
MODULE=${MODULE:-$top/build/ngx_http_annotation_queue_module.so}
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
PGBOUNCER_NEW=${PGBOUNCER_NEW:-}

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    ITEMS=${BENCH_ITEMS:-50000}
    DURATION=${BENCH_DURATION:-3}
    REPEAT=${BENCH_REPEAT:-1}
else
    ITEMS=${BENCH_ITEMS:-200000}
    DURATION=${BENCH_DURATION:-10}
    REPEAT=${BENCH_REPEAT:-3}
fi
WARMUP=${BENCH_WARMUP:-2}
default_keys=$((DURATION * 10000))
[ "$default_keys" -ge 10000 ] || default_keys=10000
KEYS=${BENCH_KEYS:-$default_keys}
LEVELS=${BENCH_CONNECTIONS:-"8 64"}
default_configs="direct direct-noprep direct-local pgb-session pgb-transaction"
[ -z "$PGBOUNCER_NEW" ] || default_configs+=" pgb124-transaction"
CONFIGS=${BENCH_CONFIGS:-$default_configs}
POOL=${BENCH_POOL_SIZE:-8}
WORKERS=${BENCH_WORKERS:-2}
PGB_POOL=${BENCH_PGB_POOL:-$((WORKERS * POOL))}
THREADS=2

. "$top/bench/lib.sh"

# --- what the bench needs ----------------------------------------------------

bench_needs
if [ ! -x "$PGBOUNCER" ]; then
    [ "$(id -u)" -eq 0 ] || die "missing pgbouncer: install it (as root)"
    log "installing pgbouncer"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        pgbouncer >/dev/null
fi

for cfg in $CONFIGS; do
    case "$cfg" in
    direct|direct-noprep|direct-local|pgb-session|pgb-transaction) ;;
    pgb124-transaction)
        [ -n "$PGBOUNCER_NEW" ] || die "pgb124-transaction needs PGBOUNCER_NEW=/path/to/pgbouncer"
        [ -x "$PGBOUNCER_NEW" ] || die "PGBOUNCER_NEW: $PGBOUNCER_NEW is missing (scripts/build-pgbouncer.sh)"
        ;;
    *) die "unknown configuration $cfg" ;;
    esac
done

# --- work directory, PostgreSQL, PgBouncers, cleanup ------------------------

bench_workdir aq-bench-pgbouncer
pgb_pids=()
pgb_stop_all() {
    local p
    for p in "${pgb_pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
}
# bench_cleanup reads the exit status first: keep it for it
trap 'rc=$?; pgb_stop_all; (exit $rc); bench_cleanup' EXIT

commit=${BENCH_COMMIT:-$(git -C "$top" describe --always --dirty 2>/dev/null || echo unknown)}
log "$(date -u '+%F %T UTC'): items=$ITEMS keys=$KEYS duration=${DURATION}s warmup=${WARMUP}s" \
    "rounds=$REPEAT levels='$LEVELS' pool=$POOL x $WORKERS workers, PgBouncer pool $PGB_POOL"
pg_max=$((5 * WORKERS * POOL + 2 * PGB_POOL + 20))
dsn=$(PG_MAX_CONNECTIONS=$pg_max "$top/scripts/pg.sh" start "$work/pg")
log "PostgreSQL: $dsn (max_connections=$pg_max)"
read -r pg_port < "$work/pg/port"

psql_() { psql -X -qtA -v ON_ERROR_STOP=1 -d "$dsn" "$@"; }

free_port() {
    perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1", LocalPort => 0)->sockport'
}

# pgb_start NAME MODE [BINARY [MORE]]: a PgBouncer (BINARY, $PGBOUNCER by
# default) in front of the bench's PostgreSQL (as the postgres user when
# root: it refuses root), auth trust, no unix socket, MORE lines in its
# [pgbouncer] section; sets pgb_port[NAME], pgb_pid[NAME].
declare -A pgb_port pgb_pid
pgb_start() {
    local name=$1 mode=$2 bin=${3:-$PGBOUNCER} more=${4:-} d=$work/pgb-$1 port i
    port=$(free_port)
    mkdir -p "$d"
    cat > "$d/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $d/userlist.txt
admin_users = postgres
pool_mode = $mode
default_pool_size = $PGB_POOL
max_client_conn = 1000
logfile = $d/pgbouncer.log
pidfile = $d/pgbouncer.pid
log_connections = 0
log_disconnections = 0
$more
INI
    echo '"postgres" ""' > "$d/userlist.txt"
    if [ "$(id -u)" -eq 0 ]; then
        chown -R postgres: "$d"
        runuser -u postgres -- "$bin" -d -q "$d/pgbouncer.ini"
    else
        "$bin" -d -q "$d/pgbouncer.ini"
    fi
    for i in $(seq 100); do
        psql -X -qtA -h 127.0.0.1 -p "$port" -U postgres -d pgbouncer -c 'SHOW VERSION' \
            >/dev/null 2>&1 && break
        [ "$i" -lt 100 ] || die "PgBouncer $name does not answer on $port: $(cat "$d/pgbouncer.log")"
        sleep 0.1
    done
    pgb_port[$name]=$port
    pgb_pid[$name]=$(cat "$d/pgbouncer.pid")
    pgb_pids+=("${pgb_pid[$name]}")
    log "PgBouncer $("$bin" --version | awk 'NR == 1 {print $2}') $name: pool_mode $mode" \
        "on 127.0.0.1:$port (pid ${pgb_pid[$name]})${more:+; $more}"
}

# --- data: one organisation, one queue, ITEMS items, KEYS keys -------------

t0=$(date +%s.%N)
read -r org queue < <(bench_org_queue)
bench_items "$queue" 1 "$ITEMS"
bench_keys "$org" "$KEYS"
psql_ <<'SQL'
VACUUM (FREEZE, ANALYZE) annotation_queue.items;
VACUUM (FREEZE, ANALYZE) annotation_queue.api_keys;
VACUUM (FREEZE, ANALYZE) bench.keys;
CHECKPOINT;
SQL
psql_ -c "\\copy (SELECT key FROM bench.keys ORDER BY i) TO '$work/keys.txt'"
[ "$(wc -l < "$work/keys.txt")" -eq "$KEYS" ] || die "keys.txt has not $KEYS lines"
log "loaded $ITEMS items and $KEYS keys in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s"

case " $CONFIGS " in *" pgb-session "*) pgb_start session session ;; esac
case " $CONFIGS " in *" pgb-transaction "*) pgb_start transaction transaction ;; esac
case " $CONFIGS " in *" pgb124-transaction "*)
    pgb_start new-transaction transaction "$PGBOUNCER_NEW" 'max_prepared_statements = 100' ;;
esac

# --- nginx: one server per configuration --------------------------------

declare -A port_of dsn_of settings_of
dsn_of[direct]=$dsn
dsn_of[direct-noprep]=$dsn
dsn_of[direct-local]=$dsn
settings_of[direct]=
settings_of[direct-noprep]='annotation_queue_prepare off;'
settings_of[direct-local]='annotation_queue_statement_timeout local;'
settings_of[pgb-session]='annotation_queue_statement_timeout local;'
settings_of[pgb-transaction]='annotation_queue_prepare off; annotation_queue_statement_timeout local;'
settings_of[pgb124-transaction]='annotation_queue_statement_timeout local;'
[ -z "${pgb_port[session]:-}" ] ||
    dsn_of[pgb-session]="host=127.0.0.1 port=${pgb_port[session]} user=postgres dbname=annotation_queue"
[ -z "${pgb_port[transaction]:-}" ] ||
    dsn_of[pgb-transaction]="host=127.0.0.1 port=${pgb_port[transaction]} user=postgres dbname=annotation_queue"
[ -z "${pgb_port[new-transaction]:-}" ] ||
    dsn_of[pgb124-transaction]="host=127.0.0.1 port=${pgb_port[new-transaction]} user=postgres dbname=annotation_queue"

mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
status_port=$(free_port)
servers=
for cfg in $CONFIGS; do
    port_of[$cfg]=$(free_port)
    servers+="
    server {
        listen 127.0.0.1:${port_of[$cfg]} backlog=4096;
        annotation_queue_database \"${dsn_of[$cfg]}\";
        ${settings_of[$cfg]}

        location = /api/v1/annotations/queue {
            annotation_queue_claim;
        }
    }
"
done
cat > "$work/nginx/nginx.conf" <<CONF
load_module $MODULE;

worker_processes $WORKERS;
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

    annotation_queue_pool_size $POOL;
$servers
    server {
        listen 127.0.0.1:$status_port;
        location = /bench/status {
            annotation_queue_status;
        }
    }
}
CONF
"$NGINX" -q -t -p "$work/nginx" -c nginx.conf
"$NGINX" -p "$work/nginx" -c nginx.conf
for _ in $(seq 50); do [ -s "$work/nginx/logs/nginx.pid" ] && break; sleep 0.1; done
nginx_pid=$(cat "$work/nginx/logs/nginx.pid")
status_url=http://127.0.0.1:$status_port/bench/status
errlog=$work/nginx/logs/error.log
url_of() { echo "http://127.0.0.1:${port_of[$1]}/api/v1/annotations/queue"; }

# --- between runs (as bench/run.sh) ---------------------------------------

reset() {
    psql_ <<'SQL' >/dev/null
UPDATE annotation_queue.items
   SET status = 'available', claimed_by = NULL, claimed_at = NULL,
       lease_expires_at = NULL, attempts = 0
 WHERE status = 'claimed';
VACUUM annotation_queue.items;
CHECKPOINT;
SQL
}

# one claim by hand per configuration, to see that it works
key1=$(sed -n 1p "$work/keys.txt")
for cfg in $CONFIGS; do
    answer=$(curl -s -w ' HTTP %{http_code}' -X POST "$(url_of "$cfg")" \
                  -H "Authorization: Bearer $key1" -H 'Content-Type: application/json' \
                  -d "{\"queue_id\": \"$queue\"}")
    log "sanity claim, $cfg: ${answer:0:60}... ${answer: -8}"
    case "$answer" in *'HTTP 200') ;; *) die "the sanity claim of $cfg failed: $answer" ;; esac
    reset
done

HZ=$(getconf CLK_TCK)
proc_ticks() { if [ -n "${1:-}" ]; then awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; else echo 0; fi; }

# run CFG CONNS SECONDS LABEL -> "claims_per_s p50_ms p99_ms errors pgbouncer_us_per_claim detail"
run() {
    local cfg=$1 c=$2 d=$3 label=$4 out ids l0 pid= k0 k1
    case "$cfg" in
    pgb-session) pid=${pgb_pid[session]} ;;
    pgb-transaction) pid=${pgb_pid[transaction]} ;;
    pgb124-transaction) pid=${pgb_pid[new-transaction]} ;;
    esac
    ids=$work/ids-$cfg-$c-$(date +%s%N)
    l0=$(errlog_lines)
    k0=$(proc_ticks "$pid")
    out=$(BENCH_KEYFILE="$work/keys.txt" BENCH_QUEUE="$queue" BENCH_THREADS=$THREADS \
          BENCH_IDS="$ids" \
          wrk -t "$THREADS" -c "$c" -d "${d}s" --timeout 10s \
              -s "$top/bench/claim.lua" "$(url_of "$cfg")" 2>&1) || { echo "$out" >&2; die "wrk failed"; }
    k1=$(proc_ticks "$pid")
    bench_quiesce
    echo "$out" > "$work/wrk-$cfg-$c-$(date +%s%N).out"
    local ok non200 sockerr dur p50 p99 nv
    ok=$(bench_wrk_value status_200 "$out"); non200=$(bench_wrk_value non200 "$out")
    sockerr=$(bench_wrk_value socket_errors "$out"); dur=$(bench_wrk_value duration_us "$out")
    p50=$(bench_wrk_value p50_us "$out"); p99=$(bench_wrk_value p99_us "$out")
    read -r _ _ _ _ nv <<<"$(bench_check_module "$label" "$queue" "$c" "$out" "$ids" "$l0")"
    rm -f "$ids".*
    reset
    local detail="statuses=$(bench_wrk_value statuses "$out") load=$(cut -d' ' -f1 /proc/loadavg)"
    [ "$nv" -eq 0 ] || detail+=" VIOLATIONS=$nv"
    printf '%s %s %s %s %s %s\n' \
        "$(awk -v n="$ok" -v d="$dur" 'BEGIN {printf "%.1f", n * 1000000 / d}')" \
        "$(awk -v v="$p50" 'BEGIN {printf "%.2f", v / 1000}')" \
        "$(awk -v v="$p99" 'BEGIN {printf "%.2f", v / 1000}')" \
        "$((non200 + sockerr))" \
        "$(awk -v a="$k0" -v b="$k1" -v n="$ok" -v hz="$HZ" \
               'BEGIN {if (n <= 0) n = 1; printf "%.0f", (b - a) * 1e6 / hz / n}')" \
        "$detail"
}

# --- the rounds ------------------------------------------------------------

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for c in $LEVELS; do
    for cfg in $CONFIGS; do
        log "--- warm-up: $cfg at $c connections, ${WARMUP}s"
        run "$cfg" "$c" "$WARMUP" "$cfg $c conns warm-up" >/dev/null
    done
done

declare -A T P50 P99 E PGB
read -r -a cfgs <<<"$CONFIGS"
n=${#cfgs[@]}
for r in $(seq "$REPEAT"); do
    for c in $LEVELS; do
        for i in $(seq 0 $((n - 1))); do
            cfg=${cfgs[$(( (i + r - 1) % n ))]}
            line=$(run "$cfg" "$c" "$DURATION" "$cfg $c conns round $r")
            read -r t p50 p99 e pgb detail <<<"$line"
            log "round $r, $c conns, $cfg: ${t}/s p50 ${p50} ms p99 ${p99} ms errors $e" \
                "pgbouncer cpu ${pgb} us/claim; $detail"
            T[$cfg,$c]+="$t " P50[$cfg,$c]+="$p50 " P99[$cfg,$c]+="$p99 "
            E[$cfg,$c]+="$e " PGB[$cfg,$c]+="$pgb "
        done
    done
done

# --- the table ------------------------------------------------------------

echo
pgb_versions=$("$PGBOUNCER" --version | awk 'NR == 1 {print $2}')
[ -z "$PGBOUNCER_NEW" ] || pgb_versions+=" and $("$PGBOUNCER_NEW" --version | awk 'NR == 1 {print $2}') (pgb124-)"
echo "annotation queue claims through PgBouncer $pgb_versions, $(date -u '+%F %H:%M UTC'), $(nproc) cores," \
     "load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "module $MODULE, source $commit"
echo "items=$ITEMS keys=$KEYS ${DURATION}s per run, medians of $REPEAT rounds; nginx $WORKERS workers," \
     "pool $POOL per worker; PgBouncer default_pool_size $PGB_POOL; wrk -t$THREADS -c <conns>"
echo
printf '| %5s | %-18s | %9s | %6s | %6s | %6s | %9s | %13s |\n' conns configuration \
    "claims/s" "p50 ms" "p99 ms" errors "/ direct" "pgbouncer us"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' ------: :------------------- ----------: -------: -------: \
    -------: ----------: --------------:
for c in $LEVELS; do
    base=
    for cfg in $CONFIGS; do
        # shellcheck disable=SC2086
        t=$(median ${T[$cfg,$c]}) p50=$(median ${P50[$cfg,$c]}) p99=$(median ${P99[$cfg,$c]})
        # shellcheck disable=SC2086
        e=$(sum ${E[$cfg,$c]}) pgb=$(median ${PGB[$cfg,$c]})
        [ "$cfg" != direct ] || base=$t
        rel=-
        [ -z "$base" ] || rel=$(awk -v a="$t" -v b="$base" 'BEGIN {printf "%.2f", (b > 0) ? a / b : 0}')
        case "$cfg" in pgb-*|pgb124-*) ;; *) pgb=- ;; esac
        printf '| %5s | %-18s | %9.0f | %6.2f | %6.2f | %6s | %9s | %13s |\n' \
            "$c" "$cfg" "$t" "$p50" "$p99" "$e" "$rel" "$pgb"
    done
done
echo
echo "/ direct: claims/s over the direct configuration's (medians); pgbouncer us: PgBouncer's CPU"
echo "per claim (user + system), median; errors: non-200 + socket errors, summed over the rounds"
n=$(log_problems)
echo "nginx error log: $n lines at error level or above"
if [ "$n" -gt 0 ]; then
    grep -E '\[(error|crit|alert|emerg)\]' "$errlog" \
        | sed -E 's/^[0-9\/: ]+\[/[/; s/[0-9]+#[0-9]+: \*?[0-9]* ?//' | sort | uniq -c | sort -rn | head -10
fi
bench_verdict || exit 1
