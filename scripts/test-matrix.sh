#!/usr/bin/env bash
# make test-matrix: the Test::Nginx suites against several nginx versions,
# each nginx and its module built under build/matrix/ (the system's nginx is
# never replaced).
#
#   scripts/test-matrix.sh                       every version, every suite
#   scripts/test-matrix.sh t/010-claim.t         some suites (prove options too)
#   AQ_MATRIX="system newest" scripts/test-matrix.sh
#   scripts/test-matrix.sh --build-only          build, run nothing
#
# The versions (AQ_MATRIX, default "system trixie newest"):
#   system   /usr/sbin/nginx (Debian bookworm, 1.22.1) and the module of the
#            normal build (make: build/ngx_http_annotation_queue_module.so);
#   trixie   Debian trixie's nginx source package (1.26.x), fetched with
#            apt-get source through a private apt configuration (a deb-src
#            stanza derived at run time from the system's own
#            /etc/apt/sources.list.d/debian.sources, Suites: trixie; the
#            system's sources are not touched) into build/matrix/src/;
#   newest   the newest release-* tag of the nginx repository's git
#            directory AQ_NGINX_GIT_DIR (default: the snapshot in
#            /work/.mirror/nginx+nginx/repo); a tag may be given instead,
#            e.g. "release-1.30.4" or "1.30.4".
# Each non-system version is built by scripts/build-nginx.sh into
# build/matrix/<version>/ (nginx and module from one configure); sources and
# builds are cached, so a second run builds nothing and needs no network.
#
# One throwaway PostgreSQL cluster per version, as scripts/test.sh does.
# The output of each version's prove is in build/matrix/<version>/prove.log,
# the server roots of a failed run (of every run with AQ_MATRIX_KEEP=1) in
# build/matrix/<version>/servroot/.  AQ_MATRIX_DIR moves build/matrix.
# At the end, one line per version:
#   nginx 1.26.3  suites 27 passed 0 failed  tests 1711  build 128 s  test 243 s
# Exit status: 0 when every suite passed against every version.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

matrix_dir=${AQ_MATRIX_DIR:-$top/build/matrix}
src_dir="$matrix_dir/src"
git_dir=${AQ_NGINX_GIT_DIR:-/work/.mirror/nginx+nginx/repo}
versions=${AQ_MATRIX:-system trixie newest}

build_only=
args=()
for a in "$@"; do
    if [ "$a" = --build-only ]; then
        build_only=1
    else
        args+=("$a")
    fi
done

mkdir -p "$src_dir"

log() { echo "test-matrix: $*" >&2; }

# ---------------------------------------------------------------------------
# Sources.

# Debian trixie's nginx source: prints the tree's path.  The version is that
# of the trixie index; the source is fetched once.
trixie_source() {
    local cached="$src_dir/trixie.version"
    if [ -f "$cached" ] && [ -d "$src_dir/nginx-$(cat "$cached")" ]; then
        echo "$src_dir/nginx-$(cat "$cached")"
        return
    fi

    local apt
    apt=$(mktemp -d "${TMPDIR:-/tmp}/aq-matrix-apt.XXXXXX")
    mkdir -p "$apt/sources.list.d" "$apt/lists/partial" \
             "$apt/cache/archives/partial"
    # The first stanza of the system's Debian source: source packages, trixie.
    awk 'BEGIN { RS = ""; ORS = "\n\n" } NR == 1' \
        /etc/apt/sources.list.d/debian.sources \
        | sed -e 's/^Suites:.*/Suites: trixie/' \
              -e 's/^Types:.*/Types: deb-src/' \
        > "$apt/sources.list.d/trixie-src.sources"
    local opts=(-o "Dir::Etc::sourcelist=/dev/null"
                -o "Dir::Etc::sourceparts=$apt/sources.list.d"
                -o "Dir::State::lists=$apt/lists"
                -o "Dir::Cache=$apt/cache"
                -o "APT::Get::List-Cleanup=0"
                -o "APT::Sandbox::User=root")
    log "apt-get update (trixie, deb-src, private configuration)"
    apt-get "${opts[@]}" update -qq >&2

    local full upstream orig sha
    full=$(apt-cache "${opts[@]}" showsrc nginx \
           | awk '/^Version:/ { print $2 }' | sort -V | tail -n 1)
    if [ -z "$full" ]; then
        log "trixie's index has no nginx source package"
        rm -rf "$apt"
        return 1
    fi
    upstream=${full%%-*}
    upstream=${upstream#*:}
    log "apt-get source nginx=$full"
    # apt-get source also unpacks the tree with Debian's patches applied.
    # When the mirror lacks the .dsc or the Debian tarball, the upstream
    # tarball alone (nginx_<version>.orig.tar.gz, the nginx.org release) is
    # used, checked against the index's SHA-256.
    (cd "$src_dir" && apt-get "${opts[@]}" source -qq "nginx=$full" >&2) \
        || log "apt-get source failed; trying the upstream tarball alone"
    if [ ! -d "$src_dir/nginx-$upstream" ]; then
        orig="nginx_$upstream.orig.tar.gz"
        # The index's stanza of that version: its Checksums-Sha256 lines.
        sha=$(apt-cache "${opts[@]}" showsrc nginx \
              | awk -v v="$full" -v f="$orig" '
                    /^Package:/          { ver = ""; s = 0 }
                    /^Version:/          { ver = $2 }
                    /^Checksums-Sha256:/ { s = 1; next }
                    /^[^ ]/              { s = 0 }
                    s && ver == v && $3 == f { print $1; exit }')
        if [ ! -f "$src_dir/$orig" ] || [ -z "$sha" ] \
           || ! echo "$sha  $src_dir/$orig" | sha256sum -c --quiet - >&2; then
            log "no verified $orig in $src_dir"
            rm -rf "$apt"
            return 1
        fi
        log "$orig: SHA-256 matches trixie's index; Debian's patches are not applied"
        tar -xzf "$src_dir/$orig" -C "$src_dir"
    fi
    rm -rf "$apt"
    [ -d "$src_dir/nginx-$upstream" ] || return 1
    echo "$upstream" > "$cached"
    echo "$src_dir/nginx-$upstream"
}

# A release of the nginx repository ("newest", "release-1.30.4", "1.30.4"):
# prints the tree's path, exported once with git archive.
git_source() {
    local want=$1 tag ver
    case $want in
        newest)
            if [ ! -d "$git_dir" ]; then
                log "no nginx repository at $git_dir (AQ_NGINX_GIT_DIR)"
                return 1
            fi
            tag=$(git --git-dir="$git_dir" tag -l 'release-*' \
                  | sort -V | tail -n 1) ;;
        release-*) tag=$want ;;
        *)         tag=release-$want ;;
    esac
    ver=${tag#release-}
    if [ -f "$src_dir/nginx-$ver/.exported" ]; then
        echo "$src_dir/nginx-$ver"
        return
    fi
    if [ ! -d "$git_dir" ] \
       || ! git --git-dir="$git_dir" rev-parse -q --verify "$tag^{commit}" \
            >/dev/null; then
        log "no tag $tag in $git_dir (AQ_NGINX_GIT_DIR)"
        return 1
    fi
    log "git archive $tag"
    rm -rf "$src_dir/nginx-$ver"
    mkdir -p "$src_dir/nginx-$ver"
    git --git-dir="$git_dir" archive "$tag" | tar -x -C "$src_dir/nginx-$ver"
    touch "$src_dir/nginx-$ver/.exported"
    echo "$src_dir/nginx-$ver"
}

# ---------------------------------------------------------------------------
# The suites against one nginx binary and module.

# run_suites LABEL BINARY MODULE OUTDIR: prints "passed failed tests".
run_suites() {
    local label=$1 binary=$2 module=$3 out=$4
    local tmp rc=0
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/aq-matrix.XXXXXX")
    chmod 711 "$tmp"    # pg.sh runs PostgreSQL as postgres when we are root

    (
        trap '"$top/scripts/pg.sh" stop "$tmp/pg" >/dev/null 2>&1 || true' EXIT
        AQ_TEST_PG_DSN=$("$top/scripts/pg.sh" start "$tmp/pg")
        export AQ_TEST_PG_DSN
        export AQ_TEST_SERVROOT_BASE="$tmp/servroot"
        export TEST_NGINX_BINARY="$binary"
        export TEST_NGINX_LOAD_MODULES="$module"
        mkdir -p "$AQ_TEST_SERVROOT_BASE"

        local targets=-r a
        for a in "${args[@]+"${args[@]}"}"; do
            [ -e "$a" ] && targets=
        done
        if [ -n "$targets" ]; then
            prove -I t/lib "${args[@]+"${args[@]}"}" -r t/
        else
            prove -I t/lib "${args[@]}"
        fi
    ) 2>&1 | tee "$out/prove.log" | sed -u "s/^/[$label] /" >&2 || rc=$?

    rm -rf "$out/servroot"
    if [ "$rc" -ne 0 ] || [ -n "${AQ_MATRIX_KEEP:-}" ]; then
        mkdir -p "$out/servroot"
        cp -r "$tmp/servroot"/. "$out/servroot/" 2>/dev/null || true
        cp "$tmp/pg/postgresql.log" "$out/servroot/" 2>/dev/null || true
    fi
    "$top/scripts/pg.sh" stop "$tmp/pg" >/dev/null 2>&1 || true
    rm -rf "$tmp"

    # prove's lines: "t/010-claim.t .... ok" (or "skipped: ..."), then
    # "Files=29, Tests=5184, ...".
    local files tests passed
    files=$(sed -n 's/^Files=\([0-9]*\), Tests=.*/\1/p' "$out/prove.log" | tail -n 1)
    tests=$(sed -n 's/^Files=[0-9]*, Tests=\([0-9]*\),.*/\1/p' "$out/prove.log" | tail -n 1)
    passed=$(grep -cE '^[^ ]+\.t \.+ (ok|skipped:)' "$out/prove.log" || true)
    echo "${passed:-0} $(( ${files:-0} - ${passed:-0} )) ${tests:-0} $rc"
}

# ---------------------------------------------------------------------------

summary=()
status=0

for v in $versions; do
    t0=$(date +%s)
    case $v in
        system)
            binary=${AQ_SYSTEM_NGINX:-/usr/sbin/nginx}
            log "system: make (build/ngx_http_annotation_queue_module.so)"
            version=$("$binary" -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
            out="$matrix_dir/system-$version"
            if ! make -s -C "$top" all >&2; then
                status=1
                summary+=("nginx $version  build failed (make)")
                continue
            fi
            module="$top/build/ngx_http_annotation_queue_module.so"
            ;;
        *)
            if [ "$v" = trixie ]; then
                src=$(trixie_source) || { status=1; summary+=("$v: no source"); continue; }
            else
                src=$(git_source "$v") || { status=1; summary+=("$v: no source"); continue; }
            fi
            version=${src##*/nginx-}
            out="$matrix_dir/$version"
            log "$v: nginx $version (scripts/build-nginx.sh $src)"
            if ! "$top/scripts/build-nginx.sh" "$src" "$out" >&2; then
                status=1
                summary+=("nginx $version  build failed: $out/make.log")
                continue
            fi
            binary="$out/objs/nginx"
            module="$out/objs/ngx_http_annotation_queue_module.so"
            ;;
    esac
    mkdir -p "$out"
    t1=$(date +%s)
    if [ -n "$build_only" ]; then
        summary+=("$(printf 'nginx %-7s built  build %d s' "$version" $((t1 - t0)))")
        continue
    fi

    log "nginx $version: the suites ($binary, $module)"
    read -r passed failed tests rc < <(run_suites "$version" "$binary" "$module" "$out")
    t2=$(date +%s)
    [ "$rc" -eq 0 ] && [ "$failed" -eq 0 ] || status=1
    summary+=("$(printf 'nginx %-7s suites %d passed %d failed  tests %d  build %d s  test %d s%s' \
                 "$version" "$passed" "$failed" "$tests" $((t1 - t0)) $((t2 - t1)) \
                 "$([ "$rc" -eq 0 ] || echo "  (prove exit $rc: $out/prove.log)")")")
done

echo
printf '%s\n' "${summary[@]}"
exit "$status"
