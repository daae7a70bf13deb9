# The database side: PostgreSQL down (503), a query past its timeout (504),
# the pool's connections dropped by the server, a saturated pool (503
# pool_saturated), clients that go away while their claim waits.
#
# A claim is made to block by holding an ACCESS EXCLUSIVE lock on the items
# table in another session (AQ::lock_items / AQ::unlock_items).  The
# standalone parts wait for what they need nginx to have done (a claim
# blocked in PostgreSQL, a claim on the waiting list, a client seen gone) on
# pg_stat_activity, the status page and the error log, never for a time.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use JSON::PP ();
use Test::Nginx::Socket 'no_plan';
use IO::Socket::INET;
use Time::HiRes ();

our $org = AQ::org('database');
our %k;
sub key_of { my ($name) = @_; return $k{$name} //= AQ::key($org, rater => $name) }
our $queue = AQ::queue($org, 'database');
AQ::enqueue_many($queue, 20, prefix => 'db');

# A "database" that accepts TCP connections (the kernel completes the
# handshake) and never says a word: only an nginx timer can end a connection
# attempt to it.  Perl's sockets are close-on-exec: nginx does not inherit it.
our $tarpit = IO::Socket::INET->new(Listen => 128, LocalAddr => '127.0.0.1',
                                    LocalPort => 0, Proto => 'tcp')
    or die "tarpit: $!";
$ENV{TEST_NGINX_AQ_TARPIT_DSN} =
    "host=127.0.0.1 port=" . $tarpit->sockport . " user=postgres dbname=$AQ::DB";

# The same server, a database without the module's schema: the statements
# cannot be prepared.
$ENV{TEST_NGINX_AQ_NOSCHEMA_DSN} = AQ::conninfo(%AQ::PG, dbname => 'postgres');

sub error_code_of {
    my ($body) = @_;
    my $doc = eval { JSON::PP->new->utf8->decode($body) };
    return ref $doc eq 'HASH' && ref $doc->{error} eq 'HASH' ? $doc->{error}{code} : undef;
}

# The query timeout of the standalone parts: the lock is held across
# several steps, each waiting for nginx; no claim may time out meanwhile.
our $QUERY_TIMEOUT = AQ::Faults::scaled(10);

# The waiting list of the pools of the standalone nginx whose status page
# is on $sport (-1 if it does not answer).
sub waiting { return AQ::Faults::pool_state($_[0])->{waiting} }

# A standalone nginx (one worker, one connection) whose only connection is
# kept busy by a claim blocked on the lock.
{
    my $what = 'pool saturated';
    my $q = AQ::queue($org, 'saturated');
    AQ::enqueue_many($q, 10);
    my $sport = AQ::free_port();
    my $ngx = AQ::start_nginx(workers => 1, http => <<"_EOC_" . AQ::Faults::status_server($sport));
    annotation_queue_pool_size 1;
    annotation_queue_max_waiting 1;
    annotation_queue_query_timeout ${QUERY_TIMEOUT}s;
_EOC_
    my ($warm) = AQ::Client->new(port => $ngx->port)->claim($q, key_of('sat-warm'));
    is($warm, 200, "$what: a first claim opens the pool's one connection");

    AQ::lock_items();
    my ($a, $b, $c) = map { AQ::Client->new(port => $ngx->port, timeout => 15) } 1 .. 3;
    $a->send_request(body => qq({"queue_id":"$q"}), key => key_of('sat-a'));
    ok(AQ::Faults::wait_until(5, sub { AQ::Faults::backends(lock => 1) == 1 }),
       "$what: a claim holds the connection, blocked by the lock")
        or diag Test::More::explain(AQ::Faults::backend_rows());
    $b->send_request(body => qq({"queue_id":"$q"}), key => key_of('sat-b'));
    ok(AQ::Faults::wait_until(5, sub { waiting($sport) == 1 }),
       "$what: a second claim waits for it: the waiting list (1) is full");

    my $t0 = Time::HiRes::time();
    my ($status, $h, $body) = $c->claim($q, key_of('sat-c'));
    my $took = Time::HiRes::time() - $t0;
    is($status, 503, "$what: a third claim gets 503");
    # The lock stays until after this answer: the claims before it cannot
    # be answered before their query timeout.  A claim that waited for the
    # connection would be answered after them (at the earliest when the
    # first one's query times out, before its own wait could).
    ok(!AQ::Faults::answered_yet($a) && !AQ::Faults::answered_yet($b),
       "$what: ... at once: the two claims before it are not answered yet");
    Test::More::note(sprintf '%s: the 503 came after %.3f s', $what, $took);
    is(error_code_of($body), 'pool_saturated', "$what: ... pool_saturated")
        or diag $body;
    like($h->{'retry-after'} // '', qr/^\d+$/, "$what: ... with Retry-After");
    like($h->{'content-type'} // '', qr{^application/json}, "$what: ... as JSON");

    AQ::unlock_items();
    my $ra = $a->read_response;
    my $rb = $b->read_response;
    is($ra->{status}, 200, "$what: once the lock is gone, the running claim answers 200")
        or diag explain $ra;
    is($rb->{status}, 200, "$what: ... and so does the waiting one") or diag explain $rb;

    $ngx->stop;
    my @bad = grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@bad, [], "$what: no [alert], [crit] or [emerg] in the error log");
}

# Clients that go away: one whose claim runs, one that waits for the
# connection.  The pool must stay usable.
{
    my $what = 'clients going away';
    my $q = AQ::queue($org, 'going-away');
    AQ::enqueue_many($q, 10);
    my $sport = AQ::free_port();
    my $ngx = AQ::start_nginx(workers => 1, http => <<"_EOC_" . AQ::Faults::status_server($sport));
    annotation_queue_pool_size 1;
    annotation_queue_max_waiting 8;
    annotation_queue_query_timeout ${QUERY_TIMEOUT}s;
_EOC_
    my ($warm) = AQ::Client->new(port => $ngx->port)->claim($q, key_of('away-warm'));
    is($warm, 200, "$what: a first claim opens the pool's one connection");

    AQ::lock_items();
    my ($a, $b, $c) = map { AQ::Client->new(port => $ngx->port, timeout => 15) } 1 .. 3;
    $a->send_request(body => qq({"queue_id":"$q"}), key => key_of('away-a'));
    ok(AQ::Faults::wait_until(5, sub { AQ::Faults::backends(lock => 1) == 1 }),
       "$what: a claim holds the connection, blocked by the lock")
        or diag Test::More::explain(AQ::Faults::backend_rows());
    $b->send_request(body => qq({"queue_id":"$q"}), key => key_of('away-b'));
    ok(AQ::Faults::wait_until(5, sub { waiting($sport) == 1 }),
       "$what: a second claim waits for the connection");
    my $gone = qr/client prematurely closed connection/;
    my $before = AQ::Faults::log_count($ngx, $gone);
    $a->disconnect;    # its claim is running
    $b->disconnect;    # it waits for the connection
    ok(AQ::Faults::wait_until(5, sub {
           AQ::Faults::log_count($ngx, $gone) >= $before + 2 && waiting($sport) == 0 }),
       "$what: nginx sees both clients go; the waiting one leaves the list");
    $c->send_request(body => qq({"queue_id":"$q"}), key => key_of('away-c'));
    ok(AQ::Faults::wait_until(5, sub { waiting($sport) == 1 }),
       "$what: a third claim waits behind the claim of the client gone");
    AQ::unlock_items();

    my $rc = $c->read_response;
    is($rc->{status}, 200, "$what: a claim waiting behind them answers 200") or diag explain $rc;
    my ($st) = AQ::Client->new(port => $ngx->port)->claim($q, key_of('away-d'));
    is($st, 200, "$what: the next claim answers 200");
    my ($st2) = AQ::Client->new(port => $ngx->port)->claim($q, key_of('away-e'));
    is($st2, 200, "$what: and the next");

    $ngx->stop;
    my @bad = grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@bad, [], "$what: no [alert], [crit] or [emerg] in the error log");
}

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: PostgreSQL unreachable: 503 database_unavailable with Retry-After
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DEAD_DSN";
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
AQ::headers(::key_of('down'))
--- error_code: 503
--- response_headers_like
Retry-After: \d+
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"database_unavailable","message":"..."},"success":false}
--- no_error_log
[alert]
[crit]



=== TEST 2: a claim blocked past annotation_queue_query_timeout: 504 query_timeout; the next claim works
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size 1;
    annotation_queue_query_timeout 1s;
--- request eval
[(AQ::claim_req($::queue)) x 3]
--- more_headers eval
[AQ::headers(::key_of('timeout-warm')), (AQ::headers(::key_of('timeout'))) x 2]
--- timeout eval
5 * AQ::slow()
--- error_code eval
[200, 504, 200]
--- response_headers_like eval
["Content-Type: application/json(;\\s*charset=utf-8)?",
 "Content-Type: application/json(;\\s*charset=utf-8)?",
 "Content-Type: application/json(;\\s*charset=utf-8)?"]
--- response_body_filters eval
[[\&AQ::brief, AQ::then(\&AQ::lock_items)],
 [\&AQ::canon, AQ::then(\&AQ::unlock_items)],
 [\&AQ::brief]]
--- response_body eval
["item db-1 v1\n",
 qq({"error":{"code":"query_timeout","message":"..."},"success":false}\n),
 "item db-2 v1\n"]
--- no_error_log
[alert]
[crit]



=== TEST 3: the server closes the pool's connection: at most one claim fails (503), the next ones work
The second claim is sent once the backend is gone from pg_stat_activity: it
meets a connection whose server end is closed (or nginx noticed already).
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size 1;
--- request eval
[(AQ::claim_req($::queue)) x 4]
--- more_headers eval
[map { AQ::headers(::key_of("dropped-$_")) } 1 .. 4]
--- error_code_like eval
['^200$', '^(?:200|503)$', '^200$', '^200$']
--- response_body_filters eval
[[\&AQ::brief, AQ::then(sub {
      AQ::Faults::terminate_nginx_backends();
      AQ::Faults::wait_until(5, sub { AQ::Faults::backends() == 0 }) })],
 [\&AQ::brief], [\&AQ::brief], [\&AQ::brief]]
--- response_body_like eval
['^item db-\d+ v1$', '^(?:item db-\d+ v1|error database_unavailable)$',
 '^item db-\d+ v1$', '^item db-\d+ v1$']
--- no_error_log
[alert]
[crit]



=== TEST 4: PostgreSQL unreachable: every claim gets its 503, one after the other
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DEAD_DSN";
    annotation_queue_connect_timeout 1s;
--- request eval
[(AQ::claim_req($::queue)) x 3]
--- more_headers eval
[(AQ::headers(::key_of('down-again'))) x 3]
--- error_code eval
[503, 503, 503]
--- response_headers_like eval
[("Retry-After: \\d+") x 3]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
[("error database_unavailable\n") x 3]
--- no_error_log
[alert]
[crit]



=== TEST 5: a server that never answers the connection: annotation_queue_connect_timeout ends it (503)
The listener completes TCP handshakes and never speaks; query_timeout is
far away: only the connect timeout can answer within the 3 s (times
AQ::slow()) of the client.
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_TARPIT_DSN";
    annotation_queue_connect_timeout 1s;
    annotation_queue_query_timeout 60s;
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
AQ::headers(::key_of('tarpit'))
--- timeout eval
3 * AQ::slow()
--- error_code: 503
--- response_headers_like
Retry-After: \d+
--- response_body_filters eval
\&AQ::brief
--- response_body
error database_unavailable
--- no_error_log
[alert]
[crit]



=== TEST 6: a database without the schema: the statements, prepared together in one pipeline, fail: 503 database_unavailable, the error log names the statement and PostgreSQL's error
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_NOSCHEMA_DSN";
--- request eval
[(AQ::claim_req($::queue)) x 2]
--- more_headers eval
[(AQ::headers(::key_of('no-schema'))) x 2]
--- error_code eval
[503, 503]
--- response_headers_like eval
[("Retry-After: \\d+") x 2]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
[("error database_unavailable\n") x 2]
--- error_log eval
qr/\[error\] .*annotation queue: preparing "ngx_aq_claim" failed: ERROR:  relation "annotation_queue\.api_keys" does not exist/
--- no_error_log
[alert]
[crit]
