# The module through a real PgBouncer (Debian bookworm's 1.18,
# AQ::PgBouncer) in front of the suite's PostgreSQL, in its two pool modes
# with the settings each needs:
#
#   session      annotation_queue_statement_timeout local;  (prepare on)
#   transaction  annotation_queue_prepare off;
#                annotation_queue_statement_timeout local;
#
# (PgBouncer 1.18 refuses the "options" startup parameter that the default,
# annotation_queue_statement_timeout startup, sends: a test shows the 503
# and the reason in the error log.)
#
# Standalone parts (Test::More, an nginx of their own, AQ::start_nginx):
#
#   - 64 clients drain a queue through two workers, in each mode: every item
#     handed out exactly once, each answer held by its own key in the
#     database at the version answered, no 409 while items were left;
#   - the statement timeout applies through the pooler: a claim blocked by
#     a lock (held on a direct connection) answers 504 query_timeout and,
#     with the lock still held, PostgreSQL itself cancels its statement
#     ("canceling statement due to statement timeout" in the server's log,
#     the backend no longer waits on the lock); a control with
#     annotation_queue_statement_timeout off shows the statement lingering
#     and no cancel, so the check can tell nginx's timer from the server's;
#     the local setting does not outlive the module's transaction (a
#     client after it on the same server connection sees 0);
#   - PgBouncer killed and started again on its port: claims before 200,
#     while it is down 503 database_unavailable with Retry-After, after
#     200 again; a claim in flight when it dies gets 503 at once;
#   - PAUSE then RESUME on the admin console (transaction mode): a claim
#     sent during PAUSE waits in PgBouncer and completes (200) after
#     RESUME; one whose RESUME does not come within the query timeout gets
#     504 query_timeout and took nothing; with PgBouncer's
#     query_wait_timeout below the module's query timeout, PgBouncer ends
#     the wait itself (503 database_unavailable) and keeps nothing queued.
#     In session mode PAUSE completes once nginx's idle connections close
#     (annotation_queue_idle_timeout), and a claim sent during it answers
#     200 after RESUME;
#   - PgBouncer's own pool exhausted (default_pool_size 1, its one server
#     connection held by a test session): transaction mode, claims wait in
#     PgBouncer and get 504 query_timeout; session mode, a new connection
#     cannot prepare and claims get 503 database_unavailable at the connect
#     timeout; neither hangs, and both serve again once it is released;
#   - transaction mode with prepare ON (unsupported): the statements are
#     prepared on whatever server connection PgBouncer lent for that
#     transaction; when a later claim lands on another one (forced here
#     with the console's RECONNECT, so that it happens every time) it fails
#     with 26000 "prepared statement does not exist": the module answers
#     503 database_unavailable, drops the connection, and the next claim, on a
#     new connection that prepares again, answers 200.
#
# Then Test::Nginx blocks in both modes: claim 200, extend, complete, 409
# no_items_available, 404 queue_not_found, 401 invalid_api_key.
#
# The suite runs its own PostgreSQL cluster (AQ::Faults::own_cluster), to
# read the server's log.  Every wait is for a condition (SHOW POOLS,
# pg_stat_activity, the server's log), with deadlines times AQ::slow().
use strict;
use warnings;

use lib 't/lib';
BEGIN { require AQ::Faults; AQ::Faults::own_cluster() }
use AQ;
use AQ::Faults;
use AQ::PgBouncer;
use AQ::PgBouncer::Checks qw(claim lock_waiters timeout_cancels log_errors
                            statement_timeout_through drain);
use AQ::Workflow;
use JSON::PP ();
use Test::Nginx::Socket 'no_plan';
use Time::HiRes qw(time sleep);

our $org = AQ::org('pgbouncer');
our %k;
sub key_of { my ($name) = @_; return $k{$name} //= AQ::Workflow::key($org, $name) }

# What each pool mode needs of the module.
our %MODE = (
    session     => "    annotation_queue_statement_timeout local;\n",
    transaction => "    annotation_queue_prepare off;\n"
                   . "    annotation_queue_statement_timeout local;\n",
);

# An nginx whose claims go through $pgb, configured for its pool mode.
# Options: workers (1), pool (annotation_queue_pool_size, 1), query and
# connect (timeouts, seconds), http (more), mode (the module's settings of
# another pool mode, or '' for the defaults).
sub nginx_via {
    my ($pgb, %o) = @_;
    my $http = $o{mode} // $MODE{ $pgb->mode };
    $http .= "    annotation_queue_pool_size " . ($o{pool} // 1) . ";\n";
    $http .= "    annotation_queue_query_timeout $o{query}s;\n" if $o{query};
    $http .= "    annotation_queue_connect_timeout $o{connect}s;\n" if $o{connect};
    $http .= $o{http} // '';
    return AQ::start_nginx(workers => $o{workers} // 1, dsn => $pgb->conninfo,
                           http => $http);
}


# A claim sent, not read: the client.
sub send_claim {
    my ($ngx, $queue, $key) = @_;
    my $c = AQ::Client->new(port => $ngx->port, timeout => 20);
    $c->send_request(body => qq({"queue_id":"$queue"}), key => $key);
    return $c;
}

sub read_outcome {
    my ($c) = @_;
    my $r = $c->read_response;
    return (AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error}), $r->{body},
            $r->{headers});
}

sub item_of { my $d = AQ::Faults::decode($_[0]); return $d && ref $d->{item} ? $d->{item} : {} }



sub pool_text {
    my ($pgb) = @_;
    my $p = eval { $pgb->pool } or return "SHOW POOLS failed: $@";
    return join ' ', map { "$_=" . ($p->{$_} // '?') }
                     qw(cl_active cl_waiting sv_active sv_idle sv_used sv_login);
}


my $LATE = 2 * AQ::slow();    # how late after its timer an answer may come

# ---------------------------------------------------------------------------
# The PgBouncers the blocks and the drains share (the fault tests start
# their own).  Session mode lends each client connection a server
# connection for its life: its pool must hold all of nginx's.  Transaction
# mode lends one per transaction: 3 server connections serve the 8 of the
# drain's nginx.

our %pgb = (
    session     => AQ::PgBouncer->start(pool_mode => 'session', pool_size => 10),
    transaction => AQ::PgBouncer->start(pool_mode => 'transaction', pool_size => 3),
);
$ENV{TEST_NGINX_AQ_PGB_SESSION}     = $pgb{session}->conninfo;
$ENV{TEST_NGINX_AQ_PGB_TRANSACTION} = $pgb{transaction}->conninfo;

# ---------------------------------------------------------------------------
# 64 clients drain a queue (as t/050-concurrency.t does): fresh keys from
# one pool, one kept-alive connection each, until their first 409
# (AQ::PgBouncer::Checks::drain).

for my $mode (qw(session transaction)) {
    my $what = "$mode mode, 64 clients, 2 workers";
    my $items = 640;
    my $queue = AQ::queue($org, "drain-$mode");
    AQ::enqueue_many($queue, $items);
    my $ngx = nginx_via($pgb{$mode}, workers => 2, pool => 4);
    my $t0 = time;
    my $results = drain($org, $ngx, $queue, $items, 64);
    Test::More::note sprintf '%s: %d claims in %.2f s', $what, $items, time - $t0;

    my @errors = map { @{ $_->{errors} || [] }, ($_->{died} ? "died: $_->{died}" : ()) } @$results;
    is_deeply(\@errors, [], "$what: every answer is 200 or, once the queue is empty, 409")
        or diag Test::More::explain [@errors[0 .. ($#errors < 9 ? $#errors : 9)]];
    my @claims = map { @{ $_->{claims} || [] } } @$results;
    my %seen;
    $seen{ $_->[1] }++ for @claims;
    is(scalar @claims, $items, "$what: $items claims answered 200, one per item");
    is_deeply([grep { $seen{$_} > 1 } sort keys %seen], [], "$what: no item handed out twice");
    my @answers;
    for my $i (0 .. $#$results) {
        push @answers, map { [@$_, $i] } @{ $results->[$i]{claims} || [] };
    }
    my @problems = AQ::claim_answer_problems($queue, \@answers);
    is_deeply(\@problems, [], "$what: each answer names an item its own key holds, at that version")
        or diag Test::More::explain [@problems[0 .. ($#problems < 9 ? $#problems : 9)]];
    is_deeply(AQ::counts($queue), { available => 0, claimed => $items, completed => 0 },
              "$what: the database has every item claimed once, none left");
    my ($last_claim) = AQ::dbh()->selectrow_array(
        q{SELECT extract(epoch FROM max(claimed_at)) FROM annotation_queue.items
           WHERE queue_id = ?}, undef, $queue);
    my @false = grep { defined $_->{empty_at} && $_->{empty_at} + 0.002 < $last_claim } @$results;
    is(scalar @false, 0, "$what: no 409 before the queue was empty");
    is(scalar(grep { $_->{out_of_keys} } @$results), 0,
       "$what: every client ran until its 409 (none ran out of keys)");
    is(scalar(grep { ($_->{connects} // 0) != 1 } @$results), 0,
       "$what: each client kept one connection throughout");
    $ngx->stop;
    is_deeply(log_errors($ngx), [], "$what: nothing at [error] or above in the error log");
}

# ---------------------------------------------------------------------------
# The statement timeout through the pooler.  The claim blocks on a lock
# held on a direct connection; nginx answers 504 at its query timeout and
# closes its connection to PgBouncer, which closes its server connection:
# PostgreSQL does not notice that while the backend waits on a lock (the
# control shows it), so only statement_timeout can end the statement while
# the lock is held.

my $TIMEOUT = 1;    # annotation_queue_query_timeout, seconds

for my $case (['session', 'local'], ['transaction', 'local'], ['transaction', 'off']) {
    my ($mode, $st) = @$case;
    my $control = $st eq 'off';
    my $what = "$mode mode, statement_timeout $st" . ($control ? ' (control)' : '');
    my $queue = AQ::queue($org, "timeout-$mode-$st");
    my $ids = AQ::enqueue_many($queue, 4);
    (my $settings = $MODE{$mode}) =~ s/statement_timeout local/statement_timeout $st/;
    my $ngx = nginx_via($pgb{$mode}, mode => $settings, query => $TIMEOUT,
                        connect => AQ::Faults::scaled(3));

    statement_timeout_through(what => $what, ngx => $ngx, queue => $queue, ids => $ids,
                              key => \&key_of, control => $control,
                              timeout => $TIMEOUT, late => $LATE);
}

# ---------------------------------------------------------------------------
# PgBouncer's pool exhausted: default_pool_size 1, its one server
# connection held by a session of the test's through PgBouncer.

{
    my $what = 'transaction mode, PgBouncer pool exhausted';
    my $pgb = AQ::PgBouncer->start(pool_mode => 'transaction', pool_size => 1);
    my $queue = AQ::queue($org, 'exhausted-transaction');
    AQ::enqueue_many($queue, 10);
    my $query = AQ::Faults::scaled(2);
    my $ngx = nginx_via($pgb, pool => 2, query => $query, connect => AQ::Faults::scaled(2));
    my ($warm, undef, $wb) = claim($ngx, $queue, key_of('tx-exhaust-warm'));
    is($warm, '200 item', "$what: a first claim answers 200") or diag $wb;

    # the same (only) server connection served nginx's claim: the local
    # statement_timeout went with its transaction
    my $s = $pgb->session;
    is_deeply([$s->selectrow_array('SHOW statement_timeout'),
               scalar @{ $pgb->admin('SHOW SERVERS') }], ['0', 1],
              "$what: a session after nginx's claim on PgBouncer's one server connection "
              . 'sees statement_timeout 0: the module\'s local setting did not leak');

    $s->begin_work;
    $s->do('SELECT 1');
    my $c1 = send_claim($ngx, $queue, key_of('tx-exhaust-1'));
    my $c2 = send_claim($ngx, $queue, key_of('tx-exhaust-2'));
    ok(AQ::Faults::wait_until(5, sub { $pgb->pool->{cl_waiting} == 2 }),
       "$what: with the one server connection held in a transaction, two claims wait in PgBouncer")
        or diag pool_text($pgb);
    my $t0 = time;
    my @out = map { (read_outcome($_))[0] } $c1, $c2;
    my $took = time - $t0;
    is_deeply(\@out, [('504 query_timeout') x 2], "$what: each gets 504 query_timeout");
    cmp_ok($took, '<', $query + $LATE, "$what: ... within the query timeout ("
                                       . sprintf('%.3f s', $took) . '), nothing hangs');
    # PgBouncer 1.18 does not watch a waiting client's socket: it finds
    # them gone only when it gets a server connection for them
    $s->rollback;
    $s->disconnect;
    ok(AQ::Faults::wait_until(5, sub {
           my $p = $pgb->pool; $p->{cl_waiting} == 0 && $p->{sv_active} == 0 }),
       "$what: once the server connection is released, PgBouncer drops the clients nginx left")
        or diag pool_text($pgb);

    is_deeply(AQ::counts($queue), { available => 9, claimed => 1, completed => 0 },
              "$what: the claims that timed out took nothing");
    my @again = map { (claim($ngx, $queue, key_of($_)))[0] } qw(tx-exhaust-1 tx-exhaust-2);
    is_deeply(\@again, [('200 item') x 2], "$what: once it is released, their keys claim: 200 each");
    $ngx->stop;
    is_deeply(log_errors($ngx, qr/PostgreSQL query timed out, closing the connection/), [],
              "$what: no error in the error log but the query timeouts'");
    $pgb->stop;
}

{
    my $what = 'session mode, PgBouncer pool exhausted';
    my $pgb = AQ::PgBouncer->start(pool_mode => 'session', pool_size => 1);
    my $queue = AQ::queue($org, 'exhausted-session');
    AQ::enqueue_many($queue, 10);
    my $s = $pgb->session;
    $s->do('SELECT 1');
    ok(AQ::Faults::wait_until(5, sub { $pgb->pool->{sv_active} == 1 }),
       "$what: a test session holds PgBouncer's one server connection") or diag pool_text($pgb);

    my $connect = AQ::Faults::scaled(2);
    my $ngx = nginx_via($pgb, pool => 2, query => AQ::Faults::scaled(2), connect => $connect);
    my (@out, @late);
    for my $n (1 .. 2) {
        my ($out, $took, $body, $h) = claim($ngx, $queue, key_of("s-exhaust-$n"));
        push @out, $out . (($h->{'retry-after'} // '') =~ /^\d+$/ ? ' Retry-After' : '');
        push @late, sprintf('%.3f s', $took) if $took > $connect + $LATE;
    }
    is_deeply(\@out, [('503 database_unavailable Retry-After') x 2],
              "$what: claims get 503 database_unavailable with Retry-After: a new connection "
              . 'logs in but cannot prepare its statements');
    is_deeply(\@late, [], "$what: ... each within the connect timeout, nothing hangs");
    like($ngx->error_log, qr/\[error\] .*connecting to PostgreSQL timed out while preparing/,
         "$what: ... the error log says the preparation timed out");
    $s->disconnect;

    my ($again, undef, $ab) = claim($ngx, $queue, key_of('s-exhaust-1'));
    is($again, '200 item', "$what: once the session is gone, a claim answers 200") or diag $ab;
    is_deeply(AQ::counts($queue), { available => 9, claimed => 1, completed => 0 },
              "$what: only that claim took an item");
    $ngx->stop;
    is_deeply(log_errors($ngx, qr/timed out while preparing/), [],
              "$what: no error in the error log but the preparations'");
    $pgb->stop;
}

# ---------------------------------------------------------------------------
# PgBouncer killed (SIGKILL) and started again on the same port.

for my $mode (qw(session transaction)) {
    my $what = "$mode mode, PgBouncer restarted";
    my $pgb = AQ::PgBouncer->start(pool_mode => $mode, pool_size => 4);
    my $queue = AQ::queue($org, "restart-$mode");
    AQ::enqueue_many($queue, 20);
    my $ngx = nginx_via($pgb, pool => 2, query => AQ::Faults::scaled(5),
                        connect => AQ::Faults::scaled(5));
    my $n = 0;
    my $round = sub {
        my ($label) = @_;
        my (@out, @problems);
        for (1 .. 4) {
            my $key = key_of("$what " . ++$n);
            my ($out, undef, $body, $h) = claim($ngx, $queue, $key);
            push @problems, AQ::Faults::claim_problems($key, $body) if $out eq '200 item';
            $out .= ' Retry-After' if ($h->{'retry-after'} // '') =~ /^\d+$/;
            push @out, $out;
        }
        return (\@out, \@problems);
    };

    my ($before, $p1) = $round->();
    is_deeply($before, [('200 item') x 4], "$what: before, claims answer 200");
    is_deeply($p1, [], "$what: ... each item held by its key");
    $pgb->kill('KILL');
    my ($down) = $round->();
    is_deeply($down, [('503 database_unavailable Retry-After') x 4],
              "$what: while PgBouncer is down, claims get 503 database_unavailable with Retry-After");
    $pgb->start_again;
    my ($after, $p2) = $round->();
    is_deeply($after, [('200 item') x 4], "$what: once it is back on its port, claims answer 200");
    is_deeply($p2, [], "$what: ... each item held by its key");
    is_deeply(AQ::counts($queue), { available => 12, claimed => 8, completed => 0 },
              "$what: the claims answered 503 took nothing");
    $ngx->stop;
    is_deeply(log_errors($ngx, qr/could not connect to PostgreSQL: .*Connection refused|server closed the connection unexpectedly|query failed|connection to PostgreSQL (?:was )?(?:lost|closed)/), [],
              "$what: no error in the error log but lost and refused connections");
    $pgb->stop;
}

# A claim in flight (blocked on a lock) when PgBouncer dies: 503 at once,
# not at its query timeout; its statement, orphaned in PostgreSQL, is
# cancelled by the statement timeout while the lock is still held, so it
# commits nothing.
{
    my $what = 'transaction mode, PgBouncer killed under a claim';
    my $pgb = AQ::PgBouncer->start(pool_mode => 'transaction', pool_size => 2);
    my $queue = AQ::queue($org, 'restart-inflight');
    AQ::enqueue_many($queue, 5);
    my $query = AQ::Faults::scaled(4);
    my $ngx = nginx_via($pgb, pool => 1, query => $query, connect => AQ::Faults::scaled(3));
    my ($warm) = claim($ngx, $queue, key_of('inflight-warm'));
    is($warm, '200 item', "$what: a first claim answers 200");

    my $locker = AQ::Faults::lock_items(AQ::Faults::session());
    my $c = send_claim($ngx, $queue, key_of('inflight'));
    ok(AQ::Faults::wait_until(5, sub { lock_waiters() == 1 }),
       "$what: a claim runs, blocked by the lock");
    $pgb->kill('KILL');
    my ($out, $body, $h) = read_outcome($c);
    is($out, '503 database_unavailable',
       "$what: it gets 503 database_unavailable (the connection is lost), not 504 at its query timeout")
        or diag $body;
    like($h->{'retry-after'} // '', qr/^\d+$/, "$what: ... with Retry-After");
    ok(AQ::Faults::wait_until($query + 3, sub { lock_waiters() == 0 }),
       "$what: PostgreSQL's statement timeout ends the orphaned statement, the lock still held");
    $locker->rollback;
    is_deeply(AQ::counts($queue), { available => 4, claimed => 1, completed => 0 },
              "$what: ... so it took nothing");
    $pgb->start_again;
    my ($again, undef, $ab) = claim($ngx, $queue, key_of('inflight'));
    is($again, '200 item', "$what: after the restart its key claims: 200") or diag $ab;
    is(item_of($ab)->{version} // '', 1, "$what: ... a new item at version 1");
    $ngx->stop;
    is_deeply(log_errors($ngx, qr/could not connect to PostgreSQL|server closed the connection unexpectedly|query failed|connection to PostgreSQL (?:was )?(?:lost|closed)/), [],
              "$what: no error in the error log but the lost connection's");
    $pgb->stop;
}

# ---------------------------------------------------------------------------
# PAUSE and RESUME on the admin console, transaction mode: PAUSE waits for
# the server connections to be released (at once: nginx's are idle between
# transactions), then PgBouncer holds every new transaction, and new
# client logins, until RESUME.

{
    my $what = 'transaction mode, PAUSE then RESUME';
    my $pgb = AQ::PgBouncer->start(pool_mode => 'transaction', pool_size => 2);
    my $queue = AQ::queue($org, 'pause');
    AQ::enqueue_many($queue, 10);
    my $ngx = nginx_via($pgb, pool => 2, query => AQ::Faults::scaled(10),
                        connect => AQ::Faults::scaled(10));
    my ($warm) = claim($ngx, $queue, key_of('pause-warm'));
    is($warm, '200 item', "$what: a first claim answers 200 (one connection open)");

    $pgb->pause;
    # the first goes on the open connection, the second on a new one
    my @c = map { [send_claim($ngx, $queue, key_of("pause-$_")), key_of("pause-$_")] } 1 .. 2;
    ok(AQ::Faults::wait_until(5, sub { $pgb->pool->{cl_waiting} == 2 }),
       "$what: claims sent during PAUSE wait in PgBouncer (on the open connection and a new one)")
        or diag pool_text($pgb);
    ok(!grep({ AQ::Faults::answered_yet($_->[0]) } @c), "$what: ... unanswered");
    is_deeply(AQ::counts($queue), { available => 9, claimed => 1, completed => 0 },
              "$what: ... and nothing reached PostgreSQL");
    $pgb->resume;
    my (@out, @problems);
    for (@c) {
        my ($out, $body) = read_outcome($_->[0]);
        push @out, $out;
        push @problems, AQ::Faults::claim_problems($_->[1], $body) if $out eq '200 item';
    }
    is_deeply(\@out, [('200 item') x 2], "$what: after RESUME both complete: 200");
    is_deeply(\@problems, [], "$what: ... each item held by its key");
    $ngx->stop;
    is_deeply(log_errors($ngx), [], "$what: nothing at [error] or above in the error log");
    $pgb->stop;
}

# PgBouncer 1.18 does not watch the socket of a client waiting for a
# server: after nginx's 504 it keeps the claim queued until RESUME.  Then
# it forwards the part of the claim it had begun to stream (the claim's
# unnamed Parse, over 4 kB of text, is longer than its 4 kB packet buffer)
# and only then finds the end of file: PostgreSQL executes the set_config()
# and logs "incomplete message from client"; the claim never runs.  (A
# request that fits the buffer, a complete of 1 kB, was dropped without a
# byte forwarded: "client unexpected eof" in PgBouncer's log.)  Should a
# PgBouncer forward a whole request after its client left, this test
# fails, rightly: the query_wait_timeout block below is the remedy.
{
    my $what = 'transaction mode, PAUSE without RESUME in time';
    my $pgb = AQ::PgBouncer->start(pool_mode => 'transaction', pool_size => 2);
    my $queue = AQ::queue($org, 'pause-long');
    AQ::enqueue_many($queue, 10);
    my $query = AQ::Faults::scaled(2);
    my $ngx = nginx_via($pgb, pool => 1, query => $query, connect => AQ::Faults::scaled(2));
    my ($warm) = claim($ngx, $queue, key_of('pause-long-warm'));
    is($warm, '200 item', "$what: a first claim answers 200");

    $pgb->pause;
    my $c = send_claim($ngx, $queue, key_of('pause-long'));
    ok(AQ::Faults::wait_until(5, sub { $pgb->pool->{cl_waiting} == 1 }),
       "$what: a claim waits in PgBouncer") or diag pool_text($pgb);
    my $t0 = time;
    my ($out, $body) = read_outcome($c);
    my $took = time - $t0;
    is($out, '504 query_timeout', "$what: it gets 504 query_timeout") or diag $body;
    cmp_ok($took, '<', $query + $LATE, "$what: ... at the query timeout ("
                                       . sprintf('%.3f s', $took) . '), nothing hangs');
    $pgb->resume;
    ok(AQ::Faults::wait_until(5, sub {
           my $p = $pgb->pool; $p->{cl_waiting} == 0 && $p->{sv_active} == 0 }),
       "$what: after RESUME PgBouncer drops the client nginx left") or diag pool_text($pgb);
    is_deeply(AQ::counts($queue), { available => 9, claimed => 1, completed => 0 },
              "$what: after RESUME the claim that timed out has taken nothing");
    my ($again, undef, $ab) = claim($ngx, $queue, key_of('pause-long'));
    is($again, '200 item', "$what: its key claims again: 200") or diag $ab;
    is(item_of($ab)->{version} // '', 1, "$what: ... at version 1");
    $ngx->stop;
    is_deeply(log_errors($ngx, qr/PostgreSQL query timed out, closing the connection/), [],
              "$what: no error in the error log but the query timeout's");
    $pgb->stop;
}

# Session mode: PgBouncer releases a server connection only when its client
# leaves, so PAUSE completes only once nginx's idle connections close
# (annotation_queue_idle_timeout, 1 s here; with the default of 60 s, PAUSE
# waits up to a minute).  A claim sent during the pause opens a new
# connection, which logs in and waits to prepare; after RESUME it answers
# 200.
{
    my $what = 'session mode, PAUSE then RESUME';
    my $pgb = AQ::PgBouncer->start(pool_mode => 'session', pool_size => 2);
    my $queue = AQ::queue($org, 'pause-session');
    AQ::enqueue_many($queue, 10);
    my $ngx = nginx_via($pgb, pool => 1, query => AQ::Faults::scaled(10),
                        connect => AQ::Faults::scaled(10),
                        http => "    annotation_queue_idle_timeout 1s;\n");
    my ($warm) = claim($ngx, $queue, key_of('pause-s-warm'));
    is($warm, '200 item', "$what: a first claim answers 200 (one connection open)");

    ok(eval { $pgb->pause; 1 },
       "$what: PAUSE completes once nginx's idle connection closes at its idle timeout")
        or diag $@;
    my $c = send_claim($ngx, $queue, key_of('pause-s'));
    ok(AQ::Faults::wait_until(5, sub { $pgb->pool->{cl_waiting} == 1 }),
       "$what: a claim sent during PAUSE waits in PgBouncer (a new connection, preparing)")
        or diag pool_text($pgb);
    ok(!AQ::Faults::answered_yet($c), "$what: ... unanswered");
    $pgb->resume;
    my ($out, $body) = read_outcome($c);
    is($out, '200 item', "$what: after RESUME it answers 200") or diag $body;
    is_deeply([AQ::Faults::claim_problems(key_of('pause-s'), $body)], [],
              "$what: ... held by its key at the version answered");
    $ngx->stop;
    is_deeply(log_errors($ngx), [], "$what: nothing at [error] or above in the error log");
    $pgb->stop;
}

# What an operator should configure: PgBouncer's query_wait_timeout below
# the module's query timeout, so that PgBouncer gives up on a waiting claim
# itself (an error, then it closes the client) and nothing stays in its
# queue after nginx's answer.
{
    my $what = 'transaction mode, PAUSE, query_wait_timeout 1 s';
    my $pgb = AQ::PgBouncer->start(pool_mode => 'transaction', pool_size => 2,
                                   settings => { query_wait_timeout => 1 });
    my $queue = AQ::queue($org, 'pause-wait-timeout');
    AQ::enqueue_many($queue, 10);
    my $query = AQ::Faults::scaled(10);
    my $ngx = nginx_via($pgb, pool => 1, query => $query, connect => AQ::Faults::scaled(2));
    my ($warm) = claim($ngx, $queue, key_of('pause-qwt-warm'));
    is($warm, '200 item', "$what: a first claim answers 200");

    $pgb->pause;
    my ($out, $took, $body, $h) = claim($ngx, $queue, key_of('pause-qwt'));
    is($out, '503 database_unavailable',
       "$what: PgBouncer ends the waiting claim: 503 database_unavailable, not 504 at nginx's "
       . "query timeout (${query}s)") or diag $body;
    like($h->{'retry-after'} // '', qr/^\d+$/, "$what: ... with Retry-After");
    is($pgb->pool->{cl_waiting}, 0, "$what: ... and nothing is left waiting in PgBouncer");
    like($pgb->log_text, qr/closing because: query_wait_timeout/,
         "$what: ... PgBouncer's log says query_wait_timeout");
    $pgb->resume;
    is_deeply(AQ::counts($queue), { available => 9, claimed => 1, completed => 0 },
              "$what: after RESUME the claim has taken nothing");
    my ($again, undef, $ab) = claim($ngx, $queue, key_of('pause-qwt'));
    is($again, '200 item', "$what: its key claims again: 200") or diag $ab;
    $ngx->stop;
    is_deeply(log_errors($ngx, qr/reading from PostgreSQL failed: .*server closed the connection unexpectedly/), [],
              "$what: no error in the error log but the closed connection's");
    $pgb->stop;
}

# Session mode without a reset query (server_reset_query empty): a new
# client connection gets the server session of the one before, with the
# module's statements still prepared there.  The module clears them first
# (DEALLOCATE ALL), or every connection after the first would fail to
# prepare ("already exists").
{
    my $what = 'session mode, empty server_reset_query';
    my $pgb = AQ::PgBouncer->start(pool_mode => 'session', pool_size => 1,
                                   settings => { server_reset_query => '' });
    my $queue = AQ::queue($org, 'session-no-reset');
    AQ::enqueue_many($queue, 10);
    my @out;
    for my $n (1 .. 3) {
        my $ngx = nginx_via($pgb, pool => 1);
        push @out, (claim($ngx, $queue, key_of("no-reset-$n")))[0];
        $ngx->stop;
        is_deeply(log_errors($ngx), [],
                  "$what: nginx $n: no error in the error log (nothing 'already exists')");
        ok(AQ::Faults::wait_until(5, sub { ($pgb->pool->{cl_active} // 0) == 0 }),
           "$what: nginx ${n}'s connection is back in PgBouncer");
    }
    is_deeply(\@out, [('200 item') x 3],
              "$what: three nginx one after the other, each on the same server session: "
              . 'every claim answers 200');
    is(scalar @{ $pgb->admin('SHOW SERVERS') }, 1, "$what: ... PgBouncer kept one server session");
    $pgb->stop;
}

# ---------------------------------------------------------------------------
# Transaction mode with annotation_queue_prepare on: unsupported, and this
# is why.  One nginx connection; RECONNECT makes PgBouncer close its server
# connections (at once: they are idle), so that the next claim's
# transaction lands on a new one, where the statements were never prepared.

{
    my $what = 'transaction mode with prepare on';
    my $pgb = AQ::PgBouncer->start(pool_mode => 'transaction', pool_size => 2);
    my $queue = AQ::queue($org, 'prepared-in-transaction-mode');
    AQ::enqueue_many($queue, 10);
    my $ngx = nginx_via($pgb, mode => $MODE{session}, pool => 1);
    my @first = map { (claim($ngx, $queue, key_of("prep-$_")))[0] } 1 .. 2;
    is_deeply(\@first, [('200 item') x 2],
              "$what: while PgBouncer lends the same server connection, claims answer 200");

    $pgb->admin('RECONNECT');
    ok(AQ::Faults::wait_until(5, sub { @{ $pgb->admin('SHOW SERVERS') } == 0 }),
       "$what: RECONNECT closed PgBouncer's server connections");
    my ($out, undef, $body) = claim($ngx, $queue, key_of('prep-3'));
    is($out, '503 database_unavailable',
       "$what: a claim lent a server connection that never prepared the statement: "
       . '503 database_unavailable (nothing ran; a retry may land well)') or diag $body;
    like($ngx->error_log,
         qr/\[error\] .*annotation queue: claim failed: 26000 prepared statement "ngx_aq_claim" does not exist \(behind a pooler in transaction mode, set "annotation_queue_prepare off"\)/,
         "$what: ... the error log says 26000 prepared statement does not exist, and what to set");
    my @after = map { (claim($ngx, $queue, key_of("prep-$_")))[0] } 3 .. 4;
    is_deeply(\@after, [('200 item') x 2],
              "$what: the module dropped that connection: the next claims, on a new one "
              . 'that prepares again, answer 200');
    is_deeply(AQ::counts($queue), { available => 6, claimed => 4, completed => 0 },
              "$what: the failed claim took nothing");
    $ngx->stop;
    is_deeply(log_errors($ngx, qr/26000 prepared statement "ngx_aq_claim" does not exist/), [],
              "$what: no other error in the error log");
    $pgb->stop;
}

# ---------------------------------------------------------------------------
# Fixtures of the blocks.

our %q;
for my $mode (qw(session transaction)) {
    $q{"flow-$mode"} = AQ::Workflow::queue($org, "flow-$mode");
    AQ::Workflow::enqueue($q{"flow-$mode"}, "flow-$mode");
}
our $unknown_queue = AQ::random_uuid();
our $unknown_key   = AQ::well_formed_key();
$q{default} = AQ::queue($org, 'default-settings');
AQ::enqueue_many($q{default}, 2);

sub act   { return AQ::Workflow::act(@_) }
sub as    { return AQ::headers(key_of($_[0])) }

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: session mode (statement_timeout local, prepare on): claim 200, extend 200, complete 200, then 409 no_items_available
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_PGB_SESSION";
    annotation_queue_statement_timeout local;
--- config eval
$AQ::Workflow::LOCATIONS
--- request eval
[AQ::Workflow::claim($::q{'flow-session'}), ::act('extend', 'flow-session', 1),
 ::act('complete', 'flow-session', 1, result => { label => 'ok' }),
 AQ::Workflow::claim($::q{'flow-session'})]
--- more_headers eval
[(::as('flow-session')) x 4]
--- error_code eval
[200, 200, 200, 409]
--- response_headers_like eval
[("Cache-Control: no-store") x 3, "Content-Type: application/json(;\\s*charset=utf-8)?"]
--- response_body_filters eval
[[\&AQ::canon],
 [\&AQ::Workflow::brief, AQ::append(sub { AQ::Workflow::state_of('flow-session') })],
 [\&AQ::Workflow::answer, AQ::append(sub { AQ::Workflow::state_of('flow-session') })],
 [\&AQ::canon]]
--- response_body eval
[qq({"item":{"claimed_at":"<ts>","id":"<item:flow-session>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":{"label":"flow-session"},"queue_id":"<queue:flow-session>","version":1},"success":true}\n),
 "claimed flow-session v1, lease 900s\nclaimed v1 by flow-session\n",
 qq({"item":{"id":"<item:flow-session>","lease_expires_at":null,"queue_id":"<queue:flow-session>","status":"completed","version":2},"success":true}\n)
 . qq(completed v2, result {"label": "ok"}\n),
 AQ::error_body('no_items_available')]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: session mode: 404 queue_not_found, 401 invalid_api_key with WWW-Authenticate (both answered by the database through PgBouncer)
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_PGB_SESSION";
    annotation_queue_statement_timeout local;
--- request eval
[AQ::claim_req($::unknown_queue), AQ::claim_req($::q{'flow-session'})]
--- more_headers eval
[::as('session-404'), AQ::headers($::unknown_key)]
--- error_code eval
[404, 401]
--- response_headers_like eval
["Content-Type: application/json(;\\s*charset=utf-8)?",
 "WWW-Authenticate: Bearer.*\nContent-Type: application/json(;\\s*charset=utf-8)?"]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[AQ::error_body('queue_not_found'), AQ::error_body('invalid_api_key')]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: transaction mode (prepare off, statement_timeout local): claim 200, extend 200, complete 200, then 409 no_items_available
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_PGB_TRANSACTION";
    annotation_queue_prepare off;
    annotation_queue_statement_timeout local;
--- config eval
$AQ::Workflow::LOCATIONS
--- request eval
[AQ::Workflow::claim($::q{'flow-transaction'}), ::act('extend', 'flow-transaction', 1),
 ::act('complete', 'flow-transaction', 1, result => { label => 'ok' }),
 AQ::Workflow::claim($::q{'flow-transaction'})]
--- more_headers eval
[(::as('flow-transaction')) x 4]
--- error_code eval
[200, 200, 200, 409]
--- response_headers_like eval
[("Cache-Control: no-store") x 3, "Content-Type: application/json(;\\s*charset=utf-8)?"]
--- response_body_filters eval
[[\&AQ::canon],
 [\&AQ::Workflow::brief, AQ::append(sub { AQ::Workflow::state_of('flow-transaction') })],
 [\&AQ::Workflow::answer, AQ::append(sub { AQ::Workflow::state_of('flow-transaction') })],
 [\&AQ::canon]]
--- response_body eval
[qq({"item":{"claimed_at":"<ts>","id":"<item:flow-transaction>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":{"label":"flow-transaction"},"queue_id":"<queue:flow-transaction>","version":1},"success":true}\n),
 "claimed flow-transaction v1, lease 900s\nclaimed v1 by flow-transaction\n",
 qq({"item":{"id":"<item:flow-transaction>","lease_expires_at":null,"queue_id":"<queue:flow-transaction>","status":"completed","version":2},"success":true}\n)
 . qq(completed v2, result {"label": "ok"}\n),
 AQ::error_body('no_items_available')]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: transaction mode: 404 queue_not_found, 401 invalid_api_key with WWW-Authenticate (both answered by the database through PgBouncer)
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_PGB_TRANSACTION";
    annotation_queue_prepare off;
    annotation_queue_statement_timeout local;
--- request eval
[AQ::claim_req($::unknown_queue), AQ::claim_req($::q{'flow-transaction'})]
--- more_headers eval
[::as('transaction-404'), AQ::headers($::unknown_key)]
--- error_code eval
[404, 401]
--- response_headers_like eval
["Content-Type: application/json(;\\s*charset=utf-8)?",
 "WWW-Authenticate: Bearer.*\nContent-Type: application/json(;\\s*charset=utf-8)?"]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[AQ::error_body('queue_not_found'), AQ::error_body('invalid_api_key')]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: the default settings (statement_timeout startup) through PgBouncer 1.18: it refuses the options startup parameter: 503 database_unavailable, the reason in the error log
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_PGB_TRANSACTION";
--- request eval
AQ::claim_req($::q{default})
--- more_headers eval
::as('default-settings')
--- error_code: 503
--- response_headers_like
Retry-After: \d+
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"database_unavailable","message":"..."},"success":false}
--- error_log eval
qr/\[error\] .*could not connect to PostgreSQL: .*FATAL:  unsupported startup parameter: options/
--- no_error_log
[alert]
[crit]
