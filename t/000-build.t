# The module loads; its directives are accepted where documented (http,
# server, location) and merge down; invalid values make the configuration
# fail, nginx -t printing what is wrong and where (each error of the
# module's directives and of the limit zones); the module with only a
# status page (no endpoint, no database) runs and its workers exit cleanly.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use POSIX ();
use Test::Nginx::Socket 'no_plan';

our $org = AQ::org('build');
our %k;
sub key_of { my ($name) = @_; return $k{$name} //= AQ::key($org, rater => $name) }
our $queue = AQ::queue($org, 'build', lease => undef);
AQ::enqueue_many($queue, 20, prefix => 'build');

# nginx -t, outside Test::Nginx: every directive at every level.
{
    my ($rc, $out) = AQ::nginx_test_config(http => <<'_EOC_', location => <<'_EOC_');
    annotation_queue_pool_size 4;
    annotation_queue_max_waiting 16;
    annotation_queue_connect_timeout 2s;
    annotation_queue_query_timeout 3s;
    annotation_queue_max_body_size 2k;
    annotation_queue_lease 10m;
    annotation_queue_max_wait 30s;
    annotation_queue_listen_database "host=127.0.0.1 port=5432 dbname=direct";
_EOC_
            annotation_queue_database "host=127.0.0.1 port=5432 user=nobody dbname=elsewhere";
            annotation_queue_pool_size 2;
            annotation_queue_max_waiting 0;
            annotation_queue_connect_timeout 500ms;
            annotation_queue_query_timeout 1s;
            annotation_queue_max_body_size 512;
            annotation_queue_lease 1h;
            annotation_queue_max_wait 0;
            annotation_queue_listen_database "host=127.0.0.1 dbname=listen";
_EOC_
    is($rc, 0, 'nginx -t accepts every directive at http and location level')
        or diag $out;
    like($out, qr/syntax is ok/, 'nginx -t: syntax is ok');

    unlike($out, qr/\[warn\]/, 'nginx -t: no warning') or diag $out;

    # host names are resolved without blocking a worker: t/067-dns.t

    ($rc, $out) = AQ::nginx_test_config(http => '    annotation_queue_pool_size many;');
    isnt($rc, 0, 'nginx -t refuses annotation_queue_pool_size many');
    like($out, qr/annotation_queue_pool_size/, 'nginx -t names the directive')
        or diag $out;
}

# ---------------------------------------------------------------------------
# Configurations that nginx -t refuses, each with the message nginx prints
# (the operator's clue).  For an error found at the directive, the message
# names the directive's own line; for one found once the http block is read
# (merging the levels, the status zone), nginx names the http block's end.

# An nginx.conf (paths relative to nginx's prefix): the module loaded;
# annotation_queue_database at http level unless database => '' (or
# database => 'conninfo'); $o{http} more http directives; one server whose
# locations are $o{locations}, by default a claim location holding
# $o{location}.
sub conf_text {
    my (%o) = @_;
    my $load = join '', map { "load_module $_;\n" }
                        split ' ', $ENV{TEST_NGINX_LOAD_MODULES};
    my $user = $> == 0 ? "user root;\n" : '';
    my $workers = $o{workers} // 1;
    my $port = $o{port} // AQ::free_port();
    my $dsn = $o{database} // $AQ::DSN;
    my $db = length $dsn ? qq{    annotation_queue_database "$dsn";\n} : '';
    my $http = $o{http} // '';
    $http .= "\n" if length $http && $http !~ /\n\z/;
    my $location = $o{location} // '';
    $location .= "\n" if length $location && $location !~ /\n\z/;
    my $locations = $o{locations} // <<"_EOC_";
        location = $AQ::URI {
            annotation_queue_claim;
$location        }
_EOC_
    return <<"_EOC_";
${load}${user}worker_processes $workers;
daemon off;
master_process on;
error_log logs/error.log info;
pid logs/nginx.pid;

events {
    worker_connections 64;
}

http {
    access_log off;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;

${db}${http}
    server {
        listen 127.0.0.1:$port;

${locations}    }
}
_EOC_
}

# The number of the line of $conf that matches $re (the $n-th such line).
sub line_of {
    my ($conf, $re, $n) = @_;
    my @lines = split /\n/, $conf;
    my @at = grep { $lines[$_] =~ $re } 0 .. $#lines;
    return defined $at[ ($n // 1) - 1 ] ? $at[ ($n // 1) - 1 ] + 1 : -1;
}

# nginx -t on conf_text(%o) fails, with exactly one [emerg], whose message
# is $message (a string, or a pattern); with at => $re (and nth => $n), the
# message names the line of the directive that matches $re.  Returns the
# output.
sub refused {
    my ($what, $message, %o) = @_;
    my $conf = conf_text(%o);
    my ($rc, $out) = AQ::nginx_test_config(conf => $conf);
    my $msg = ref $message ? $message : qr/\Q$message\E/;
    isnt($rc, 0, "nginx -t refuses $what") or diag $out;
    my @emerg = $out =~ /\[emerg\] (?:\d+#\d+: )?(.*)$/mg;
    my ($said, $line) = @emerg == 1 && $emerg[0] =~ /^($msg) in \S*nginx\.conf:(\d+)$/
                        ? ($1, $2) : ();
    ok(defined $said, "nginx -t on $what says: "
                      . (ref $message ? "$message" : $message))
        or diag $out;
    if ($o{at}) {
        is($line, line_of($conf, $o{at}, $o{nth}),
           "nginx -t on $what names the line of the offending directive")
            or diag $conf;
    }
    return $out;
}

# The module's own directives, each refused for what is wrong with it.
refused('annotation_queue_lease 0 in a location',
        '"annotation_queue_lease" directive must be positive',
        location => '            annotation_queue_lease 0;',
        at => qr/annotation_queue_lease 0;/);
refused('annotation_queue_lease 0 at http level (the level a location inherits)',
        '"annotation_queue_lease" directive must be positive',
        http => '    annotation_queue_lease 0;',
        at => qr/annotation_queue_lease 0;/);
refused('annotation_queue_query_timeout 0',
        '"annotation_queue_query_timeout" directive must be positive',
        location => '            annotation_queue_query_timeout 0;',
        at => qr/annotation_queue_query_timeout 0;/);
refused('annotation_queue_connect_timeout 0',
        '"annotation_queue_connect_timeout" directive must be positive',
        http => '    annotation_queue_connect_timeout 0s;',
        at => qr/annotation_queue_connect_timeout 0s;/);
refused('annotation_queue_claim without any annotation_queue_database',
        '"annotation_queue_claim" needs "annotation_queue_database"',
        database => '');
refused('annotation_queue_complete without any annotation_queue_database',
        '"annotation_queue_complete" needs "annotation_queue_database"',
        database => '', locations => <<'_EOC_');
        location = /api/v1/annotations/complete {
            annotation_queue_complete;
        }
_EOC_
refused('annotation_queue_database twice in one location',
        '"annotation_queue_database" directive is duplicate',
        location => <<'_EOC_', at => qr/dbname=two/);
            annotation_queue_database "host=127.0.0.1 dbname=one";
            annotation_queue_database "host=127.0.0.2 dbname=two";
_EOC_
refused('annotation_queue_listen_database twice in one location',
        '"annotation_queue_listen_database" directive is duplicate',
        location => <<'_EOC_', at => qr/dbname=two/);
            annotation_queue_listen_database "host=127.0.0.1 dbname=one";
            annotation_queue_listen_database "host=127.0.0.2 dbname=two";
_EOC_
refused('annotation_queue_listen_database that libpq cannot parse',
        qr/invalid "annotation_queue_listen_database": .*/,
        location => '            annotation_queue_listen_database "dbname=x =oops";',
        at => qr/=oops/);
refused('annotation_queue_max_wait that is not a time',
        qr/"annotation_queue_max_wait" directive invalid value/,
        location => '            annotation_queue_max_wait soon;',
        at => qr/max_wait soon/);
refused('two endpoint directives in one location (claim, then extend)',
        '"annotation_queue_extend" directive conflicts with another endpoint or content handler of this location (one a location)',
        location => '            annotation_queue_extend;',
        at => qr/annotation_queue_extend;/);
refused('annotation_queue_status in the location of annotation_queue_claim',
        '"annotation_queue_status" directive conflicts with another endpoint or content handler of this location (one a location)',
        location => '            annotation_queue_status;',
        at => qr/annotation_queue_status;/);

refused('annotation_queue_claim after annotation_queue_status in one location',
        '"annotation_queue_claim" directive conflicts with another endpoint or content handler of this location (one a location)',
        locations => <<"_EOC_", at => qr/annotation_queue_claim;/);
        location = $AQ::URI {
            annotation_queue_status;
            annotation_queue_claim;
        }
_EOC_

{
    # A conninfo without host: libpq's default (the unix socket) is no host
    # name, nothing to warn of.
    my ($rc, $out) = AQ::nginx_test_config(conf => conf_text(database => 'dbname=x'));
    is($rc, 0, 'nginx -t accepts a conninfo without host ("dbname=x")')
        or diag $out;
    unlike($out, qr/\[warn\]/, 'nginx -t: no warning for a conninfo without host')
        or diag $out;
}

# annotation_queue_limit_zone
my $lz = qr/annotation_queue_limit_zone /;
refused('annotation_queue_limit_zone zone=x (no size)',
        'invalid zone size "zone=x"',
        http => '    annotation_queue_limit_zone zone=x rate=1r/s;', at => $lz);
refused('annotation_queue_limit_zone zone=x:lots (a size that does not parse)',
        'invalid zone size "zone=x:lots"',
        http => '    annotation_queue_limit_zone zone=x:lots rate=1r/s;', at => $lz);
refused('annotation_queue_limit_zone zone=x:16k (under 8 pages)',
        'zone "zone=x:16k" is too small',
        http => '    annotation_queue_limit_zone zone=x:16k rate=1r/s;', at => $lz);
refused('annotation_queue_limit_zone rate=0r/s',
        'invalid rate "rate=0r/s"',
        http => '    annotation_queue_limit_zone zone=x:1m rate=0r/s;', at => $lz);
refused('annotation_queue_limit_zone with an unknown parameter (burst=5)',
        'invalid parameter "burst=5"',
        http => '    annotation_queue_limit_zone zone=x:1m burst=5;', at => $lz);
refused('annotation_queue_limit_zone without zone=',
        '"annotation_queue_limit_zone" must have "zone" parameter',
        http => '    annotation_queue_limit_zone rate=1r/s rate=2r/s;', at => $lz);
refused('the same annotation_queue_limit_zone name declared twice',
        'annotation_queue_limit_zone "x" is already bound',
        http => <<'_EOC_', at => $lz, nth => 2);
    annotation_queue_limit_zone zone=x:1m rate=1r/s;
    annotation_queue_limit_zone zone=x:1m rate=2r/s;
_EOC_

# annotation_queue_limit
my $zone_x = "    annotation_queue_limit_zone zone=x:1m rate=1r/s;\n";
my $lim = qr/annotation_queue_limit zone|annotation_queue_limit burst/;
refused('annotation_queue_limit twice in one block',
        '"annotation_queue_limit" directive is duplicate',
        http => $zone_x, location => <<'_EOC_', at => $lim, nth => 2);
            annotation_queue_limit zone=x;
            annotation_queue_limit zone=x burst=2;
_EOC_
refused('annotation_queue_limit naming a limit_req_zone',
        'the shared memory zone "x" is already declared for a different use',
        http => '    limit_req_zone $binary_remote_addr zone=x:1m rate=1r/s;',
        location => '            annotation_queue_limit zone=x;', at => $lim);
refused('annotation_queue_limit with an unknown parameter (delay=3)',
        'invalid parameter "delay=3"',
        http => $zone_x,
        location => '            annotation_queue_limit zone=x delay=3;', at => $lim);
refused('annotation_queue_limit burst= without zone=',
        '"annotation_queue_limit" must have "zone" parameter',
        http => $zone_x,
        location => '            annotation_queue_limit burst=3;', at => $lim);
refused('annotation_queue_limit burst=-1',
        'invalid burst value "burst=-1"',
        http => $zone_x,
        location => '            annotation_queue_limit zone=x burst=-1;', at => $lim);
refused('annotation_queue_limit naming no annotation_queue_limit_zone',
        'unknown annotation_queue_limit_zone "y"',
        http => $zone_x,
        location => '            annotation_queue_limit zone=y;');

# The status page's zone is named "annotation_queue_status": a limit zone
# of that name is refused at its directive, whatever its size (of the very
# size of the status zone, nginx would otherwise hand the status page the
# limit zone's memory).
refused('an annotation_queue_limit_zone named annotation_queue_status',
        'zone name "annotation_queue_status" is reserved for the status page',
        http => '    annotation_queue_limit_zone zone=annotation_queue_status:1m rate=1r/s;',
        at => qr/zone=annotation_queue_status:1m/);
refused('an annotation_queue_limit_zone named annotation_queue_status, small',
        'zone name "annotation_queue_status" is reserved for the status page',
        http => '    annotation_queue_limit_zone zone=annotation_queue_status:33888 rate=1r/s;',
        at => qr/zone=annotation_queue_status:33888/);

# worker_processes after the http block: the status page's slots were
# counted before it; refused rather than leaving workers off the page.
{
    (my $conf = conf_text()) =~ s/^worker_processes .*\n//m;
    $conf .= "worker_processes 2;\n";
    my ($rc, $out) = AQ::nginx_test_config(conf => $conf);
    isnt($rc, 0, 'nginx -t refuses worker_processes after the http block') or diag $out;
    like($out, qr/\[emerg\].*"worker_processes" must come before the "http" block/,
         'nginx -t on worker_processes after the http block says why');
}

# ---------------------------------------------------------------------------
# The module loaded with only a status page: no endpoint, no database, so no
# pool.  nginx starts, the page answers 200 with its metrics' headers and no
# sample, and the workers exit cleanly on QUIT.
{
    my $STATUS = '/aq-status';
    my $port = AQ::free_port();
    my $conf = conf_text(database => '', workers => 2, port => $port,
                         locations => <<"_EOC_");
        location = $STATUS {
            annotation_queue_status;
        }
_EOC_
    my ($rc, $out) = AQ::nginx_test_config(conf => $conf);
    is($rc, 0, 'nginx -t accepts the module with only annotation_queue_status')
        or diag $out;

    my $prefix = AQ::nginx_prefix();
    open my $fh, '>', "$prefix/conf/nginx.conf" or die $!;
    print $fh $conf;
    close $fh;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDOUT, '>', "$prefix/logs/stdout.log";
        open STDERR, '>', "$prefix/logs/stderr.log";
        { exec $ENV{TEST_NGINX_BINARY}, '-p', "$prefix/", '-c',
               "$prefix/conf/nginx.conf" }
        POSIX::_exit(127);
    }
    our $status_only = bless { pid => $pid, prefix => $prefix, port => $port },
                             'AQ::Nginx';
    END { AQ::stop_nginx($status_only) if $status_only && $status_only->{pid} }

    my $workers = AQ::Faults::wait_until(10, sub {
        my $w = AQ::Faults::worker_pids($status_only);
        return @$w == 2 ? $w : undef;
    });
    ok($workers, 'nginx starts with only a status page: two workers run')
        or diag AQ::slurp("$prefix/logs/stderr.log") . $status_only->error_log;

    my ($st, $h, $body, $err);
    AQ::Faults::wait_until(10, sub {
        my $c = AQ::Client->new(port => $port);
        ($st, $h, $body, $err) = $c->request(method => 'GET', uri => $STATUS);
        $c->disconnect;
        return $st;
    });
    is($st, 200, 'the status page without pools answers 200')
        or diag $err // $body;
    like($h->{'content-type'} // '', qr{^text/plain; version=0\.0\.4},
         'the status page is Prometheus\' text format');
    my @lines = split /\n/, $body // '';
    is_deeply([grep { !/^# / } @lines], [],
              'the status page without pools has no sample line');
    is_deeply([map { /^# TYPE (\S+) (\S+)$/ ? "$1 $2" : () } @lines],
              ['annotation_queue_pool_size gauge',
               'annotation_queue_connections gauge',
               'annotation_queue_waiting gauge',
               'annotation_queue_answers_total counter',
               'annotation_queue_claim_waiters gauge',
               'annotation_queue_claim_wakeups_total counter'],
              'the status page without pools declares its six metrics');

    kill 'QUIT', $pid;
    my $exited = AQ::Faults::wait_until(10, sub {
        return waitpid($pid, POSIX::WNOHANG()) == $pid ? [$?] : undef;
    });
    $status_only->{pid} = undef if $exited;
    ok($exited && $exited->[0] == 0, 'nginx exits on QUIT, with status 0')
        or diag explain $exited;
    my $log = $status_only->error_log;
    my @codes = $log =~ /worker process \d+ exited with code (\d+)/g;
    is_deeply(\@codes, [0, 0], 'both workers exit with code 0')
        or diag $log;
    is_deeply(AQ::Faults::log_problems($log), [],
              'no alert, crit, emerg or crash in the error log') or diag $log;
    unlike($log, qr/\[error\]/, 'no error in the error log') or diag $log;
}

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: the module loads; every directive at http level; a claim works
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size 4;
    annotation_queue_max_waiting 16;
    annotation_queue_connect_timeout 2s;
    annotation_queue_query_timeout 3s;
    annotation_queue_max_body_size 2k;
    annotation_queue_lease 10m;
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
AQ::headers(::key_of('http'))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item build-1 v1
--- no_error_log
[error]
[alert]
[crit]
[emerg]



=== TEST 2: directives at server and location level; location settings win (lease 1m, max body 64)
--- http_config
--- config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size 2;
    annotation_queue_lease 10m;
    location = /api/v1/annotations/queue {
        annotation_queue_query_timeout 3s;
        annotation_queue_lease 1m;
        annotation_queue_max_body_size 64;
        annotation_queue_claim;
    }
--- request eval
[AQ::claim_req($::queue), AQ::post_req(qq({"queue_id": "$::queue", "pad": "@{['x' x 40]}"}))]
--- more_headers eval
[AQ::headers(::key_of('location')), AQ::headers(::key_of('location'))]
--- error_code eval
[200, 413]
--- response_body_filters eval
[[\&AQ::lease], [\&AQ::brief]]
--- response_body eval
["lease 60s\n", "error body_too_large\n"]
--- no_error_log
[error]
[alert]
[crit]
[emerg]



=== TEST 3: a location's annotation_queue_database overrides the http one (which points nowhere)
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DEAD_DSN";
--- config
    location = /api/v1/annotations/queue {
        annotation_queue_database "$TEST_NGINX_AQ_DSN";
        annotation_queue_claim;
    }
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
AQ::headers(::key_of('override'))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item build-3 v1
--- no_error_log
[alert]
[crit]
[emerg]



=== TEST 4: annotation_queue_pool_size: not a number
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size many;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_pool_size"/



=== TEST 5: annotation_queue_pool_size: 0 (a pool without connections)
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size 0;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*nginx\.conf:\d+/



=== TEST 6: annotation_queue_max_waiting: not a number
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_max_waiting -1;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_max_waiting"/



=== TEST 7: annotation_queue_connect_timeout: not a time
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_connect_timeout soon;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_connect_timeout"/



=== TEST 8: annotation_queue_query_timeout: not a time
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_query_timeout 5parsecs;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_query_timeout"/



=== TEST 9: annotation_queue_max_body_size: not a size
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_max_body_size 4x;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_max_body_size"/



=== TEST 10: annotation_queue_lease: not a time
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_lease forever;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_lease"/



=== TEST 11: annotation_queue_database: a conninfo that libpq cannot parse
--- http_config
    annotation_queue_database "host=127.0.0.1 port";
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*annotation_queue_database/



=== TEST 12: annotation_queue_database: two arguments
--- http_config
    annotation_queue_database "host=127.0.0.1" "port=5432";
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_database"/



=== TEST 13: annotation_queue_claim takes no argument
--- config
    location = /api/v1/annotations/queue {
        annotation_queue_claim yes;
    }
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_claim"/



=== TEST 14: annotation_queue_claim is a location directive, not an http one
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_claim;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_claim" directive is not allowed here/
