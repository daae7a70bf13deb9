# Decisions of the pool (src/ngx_aq_pool.c) that the other suites leave
# open, each made visible:
#
#   - Locations share a pool only when the database and every pool setting
#     (size, max_waiting, connect and query timeouts) are the same: one
#     differing setting, one more pool on the status page.
#   - A claim is bounded by annotation_queue_query_timeout, not by the
#     connect timeout: with a connect timeout of a minute, a server-side
#     statement_timeout of two (the conninfo's "options"), a claim held in
#     PostgreSQL answers 504 query_timeout at the query timeout (1 s), long
#     before the client's patience (20 s) runs out.
#   - A connection whose query ended in an error (here the server's own
#     statement_timeout: 504 query_timeout) is closed, not reused: the next
#     claim runs on a new backend.
#   - A client that goes away while its claim runs in a batch is detached
#     from the batch: when the batch answers, the request (freed, its
#     memory since taken by other requests) is never called back.  The
#     others of the batch get their items; the worker does not crash.
#   - A claim whose commit fails (a deferred constraint trigger raises at
#     commit, after the statement returned its row) is answered with the
#     error, never 200 with an item the database does not hold.
#   - When the last connection fails while requests wait (the database
#     stops taking connections, the connection in use is terminated), the
#     waiting requests are answered 503 database_unavailable at once, not
#     left to their wait timer (connect + query timeout).
#
# Claims are held in PostgreSQL by a gate (AQ::Faults::install_gate); every
# wait for nginx polls the status page or pg_stat_activity with a deadline.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use Test::More;
use Time::HiRes ();

my $org = AQ::org('pool');
AQ::Faults::install_gate();
my $gate = AQ::Faults::session();
my $slow = AQ::slow();

# nginx of one worker; the status page on its own port ($ngx->{sport})
sub start {
    my (%o) = @_;
    my $sport = AQ::free_port();
    my $ngx = AQ::start_nginx(workers => 1, %o,
                              http => ($o{http} // '') . AQ::Faults::status_server($sport));
    $ngx->{sport} = $sport;
    return $ngx;
}

sub send_claim {
    my ($ngx, $queue, $key, %o) = @_;
    my $c = AQ::Client->new(port => $ngx->port, timeout => $o{timeout} // 30);
    my $err = $c->send_request(body => qq({"queue_id":"$queue"}), key => $key);
    die "send: $err" if $err;
    return $c;
}

sub outcome_of {
    my ($r) = @_;
    return AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error});
}

sub backend_pids { return [map { $_->[0] } @{ AQ::Faults::backend_rows() }] }

# ---------------------------------------------------------------------------

{
    my $what = 'pools by settings';
    my $sport = AQ::free_port();
    my @loc = (
        ['same',            ''],
        ['size',            'annotation_queue_pool_size 3;'],
        ['max-waiting',     'annotation_queue_max_waiting 5;'],
        ['connect-timeout', 'annotation_queue_connect_timeout 7s;'],
        ['query-timeout',   'annotation_queue_query_timeout 7s;'],
        ['same-again',      ''],
    );
    my $locations = join '', map { <<"_EOC_" } @loc;
        location = /claim-$_->[0] {
            annotation_queue_claim;
            $_->[1]
        }
_EOC_
    my $ngx = AQ::start_nginx(workers => 1, http => <<"_EOC_");
    server {
        listen 127.0.0.1:$sport;
$locations
        location = $AQ::Faults::STATUS_URI {
            annotation_queue_status;
        }
    }
_EOC_
    my $m = AQ::Faults::status($sport) || {};
    my @pools = sort grep { /^annotation_queue_pool_size\{/ } keys %$m;
    is(scalar @pools, 5,
       "$what: the claim location and 6 more, of which 2 with its settings and 4 "
       . 'with one setting each their own: 5 pools on the status page')
        or diag explain $m;
    is_deeply([sort { $a <=> $b } map { $m->{$_} } @pools], [3, 8, 8, 8, 8],
              "$what: ... one of them of 3 connections");
    $ngx->stop;
}

{
    my $what = 'the query timeout, not the connect timeout';
    my $q = AQ::queue($org, 'query-timer');
    AQ::enqueue_many($q, 4);
    my $ngx = start(dsn => "$AQ::DSN options='-c statement_timeout=120s'", http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_connect_timeout 60s;
    annotation_queue_query_timeout 1s;
_EOC_

    my ($warm) = AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org));
    is($warm, 200, "$what: a first claim opens the pool's one connection");

    AQ::Faults::close_gate($gate);
    my $t0 = Time::HiRes::time();
    my $c = send_claim($ngx, $q, AQ::key($org), timeout => 20);
    my $r = $c->read_response;
    my $took = Time::HiRes::time() - $t0;
    AQ::Faults::open_gate($gate);
    is(outcome_of($r), '504 query_timeout',
       "$what: a claim held in PostgreSQL gets 504 query_timeout (connect timeout 60 s, "
       . 'statement_timeout 120 s, the client waits 20 s)')
        or diag explain $r;
    cmp_ok($took, '>=', 0.9, "$what: ... not before the query timeout of 1 s");

    my ($after) = AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org));
    is($after, 200, "$what: once the gate opens, the next claim answers 200");
    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

{
    my $what = 'closed after an error';
    my $q = AQ::queue($org, 'after-error');
    AQ::enqueue_many($q, 4);
    # the server cancels the statement (57014) long before the module would
    my $ngx = start(dsn => "$AQ::DSN options='-c statement_timeout=300ms'", http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_query_timeout 60s;
_EOC_

    my ($warm) = AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org));
    is($warm, 200, "$what: a first claim opens the pool's one connection");
    my $before = backend_pids();
    is(scalar @$before, 1, "$what: ... one backend");

    AQ::Faults::close_gate($gate);
    my $r = send_claim($ngx, $q, AQ::key($org), timeout => 20)->read_response;
    AQ::Faults::open_gate($gate);
    is(outcome_of($r), '504 query_timeout',
       "$what: a claim the server cancels (its statement_timeout) gets 504 query_timeout")
        or diag explain $r;

    my ($next) = AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org));
    is($next, 200, "$what: the next claim answers 200");
    my $now = AQ::Faults::wait_until(5, sub {
        my $p = backend_pids();
        @$p == 1 && $p->[0] != $before->[0] ? $p : undef });
    ok($now, "$what: ... on a new connection: the one that failed was closed, not reused")
        or diag explain [$before, AQ::Faults::backend_rows()];
    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

{
    my $what = 'leaving a batch';
    my $q = AQ::queue($org, 'leaving');
    AQ::enqueue_many($q, 30);
    my $ngx = start(http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_max_waiting 64;
    annotation_queue_connect_timeout 10s;
    annotation_queue_query_timeout 60s;
_EOC_
    my $state = sub { AQ::Faults::pool_state($ngx->{sport}) };

    my ($warm) = AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org));
    is($warm, 200, "$what: a first claim opens the pool's one connection");
    my $workers = AQ::Faults::worker_pids($ngx);

    # a claim holds the connection at the gate; six wait behind it; its
    # backend is terminated, and the six go out together on a new
    # connection, held at the gate in turn
    AQ::Faults::close_gate($gate);
    my $head = send_claim($ngx, $q, AQ::key($org));
    ok(AQ::Faults::wait_until(10, sub { AQ::Faults::backends(lock => 1) == 1 }),
       "$what: a claim holds the connection, held at the gate");
    my @k = map { AQ::key($org) } 1 .. 6;
    my @c = map { send_claim($ngx, $q, $_) } @k;
    ok(AQ::Faults::wait_until(10, sub { $state->()->{waiting} == 6 }),
       "$what: six claims wait for it");
    my %old = map { $_ => 1 } @{ backend_pids() };
    is(AQ::Faults::terminate_nginx_backends(), 1, "$what: its backend is terminated");
    my $batch = AQ::Faults::wait_until(10, sub {
        my @rows = grep { !$old{ $_->[0] } } @{ AQ::Faults::backend_rows() };
        @rows == 1 && $rows[0][2] eq 'Lock' && $state->()->{waiting} == 0 ? $rows[0] : undef });
    ok($batch && $batch->[3] =~ /unnest/,
       "$what: the six run as one batch statement on a new connection, held at the gate")
        or diag explain [AQ::Faults::backend_rows(), $state->()];
    is(outcome_of($head->read_response), '503 database_unavailable',
       "$what: the claim whose backend was terminated gets 503");

    # four of the six go; other requests then take the memory their
    # requests had, before the batch answers
    my $gone = AQ::Faults::log_count($ngx, qr/client prematurely closed connection/);
    $c[$_]->disconnect for 0 .. 3;
    ok(AQ::Faults::wait_until(10, sub {
           AQ::Faults::log_count($ngx, qr/client prematurely closed connection/) >= $gone + 4 }),
       "$what: nginx sees four of them go");
    my @churn;
    for my $i (1 .. 40) {
        my $cc = AQ::Client->new(port => $ngx->port, timeout => 10);
        my ($st) = $i % 2
            ? $cc->post('{"queue_id": "not a uuid", "padding": "' . ('x' x (50 * $i)) . '"}',
                        Authorization => "Bearer $k[0]")
            : $cc->request(method => 'GET', uri => "/elsewhere/$i");
        push @churn, $st;
    }
    is_deeply([grep { $_ != 400 && $_ != 404 } @churn], [],
              "$what: meanwhile 40 other requests are answered (400, 404)");

    AQ::Faults::open_gate($gate);
    my @out = map {
        my $r = $c[$_]->read_response;
        my $o = outcome_of($r);
        $o eq '200 item' ? (AQ::Faults::claim_problems($k[$_], $r->{body}), $o) : $o
    } 4, 5;
    is_deeply(\@out, ['200 item', '200 item'],
              "$what: the two that stayed get their items, held by their keys")
        or diag explain \@out;
    my @after = map { (AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org)))[0] } 1 .. 3;
    is_deeply(\@after, [200, 200, 200], "$what: the pool serves on");
    is_deeply(AQ::Faults::worker_pids($ngx), $workers, "$what: no crash: the same worker");
    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit], [emerg] or \"exited on signal\" in the error log");
}

{
    my $what = 'no connection left';
    my $q = AQ::queue($org, 'no-connection');
    AQ::enqueue_many($q, 4);
    my $ngx = start(http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_max_waiting 8;
    annotation_queue_connect_timeout 30s;
    annotation_queue_query_timeout 30s;
_EOC_
    # (not from a session of the database itself: PostgreSQL refuses that)
    my $admin = AQ::dbi_connect('postgres');
    my $allow = sub {
        $admin->do(qq{ALTER DATABASE "$AQ::DB" WITH ALLOW_CONNECTIONS $_[0]});
    };

    my ($warm) = AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org));
    is($warm, 200, "$what: a first claim opens the pool's one connection");

    # a claim holds the connection at the gate, another waits for it; the
    # database stops taking connections and the first claim's backend is
    # terminated: the pool's attempt to replace it fails, and no
    # connection is left for the waiting claim
    AQ::Faults::close_gate($gate);
    my $a = send_claim($ngx, $q, AQ::key($org), timeout => 20);
    ok(AQ::Faults::wait_until(10, sub { AQ::Faults::backends(lock => 1) == 1 }),
       "$what: a claim holds the connection, held at the gate");
    my $b = send_claim($ngx, $q, AQ::key($org), timeout => 20);
    ok(AQ::Faults::wait_until(10, sub { AQ::Faults::pool_state($ngx->{sport})->{waiting} == 1 }),
       "$what: another waits for it");
    $allow->('false');
    is(AQ::Faults::terminate_nginx_backends(), 1, "$what: the running claim's backend is terminated");

    my $ra = $a->read_response;
    my $rb = $b->read_response;
    $allow->('true');
    AQ::Faults::open_gate($gate);
    is(outcome_of($ra), '503 database_unavailable', "$what: the running claim gets 503");
    is(outcome_of($rb), '503 database_unavailable',
       "$what: the waiting claim gets 503 database_unavailable as soon as the new "
       . 'connection fails, not pool_saturated at its wait timer (60 s)')
        or diag explain $rb;
    like($rb->{headers}{'retry-after'} // '', qr/^\d+$/, "$what: ... with Retry-After");

    my ($after) = AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org));
    is($after, 200, "$what: once the database takes connections again, a claim answers 200");
    $ngx->stop;
    $admin->disconnect;
    like($ngx->error_log, qr/could not connect to PostgreSQL: .*not currently accepting connections/,
         "$what: the failed connection's cause is logged");
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

{
    my $what = 'a commit that fails';
    my $h = AQ::Faults::db();
    $h->do(<<'_SQL_');
CREATE OR REPLACE FUNCTION public.aq_fail_at_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the commit of item % fails', NEW.id;
END
$$
_SQL_
    $h->do(q{CREATE CONSTRAINT TRIGGER aq_fail_at_commit
               AFTER UPDATE ON annotation_queue.items
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
               WHEN (NEW.payload ? 'fail_at_commit')
               EXECUTE FUNCTION public.aq_fail_at_commit()});
    my $q = AQ::queue($org, 'commit-fails');
    my $item = AQ::enqueue($q, undef, { fail_at_commit => JSON::PP::true() });
    my $ngx = start(http => "    annotation_queue_pool_size 1;\n");

    my $r = send_claim($ngx, $q, AQ::key($org))->read_response;
    is(outcome_of($r), '500 internal_error',
       "$what: the claim is answered 500 internal_error, not 200") or diag explain $r;
    my $row = AQ::Faults::db()->selectrow_hashref(
        'SELECT status, version FROM annotation_queue.items WHERE id = ?', undef, $item);
    is_deeply($row, { status => 'available', version => 0 },
              "$what: ... and the item is still available in the database");
    $h->do('DROP TRIGGER aq_fail_at_commit ON annotation_queue.items');

    my ($after, undef, $body) = AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org));
    is($after, 200, "$what: the next claim (trigger gone) answers 200");
    like($body, qr/"id":"\Q$item\E"/, "$what: ... with that item");
    $ngx->stop;
    like($ngx->error_log, qr/\[error\].*P0001.*the commit of item/,
         "$what: the commit's error is logged with its SQLSTATE");
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

done_testing();
