#!/usr/bin/env bash
# Worker heap under sustained real claims: every request claims an item
# with a fresh key (one key per claim, all made before the run), so each
# runs the whole claim path (key, body, pool, statement, UPDATE, answer).
# Each nginx worker's RssAnon (/proc/PID/status: the heap and other private
# anonymous memory, what a leak grows; there is no swap) is sampled after a
# warm-up at the same concurrency and again after the run, both times with
# nginx idle; the script fails if a worker grew by more than the bound.
# See bench/README.md ("Worker memory").
#
#   bash bench/rss.sh            (after make; installs wrk, curl if missing)
#
# Environment:
#   BENCH_RSS_SECONDS      the measured run (120 s)
#   BENCH_RSS_WARMUP       the warm-up before the first sample (20 s)
#   BENCH_RSS_CONNECTIONS  wrk connections (32: more than the 2 x 8 pool
#                          connections, so claims also wait and batch)
#   BENCH_RSS_BOUND_KB     the most a worker's RssAnon may grow from the
#                          first sample to the last (2048 kB)
#   BENCH_RSS_STEP         seconds between the samples printed during the
#                          run (20)
#   BENCH_WORKERS          nginx worker_processes (2)
#   BENCH_POOL_SIZE        annotation_queue_pool_size (8)
#   BENCH_KEEP=1           keep the work directory
#   MODULE                 the module .so
#
# Exit status: 0 within the bound; 1 a worker grew beyond it, or a
# violation of the checks every bench run gets (bench/lib.sh: an item
# claimed or answered twice, a non-2xx, a socket error, an error-log line,
# a worker that restarted); 2 inconclusive: too few claims per worker for
# the bound to reveal a leak of one allocation per claim (lengthen
# BENCH_RSS_SECONDS).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
NGINX=${NGINX:-/usr/sbin/nginx}
MODULE=${MODULE:-$top/build/ngx_http_annotation_queue_module.so}

SECONDS_=${BENCH_RSS_SECONDS:-120}
WARMUP=${BENCH_RSS_WARMUP:-20}
CONNS=${BENCH_RSS_CONNECTIONS:-32}
BOUND=${BENCH_RSS_BOUND_KB:-2048}
STEP=${BENCH_RSS_STEP:-20}
WORKERS=${BENCH_WORKERS:-2}
POOL=${BENCH_POOL_SIZE:-8}
THREADS=2
WARM_KEYS=$((WARMUP * 6000))   # more than this machine claims per second
CHUNK=32                       # bytes: glibc's smallest malloc chunk

. "$top/bench/lib.sh"

bench_needs
bench_workdir aq-bench-rss
t_start=$(date +%s)

dsn=$("$top/scripts/pg.sh" start "$work/pg")
psql_() { psql -X -qtA -v ON_ERROR_STOP=1 -d "$dsn" "$@"; }
log "$(date -u '+%F %T UTC'): ${WARMUP}s warm-up, ${SECONDS_}s run, $CONNS connections," \
    "$WORKERS workers x pool $POOL, bound ${BOUND} kB per worker; PostgreSQL $dsn"

read -r org queue < <(psql_ -F' ' <<'SQL'
WITH o AS (SELECT annotation_queue.create_org('rss') AS id)
SELECT o.id, annotation_queue.create_queue(o.id, 'rss') FROM o;
SQL
)

add_items() {   # n
    bench_items "$queue" 1 "$1"
}
keyfile() {   # file first last
    psql_ -c "\\copy (SELECT key FROM bench.keys WHERE i BETWEEN $2 AND $3 ORDER BY i) TO '$1'"
}

# --- warm-up data: keys and items for WARM_KEYS claims -------------------

t0=$(date +%s)
add_items "$((WARM_KEYS + 1))"
bench_keys "$org" "$((WARM_KEYS + 1))"
psql_ -c "VACUUM (ANALYZE) annotation_queue.items" -c "VACUUM (ANALYZE) annotation_queue.api_keys"
keyfile "$work/keys-warm.txt" 2 "$((WARM_KEYS + 1))"
log "warm-up data: $WARM_KEYS keys and items in $(( $(date +%s) - t0 )) s"

bench_start_nginx "$dsn" "$WORKERS" "$POOL"
workers() { ps -o pid= --ppid "$nginx_pid" | tr -d ' ' | sort -n; }
for _ in $(seq 100); do [ "$(workers | wc -l)" -ge "$WORKERS" ] && break; sleep 0.1; done
anon() {   # pid -> RssAnon kB
    awk '$1 == "RssAnon:" {print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}
sample() { local p; for p in $(workers); do printf '%s ' "$(anon "$p")"; done; }
# claims answered per worker slot, from the status page (both claim
# statements, single and batched, count as endpoint "claim")
claims_by_slot() {
    curl -s --max-time 5 "$status_url" | awk '
        /^annotation_queue_answers_total\{/ && /endpoint="claim"/ && /outcome="claimed"/ {
            if (match($0, /worker="[0-9]+"/)) n[substr($0, RSTART + 8, RLENGTH - 9)] += $NF
        }
        END {for (w in n) print w, n[w]}' | sort -n
}

key1=$(sed -n 1p <(psql_ -c "SELECT key FROM bench.keys WHERE i = 1"))
answer=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$url" \
              -H "Authorization: Bearer $key1" -d "{\"queue_id\": \"$queue\"}")
[ "$answer" = 200 ] || die "the sanity claim answered $answer"

drive() {   # label keyfile seconds ids -> wrk's output on stdout
    local out l0
    l0=$(errlog_lines)
    out=$(BENCH_KEYFILE="$2" BENCH_QUEUE="$queue" BENCH_THREADS=$THREADS \
          BENCH_IDS="$4" BENCH_KEYS_END=stop \
          wrk -t "$THREADS" -c "$CONNS" -d "${3}s" --timeout 10s \
              -s "$top/bench/claim.lua" "$url" 2>&1) || { echo "$out" >&2; die "wrk failed"; }
    bench_quiesce
    echo "$out" > "$work/wrk-$1.out"
    bench_check_module "$1" "$queue" "$CONNS" "$out" "$4" "$l0" >/dev/null
    echo "$out"
}

# --- warm-up: connections opened, statements prepared, batch buffers grown

pids0=$(workers | paste -sd' ')
log "workers $pids0, RssAnon kB at start: $(sample)"
out=$(drive warm-up "$work/keys-warm.txt" "$WARMUP" "$work/ids-warm")
rm -f "$work/ids-warm".*
ok=$(bench_wrk_value status_200 "$out")
rate=$((ok / WARMUP))
[ "$rate" -gt 0 ] || die "the warm-up claimed nothing"
log "warm-up: $ok claims ($rate/s$( [ "$(bench_wrk_value stopped_threads "$out")" -eq 0 ] || echo ', keys ran out: at least that' ))"

# --- the run's data: keys and items for 1.5 x the warm-up's rate ------------
#
# The warm-up's claims are put back first (as bench/run.sh does between
# runs), so that the checks after the run count the run's claims alone.

psql_ <<'SQL' >/dev/null
UPDATE annotation_queue.items
   SET status = 'available', claimed_by = NULL, claimed_at = NULL,
       lease_expires_at = NULL, attempts = 0
 WHERE status = 'claimed';
SQL

n=$((rate * SECONDS_ * 3 / 2))
first=$((WARM_KEYS + 2))
t0=$(date +%s)
add_items "$n"
bench_keys "$org" "$n" "$first"
psql_ -c "VACUUM (ANALYZE) annotation_queue.items" -c "VACUUM (ANALYZE) annotation_queue.api_keys"
keyfile "$work/keys-run.txt" "$first" "$((first + n - 1))"
log "run data: $n keys and items in $(( $(date +%s) - t0 )) s"

# --- the run -----------------------------------------------------------------

bench_quiesce
declare -A A0 A1
for p in $(workers); do A0[$p]=$(anon "$p"); done
slots0=$(claims_by_slot)
log "RssAnon kB after the warm-up (the reference): $(sample)"

drive run "$work/keys-run.txt" "$SECONDS_" "$work/ids-run" > "$work/run.stdout" &
drive_pid=$!
printf '%8s  %s\n' seconds "RssAnon kB per worker ($(workers | paste -sd' '))"
printf '%8s  %s\n' 0 "$(sample)"
t=0
while kill -0 "$drive_pid" 2>/dev/null; do
    for _ in $(seq "$((STEP * 10))"); do
        kill -0 "$drive_pid" 2>/dev/null || break
        sleep 0.1
    done
    t=$((t + STEP))
    kill -0 "$drive_pid" 2>/dev/null && printf '%8s  %s\n' "$t" "$(sample)"
done
wait "$drive_pid"
out=$(cat "$work/run.stdout")
bench_quiesce
for p in $(workers); do A1[$p]=$(anon "$p"); done
printf '%8s  %s\n' end "$(sample)"
slots1=$(claims_by_slot)

# --- verdict -----------------------------------------------------------------

ok=$(bench_wrk_value status_200 "$out")
dur=$(bench_wrk_value duration_us "$out")
echo
echo "run: $ok claims in ${SECONDS_}s ($(awk -v n="$ok" -v d="$dur" 'BEGIN {printf "%.0f", n * 1e6 / d}')/s)," \
     "$CONNS connections, fresh key per claim$( [ "$(bench_wrk_value stopped_threads "$out")" -eq 0 ] || echo ", keys ran out before the end")"
pids1=$(workers | paste -sd' ')
[ "$pids0" = "$pids1" ] ||
    bench_violation rss "the workers changed during the bench ($pids0 -> $pids1): one died"

min_claims=
slots=$(join -a1 -e0 -o 0,1.2,2.2 <(echo "$slots1") <(echo "$slots0") 2>/dev/null \
        | awk '{print $1, $2 - $3}')
echo "claims answered per worker slot (status page): $(awk '{printf "%s%s: %s", s, $1, $2; s = ", "}' <<<"$slots")"
min_claims=$(awk 'NR == 1 || $2 < m {m = $2} END {print m + 0}' <<<"$slots")
[ "$(wc -l <<<"$slots")" -ge "$WORKERS" ] || min_claims=0

echo "RssAnon per worker, kB: after the warm-up -> after the run (growth; bound $BOUND)"
for p in $(workers); do
    g=$(( ${A1[$p]:-0} - ${A0[$p]:-0} ))
    printf '  worker %s: %s -> %s (%+d)\n' "$p" "${A0[$p]:-?}" "${A1[$p]:-?}" "$g"
    [ "$g" -le "$BOUND" ] ||
        bench_violation rss "worker $p: RssAnon grew by $g kB over the run, more than $BOUND kB"
done
floor=$(( BOUND * 1024 / CHUNK ))
echo "a leak of one ${CHUNK}-byte allocation per claim exceeds the bound after $floor claims per worker;" \
     "the least busy worker answered $min_claims"
echo "total time $(( $(date +%s) - t_start )) s"

bench_verdict || exit 1
if [ "$min_claims" -lt "$floor" ]; then
    echo "INCONCLUSIVE: $min_claims claims on the least busy worker, fewer than $floor:" \
         "lengthen BENCH_RSS_SECONDS"
    exit 2
fi
