#!/usr/bin/env bash
# make test-deb: the Debian package on a bare bookworm root, as an operator
# uses it.
#
#   debootstrap --variant=minbase bookworm into build/deb/root (fresh each
#   run; the .debs are kept in build/deb/cache), then in that chroot:
#   - install nginx (bookworm's 1.22.1, the ABI the package was built for)
#     and start it, its default site moved to a free port;
#   - install the package: the module is enabled (the modules-enabled
#     symlink) and the running nginx reloaded by the package's trigger (its
#     workers map the module); nothing is served by it yet;
#   - apply the shipped migrations with psql to a PostgreSQL started outside
#     (scripts/pg.sh, on 127.0.0.1: the chroot shares the network), create a
#     role with the privileges README lists, an organisation, a key, a queue
#     and items with the SQL API;
#   - put the shipped example configuration into /etc/nginx/conf.d (port and
#     conninfo set), nginx -t, reload: claim, extend, release, claim again,
#     complete and the status page answer 200 through curl;
#   - remove it as an operator does: the example configuration first, then
#     apt-get remove: the load_module is disabled (symlink parked as
#     .removed), nginx reloaded, nginx -t passes; with the example put back,
#     nginx -t fails on the module's first directive (why it goes first);
#     apt-get purge leaves nothing in modules-enabled.
#
# The Debian mirror is read at run time from the system's apt source
# (/etc/apt/sources.list.d/debian.sources), which the chroot gets a copy of.
# Run as root.  DEB=path tests that .deb instead of building one
# (scripts/build-deb.sh).  Mounts (proc, devpts, the apt cache) and the
# processes started here (the chroot's nginx, PostgreSQL) end with the
# script, whatever its outcome.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd -P)
out=$top/build/deb
root=$out/root
cache=$out/cache
pgdir=$out/pg
pkg=libnginx-mod-http-annotation-queue
share=/usr/share/$pkg
enabled=/etc/nginx/modules-enabled/50-mod-http-annotation-queue.conf
available=/usr/share/nginx/modules-available/mod-http-annotation-queue.conf
so=/usr/lib/nginx/modules/ngx_http_annotation_queue_module.so
# every wait is a poll against a deadline of this many seconds
deadline=${TEST_DEB_DEADLINE:-60}

if [ "$(id -u)" -ne 0 ]; then
    echo "test-deb: run as root (debootstrap, chroot, mounts)" >&2
    exit 1
fi

mkdir -p "$out"
exec 9> "$out/test-deb.lock"
if ! flock -n 9; then
    echo "test-deb: another test-deb runs (build/deb/test-deb.lock)" >&2
    exit 1
fi

step() { echo "test-deb: $*"; }
fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }
ok() { echo "ok - $*"; }

# (the daemons started in the chroot or by pg.sh get none of the script's
# own descriptors: the lock, the saved output)
in_root() {
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@" \
        3>&- 4>&- 9>&-
}

# invoke-rc.d nginx $1 in the chroot, without its warning about runlevels
nginx_service() {
    local rc=0
    in_root invoke-rc.d nginx "$1" > /dev/null 2> "$out/invoke-rc.d.err" || rc=$?
    grep -v 'could not determine current runlevel' "$out/invoke-rc.d.err" >&2 || true
    return "$rc"
}

free_port() {
    perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen => 1,
        LocalAddr => "127.0.0.1", LocalPort => 0)->sockport'
}

# the mount points under the root, deepest first
mounts_under_root() {
    awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' \
        /proc/self/mounts | sort -r
}

# processes whose root directory is the chroot: only this script starts any
chroot_pids() {
    local p r
    for p in /proc/[0-9]*; do
        r=$(readlink "$p/root" 2>/dev/null) || continue
        if [ "$r" = "$root" ]; then
            echo "${p#/proc/}"
        fi
    done
}

# the script's own output, for cleanup (a signal may end it inside a
# function whose output goes to a log)
exec 3>&1 4>&2

cleanup() {
    local rc=$? pid i m
    trap - EXIT INT TERM
    exec 1>&3 2>&4
    for pid in $(chroot_pids); do
        kill -QUIT "$pid" 2>/dev/null || true
    done
    for i in $(seq 50); do
        [ -z "$(chroot_pids)" ] && break
        sleep 0.1
    done
    for pid in $(chroot_pids); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    "$top/scripts/pg.sh" stop "$pgdir" || true
    for m in $(mounts_under_root); do
        umount "$m" 2>/dev/null || umount -l "$m" || true
    done
    if [ "$rc" -ne 0 ]; then
        echo "test-deb: FAILED (the chroot stays in build/deb/root;" \
             "nginx's log: build/deb/root/var/log/nginx/error.log)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait until "$@" succeeds, or fail with the message in $what
wait_for() {
    local what=$1 end=$((SECONDS + deadline))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$end" ] || fail "$what (not within ${deadline}s)"
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------
# the package

if [ -n "${DEB:-}" ]; then
    deb=$(cd "$(dirname "$DEB")" && pwd)/$(basename "$DEB")
else
    "$top/scripts/build-deb.sh" >/dev/null
    deb=$(ls "$out/${pkg}"_*.deb)
fi
[ -f "$deb" ] || fail "no package at $deb"
step "testing $(basename "$deb")"

if ! command -v debootstrap >/dev/null; then
    step "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends debootstrap >/dev/null
fi

# ---------------------------------------------------------------------------
# a bare bookworm root

# the first Debian source of the system (its first URI): never written into
# the repository
mirror=$(awk 'BEGIN { RS = "" } NR == 1' /etc/apt/sources.list.d/debian.sources \
         | awk '/^URIs:/ { print $2; exit }')
[ -n "$mirror" ] || fail "no URIs in /etc/apt/sources.list.d/debian.sources"

for m in $(mounts_under_root); do
    umount "$m" 2>/dev/null || umount -l "$m"
done
[ -z "$(mounts_under_root)" ] || fail "mounts left under $root"
[ -z "$(chroot_pids)" ] || fail "processes left in $root: $(chroot_pids)"
rm -rf --one-file-system "$root"
mkdir -p "$root" "$cache/debootstrap" "$cache/apt/partial"

step "debootstrap --variant=minbase bookworm (log: build/deb/debootstrap.log)"
start=$SECONDS
if ! debootstrap --variant=minbase --cache-dir="$cache/debootstrap" \
        bookworm "$root" "$mirror" > "$out/debootstrap.log" 2>&1; then
    tail -n 20 "$out/debootstrap.log" >&2
    fail "debootstrap"
fi
step "debootstrap took $((SECONDS - start))s"

mount -t proc proc "$root/proc"
mkdir -p "$root/dev/pts"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
mount --bind "$cache/apt" "$root/var/cache/apt/archives"
for d in null zero urandom; do
    [ -c "$root/dev/$d" ] || fail "no /dev/$d in the root"
done

# the system's sources (bookworm, its updates and security suites), so that
# the chroot gets the nginx of this machine
: > "$root/etc/apt/sources.list"
cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/"
# no service starts while packages are installed
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"

step "installing nginx, curl, postgresql-client in the chroot"
in_root apt-get -o APT::Sandbox::User=root update -qq
in_root apt-get -o APT::Sandbox::User=root install -y -qq \
    --no-install-recommends nginx curl postgresql-client-15 \
    > "$out/apt-nginx.log" 2>&1 || { tail -n 20 "$out/apt-nginx.log"; fail "apt-get install nginx"; }

root_nginx=$(in_root dpkg-query -W -f='${Version}' nginx)
built_for=$(dpkg-query -W -f='${Version}' nginx-dev)
[ "${root_nginx%%-*}" = "${built_for%%-*}" ] \
    || fail "the chroot's nginx is $root_nginx, the package was built with nginx-dev $built_for"
ok "the chroot's nginx $root_nginx is the nginx the package was built for ($built_for)"

# Debian's default site on a free port of 127.0.0.1 (the network is the
# machine's), then nginx started as the system starts it
site_port=$(free_port)
sed -i -e "s/^\(\s*\)listen 80 default_server;/\1listen 127.0.0.1:$site_port default_server;/" \
       -e '/listen \[::\]:80 default_server;/d' \
       "$root/etc/nginx/sites-available/default"
grep -q "listen 127.0.0.1:$site_port default_server;" \
    "$root/etc/nginx/sites-available/default" || fail "default site not moved"
# from now on services may start, as on a real machine: invoke-rc.d (the
# maintainer scripts' way) runs nginx's init script (a chroot has no init
# system, where invoke-rc.d blocks everything without a policy)
printf '#!/bin/sh\nexit 0\n' > "$root/usr/sbin/policy-rc.d"
nginx_service start
site_up() { curl -s -o /dev/null -f "http://127.0.0.1:$site_port/"; }
wait_for "nginx serves its default site on $site_port" site_up
master=$(cat "$root/run/nginx.pid")
ok "nginx started in the chroot (master $master), default site on 127.0.0.1:$site_port"

# ---------------------------------------------------------------------------
# install

# the workers of the chroot's nginx that map the module
workers_with_module() {
    local w n=0
    for w in $(pgrep -P "$master" || true); do
        if grep -q "$so" "/proc/$w/maps" 2>/dev/null; then
            n=$((n + 1))
        fi
    done
    echo "$n"
}
[ "$(workers_with_module)" = 0 ] || fail "a worker maps the module before install"

cp "$deb" "$root/tmp/"
step "apt-get install ./$(basename "$deb")"
in_root apt-get -o APT::Sandbox::User=root install -y \
    "/tmp/$(basename "$deb")" > "$out/apt-install.log" 2>&1 \
    || { cat "$out/apt-install.log"; fail "apt-get install of the package"; }

abi=$(in_root dpkg-query -W -f='${Depends}' "$pkg" | tr ',' '\n' \
      | grep -o 'nginx-abi-[^ ]*' || true)
[ -n "$abi" ] || fail "the package does not depend on an nginx-abi"
in_root dpkg-query -W -f='${Provides}' nginx | grep -qw -- "$abi" \
    || fail "the chroot's nginx does not provide $abi"
ok "the package depends on $abi, which the installed nginx provides"

[ -f "$root$so" ] || fail "no $so"
ok "the module is in $so"
[ "$(readlink "$root$enabled")" = "$available" ] \
    || fail "$enabled is not a symlink to $available"
grep -qx 'load_module modules/ngx_http_annotation_queue_module.so;' "$root$available" \
    || fail "$available does not load the module"
ok "the module is enabled: $enabled -> $available"

for f in 001_schema 002_api 003_lifecycle 004_claim_indexes 005_autovacuum; do
    cmp -s "$top/sql/$f.sql" "$root$share/sql/$f.sql" || fail "$share/sql/$f.sql differs from sql/"
done
[ -f "$root$share/examples/annotation_queue.conf" ] || fail "no example configuration"
ok "the migrations and the example configuration are under $share"

in_root dpkg -L "$pkg" | grep '^/etc' && fail "the package ships files under /etc"
grep -rl annotation_queue "$root/etc/nginx/conf.d" "$root/etc/nginx/sites-enabled"/ \
    && fail "the package enabled a configuration of its own"
ok "nothing of the module's is configured by the package (only the load_module)"

grep -q 'Triggering nginx reload' "$out/apt-install.log" \
    || fail "the install did not trigger nginx's reload"
has_module() { [ "$(workers_with_module)" -gt 0 ]; }
wait_for "the running nginx's workers map the module after the install" has_module
ok "the install reloaded the running nginx, whose workers now map the module"

# ---------------------------------------------------------------------------
# the database: the shipped migrations, a role, demo data

"$top/scripts/pg.sh" stop "$pgdir"
rm -rf "$pgdir"
"$top/scripts/pg.sh" start "$pgdir" >/dev/null 3>&- 4>&- 9>&-
pg_port=$(cat "$pgdir/port")
admin="host=127.0.0.1 port=$pg_port user=postgres"
psql -X -q -v ON_ERROR_STOP=1 -d "$admin dbname=postgres" \
    -c 'CREATE DATABASE aq_deb' -c "CREATE ROLE annotation_queue LOGIN"
in_root sh -ec "for f in $share/sql/[0-9]*.sql; do
    psql -X -q -v ON_ERROR_STOP=1 -d '$admin dbname=aq_deb' -f \"\$f\" >/dev/null
done"
ok "the shipped migrations apply with the chroot's psql"

# the privileges README's annotation_queue_database lists, nothing more
read -r queue key item_a item_b < <(in_root psql -X -qtA -F' ' -v ON_ERROR_STOP=1 \
    -d "$admin dbname=aq_deb" <<'SQL'
GRANT USAGE ON SCHEMA annotation_queue TO annotation_queue;
GRANT SELECT ON annotation_queue.api_keys, annotation_queue.queues TO annotation_queue;
GRANT SELECT, UPDATE ON annotation_queue.items TO annotation_queue;
GRANT SELECT, INSERT, UPDATE ON annotation_queue.exclusions TO annotation_queue;
WITH org AS (SELECT annotation_queue.create_org('deb') AS id),
     q AS (SELECT annotation_queue.create_queue(org.id, 'deb') AS id, org.id AS org
             FROM org)
SELECT q.id, annotation_queue.create_api_key(q.org, 'rater'),
       annotation_queue.enqueue(q.id, '{"prompt": "first"}', 1),
       annotation_queue.enqueue(q.id, '{"prompt": "second"}', 0)
  FROM q;
SQL
)
[ -n "$item_b" ] || fail "the demo data"
ok "organisation, key, queue $queue and two items made with the SQL API"

# ---------------------------------------------------------------------------
# the example configuration

api_port=$(free_port)
conf=/etc/nginx/conf.d/annotation_queue.conf
sed -e "s/listen 127.0.0.1:8080;/listen 127.0.0.1:$api_port;/" \
    -e "s/annotation_queue_database \".*\";/annotation_queue_database \"host=127.0.0.1 port=$pg_port dbname=aq_deb user=annotation_queue\";/" \
    "$root$share/examples/annotation_queue.conf" > "$root$conf"
grep -q "listen 127.0.0.1:$api_port;" "$root$conf" || fail "the example's listen not set"
grep -q "port=$pg_port dbname=aq_deb" "$root$conf" || fail "the example's conninfo not set"
in_root nginx -q -t || fail "nginx -t with the example configuration"
ok "nginx -t passes with the example in $conf"
nginx_service reload

base=http://127.0.0.1:$api_port
api_up() { curl -s -o /dev/null "$base/internal/annotation-queue/metrics"; }
wait_for "the reloaded nginx listens on $api_port" api_up

body=$out/answer.json
# POST $1 with body $2 through the chroot's curl: "<status> <content type>"
# in $status, the answer in $body
post() {
    in_root curl -s -w '\n%{http_code} %{content_type}' \
        -X POST "$base/api/v1/annotations/$1" \
        -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        -d "$2" > "$body.raw"
    status=$(tail -n 1 "$body.raw")
    sed '$d' "$body.raw" > "$body"
}
# field $1 (a path, e.g. item.id) of the last answer
field() {
    perl -MJSON::PP -e '
        local $/; my $j = decode_json(<STDIN>);
        for my $k (split /\./, $ARGV[0]) { $j = $j->{$k} }
        print JSON::PP::is_bool($j) ? ($j ? "true" : "false")
            : ref $j ? "" : $j // ""' \
        "$1" < "$body"
}
expect() {  # what, wanted status, wanted item id
    [ "$status" = "$2 application/json" ] \
        || fail "$1: answered $status: $(cat "$body")"
    [ "$(field success)" = true ] || fail "$1: $(cat "$body")"
    [ "$(field item.id)" = "$3" ] || fail "$1: item $(field item.id), wanted $3"
}

post queue "{\"queue_id\": \"$queue\"}"
expect "claim" 200 "$item_a"
version=$(field item.version)
ok "a claim through curl in the chroot answers 200 with the first item ($item_a, version $version)"

post extend "{\"item_id\": \"$item_a\", \"version\": $version}"
expect "extend" 200 "$item_a"
ok "extend answers 200"

post release "{\"item_id\": \"$item_a\", \"version\": $version}"
expect "release" 200 "$item_a"
[ "$(field item.status)" = available ] || fail "release: status $(field item.status)"
ok "release answers 200, the item is available again"

post queue "{\"queue_id\": \"$queue\"}"
expect "claim after release" 200 "$item_a"
version=$(field item.version)
post complete "{\"item_id\": \"$item_a\", \"version\": $version, \"result\": {\"score\": 4}}"
expect "complete" 200 "$item_a"
[ "$(field item.status)" = completed ] || fail "complete: status $(field item.status)"
ok "claim again and complete answer 200"

metrics=$(in_root curl -s -f "$base/internal/annotation-queue/metrics") \
    || fail "the status page"
grep -q 'annotation_queue_answers_total{.*endpoint="claim",outcome="claimed"} 2$' <<< "$metrics" \
    || fail "the status page does not count the 2 claims: $metrics"
ok "the status page answers 200 and counts the 2 claims"

log=$root/var/log/nginx/annotation_queue.log
logged() { [ "$(grep -c 'outcome=' "$log" 2>/dev/null)" -ge 5 ]; }
wait_for "the access log holds the 5 API requests" logged
grep -q "key=${key:0:12} item=$item_a outcome=completed" "$log" \
    || fail "the access log: $(cat "$log")"
grep -q "${key:12}" "$log" && fail "the access log holds the key"
ok "the example's access log names the key by its prefix, never the key"

# ---------------------------------------------------------------------------
# removal, as an operator does it: the module's configuration first

# the operator takes the module's configuration out first (kept aside here
# to show below why)
mv "$root$conf" "$root/root/annotation_queue.conf"
step "apt-get remove $pkg"
in_root apt-get -o APT::Sandbox::User=root remove -y "$pkg" \
    > "$out/apt-remove.log" 2>&1 || { cat "$out/apt-remove.log"; fail "apt-get remove"; }
grep -q 'Triggering nginx reload' "$out/apt-remove.log" \
    || fail "the removal did not trigger nginx's reload"

[ ! -e "$root$so" ] || fail "$so left after remove"
[ ! -e "$root$enabled" ] && [ ! -L "$root$enabled" ] || fail "$enabled left after remove"
[ -L "$root$enabled.removed" ] || fail "no $enabled.removed (dh_nginx parks the link)"
ok "remove disables the load_module ($enabled parked as .removed) and removes the module"

in_root nginx -q -t || fail "nginx -t after remove"
ok "nginx -t passes after remove"
api_gone() { ! curl -s -o /dev/null "$base/"; }
wait_for "the reloaded nginx no longer listens on $api_port" api_gone
site_up || fail "nginx does not serve its default site after the removal's reload"
ok "the removal reloaded the running nginx, which serves on without the module"

# an operator who left it in place: nginx -t refuses it (and so does the
# reload the removal triggers, which leaves the old configuration running)
cp "$root/root/annotation_queue.conf" "$root$conf"
if in_root nginx -q -t > "$out/nginx-t.log" 2>&1; then
    fail "nginx -t passes with the module's directives and no module"
fi
grep -q 'unknown directive "annotation_queue_limit_zone"' "$out/nginx-t.log" \
    || fail "nginx -t: $(cat "$out/nginx-t.log")"
rm "$root$conf"
ok "with the module's configuration left in conf.d, nginx -t fails (unknown directive): it goes first"

in_root apt-get -o APT::Sandbox::User=root purge -y "$pkg" \
    > "$out/apt-purge.log" 2>&1 || { cat "$out/apt-purge.log"; fail "apt-get purge"; }
ls "$root/etc/nginx/modules-enabled" | grep -q annotation \
    && fail "purge left $(ls "$root/etc/nginx/modules-enabled")"
in_root nginx -q -t || fail "nginx -t after purge"
ok "purge leaves nothing in modules-enabled; nginx -t passes"

nginx_service stop
step "PASS"
