# What bench/run.sh (make bench) and bench/flat.sh (make bench-flat) share:
# sourced by them after they set top, PGBIN, NGINX and MODULE.
#
#   bench_needs [perf]            install wrk, pgbench, curl (and perf)
#   bench_workdir NAME            $work, and a cleanup on exit that stops
#                                 nginx ($nginx_pid) and PostgreSQL
#   bench_org_queue               "org queue": organisation and queue "bench"
#   bench_items QUEUE FROM TO     the bench's items FROM..TO of QUEUE
#   bench_keys ORG N [FIRST]      bench.keys: N keys of ORG, by index i from
#                                 FIRST (1), the plaintext (for wrk), the
#                                 digest (pgbench) and the api_keys id; and
#                                 bench.dirty (empty)
#   bench_statements              $work/claim.sql, $work/claim.pgbench (the
#                                 module's statement, from $BENCH_SQL_HEADER
#                                 or src/ngx_aq_sql.h) and
#                                 $work/minimal.pgbench (bench/minimal.sql)
#   bench_start_nginx DSN WORKERS POOL [DIRECTIVES]
#                                 $nginx_pid, $url, $status_url, $errlog;
#                                 DIRECTIVES go into the http block
#   bench_quiesce                 wait until nginx has no claim in flight
#   bench_check_module LABEL QUEUE CONNS WRK_OUTPUT IDS ERRLOG_LINE
#   bench_check_pgbench LABEL QUEUE TX RC FAILED ABORTED
#                                 the checks after a run, against the
#                                 database; violations go to
#                                 $work/violations; with BENCH_KEY_RANGE
#                                 ("FIRST LAST") set, only the claims of
#                                 those bench keys count (runs that do not
#                                 put the claims back: bench/dirty.sh)
#   bench_verdict                 print every violation; non-zero if any
#   log, die, median, sum, log_problems, errlog_lines

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

# An organisation "bench" and its queue "bench": prints "org queue" (psql_
# of the caller).
bench_org_queue() {
    psql_ -F' ' <<'SQL'
WITH o AS (SELECT annotation_queue.create_org('bench') AS id)
SELECT o.id, annotation_queue.create_queue(o.id, 'bench') FROM o;
SQL
}

# The bench's items: {"prompt", "answer", "model"} number from to of a
# queue, in one INSERT ... SELECT (psql_ of the caller).
bench_items() {   # queue from to
    psql_ -v queue="$1" -v from="$2" -v to="$3" <<'SQL'
INSERT INTO annotation_queue.items (queue_id, payload)
SELECT :'queue',
       jsonb_build_object('prompt', 'Rate the answer to question #' || g,
                          'answer', 'Benchmark answer ' || g || ': '
                                    || md5(g::text),
                          'model', 'bench-model')
  FROM generate_series(:from, :to) AS g;
SQL
}

# bench.dirty: items a state set up as claimed by other raters with an
# expired lease (bench/flat.sh), by kind; a run that takes one makes its
# attempts 2, not 1 (bench_check_db).  Empty in bench/run.sh and rss.sh.
bench_keys() {   # org n [first] (psql_ of the caller)
    psql_ -v org="$1" -v first="${3:-1}" -v last="$(( ${3:-1} + $2 - 1 ))" <<'SQL'
SET client_min_messages = warning;
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.keys (
    i       integer PRIMARY KEY,
    key     text    NOT NULL,
    digest  bytea   NOT NULL,
    id      uuid
);
CREATE TABLE IF NOT EXISTS bench.dirty (
    id      uuid    PRIMARY KEY,
    kind    text    NOT NULL
);
INSERT INTO bench.keys (i, key, digest)
SELECT g, k, annotation_queue.key_hash(k)
  FROM (SELECT g, annotation_queue.create_api_key(:'org', 'rater ' || g) AS k
          FROM generate_series(:first, :last) AS g) AS s;
-- the key's api_keys.id (what items.claimed_by holds), so that the checks
-- can count the claims of a range of keys
UPDATE bench.keys b
   SET id = a.id
  FROM annotation_queue.api_keys a
 WHERE a.key_hash = b.digest AND b.i BETWEEN :first AND :last;
SQL
}

# the module's statement, extracted from the header now: as it is (for
# PREPARE) and as a pgbench script with a new key per transaction
# (BENCH_SQL_HEADER: the header of the module's own source when MODULE was
# built from another commit, so that pgbench and EXPLAIN run its statement)
bench_statements() {
    local h=${BENCH_SQL_HEADER:-$top/src/ngx_aq_sql.h}
    "$top/bench/claim-sql.pl" "$h" > "$work/claim.sql"
    {
        echo '\set k :client_id + :nclients * :n + 1'
        echo '\set n :n + 1'
        "$top/bench/claim-sql.pl" --pgbench "$h"
    } > "$work/claim.pgbench"
    {
        echo '\set k :client_id + :nclients * :n + 1'
        echo '\set n :n + 1'
        grep -v '^--' "$top/bench/minimal.sql"
    } > "$work/minimal.pgbench"
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
    ${4:-}

    server {
        listen 127.0.0.1:$port backlog=4096;

        location = /api/v1/annotations/queue {
            annotation_queue_claim;
        }

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
    url=http://127.0.0.1:$port/api/v1/annotations/queue
    status_url=http://127.0.0.1:$port/bench/status
    errlog=$work/nginx/logs/error.log
}

log_problems() { grep -cE '\[(error|crit|alert|emerg)\]' "$errlog" || true; }
errlog_lines() { wc -l < "$errlog"; }

# --- after a run -------------------------------------------------------------
#
# When wrk stops it closes its connections, but the claims it had sent are
# still running (or waiting for a connection) in nginx and commit after it.
# The status page counts them (busy connections, waiting requests): wait
# until it shows none twice in a row, 10 s at most.

bench_in_flight() {
    curl -s --max-time 5 "$status_url" | awk '
        /^annotation_queue_(connections|waiting)\{/ && /worker="all"/ {
            seen = 1
            if ($0 !~ /state="(idle|connecting)"/) n += $NF
        }
        END {print seen ? n + 0 : "unknown"}'
}
bench_quiesce() {
    local i n= zeros=0
    for i in $(seq 200); do
        n=$(bench_in_flight)
        if [ "$n" = 0 ]; then
            zeros=$((zeros + 1))
            [ "$zeros" -lt 2 ] || return 0
        else
            zeros=0
        fi
        sleep 0.05
    done
    log "nginx still has claims in flight ($n) 10 s after the run"
}

# --- the checks ---------------------------------------------------------------
#
# After every run (warm-ups included) the claims are checked against the
# database, not only against the client's counts.  A violation is logged at
# once and appended to $work/violations; the run goes on, and bench_verdict,
# the last step of each script, prints them all and fails the script.  The
# checks run inside the drivers' command substitutions: the file, not a
# variable, carries them out.

bench_violation() {   # label what
    log "VIOLATION: $1: $2"
    printf '%s: %s\n' "$1" "$2" >> "$work/violations"
}

bench_verdict() {
    if [ -s "$work/violations" ]; then
        echo
        echo "FAILED: $(wc -l < "$work/violations") violation(s):"
        sed 's/^/  /' "$work/violations"
        return 1
    fi
    echo
    echo "PASSED: no item claimed twice or answered twice, no key holding two items," \
         "no error (non-2xx, socket error, timeout, error log line), no reused key"
}

# bench_check_db QUEUE -> claimed expired_taken claimed_twice keys_holding_two
#                         claimable
#   claimed           items held by the bench's keys (api_keys: the other
#                     raters of flat.sh's dirty state hold random uuids),
#                     or by the keys i FIRST..LAST of bench.keys when
#                     BENCH_KEY_RANGE="FIRST LAST" is set (bench/dirty.sh,
#                     whose runs keep the claims of the runs before)
#   expired_taken     of them, items of bench.dirty
#   claimed_twice     of them, items whose attempts exceed what one claim in
#                     the run gives: 1, or 2 for an item of bench.dirty
#                     (claimed once before by another rater); the reset
#                     after each run zeroes attempts (dirty.sh claims only
#                     items never claimed, or expired ones of bench.dirty),
#                     so attempts counts the claims of the run (with a
#                     version incremented each)
#   keys_holding_two  (queue, key) pairs with more than one claimed item
#   claimable         1 if QUEUE still has an item to claim (available, or
#                     claimed with an expired lease), else 0: a 409
#                     (no_items_available) is expected only at 0
# With BENCH_CHECK_QUEUE=1 the first four count QUEUE's items only (runs
# that claim from several queues at once: bench/citus.sh).
bench_check_db() {
    local first last holders="SELECT id FROM annotation_queue.api_keys"
    local only=true
    [ "${BENCH_CHECK_QUEUE:-0}" != 1 ] || only="i.queue_id = '$1'"
    if [ -n "${BENCH_KEY_RANGE:-}" ]; then
        read -r first last <<<"$BENCH_KEY_RANGE"
        holders="SELECT id FROM bench.keys WHERE i BETWEEN $((first)) AND $((last))"
    fi
    psql_ -F' ' -v queue="$1" -v holders="$holders" -v only="$only" <<'SQL'
WITH c AS (
    SELECT i.id, i.queue_id, i.claimed_by, i.attempts,
           d.id IS NOT NULL AS dirty
      FROM annotation_queue.items i
      LEFT JOIN bench.dirty d ON d.id = i.id
     WHERE i.status = 'claimed'
       AND i.claimed_by IN (:holders)
       AND :only
)
SELECT (SELECT count(*) FROM c),
       (SELECT count(*) FROM c WHERE dirty),
       (SELECT count(*) FROM c WHERE attempts > 1 + dirty::int),
       (SELECT count(*)
          FROM (SELECT 1 FROM c GROUP BY queue_id, claimed_by
                 HAVING count(*) > 1) AS two),
       (EXISTS (SELECT 1 FROM annotation_queue.items
                 WHERE queue_id = :'queue' AND status = 'available')
        OR EXISTS (SELECT 1 FROM annotation_queue.items
                    WHERE queue_id = :'queue' AND status = 'claimed'
                      AND lease_expires_at <= now()))::int;
SQL
}

# bench_check_ids QUEUE IDS -> answers duplicates mismatches
#   what wrk recorded (bench/claim.lua, BENCH_IDS: "<id> <version>" per 200)
#   against the items table: the 200s, the item ids answered more than once
#   (an item given to two keys), and the answers whose item is not now
#   claimed in QUEUE by a bench key with the version answered (a later claim
#   of the same item would have raised its version)
bench_check_ids() {
    {
        echo "CREATE TEMP TABLE seen (id uuid, version bigint);"
        echo "COPY seen FROM STDIN WITH (DELIMITER ' ');"
        cat "$2".* 2>/dev/null || true
        echo '\.'
        cat <<'SQL'
SELECT count(*), count(*) - count(DISTINCT s.id),
       count(*) FILTER (WHERE i.id IS NULL OR i.queue_id <> :'queue'
                              OR i.status <> 'claimed'
                              OR i.version <> s.version OR k.id IS NULL)
  FROM seen s
  LEFT JOIN annotation_queue.items i ON i.id = s.id
  LEFT JOIN annotation_queue.api_keys k ON k.id = i.claimed_by;
SQL
    } | psql_ -F' ' -v queue="$1"
}

bench_check_log() {   # label first_line: error-log lines at error or worse
    local n lines
    lines=$(tail -n +"$(( $2 + 1 ))" "$errlog" | grep -E '\[(error|crit|alert|emerg)\]' || true)
    [ -n "$lines" ] || return 0
    n=$(wc -l <<<"$lines")
    bench_violation "$1" "$n line(s) at error level or worse in nginx's error log, first: $(head -1 <<<"$lines" | cut -c1-300)"
}

bench_wrk_value() { awk -v k="$1" '$1 == "BENCH" && $2 == k {print $3}' <<<"$2"; }

# bench_check_module LABEL QUEUE CONNS WRK_OUTPUT IDS ERRLOG_LINE
#   after a wrk run of bench/claim.lua on QUEUE with CONNS connections (and
#   bench_quiesce): prints "claimed expired_taken claimed_twice
#   keys_holding_two violations".  IDS: the BENCH_IDS prefix of the run, or
#   "" if it recorded none.  ERRLOG_LINE: errlog_lines before the run.
bench_check_module() {
    local label=$1 q=$2 c=$3 out=$4 ids=$5 l0=$6 v0=0 v1
    [ ! -f "$work/violations" ] || v0=$(wc -l < "$work/violations")
    local ok sockerr reused unparsed statuses s n
    ok=$(bench_wrk_value status_200 "$out"); sockerr=$(bench_wrk_value socket_errors "$out")
    reused=$(bench_wrk_value reused "$out"); unparsed=$(bench_wrk_value unparsed "$out")
    statuses=$(bench_wrk_value statuses "$out")
    local claimed exp twice two claimable
    read -r claimed exp twice two claimable <<<"$(bench_check_db "$q")"
    for s in ${statuses//,/ }; do
        n=${s#*=}; s=${s%%=*}
        case "$s" in
        200) ;;
        409) [ "$claimable" -eq 0 ] ||
                 bench_violation "$label" "$n answer(s) 409 while the queue still had items to claim" ;;
        *) bench_violation "$label" "$n answer(s) $s" ;;
        esac
    done
    [ "${sockerr:-0}" -eq 0 ] ||
        bench_violation "$label" "$sockerr socket error(s): $(awk '$2 == "socket_detail" {print $3, $4, $5, $6}' <<<"$out")"
    [ "${reused:-0}" -eq 0 ] ||
        bench_violation "$label" "$reused request(s) reused a key (a resume, not a claim): raise the keys"
    [ "$claimed" -ge "$ok" ] ||
        bench_violation "$label" "$ok 200s but only $claimed items claimed by the bench's keys"
    [ "$claimed" -le "$((ok + c))" ] ||
        bench_violation "$label" "$claimed items claimed for $ok 200s: more than the $c claims that can be in flight when wrk stops"
    [ "$twice" -eq 0 ] ||
        bench_violation "$label" "$twice item(s) claimed more than once in the run (attempts)"
    [ "$two" -eq 0 ] ||
        bench_violation "$label" "$two key(s) holding more than one item of a queue"
    if [ -n "$ids" ]; then
        [ "${unparsed:-0}" -eq 0 ] ||
            bench_violation "$label" "$unparsed 200s without an item id and version"
        local answers dups mism
        read -r answers dups mism <<<"$(bench_check_ids "$q" "$ids")"
        [ "$answers" -eq "$ok" ] ||
            bench_violation "$label" "wrk recorded $answers item ids for $ok 200s"
        [ "$dups" -eq 0 ] ||
            bench_violation "$label" "$dups 200s answered an item already answered to another request"
        [ "$mism" -eq 0 ] ||
            bench_violation "$label" "$mism 200s answered an item the database does not show claimed in this queue by a bench key with the version answered"
    fi
    [ -z "$l0" ] || bench_check_log "$label" "$l0"
    v1=0
    [ ! -f "$work/violations" ] || v1=$(wc -l < "$work/violations")
    echo "$claimed $exp $twice $two $((v1 - v0))"
}

# bench_check_pgbench LABEL QUEUE TX RC FAILED ABORTED
#   after a pgbench run of $work/claim.pgbench on QUEUE (each transaction
#   one fresh key): prints "claimed expired_taken claimed_twice
#   keys_holding_two violations"
bench_check_pgbench() {
    local label=$1 q=$2 tx=${3:-0} rc=${4:-0} failed=${5:-0} aborted=${6:-0} v0=0 v1
    [ ! -f "$work/violations" ] || v0=$(wc -l < "$work/violations")
    local claimed exp twice two claimable
    read -r claimed exp twice two claimable <<<"$(bench_check_db "$q")"
    [ "$rc" -eq 0 ] || bench_violation "$label" "pgbench exited with $rc"
    [ "$((failed + aborted))" -eq 0 ] ||
        bench_violation "$label" "pgbench: $failed failed transaction(s), $aborted aborted client(s)"
    if [ "$claimed" -ne "$tx" ]; then
        if [ "$claimed" -lt "$tx" ] && [ "$claimable" -eq 0 ]; then
            log "$label: the queue ran out: $((tx - claimed)) transaction(s) found nothing to claim"
        else
            bench_violation "$label" "$tx transactions but $claimed items claimed by the bench's keys (each transaction claims with a fresh key)"
        fi
    fi
    [ "$twice" -eq 0 ] ||
        bench_violation "$label" "$twice item(s) claimed more than once in the run (attempts)"
    [ "$two" -eq 0 ] ||
        bench_violation "$label" "$two key(s) holding more than one item of a queue"
    v1=0
    [ ! -f "$work/violations" ] || v1=$(wc -l < "$work/violations")
    echo "$claimed $exp $twice $two $((v1 - v0))"
}
