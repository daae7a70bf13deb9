#!/usr/bin/env bash
# make bench-longpoll: what long-polling claims cost (bench/longpoll.pl
# says what is measured).  Figures, never assertions; bench/README.md,
# "Long-poll", has the last ones.
#
#   BENCH_LP_TRIES=100 BENCH_LP_WAITERS=10000 BENCH_LP_IDLE=30 bench/longpoll.sh
#   BENCH_QUICK=1 bench/longpoll.sh       a short try (20 tries, 1,000, 5 s)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

if [ -n "${BENCH_QUICK:-}" ]; then
    export BENCH_LP_TRIES=${BENCH_LP_TRIES:-20}
    export BENCH_LP_WAITERS=${BENCH_LP_WAITERS:-1000}
    export BENCH_LP_IDLE=${BENCH_LP_IDLE:-5}
fi

# 10,000 client sockets here and as many in nginx's worker
ulimit -n "$(ulimit -Hn)"

export TEST_NGINX_LOAD_MODULES=${MODULE:-$top/build/ngx_http_annotation_queue_module.so}
exec perl bench/longpoll.pl
