#!/usr/bin/env bash
# Worker memory under sustained load: RSS of the nginx workers sampled while
# wrk sends claims for BENCH_RSS_SECONDS (default 300 s: over a million
# requests on 2 cores).  Keys are reused on purpose: every request still
# runs the whole path (key, body, pool, statement, answer), most of them as
# resumes of the key's held item.
#
#   bash bench/rss.sh            (after make; needs wrk, PostgreSQL 15)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
seconds=${BENCH_RSS_SECONDS:-300}
step=${BENCH_RSS_STEP:-30}
tmp=$(mktemp -d)
chmod 711 "$tmp"
nginx_pid=

cleanup() {
    [ -n "$nginx_pid" ] && kill -QUIT "$nginx_pid" 2>/dev/null || true
    sleep 1
    "$top/scripts/pg.sh" stop "$tmp/pg" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null

dsn=$("$top/scripts/pg.sh" start "$tmp/pg")
read -r queue < <(psql -X -qtA -d "$dsn" -c "
    WITH o AS (SELECT annotation_queue.create_org('rss') AS id)
    SELECT annotation_queue.create_queue(o.id, 'rss') FROM o")
psql -X -qtA -d "$dsn" -c "
    SELECT annotation_queue.create_api_key(q.org_id, 'r' || g)
      FROM annotation_queue.queues q, generate_series(1, 1000) g" > "$tmp/keys"
psql -X -qtA -d "$dsn" -c "
    SELECT count(annotation_queue.enqueue('$queue', jsonb_build_object('n', g)))
      FROM generate_series(1, 2000) g" >/dev/null

port=$(perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1", LocalPort => 0)->sockport')
mkdir -p "$tmp/nginx/logs"
cat > "$tmp/nginx/nginx.conf" <<CONF
load_module $top/build/ngx_http_annotation_queue_module.so;
worker_processes 2;
error_log logs/error.log notice;
pid logs/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path $tmp/nginx/body;
    annotation_queue_database "$dsn";
    server {
        listen 127.0.0.1:$port;
        location = /q { annotation_queue_claim; }
    }
}
CONF
/usr/sbin/nginx -p "$tmp/nginx" -c nginx.conf -g 'daemon off;' &
nginx_pid=$!
sleep 1

cat > "$tmp/rss.lua" <<LUA
local keys = {}
for line in io.lines("$tmp/keys") do keys[#keys + 1] = line end
local i = 0
function request()
  i = i + 1
  return wrk.format("POST", "/q", {["Authorization"] = "Bearer " .. keys[(i % #keys) + 1]}, '{"queue_id":"$queue"}')
end
LUA

rss() {
    local total=0 p
    for p in $(pgrep -P "$nginx_pid"); do
        total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
    done
    echo "$total"
}

wrk -t2 -c32 -d"${seconds}s" -s "$tmp/rss.lua" "http://127.0.0.1:$port/" \
    > "$tmp/wrk.out" 2>&1 &
wrk_pid=$!

echo "seconds  workers_rss_kB"
t=0
while kill -0 "$wrk_pid" 2>/dev/null; do
    printf '%7d  %s\n' "$t" "$(rss)"
    sleep "$step"
    t=$((t + step))
done
wait "$wrk_pid" || true
printf '%7s  %s\n' "end" "$(rss)"
grep -E "requests in|Requests/sec|Non-2xx|Socket errors" "$tmp/wrk.out" || true
grep -cE "\[(alert|crit|error)\]" "$tmp/nginx/logs/error.log" \
    | sed 's/^/error-log lines at error or worse: /'
