#!/usr/bin/env bash
# make bench-pair: the claim statement of another commit (BEFORE) against
# the tree's, on one database, in one pgbench run that interleaves them
# (issue 11: "the one-rater claim no slower than before").  See
# bench/README.md ("Two statements side by side").
#
# The full bench (make bench) moves 5 to 20 % between runs on this machine
# with the load of its neighbours; a difference of a few microseconds in the
# statement is lost there.  Here both statements run in the same seconds, on
# the same queue state, from one client: pgbench -M prepared -c 1 with
# "-f before@1 -f after@1" picks one of the two at random for each
# transaction, each with a fresh key (the two share the client's key
# counter), so that the machine's drifts fall on both alike.
#
# The queue is in a state users reach: PRIORITIES priorities (items spread
# over them evenly), LIVE items claimed by other keys with a live lease
# (spread over the priorities too), the rest available.  After each round
# the round's claims are put back (the other keys' stay) and the table is
# vacuumed.  Both statements are the module's NGX_AQ_CLAIM_SQL of their
# header (bench/claim-sql.pl); the schema is the tree's (sql/), so BEFORE's
# statement must run on it.
#
# Prints per round each statement's mean latency (pgbench's, the client's
# round trip on a Unix socket included) and their difference; then the
# medians.  Exits 1 when a round claimed a number of items other than its
# transactions, or either statement failed.
#
# Environment:
#   BENCH_PAIR_BEFORE    the commit whose statement is "before" (HEAD), or
#                        a header, or a file NAME.sql of a statement's text
#                        ($1 digest, $2 queue, $3 lease ms)
#   BENCH_PAIR_AFTER     the same for "after" (src/ngx_aq_sql.h)
#   BENCH_PAIR_MORE      more statements in the same run, the same kinds,
#                        separated by blanks: to take a change apart
#                        (each against before)
#   BENCH_PAIR_ROUNDS    rounds (7)
#   BENCH_PAIR_TX        transactions per round, both statements (10000)
#   BENCH_ITEMS          items in the queue (200000)
#   BENCH_PAIR_PRIORITIES  distinct priorities (4)
#   BENCH_PAIR_LIVE      live claims of other keys (5000)
#   BENCH_KEEP=1         keep the work directory
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
MODULE=${MODULE:-$top/build/ngx_http_annotation_queue_module.so}
BEFORE=${BENCH_PAIR_BEFORE:-HEAD}
AFTER=${BENCH_PAIR_AFTER:-$top/src/ngx_aq_sql.h}
ROUNDS=${BENCH_PAIR_ROUNDS:-7}
TX=${BENCH_PAIR_TX:-10000}
ITEMS=${BENCH_ITEMS:-200000}
PRIORITIES=${BENCH_PAIR_PRIORITIES:-4}
LIVE=${BENCH_PAIR_LIVE:-5000}
MORE=${BENCH_PAIR_MORE:-}
LEASE_MS=900000

. "$top/bench/lib.sh"
nginx_pid=
bench_needs
bench_workdir aq-bench-pair
t_start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# a statement as a header of one #define, for claim-sql.pl: a commit's
# header, a header, or a file of the statement's text (NAME.sql)
header_of() {   # what name
    if [ -f "$1" ] && [ "${1%.sql}" != "$1" ]; then
        perl -e 'local $/; $_ = <STDIN>; s/\s+/ /g; s/\\/\\\\/g; s/"/\\"/g;
                 print "#define NGX_AQ_CLAIM_SQL \"$_\"\n"' < "$1" > "$work/$2.h"
    elif [ -f "$1" ]; then
        cp "$1" "$work/$2.h"
    else
        git show "$(git rev-parse --short "$1"):src/ngx_aq_sql.h" > "$work/$2.h" \
            || die "no commit or file $1"
    fi
}
# the statements: before, after, then BENCH_PAIR_MORE's, named by their
# place (s1, s2, ...) in the files and by what they came from in the table
NAMES=(before after)
FROM=("$BEFORE" "$AFTER")
for m in $MORE; do NAMES+=("s${#NAMES[@]}"); FROM+=("$m"); done
NS=${#NAMES[@]}
PGB_F=()
for ((i = 0; i < NS; i++)); do
    header_of "${FROM[i]}" "${NAMES[i]}"
    {
        echo '\set k :n + 1'
        echo '\set n :n + 1'
        "$top/bench/claim-sql.pl" --pgbench "$work/${NAMES[i]}.h"
    } > "$work/${NAMES[i]}.pgbench"
    PGB_F+=(-f "$work/${NAMES[i]}.pgbench@1")
done
if [ -f "$BEFORE" ]; then before_rev=$BEFORE; else before_rev=$(git rev-parse --short "$BEFORE"); fi
if cmp -s "$work/before.pgbench" "$work/after.pgbench"; then
    log "before and after are the same text (an A/A run: it measures the noise)"
fi

dsn=$("$top/scripts/pg.sh" start "$work/pg")
psql_() { psql -X -qtA -v ON_ERROR_STOP=1 -d "$dsn" "$@"; }
log "PostgreSQL: $dsn; before $before_rev, after $AFTER${MORE:+, more $MORE}; load average $load_start"

read -r org queue < <(bench_org_queue)
bench_items "$queue" 1 "$ITEMS"
psql_ -v queue="$queue" -v p="$PRIORITIES" <<'SQL'
UPDATE annotation_queue.items SET priority = seq % :p WHERE queue_id = :'queue';
SQL

# keys 1..LIVE hold the live claims; the rounds' keys follow
KEYS=$((LIVE + ROUNDS * TX + TX))
t0=$(date +%s)
bench_keys "$org" "$KEYS"
psql_ -v queue="$queue" -v live="$LIVE" -v lease="$LEASE_MS" <<'SQL'
UPDATE annotation_queue.items i
   SET status = 'claimed', claimed_by = h.id, claimed_at = now(),
       lease_expires_at = now() + :lease * interval '1 millisecond',
       version = i.version + 1, attempts = 1
  FROM (SELECT k.id, row_number() OVER (ORDER BY k.i) AS n
          FROM bench.keys k WHERE k.i <= :live) AS h,
       (SELECT id, row_number() OVER (ORDER BY seq) AS n
          FROM annotation_queue.items
         WHERE queue_id = :'queue'
         ORDER BY seq LIMIT :live) AS t
 WHERE t.n = h.n AND i.id = t.id;
SQL
psql_ -c "VACUUM (FREEZE, ANALYZE) annotation_queue.items" \
      -c "VACUUM (FREEZE, ANALYZE) annotation_queue.api_keys" \
      -c "VACUUM (FREEZE, ANALYZE) bench.keys" -c "CHECKPOINT"
log "$ITEMS items in $PRIORITIES priorities, $LIVE live claims, $KEYS keys in $(( $(date +%s) - t0 )) s"

reset() {
    psql_ -v live="$LIVE" <<'SQL' >/dev/null
UPDATE annotation_queue.items
   SET status = 'available', claimed_by = NULL, claimed_at = NULL,
       lease_expires_at = NULL, attempts = 0
 WHERE claimed_by IN (SELECT id FROM bench.keys WHERE i > :live);
VACUUM annotation_queue.items;
SQL
}

declare -A L
bad=0
kbase=$LIVE
rounds=0
for r in $(seq "$ROUNDS"); do
    rc=0
    out=$("$PGBENCH" -n -M prepared -c 1 -t "$TX" "${PGB_F[@]}" \
              -D queue="$queue" -D lease="$LEASE_MS" -D n="$kbase" \
              "$dsn" 2>&1) || rc=$?
    claimed=$(psql_ -v live="$LIVE" <<<"SELECT count(*) FROM annotation_queue.items
        WHERE claimed_by IN (SELECT id FROM bench.keys WHERE i > :live)")
    # "SQL script 1: ..." then " - latency average = 0.381 ms"
    read -r -a lat < <(awk -v n="$NS" '/^SQL script [0-9]+:/ {s = $3 + 0}
        / - latency average = / && s {l[s] = $5 * 1000}
        END {for (i = 1; i <= n; i++) printf "%.1f ", l[i] + 0; print ""}' <<<"$out")
    if [ "$rc" -ne 0 ] || [ "$claimed" -ne "$TX" ] || [ "${#lat[@]}" -ne "$NS" ] \
       || printf '%s\n' "${lat[@]}" | grep -qx '0.0'; then
        echo "$out" >&2
        log "round $r: pgbench exit $rc, $claimed items claimed for $TX transactions"
        bad=1
        break
    fi
    line="round $r:"
    for ((i = 0; i < NS; i++)); do
        L[$i,$r]=${lat[i]}
        L[$i,$r,d]=$(awk -v a="${lat[i]}" -v b="${lat[0]}" 'BEGIN {printf "%.1f", a - b}')
        line+=" ${NAMES[i]} ${lat[i]} us"
    done
    log "$line; load $(cut -d' ' -f1 /proc/loadavg)"
    rounds=$r
    kbase=$((kbase + TX))
    reset
done
[ "$bad" -eq 0 ] || exit 1

echo
echo "claim statement pair, $(date -u '+%F %H:%M UTC'), $(nproc) cores, load average at start $load_start," \
     "at end $(cut -d' ' -f1-3 /proc/loadavg)"
for ((i = 0; i < NS; i++)); do
    what=${FROM[i]}
    [ -f "$what" ] || what="NGX_AQ_CLAIM_SQL of $(git rev-parse --short "$what")"
    [ "$what" != "$top/src/ngx_aq_sql.h" ] || git diff --quiet HEAD -- src/ngx_aq_sql.h \
        || what="$what (uncommitted changes)"
    echo "${NAMES[i]}: $what"
done
echo "$ITEMS items, $PRIORITIES priorities, $LIVE live claims of other keys; pgbench -M prepared -c 1,"
echo "the statements interleaved at random, fresh key per claim; $rounds rounds of $TX claims;"
echo "mean latency per statement (us) and, in brackets, its difference to before's of the round"
echo
hdr="| round |" sep="|------:|"
for ((i = 0; i < NS; i++)); do hdr+=" $(printf '%16s' "${NAMES[i]}") |"; sep+="-----------------:|"; done
echo "$hdr"; echo "$sep"
for r in $(seq "$rounds") median; do
    row="| $(printf '%5s' "$r") |"
    for ((i = 0; i < NS; i++)); do
        if [ "$r" = median ]; then
            v=() d=()
            for q in $(seq "$rounds"); do v+=("${L[$i,$q]}") d+=("${L[$i,$q,d]}"); done
            a=$(median "${v[@]}") b=$(median "${d[@]}")
            [ "$i" -ne 0 ] || mb=$a
            [ "$i" -ne 1 ] || md=$b
        else
            a=${L[$i,$r]} b=${L[$i,$r,d]}
        fi
        if [ "$i" -eq 0 ]; then cell=$a; else cell=$(printf '%s (%+.1f)' "$a" "$b"); fi
        row+=" $(printf '%16s' "$cell") |"
    done
    echo "$row"
done
echo
awk -v b="$mb" -v d="$md" 'BEGIN {printf "after is %+.1f %% of before (median difference over median before)\n", d * 100 / b}'
echo "total time $(( $(date +%s) - t_start )) s"
