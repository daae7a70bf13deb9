#!/usr/bin/env bash
# make bench: the claim endpoint (nginx + module, driven by wrk) against
# PostgreSQL's own limit (pgbench running the same claim statement) and
# against the minimal claim on the same schema (pgbench running
# bench/minimal.sql), on this machine, in one run.  See bench/README.md.
#
# Environment:
#   BENCH_QUICK=1        100k items, 5 s per run, 1 repeat (trying it out)
#   BENCH_ITEMS          items in the queue            (1000000; quick 100000)
#   BENCH_KEYS           rater keys (10000 x duration, at least 10000)
#   BENCH_DURATION       seconds per measured run      (20; quick 5)
#   BENCH_WARMUP         seconds of module warm-up per level (2)
#   BENCH_REPEAT         runs per level and tool, medians printed (3; quick 1)
#   BENCH_CONNECTIONS    concurrency levels            ("8 32 64")
#   BENCH_POOL_SIZE      annotation_queue_pool_size    (8 per worker)
#   BENCH_WORKERS        nginx worker_processes        (2)
#   BENCH_POOL_REFERENCE=0  skip the pgbench runs at workers x pool size
#                        clients (the module's own database concurrency)
#   BENCH_POOL_REFERENCE_REPEAT  runs of it (1)
#   BENCH_PERF=1         afterwards, profile one module run and one pgbench
#                        run at the highest level with perf (flat, this
#                        bench's processes only)
#   BENCH_KEEP=1         keep the work directory (logs, keys, pgbench logs)
#   MODULE               the module .so (build/ngx_http_annotation_queue_module.so)
#   BENCH_SQL_HEADER     the src/ngx_aq_sql.h MODULE was built from (this
#                        tree's): pgbench runs its NGX_AQ_CLAIM_SQL
#   BENCH_COMMIT         the source named in the table (git describe)
#
# Every run is checked against the database (bench/lib.sh): an item claimed
# or answered twice, a key holding two items, a non-2xx answer (a 409 only
# once the queue is empty), a socket error or timeout, a reused key, an
# error-log line.  The bench finishes, lists every violation and exits 1.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
NGINX=${NGINX:-/usr/sbin/nginx}
MODULE=${MODULE:-$top/build/ngx_http_annotation_queue_module.so}

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    ITEMS=${BENCH_ITEMS:-100000}
    DURATION=${BENCH_DURATION:-5}
    WARMUP=${BENCH_WARMUP:-2}
    REPEAT=${BENCH_REPEAT:-1}
else
    ITEMS=${BENCH_ITEMS:-1000000}
    DURATION=${BENCH_DURATION:-20}
    WARMUP=${BENCH_WARMUP:-2}
    REPEAT=${BENCH_REPEAT:-3}
fi
default_keys=$((DURATION * 10000))
[ "$default_keys" -ge 10000 ] || default_keys=10000
KEYS=${BENCH_KEYS:-$default_keys}
LEVELS=${BENCH_CONNECTIONS:-"8 32 64"}
POOL=${BENCH_POOL_SIZE:-8}
WORKERS=${BENCH_WORKERS:-2}
THREADS=2                  # wrk -t and pgbench -j
PREF=${BENCH_POOL_REFERENCE_REPEAT:-1}
LEASE_MS=900000            # $3 of the claim; the bench queue has its own 15 min

. "$top/bench/lib.sh"

# --- what the bench needs ----------------------------------------------------

bench_needs "$([ "${BENCH_PERF:-0}" = 1 ] && echo perf || true)"

# --- work directory, PostgreSQL, cleanup -----------------------------------

bench_workdir aq-bench

maxconn=0
for c in $LEVELS; do [ "$c" -gt "$maxconn" ] && maxconn=$c; done
pg_max=$((maxconn + WORKERS * POOL + 20))
[ "$pg_max" -ge 100 ] || pg_max=100

commit=${BENCH_COMMIT:-$(git -C "$top" describe --always --dirty 2>/dev/null || echo unknown)}
log "$(date -u '+%F %T UTC'): items=$ITEMS keys=$KEYS duration=${DURATION}s" \
    "warmup=${WARMUP}s repeat=$REPEAT levels='$LEVELS' pool=$POOL x $WORKERS workers"
dsn=$(PG_MAX_CONNECTIONS=$pg_max "$top/scripts/pg.sh" start "$work/pg")
log "PostgreSQL: $dsn (max_connections=$pg_max)"

psql_() { psql -X -qtA -v ON_ERROR_STOP=1 -d "$dsn" "$@"; }

# --- data: one organisation, one queue, ITEMS items, KEYS keys -------------
#
# Set-based: one INSERT ... SELECT for the items, one SELECT over
# generate_series calling create_api_key for the keys.  bench.keys keeps the
# plaintext key (for wrk) and its digest (for pgbench), by index i.

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

# the pgbench script: the module's statement, extracted from the header now
bench_statements

# --- nginx -------------------------------------------------------------------

bench_start_nginx "$dsn" "$WORKERS" "$POOL"

workers() { ps -o pid= --ppid "$nginx_pid" | tr -d ' '; }
rss() {   # [field] VmRSS (default) or RssAnon of each worker, kB, "a+b"
    local p out= f=${1:-VmRSS}
    for p in $(workers); do
        out+="${out:++}$(awk -v f="$f:" '$1 == f {print $2}' "/proc/$p/status")"
    done
    echo "$out"
}
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)

# CPU accounting, in clock ticks.  A process tree's CPU: the parent's own
# and its reaped children's (utime stime cutime cstime), plus its live
# children's; the difference of two such sums counts every child that lived
# in between, even one that exited (pgbench's backends).  snap prints: wall
# ticks, machine busy ticks (/proc/stat), nginx, PostgreSQL, and the reaped
# children of the calling shell (the driver, wrk or pgbench).
tree_ticks() {
    local kids
    kids=$(ps -o pid= --ppid "$1" | awk '{printf "/proc/%s/stat ", $1}')
    { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"
      # shellcheck disable=SC2086
      [ -z "$kids" ] || { cat $kids 2>/dev/null || true; } | awk '{s += $14 + $15} END {print s + 0}'
    } | awk '{s += $1} END {print s + 0}'
}
snap() {   # shell pid (BASHPID of the caller)
    echo "$(awk -v hz="$HZ" '{printf "%d", $1 * hz}' /proc/uptime)" \
         "$(awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)" \
         "$(tree_ticks "$nginx_pid")" \
         "$(tree_ticks "$(head -1 "$work/pg/data/postmaster.pid")")" \
         "$(awk '{print $16 + $17}' "/proc/$1/stat")"
}
cpu_per_claim() {   # snap0 snap1 claims -> nginx_us pg_us driver_us others_pct
    awk -v a="$1" -v b="$2" -v n="$3" -v hz="$HZ" -v ncpu="$NCPU" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        wall = y[1] - x[1]; busy = y[2] - x[2]
        ng = y[3] - x[3]; pg = y[4] - x[4]; drv = y[5] - x[5]
        if (wall <= 0) wall = 1
        if (n <= 0) n = 1
        others = (busy - ng - pg - drv) * 100 / (ncpu * wall)
        if (others < 0) others = 0
        printf "%.0f %.0f %.0f %.0f\n", ng * 1e6 / hz / n, pg * 1e6 / hz / n,
               drv * 1e6 / hz / n, others
    }'
}

# --- one claim by hand, to see that it works --------------------------------

key1=$(sed -n 1p "$work/keys.txt")
answer=$(curl -s -w ' HTTP %{http_code}' -X POST "$url" \
              -H "Authorization: Bearer $key1" -H 'Content-Type: application/json' \
              -d "{\"queue_id\": \"$queue\"}")
log "sanity claim: $answer"
case "$answer" in *'HTTP 200') ;; *) die "the sanity claim failed" ;; esac

# --- between runs ---------------------------------------------------------
#
# Every claim uses a key that holds nothing: within a run each key is sent
# once (wrk threads and pgbench clients walk disjoint key ranges), and after
# every run the claimed items are put back (available, claimed_by NULL,
# attempts 0) and the table vacuumed, so every run starts from the same
# queue of ITEMS available items and all keys free again.
#
# Before the reset, every run (warm-ups included) is checked against the
# database (bench_check_module, bench_check_pgbench in bench/lib.sh): no
# item claimed twice (attempts > 1: no lease expires during a run) or
# answered twice (the item ids wrk recorded), no key holding two items, no
# error; a violation fails the bench at the end (bench_verdict).

reset() {
    # session_replication_role: no trigger fires (the NOTIFY of
    # items_notify_available, row by row: nobody listens here)
    psql_ <<'SQL' >/dev/null
SET session_replication_role = replica;
UPDATE annotation_queue.items
   SET status = 'available', claimed_by = NULL, claimed_at = NULL,
       lease_expires_at = NULL, attempts = 0
 WHERE status = 'claimed';
VACUUM annotation_queue.items;
CHECKPOINT;
SQL
}
reset

# --- the drivers -------------------------------------------------------------
#
# run_module (wrk through nginx) and run_pgbench (a pgbench script: the
# module's statement, or the minimal claim).  Each prints one line:
#   claims_per_s p50_ms p99_ms errors claimed_in_db dup_items dup_keys detail
# and checks the run (bench/lib.sh): a violation is logged, counted in the
# detail (VIOLATIONS=n) and fails the bench at the end.

run_module() {   # connections seconds label
    local c=$1 d=$2 label=$3 out s0 s1 l0 me=$BASHPID ids
    ids=$work/ids-$c-$(date +%s%N)
    l0=$(errlog_lines)
    s0=$(snap "$me")
    out=$(BENCH_KEYFILE="$work/keys.txt" BENCH_QUEUE="$queue" BENCH_THREADS=$THREADS \
          BENCH_IDS="$ids" \
          wrk -t "$THREADS" -c "$c" -d "${d}s" --timeout 10s \
              -s "$top/bench/claim.lua" "$url" 2>&1) || { echo "$out" >&2; die "wrk failed"; }
    s1=$(snap "$me")
    bench_quiesce    # the claims in flight when wrk stopped
    echo "$out" > "$work/wrk-$c-$(date +%s%N).out"
    get() { awk -v k="$1" '$1 == "BENCH" && $2 == k {print $3}' <<<"$out"; }
    local ok non200 sockerr dur p50 p99 claimed dupi dupk nv
    ok=$(get status_200); non200=$(get non200); sockerr=$(get socket_errors)
    dur=$(get duration_us); p50=$(get p50_us); p99=$(get p99_us)
    read -r claimed _ dupi dupk nv <<<"$(bench_check_module "$label" "$queue" "$c" "$out" "$ids" "$l0")"
    rm -f "$ids".*
    reset
    local errors=$((non200 + sockerr))
    local detail="statuses=$(get statuses) sockets=$(awk '$2=="socket_detail"{print $3,$4,$5,$6}' <<<"$out" | tr ' ' ',')"
    detail+=" load=$(cut -d' ' -f1 /proc/loadavg)"
    [ "$nv" -eq 0 ] || detail+=" VIOLATIONS=$nv"
    printf '%s %s %s %s %s %s %s %s %s\n' \
        "$(awk -v n="$ok" -v d="$dur" 'BEGIN {printf "%.1f", n * 1000000 / d}')" \
        "$(awk -v v="$p50" 'BEGIN {printf "%.2f", v / 1000}')" \
        "$(awk -v v="$p99" 'BEGIN {printf "%.2f", v / 1000}')" \
        "$errors" "$claimed" "$dupi" "$dupk" "$(cpu_per_claim "$s0" "$s1" "$ok")" "$detail"
}

run_pgbench() {   # clients seconds label [script: claim (default) | minimal]
    local c=$1 d=$2 label=$3 script=${4:-claim} out rc=0 prefix s0 s1 me=$BASHPID
    prefix=$work/pgb-$script-$c-$(date +%s%N)
    s0=$(snap "$me")
    out=$("$PGBENCH" -n -M prepared -c "$c" -j "$THREADS" -T "$d" \
              -f "$work/$script.pgbench" -D queue="$queue" -D lease="$LEASE_MS" \
              -D n=0 -D nclients="$c" -l --log-prefix="$prefix" "$dsn" 2>&1) || rc=$?
    s1=$(snap "$me")
    echo "$out" > "$prefix.out"
    local tx tps failed aborted p50 p99
    tx=$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' <<<"$out")
    tps=$(awk '/^tps = / {print $3}' <<<"$out")
    failed=$(awk -F': ' '/number of failed transactions/ {split($2, a, " "); print a[1]}' <<<"$out")
    aborted=$(grep -cE 'client [0-9]+ .*aborted' <<<"$out" || true)
    [ -n "$tx" ] || { echo "$out" >&2; die "pgbench failed (rc $rc)"; }
    [ -n "$tps" ] || tps=0    # no transaction finished (a collapse under load)
    read -r p50 p99 < <(cat "$prefix".[0-9]* 2>/dev/null | awk '{print $3}' | sort -n | awk '
        {a[NR] = $1}
        END {if (NR == 0) {print "0 0"; exit}
             i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
             i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
             printf "%.2f %.2f\n", a[i50] / 1000, a[i99] / 1000}')
    rm -f "$prefix".[0-9]*
    local claimed dupi dupk nv
    read -r claimed _ dupi dupk nv <<<"$(bench_check_pgbench "$label" "$queue" "$tx" "$rc" "${failed:-0}" "$aborted")"
    reset
    local detail="tx=$tx rc=$rc load=$(cut -d' ' -f1 /proc/loadavg)"
    [ "$nv" -eq 0 ] || detail+=" VIOLATIONS=$nv"
    printf '%s %s %s %s %s %s %s %s %s\n' "$tps" "$p50" "$p99" \
        "$(( ${failed:-0} + aborted ))" "$claimed" "$dupi" "$dupk" \
        "$(cpu_per_claim "$s0" "$s1" "$tx")" "$detail"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", (b > 0) ? (a / b) : 0}'; }

# --- the levels ------------------------------------------------------------

rss_start=$(rss) anon_start=$(rss RssAnon)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A R
problems=0
for c in $LEVELS; do
    # warm-up: the module's pool opens its connections and prepares; pgbench
    # opens new connections at every run anyway, and the database is as warm
    # for it as for the module
    log "--- $c connections: module warm-up ${WARMUP}s"
    run_module "$c" "$WARMUP" "$c conns warm-up" >/dev/null
    R[$c,rss0]=$(rss) R[$c,anon0]=$(rss RssAnon)
    mt=() mp50=() mp99=() me=() pt=() pp50=() pp99=() pe=() rt=() r99=()
    mng=() mpg=() mdr=() mot=() ppg=() pdr=() pot=()
    nt=() np50=() np99=() ne=() npg=() npo=() rn=() rn50=()
    for r in $(seq "$REPEAT"); do
        line=$(run_module "$c" "$DURATION" "$c conns run $r module")
        read -r t p50 p99 e cl di dk ng pg dr ot detail <<<"$line"
        log "$c conns run $r module : ${t}/s p50 ${p50} ms p99 ${p99} ms errors $e claimed $cl dup_items $di dup_keys $dk" \
            "cpu us/claim: nginx $ng pg $pg wrk $dr; others ${ot}% of the machine; $detail"
        mt+=("$t") mp50+=("$p50") mp99+=("$p99") me+=("$e")
        mng+=("$ng") mpg+=("$pg") mdr+=("$dr") mot+=("$ot")
        case "$detail" in *VIOLATIONS=*) problems=$((problems + 1)) ;; esac
        line=$(run_pgbench "$c" "$DURATION" "$c conns run $r pgbench")
        read -r t p50 p99 e cl di dk ng pg dr ot detail <<<"$line"
        log "$c conns run $r pgbench: ${t}/s p50 ${p50} ms p99 ${p99} ms errors $e claimed $cl dup_items $di dup_keys $dk" \
            "cpu us/claim: pg $pg pgbench $dr; others ${ot}% of the machine; $detail"
        pt+=("$t") pp50+=("$p50") pp99+=("$p99") pe+=("$e")
        ppg+=("$pg") pdr+=("$dr") pot+=("$ot")
        case "$detail" in *VIOLATIONS=*) problems=$((problems + 1)) ;; esac
        # the pair ran back to back: its ratio is what the noise of a shared
        # machine disturbs least
        rt+=("$(ratio "${mt[-1]}" "$t")") r99+=("$(ratio "${mp99[-1]}" "$p99")")
        line=$(run_pgbench "$c" "$DURATION" "$c conns run $r minimal" minimal)
        read -r t p50 p99 e cl di dk ng pg dr ot detail <<<"$line"
        log "$c conns run $r minimal: ${t}/s p50 ${p50} ms p99 ${p99} ms errors $e claimed $cl dup_items $di dup_keys $dk" \
            "cpu us/claim: pg $pg pgbench $dr; others ${ot}% of the machine; $detail"
        nt+=("$t") np50+=("$p50") np99+=("$p99") ne+=("$e") npg+=("$pg") npo+=("$ot")
        case "$detail" in *VIOLATIONS=*) problems=$((problems + 1)) ;; esac
        # module / minimal, of the same triple (module, pgbench, minimal)
        rn+=("$(ratio "${mt[-1]}" "$t")") rn50+=("$(ratio "${mp50[-1]}" "$p50")")
    done
    R[$c,rt]=$(median "${rt[@]}"); R[$c,r99]=$(median "${r99[@]}")
    R[$c,rss1]=$(rss) R[$c,anon1]=$(rss RssAnon)
    R[$c,mt]=$(median "${mt[@]}"); R[$c,mp50]=$(median "${mp50[@]}")
    R[$c,mp99]=$(median "${mp99[@]}"); R[$c,me]=$(sum "${me[@]}")
    R[$c,pt]=$(median "${pt[@]}"); R[$c,pp50]=$(median "${pp50[@]}")
    R[$c,pp99]=$(median "${pp99[@]}"); R[$c,pe]=$(sum "${pe[@]}")
    R[$c,mng]=$(median "${mng[@]}"); R[$c,mpg]=$(median "${mpg[@]}")
    R[$c,mdr]=$(median "${mdr[@]}"); R[$c,mot]=$(median "${mot[@]}")
    R[$c,ppg]=$(median "${ppg[@]}"); R[$c,pdr]=$(median "${pdr[@]}")
    R[$c,pot]=$(median "${pot[@]}")
    R[$c,nt]=$(median "${nt[@]}"); R[$c,np50]=$(median "${np50[@]}")
    R[$c,np99]=$(median "${np99[@]}"); R[$c,ne]=$(sum "${ne[@]}")
    R[$c,npg]=$(median "${npg[@]}"); R[$c,npo]=$(median "${npo[@]}")
    R[$c,rn]=$(median "${rn[@]}"); R[$c,rn50]=$(median "${rn50[@]}")
done

# --- pgbench at the module's own database concurrency --------------------
#
# The module never runs more than workers x pool size statements at once; at
# higher connection counts the rest wait in nginx.  pgbench with that many
# clients is the database's limit at the concurrency the module really uses.

dbc=$((WORKERS * POOL))
ref=
case " $LEVELS " in *" $dbc "*) ;; *)
    if [ "$dbc" -lt "$maxconn" ] && [ "${BENCH_POOL_REFERENCE:-1}" = 1 ]; then
        log "--- pgbench at $dbc clients (workers x pool), $PREF run(s)"
        pt=() pp50=() pp99=() pe=()
        for r in $(seq "$PREF"); do
            line=$(run_pgbench "$dbc" "$DURATION" "$dbc clients run $r pgbench")
            read -r t p50 p99 e cl di dk ng pg dr ot detail <<<"$line"
            log "$dbc clients run $r pgbench: ${t}/s p50 ${p50} ms p99 ${p99} ms errors $e claimed $cl dup_items $di dup_keys $dk" \
                "cpu us/claim: pg $pg pgbench $dr; others ${ot}% of the machine; $detail"
            pt+=("$t") pp50+=("$p50") pp99+=("$p99") pe+=("$e")
        done
        ref=$(printf 'pgbench at %s clients (= %s workers x pool %s, the most the module runs at once), median of %s: %.0f claims/s, p50 %.2f ms, p99 %.2f ms, errors %s' \
                  "$dbc" "$WORKERS" "$POOL" "$PREF" "$(median "${pt[@]}")" "$(median "${pp50[@]}")" \
                  "$(median "${pp99[@]}")" "$(sum "${pe[@]}")")
    fi ;;
esac

# --- optional profile --------------------------------------------------------

if [ "${BENCH_PERF:-0}" = 1 ]; then
    # flat profiles of this bench's own processes only (the machine may run
    # other things): for the module's run, the nginx workers, the backends
    # of the module's connections and wrk; for pgbench's, the postmaster,
    # which perf follows into the backends it forks for pgbench
    pd=$((DURATION < 10 ? DURATION : 10))
    postmaster=$(head -1 "$work/pg/data/postmaster.pid")
    top_() { perf report -i "$1" --stdio --no-children "${@:2}" 2>/dev/null \
                 | grep -E '^ +[0-9]' | sed -E 's/( +-)* *$//' | head -"$n" || true; }

    log "--- perf: one module run at $maxconn connections, ${pd}s"
    l0=$(errlog_lines)
    (BENCH_KEYFILE="$work/keys.txt" BENCH_QUEUE="$queue" BENCH_THREADS=$THREADS \
         BENCH_IDS="$work/ids-perf" exec wrk -t "$THREADS" -c "$maxconn" -d "${pd}s" \
             --timeout 10s -s "$top/bench/claim.lua" "$url" > "$work/perf-wrk.out" 2>&1) &
    wrk_bg=$!
    sleep 1
    pids=$( { workers; ps -o pid= --ppid "$postmaster"; echo "$wrk_bg"; } | tr -d ' ' | paste -sd, -)
    perf record -q -F 999 -p "$pids" -o "$work/perf-module.data" -- sleep "$((pd - 2))" \
        >/dev/null 2>&1 || log "perf record failed"
    wait "$wrk_bg" || true
    bench_quiesce
    bench_check_module "perf module run" "$queue" "$maxconn" "$(cat "$work/perf-wrk.out")" \
        "$work/ids-perf" "$l0" >/dev/null
    reset

    log "--- perf: one pgbench run at $maxconn clients, ${pd}s"
    ("$PGBENCH" -n -M prepared -c "$maxconn" -j "$THREADS" -T "$pd" \
         -f "$work/claim.pgbench" -D queue="$queue" -D lease="$LEASE_MS" \
         -D n=0 -D nclients="$maxconn" "$dsn" > "$work/perf-pgbench.out" 2>&1) &
    pgb_bg=$!
    perf record -q -F 999 -p "$postmaster" -o "$work/perf-pgbench.data" -- sleep "$((pd - 1))" \
        >/dev/null 2>&1 || log "perf record failed"
    rc=0
    wait "$pgb_bg" || rc=$?
    bench_check_pgbench "perf pgbench run" "$queue" \
        "$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' "$work/perf-pgbench.out")" \
        "$rc" "$(awk -F': ' '/number of failed transactions/ {split($2, a, " "); print a[1]}' "$work/perf-pgbench.out")" \
        "$(grep -cE 'client [0-9]+ .*aborted' "$work/perf-pgbench.out" || true)" >/dev/null
    reset

    if [ -s "$work/perf-module.data" ]; then
        f=$work/perf-module.data
        echo
        echo "perf, module run at $maxconn connections: samples by process"
        n=6 top_ "$f" --sort comm
        echo
        echo "perf: nginx workers by shared object (percent of all samples)"
        n=10 top_ "$f" --comm nginx --sort dso
        echo
        echo "perf: nginx workers, top symbols"
        n=20 top_ "$f" --comm nginx --sort dso,symbol
        echo
        echo "perf: postgres (the module's connections), top symbols"
        n=12 top_ "$f" --comm postgres --sort dso,symbol
    fi
    if [ -s "$work/perf-pgbench.data" ]; then
        echo
        echo "perf, pgbench run at $maxconn clients ($(awk '/^tps/ {printf "%.0f claims/s", $3}' "$work/perf-pgbench.out")):" \
             "postgres, top symbols"
        n=12 top_ "$work/perf-pgbench.data" --comm postgres --sort dso,symbol
    fi
fi

# --- the table -----------------------------------------------------------

echo
echo "annotation queue claim benchmark, $(date -u '+%F %H:%M UTC'), $(nproc) cores," \
     "load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "module $MODULE, source $commit"
echo "items=$ITEMS keys=$KEYS ${DURATION}s per run, medians of $REPEAT; nginx $WORKERS workers," \
     "pool $POOL per worker; wrk -t$THREADS, pgbench -M prepared -j$THREADS -c <conns>"
echo
printf '| %5s | %9s | %6s | %6s | %6s | %10s | %6s | %6s | %6s | %10s | %6s | %6s | %6s | %7s | %7s | %7s | %7s |\n' \
    conns "module /s" "p50 ms" "p99 ms" errors "pgbench /s" "p50 ms" "p99 ms" errors \
    "minimal /s" "p50 ms" "p99 ms" errors "mod/pgb" "p99 m/p" "mod/min" "p50 m/m"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ------: ----------: -------: \
    -------: -------: -----------: -------: -------: -------: -----------: -------: -------: \
    -------: --------: --------: --------: --------:
for c in $LEVELS; do
    printf '| %5s | %9.0f | %6.2f | %6.2f | %6s | %10.0f | %6.2f | %6.2f | %6s | %10.0f | %6.2f | %6.2f | %6s | %7.2f | %7.2f | %7.2f | %7.2f |\n' \
        "$c" "${R[$c,mt]}" "${R[$c,mp50]}" "${R[$c,mp99]}" "${R[$c,me]}" \
        "${R[$c,pt]}" "${R[$c,pp50]}" "${R[$c,pp99]}" "${R[$c,pe]}" \
        "${R[$c,nt]}" "${R[$c,np50]}" "${R[$c,np99]}" "${R[$c,ne]}" \
        "${R[$c,rt]}" "${R[$c,r99]}" "${R[$c,rn]}" "${R[$c,rn50]}"
done
[ -z "$ref" ] || { echo; echo "$ref"; }
echo
echo "CPU per claim, microseconds (medians): the module's run (nginx workers, PostgreSQL, wrk)"
echo "and pgbench's (PostgreSQL, pgbench); others = CPU used by processes outside this bench"
echo "during the run, % of the machine (a shared machine's noise: high means distrust the run)"
echo
printf '| %5s | %8s | %8s | %8s | %9s | %8s | %9s | %9s | %8s | %9s |\n' conns "nginx" "pg (mod)" "wrk" \
    "others %" "pg (pgb)" "pgbench" "others %" "pg (min)" "others %"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ------: ---------: ---------: ---------: ----------: \
    ---------: ----------: ----------: ---------: ----------:
for c in $LEVELS; do
    printf '| %5s | %8s | %8s | %8s | %9s | %8s | %9s | %9s | %8s | %9s |\n' "$c" "${R[$c,mng]}" \
        "${R[$c,mpg]}" "${R[$c,mdr]}" "${R[$c,mot]}" "${R[$c,ppg]}" "${R[$c,pdr]}" "${R[$c,pot]}" \
        "${R[$c,npg]}" "${R[$c,npo]}"
done
echo
echo "worker VmRSS kB at start $rss_start, per level before->after:" \
     "$(for c in $LEVELS; do printf '%s: %s -> %s; ' "$c" "${R[$c,rss0]}" "${R[$c,rss1]}"; done)"
echo "worker VmRSS kB at end $(rss); RssAnon (the heap: what a leak grows)" \
     "at start $anon_start, then per level before->after:" \
     "$(for c in $LEVELS; do printf '%s: %s -> %s; ' "$c" "${R[$c,anon0]}" "${R[$c,anon1]}"; done)"
echo "ratios: mod/pgb, p99 m/p: module / pgbench (the module's statement); mod/min, p50 m/m: module /"
echo "minimal (bench/minimal.sql); each the median of the ratios of the $REPEAT back-to-back triples"
echo "errors: non-200 statuses + socket errors (module), failed + aborted clients (pgbench, minimal), summed over runs"
n=$(log_problems)
echo "nginx error log: $n lines at error level or above"
if [ "$n" -gt 0 ]; then
    grep -E '\[(error|crit|alert|emerg)\]' "$errlog" \
        | sed -E 's/^[0-9\/: ]+\[/[/; s/[0-9]+#[0-9]+: \*?[0-9]* ?//' | sort | uniq -c | sort -rn | head -10
fi
[ "$problems" -eq 0 ] || echo "$problems run(s) with violations (VIOLATIONS= in their log lines)"
bench_verdict || exit 1
