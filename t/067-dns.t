# Host names in the conninfo, never resolved by a blocking call in a worker
# (src/ngx_aq_resolve.c), against a real DNS server of the suite (AQ::DNS)
# and a real PostgreSQL:
#
#   - With nginx's "resolver": a conninfo by name is resolved through it
#     (the DNS server sees the query) and claims answer 200; a name it does
#     not know answers 503 database_unavailable, with the resolver's reason
#     in the error log.
#   - The name is resolved again when a connection is opened again (after
#     the resolver's "valid" time): a server's address may change.
#   - A resolver that never answers leaves the worker serving: while a
#     claim waits for it, another location of the same worker answers at
#     once; the claim gets 503 database_unavailable at the connect timeout
#     (the resolver's wait comes out of it), not at resolver_timeout.
#   - Without a "resolver", names are resolved when the configuration is
#     loaded (nginx -t fails on a name that does not resolve, as with
#     proxy_pass); a "hostaddr" in the conninfo is left to libpq.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::DNS;
use AQ::Faults;
use Test::More;
use Time::HiRes ();

my $org = AQ::org('dns');

sub dsn_by_name {
    my ($name) = @_;
    return "host=$name port=$AQ::PG{port} user=$AQ::PG{user} dbname=$AQ::DB";
}

sub claim {
    my ($ngx, $queue, $key) = @_;
    my $c = AQ::Client->new(port => $ngx->port, timeout => 30);
    my $t0 = Time::HiRes::time();
    my ($status, $h, $body, $err) = $c->claim($queue, $key);
    return (AQ::Faults::outcome($status, $body, $err), Time::HiRes::time() - $t0, $body, $h);
}

{
    my $what = 'through the resolver';
    my $dns = AQ::DNS->start(names => { 'db.aq.test' => '127.0.0.1' }, ttl => 1);
    my $q = AQ::queue($org, 'by-name');
    AQ::enqueue_many($q, 4);
    my $ngx = AQ::start_nginx(workers => 1, dsn => dsn_by_name('db.aq.test'),
                              http => <<"_EOC_");
    resolver 127.0.0.1:@{[ $dns->port ]} ipv6=off valid=1s;
    annotation_queue_pool_size 1;
_EOC_

    my ($out, undef, $body) = claim($ngx, $q, AQ::key($org));
    is($out, '200 item', "$what: a conninfo by host name: the claim answers 200") or diag $body;
    is($dns->queries('db.aq.test'), 1, "$what: ... the name was asked of nginx's resolver once");

    # the connection goes; the next one resolves again once valid=1s has
    # passed (nginx's resolver counts it in whole seconds: up to 2 s)
    Time::HiRes::sleep(2.5);
    AQ::Faults::terminate_nginx_backends();
    my $closed = AQ::Faults::wait_until(5, sub { AQ::Faults::backends() == 0 });
    ok($closed, "$what: the backend is terminated");
    my $answered;
    for (1 .. 3) {    # the first claim may meet the dead connection
        ($out, undef, $body) = claim($ngx, $q, AQ::key($org));
        last if $out eq '200 item';
    }
    is($out, '200 item', "$what: a claim on a new connection answers 200") or diag $body;
    cmp_ok($dns->queries('db.aq.test'), '>=', 2,
           "$what: ... the name was resolved again for the new connection");

    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
    $dns->stop;
}

{
    my $what = 'a name the resolver does not know';
    my $dns = AQ::DNS->start(names => {});
    my $q = AQ::queue($org, 'unknown-name');
    AQ::enqueue_many($q, 1);
    my $ngx = AQ::start_nginx(workers => 1, dsn => dsn_by_name('nowhere.aq.test'),
                              http => <<"_EOC_");
    resolver 127.0.0.1:@{[ $dns->port ]} ipv6=off;
    annotation_queue_pool_size 1;
_EOC_
    my ($out, undef, $body, $h) = claim($ngx, $q, AQ::key($org));
    is($out, '503 database_unavailable', "$what: the claim answers 503 database_unavailable")
        or diag $body;
    ok($h->{'retry-after'}, "$what: ... with Retry-After");
    like($ngx->error_log, qr/nowhere\.aq\.test could not be resolved \(3: Host not found\)/,
         "$what: the error log names the host and the resolver's reason");
    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
    $dns->stop;
}

{
    my $what = 'a resolver that never answers';
    my $dns = AQ::DNS->start(mute => 1);
    my $q = AQ::queue($org, 'mute');
    AQ::enqueue_many($q, 1);
    my $ping = AQ::free_port();
    my $connect = AQ::Faults::scaled(2);
    my $ngx = AQ::start_nginx(workers => 1, dsn => dsn_by_name('db.aq.test'),
                              http => <<"_EOC_");
    resolver 127.0.0.1:@{[ $dns->port ]} ipv6=off;
    resolver_timeout 60s;
    annotation_queue_pool_size 1;
    annotation_queue_connect_timeout ${connect}s;
    server {
        listen 127.0.0.1:$ping;
        location = /ping {
            return 200 "pong\\n";
        }
    }
_EOC_

    my $t0 = Time::HiRes::time();
    my $c = AQ::Client->new(port => $ngx->port, timeout => 120);
    my $err = $c->send_request(body => qq({"queue_id":"$q"}), key => AQ::key($org));
    die "send: $err" if $err;
    ok(AQ::Faults::wait_until(5, sub { $dns->queries('db.aq.test') >= 1 }),
       "$what: the claim asked the resolver");

    my $p = AQ::Client->new(port => $ping, timeout => 5);
    my ($pst, undef, $pbody) = $p->request(method => 'GET', uri => '/ping');
    my $pinged = Time::HiRes::time() - $t0;
    is($pst, 200, "$what: meanwhile another location of the same worker answers 200");
    is($pbody, "pong\n", "$what: ... its own body");
    ok(!AQ::Faults::answered_yet($c),
       "$what: ... while the claim still waits for the resolver");

    my $r = $c->read_response;
    my $took = Time::HiRes::time() - $t0;
    is(AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error}), '503 database_unavailable',
       "$what: the claim answers 503 database_unavailable") or diag explain $r;
    cmp_ok($took, '>=', $connect - 0.2, "$what: ... at the connect timeout ($connect s)");
    cmp_ok($took, '<', $connect + 3 * AQ::slow(),
           "$what: ... not at resolver_timeout (60 s): took " . sprintf('%.2f s', $took));
    like($ngx->error_log, qr/db\.aq\.test could not be resolved \(110: Operation timed out\)/,
         "$what: the error log says the resolver timed out");

    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
    $dns->stop;
}

{
    my $what = 'nginx -t';
    my ($rc, $out) = AQ::nginx_test_config(dsn => 'host=db.invalid user=x');
    isnt($rc, 0, "$what: without a resolver, a host name that does not resolve fails nginx -t");
    like($out, qr/"annotation_queue_database": host "db\.invalid" not found/,
         "$what: ... naming the host") or diag $out;

    ($rc, $out) = AQ::nginx_test_config(dsn => 'host=db.invalid user=x',
                                        http => '    resolver 127.0.0.1:1 ipv6=off;');
    is($rc, 0, "$what: with a resolver, the name is left for connect time") or diag $out;

    ($rc, $out) = AQ::nginx_test_config(dsn => 'host=db.invalid hostaddr=10.0.0.1 user=x');
    is($rc, 0, "$what: with hostaddr in the conninfo, the name is left to libpq") or diag $out;

    ($rc, $out) = AQ::nginx_test_config(
        dsn => 'host=127.0.0.1,::1,/run/postgresql,localhost user=x');
    is($rc, 0, "$what: addresses, a socket directory and localhost need no resolving")
        or diag $out;
}

done_testing();
