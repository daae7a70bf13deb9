#!/usr/bin/env bash
# make bench-flat: is a claim as fast with 10,000,000 items in the queue as
# with 10,000, and with many completed and expired items in the table?  See
# bench/README.md ("Latency from 10,000 to 10,000,000 items, and with dead
# rows").
#
# One PostgreSQL (scripts/pg.sh, autovacuum_naptime 10s), one organisation,
# one queue per size, all in the same items table.  For each size: wrk +
# bench/claim.lua through nginx at 1 and 8 connections and pgbench at 1
# client on the same statement, every run from the same state (the bench
# keys' claims put back and the table vacuumed in between), medians and the
# ratio to the smallest queue.  Then the same on the 1,000,000-item queue
# made dirty: (a) its first half completed, (b) also expired leases below
# and at the head's priority and live claims of other raters.  EXPLAIN
# (ANALYZE, BUFFERS) of one claim per state.  Last, a sustained pgbench run
# on the largest queue without any reset: does the rate hold between
# autovacuum runs?
#
# Environment:
#   BENCH_FLAT_SIZES     queue sizes ("10000 100000 1000000 10000000"); the
#                        first is the reference of the ratios
#   BENCH_FLAT_DIRTY_SIZE  the queue made dirty (1000000 if among the sizes,
#                        else the largest); completed = half of it, expired
#                        below the head = 1/10, expired at the head's
#                        priority = 1/100, live claims of others = 1/100
#   BENCH_FLAT_SUSTAINED seconds of the sustained run (120; 0 skips it)
#   BENCH_FLAT_SUSTAINED_CLIENTS  its pgbench clients (8)
#   BENCH_KEYS           keys in the database (800000: the sustained run
#                        sends each once, up to 6,666 claims/s for 120 s)
#   BENCH_WRK_KEYS       of them, in wrk's key file (100000)
#   BENCH_DURATION       seconds per measured run (10; less on a queue the
#                        run would half empty, see run_seconds)
#   BENCH_WARMUP         seconds of module warm-up per level and state (2)
#   BENCH_REPEAT         runs per point, medians printed (3)
#   BENCH_CONNECTIONS    wrk connections ("1 8")
#   BENCH_POOL_SIZE      annotation_queue_pool_size (8 per worker)
#   BENCH_WORKERS        nginx worker_processes (2)
#   BENCH_KEEP=1         keep the work directory (plans, wrk and pgbench
#                        outputs, PostgreSQL's log)
#   MODULE               the module .so (build/ngx_http_annotation_queue_module.so)
#
# Every run is checked against the database (bench/lib.sh): an item claimed
# or answered twice, a key holding two items of a queue, a non-2xx answer (a
# 409 only once the queue is empty), a socket error or timeout, a reused
# key, an error-log line, pgbench's transactions not all claims.  The bench
# finishes, lists every violation and exits 1.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
NGINX=${NGINX:-/usr/sbin/nginx}
MODULE=${MODULE:-$top/build/ngx_http_annotation_queue_module.so}

SIZES=${BENCH_FLAT_SIZES:-"10000 100000 1000000 10000000"}
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
REPEAT=${BENCH_REPEAT:-3}
KEYS=${BENCH_KEYS:-800000}
WRK_KEYS=${BENCH_WRK_KEYS:-100000}
[ "$WRK_KEYS" -le "$KEYS" ] || WRK_KEYS=$KEYS
LEVELS=${BENCH_CONNECTIONS:-"1 8"}
POOL=${BENCH_POOL_SIZE:-8}
WORKERS=${BENCH_WORKERS:-2}
SUSTAINED=${BENCH_FLAT_SUSTAINED:-120}
SCLIENTS=${BENCH_FLAT_SUSTAINED_CLIENTS:-8}
LEASE_MS=900000            # $3 of the claim; the bench queues have their own 15 min
CHUNK=1000000              # items per INSERT

largest=0
for s in $SIZES; do [ "$s" -gt "$largest" ] && largest=$s; done
base=${SIZES%% *}
if [ -n "${BENCH_FLAT_DIRTY_SIZE:-}" ]; then
    DIRTY=$BENCH_FLAT_DIRTY_SIZE
elif [[ " $SIZES " == *" 1000000 "* ]]; then
    DIRTY=1000000
else
    DIRTY=$largest
fi
[[ " $SIZES " == *" $DIRTY "* ]] || { echo "bench: BENCH_FLAT_DIRTY_SIZE $DIRTY is not among the sizes" >&2; exit 2; }

. "$top/bench/lib.sh"
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

# --- what the bench needs ----------------------------------------------------

bench_needs

# --- work directory, PostgreSQL, cleanup -----------------------------------

bench_workdir aq-bench-flat

commit=$(git -C "$top" describe --always --dirty 2>/dev/null || echo "${BENCH_COMMIT:-unknown}")
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
t_start=$(date +%s.%N)
log "$(date -u '+%F %T UTC'): sizes='$SIZES' dirty=$DIRTY keys=$KEYS duration=${DURATION}s" \
    "warmup=${WARMUP}s repeat=$REPEAT levels='$LEVELS' pool=$POOL x $WORKERS workers" \
    "sustained=${SUSTAINED}s x $SCLIENTS clients; load average $load_start"
dsn=$("$top/scripts/pg.sh" start "$work/pg")
log "PostgreSQL: $dsn"

psql_() { psql -X -qtA -v ON_ERROR_STOP=1 -d "$dsn" "$@"; }

# README, "Running a busy queue": autovacuum_naptime = 10s server-wide.
# scripts/pg.sh already starts the server with -c autovacuum_naptime=10s (a
# command-line setting wins over ALTER SYSTEM); set it the documented way as
# well, and log every autovacuum so that the sustained run can show them.
psql_ <<'SQL' >/dev/null
ALTER SYSTEM SET autovacuum_naptime = '10s';
ALTER SYSTEM SET log_autovacuum_min_duration = 0;
SELECT pg_reload_conf();
SQL
sleep 0.5
naptime=$(psql_ -F' ' -c "SELECT setting || 's (source: ' || source || ')' FROM pg_settings WHERE name = 'autovacuum_naptime'")
log "autovacuum_naptime = $naptime"

# --- data: one organisation, a queue per size, KEYS keys --------------------
#
# Set-based, as bench/run.sh: INSERT ... SELECT ... generate_series, in
# chunks of CHUNK items (the 10M queue's progress is logged); the keys in
# one SELECT over generate_series calling create_api_key.  bench.keys keeps
# each key and its digest by index i.

t0=$(date +%s.%N)
org=$(psql_ -c "SELECT annotation_queue.create_org('bench')")
declare -A QID
for s in $SIZES; do
    QID[$s]=$(psql_ -v org="$org" -v name="bench $s" \
                  <<<"SELECT annotation_queue.create_queue(:'org', :'name')")
done
g0=0
for s in $SIZES; do
    done_=0
    while [ "$done_" -lt "$s" ]; do
        n=$((s - done_ < CHUNK ? s - done_ : CHUNK))
        t1=$(date +%s.%N)
        bench_items "${QID[$s]}" $((g0 + done_ + 1)) $((g0 + done_ + n))
        done_=$((done_ + n))
        [ "$s" -le "$CHUNK" ] || log "queue of $s: $done_ items loaded ($(elapsed "$t1") s for the last $n)"
    done
    g0=$((g0 + s))
    log "queue of $s items loaded (${QID[$s]}), $(elapsed "$t0") s so far"
done
t1=$(date +%s.%N)
# bench.keys, and bench.dirty: the items the dirty state sets up, by kind
# (expired_low, expired_same, live)
bench_keys "$org" "$KEYS"
log "$KEYS keys created in $(elapsed "$t1") s"
t1=$(date +%s.%N)
psql_ <<'SQL'
VACUUM (ANALYZE) annotation_queue.items;
VACUUM (ANALYZE) annotation_queue.api_keys;
VACUUM (ANALYZE) bench.keys;
CHECKPOINT;
SQL
psql_ -c "\\copy (SELECT key FROM bench.keys WHERE i <= $WRK_KEYS ORDER BY i) TO '$work/keys.txt'"
[ "$(wc -l < "$work/keys.txt")" -eq "$WRK_KEYS" ] || die "keys.txt has not $WRK_KEYS lines"
table_size=$(psql_ -c "SELECT pg_size_pretty(pg_total_relation_size('annotation_queue.items'))")
log "VACUUM (ANALYZE) in $(elapsed "$t1") s; data loaded in $(elapsed "$t0") s; items table with its indexes: $table_size"

# the statement, extracted from the header now: for PREPARE and for pgbench
bench_statements

# --- nginx -------------------------------------------------------------------

bench_start_nginx "$dsn" "$WORKERS" "$POOL"

key1=$(sed -n 1p "$work/keys.txt")
answer=$(curl -s -w ' HTTP %{http_code}' -X POST "$url" \
              -H "Authorization: Bearer $key1" -H 'Content-Type: application/json' \
              -d "{\"queue_id\": \"${QID[$base]}\"}")
log "sanity claim: $answer"
case "$answer" in *'HTTP 200') ;; *) die "the sanity claim failed" ;; esac

# --- between runs ---------------------------------------------------------
#
# Only the bench keys' claims are put back (the dirty state's other raters
# keep theirs); the items the dirty state left with an expired lease at the
# head's priority, which the runs claim first, are made expired again (so
# every run of that state starts with all of them); then VACUUM.
#
# Before the reset, every run (warm-ups included) is checked against the
# database (bench_check_module, bench_check_pgbench in bench/lib.sh): no
# item claimed twice (attempts above 1, or 2 for the dirty state's expired
# items) or answered twice (the item ids wrk recorded), no key holding two
# items of a queue, no error; a violation fails the bench at the end.
reset() {
    # session_replication_role: no trigger fires (the NOTIFY of
    # items_notify_available, row by row: nobody listens here)
    psql_ <<'SQL' >/dev/null
SET session_replication_role = replica;
UPDATE annotation_queue.items
   SET status = 'available', claimed_by = NULL, claimed_at = NULL,
       lease_expires_at = NULL, attempts = 0
 WHERE status = 'claimed'
   AND claimed_by IN (SELECT id FROM annotation_queue.api_keys);
UPDATE annotation_queue.items i
   SET status = 'claimed', claimed_by = gen_random_uuid(),
       claimed_at = now() - interval '75 minutes',
       lease_expires_at = now() - interval '1 hour', attempts = 1
  FROM bench.dirty d
 WHERE d.id = i.id AND d.kind = 'expired_same' AND i.status = 'available';
VACUUM annotation_queue.items;
SQL
}
dead() { psql_ -F' ' -c "SELECT n_dead_tup, autovacuum_count FROM pg_stat_user_tables WHERE relid = 'annotation_queue.items'::regclass"; }

# --- the drivers -------------------------------------------------------------
#
# Each prints one line:
#   claims_per_s p50_ms p99_ms errors bench_claimed expired_taken detail
# and checks the run (bench/lib.sh): a violation is logged, counted in the
# detail (VIOLATIONS=n) and fails the bench at the end.

run_module() {   # queue connections seconds label
    local q=$1 c=$2 d=$3 label=$4 out l0 t=2 ids
    [ "$c" -ge 2 ] || t=1
    ids=$work/ids-$c-$(date +%s%N)
    l0=$(errlog_lines)
    out=$(BENCH_KEYFILE="$work/keys.txt" BENCH_QUEUE="$q" BENCH_THREADS=$t \
          BENCH_IDS="$ids" \
          wrk -t "$t" -c "$c" -d "${d}s" --timeout 10s \
              -s "$top/bench/claim.lua" "$url" 2>&1) || { echo "$out" >&2; die "wrk failed"; }
    bench_quiesce    # the claims in flight when wrk stopped
    echo "$out" > "$work/wrk-$c-$(date +%s%N).out"
    get() { awk -v k="$1" '$1 == "BENCH" && $2 == k {print $3}' <<<"$out"; }
    local ok non200 sockerr dur p50 p99 claimed exp nv
    ok=$(get status_200); non200=$(get non200); sockerr=$(get socket_errors)
    dur=$(get duration_us); p50=$(get p50_us); p99=$(get p99_us)
    read -r claimed exp _ _ nv <<<"$(bench_check_module "$label" "$q" "$c" "$out" "$ids" "$l0")"
    rm -f "$ids".*
    local detail="statuses=$(get statuses) dead_after_run=$(dead | cut -d' ' -f1)"
    reset
    detail+=" load=$(cut -d' ' -f1 /proc/loadavg)"
    [ "$nv" -eq 0 ] || detail+=" VIOLATIONS=$nv"
    printf '%s %s %s %s %s %s %s\n' \
        "$(awk -v n="$ok" -v d="$dur" 'BEGIN {printf "%.1f", n * 1000000 / d}')" \
        "$(awk -v v="$p50" 'BEGIN {printf "%.2f", v / 1000}')" \
        "$(awk -v v="$p99" 'BEGIN {printf "%.2f", v / 1000}')" \
        "$((non200 + sockerr))" "$claimed" "$exp" "$detail"
}

pct() {   # p50 p99 of pgbench per-transaction logs (microseconds -> ms)
    cat "$@" 2>/dev/null | awk '{print $3}' | sort -n | awk '
        {a[NR] = $1}
        END {if (NR == 0) {print "0 0"; exit}
             i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
             i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
             printf "%.2f %.2f\n", a[i50] / 1000, a[i99] / 1000}'
}

run_pgbench() {   # queue clients seconds label
    local q=$1 c=$2 d=$3 label=$4 out rc=0 prefix
    prefix=$work/pgb-$c-$(date +%s%N)
    out=$("$PGBENCH" -n -M prepared -c "$c" -j 1 -T "$d" \
              -f "$work/claim.pgbench" -D queue="$q" -D lease="$LEASE_MS" \
              -D n=0 -D nclients="$c" -l --log-prefix="$prefix" "$dsn" 2>&1) || rc=$?
    echo "$out" > "$prefix.out"
    local tx tps failed aborted p50 p99 claimed exp dupi dupk
    tx=$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' <<<"$out")
    tps=$(awk '/^tps = / {print $3}' <<<"$out")
    failed=$(awk -F': ' '/number of failed transactions/ {split($2, a, " "); print a[1]}' <<<"$out")
    aborted=$(grep -cE 'client [0-9]+ .*aborted' <<<"$out" || true)
    [ -n "$tx" ] || { echo "$out" >&2; die "pgbench failed (rc $rc)"; }
    [ -n "$tps" ] || tps=0
    read -r p50 p99 < <(pct "$prefix".[0-9]*)
    rm -f "$prefix".[0-9]*
    local nv
    read -r claimed exp _ _ nv <<<"$(bench_check_pgbench "$label" "$q" "$tx" "$rc" "${failed:-0}" "$aborted")"
    local detail="tx=$tx rc=$rc dead_after_run=$(dead | cut -d' ' -f1)"
    reset
    detail+=" load=$(cut -d' ' -f1 /proc/loadavg)"
    [ "$nv" -eq 0 ] || detail+=" VIOLATIONS=$nv"
    printf '%s %s %s %s %s %s %s\n' "$tps" "$p50" "$p99" \
        "$(( ${failed:-0} + aborted ))" "$claimed" "$exp" "$detail"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0) ? (a / b) : 0}'; }

# --- EXPLAIN (ANALYZE, BUFFERS) of claims ------------------------------------
#
# PREPARE the module's statement with its types (bytea, uuid, int8) and
# EXECUTE it 6 times in one session with fresh keys (the last keys, which no
# run touches): execution 1 has a custom plan, from the 6th the plan cache
# may use the generic plan the module's long-lived connections run.  The
# claims commit and are put back by the reset that follows.  Summary per
# execution: the top node's shared buffers hit/read, the index scan of
# items_available_idx's hit, the execution time.

explain() {   # state queue -> "exec1 ... | exec6 ..."
    local st=$1 q=$2 f j
    f=$work/plan-$st.txt
    {
        echo "PREPARE claim(bytea, uuid, int8) AS"
        cat "$work/claim.sql"
        echo ";"
        for j in 1 2 3 4 5 6; do
            echo "SELECT digest AS d FROM bench.keys WHERE i = $((KEYS - j + 1)) \\gset"
            echo "\\echo === execution $j"
            echo "EXPLAIN (ANALYZE, BUFFERS) EXECUTE claim(:'d', '$q', $LEASE_MS);"
        done
    } | psql -X -q -A -t -v ON_ERROR_STOP=1 -d "$dsn" > "$f" 2>&1 || { cat "$f" >&2; die "EXPLAIN failed"; }
    reset
    awk '
        function num(s, k,   m) { if (match(s, k "=[0-9]+")) return substr(s, RSTART + length(k) + 1, RLENGTH - length(k) - 1); return 0 }
        /^=== execution/ {e = $3; top[e] = ""; avail[e] = 0; inavail = 0; next}
        /Planning:/ {planning = 1}
        /Buffers:/ && !planning && top[e] == "" {top[e] = num($0, "hit") "/" num($0, "read")}
        /Index (Only )?Scan.* using items_available_idx/ {inavail = 1; next}
        /Buffers:/ && inavail {avail[e] += num($0, "hit") + num($0, "read"); inavail = 0}
        /Execution Time:/ {t[e] = $3; planning = 0}
        /Planning Time:/ {planning = 0}
        /^ *Planning Time|^ *Execution Time/ {planning = 0}
        END {printf "exec 1: %s hit/read, avail idx %d, %s ms; exec 6: %s hit/read, avail idx %d, %s ms\n",
                    top[1], avail[1], t[1], top[6], avail[6], t[6]}' "$f"
}

# --- measuring one state -----------------------------------------------------
#
# M[state,driver,{t,p50,p99,e}] medians (errors summed); driver: c<conns> for
# the module through wrk, pgb for pgbench at 1 client.

declare -A M EXPL DEADS
STATES=()
problems=0
# A run must not empty the queue (a 10,000-item queue is gone in a few
# seconds at a few thousand claims/s, and then answers 409): a run lasts
# DURATION, or less when the warm-up's rate says it would claim more than
# half of the queue's available items (at least 1 s).  The table shows the
# seconds used.
run_seconds() {   # rate available
    awk -v r="$1" -v a="$2" -v d="$DURATION" 'BEGIN {
        s = (r > 0) ? int(a * 0.5 / r) : d
        if (s > d) s = d
        if (s < 1) s = 1
        print s }'
}
measure() {   # state queue
    local st=$1 q=$2 c r line t p50 p99 e cl ex detail d0 d1 avail secs maxdead=0 dd
    STATES+=("$st")
    reset
    d0=$(dead)
    avail=$(psql_ -v queue="$q" <<<"SELECT count(*) FROM annotation_queue.items WHERE queue_id = :'queue' AND status = 'available'")
    log "=== $st: $avail available; n_dead_tup autovacuum_count at start: $d0"
    EXPL[$st]=$(explain "$st" "$q")
    log "$st EXPLAIN: ${EXPL[$st]}"
    for c in $LEVELS; do
        line=$(run_module "$q" "$c" "$WARMUP" "$st $c conns warm-up")
        secs=$(run_seconds "$(echo "$line" | cut -d' ' -f1)" "$avail")
        log "--- $st, $c connection(s): module warm-up ${WARMUP}s: ${line%% *}/s; runs of ${secs}s"
        local ts=() p50s=() p99s=() es=()
        for r in $(seq "$REPEAT"); do
            line=$(run_module "$q" "$c" "$secs" "$st $c conns run $r module")
            read -r t p50 p99 e cl ex detail <<<"$line"
            log "$st $c conns run $r module: ${t}/s p50 $p50 ms p99 $p99 ms errors $e claimed $cl (expired taken $ex); $detail"
            ts+=("$t") p50s+=("$p50") p99s+=("$p99") es+=("$e")
            case "$detail" in *VIOLATIONS=*) problems=$((problems + 1)) ;; esac
            dd=$(sed -E 's/.*dead_after_run=([0-9]+).*/\1/' <<<"$detail")
            [ "$dd" -le "$maxdead" ] || maxdead=$dd
        done
        M[$st,c$c,t]=$(median "${ts[@]}") M[$st,c$c,p50]=$(median "${p50s[@]}")
        M[$st,c$c,p99]=$(median "${p99s[@]}") M[$st,c$c,e]=$(sum "${es[@]}")
        M[$st,c$c,s]=$secs
    done
    line=$(run_pgbench "$q" 1 1 "$st pgbench warm-up")
    secs=$(run_seconds "$(echo "$line" | cut -d' ' -f1)" "$avail")
    log "--- $st, pgbench 1 client: 1 s warm-up ${line%% *}/s; runs of ${secs}s"
    local ts=() p50s=() p99s=() es=()
    for r in $(seq "$REPEAT"); do
        line=$(run_pgbench "$q" 1 "$secs" "$st 1 client run $r pgbench")
        read -r t p50 p99 e cl ex detail <<<"$line"
        log "$st 1 client run $r pgbench: ${t}/s p50 $p50 ms p99 $p99 ms errors $e claimed $cl (expired taken $ex); $detail"
        ts+=("$t") p50s+=("$p50") p99s+=("$p99") es+=("$e")
        case "$detail" in *VIOLATIONS=*) problems=$((problems + 1)) ;; esac
        dd=$(sed -E 's/.*dead_after_run=([0-9]+).*/\1/' <<<"$detail")
        [ "$dd" -le "$maxdead" ] || maxdead=$dd
    done
    M[$st,pgb,t]=$(median "${ts[@]}") M[$st,pgb,p50]=$(median "${p50s[@]}")
    M[$st,pgb,p99]=$(median "${p99s[@]}") M[$st,pgb,e]=$(sum "${es[@]}")
    M[$st,pgb,s]=$secs
    d1=$(dead)
    DEADS[$st]="n_dead_tup at start ${d0% *}, at the end of a run up to $maxdead; autovacuums during the state $(( ${d1#* } - ${d0#* } ))"
}

# --- clean queues, smallest to largest ----------------------------------------

declare -A REF
for s in $SIZES; do
    measure "$s" "${QID[$s]}"
    REF[$s]=$base
done

# --- the dirty queue -----------------------------------------------------------
#
# (a) its first half (lowest seq) completed, as raters would leave it;
# (b) and then, from the rest: 1/100 claimed by other raters with leases that
#     expired an hour ago at the head's priority 0 (right after the completed
#     ones: claimed first), 1/100 live claims of other raters (lease in a
#     day), and the last 1/10 claimed with leases that expired an hour ago at
#     priority -1 (below the head: a claim must not walk them).

q=${QID[$DIRTY]}
nc=$((DIRTY / 2)) nsame=$((DIRTY / 100)) nlive=$((DIRTY / 100)) nlow=$((DIRTY / 10))
t1=$(date +%s.%N)
psql_ -v queue="$q" -v n="$nc" <<'SQL' >/dev/null
UPDATE annotation_queue.items i
   SET status = 'completed', version = i.version + 1, attempts = 1,
       claimed_at = now() - interval '2 hours', completed_at = now() - interval '1 hour',
       result = '{"score": 1}'
  FROM (SELECT id FROM annotation_queue.items
         WHERE queue_id = :'queue' ORDER BY seq LIMIT :n) AS f
 WHERE i.id = f.id;
VACUUM (ANALYZE) annotation_queue.items;
SQL
log "dirty (a): $nc items of the $DIRTY queue completed and vacuumed in $(elapsed "$t1") s"
measure "${DIRTY}-a" "$q"
REF[${DIRTY}-a]=$DIRTY

t1=$(date +%s.%N)
psql_ -v queue="$q" -v nsame="$nsame" -v nlive="$nlive" -v nlow="$nlow" <<'SQL' >/dev/null
INSERT INTO bench.dirty (id, kind)
SELECT id, CASE WHEN rn <= :nsame THEN 'expired_same' ELSE 'live' END
  FROM (SELECT id, row_number() OVER (ORDER BY seq) AS rn
          FROM annotation_queue.items
         WHERE queue_id = :'queue' AND status = 'available'
         ORDER BY seq LIMIT :nsame + :nlive) AS h;
INSERT INTO bench.dirty (id, kind)
SELECT id, 'expired_low'
  FROM annotation_queue.items
 WHERE queue_id = :'queue' AND status = 'available'
 ORDER BY seq DESC LIMIT :nlow;
UPDATE annotation_queue.items i
   SET status = 'claimed', claimed_by = gen_random_uuid(),
       claimed_at = now() - interval '75 minutes',
       lease_expires_at = now() - interval '1 hour', attempts = 1,
       priority = CASE d.kind WHEN 'expired_low' THEN -1 ELSE i.priority END
  FROM bench.dirty d
 WHERE d.id = i.id AND d.kind IN ('expired_same', 'expired_low');
UPDATE annotation_queue.items i
   SET status = 'claimed', claimed_by = gen_random_uuid(),
       claimed_at = now(), lease_expires_at = now() + interval '1 day',
       attempts = 1
  FROM bench.dirty d
 WHERE d.id = i.id AND d.kind = 'live';
-- the live claims must not be taken by a run, nor put back by a reset: they
-- stay out of bench.dirty's check (which counts only expired ones taken)
DELETE FROM bench.dirty WHERE kind = 'live';
VACUUM (ANALYZE) annotation_queue.items;
SQL
counts=$(psql_ -F' ' -v queue="$q" <<<"SELECT count(*) FILTER (WHERE status = 'available'), count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'claimed' AND lease_expires_at <= now() AND priority = 0), count(*) FILTER (WHERE status = 'claimed' AND lease_expires_at <= now() AND priority < 0), count(*) FILTER (WHERE status = 'claimed' AND lease_expires_at > now()) FROM annotation_queue.items WHERE queue_id = :'queue'")
read -r n_av n_co n_es n_el n_li <<<"$counts"
log "dirty (b) set up in $(elapsed "$t1") s: available $n_av, completed $n_co, expired at priority 0: $n_es, expired at -1: $n_el, live claims of others: $n_li"
measure "${DIRTY}-b" "$q"
REF[${DIRTY}-b]=$DIRTY

# --- sustained: no reset for SUSTAINED seconds on the largest queue -----------

sus_lines= sus_summary=
if [ "$SUSTAINED" -gt 0 ]; then
    q=${QID[$largest]}
    reset
    read -r d0 av0 <<<"$(dead)"
    cap=$((KEYS / SCLIENTS))
    log "=== sustained: pgbench -M prepared -c $SCLIENTS, ${SUSTAINED}s, queue of $largest, no reset;" \
        "keys for $((cap * SCLIENTS)) claims ($cap per client); n_dead_tup $d0, autovacuum_count $av0"
    prefix=$work/sustained
    ts0=$(date -u '+%F %T')
    pglog0=$(wc -l < "$work/pg/postgresql.log")
    rc=0
    "$PGBENCH" -n -M prepared -c "$SCLIENTS" -j 2 -T "$SUSTAINED" --progress=10 \
        -f "$work/claim.pgbench" -D queue="$q" -D lease="$LEASE_MS" \
        -D n=0 -D nclients="$SCLIENTS" "$dsn" > "$prefix.out" 2> "$prefix.progress" || rc=$?
    sleep 1
    read -r d1 av1 <<<"$(dead)"
    tx=$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' "$prefix.out")
    [ "${tx:-0}" -lt "$((cap * SCLIENTS))" ] ||
        bench_violation sustained "keys exhausted: raise BENCH_KEYS (transactions past them claim nothing)"
    read -r claimed _ dupi dupk nv <<<"$(bench_check_pgbench sustained "$q" "$tx" "$rc" \
        "$(awk -F': ' '/number of failed transactions/ {split($2, a, " "); print a[1]}' "$prefix.out")" \
        "$(cat "$prefix.out" "$prefix.progress" | grep -cE 'client [0-9]+ .*aborted' || true)")"
    tps=$(awk '/^tps = / {printf "%.0f", $3}' "$prefix.out")
    sus_lines=$(grep -E '^progress:' "$prefix.progress" || true)
    # PostgreSQL's log since the run started: each autovacuum of items (its
    # end time, from log_autovacuum_min_duration = 0) and how long it took
    avlog=$(tail -n +"$((pglog0 + 1))" "$work/pg/postgresql.log" | awk '
        /automatic vacuum of table "annotation_queue.annotation_queue.items"/ {t = substr($0, 12, 8); f = 1; next}
        f && /elapsed:/ {match($0, /elapsed: [0-9.]+ s/); printf "%s%s (%ss)", sep, t, substr($0, RSTART + 9, RLENGTH - 11); sep = ", "; f = 0}')
    sus_summary="sustained run started $ts0 UTC: $tx claims in ${SUSTAINED}s ($tps/s), rc $rc; claimed items $claimed"
    [ "$nv" -eq 0 ] || sus_summary+=" VIOLATIONS=$nv (listed at the end)"
    sus_summary+=$'\n'"autovacuum_count of items $av0 -> $av1 ($((av1 - av0)) during the run), n_dead_tup $d0 -> $d1 at the end"
    sus_summary+=$'\n'"autovacuums of items during the run, ended at (PostgreSQL's log time) and elapsed: ${avlog:-none}"
    log "sustained: $tx claims, $tps/s"
    reset
fi

# --- the table -----------------------------------------------------------

label() {   # state -> what it is
    case "$1" in
    *-a) echo "${1%-a} items, (a) half completed" ;;
    *-b) echo "${1%-b} items, (b) a + expired + live claims" ;;
    *)   echo "$1 items" ;;
    esac
}
echo
echo "annotation queue claim latency by queue size and with dead rows, $(date -u '+%F %H:%M UTC'), $(nproc) cores," \
     "load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "module $MODULE, source $commit; all queues in one items table ($table_size with its indexes)"
echo "${DURATION}s per run after a ${WARMUP}s warm-up, medians of $REPEAT; nginx $WORKERS workers, pool $POOL;" \
     "wrk -t1 at 1 connection, -t2 at 8; pgbench -M prepared -c1; autovacuum_naptime $naptime"
echo "ratio: to the $base-item row for the clean queues, to the clean $DIRTY-item row for the dirty ones"
echo
printf '| %-44s | %-9s | %5s | %9s | %7s | %7s | %6s | %8s | %9s | %9s |\n' \
    state driver "run s" "claims/s" "p50 ms" "p99 ms" errors "ratio /s" "ratio p50" "ratio p99"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------------------------------------------- \
    ----------- ------: ----------: --------: --------: -------: ---------: ----------: ----------:
for st in "${STATES[@]}"; do
    ref=${REF[$st]}
    for dr in $(for c in $LEVELS; do echo "c$c"; done) pgb; do
        case "$dr" in pgb) dn="pgbench 1" ;; c1) dn="module 1" ;; *) dn="module ${dr#c}" ;; esac
        printf '| %-44s | %-9s | %5s | %9.0f | %7.2f | %7.2f | %6s | %8s | %9s | %9s |\n' \
            "$(label "$st")" "$dn" "${M[$st,$dr,s]}" "${M[$st,$dr,t]}" "${M[$st,$dr,p50]}" "${M[$st,$dr,p99]}" \
            "${M[$st,$dr,e]}" "$(ratio "${M[$st,$dr,t]}" "${M[$ref,$dr,t]}")" \
            "$(ratio "${M[$st,$dr,p50]}" "${M[$ref,$dr,p50]}")" \
            "$(ratio "${M[$st,$dr,p99]}" "${M[$ref,$dr,p99]}")"
    done
done
echo
echo "One claim per state, EXPLAIN (ANALYZE, BUFFERS) EXECUTE of the prepared statement (fresh key):"
echo "shared buffers hit/read of the whole statement, of which items_available_idx's scan, execution time;"
echo "execution 1 (custom plan) and 6 (the plan cache's choice from then on); n_dead_tup of items"
echo "(each run is followed by a VACUUM) and the autovacuums of items during the state's runs"
echo
for st in "${STATES[@]}"; do
    printf '%-44s %s\n%-44s %s\n' "$(label "$st"):" "${EXPL[$st]}" "" "${DEADS[$st]}"
done
if [ -n "$sus_summary" ]; then
    echo
    echo "Sustained: pgbench -M prepared -c $SCLIENTS -j 2 -T $SUSTAINED --progress=10 on the $largest-item queue, no reset, no manual VACUUM"
    echo "$sus_lines"
    echo "$sus_summary"
fi
echo
n=$(log_problems)
echo "nginx error log: $n lines at error level or above; total time $(elapsed "$t_start") s"
[ "$problems" -eq 0 ] || echo "$problems run(s) with violations (VIOLATIONS= in their log lines)"
bench_verdict || exit 1
