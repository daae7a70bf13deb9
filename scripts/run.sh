#!/usr/bin/env bash
# make run: PostgreSQL (a local one in state/, or $DATABASE_URL) with the
# schema and demo data, and nginx with the module on 127.0.0.1:${PORT:-8080}
# in the foreground: the claim, extend, release and complete endpoints, the
# status page and a per-key rate limit, as in the README.  It prints a curl
# for each step of a rater's round (openapi.yaml describes every answer).
# Ctrl-C stops both.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
state=$top/state
port=${PORT:-8080}
module=$top/build/ngx_http_annotation_queue_module.so
nginx=${NGINX:-/usr/sbin/nginx}
base=http://127.0.0.1:$port
api=$base/api/v1/annotations
metrics=/internal/annotation-queue/metrics

mkdir -p "$state/nginx/logs" "$state/nginx/tmp"

started_pg=
nginx_pid=

stop() {
    trap - INT TERM EXIT
    if [ -n "$nginx_pid" ]; then
        kill -QUIT "$nginx_pid" 2>/dev/null || true
        wait "$nginx_pid" 2>/dev/null || true
    fi
    if [ -n "$started_pg" ]; then
        "$top/scripts/pg.sh" stop "$state/pg"
        echo "run: PostgreSQL stopped"
    fi
}
trap stop INT TERM EXIT

if [ -n "${DATABASE_URL:-}" ]; then
    dsn=$DATABASE_URL
    if [ "$(psql -X -qtA -d "$dsn" -c "SELECT to_regnamespace('annotation_queue') IS NULL")" = t ]; then
        "$top/scripts/pg.sh" apply "$dsn"
    fi
else
    # a demo database made from an older sql/ is made again
    dsn=$(PG_REMAKE=1 "$top/scripts/pg.sh" start "$state/pg")
    started_pg=1
fi

# demo data: one organisation and queue (kept between runs), items when
# fewer than two are available, and two fresh raters' keys (a key is shown
# only when created): alice goes through the whole round, bob holds an item
# to release
read -r queue alice bob < <(psql -X -qtA -F' ' -v ON_ERROR_STOP=1 -d "$dsn" <<'SQL'
WITH org AS (
    SELECT coalesce((SELECT id FROM annotation_queue.organisations
                      WHERE name = 'demo' ORDER BY created_at LIMIT 1),
                    annotation_queue.create_org('demo')) AS id
), q AS (
    SELECT coalesce((SELECT id FROM annotation_queue.queues
                      WHERE name = 'demo' AND org_id = org.id),
                    annotation_queue.create_queue(org.id, 'demo')) AS id,
           org.id AS org_id
      FROM org
)
SELECT q.id, annotation_queue.create_api_key(q.org_id, 'alice'),
       annotation_queue.create_api_key(q.org_id, 'bob')
  FROM q;
SQL
)

psql -X -qtA -v ON_ERROR_STOP=1 -v queue="$queue" -d "$dsn" >/dev/null <<'SQL'
SELECT annotation_queue.enqueue(:'queue',
           jsonb_build_object('prompt', 'Rate answer #' || g,
                              'answer', 'Demo answer ' || g),
           (g % 3))
  FROM generate_series(1, 20) AS g
 WHERE (SELECT count(*) FROM annotation_queue.items
         WHERE queue_id = :'queue' AND status = 'available') < 2;
SQL

# the conninfo goes into nginx.conf inside double quotes
conf_dsn=${dsn//\\/\\\\}
conf_dsn=${conf_dsn//\"/\\\"}

cat > "$state/nginx/nginx.conf" <<CONF
load_module $module;

worker_processes 2;
error_log stderr info;
pid logs/nginx.pid;

events {
    worker_connections 1024;
}

http {
    access_log logs/access.log;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;

    annotation_queue_database "$conf_dsn";
    annotation_queue_limit_zone zone=raters:10m rate=20r/s;

    server {
        listen 127.0.0.1:$port;

        location /api/v1/annotations/ {
            annotation_queue_limit zone=raters burst=40;

            location = /api/v1/annotations/queue    { annotation_queue_claim; }
            location = /api/v1/annotations/extend   { annotation_queue_extend; }
            location = /api/v1/annotations/release  { annotation_queue_release; }
            location = /api/v1/annotations/complete { annotation_queue_complete; }
            location = /api/v1/annotations/skip     { annotation_queue_skip; }
        }

        location = $metrics {
            allow 127.0.0.1;
            deny all;
            annotation_queue_status;
            annotation_queue_status_queues $queue;
        }
    }
}
CONF

"$nginx" -q -t -p "$state/nginx" -c nginx.conf

"$nginx" -p "$state/nginx" -c nginx.conf -g 'daemon off;' &
nginx_pid=$!

# nginx answers (the status page) within 10 s, or the run ends
for _ in $(seq 100); do
    if curl -sf -o /dev/null "$base$metrics"; then
        break
    fi
    if ! kill -0 "$nginx_pid" 2>/dev/null; then
        echo "run: nginx exited" >&2
        exit 1
    fi
    sleep 0.1
done
curl -sf -o /dev/null "$base$metrics" \
    || { echo "run: nginx does not answer on $base" >&2; exit 1; }

# bob claims an item now, so that there is one to release; alice's claim
# below gets her an item (the same one again each time until she is done)
bob_claim=$(curl -s -w ' %{http_code}' -X POST "$api/queue" \
                 -H "Authorization: Bearer $bob" \
                 -d "{\"queue_id\": \"$queue\"}")
if [ "${bob_claim##* }" != 200 ]; then
    echo "run: the demo claim failed: $bob_claim" >&2
    exit 1
fi
curl -s -o /dev/null -X POST "$api/queue" \
     -H "Authorization: Bearer $alice" -d "{\"queue_id\": \"$queue\"}"

# what each holds: item and version, from the database
held() {
    psql -X -qtA -F' ' -v ON_ERROR_STOP=1 -v key="$1" -d "$dsn" <<'SQL'
SELECT i.id, i.version
  FROM annotation_queue.items AS i
  JOIN annotation_queue.api_keys AS k ON k.id = i.claimed_by
 WHERE k.key_hash = annotation_queue.key_hash(:'key')
   AND i.status = 'claimed';
SQL
}
read -r alice_item alice_version < <(held "$alice")
read -r bob_item bob_version < <(held "$bob")

cat <<MSG

nginx with the annotation queue module: $base/
demo queue $queue
keys (shown once): alice $alice
                   bob   $bob
Every answer is described in openapi.yaml.

1. alice claims the next item of the queue (again: the same item back):

curl -s -w '\n' -X POST $api/queue \\
     -H 'Authorization: Bearer $alice' \\
     -H 'Content-Type: application/json' \\
     -d '{"queue_id": "$queue"}'

2. she extends her lease (a heartbeat: the version stays $alice_version):

curl -s -w '\n' -X POST $api/extend \\
     -H 'Authorization: Bearer $alice' \\
     -H 'Content-Type: application/json' \\
     -d '{"item_id": "$alice_item", "version": $alice_version}'

3. she completes it with her result (version $alice_version becomes $((alice_version + 1))):

curl -s -w '\n' -X POST $api/complete \\
     -H 'Authorization: Bearer $alice' \\
     -H 'Content-Type: application/json' \\
     -d '{"item_id": "$alice_item", "version": $alice_version, "result": {"helpful": true, "score": 4}}'

4. bob gives the item he holds back to the queue, either by a release (he
   may be handed it again later) or by a skip (never to him again); the
   first of the two that runs answers 200, the other 409 stale_claim:

curl -s -w '\n' -X POST $api/release \\
     -H 'Authorization: Bearer $bob' \\
     -H 'Content-Type: application/json' \\
     -d '{"item_id": "$bob_item", "version": $bob_version}'

curl -s -w '\n' -X POST $api/skip \\
     -H 'Authorization: Bearer $bob' \\
     -H 'Content-Type: application/json' \\
     -d '{"item_id": "$bob_item", "version": $bob_version}'

5. a claim that waits up to 10 seconds for an item when none is left
   (Prefer: wait; answered as soon as one is enqueued or released):

curl -s -w '\n' -X POST $api/queue \\
     -H 'Authorization: Bearer $bob' \\
     -H 'Content-Type: application/json' \\
     -H 'Prefer: wait=10' \\
     -d '{"queue_id": "$queue"}'

6. the status page (Prometheus' text format; the demo queue's depth too):

curl -s $base$metrics

Ctrl-C stops nginx and PostgreSQL.

MSG

wait "$nginx_pid" || true
nginx_pid=
