#!/usr/bin/env bash
# make test-exclusivity: the full exclusivity check of
# t/manual/exclusivity.pl (100,000 items, 64 clients, two nginx workers,
# steady and with PostgreSQL restarted mid-run; about 9 minutes on a loaded
# 2-core machine).  `make test` runs its short form, t/135-exclusivity.t.
# AQ_EXCL_ITEMS, AQ_EXCL_CLIENTS, ... change its size (see the script).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

export TEST_NGINX_BINARY="${TEST_NGINX_BINARY:-/usr/sbin/nginx}"
export TEST_NGINX_LOAD_MODULES="$top/build/ngx_http_annotation_queue_module.so"
exec perl -I t/lib t/manual/exclusivity.pl
