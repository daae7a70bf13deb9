# Connections the pool keeps idle, and how long it keeps them
# (annotation_queue_idle_timeout, annotation_queue_max_lifetime):
#
#   - The pool's connections send TCP keepalives after 30 s of silence
#     (ss shows the kernel's keepalive timer on the worker's socket).
#   - An idle connection is closed at the idle timeout: its backend goes
#     away, the status page shows no connection open, and the next claim
#     opens a new one and answers 200.
#   - A connection a firewall forgot (AQ::Proxy stops forwarding the
#     connections it carries, without a FIN or an RST; new connections go
#     through) is dropped by the idle rule: the next claim runs on a new
#     connection and answers 200 well within the query timeout.  The
#     control, with the idle timeout off, shows what the rule saves: the
#     claim is sent on the dead connection and answers 504 query_timeout
#     at the query timeout.
#   - A connection is not used past annotation_queue_max_lifetime: an idle
#     one is closed when its lifetime ends; a busy one finishes its
#     statement (a claim held past the lifetime by a gate answers 200, not
#     an error) and is closed after it, before any other statement.
#
# Every wait polls the status page or pg_stat_activity with a deadline
# (AQ::Faults::wait_until, times AQ::slow()).
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use AQ::Proxy;
use Test::More;
use Time::HiRes ();

my $org = AQ::org('idle');
AQ::Faults::install_gate();
my $gate = AQ::Faults::session();

sub start {
    my (%o) = @_;
    my $sport = AQ::free_port();
    my $ngx = AQ::start_nginx(workers => 1, %o,
                              http => ($o{http} // '') . AQ::Faults::status_server($sport));
    $ngx->{sport} = $sport;
    return $ngx;
}

sub claim {
    my ($ngx, $queue, $key) = @_;
    my $c = AQ::Client->new(port => $ngx->port, timeout => 30);
    my $t0 = Time::HiRes::time();
    my ($status, $h, $body, $err) = $c->claim($queue, $key);
    return (AQ::Faults::outcome($status, $body, $err), Time::HiRes::time() - $t0, $body);
}

sub backend_pids { return [map { $_->[0] } @{ AQ::Faults::backend_rows() }] }

sub open_conns { return AQ::Faults::pool_state($_[0]{sport})->{open} }

{
    my $what = 'idle timeout';
    my $q = AQ::queue($org, 'idle');
    AQ::enqueue_many($q, 3);
    my $ngx = start(http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_idle_timeout 1s;
_EOC_

    my ($out) = claim($ngx, $q, AQ::key($org));
    is($out, '200 item', "$what: a first claim opens the pool's one connection");
    my $first = backend_pids();
    is(scalar @$first, 1, "$what: ... one backend");

    # TCP keepalives on the pool's connection: the kernel probes an idle
    # peer after 30 s (keepalives_idle), not after its default two hours
    my @ss = grep { /"nginx"/ }
             `ss -tnpo state established '( dport = :$AQ::PG{port} )' 2>&1`;
    is(scalar @ss, 1, "$what: ss sees the worker's one connection to PostgreSQL")
        or diag @ss;
    like($ss[0] // '', qr/timer:\(keepalive,(?:[0-2]?\d(?:\.\d+)?|30)sec/,
         "$what: ... with TCP keepalives, the first probe within 30 s") or diag @ss;

    ok(AQ::Faults::wait_until(5, sub { open_conns($ngx) == 0 }),
       "$what: idle for the idle timeout (1 s), the connection is closed: none open "
       . 'on the status page');
    ok(AQ::Faults::wait_until(5, sub { @{ backend_pids() } == 0 }),
       "$what: ... and its backend is gone")
        or diag explain AQ::Faults::backend_rows();

    my ($again, undef, $body) = claim($ngx, $q, AQ::key($org));
    is($again, '200 item', "$what: the next claim opens a new connection and answers 200")
        or diag $body;
    my $now = backend_pids();
    ok(@$now == 1 && $now->[0] != $first->[0], "$what: ... on a new backend")
        or diag explain [$first, $now];

    $ngx->stop;
    like($ngx->error_log, qr/closing a connection idle for \d+ ms/,
         "$what: the close is in the error log (info)");
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

# A firewall forgets the pool's connection while it is idle.
sub forgotten {
    my ($what, $idle, $expect) = @_;
    my $q = AQ::queue($org, "forgotten-$idle");
    AQ::enqueue_many($q, 3);
    my $proxy = AQ::Proxy->start(to_port => $AQ::PG{port});
    my $dsn = AQ::conninfo(%AQ::PG, host => '127.0.0.1', port => $proxy->port,
                           dbname => $AQ::DB);
    my $query_timeout = AQ::Faults::scaled(3);
    my $ngx = start(dsn => $dsn, http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_idle_timeout $idle;
    annotation_queue_query_timeout ${query_timeout}s;
_EOC_

    my ($out) = claim($ngx, $q, AQ::key($org));
    is($out, '200 item', "$what: a first claim through the proxy answers 200");
    is($proxy->carried, 1, "$what: ... on the proxy's one connection");

    $proxy->forget;
    # long enough for a 1 s idle timeout to have fired
    Time::HiRes::sleep(1.5);
    AQ::Faults::wait_until(5, sub { open_conns($ngx) == 0 }) if $idle ne '0';

    my ($next, $took, $body) = claim($ngx, $q, AQ::key($org));
    is($next, $expect->[0], "$what: the claim after the firewall forgot the connection: "
                            . $expect->[0] . sprintf(' (%.2f s)', $took))
        or diag $body;
    $expect->[1]->($took, $query_timeout, $proxy);

    $ngx->stop;
    $proxy->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

forgotten('a forgotten connection, idle timeout 1 s', '1s', ['200 item', sub {
    my ($took, $query_timeout, $proxy) = @_;
    cmp_ok($took, '<', $query_timeout,
           'a forgotten connection, idle timeout 1 s: ... well within the query timeout');
    is($proxy->carried, 2,
       'a forgotten connection, idle timeout 1 s: ... on a new connection');
}]);

forgotten('control: a forgotten connection, idle timeout off', '0', ['504 query_timeout', sub {
    my ($took, $query_timeout, $proxy) = @_;
    cmp_ok($took, '>=', $query_timeout - 0.1,
           'control: a forgotten connection, idle timeout off: ... at the query timeout: '
           . 'the claim went to the dead connection');
    is($proxy->carried, 1,
       'control: a forgotten connection, idle timeout off: ... no new connection was opened');
}]);

{
    my $what = 'max lifetime';
    my $q = AQ::queue($org, 'lifetime');
    AQ::enqueue_many($q, 6);
    my $ngx = start(http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_idle_timeout 0;
    annotation_queue_max_lifetime 2s;
_EOC_

    my ($out) = claim($ngx, $q, AQ::key($org));
    is($out, '200 item', "$what: a first claim opens the pool's one connection");
    my $first = backend_pids();

    ok(AQ::Faults::wait_until(6, sub { open_conns($ngx) == 0 }),
       "$what: idle past its lifetime (2 s), the connection is closed (idle timeout off)");

    my ($o2) = claim($ngx, $q, AQ::key($org));
    is($o2, '200 item', "$what: the next claim opens a new connection: 200");
    my $second = backend_pids();
    ok(@$second == 1 && $second->[0] != $first->[0], "$what: ... on a new backend")
        or diag explain [$first, $second];

    # a statement that outlives the connection's lifetime ends normally
    AQ::Faults::close_gate($gate);
    my $c = AQ::Client->new(port => $ngx->port, timeout => 30);
    my $err = $c->send_request(body => qq({"queue_id":"$q"}), key => AQ::key($org));
    die "send: $err" if $err;
    Time::HiRes::sleep(2.5);
    AQ::Faults::open_gate($gate);
    my $r = $c->read_response;
    is(AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error}), '200 item',
       "$what: a claim held past the connection's lifetime by a gate answers 200: "
       . 'never closed in the middle of a statement')
        or diag explain $r;
    ok(AQ::Faults::wait_until(5, sub { open_conns($ngx) == 0 }),
       "$what: ... and the connection is closed right after it");

    my ($o3) = claim($ngx, $q, AQ::key($org));
    is($o3, '200 item', "$what: the claim after answers 200");
    my $third = backend_pids();
    ok(@$third == 1 && $third->[0] != $second->[0], "$what: ... on a new backend")
        or diag explain [$second, $third];

    $ngx->stop;
    like($ngx->error_log, qr/past annotation_queue_max_lifetime/,
         "$what: the close is in the error log (info)");
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

done_testing();
