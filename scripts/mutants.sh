#!/usr/bin/env bash
# make test-mutants: deliberate faults in the module's decisions, each of
# which some suite must notice.
#
#   scripts/mutants.sh                    every mutant of every list
#   MUTANTS=a,b scripts/mutants.sh        some of them (or: mutants.sh a b)
#   scripts/mutants.sh --check            only check the lists (no build)
#   scripts/mutants.sh --list             the mutants' names, files, suites
#
# The lists live beside the code they break: src/ngx_aq_pool.mutants breaks
# src/ngx_aq_pool.c (src/ngx_aq_sql.mutants: src/ngx_aq_sql.h, the .c
# first, else the .h; "file:" names another), and
# ngx_http_annotation_queue_module.mutants the top file.  A list holds
# blocks:
#
#   === limit-burst-off-by-one
#   suites: t/080-limit.t
#   why: a key gets burst answers instead of burst + 1 before 429
#   --- original
#       if ((ngx_uint_t) excess > alcf->limit_burst) {
#   --- mutant
#       if ((ngx_uint_t) excess >= alcf->limit_burst) {
#   --- end
#
# name (letters, digits, - and _), the suites that should notice (in the
# order to run them: the quickest sure killer first), one line of why, and
# the fault: "original" is exact text (whole lines as they are, spaces
# included) that must occur exactly once in the file, replaced by "mutant"
# (which may be empty).  When the code moves, the mutant is stale and the
# run fails before anything is built, until the list is brought up to date
# (--check says so in a second).  Lines starting with "#" outside a block
# are comments.
#
# Each mutant, in a shadow tree (build/mutants/tree, a copy of the working
# tree's files, nginx configured once in build/mutants/nginx as the top
# Makefile configures build/nginx): the file is made pristine, the mutant
# applied, "make modules" rebuilds what changed, and the suites named run
# in order against the mutant's .so (TEST_NGINX_LOAD_MODULES, the suites
# and t/lib of the shadow tree, so that t/045-claim-sql.t reads the mutant's
# SQL), on one PostgreSQL cluster for the whole run.  The first suite that
# fails kills the mutant; if all pass, it SURVIVED.  A mutant that does not
# compile, or leaves the .so as it was, is an error of the list.
#
# Before the mutants, every suite they name runs once against the pristine
# module (MUTANTS_BASELINE=0 skips that): a suite that fails without a
# mutant would kill every mutant, and stops the run.  A suite that runs
# longer than 3 x its baseline + 120 s (MUTANTS_SUITE_TIMEOUT=<s> sets the
# bound) is stopped and counts as failed (the mutant hangs it).
#
# Prints a line per mutant (killed by which suite, and the first test that
# failed; or SURVIVED), then "N killed, M survived" and the time taken.
# Exits non-zero when a mutant survived, is stale or is an error.  Logs:
# build/mutants/logs/<mutant>/.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

mut="$top/build/mutants"
tree="$mut/tree"
work="$mut/work"
logs="$mut/logs"
nginx_bin=${TEST_NGINX_BINARY:-/usr/sbin/nginx}

mode=run
names=${MUTANTS:-}
for arg in "$@"; do
    case "$arg" in
    --check) mode=check ;;
    --list)  mode=list ;;
    -*)      echo "mutants: unknown option $arg" >&2; exit 2 ;;
    *)       names="${names:+$names,}$arg" ;;
    esac
done

start_time=$(date +%s)
mkdir -p "$mut"

if [ "$mode" = run ]; then
    # one run at a time: they share the shadow tree and build
    exec 9> "$mut/lock"
    if ! flock -n 9; then
        echo "mutants: another run holds build/mutants/lock" >&2
        exit 1
    fi
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/aq-mutants.XXXXXX")
    trap 'rm -rf "$work"' EXIT
fi

# ---------------------------------------------------------------------------
# The lists: parsed and checked into $work (index + one file per text).

rm -rf "$work"
mkdir -p "$work"

lists=()
for f in "$top"/*.mutants "$top"/src/*.mutants; do
    [ -f "$f" ] && lists+=("${f#"$top"/}")
done
if [ ${#lists[@]} -eq 0 ]; then
    echo "mutants: no lists (src/*.mutants)" >&2
    exit 1
fi

perl - "$work" "$names" "${lists[@]}" <<'PERL'
use strict;
use warnings;

my ($work, $names, @lists) = @ARGV;
my (@mutants, %seen, @errors);

for my $list (@lists) {
    open my $fh, '<', $list or die "mutants: $list: $!\n";
    (my $base = $list) =~ s/\.mutants$//;
    (my $dir = $list) =~ s{[^/]*$}{};
    my $default = -f "$base.c" ? "$base.c" : "$base.h";
    my ($m, $in);
    my $line = 0;
    while (my $l = <$fh>) {
        $line++;
        chomp $l;
        if ($in) {
            if ($l eq '--- mutant' && $in eq 'original') { $in = 'mutant'; next }
            if ($l eq '--- end' && $in eq 'mutant') { undef $in; push @mutants, $m; undef $m; next }
            if ($l =~ /^--- /) { push @errors, "$list:$line: \"$l\" inside the $in text"; next }
            push @{ $m->{$in} }, $l;
            next;
        }
        next if $l =~ /^\s*(#|$)/;
        if ($l =~ /^=== (\S+)\s*$/) {
            my $name = $1;
            push @errors, "$m->{where}: mutant $m->{name} has no \"--- end\"" if $m;
            $m = { name => $name, where => "$list:$line", file => $default,
                   original => [], mutant => [] };
            push @errors, "$list:$line: mutant $name named twice (also $seen{$name})"
                if $seen{$name};
            push @errors, "$list:$line: mutant name \"$name\": letters, digits, - and _ only"
                if $name !~ /^[A-Za-z0-9_-]+$/;
            $seen{$name} //= "$list:$line";
            next;
        }
        if (!$m) { push @errors, "$list:$line: text outside a mutant: $l"; next }
        if ($l =~ /^(file|suites|why):\s*(.*?)\s*$/) {
            my ($k, $v) = ($1, $2);
            $v = "$dir$v" if $k eq 'file';    # beside the list
            $m->{$k} = $v;
            next;
        }
        if ($l eq '--- original') { $in = 'original'; next }
        push @errors, "$list:$line: unknown line in mutant $m->{name}: $l";
    }
    push @errors, "$m->{where}: mutant $m->{name} has no \"--- end\"" if $m;
}

for my $m (@mutants) {
    my $w = "$m->{where}: mutant $m->{name}";
    push @errors, "$w: no \"suites:\"" unless $m->{suites};
    push @errors, "$w: no \"why:\"" unless $m->{why};
    push @errors, "$w: file $m->{file} does not exist" unless -f $m->{file};
    push @errors, "$w: empty original" unless grep { /\S/ } @{ $m->{original} };
    push @errors, "$w: the mutant is the original"
        if join("\n", @{ $m->{original} }) eq join("\n", @{ $m->{mutant} });
    for my $s (split ' ', $m->{suites} // '') {
        push @errors, "$w: suite $s does not exist" unless $s =~ m{^t/(?:topology/)?[^/]+\.t$} && -f $s;
    }
}

my @want = grep { length } split /[,\s]+/, $names;
my %by = map { $_->{name} => $_ } @mutants;
for my $n (@want) {
    push @errors, "no mutant named $n" unless $by{$n};
}

if (@errors) {
    print STDERR "mutants: the lists are wrong:\n", map { "  $_\n" } @errors;
    exit 1;
}

my @run = @want ? map { $by{$_} } @want : @mutants;
open my $idx, '>', "$work/index" or die $!;
for my $m (@run) {
    for my $part (qw(original mutant)) {
        open my $o, '>', "$work/$m->{name}.$part" or die $!;
        print $o join("\n", @{ $m->{$part} });
        close $o;
    }
    print $idx join("\t", $m->{name}, $m->{file}, $m->{suites}, $m->{why},
                    $m->{where}), "\n";
}
close $idx;
PERL

names_=() files_=() suites_=() whys_=() wheres_=()
while IFS=$'\t' read -r n f s w where; do
    names_+=("$n"); files_+=("$f"); suites_+=("$s"); whys_+=("$w")
    wheres_+=("$where")
done < "$work/index"
count=${#names_[@]}

if [ "$mode" = list ]; then
    for ((i = 0; i < count; i++)); do
        printf '%-32s %-40s %s\n' "${names_[i]}" "${files_[i]}" "${suites_[i]}"
    done
    exit 0
fi

# Exactly once in the file (under root $1): else the code moved and the
# list did not.  Prints the stale ones; 1 when there are.
check_stale() {
    local root=$1 i why n=0
    for ((i = 0; i < count; i++)); do
        why=$(perl -e '
            local $/;
            open my $f, "<", $ARGV[0] or die "$ARGV[0]: $!\n";
            my $text = <$f>;
            open my $o, "<", $ARGV[1] or die; my $orig = <$o>;
            my ($n, $at) = (0, 0);
            while (($at = index($text, $orig, $at)) >= 0) { $n++; $at++ }
            print "the original text occurs $n times in $ARGV[2]" if $n != 1;
        ' "$root/${files_[i]}" "$work/${names_[i]}.original" "${files_[i]}")
        if [ -n "$why" ]; then
            echo "mutant ${names_[i]}: STALE: $why (${wheres_[i]})"
            n=$((n + 1))
        fi
    done
    if [ "$n" -gt 0 ]; then
        echo "mutants: $n stale mutants: bring the lists up to date with" \
             "the code" >&2
        return 1
    fi
}

if [ "$mode" = check ]; then
    check_stale "$top"
    echo "mutants: $count mutants, each original text found once"
    exit 0
fi

# ---------------------------------------------------------------------------
# The shadow tree: the working tree's files (tracked and new, not ignored);
# a file is rewritten only when its content differs, so that make rebuilds
# exactly what changed.

mkdir -p "$tree" "$logs"
git ls-files -z -c -o --exclude-standard | perl -0 -e '
    use File::Basename qw(dirname);
    use File::Compare qw(compare);
    use File::Copy qw(copy);
    use File::Find qw(find);
    use File::Path qw(make_path);
    my ($tree) = @ARGV;
    my %keep;
    while (my $f = <STDIN>) {
        chomp $f;
        next unless -f $f && !-l $f;
        $keep{$f} = 1;
        my $dst = "$tree/$f";
        next if -f $dst && compare($f, $dst) == 0;
        make_path(dirname($dst));
        unlink $dst;
        copy($f, $dst) or die "mutants: copy $f: $!\n";
        chmod((stat $f)[2] & 07777, $dst);
    }
    # files gone from the working tree go from the shadow tree (not the
    # suites output: t/servroot*)
    find({ no_chdir => 1, wanted => sub {
        return unless -f $_;
        (my $rel = $_) =~ s{^\Q$tree\E/}{};
        return if $rel =~ m{^t/servroot};
        unlink $_ unless $keep{$rel};
    } }, $tree);
' "$tree"

# against the copy the mutants will be applied to
check_stale "$tree"

# the settings of the top Makefile (and of its command line or environment)
make_var() {
    make -s --no-print-directory -C "$top" \
        --eval "mutants-print-var: ; @echo \$($1)" mutants-print-var
}
NGINX_SRC=$(make_var NGINX_SRC)
CC_OPT=$(make_var CC_OPT)
LD_OPT=$(make_var LD_OPT)

if [ ! -f "$mut/nginx/Makefile" ] || [ "$tree/config" -nt "$mut/nginx/Makefile" ]
then
    echo "mutants: configuring nginx in build/mutants/nginx"
    rm -rf "$mut/nginx-src" "$mut/nginx"
    cp -r "$NGINX_SRC" "$mut/nginx-src"
    (cd "$mut/nginx-src" && . ./conf_flags &&
        ./configure "${NGX_CONF_FLAGS[@]}" \
            --with-cc-opt="$CC_OPT" --with-ld-opt="$LD_OPT" \
            --add-dynamic-module="$tree" \
            --builddir="$mut/nginx" > "$mut/configure.log") \
        || { cat "$mut/configure.log"; rm -f "$mut/nginx/Makefile"; exit 1; }
    if [ -f "$top/build/nginx/ngx_auto_config.h" ] \
        && ! diff <(grep -v NGX_CONFIGURE "$top/build/nginx/ngx_auto_config.h") \
                  <(grep -v NGX_CONFIGURE "$mut/nginx/ngx_auto_config.h")
    then
        echo "mutants: configure found other features than build/nginx" \
             "(above): not the same ABI" >&2
        rm -f "$mut/nginx/Makefile"
        exit 1
    fi
fi

so="$mut/ngx_http_annotation_queue_module.so"

# make modules in the shadow build; 0 when the .so is there
build() {
    (cd "$mut/nginx-src" && make -s -j2 -f "$mut/nginx/Makefile" modules) \
        > "$1" 2>&1 || return 1
    cp "$mut/nginx/ngx_http_annotation_queue_module.so" "$so.tmp"
    mv -f "$so.tmp" "$so"
}

# The pristine module: every file as in the working tree.
if ! build "$mut/pristine-build.log"; then
    cat "$mut/pristine-build.log" >&2
    echo "mutants: the module does not build without a mutant" >&2
    exit 1
fi
pristine_sum=$(sha256sum < "$so")
cp "$so" "$mut/pristine.so"

# ---------------------------------------------------------------------------
# One PostgreSQL cluster for the run (AQ gives each suite its own database).

run_tmp=$(mktemp -d "$mut/run.XXXXXX")
chmod 711 "$mut" "$run_tmp"
applied=

# nginx processes a stopped suite left (Test::Nginx's run as daemons): by
# the pids of their pid files under $1, when the process is that nginx
reap_nginx() {
    local pidfile pid
    while IFS= read -r pidfile; do
        pid=$(cat "$pidfile" 2>/dev/null) || continue
        [[ "$pid" =~ ^[0-9]+$ ]] || continue
        if { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null \
            | grep -qF "$1"
        then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done < <(find "$1" -name nginx.pid 2>/dev/null)
}

# PostgreSQL clusters a stopped suite left (AQ::Faults::own_cluster)
reap_pg() {
    local pidfile
    while IFS= read -r pidfile; do
        "$tree/scripts/pg.sh" stop "$(dirname "$(dirname "$pidfile")")" \
            >/dev/null 2>&1 || true
    done < <(find "$1" -path '*/data/postmaster.pid' 2>/dev/null)
}

# the file a mutant changed, pristine again: rewritten, so newer than the
# mutant's object and rebuilt by the next make
restore() {
    cp "$run_tmp/pristine" "$tree/$applied.pristine.tmp"
    mv -f "$tree/$applied.pristine.tmp" "$tree/$applied"
    applied=
}

cleanup() {
    [ -z "$applied" ] || restore
    reap_nginx "$run_tmp"
    reap_pg "$run_tmp/suites"
    "$tree/scripts/pg.sh" stop "$run_tmp/pg" >/dev/null 2>&1 || true
    rm -rf "$run_tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

AQ_TEST_PG_DSN=$("$tree/scripts/pg.sh" start "$run_tmp/pg")
export AQ_TEST_PG_DSN
export TEST_NGINX_BINARY="$nginx_bin"

# run_suite SUITE MODULE LOG LIMIT: the suite's exit status (124: stopped)
run_suite() {
    local suite=$1 module=$2 log=$3 limit=$4 keep=${5:-} dir rc=0
    dir=$(mktemp -d "$run_tmp/suites/s.XXXXXX")
    chmod 711 "$dir"
    mkdir -p "$dir/servroot"
    (cd "$tree" &&
        TMPDIR="$dir" AQ_TEST_SERVROOT_BASE="$dir/servroot" \
        TEST_NGINX_LOAD_MODULES="$module" \
        timeout -k 20 "$limit" prove -v -I t/lib "$suite") > "$log" 2>&1 || rc=$?
    reap_nginx "$dir"
    reap_pg "$dir"
    if [ "$rc" -ne 0 ] && [ -n "$keep" ]; then
        rm -rf "$keep"
        cp -r "$dir/servroot" "$keep" 2>/dev/null || true
        cp "$run_tmp/pg/postgresql.log" "$keep/" 2>/dev/null || true
    fi
    rm -rf "$dir"
    return "$rc"
}

# the first failed test of a prove log (or why the suite died), one line
first_failure() {
    perl -ne '
        if (/^#\s+Failed test \x27(.*?)\x27?\s*$/ || /^not ok \d+ - (.*)/) {
            print "$1\n";
            $done = 1;
            exit;
        }
        $why //= $_ if /^(?:Bail ?out|AQ|.* at \S+ line \d+\.$)/;
        END { print $why // "see the log\n" unless $done }
    ' "$1" | head -1
}

suite_limit() {
    local s=$1 base
    if [ -n "${MUTANTS_SUITE_TIMEOUT:-}" ]; then
        echo "$MUTANTS_SUITE_TIMEOUT"
    elif base=$(grep -F "$s " "$run_tmp/baseline" 2>/dev/null | cut -d' ' -f2) \
         && [ -n "$base" ]; then
        echo $((3 * base + 120))
    else
        echo 900
    fi
}

mkdir -p "$run_tmp/suites"
: > "$run_tmp/baseline"

# every suite once, without a mutant
if [ "${MUTANTS_BASELINE:-1}" != 0 ]; then
    mkdir -p "$logs/baseline"
    for s in $(printf '%s\n' "${suites_[@]}" | tr ' ' '\n' | awk '!seen[$0]++')
    do
        t0=$(date +%s)
        rc=0
        run_suite "$s" "$mut/pristine.so" "$logs/baseline/$(basename "$s").log" \
            "${MUTANTS_SUITE_TIMEOUT:-1800}" \
            "$logs/baseline/$(basename "$s" .t)-servroot" || rc=$?
        t=$(( $(date +%s) - t0 ))
        if [ "$rc" -ne 0 ]; then
            echo "baseline $s: FAILED without a mutant ($t s): $(first_failure \
                "$logs/baseline/$(basename "$s").log")" >&2
            echo "mutants: a suite that fails without a mutant kills every" \
                 "mutant: fix it first (its log, nginx server roots and" \
                 "PostgreSQL log: build/mutants/logs/baseline/)" >&2
            exit 1
        fi
        echo "$s $t" >> "$run_tmp/baseline"
        echo "baseline $s: passed ($t s)"
    done
fi

# ---------------------------------------------------------------------------

killed=0 survived=0 errors=0
survivors=()

for ((i = 0; i < count; i++)); do
    name=${names_[i]} file=${files_[i]}
    mlog="$logs/$name"
    rm -rf "$mlog"
    mkdir -p "$mlog"
    t0=$(date +%s)

    applied=$file
    cp "$tree/$file" "$run_tmp/pristine"
    perl -e '
        local $/;
        my ($file, $orig, $new) = @ARGV;
        open my $f, "<", $file or die; my $text = <$f>; close $f;
        open my $o, "<", $orig or die; $orig = <$o>;
        open my $n, "<", $new or die; $new = <$n> // "";
        my $at = index($text, $orig);
        die "mutants: $file: the original text is not there\n" if $at < 0;
        substr($text, $at, length $orig) = $new;
        open $f, ">", "$file.tmp" or die; print $f $text; close $f or die;
        rename "$file.tmp", $file or die;
    ' "$tree/$file" "$work/$name.original" "$work/$name.mutant"
    diff -u --label "a/$file" --label "b/$file" "$run_tmp/pristine" \
        "$tree/$file" > "$mlog/mutant.diff" || true

    result=
    if ! build "$mlog/build.log"; then
        result="ERROR: does not compile (build/mutants/logs/$name/build.log)"
    elif [ "$(sha256sum < "$so")" = "$pristine_sum" ]; then
        result="ERROR: the module is the same as without the mutant"
    fi

    if [ -z "$result" ]; then
        cp "$so" "$mlog/module.so"
        for s in ${suites_[i]}; do
            rc=0
            run_suite "$s" "$mlog/module.so" "$mlog/$(basename "$s").log" \
                "$(suite_limit "$s")" || rc=$?
            if [ "$rc" -ne 0 ]; then
                how=$(first_failure "$mlog/$(basename "$s").log")
                if [ "$rc" -eq 124 ]; then
                    how="stopped after $(suite_limit "$s") s, after:"
                    how="$how $(grep -E '^(not )?ok [0-9]+' \
                        "$mlog/$(basename "$s").log" | tail -1)"
                fi
                result="killed by $s ($(( $(date +%s) - t0 )) s): $how"
                break
            fi
        done
        rm -f "$mlog/module.so"
    fi

    restore

    case "$result" in
    killed*)
        killed=$((killed + 1))
        echo "mutant $name: $result"
        ;;
    ERROR*)
        errors=$((errors + 1))
        echo "mutant $name: $result"
        ;;
    *)
        survived=$((survived + 1))
        survivors+=("$name")
        echo "mutant $name: SURVIVED ${suites_[i]} ($(( $(date +%s) - t0 )) s):" \
             "${whys_[i]}"
        ;;
    esac
done

elapsed=$(( $(date +%s) - start_time ))
summary="$killed killed, $survived survived"
[ "$errors" -eq 0 ] || summary="$summary, $errors errors"
echo "$summary ($count mutants in $((elapsed / 60)) min $((elapsed % 60)) s)"
if [ "$survived" -gt 0 ]; then
    echo "survived: ${survivors[*]}"
fi
[ "$survived" -eq 0 ] && [ "$errors" -eq 0 ]
