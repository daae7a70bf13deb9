#!/usr/bin/env bash
# make test-repeat: the whole Test::Nginx suite N times in a row (RUNS, 20)
# beside BURNERS (2) CPU-burning processes, the way a busy CI machine runs
# it.  Stops at the first failing run (its server roots are kept in
# t/servroot-failed/) and prints one line per run and a summary:
#
#   RUNS=20 BURNERS=2 make test-repeat
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

runs=${RUNS:-20}
burners=${BURNERS:-2}
logdir="$top/build/test-repeat"
mkdir -p "$logdir"

pids=()
stop_burners() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
}
trap stop_burners EXIT

for ((i = 0; i < burners; i++)); do
    (while :; do :; done) &
    pids+=("$!")
done

passed=0
start=$(date +%s)
for ((run = 1; run <= runs; run++)); do
    t0=$(date +%s)
    if scripts/test.sh > "$logdir/run-$run.log" 2>&1; then
        passed=$((passed + 1))
        echo "test-repeat: run $run passed ($(( $(date +%s) - t0 )) s)"
    else
        echo "test-repeat: run $run FAILED ($(( $(date +%s) - t0 )) s):"
        grep -E '^(not ok|t/.*(Dubious|Failed)|  Failed test|#   Failed)' \
            "$logdir/run-$run.log" | head -20 || true
        echo "test-repeat: $passed passed, 1 failed of $run runs beside" \
             "$burners CPU burners; log: $logdir/run-$run.log"
        exit 1
    fi
done
echo "test-repeat: $passed passed, 0 failed of $runs runs beside $burners" \
     "CPU burners in $(( $(date +%s) - start )) s"
