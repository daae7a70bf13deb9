#!/usr/bin/env bash
# make coverage: line and branch coverage of the module by the Test::Nginx
# suites (scripts/test.sh, same arguments), measured with gcov.
#
#   scripts/coverage.sh                   all suites
#   scripts/coverage.sh t/010-claim.t     some suites (the others' lines
#                                         count as missed)
#
# - The module is built with --coverage -O0 -g in build/coverage/ (its own
#   copy of nginx's source tree, configured with Debian's conf_flags like
#   build/nginx; the features configure finds must be the same, or the
#   module would not have nginx's ABI).
# - The suites run against it from build/coverage/top/, whose entries
#   are links to the repository's (but build/, which holds the
#   coverage module: scripts/test.sh loads the module of the tree it runs
#   from).
# - Every nginx process that loaded the module writes its counts into the
#   .gcda files beside the objects (build/coverage/nginx/addon/) when it
#   exits or unloads the module: the master, "nginx -t", and the workers,
#   which exit on QUIT.  A process killed with KILL writes nothing.  The
#   suites run nginx as root ("user root;"); the object directories are
#   made writable by all, so that workers of another user could write too.
#   The counts are cleared before each run.
# - lcov (installed when missing, Debian's package) captures them with
#   branch coverage; the table printed at the end gives, per file of src/
#   and the module file, lines and branches hit / total, and their totals.
#   The HTML report is build/coverage/html/index.html; the lcov data is
#   build/coverage/coverage.info.
#
# Fails when a suite fails (the coverage of the run is printed anyway), when
# the build or the capture fails, or when no worker wrote its counts (the
# claim's answer, which only workers run, shows no hit).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

out="$top/build/coverage"
src="$out/nginx-src"
objs="$out/nginx"
module="$out/ngx_http_annotation_queue_module.so"
nginx_src=${NGINX_SRC:-/usr/share/nginx/src}

# -O0: every line keeps its own code; no _FORTIFY_SOURCE (it needs -O).
# -Werror as in the top Makefile: it decides some of configure's answers
# (pwrite(), strerrordesc_np()), which must be those of build/nginx
cc_opt="--coverage -O0 -g -fPIC -fstack-protector-strong -Wall -Wextra \
-Wno-unused-parameter -Werror"
ld_opt="--coverage -Wl,-z,relro -Wl,-z,now -fPIC"

# ---------------------------------------------------------------------------
# lcov

if ! command -v lcov >/dev/null || ! command -v genhtml >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "coverage: installing lcov"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q lcov >/dev/null
    else
        echo "coverage: lcov is missing (apt-get install lcov)" >&2
        exit 1
    fi
fi

# ---------------------------------------------------------------------------
# The module with gcov, in build/coverage/

if [ ! -f "$objs/Makefile" ] || [ "$top/config" -nt "$objs/Makefile" ] \
   || [ "$0" -nt "$objs/Makefile" ]
then
    echo "coverage: configuring nginx in $out"
    rm -rf "$src" "$objs"
    mkdir -p "$out"
    cp -r "$nginx_src" "$src"
    (cd "$src" && . ./conf_flags && \
        ./configure "${NGX_CONF_FLAGS[@]}" \
            --with-cc-opt="$cc_opt" --with-ld-opt="$ld_opt" \
            --add-dynamic-module="$top" \
            --builddir="$objs" > "$out/configure.log" 2>&1) \
    || { cat "$out/configure.log" >&2; rm -f "$objs/Makefile"; exit 1; }
    # the configure's test programs leave their own counts behind
    find "$src" "$objs" -name '*.gcda' -delete
    if [ -f "$top/build/nginx/ngx_auto_config.h" ] \
       && ! diff <(grep -v NGX_CONFIGURE "$top/build/nginx/ngx_auto_config.h") \
                 <(grep -v NGX_CONFIGURE "$objs/ngx_auto_config.h") >&2
    then
        echo "coverage: the coverage configure found other features than" \
             "build/nginx (above): not the same ABI" >&2
        rm -f "$objs/Makefile"
        exit 1
    fi
fi

echo "coverage: building $module"
(cd "$src" && make -s -f "$objs/Makefile" modules) \
    || { echo "coverage: the build failed" >&2; exit 1; }
cp "$objs/ngx_http_annotation_queue_module.so" "$module.tmp"
mv -f "$module.tmp" "$module"

# Counts of this run only; directories where any user may write them.
find "$objs/addon" -name '*.gcda' -delete
find "$objs/addon" -type d -exec chmod a+rwx {} +

# ---------------------------------------------------------------------------
# The suites, from a tree whose build/ holds the coverage module

shadow="$out/top"
rm -rf "$shadow"
mkdir -p "$shadow/build"
for f in "$top"/*; do
    # everything but build/: the suites, the SQL, the contract, and the
    # sources and mutant lists that scripts/test.sh checks first
    [ "$(basename "$f")" = build ] || ln -s "$f" "$shadow/$(basename "$f")"
done
ln -s "$module" "$shadow/build/ngx_http_annotation_queue_module.so"

# -O0 and the counters make nginx a little slower than usual
export TEST_NGINX_TIMEOUT=${TEST_NGINX_TIMEOUT:-10}

rc=0
"$shadow/scripts/test.sh" "$@" 2>&1 | tee "$out/prove.log" || rc=$?

# ---------------------------------------------------------------------------
# Capture, the table, the HTML report

ngcda=$(find "$objs/addon" -name '*.gcda' | wc -l)
if [ "$ngcda" -eq 0 ]; then
    echo "coverage: no .gcda file was written under $objs/addon" >&2
    exit 1
fi

lcov_rc=(--rc lcov_branch_coverage=1)
info="$out/coverage.info"

# (lcov.log: Debian's lcov 1.16 warns "Subroutine ... redefined" at each
# start, harmless; anything else is printed)
lcov_failed() {
    grep -v 'redefined at' "$out/lcov.log" >&2 || true
    echo "coverage: $1 failed" >&2
    exit 1
}

lcov -q "${lcov_rc[@]}" --capture --directory "$objs/addon" \
     --output-file "$out/all.info" 2> "$out/lcov.log" \
|| lcov_failed "lcov --capture"
lcov -q "${lcov_rc[@]}" --extract "$out/all.info" \
     "$top/src/*" "$top/ngx_http_annotation_queue_module.c" \
     --output-file "$info" 2>> "$out/lcov.log" \
|| lcov_failed "lcov --extract"

rm -rf "$out/html"
genhtml -q "${lcov_rc[@]}" --branch-coverage --legend \
        --title "ngx_http_annotation_queue_module: make coverage" \
        --prefix "$top" --output-directory "$out/html" "$info" \
        2>> "$out/lcov.log" \
|| echo "coverage: genhtml failed (see $out/lcov.log)" >&2

# The table: per file, lines and branches hit / total (%).  Also checks
# that a worker wrote its counts: ngx_aq_claim_respond (the claim's answer)
# runs in workers only.
worker=0
perl -e '
    my ($top, $info) = @ARGV;
    my (%f, $cur, $worker);
    open my $fh, "<", $info or die "coverage: $info: $!\n";
    while (<$fh>) {
        chomp;
        if (/^SF:(.*)$/) { ($cur = $1) =~ s{^\Q$top\E/}{}; next; }
        $f{$cur}{$1} = $2 if /^(LF|LH|BRF|BRH|FNF|FNH):(\d+)$/;
        $worker = 1 if /^FNDA:([1-9]\d*),ngx_aq_claim_respond$/;
    }
    my $pc = sub { $_[1] ? sprintf("%5.1f%%", 100 * $_[0] / $_[1]) : "    -" };
    my $fmt = "%-38s %11s %6s   %11s %6s   %7s\n";
    printf $fmt, "file", "lines", "", "branches", "", "funcs";
    my %t;
    for my $file (sort keys %f) {
        my $x = $f{$file};
        $t{$_} += $x->{$_} // 0 for qw(LF LH BRF BRH FNF FNH);
        printf $fmt, $file,
            ($x->{LH} // 0) . "/" . ($x->{LF} // 0), $pc->($x->{LH}, $x->{LF}),
            ($x->{BRH} // 0) . "/" . ($x->{BRF} // 0), $pc->($x->{BRH}, $x->{BRF}),
            ($x->{FNH} // 0) . "/" . ($x->{FNF} // 0);
    }
    printf $fmt, "total (src/ + module file)",
        "$t{LH}/$t{LF}", $pc->($t{LH}, $t{LF}),
        "$t{BRH}/$t{BRF}", $pc->($t{BRH}, $t{BRF}), "$t{FNH}/$t{FNF}";
    exit($worker ? 0 : 3);
' "$top" "$info" | tee "$out/table.txt" || worker=$?

echo "coverage: HTML report: $out/html/index.html"

if [ "$worker" -ne 0 ]; then
    echo "coverage: FAILED: no worker wrote its counts" \
         "(ngx_aq_claim_respond never ran)" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    echo "coverage: FAILED: the suites failed (coverage above is of the" \
         "failed run)" >&2
    exit "$rc"
fi
echo "coverage: passed"
