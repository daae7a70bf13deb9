#!/usr/bin/env bash
# make run: PostgreSQL (a local one in state/, or $DATABASE_URL) with the
# schema and demo data, and nginx with the module on 127.0.0.1:${PORT:-8080}
# in the foreground.  Ctrl-C stops both.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
state=$top/state
port=${PORT:-8080}
module=$top/build/ngx_http_annotation_queue_module.so
nginx=${NGINX:-/usr/sbin/nginx}

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
    dsn=$("$top/scripts/pg.sh" start "$state/pg")
    started_pg=1
fi

# demo data: one organisation and queue (kept between runs), items when the
# queue has run dry, and a fresh key (a key is shown only when created)
read -r queue key < <(psql -X -qtA -F' ' -v ON_ERROR_STOP=1 -d "$dsn" <<'SQL'
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
SELECT q.id, annotation_queue.create_api_key(q.org_id, 'demo rater')
  FROM q;
SQL
)

psql -X -qtA -v ON_ERROR_STOP=1 -d "$dsn" >/dev/null <<SQL
SELECT annotation_queue.enqueue('$queue',
           jsonb_build_object('prompt', 'Rate answer #' || g,
                              'answer', 'Demo answer ' || g),
           (g % 3))
  FROM generate_series(1, 20) AS g
 WHERE NOT EXISTS (SELECT 1 FROM annotation_queue.items
                    WHERE queue_id = '$queue' AND status = 'available');
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

    server {
        listen 127.0.0.1:$port;

        location = /api/v1/annotations/queue {
            annotation_queue_claim;
        }
    }
}
CONF

"$nginx" -q -t -p "$state/nginx" -c nginx.conf

cat <<MSG

nginx with the annotation queue module: http://127.0.0.1:$port/
demo queue $queue, demo key (shown once) $key

Claim an item:

curl -s -X POST http://127.0.0.1:$port/api/v1/annotations/queue \\
     -H 'Authorization: Bearer $key' \\
     -H 'Content-Type: application/json' \\
     -d '{"queue_id": "$queue"}'

Ctrl-C stops nginx and PostgreSQL.

MSG

"$nginx" -p "$state/nginx" -c nginx.conf -g 'daemon off;' &
nginx_pid=$!
wait "$nginx_pid" || true
nginx_pid=
