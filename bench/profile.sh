#!/usr/bin/env bash
# make bench-profile: where the module's claim statement spends its database
# time, against the minimal claim (issue 9, item 3).  See bench/README.md
# ("Where the statement's time goes").
#
# One PostgreSQL (scripts/pg.sh) with pg_stat_statements, one queue of
# BENCH_ITEMS items, fresh keys.  Four statements, each a pgbench script
# with a fresh key per transaction (as make bench):
#   claim    the module's NGX_AQ_CLAIM_SQL (bench/claim-sql.pl)
#   v1       claim without the resume: mine, held, mine_expired cut, cand
#            is next alone, the answer is the claimed row alone
#   v2       v1 without the skip scan: walk and next replaced by one
#            available candidate (items_available_idx, FOR UPDATE SKIP
#            LOCKED), the answer's shape kept (key_ok, queue_ok, to_char)
#   minimal  bench/minimal.sql
# v1 and v2 are cut from the statement's text at run time (a variant whose
# marks are not found is left out, said so): measurements of what those
# parts cost, not statements to use.
#
# Then ROUNDS rounds, at each of CLIENTS (1 and 8), of the four in turn
# (the order turns each round), DURATION seconds each, the queue put back
# and vacuumed after each run: claims/s, PostgreSQL's CPU per claim (every
# backend, through the postmaster's reaped children), and from
# pg_stat_statements the mean execution time (ExecutorRun and Finish: not
# the executor's start and end), planning and shared buffers per call;
# medians of the rounds, and the ratio to the minimal claim of the same
# round and clients.  Last, EXPLAINS executions of each statement in one
# session with EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON), prepared, fresh keys,
# after 6 warm executions (the plan cache's generic plan, as the module's
# connections use): mean per CTE (its node's time, inclusive, and shared
# buffers), the execution time, and what the executor spent outside the
# plan's top node (its start: plan nodes and expressions initialised each
# execution; its end).
#
# Environment:
#   BENCH_ITEMS              items in the queue (300000)
#   BENCH_PROFILE_ROUNDS     rounds (3)
#   BENCH_PROFILE_CLIENTS    pgbench clients ("1 8")
#   BENCH_DURATION           seconds per run (5)
#   BENCH_PROFILE_EXPLAINS   EXPLAIN ANALYZE executions per statement (200)
#   BENCH_SQL_HEADER         the header whose claim is profiled (src/ngx_aq_sql.h)
#   BENCH_KEEP=1             keep the work directory
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
MODULE=${MODULE:-$top/build/ngx_http_annotation_queue_module.so}
ITEMS=${BENCH_ITEMS:-300000}
ROUNDS=${BENCH_PROFILE_ROUNDS:-3}
CLIENTS=${BENCH_PROFILE_CLIENTS:-"1 8"}
DURATION=${BENCH_DURATION:-5}
EXPLAINS=${BENCH_PROFILE_EXPLAINS:-200}
HEADER=${BENCH_SQL_HEADER:-$top/src/ngx_aq_sql.h}
LEASE_MS=900000

. "$top/bench/lib.sh"
nginx_pid=
bench_needs
bench_workdir aq-bench-profile
t_start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# --- PostgreSQL with pg_stat_statements -------------------------------------

dsn=$("$top/scripts/pg.sh" start "$work/pg")
psql_() { psql -X -qtA -v ON_ERROR_STOP=1 -d "$dsn" "$@"; }
psql_ -c "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'" >/dev/null
"$top/scripts/pg.sh" stop "$work/pg"
dsn=$("$top/scripts/pg.sh" start "$work/pg")
psql_ <<'SQL' >/dev/null
CREATE EXTENSION pg_stat_statements;
ALTER SYSTEM SET pg_stat_statements.track_planning = on;
SELECT pg_reload_conf();
SQL
log "PostgreSQL: $dsn, pg_stat_statements; load average $load_start"

# --- data ----------------------------------------------------------------------

read -r org queue < <(bench_org_queue)
bench_items "$queue" 1 "$ITEMS"

# keys: each used once in the whole profile (runs take disjoint ranges of
# 20,000 per second of run: twice the fastest statement here, since
# pgbench's clients, each walking its own keys, do not run evenly)
per_run=$((DURATION * 20000))
KEYS=$((ROUNDS * $(wc -w <<<"$CLIENTS") * 4 * per_run + 4 * (EXPLAINS + 10)))
t0=$(date +%s)
bench_keys "$org" "$KEYS"
psql_ -c "VACUUM (FREEZE, ANALYZE) annotation_queue.items" -c "VACUUM (FREEZE, ANALYZE) annotation_queue.api_keys" \
      -c "VACUUM (FREEZE, ANALYZE) bench.keys"
log "$ITEMS items, $KEYS keys in $(( $(date +%s) - t0 )) s"

reset() {
    psql_ <<'SQL' >/dev/null
UPDATE annotation_queue.items
   SET status = 'available', claimed_by = NULL, claimed_at = NULL,
       lease_expires_at = NULL, attempts = 0
 WHERE status = 'claimed';
VACUUM annotation_queue.items;
SQL
}

# --- the statements ------------------------------------------------------------

BENCH_SQL_HEADER=$HEADER bench_statements
cp "$work/claim.sql" "$work/claim.full.sql"
variant() {   # name: $work/claim.sql cut -> $work/NAME.sql, or nothing
    perl -e '
        my ($v) = @ARGV; local $/; my $s = <STDIN>; chomp $s;
        sub cut { my ($s, $a, $b) = @_; my $i = index($s, $a); my $j = index($s, $b, $i);
                  die "mark not found: $a .. $b\n" if $i < 0 || $j < 0; substr($s, $i, $j - $i) = ""; $s }
        $s = cut($s, "mine AS MATERIALIZED (", "walk (hi, lo, since)");
        $s =~ s/AND NOT EXISTS \(SELECT 1 FROM held\)//g;
        $s =~ s/cand AS \(\s+SELECT \* FROM mine_expired\s+UNION ALL\s+SELECT \* FROM next\s+LIMIT 1 \)/cand AS ( SELECT * FROM next LIMIT 1 )/
            or die "mark not found: cand\n";
        $s =~ s/r AS \(\s+SELECT \* FROM claimed\s+UNION ALL\s+SELECT \* FROM held \)/r AS ( SELECT * FROM claimed )/
            or die "mark not found: r\n";
        die "held or mine left\n" if $s =~ /\b(held|mine)\b/;
        if ($v eq "v2") {
            $s = cut($s, "walk (hi, lo, since)", "cand AS");
            $s =~ s/cand AS \(/next AS MATERIALIZED ( SELECT i.id, i.version FROM annotation_queue.items i WHERE i.queue_id = \$2 AND i.status = \x27available\x27 AND EXISTS (SELECT 1 FROM q) ORDER BY i.priority DESC, i.seq LIMIT 1 FOR UPDATE SKIP LOCKED ), cand AS (/;
        }
        print $s, "\n";' "$1" < "$work/claim.full.sql" > "$work/$1.sql" 2> "$work/$1.err" || return 1
    # as a pgbench script, through claim-sql.pl (a header of one #define)
    perl -ne 'chomp; s/\\/\\\\/g; s/"/\\"/g; print "#define NGX_AQ_CLAIM_SQL \"$_\"\n"' \
        "$work/$1.sql" > "$work/$1.h"
    {
        echo '\set k :client_id + :nclients * :n + 1'
        echo '\set n :n + 1'
        "$top/bench/claim-sql.pl" --pgbench "$work/$1.h"
    } > "$work/$1.pgbench"
}
STMTS=(claim)
for v in v1 v2; do
    if variant "$v"; then STMTS+=("$v"); else log "variant $v left out: $(cat "$work/$v.err")"; fi
done
STMTS+=(minimal)
cp "$work/claim.full.sql" "$work/claim.sql"
# minimal.sql for PREPARE: the pgbench variables back to parameters
grep -v '^--' "$top/bench/minimal.sql" \
    | perl -pe 's/\(SELECT digest FROM bench\.keys WHERE i = :k\)/\$1/g; s/:queue\b/\$2/g; s/:lease\b/\$3/g' \
    > "$work/minimal.sql"

# --- runs ------------------------------------------------------------------------

HZ=$(getconf CLK_TCK)
pg_ticks() {   # the postmaster's CPU and its reaped and live children's
    local pm kids
    pm=$(head -1 "$work/pg/data/postmaster.pid")
    kids=$(ps -o pid= --ppid "$pm" | awk '{printf "/proc/%s/stat ", $1}')
    { awk '{print $14 + $15 + $16 + $17}' "/proc/$pm/stat"
      # shellcheck disable=SC2086
      [ -z "$kids" ] || { cat $kids 2>/dev/null || true; } | awk '{s += $14 + $15} END {print s + 0}'
    } | awk '{s += $1} END {print s + 0}'
}
pgss() {   # -> calls exec_ms plan_ms buffers_per_call
    psql_ -F' ' <<'SQL'
SELECT coalesce(sum(calls), 0),
       round(coalesce(sum(total_exec_time) / nullif(sum(calls), 0), 0)::numeric, 4),
       round(coalesce(sum(total_plan_time) / nullif(sum(calls), 0), 0)::numeric, 4),
       round(coalesce(sum(shared_blks_hit + shared_blks_read) / nullif(sum(calls), 0), 0)::numeric, 1)
  FROM pg_stat_statements
 WHERE query LIKE 'WITH%' AND calls >= 10;
SQL
}

declare -A M
kbase=0
r_one() {   # statement clients round
    local s=$1 c=$2 r=$3 out rc=0 t0 t1 tx tps calls ex pl bu
    psql_ -c "SELECT pg_stat_statements_reset()" >/dev/null
    t0=$(pg_ticks)
    out=$("$PGBENCH" -n -M prepared -c "$c" -j "$(( c < 2 ? 1 : 2 ))" -T "$DURATION" \
              -f "$work/$s.pgbench" -D queue="$queue" -D lease="$LEASE_MS" \
              -D n="$((kbase / c))" -D nclients="$c" "$dsn" 2>&1) || rc=$?
    t1=$(pg_ticks)
    tx=$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' <<<"$out")
    tps=$(awk '/^tps = / {printf "%.0f", $3}' <<<"$out")
    [ "$rc" -eq 0 ] && [ -n "$tx" ] || { echo "$out" >&2; die "pgbench $s failed"; }
    [ "$tx" -lt "$((per_run * 3 / 4))" ] || die "pgbench $s: $tx transactions, too many for the $per_run keys of a run"
    read -r calls ex pl bu <<<"$(pgss)"
    local claimed
    claimed=$(psql_ -v queue="$queue" <<<"SELECT count(*) FROM annotation_queue.items WHERE queue_id = :'queue' AND status = 'claimed'")
    [ "$claimed" -eq "$tx" ] ||
        bench_violation "$s $c clients round $r" "$tx transactions but $claimed items claimed"
    kbase=$((kbase + per_run))
    M[$s,$c,$r,t]=$tps
    M[$s,$c,$r,cpu]=$(awk -v d="$((t1 - t0))" -v hz="$HZ" -v n="$tx" 'BEGIN {printf "%.0f", d * 1e6 / hz / n}')
    M[$s,$c,$r,ex]=$ex M[$s,$c,$r,pl]=$pl M[$s,$c,$r,bu]=$bu
    log "round $r, $c client(s), $s: ${tps}/s, pg ${M[$s,$c,$r,cpu]} us/claim, exec $ex ms, plan $pl ms," \
        "$bu buffers/call ($calls calls); load $(cut -d' ' -f1 /proc/loadavg)"
    reset
}

reset
for r in $(seq "$ROUNDS"); do
    for c in $CLIENTS; do
        n=${#STMTS[@]}
        for ((j = 0; j < n; j++)); do
            r_one "${STMTS[(j + r) % n]}" "$c" "$r"
        done
    done
done

# --- EXPLAIN ANALYZE per CTE -----------------------------------------------------

explain_ctes() {   # statement -> lines "name ms buffers"
    local s=$1 f=$work/explain-$1.json j
    {
        echo "PREPARE st(bytea, uuid, int8) AS"
        sed -e 's/;[[:space:]]*$//' "$work/$s.sql"
        echo ";"
        for j in $(seq 6); do
            echo "SELECT digest AS d FROM bench.keys WHERE i = $((kbase + j)) \\gset"
            echo "EXECUTE st(:'d', '$queue', $LEASE_MS) \\g /dev/null"
        done
        for j in $(seq 7 $((EXPLAINS + 6))); do
            echo "SELECT digest AS d FROM bench.keys WHERE i = $((kbase + j)) \\gset"
            echo "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE st(:'d', '$queue', $LEASE_MS);"
        done
    } | psql -X -q -A -t -v ON_ERROR_STOP=1 -d "$dsn" > "$f" 2>&1 || { cat "$f" >&2; die "EXPLAIN $s failed"; }
    kbase=$((kbase + EXPLAINS + 10))
    reset
    perl -MJSON::PP -e '
        local $/; my $t = <STDIN>; my (%ms, %bu, $n, $exec, $topt, $plan);
        my @docs = $t =~ /^(\[\n.*?^\])$/msg;
        for my $d (@docs) {
            my $e = decode_json($d)->[0]; $n++;
            $exec += $e->{"Execution Time"}; $plan += $e->{"Planning Time"} // 0;
            $topt += $e->{Plan}{"Actual Total Time"};
            my @st = ($e->{Plan});
            while (my $p = shift @st) {
                my $name = $p->{"Subplan Name"} // "";
                if ($name =~ /^CTE (\w+)/) {
                    $ms{$1} += $p->{"Actual Total Time"} * ($p->{"Actual Loops"} || 0);
                    $bu{$1} += ($p->{"Shared Hit Blocks"} // 0) + ($p->{"Shared Read Blocks"} // 0);
                }
                push @st, @{$p->{Plans} // []};
            }
        }
        die "no plan\n" unless $n;
        printf "executions %d\n", $n;
        printf "execution_ms %.4f\n", $exec / $n;
        printf "top_node_ms %.4f\n", $topt / $n;
        printf "outside_ms %.4f\n", ($exec - $topt) / $n;
        printf "planning_ms %.4f\n", $plan / $n;
        printf "cte %s %.4f %.1f\n", $_, $ms{$_} / $n, $bu{$_} / $n for sort { $ms{$b} <=> $ms{$a} } keys %ms;
    ' < "$f"
}
declare -A EX
for s in "${STMTS[@]}"; do
    EX[$s]=$(explain_ctes "$s")
done

# --- the tables ---------------------------------------------------------------------

echo
echo "claim statement profile, $(date -u '+%F %H:%M UTC'), $(nproc) cores, load average at start $load_start," \
     "at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "header $HEADER; $ITEMS items; pgbench -M prepared, ${DURATION}s per run, fresh key per transaction," \
     "medians of $ROUNDS rounds; ratio: to minimal, same round and clients"
echo
printf '| %-8s | %7s | %8s | %8s | %9s | %8s | %8s | %9s |\n' statement clients "claims/s" "ratio" "pg us/cl" \
    "exec ms" "plan ms" "buffers"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------- --------: ---------: ---------: ----------: ---------: ---------: ----------:
for c in $CLIENTS; do
    for s in "${STMTS[@]}"; do
        ts=() rs=() cp=() ex=() pl=() bu=()
        for r in $(seq "$ROUNDS"); do
            ts+=("${M[$s,$c,$r,t]}") cp+=("${M[$s,$c,$r,cpu]}") ex+=("${M[$s,$c,$r,ex]}")
            pl+=("${M[$s,$c,$r,pl]}") bu+=("${M[$s,$c,$r,bu]}")
            rs+=("$(awk -v a="${M[$s,$c,$r,t]}" -v b="${M[minimal,$c,$r,t]}" 'BEGIN {printf "%.3f", (b > 0) ? (a / b) : 0}')")
        done
        printf '| %-8s | %7s | %8.0f | %8.2f | %9.0f | %8.4f | %8.4f | %9.1f |\n' "$s" "$c" "$(median "${ts[@]}")" \
            "$(median "${rs[@]}")" "$(median "${cp[@]}")" "$(median "${ex[@]}")" "$(median "${pl[@]}")" \
            "$(median "${bu[@]}")"
    done
done
echo
echo "exec ms: pg_stat_statements' mean execution time (ExecutorRun + Finish); pg us/cl: PostgreSQL's"
echo "CPU per claim (all backends); buffers: shared hit + read per call"
echo
echo "EXPLAIN (ANALYZE, BUFFERS) of $EXPLAINS executions each (prepared, generic plan after 6, fresh keys), means:"
for s in "${STMTS[@]}"; do
    echo
    awk -v s="$s" '
        $1 == "execution_ms" {e = $2} $1 == "top_node_ms" {t = $2} $1 == "outside_ms" {o = $2} $1 == "planning_ms" {p = $2}
        $1 == "cte" {c[++n] = sprintf("    CTE %-13s %8.4f ms %7.1f buffers", $2, $3, $4)}
        END {printf "%s: execution %.4f ms, of which the plan'"'"'s top node %.4f ms and outside it (executor start and end) %.4f ms; planning %.4f ms\n", s, e, t, o, p
             for (i = 1; i <= n; i++) print c[i]}' <<<"${EX[$s]}"
done
echo
echo "(a CTE's time includes the CTEs it reads the first time it reads them: the times overlap)"
echo "total time $(( $(date +%s) - t_start )) s"
bench_verdict || exit 1
