# The status page (annotation_queue_status): Prometheus' text format, per
# pool and worker and summed (worker="all"): annotation_queue_pool_size,
# annotation_queue_connections{state=idle|busy|connecting},
# annotation_queue_waiting and annotation_queue_answers_total{endpoint,
# outcome}.  The conninfo (and its password) never shows.
#
# The standalone part (before run_tests) runs two workers: the sums, and
# the gauges while claims are blocked on a lock (busy, waiting) or on a
# server that never answers (connecting).
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Workflow;
use IO::Socket::INET;
use Test::Nginx::Socket 'no_plan';
use Time::HiRes ();

our $org = AQ::org('status');
our %k = map { $_ => AQ::Workflow::key($org, $_) } qw(s1 s2 s3 s4 p1 p2);
our %q;
$q{seq} = AQ::Workflow::queue($org, 'seq');
AQ::Workflow::enqueue($q{seq}, "st-$_") for 1 .. 3;
$q{pools} = AQ::Workflow::queue($org, 'pools');
AQ::Workflow::enqueue($q{pools}, "pools-$_") for 1 .. 3;

our $PASSWORD = 's3cr3t-' . AQ::random_hex(12);
$ENV{TEST_NGINX_AQ_DSN_PW} = "$AQ::DSN password=$PASSWORD";

# The status text without its HELP lines, each family's samples sorted,
# families sorted; then "problems: ..." when the text format is broken (a
# family's samples not together, a sample before its # TYPE, ...).
sub prom {
    my ($text) = @_;
    my $p = AQ::Workflow::parse_prometheus($text);
    my %by;
    push @{ $by{ $_->[0] } }, $_->[3] for @{ $p->{samples} };
    my $out = '';
    for my $f (sort { $a->[0] cmp $b->[0] } @{ $p->{families} }) {
        $out .= "# TYPE $f->[0] $f->[1]\n";
        $out .= "$_\n" for sort @{ $by{ $f->[0] } || [] };
    }
    $out .= 'problems: ' . join('; ', @{ $p->{problems} }) . "\n" if @{ $p->{problems} };
    return $out;
}

# Lines that give the database away.
sub secrets {
    my ($text) = @_;
    my @found = grep { index($text, $_) >= 0 }
                ($PASSWORD, 'password', 'dbname', 'host=', 'port=', 'user=', $AQ::DB);
    return @found ? 'shows: ' . join(', ', @found) . "\n" : "no conninfo\n";
}

# ---------------------------------------------------------------------------
# Two workers: sums, and the gauges of blocked claims.
our $tarpit = IO::Socket::INET->new(Listen => 128, LocalAddr => '127.0.0.1',
                                    LocalPort => 0, Proto => 'tcp')
    or die "tarpit: $!";
{
    my $what = 'two workers';
    my $queue = AQ::Workflow::queue($org, 'two-workers');
    AQ::enqueue_many($queue, 20);
    my $keys = AQ::keys_for($org, 20);
    my $sport = AQ::free_port();
    my $tarpit_dsn = 'host=127.0.0.1 port=' . $tarpit->sockport
                     . " user=postgres dbname=$AQ::DB password=$PASSWORD";
    # the claims stay blocked and the tarpit connecting while the page is
    # read: both bounds scale with AQ::slow()
    my $query_timeout = 10 * AQ::slow();
    my $tarpit_timeout = 3 * AQ::slow();
    my $ngx = AQ::start_nginx(workers => 2, listen => 'reuseport',
                              location => 'add_header X-Worker $pid always;',
                              http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_max_waiting 8;
    annotation_queue_query_timeout ${query_timeout}s;

    server {
        listen 127.0.0.1:$sport;

        location = /status {
            annotation_queue_status;
        }

        location = /tarpit {
            annotation_queue_database "$tarpit_dsn";
            annotation_queue_pool_size 3;
            annotation_queue_connect_timeout ${tarpit_timeout}s;
            annotation_queue_claim;
        }
    }
_EOC_

    my $status = sub {
        my ($st, $h, $body) = AQ::Client->new(port => $sport)
                              ->request(method => 'GET', uri => '/status');
        return ($st, $h, $body, AQ::Workflow::parse_prometheus($body));
    };
    # The pool whose annotation_queue_pool_size is $size.
    my $pool_of = sub {
        my ($p, $size) = @_;
        for (@{ $p->{samples} }) {
            return $_->[1]{pool} if $_->[0] eq 'annotation_queue_pool_size' && $_->[2] == $size;
        }
        return 'none';
    };
    my $v = sub { my ($p, $name, %l) = @_; AQ::Workflow::sample($p, $name, %l) // 'absent' };

    # Kept-alive connections, 3 to each worker; a claim on each.
    my $by = AQ::Workflow::worker_connections($ngx->port, 3);
    my @conns = map { @{ $by->{$_} } } sort keys %$by;
    is(scalar(@conns), 6, "$what: 3 connections served by each of the 2 workers")
        or diag(Test::More::explain({ map { $_ => scalar @{ $by->{$_} } } keys %$by }));
    my @warm = map { ($conns[$_]->claim($queue, $keys->[$_]))[0] } 0 .. $#conns;
    is_deeply(\@warm, [(200) x 6], "$what: six claims answer 200");

    my ($st, $h, $body, $p) = $status->();
    is($st, 200, "$what: the status page answers 200");
    is_deeply($p->{problems}, [], "$what: valid text format, each family together")
        or diag $body;
    my $main = $pool_of->($p, 1);
    my $slow = $pool_of->($p, 3);
    isnt($main, 'none', "$what: the claim location's pool has pool_size 1");
    isnt($slow, 'none', "$what: the tarpit location's pool has pool_size 3");
    isnt($main, $slow, "$what: ... two pools");

    # worker="all" is the sum of worker 0 and worker 1, for every sample.
    my (@wrong, $sums);
    for my $s (@{ $p->{samples} }) {
        next unless ($s->[1]{worker} // '') eq 'all';
        my %l = %{ $s->[1] };
        my $sum = 0;
        for my $w (0, 1) {
            my $x = AQ::Workflow::sample($p, $s->[0], %l, worker => $w);
            $sum += $x // 0;
        }
        $sums++;
        push @wrong, "$s->[3] but the workers sum to $sum" if $sum != $s->[2];
    }
    ok($sums, "$what: there are worker=\"all\" samples");
    is_deeply(\@wrong, [], "$what: each worker=\"all\" sample is the sum of workers 0 and 1");
    my @per = map { $v->($p, 'annotation_queue_answers_total', pool => $main, worker => $_,
                         endpoint => 'claim', outcome => 'claimed') } 0, 1;
    is("@per", '3 3', "$what: claimed: 3 by worker 0, 3 by worker 1");
    is($v->($p, 'annotation_queue_answers_total', pool => $main, worker => 'all',
            endpoint => 'claim', outcome => 'claimed'), 6,
       "$what: claimed, all workers: 6");

    # Four claims blocked on a lock, two on each worker: each worker's one
    # connection is busy, one claim waits for it.  A claim to the tarpit is
    # connecting.
    AQ::lock_items();
    my @c = map { @{ $by->{$_} }[0, 1] } sort keys %$by;
    $c[$_]->send_request(body => qq({"queue_id":"$queue"}), key => $keys->[6 + $_]) for 0 .. 3;
    my $tc = AQ::Client->new(port => $sport, timeout => 10);
    $tc->send_request(uri => '/tarpit', body => qq({"queue_id":"$queue"}), key => $keys->[10]);

    # until the page shows them all blocked (or the deadline: the checks
    # below then say what it shows)
    my $deadline = Time::HiRes::time() + 10 * AQ::slow();
    while (1) {
        ($st, $h, $body, $p) = $status->();
        my $gauges = join ' ', map {
            my $w = $_;
            (map { $v->($p, 'annotation_queue_connections', pool => $main, worker => $w,
                        state => $_) } qw(idle busy connecting)),
            $v->($p, 'annotation_queue_waiting', pool => $main, worker => $w)
        } 0, 1;
        last if $gauges eq '0 1 0 1 0 1 0 1'
                && $v->($p, 'annotation_queue_connections', pool => $slow, worker => 'all',
                        state => 'connecting') eq '1';
        last if Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }

    my %all = map { $_ => $v->($p, 'annotation_queue_connections', pool => $main,
                               worker => 'all', state => $_) } qw(idle busy connecting);
    my $waiting = $v->($p, 'annotation_queue_waiting', pool => $main, worker => 'all');
    my @w = map { my $w = $_; join ',', map { $v->($p, 'annotation_queue_connections', pool => $main,
                                                   worker => $w, state => $_) } qw(idle busy connecting) }
            0, 1;
    is("@w", '0,1,0 0,1,0', "$what: blocked: each worker's connection (idle,busy,connecting) is busy")
        or diag $body;
    is(join(',', map { $v->($p, 'annotation_queue_waiting', pool => $main, worker => $_) } 0, 1),
       '1,1', "$what: blocked: one claim waits in each worker") or diag $body;
    is("$all{idle},$all{busy},$all{connecting} $waiting", '0,2,0 2',
       "$what: blocked: all workers: 2 busy, 2 waiting") or diag $body;
    is(join(',', map { $v->($p, 'annotation_queue_connections', pool => $slow,
                             worker => 'all', state => $_) } qw(idle busy connecting)),
       '0,0,1', "$what: the tarpit's pool (idle,busy,connecting): 1 connecting, none busy")
        or diag $body;
    is(secrets($body), "no conninfo\n", "$what: no conninfo, password or database name");

    AQ::unlock_items();
    my @st = map { $_->read_response->{status} } @c;
    is_deeply(\@st, [(200) x 4], "$what: once unlocked, the 4 claims answer 200");
    my $tr = $tc->read_response;
    is($tr->{status}, 503, "$what: the tarpit claim ends in 503 at its connect timeout");

    ($st, $h, $body, $p) = $status->();
    is($v->($p, 'annotation_queue_answers_total', pool => $main, worker => 'all',
            endpoint => 'claim', outcome => 'claimed'), 10, "$what: claimed, all workers: 10");
    is($v->($p, 'annotation_queue_answers_total', pool => $slow, worker => 'all',
            endpoint => 'claim', outcome => 'database_unavailable'), 1,
       "$what: the tarpit's pool counts its database_unavailable");
    is($v->($p, 'annotation_queue_waiting', pool => $main, worker => 'all'), 0,
       "$what: nothing waits any more");
    is($v->($p, 'annotation_queue_connections', pool => $main, worker => 'all', state => 'busy'),
       0, "$what: no connection is busy any more");
    is_deeply($p->{problems}, [], "$what: valid text format") or diag $body;

    $ngx->stop;
    my @bad = grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@bad, [], "$what: no [alert], [crit] or [emerg] in the error log");
}

# ---------------------------------------------------------------------------
# The counters across a reload (nginx -s reload): two workers answer known
# claims (2 by one, 3 by the other), then one claim each is held in flight
# (the items table locked); nginx reloads; once both new workers serve, the
# lock goes and the old workers answer their claims in flight, then exit.
# The counters must go on: each worker's slot shows its old worker's 3 and
# 4 claimed (nothing reset, the answers given after the reload by the old
# workers included, nothing twice), all workers 7.  Then the new workers
# answer 4 and 7 claims: the slots show 7 and 11 (or 10 and 8, whichever
# new worker took which slot), all workers 18.  Workers are told apart by
# an X-Worker header, probed on nginx's own 404 (not counted).
{
    my $what = 'reload';
    my $queue = AQ::Workflow::queue($org, 'reload');
    AQ::enqueue_many($queue, 40);
    my $keys = AQ::keys_for($org, 40);
    my $sport = AQ::free_port();
    my $qt = 20 * AQ::slow();
    my $ngx = AQ::start_nginx(workers => 2, http => <<"_EOC_");
    annotation_queue_pool_size 2;
    annotation_queue_query_timeout ${qt}s;
    add_header X-Worker \$pid always;

    server {
        listen 127.0.0.1:$sport;

        location = /status {
            annotation_queue_status;
        }
    }
_EOC_
    my $parsed = sub {
        my ($st, $h, $body) = AQ::Client->new(port => $sport)
                              ->request(method => 'GET', uri => '/status');
        return AQ::Workflow::parse_prometheus($st == 200 ? $body : '');
    };
    # claimed per worker slot ("3 4": slot 0, slot 1) and all workers
    my $claimed = sub {
        my ($p) = @_;
        return join ' ', map { AQ::Workflow::sample($p, 'annotation_queue_answers_total',
                                   pool => 0, worker => $_, endpoint => 'claim',
                                   outcome => 'claimed') // 'absent' } 0, 1, 'all';
    };
    my $lines = sub {
        my ($p) = @_;
        return scalar grep { $_->[0] eq 'annotation_queue_answers_total'
                             && $_->[1]{outcome} eq 'claimed' } @{ $p->{samples} };
    };
    my $busy = sub {
        AQ::Workflow::sample($parsed->(), 'annotation_queue_connections', pool => 0,
                             worker => 'all', state => 'busy') // -1;
    };
    my $k = 0;
    my $claims = sub {
        my ($c, $n) = @_;
        return join ' ', map { ($c->claim($queue, $keys->[$k++]))[0] } 1 .. $n;
    };

    my $old = AQ::Workflow::worker_connections($ngx->port, 2, uri => '/probe');
    my @old = sort keys %$old;
    is(scalar(@old), 2, "$what: 2 connections to each of the 2 workers")
        or diag(Test::More::explain({ map { $_ => scalar @{ $old->{$_} } } keys %$old }));
    my @warm = ($claims->($old->{ $old[0] }[0], 2), $claims->($old->{ $old[1] }[0], 3));
    is("@warm", '200 200 200 200 200', "$what: 2 claims by one worker, 3 by the other");
    my $before = $claimed->($parsed->());
    ok($before eq '2 3 5' || $before eq '3 2 5',
       "$what: before the reload, claimed per worker and in all: $before");

    AQ::lock_items();
    for my $pid (@old) {
        $old->{$pid}[1]->send_request(body => qq({"queue_id":"$queue"}), key => $keys->[$k++]);
    }
    my $deadline = Time::HiRes::time() + 10 * AQ::slow();
    Time::HiRes::sleep(0.05) while $busy->() != 2 && Time::HiRes::time() < $deadline;
    is($busy->(), 2, "$what: a claim of each worker is in flight, held by the lock");

    my $prefix = $ngx->prefix;
    my $out = `$ENV{TEST_NGINX_BINARY} -p $prefix/ -c $prefix/conf/nginx.conf -s reload 2>&1`;
    is($?, 0, "$what: nginx -s reload") or diag $out;
    my $new = {};
    $deadline = Time::HiRes::time() + 20 * AQ::slow();
    while (keys %$new < 2 && Time::HiRes::time() < $deadline) {
        $new = AQ::Workflow::worker_connections($ngx->port, 1, uri => '/probe', except => \@old);
        Time::HiRes::sleep(0.05) if keys %$new < 2;
    }
    my @new = sort keys %$new;
    is(scalar(@new), 2, "$what: two new workers serve");
    ok(@old == 2 && kill(0, @old) == 2, "$what: the old workers stay for their claims in flight");

    AQ::unlock_items();
    my @late = map { $old->{$_}[1]->read_response->{status} } @old;
    is("@late", '200 200', "$what: the old workers answer their claims in flight after the reload");
    $deadline = Time::HiRes::time() + 20 * AQ::slow();
    Time::HiRes::sleep(0.05) while kill(0, @old) && Time::HiRes::time() < $deadline;
    is(kill(0, @old), 0, "$what: then the old workers exit");

    my $p = $parsed->();
    my $after = $claimed->($p);
    ok(($before eq '2 3 5' && $after eq '3 4 7') || ($before eq '3 2 5' && $after eq '4 3 7'),
       "$what: after the reload each worker's counter went on with its old worker's claims, "
       . "those answered after the reload included; all workers summed (was $before, now $after)");
    is($lines->($p), 3, "$what: claimed counted once per worker slot and once in all");
    is_deeply($p->{problems}, [], "$what: valid text format");

    my @fresh = ($claims->($new->{ $new[0] }[0], 4), $claims->($new->{ $new[1] }[0], 7));
    is("@fresh", join(' ', (200) x 11), "$what: the new workers answer 4 and 7 claims");
    $p = $parsed->();
    my $end = $claimed->($p);
    my %ok = map { $_ => 1 } $before eq '2 3 5' ? ('7 11 18', '10 8 18') : ('8 10 18', '11 7 18');
    ok($ok{$end}, "$what: the new workers' claims add to their slots' counters and to all "
                  . "(now $end)");
    is($lines->($p), 3, "$what: still one line per worker slot and one for all");

    $ngx->stop;
    my @bad = grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@bad, [], "$what: no [alert], [crit] or [emerg] in the error log");
}

$AQ::CONFIG = $AQ::Workflow::LOCATIONS . <<'_EOC_';
    location = /status {
        annotation_queue_status;
    }
_EOC_

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: after a known sequence the status page counts each answer by endpoint and outcome, per worker and summed
3 claims, a 409 no_items_available, a 401 missing_api_key, an extend, a
release, a complete and a 409 stale_claim; then GET the page.  One worker,
one pool (8 connections, of which the one the sequence used is idle).
--- request eval
[(AQ::claim_req($::q{seq})) x 5,
 AQ::Workflow::act('extend', 'st-1', 1), AQ::Workflow::act('release', 'st-2', 1),
 AQ::Workflow::act('complete', 'st-3', 1), AQ::Workflow::act('complete', 'st-3', 1),
 'GET /status']
--- more_headers eval
[(map { AQ::headers($::k{$_}) } qw(s1 s2 s3 s4)), 'Content-Type: application/json',
 (map { AQ::headers($::k{$_}) } qw(s1 s2 s3 s3)), '']
--- error_code eval
[200, 200, 200, 409, 401, 200, 200, 200, 409, 200]
--- response_headers_like eval
[("") x 9, 'Content-Type: text/plain; version=0\.0\.4']
--- response_body_filters eval
[([\&AQ::brief]) x 5, ([\&AQ::Workflow::brief]) x 4, [\&::prom]]
--- response_body eval
["item st-1 v1\n", "item st-2 v1\n", "item st-3 v1\n", "error no_items_available\n",
 "error missing_api_key\n", "claimed st-1 v1, lease 900s\n", "available st-2 v2, lease null\n",
 "completed st-3 v2, lease null\n", "error stale_claim\n",
 <<'_EOT_']
# TYPE annotation_queue_answers_total counter
annotation_queue_answers_total{pool="0",worker="0",endpoint="claim",outcome="claimed"} 3
annotation_queue_answers_total{pool="0",worker="0",endpoint="claim",outcome="missing_api_key"} 1
annotation_queue_answers_total{pool="0",worker="0",endpoint="claim",outcome="no_items_available"} 1
annotation_queue_answers_total{pool="0",worker="0",endpoint="complete",outcome="completed"} 1
annotation_queue_answers_total{pool="0",worker="0",endpoint="complete",outcome="stale_claim"} 1
annotation_queue_answers_total{pool="0",worker="0",endpoint="extend",outcome="extended"} 1
annotation_queue_answers_total{pool="0",worker="0",endpoint="release",outcome="released"} 1
annotation_queue_answers_total{pool="0",worker="all",endpoint="claim",outcome="claimed"} 3
annotation_queue_answers_total{pool="0",worker="all",endpoint="claim",outcome="missing_api_key"} 1
annotation_queue_answers_total{pool="0",worker="all",endpoint="claim",outcome="no_items_available"} 1
annotation_queue_answers_total{pool="0",worker="all",endpoint="complete",outcome="completed"} 1
annotation_queue_answers_total{pool="0",worker="all",endpoint="complete",outcome="stale_claim"} 1
annotation_queue_answers_total{pool="0",worker="all",endpoint="extend",outcome="extended"} 1
annotation_queue_answers_total{pool="0",worker="all",endpoint="release",outcome="released"} 1
# TYPE annotation_queue_claim_waiters gauge
annotation_queue_claim_waiters{pool="0",worker="0"} 0
annotation_queue_claim_waiters{pool="0",worker="all"} 0
# TYPE annotation_queue_claim_wakeups_total counter
annotation_queue_claim_wakeups_total{pool="0",worker="0"} 0
annotation_queue_claim_wakeups_total{pool="0",worker="all"} 0
# TYPE annotation_queue_connections gauge
annotation_queue_connections{pool="0",worker="0",state="busy"} 0
annotation_queue_connections{pool="0",worker="0",state="connecting"} 0
annotation_queue_connections{pool="0",worker="0",state="idle"} 1
annotation_queue_connections{pool="0",worker="all",state="busy"} 0
annotation_queue_connections{pool="0",worker="all",state="connecting"} 0
annotation_queue_connections{pool="0",worker="all",state="idle"} 1
# TYPE annotation_queue_pool_size gauge
annotation_queue_pool_size{pool="0"} 8
# TYPE annotation_queue_waiting gauge
annotation_queue_waiting{pool="0",worker="0"} 0
annotation_queue_waiting{pool="0",worker="all"} 0
_EOT_
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: pools are numbered in the order the configuration declares them; the conninfo and its password never show
The first location declares a pool of 2 connections with a password in its
conninfo (pool 0); the claim location after it uses the http-level
database (pool 1, 8 connections).
--- config
    location = /api/v1/annotations/first {
        annotation_queue_database "$TEST_NGINX_AQ_DSN_PW";
        annotation_queue_pool_size 2;
        annotation_queue_claim;
    }
    location = /api/v1/annotations/queue {
        annotation_queue_claim;
    }
    location = /status {
        annotation_queue_status;
    }
--- request eval
[AQ::Workflow::req('/api/v1/annotations/first', { queue_id => $::q{pools} }),
 AQ::claim_req($::q{pools}), AQ::claim_req($::q{pools}), 'GET /status']
--- more_headers eval
[AQ::headers($::k{p1}), AQ::headers($::k{p2}), AQ::headers($::k{p1}), '']
--- error_code eval
[200, 200, 200, 200]
--- response_headers_like eval
[("") x 3, 'Content-Type: text/plain; version=0\.0\.4']
--- response_body_filters eval
[([\&AQ::brief]) x 3,
 [sub { my $t = shift; ::secrets($t) . CORE::join '', grep { /pool_size|answers_total\{[^}]*worker="all"/ }
                                                split /^/, ::prom($t) }]]
--- response_body eval
["item pools-1 v1\n", "item pools-2 v1\n", "item pools-1 v1\n", <<'_EOT_']
no conninfo
annotation_queue_answers_total{pool="0",worker="all",endpoint="claim",outcome="claimed"} 1
annotation_queue_answers_total{pool="1",worker="all",endpoint="claim",outcome="claimed"} 2
# TYPE annotation_queue_pool_size gauge
annotation_queue_pool_size{pool="0"} 2
annotation_queue_pool_size{pool="1"} 8
_EOT_
--- no_error_log
[error]
[alert]
[crit]
