#!/usr/bin/env bash
# make bench-citus: claims per second through the module on Citus (a
# coordinator and two workers on this machine) against plain PostgreSQL on
# the same machine, at 8 and 64 connections, with the share of the CPU each
# node took.  See bench/README.md, "Citus".
#
# The same data on both: one organisation, two queues of BENCH_ITEMS items
# each (on Citus one queue on each worker, placed by
# get_shard_id_for_distribution_column), BENCH_KEYS keys.  nginx (2 workers,
# pool BENCH_POOL_SIZE per worker) is pointed at the plain server or at the
# coordinator; two wrk processes (bench/claim.lua, a fresh key per request)
# claim from the two queues at once, half of the connections each.  Every
# run is checked against the database as bench/run.sh's are (bench/lib.sh:
# no item claimed or answered twice, no key holding two items, no error)
# and the claims are put back after it.
#
# Environment: BENCH_ITEMS (100000 per queue), BENCH_DURATION (15 s),
# BENCH_REPEAT (3, the median is reported), BENCH_CONNECTIONS ("8 64"),
# BENCH_POOL_SIZE (8), BENCH_KEYS and BENCH_KEYS_CITUS (the keys made on
# each: 8000 and 2000 per second of a run), BENCH_QUICK=1 (20000 items,
# 5 s, 1 repeat),
# BENCH_KEEP=1 (keep the work directory).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
NGINX=${NGINX:-/usr/sbin/nginx}
MODULE=${MODULE:-$top/build/ngx_http_annotation_queue_module.so}

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    ITEMS=${BENCH_ITEMS:-20000}; DURATION=${BENCH_DURATION:-5}; REPEAT=${BENCH_REPEAT:-1}
else
    ITEMS=${BENCH_ITEMS:-100000}; DURATION=${BENCH_DURATION:-15}; REPEAT=${BENCH_REPEAT:-3}
fi
LEVELS=${BENCH_CONNECTIONS:-"8 64"}
POOL=${BENCH_POOL_SIZE:-8}
WORKERS=2
# keys: one per claim of a run; a key of a reference table costs Citus a
# write on every node, so Citus (an order of magnitude slower here) gets
# fewer
KEYS_PLAIN=${BENCH_KEYS:-$((DURATION * 8000))}
KEYS_CITUS=${BENCH_KEYS_CITUS:-$((DURATION * 2000))}

. "$top/bench/lib.sh"

bench_needs
"$top/scripts/build-citus.sh"
bench_workdir aq-bench-citus

# lib.sh's cleanup stops nginx and the plain server; the cluster too
citus_cleanup() {
    "$top/scripts/citus.sh" stop "$work/citus" >/dev/null 2>&1 || true
    bench_cleanup
}
trap citus_cleanup EXIT

HZ=$(getconf CLK_TCK)
export BENCH_CHECK_QUEUE=1    # two queues claimed at once: check each alone
NCPU=$(nproc)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "$(date -u '+%F %T UTC'): items=$ITEMS x 2 queues keys=$KEYS_PLAIN/$KEYS_CITUS duration=${DURATION}s" \
    "repeat=$REPEAT levels='$LEVELS' pool=$POOL x $WORKERS nginx workers; load $load_start"

plain_dsn=$(PG_MAX_CONNECTIONS=300 "$top/scripts/pg.sh" start "$work/pg")
citus_dsn=$(PGOPTIONS='-c client_min_messages=error' PG_MAX_CONNECTIONS=300 \
            "$top/scripts/citus.sh" start "$work/citus" 2>/dev/null)
log "plain: $plain_dsn; Citus coordinator: $citus_dsn"

# the postmaster pids of the nodes
pm_plain() { head -1 "$work/pg/data/postmaster.pid"; }
pm_node() { head -1 "$work/citus/$1/data/postmaster.pid"; }

# --- data ---------------------------------------------------------------------

setup() {   # dsn citus(0|1) -> "queue1 queue2"
    local org q1 q2 q node
    org=$(psql_ -c "SELECT annotation_queue.create_org('bench')")
    if [ "$2" = 1 ]; then
        # one queue on each worker
        q1= q2=
        for i in $(seq 200); do
            q=$(psql_ -c "SELECT annotation_queue.create_queue('$org', 'bench-$i')")
            node=$(psql_ -c "SELECT nodeport FROM citus_shards
                              WHERE table_name = 'annotation_queue.items'::regclass
                                AND shardid = get_shard_id_for_distribution_column(
                                                  'annotation_queue.items', '$q'::uuid)")
            if [ "$node" = "$(cat "$work/citus/worker1/port")" ] && [ -z "$q1" ]; then q1=$q; fi
            if [ "$node" = "$(cat "$work/citus/worker2/port")" ] && [ -z "$q2" ]; then q2=$q; fi
            [ -z "$q1" ] || [ -z "$q2" ] || break
        done
        [ -n "$q1" ] && [ -n "$q2" ] || die "no queue on each worker"
    else
        q1=$(psql_ -c "SELECT annotation_queue.create_queue('$org', 'bench-1')")
        q2=$(psql_ -c "SELECT annotation_queue.create_queue('$org', 'bench-2')")
    fi
    for q in $q1 $q2; do
        bench_items "$q" 1 "$ITEMS"
    done
    bench_keys "$org" "$KEYS" >/dev/null
    psql_ -c 'VACUUM (ANALYZE) annotation_queue.items' -c 'VACUUM (ANALYZE) annotation_queue.api_keys' >/dev/null
    echo "$q1 $q2"
}

reset() {
    psql_ >/dev/null <<'SQL'
UPDATE annotation_queue.items
   SET status = 'available', claimed_by = NULL, claimed_at = NULL,
       lease_expires_at = NULL, attempts = 0
 WHERE status = 'claimed';
VACUUM annotation_queue.items;
SQL
}

# --- CPU: ticks of a process tree (a postmaster's, nginx's) -------------------

tree_ticks() {
    local kids
    kids=$(ps -o pid= --ppid "$1" | awk '{printf "/proc/%s/stat ", $1}')
    { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"
      # shellcheck disable=SC2086
      [ -z "$kids" ] || { cat $kids 2>/dev/null || true; } | awk '{s += $14 + $15} END {print s + 0}'
    } | awk '{s += $1} END {print s + 0}'
}
# wall busy nginx node... (node: the postmasters given)
snap() {
    local p out
    out="$(awk -v hz="$HZ" '{printf "%d", $1 * hz}' /proc/uptime)"
    out+=" $(awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)"
    out+=" $(tree_ticks "$nginx_pid")"
    for p in "$@"; do out+=" $(tree_ticks "$p")"; done
    echo "$out"
}
# percentages of the machine (NCPU cores) for each field after wall
shares() {
    awk -v a="$1" -v b="$2" -v ncpu="$NCPU" 'BEGIN {
        n = split(a, x, " "); split(b, y, " ")
        wall = y[1] - x[1]; if (wall <= 0) wall = 1
        for (i = 2; i <= n; i++)
            printf "%s%.0f", (i > 2 ? " " : ""), (y[i] - x[i]) * 100 / (ncpu * wall)
        print ""
    }'
}

# --- one run ------------------------------------------------------------------

# run CONNS -> "claims_per_s p50_ms busy% nginx% node%... violations"
run() {
    local c=$1 half=$(( $1 / 2 )) s0 s1 l0 o1 o2 ok1 ok2 d1 d2 v
    l0=$(errlog_lines)
    s0=$(snap "${pms[@]}")
    BENCH_KEYFILE="$work/keys1.txt" BENCH_QUEUE="$q1" BENCH_THREADS=1 BENCH_IDS="$work/ids1" \
        wrk -t 1 -c "$half" -d "${DURATION}s" --timeout 10s \
            -s "$top/bench/claim.lua" "$url" > "$work/wrk1.out" 2>&1 &
    local w1=$!
    BENCH_KEYFILE="$work/keys2.txt" BENCH_QUEUE="$q2" BENCH_THREADS=1 BENCH_IDS="$work/ids2" \
        wrk -t 1 -c "$half" -d "${DURATION}s" --timeout 10s \
            -s "$top/bench/claim.lua" "$url" > "$work/wrk2.out" 2>&1 &
    local w2=$!
    wait "$w1" || die "wrk failed: $(cat "$work/wrk1.out")"
    wait "$w2" || die "wrk failed: $(cat "$work/wrk2.out")"
    s1=$(snap "${pms[@]}")
    bench_quiesce
    o1=$(cat "$work/wrk1.out"); o2=$(cat "$work/wrk2.out")
    ok1=$(bench_wrk_value status_200 "$o1"); ok2=$(bench_wrk_value status_200 "$o2")
    d1=$(bench_wrk_value duration_us "$o1"); d2=$(bench_wrk_value duration_us "$o2")
    read -r _ _ _ _ v1 <<<"$(bench_check_module "$label c=$c q1" "$q1" "$half" "$o1" "$work/ids1" "$l0")"
    read -r _ _ _ _ v2 <<<"$(bench_check_module "$label c=$c q2" "$q2" "$half" "$o2" "$work/ids2" "")"
    rm -f "$work"/ids1.* "$work"/ids2.*
    reset
    printf '%s %s %s %s\n' \
        "$(awk -v a="$ok1" -v b="$ok2" -v x="$d1" -v y="$d2" 'BEGIN {printf "%.0f", a * 1e6 / x + b * 1e6 / y}')" \
        "$(awk -v a="$(bench_wrk_value p50_us "$o1")" -v b="$(bench_wrk_value p50_us "$o2")" 'BEGIN {printf "%.2f", (a + b) / 2000}')" \
        "$(shares "$s0" "$s1")" "$((v1 + v2))"
}

# --- the two targets ------------------------------------------------------------

declare -A result
for target in plain citus; do
    if [ "$target" = plain ]; then
        dsn=$plain_dsn; pms=("$(pm_plain)"); label=plain
    else
        dsn=$citus_dsn; pms=("$(pm_node coordinator)" "$(pm_node worker1)" "$(pm_node worker2)"); label=citus
    fi
    psql_() { psql -X -qtA -v ON_ERROR_STOP=1 -d "$dsn" "$@"; }
    t0=$(date +%s)
    if [ "$target" = plain ]; then KEYS=$KEYS_PLAIN; else KEYS=$KEYS_CITUS; fi
    read -r q1 q2 <<<"$(setup "$dsn" "$([ "$target" = citus ] && echo 1 || echo 0)")"
    half_keys=$((KEYS / 2))
    psql_ -c "\\copy (SELECT key FROM bench.keys WHERE i <= $half_keys ORDER BY i) TO '$work/keys1.txt'"
    psql_ -c "\\copy (SELECT key FROM bench.keys WHERE i > $half_keys ORDER BY i) TO '$work/keys2.txt'"
    log "$target: loaded 2 x $ITEMS items and $KEYS keys in $(( $(date +%s) - t0 )) s"
    # on Citus every key is flagged: the wide claim at once (README)
    bench_start_nginx "$dsn" "$WORKERS" "$POOL" \
        "$([ "$target" = citus ] && echo 'annotation_queue_claim_wide on;')"
    for c in $LEVELS; do
        run "$c" >/dev/null      # warm-up (checked too)
        lines=()
        for r in $(seq "$REPEAT"); do
            line=$(run "$c")
            log "$target c=$c run $r: $line (claims/s p50_ms busy% nginx% nodes%... violations) load=$(cut -d' ' -f1 /proc/loadavg)"
            lines+=("$line")
        done
        # the run of the median throughput
        result[$target,$c]=$(printf '%s\n' "${lines[@]}" | sort -n | awk -v n="${#lines[@]}" 'NR == int((n + 1) / 2)')
    done
    kill -QUIT "$nginx_pid"
    for _ in $(seq 50); do kill -0 "$nginx_pid" 2>/dev/null || break; sleep 0.1; done
    nginx_pid=
done

echo
echo "Citus bench, $(date -u '+%F %T UTC'), $(nproc) cores, load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "items $ITEMS x 2 queues, ${DURATION}s x $REPEAT (median), nginx $WORKERS workers x pool $POOL, 2 wrk (one per queue)"
echo "CPU: % of the machine ($NCPU cores) during the run"
printf '%-8s %5s %10s %8s %6s %6s %s\n' target conns claims/s p50_ms busy nginx "postgres (plain | coordinator worker1 worker2)"
for target in plain citus; do
    for c in $LEVELS; do
        read -r cps p50 busy ng rest <<<"${result[$target,$c]}"
        nodes=${rest% *}
        printf '%-8s %5s %10s %8s %5s%% %5s%% %s\n' "$target" "$c" "$cps" "$p50" "$busy" "$ng" "$(echo "$nodes" | sed 's/\([0-9]*\)/\1%/g')"
    done
done
bench_verdict
