#!/usr/bin/env bash
# make bench-dirty: the claim in the states a real queue reaches (issue 9,
# item 2), reached through the module, against a clean queue on the same
# table at the same moments.  See bench/README.md ("Dirty states").
#
# The dirty queue, in the order it is made:
#   1. COMPLETED items (priorities 0-9), completed by SQL: the history;
#   2. EXPIRED items (priorities 0-1, mixed) claimed THROUGH NGINX with
#      fresh keys while the queue's lease is EXPIRY_LEASE seconds; their
#      leases then run out (the bench waits for it);
#   3. the queue's lease set to 1 day (as an operator would), LIVE items of
#      priorities 5-9 and the run's items of priorities 2-4, all enqueued
#      mixed (random order of seq);
#   4. the LIVE items claimed THROUGH NGINX with fresh keys (1 day lease):
#      every item of priorities 5-9, so that the run starts with LIVE live
#      claims above the head's priority (4) and EXPIRED expired leases below
#      it.
# The clean queue: the run's items alone (same priorities 2-4, same count
# at the start), nothing expired or completed, lease 1 day; nothing claimed
# but what a warm-up of WARMUP seconds claims just before the run (so that
# its pages are as warm as the dirty queue's after its setup).
#
# The run: PAIRS x LEVELS phases of PHASE seconds per queue (default 5 x
# (64, 8) x 60 s = 10 minutes per queue), the two queues alternating phase
# by phase at each level (clean then dirty, then dirty then clean at the
# next pair), never reset, no manual VACUUM (autovacuum as the schema sets
# it): every claim of the run stays a live claim, so the claims above the
# head keep growing.  Fresh key per claim (wrk + bench/claim.lua); keys and
# items are added between phases when the next phase could run short.
# Every phase and both setup phases are checked (bench/lib.sh, on the
# phase's own key range): no item claimed or answered twice, no key
# holding two items, no error, no reused key.
#
# A short try (about 2 minutes):
#   BENCH_DIRTY_LIVE=20000 BENCH_DIRTY_EXPIRED=5000 BENCH_DIRTY_COMPLETED=50000 \
#   BENCH_DIRTY_EXPIRY_LEASE=10 BENCH_DIRTY_PHASE=5 BENCH_DIRTY_PAIRS=2 \
#   BENCH_DIRTY_WARMUP=3 BENCH_DIRTY_RATE=1000 make bench-dirty
#
# Environment:
#   BENCH_DIRTY_LIVE        live claims made through nginx (500000)
#   BENCH_DIRTY_EXPIRED     expired claims made through nginx (100000)
#   BENCH_DIRTY_COMPLETED   completed items made by SQL (1000000)
#   BENCH_DIRTY_EXPIRY_LEASE  seconds of the expiring claims' lease (120)
#   BENCH_DIRTY_SETUP_CONNECTIONS  wrk connections of the setup claims (64)
#   BENCH_DIRTY_SETUP_TIMEOUT  seconds a setup phase may take (3600)
#   BENCH_DIRTY_PHASE       seconds per phase (60)
#   BENCH_DIRTY_PAIRS       rounds of LEVELS (5)
#   BENCH_DIRTY_LEVELS      wrk connections, alternating ("64 8")
#   BENCH_DIRTY_ITEMS       run items enqueued at first in each queue
#                           (300000; more are added as needed)
#   BENCH_DIRTY_WARMUP      seconds of the clean queue's warm-up (10): its
#                           pages and the pool as warm as the dirty queue's
#                           after the setup; checked, not counted
#   BENCH_DIRTY_RATE        the least claims/s the first phase's keys are
#                           made for (5000; then the best rate seen)
#   BENCH_DIRTY_CLEAN=0     no clean queue (the dirty queue's phases only)
#   BENCH_POOL_SIZE         annotation_queue_pool_size (8 per worker)
#   BENCH_WORKERS           nginx worker_processes (2)
#   BENCH_KEEP=1            keep the work directory (wrk outputs, plans,
#                           PostgreSQL's log with every autovacuum)
#   MODULE                  the module .so (build/ngx_http_annotation_queue_module.so)
#   BENCH_SQL_HEADER        the src/ngx_aq_sql.h MODULE was built from: the
#                           EXPLAINs run its NGX_AQ_CLAIM_SQL
#   BENCH_COMMIT            the source named in the summary
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
NGINX=${NGINX:-/usr/sbin/nginx}
MODULE=${MODULE:-$top/build/ngx_http_annotation_queue_module.so}

LIVE=${BENCH_DIRTY_LIVE:-500000}
EXPIRED=${BENCH_DIRTY_EXPIRED:-100000}
COMPLETED=${BENCH_DIRTY_COMPLETED:-1000000}
EXPIRY_LEASE=${BENCH_DIRTY_EXPIRY_LEASE:-120}
SETUP_CONNS=${BENCH_DIRTY_SETUP_CONNECTIONS:-64}
SETUP_TIMEOUT=${BENCH_DIRTY_SETUP_TIMEOUT:-3600}
PHASE=${BENCH_DIRTY_PHASE:-60}
PAIRS=${BENCH_DIRTY_PAIRS:-5}
LEVELS=${BENCH_DIRTY_LEVELS:-"64 8"}
ITEMS0=${BENCH_DIRTY_ITEMS:-300000}
WARMUP=${BENCH_DIRTY_WARMUP:-10}
RATE=${BENCH_DIRTY_RATE:-5000}
CLEAN=${BENCH_DIRTY_CLEAN:-1}
POOL=${BENCH_POOL_SIZE:-8}
WORKERS=${BENCH_WORKERS:-2}
THREADS=2
LEASE_MS=900000            # $3 of the claim; both queues have their own lease

. "$top/bench/lib.sh"
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
load1() { cut -d' ' -f1 /proc/loadavg; }

bench_needs
bench_workdir aq-bench-dirty

commit=${BENCH_COMMIT:-$(git -C "$top" describe --always --dirty 2>/dev/null || echo unknown)}
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
t_start=$(now)
log "$(date -u '+%F %T UTC'): live=$LIVE expired=$EXPIRED completed=$COMPLETED" \
    "phases=$PAIRS x ($LEVELS) x ${PHASE}s per queue, clean=$CLEAN, pool=$POOL x $WORKERS workers;" \
    "module $MODULE ($commit); load average $load_start"
dsn=$("$top/scripts/pg.sh" start "$work/pg")
log "PostgreSQL: $dsn"

psql_() { psql -X -qtA -v ON_ERROR_STOP=1 -d "$dsn" "$@"; }

# every autovacuum in PostgreSQL's log (counted per phase); the naptime is
# scripts/pg.sh's 10 s (README, "Running a busy queue")
psql_ <<'SQL' >/dev/null
ALTER SYSTEM SET log_autovacuum_min_duration = 0;
SELECT pg_reload_conf();
SQL

read -r org dq cq < <(psql_ -F' ' -v lease="$EXPIRY_LEASE seconds" <<'SQL'
WITH o AS (SELECT annotation_queue.create_org('bench') AS id)
SELECT o.id,
       annotation_queue.create_queue(o.id, 'dirty', :'lease'),
       annotation_queue.create_queue(o.id, 'clean', '1 day')
  FROM o;
SQL
)
QUEUES=(dirty)
[ "$CLEAN" = 0 ] || QUEUES=(clean dirty)
declare -A QID=([dirty]=$dq [clean]=$cq)

# --- keys: a pool of fresh keys, taken in ranges -----------------------------
#
# bench.keys i = 1..kmade exist; 1..kused have been handed to a driver.  A
# range is written to a key file for wrk; BENCH_KEY_RANGE makes the checks
# count the claims of that range alone (the claims of earlier phases stay).

kmade=0 kused=0
more_keys() {   # n
    local t1
    t1=$(now)
    bench_keys "$org" "$1" "$((kmade + 1))"
    kmade=$((kmade + $1))
    log "keys: $1 more created in $(elapsed "$t1") s ($kmade in all)"
}
take_keys() {   # n file -> kfirst klast (globals)
    if [ "$((kmade - kused))" -lt "$1" ]; then
        more_keys "$(( $1 * 3 - (kmade - kused) ))"
    fi
    kfirst=$((kused + 1)) klast=$((kused + $1))
    kused=$klast
    psql_ -c "\\copy (SELECT key FROM bench.keys WHERE i BETWEEN $kfirst AND $klast ORDER BY i) TO '$2'"
}

# --- items -------------------------------------------------------------------

payload="jsonb_build_object('prompt', 'Rate the answer to question #' || g,
                            'answer', 'Benchmark answer ' || g || ': ' || md5(g::text),
                            'model', 'bench-model')"
add_run_items() {   # queue n: priorities 2-4, mixed
    psql_ -v queue="$1" -v n="$2" <<SQL
INSERT INTO annotation_queue.items (queue_id, priority, payload)
SELECT :'queue', 2 + floor(random() * 3)::int, $payload
  FROM generate_series(1, :n) AS g;
SQL
}
available() {   # queue
    psql_ -v queue="$1" <<<"SELECT count(*) FROM annotation_queue.items WHERE queue_id = :'queue' AND status = 'available'"
}

# --- the state of a queue --------------------------------------------------------

state() {   # queue -> one line
    psql_ -F' ' -v queue="$1" <<'SQL'
WITH h AS (SELECT max(priority) AS p FROM annotation_queue.items
            WHERE queue_id = :'queue' AND status = 'available')
SELECT 'available=' || count(*) FILTER (WHERE status = 'available'),
       'head_priority=' || coalesce((SELECT p FROM h)::text, '-'),
       'live=' || count(*) FILTER (WHERE status = 'claimed' AND lease_expires_at > now()),
       'live_above_head=' || count(*) FILTER (WHERE status = 'claimed' AND lease_expires_at > now()
                                                AND priority > (SELECT p FROM h)),
       'expired=' || count(*) FILTER (WHERE status = 'claimed' AND lease_expires_at <= now()),
       'expired_priorities=' || coalesce(min(priority) FILTER (WHERE status = 'claimed' AND lease_expires_at <= now()) || '-'
                                || max(priority) FILTER (WHERE status = 'claimed' AND lease_expires_at <= now()), '-'),
       'completed=' || count(*) FILTER (WHERE status = 'completed'),
       'priorities=' || count(DISTINCT priority)
  FROM annotation_queue.items
 WHERE queue_id = :'queue';
SQL
}

# --- EXPLAIN (ANALYZE, BUFFERS) of claims ----------------------------------------
#
# As bench/flat.sh: the module's statement PREPAREd (bytea, uuid, int8),
# EXECUTEd 6 times with fresh keys (execution 1: a custom plan; from the
# 6th the plan cache may use the generic plan of the module's long-lived
# connections).  These claims stay (6 more live claims).  Summary in
# $explained: the statement's shared buffers hit/read and execution time,
# executions 1 and 6.  (Not in a subshell: take_keys counts the keys.)

explain() {   # label queue
    local f=$work/plan-$1.txt j
    take_keys 6 "$work/keys-explain-$1.txt"
    {
        echo "PREPARE claim(bytea, uuid, int8) AS"
        cat "$work/claim.sql"
        echo ";"
        for j in $(seq 0 5); do
            echo "SELECT digest AS d FROM bench.keys WHERE i = $((kfirst + j)) \\gset"
            echo "\\echo === execution $((j + 1))"
            echo "EXPLAIN (ANALYZE, BUFFERS) EXECUTE claim(:'d', '$2', $LEASE_MS);"
        done
    } | psql -X -q -A -t -v ON_ERROR_STOP=1 -d "$dsn" > "$f" 2>&1 || { cat "$f" >&2; die "EXPLAIN failed"; }
    explained=$(awk '
        function num(s, k) { if (match(s, k "=[0-9]+")) return substr(s, RSTART + length(k) + 1, RLENGTH - length(k) - 1); return 0 }
        /^=== execution/ {e = $3; top[e] = ""; next}
        /Planning:/ {planning = 1}
        /Buffers:/ && !planning && top[e] == "" {top[e] = num($0, "hit") "/" num($0, "read")}
        /Execution Time:/ {t[e] = $3; planning = 0}
        /Planning Time:/ {planning = 0}
        END {printf "exec 1: %s buffers hit/read, %s ms; exec 6: %s hit/read, %s ms\n",
                    top[1], t[1], top[6], t[6]}' "$f")
}

# --- data before nginx: completed items and the expiring claims' items -----------

t0=$(now)
psql_ -v queue="$dq" -v n="$COMPLETED" <<SQL
INSERT INTO annotation_queue.items (queue_id, priority, payload, status, version,
                                    attempts, claimed_at, completed_at, result)
SELECT :'queue', g % 10, $payload, 'completed', 1, 1,
       now() - interval '2 hours', now() - interval '1 hour', '{"score": 1}'
  FROM generate_series(1, :n) AS g;
INSERT INTO annotation_queue.items (queue_id, priority, payload)
SELECT :'queue', floor(random() * 2)::int, $payload
  FROM generate_series(1, $EXPIRED) AS g;
SQL
log "dirty queue: $COMPLETED completed items (SQL) and $EXPIRED items of priorities 0-1 in $(elapsed "$t0") s"
more_keys "$((EXPIRED + LIVE + 4 * SETUP_CONNS + 12))"   # drive_count takes 2 x conns more
psql_ -c "VACUUM (ANALYZE) annotation_queue.items" -c "VACUUM (ANALYZE) annotation_queue.api_keys" \
      -c "VACUUM (ANALYZE) bench.keys"

bench_statements
bench_start_nginx "$dsn" "$WORKERS" "$POOL"

# a well-formed key that does not exist: the database answers, no item moves
bogus=aqk_$(printf '%064d' 0)$(psql_ -c "SELECT annotation_queue.key_checksum(repeat('0', 64))")
answer=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$url" \
              -H "Authorization: Bearer $bogus" -H 'Content-Type: application/json' \
              -d "{\"queue_id\": \"$dq\"}")
log "sanity request (unknown key): HTTP $answer"
[ "$answer" = 401 ] || die "the sanity request answered $answer, not 401"

claimed_total() {   # the status page's claims answered, all workers
    curl -s --max-time 5 "$status_url" | awk '
        /^annotation_queue_answers_total\{/ && /worker="all"/ && /endpoint="claim"/ && /outcome="claimed"/ {s += $NF}
        END {print s + 0}'
}

# --- a driver that claims N items (the setup) --------------------------------------
#
# wrk with N + 2 x conns fresh keys (a thread that stops when its keys run
# out leaves the requests it had not written yet unsent: up to a request per
# connection), ended by SIGINT (wrk then prints its summary and done() as
# after -d) once nginx has answered N claims, or the claims stopped moving
# for 15 s, or SETUP_TIMEOUT.  So at least N claims, and at most about
# conns more (requests in flight at the SIGINT; a request beyond the items
# there are gets 409 with the queue empty).  Checked like every run.  The
# rate goes to $driven (not a subshell: take_keys counts the keys).

drive_count() {   # label queue conns n
    local label=$1 q=$2 c=$3 n=$4 ids=$work/ids-setup l0 base cur last moved t1 wpid out
    local kf=$work/keys-setup.txt
    take_keys "$((n + 2 * c))" "$kf"
    l0=$(errlog_lines)
    base=$(claimed_total) last=$base moved=$(date +%s) t1=$(date +%s)
    BENCH_KEYFILE="$kf" BENCH_QUEUE="$q" BENCH_THREADS=$THREADS BENCH_IDS="$ids" \
        BENCH_KEYS_END=stop wrk -t "$THREADS" -c "$c" -d "${SETUP_TIMEOUT}s" --timeout 10s \
        -s "$top/bench/claim.lua" "$url" > "$work/wrk-$label.out" 2>&1 &
    wpid=$!
    while kill -0 "$wpid" 2>/dev/null; do
        sleep 1
        cur=$(claimed_total)
        if [ "$cur" != "$last" ]; then last=$cur moved=$(date +%s); fi
        [ "$((cur - base))" -lt "$n" ] || break
        [ "$(( $(date +%s) - moved ))" -lt 15 ] || break
        [ "$(( $(date +%s) - t1 ))" -lt "$SETUP_TIMEOUT" ] || break
    done
    kill -INT "$wpid" 2>/dev/null || true
    wait "$wpid" || die "wrk failed: $(tail -5 "$work/wrk-$label.out")"
    bench_quiesce
    out=$(cat "$work/wrk-$label.out")
    local ok dur nv claimed
    ok=$(bench_wrk_value status_200 "$out"); dur=$(bench_wrk_value duration_us "$out")
    read -r claimed _ _ _ nv <<<"$(BENCH_KEY_RANGE="$kfirst $klast" bench_check_module "$label" "$q" "$c" "$out" "$ids" "$l0")"
    rm -f "$ids".*
    # (wrk may not have read the answers of the last claims before SIGINT)
    [ "$claimed" -ge "$n" ] ||
        bench_violation "$label" "$claimed items claimed of the $n asked for"
    log "$label: $claimed claims ($ok answers read) in $(awk -v d="$dur" 'BEGIN {printf "%.0f", d / 1e6}') s" \
        "($(awk -v n="$ok" -v d="$dur" 'BEGIN {printf "%.0f", n * 1e6 / d}')/s), $c connections," \
        "statuses $(bench_wrk_value statuses "$out"), load $(load1)$([ "$nv" -eq 0 ] || echo ", VIOLATIONS=$nv")"
    driven=$(awk -v n="$ok" -v d="$dur" 'BEGIN {printf "%.0f", n * 1e6 / d}')
}

# --- setup through nginx: the expiring claims, then the live ones -------------------

declare -A EST SEEN SETUP
drive_count "setup expiring claims" "$dq" "$SETUP_CONNS" "$EXPIRED"
SETUP[expired]=$driven
psql_ -v queue="$dq" <<'SQL' >/dev/null
-- the expired items: a run that took one would find attempts 2 (allowed)
INSERT INTO bench.dirty (id, kind)
SELECT id, 'expired_low' FROM annotation_queue.items
 WHERE queue_id = :'queue' AND status = 'claimed';
UPDATE annotation_queue.queues SET lease = interval '1 day' WHERE id = :'queue';
SQL

t0=$(now)
psql_ -v queue="$dq" -v live="$LIVE" -v run="$ITEMS0" <<SQL
INSERT INTO annotation_queue.items (queue_id, priority, payload)
SELECT :'queue', CASE WHEN g <= :live THEN 5 + g % 5 ELSE 2 + g % 3 END, $payload
  FROM (SELECT g FROM generate_series(1, :live + :run) AS g ORDER BY random()) AS s;
SQL
[ "$CLEAN" = 0 ] || add_run_items "$cq" "$ITEMS0"
psql_ -c "VACUUM (ANALYZE) annotation_queue.items"
log "dirty queue: $LIVE items of priorities 5-9 and $ITEMS0 of 2-4, mixed; clean queue: $ITEMS0 of 2-4; in $(elapsed "$t0") s"

# the expiring claims' leases end
t0=$(date +%s)
while :; do
    n=$(psql_ -v queue="$dq" <<<"SELECT count(*) FROM annotation_queue.items WHERE queue_id = :'queue' AND status = 'claimed' AND lease_expires_at > now()")
    [ "$n" -ne 0 ] || break
    [ "$(( $(date +%s) - t0 ))" -lt "$((EXPIRY_LEASE + 120))" ] || die "$n leases still live after $((EXPIRY_LEASE + 120)) s"
    sleep 2
done
log "the $EXPIRED expiring claims have expired (waited $(( $(date +%s) - t0 )) s)"

drive_count "setup live claims" "$dq" "$SETUP_CONNS" "$LIVE"
SETUP[live]=$driven
left=$(psql_ -v queue="$dq" <<<"SELECT count(*) FROM annotation_queue.items WHERE queue_id = :'queue' AND status = 'available' AND priority >= 5")
[ "$left" -eq 0 ] || bench_violation "setup live claims" "$left items of priorities 5-9 still available"

for c in $LEVELS; do
    EST[$c]=$RATE
    [ "${SETUP[expired]}" -le "${EST[$c]}" ] || EST[$c]=${SETUP[expired]}
    [ "${SETUP[live]}" -le "${EST[$c]}" ] || EST[$c]=${SETUP[live]}
done

# --- the run -----------------------------------------------------------------------
#
# Before each phase: enough keys and available items for 1.5 x the best
# rate seen at its level (before its first phase, the setup's rate or
# RATE, whichever is higher), added in bulk (3 phases' worth) when short
# (the pause before the phase is logged).  A phase whose keys ran out would
# measure less than PHASE seconds: a violation.

declare -A P
phase_end=$(now)
run() {   # queue-name conns pair [seconds]
    local qn=$1 c=$2 pr=$3 d=${4:-$PHASE} q=${QID[$1]} need label out l0 ids a pause t1
    label="pair $pr $c conns $qn"
    [ "$pr" != 0 ] || label="warm-up $c conns $qn"
    need=$(( EST[$c] * d * 3 / 2 + 2000 ))
    t1=$(now)
    a=$(available "$q")
    if [ "$a" -lt "$need" ]; then
        add_run_items "$q" "$((need * 3))"
        log "$qn queue: $((need * 3)) more items (had $a available)"
    fi
    take_keys "$need" "$work/keys-phase.txt"
    pause=$(awk -v a="$phase_end" -v b="$(now)" 'BEGIN {printf "%.0f", b - a}')
    ids=$work/ids-phase
    l0=$(errlog_lines)
    out=$(BENCH_KEYFILE="$work/keys-phase.txt" BENCH_QUEUE="$q" BENCH_THREADS=$THREADS \
          BENCH_IDS="$ids" BENCH_KEYS_END=stop \
          wrk -t "$THREADS" -c "$c" -d "${d}s" --timeout 10s \
              -s "$top/bench/claim.lua" "$url" 2>&1) || { echo "$out" >&2; die "wrk failed"; }
    bench_quiesce
    phase_end=$(now)
    echo "$out" > "$work/wrk-pair$pr-$c-$qn.out"
    local ok dur p50 p99 non200 sockerr stopped nv rate
    ok=$(bench_wrk_value status_200 "$out"); dur=$(bench_wrk_value duration_us "$out")
    p50=$(bench_wrk_value p50_us "$out"); p99=$(bench_wrk_value p99_us "$out")
    non200=$(bench_wrk_value non200 "$out"); sockerr=$(bench_wrk_value socket_errors "$out")
    stopped=$(bench_wrk_value stopped_threads "$out")
    read -r _ _ _ _ nv <<<"$(BENCH_KEY_RANGE="$kfirst $klast" bench_check_module "$label" "$q" "$c" "$out" "$ids" "$l0")"
    rm -f "$ids".*
    [ "$stopped" -eq 0 ] ||
        bench_violation "$label" "keys ran out before the end of the phase ($need keys): the rate is not of $d s"
    rate=$(awk -v n="$ok" -v d="$dur" 'BEGIN {printf "%.0f", n * 1e6 / d}')
    # from the first phase of a level on, its best rate (the floor RATE
    # was only a guess)
    if [ -z "${SEEN[$c]:-}" ]; then EST[$c]=$rate SEEN[$c]=1
    elif [ "$rate" -gt "${EST[$c]}" ]; then EST[$c]=$rate
    fi
    P[$pr,$c,$qn,t]=$rate
    P[$pr,$c,$qn,p50]=$(awk -v v="$p50" 'BEGIN {printf "%.2f", v / 1000}')
    P[$pr,$c,$qn,p99]=$(awk -v v="$p99" 'BEGIN {printf "%.2f", v / 1000}')
    P[$pr,$c,$qn,e]=$((non200 + sockerr))
    P[$pr,$c,$qn,load]=$(load1)
    P[$pr,$c,$qn,pause]=$pause
    log "$label: ${rate}/s p50 ${P[$pr,$c,$qn,p50]} ms p99 ${P[$pr,$c,$qn,p99]} ms errors ${P[$pr,$c,$qn,e]}" \
        "claims $ok; statuses $(bench_wrk_value statuses "$out"); pause before ${pause}s;" \
        "load ${P[$pr,$c,$qn,load]}$([ "$nv" -eq 0 ] || echo "; VIOLATIONS=$nv")"
}

# the clean queue's pages and the pool's connections to it as warm as the
# dirty queue's after its setup: a short phase through nginx, checked, not
# counted (its claims stay, as every claim of the run)
if [ "$CLEAN" != 0 ] && [ "$WARMUP" -gt 0 ]; then
    run clean "${LEVELS%% *}" 0 "$WARMUP"
fi

state0_dirty=$(state "$dq")
log "dirty queue at the start of the run: $state0_dirty"
[ "$CLEAN" = 0 ] || { state0_clean=$(state "$cq"); log "clean queue at the start of the run: $state0_clean"; }
declare -A EXPL
for qn in "${QUEUES[@]}"; do
    explain "$qn-start" "${QID[$qn]}"
    EXPL[$qn,start]=$explained
    log "EXPLAIN $qn queue, start: ${EXPL[$qn,start]}"
done

avlog0=$(wc -l < "$work/pg/postgresql.log")
phase_end=$(now)
t_run=$(now)
for pr in $(seq "$PAIRS"); do
    for c in $LEVELS; do
        if [ $((pr % 2)) -eq 1 ]; then order=("${QUEUES[@]}"); else
            order=(); for ((i = ${#QUEUES[@]} - 1; i >= 0; i--)); do order+=("${QUEUES[i]}"); done
        fi
        for qn in "${order[@]}"; do run "$qn" "$c" "$pr"; done
    done
done
run_wall=$(elapsed "$t_run")
avs=$(tail -n +"$((avlog0 + 1))" "$work/pg/postgresql.log" | grep -c 'automatic vacuum of table "annotation_queue.annotation_queue.items"' || true)

for qn in "${QUEUES[@]}"; do
    explain "$qn-end" "${QID[$qn]}"
    EXPL[$qn,end]=$explained
    log "EXPLAIN $qn queue, end: ${EXPL[$qn,end]}"
done
state1_dirty=$(state "$dq")
[ "$CLEAN" = 0 ] || state1_clean=$(state "$cq")

# --- the summary ---------------------------------------------------------------------

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0) ? (a / b) : 0}'; }
echo
echo "annotation queue claim in dirty states, $(date -u '+%F %H:%M UTC'), $(nproc) cores," \
     "load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "module $MODULE, source $commit; nginx $WORKERS workers, pool $POOL; wrk -t$THREADS, fresh key per claim"
echo "setup through nginx at $SETUP_CONNS connections: $EXPIRED expiring claims (lease ${EXPIRY_LEASE}s)" \
     "${SETUP[expired]}/s, $LIVE live claims (lease 1 day) ${SETUP[live]}/s; $COMPLETED completed items by SQL"
echo "dirty queue at the start: $state0_dirty"
echo "dirty queue at the end:   $state1_dirty"
if [ "$CLEAN" != 0 ]; then
    echo "clean queue at the start: $state0_clean"
    echo "clean queue at the end:   $state1_clean"
fi
echo "run: $PAIRS x ($LEVELS) phases of ${PHASE}s per queue, queues alternating, no reset, no manual VACUUM;" \
     "${run_wall}s wall; autovacuums of items during the run: $avs"
echo
if [ "$CLEAN" != 0 ]; then
    printf '| %4s | %5s | %8s | %6s | %6s | %3s | %8s | %6s | %6s | %3s | %7s | %7s | %9s | %4s |\n' \
        pair conns "clean /s" "p50 ms" "p99 ms" err "dirty /s" "p50 ms" "p99 ms" err "ratio/s" "ratio50" "pause c/d" load
    printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' -----: ------: ---------: -------: -------: \
        ----: ---------: -------: -------: ----: --------: --------: ----------: -----:
else
    printf '| %4s | %5s | %8s | %6s | %6s | %3s | %5s | %4s |\n' pair conns "dirty /s" "p50 ms" "p99 ms" err pause load
    printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' -----: ------: ---------: -------: -------: ----: ------: -----:
fi
declare -A RT R50
for pr in $(seq "$PAIRS"); do
    for c in $LEVELS; do
        if [ "$CLEAN" != 0 ]; then
            rt=$(ratio "${P[$pr,$c,dirty,t]}" "${P[$pr,$c,clean,t]}")
            r50=$(ratio "${P[$pr,$c,dirty,p50]}" "${P[$pr,$c,clean,p50]}")
            RT[$c]+="$rt " R50[$c]+="$r50 "
            printf '| %4s | %5s | %8s | %6s | %6s | %3s | %8s | %6s | %6s | %3s | %7s | %7s | %9s | %4s |\n' \
                "$pr" "$c" "${P[$pr,$c,clean,t]}" "${P[$pr,$c,clean,p50]}" "${P[$pr,$c,clean,p99]}" \
                "${P[$pr,$c,clean,e]}" "${P[$pr,$c,dirty,t]}" "${P[$pr,$c,dirty,p50]}" \
                "${P[$pr,$c,dirty,p99]}" "${P[$pr,$c,dirty,e]}" "$rt" "$r50" \
                "${P[$pr,$c,clean,pause]}/${P[$pr,$c,dirty,pause]}" "${P[$pr,$c,dirty,load]}"
        else
            printf '| %4s | %5s | %8s | %6s | %6s | %3s | %5s | %4s |\n' "$pr" "$c" \
                "${P[$pr,$c,dirty,t]}" "${P[$pr,$c,dirty,p50]}" "${P[$pr,$c,dirty,p99]}" \
                "${P[$pr,$c,dirty,e]}" "${P[$pr,$c,dirty,pause]}" "${P[$pr,$c,dirty,load]}"
        fi
    done
done
echo
for c in $LEVELS; do
    for qn in "${QUEUES[@]}"; do
        ts=() p50s=() p99s=()
        for pr in $(seq "$PAIRS"); do
            ts+=("${P[$pr,$c,$qn,t]}") p50s+=("${P[$pr,$c,$qn,p50]}") p99s+=("${P[$pr,$c,$qn,p99]}")
        done
        [ "$qn" != dirty ] || { DT=("${ts[@]}") D50=("${p50s[@]}"); }
        printf '%s connections, %s queue: median %.0f claims/s (first phase %s, last %s), p50 %.2f ms, p99 %.2f ms\n' \
            "$c" "$qn" "$(median "${ts[@]}")" "${ts[0]}" "${ts[-1]}" "$(median "${p50s[@]}")" "$(median "${p99s[@]}")"
    done
    if [ "$CLEAN" != 0 ]; then
        # against the clean queue of the same round (the same moment on the
        # machine), and against its first phase at this level: the clean
        # queue's own claims stay live, and once its head walks below them
        # it is no longer clean (a statement whose cost grows with the live
        # claims above the head then slows both queues alike, and the pairs'
        # ratios alone would hide it)
        # shellcheck disable=SC2086
        mr=$(median ${RT[$c]}) m50=$(median ${R50[$c]})
        lo=$(printf '%s\n' ${RT[$c]} | sort -g | head -1); hi50=$(printf '%s\n' ${R50[$c]} | sort -g | tail -1)
        fr=$(ratio "$(median "${DT[@]}")" "${P[1,$c,clean,t]}")
        f50=$(ratio "$(median "${D50[@]}")" "${P[1,$c,clean,p50]}")
        verdict=met
        awk -v r="$mr" -v p="$m50" -v fr="$fr" -v fp="$f50" \
            'BEGIN {exit !(r >= 0.8 && p <= 1.2 && fr >= 0.8 && fp <= 1.2)}' || verdict="NOT met"
        printf '%s connections, dirty / clean of each pair: claims/s median %.2f (lowest %s), p50 median %.2f (highest %s)\n' \
            "$c" "$mr" "$lo" "$m50" "$hi50"
        printf '%s connections, dirty (median of its phases) / the clean queue'"'"'s first phase: claims/s %.2f, p50 %.2f\n' \
            "$c" "$fr" "$f50"
        printf '%s connections: target (both ratios: rate >= 0.80, p50 <= 1.20) %s\n' "$c" "$verdict"
    fi
done
echo
echo "One claim per queue at the start and at the end of the run, EXPLAIN (ANALYZE, BUFFERS) EXECUTE"
echo "of the prepared statement (fresh key): the statement's shared buffers hit/read, execution time;"
echo "execution 1 (custom plan) and 6 (the plan cache's choice from then on)"
for qn in "${QUEUES[@]}"; do
    printf '%-6s start: %s\n%-6s end:   %s\n' "$qn" "${EXPL[$qn,start]}" "$qn" "${EXPL[$qn,end]}"
done
echo
n=$(log_problems)
echo "nginx error log: $n lines at error level or above; total time $(elapsed "$t_start") s"
bench_verdict || exit 1
