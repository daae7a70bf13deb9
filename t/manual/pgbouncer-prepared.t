# The module with its statements prepared (annotation_queue_prepare on, the
# default) through PgBouncer 1.21 or later in transaction mode, with
# max_prepared_statements = 100: PgBouncer tracks the module's
# protocol-level prepared statements (Parse with a name) and prepares them
# again on whichever server connection it lends a transaction.  Bookworm's
# PgBouncer 1.18 cannot (t/topology/160-pgbouncer.t shows its 26000 and why it needs
# annotation_queue_prepare off there).  The binary is trixie's 1.24, built
# by scripts/build-pgbouncer.sh; run it with scripts/test-pgbouncer-new.sh
# (AQ_PGBOUNCER=<binary>; without it the suite skips, so that
# `prove -r t/` passes over it).  The module's settings:
#
#   annotation_queue_statement_timeout local;
#   annotation_queue_prepare on;             (the default)
#
# Standalone parts (Test::More, an nginx of their own, AQ::start_nginx):
#
#   - 64 clients drain a queue through two workers: every item handed out
#     exactly once, each answer held by its own key in the database at the
#     version answered, no 409 while items were left; and the statements
#     ran prepared: PgBouncer's SHOW STATS counts every statement parsed
#     by nginx once per nginx connection, prepared on PgBouncer's server
#     connections only as connections open (once per server connection,
#     and again where an nginx connection's DEALLOCATE ALL cleared them),
#     not per claim, and bound by name at least once per 16 answers (a
#     batch claims for up to 16 requests);
#   - RECONNECT on the admin console closes PgBouncer's server connections
#     between claims (what made every claim after it fail with 26000
#     through 1.18): each claim after it answers 200, on the same nginx
#     connection (nginx parsed nothing again), PgBouncer having prepared
#     the statements again on its new server connection;
#   - the statement timeout applies through the pooler: a claim blocked by
#     a lock (held on a direct connection) answers 504 query_timeout and,
#     with the lock still held, PostgreSQL itself cancels its statement
#     ("canceling statement due to statement timeout" in the server's log,
#     the backend no longer waits on the lock); a control with
#     annotation_queue_statement_timeout off shows the statement lingering
#     and no cancel, so the check can tell nginx's timer from the server's;
#     the local setting does not outlive the module's transaction (a
#     client after it on the same server connection sees 0);
#   - at the end: the server's log has no "prepared statement ... does not
#     exist", and no PgBouncer logged a prepared statement it could not
#     find.
#
# Then Test::Nginx blocks: claim 200, extend 200, complete 200, 409
# no_items_available, 404 queue_not_found, 401 invalid_api_key.
#
# The suite runs its own PostgreSQL cluster (AQ::Faults::own_cluster), to
# read the server's log.  Every wait is for a condition (SHOW POOLS,
# pg_stat_activity, the server's log), with deadlines times AQ::slow().
use strict;
use warnings;

use lib 't/lib';
BEGIN {
    if (!$ENV{AQ_PGBOUNCER}) {
        print "1..0 # SKIP needs PgBouncer 1.21 or later in AQ_PGBOUNCER"
              . " (scripts/test-pgbouncer-new.sh builds and runs it)\n";
        exit 0;
    }
    require AQ::Faults;
    AQ::Faults::own_cluster();
}
use AQ;
use AQ::Faults;
use AQ::PgBouncer;
use AQ::PgBouncer::Checks qw(claim lock_waiters timeout_cancels log_errors
                            statement_timeout_through drain);
use AQ::Workflow;
use JSON::PP ();
use POSIX ();
use Test::Nginx::Socket 'no_plan';
use Time::HiRes qw(time sleep);

our $VERSION_UNDER_TEST = AQ::PgBouncer->version;
{
    my @v = split /\./, $VERSION_UNDER_TEST;
    die "pgbouncer-prepared.t: $AQ::PgBouncer::BINARY says it is PgBouncer "
        . "'$VERSION_UNDER_TEST': this suite needs 1.21 or later (scripts/build-pgbouncer.sh)\n"
        unless @v >= 2 && ($v[0] > 1 || ($v[0] == 1 && $v[1] >= 21));
}
Test::More::note "PgBouncer $VERSION_UNDER_TEST ($AQ::PgBouncer::BINARY)";

our $org = AQ::org('pgbouncer-prepared');
our %k;
sub key_of { my ($name) = @_; return $k{$name} //= AQ::Workflow::key($org, $name) }

our $NSTMTS = 11;   # the module's prepared statements (src/ngx_aq_sql.h: NGX_AQ_NPREPARED)

# What PgBouncer needs to keep them, and what the module needs through it.
our %TRACKING = (max_prepared_statements => 100);
our $SETTINGS = "    annotation_queue_statement_timeout local;\n"
                . "    annotation_queue_prepare on;\n";

my @pgbs;    # every PgBouncer of the suite, for the logs' check at the end

sub pgbouncer {
    my (%o) = @_;
    my $pgb = AQ::PgBouncer->start(pool_mode => 'transaction',
                                   settings => { %TRACKING, %{ $o{settings} || {} } },
                                   pool_size => $o{pool_size} // 2);
    push @pgbs, $pgb;
    return $pgb;
}

# An nginx whose claims go through $pgb.  Options: workers (1), pool
# (annotation_queue_pool_size, 1), query and connect (timeouts, seconds),
# settings (the module's, $SETTINGS by default), http (more).
sub nginx_via {
    my ($pgb, %o) = @_;
    my $http = $o{settings} // $SETTINGS;
    $http .= "    annotation_queue_pool_size " . ($o{pool} // 1) . ";\n";
    $http .= "    annotation_queue_query_timeout $o{query}s;\n" if $o{query};
    $http .= "    annotation_queue_connect_timeout $o{connect}s;\n" if $o{connect};
    $http .= $o{http} // '';
    return AQ::start_nginx(workers => $o{workers} // 1, dsn => $pgb->conninfo,
                           http => $http);
}




sub pool_text {
    my ($pgb) = @_;
    my $p = eval { $pgb->pool } or return "SHOW POOLS failed: $@";
    return join ' ', map { "$_=" . ($p->{$_} // '?') }
                     qw(cl_active cl_waiting sv_active sv_idle sv_used sv_login);
}

# PgBouncer's counts of named prepared statements (SHOW STATS, the suite's
# database): client parses, server parses, binds.
sub ps_counts {
    my ($pgb) = @_;
    my $s = $pgb->stats;
    return { map { $_ => $s->{"total_${_}_count"} // 0 } qw(client_parse server_parse bind) };
}

sub ps_delta {
    my ($before, $after) = @_;
    return { map { $_ => $after->{$_} - $before->{$_} } keys %$after };
}


my $LATE = 2 * AQ::slow();    # how late after its timer an answer may come

# ---------------------------------------------------------------------------
# The PgBouncer the blocks and the drain share (the other parts start their
# own): transaction mode lends one server connection per transaction, 3
# serve the 8 connections of the drain's nginx.

our $shared = pgbouncer(pool_size => 3);
$ENV{TEST_NGINX_AQ_PGB} = $shared->conninfo;

# ---------------------------------------------------------------------------
# 64 clients drain a queue (as t/050-concurrency.t and t/topology/160-pgbouncer.t
# do): fresh keys from one pool, one kept-alive connection each, until their
# first 409 (AQ::PgBouncer::Checks::drain).

{
    my $what = 'transaction mode, prepare on, 64 clients, 2 workers';
    my $items = 640;
    my ($workers, $pool, $servers) = (2, 4, 3);
    my $queue = AQ::queue($org, 'drain');
    AQ::enqueue_many($queue, $items);
    my $ngx = nginx_via($shared, workers => $workers, pool => $pool);
    my $ps0 = ps_counts($shared);
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

    # How the statements ran, from PgBouncer's counts: nginx's connections
    # parsed each statement once, PgBouncer prepared each at most once per
    # server connection, and the claims were bound by name.
    my $ps = ps_delta($ps0, ps_counts($shared));
    my $answered = 0;
    $answered += $_->{answers} for @$results;
    Test::More::note "$what: $answered answers; PgBouncer counted $ps->{client_parse} client "
                     . "parses, $ps->{server_parse} server parses, $ps->{bind} binds";
    ok($ps->{client_parse} > 0 && $ps->{client_parse} % $NSTMTS == 0
       && $ps->{client_parse} <= $workers * $pool * $NSTMTS,
       "$what: nginx parsed its $NSTMTS statements once per connection, at most "
       . $workers * $pool . " connections ($ps->{client_parse} parses)");
    # PgBouncer prepares a statement on a server connection the first time
    # a client uses it there, and again after a client's DEALLOCATE ALL
    # (the module's, when nginx opens a connection) cleared them there
    my $bound = $servers * $NSTMTS + $ps->{client_parse};
    cmp_ok($ps->{server_parse}, '<=', $bound,
           "$what: PgBouncer prepared them on its server connections only as connections "
           . "opened, not per claim: $ps->{server_parse} parses for $answered answers, "
           . "at most $servers x $NSTMTS + $NSTMTS per nginx connection ($bound)");
    # a statement claims for up to 16 requests (NGX_AQ_BATCH_MAX)
    my $least = POSIX::ceil($answered / 16);
    ok($ps->{bind} >= $least && $ps->{bind} > $ps->{server_parse},
       "$what: the claims ran as named statements, bound at least once per 16 answers "
       . "($ps->{bind} binds for $answered answers) and more often than prepared");
    $ngx->stop;
    is_deeply(log_errors($ngx), [], "$what: nothing at [error] or above in the error log");
}

# ---------------------------------------------------------------------------
# RECONNECT: PgBouncer closes its server connections (at once: they are
# idle between nginx's transactions), so that the next claim's transaction
# lands on a new one, where the statements were never prepared.  Through
# 1.18 that claim failed with 26000 (t/topology/160-pgbouncer.t); here PgBouncer
# prepares them there first.  Three times, each claim on nginx's one
# connection.

{
    my $what = 'transaction mode with prepare on, RECONNECT between claims';
    my $pgb = pgbouncer(pool_size => 2);
    my $queue = AQ::queue($org, 'reconnect');
    AQ::enqueue_many($queue, 10);
    my $ngx = nginx_via($pgb, pool => 1);
    my @first = map { (claim($ngx, $queue, key_of("reconnect-$_")))[0] } 1 .. 2;
    is_deeply(\@first, [('200 item') x 2],
              "$what: before RECONNECT, claims answer 200");
    my $ps0 = ps_counts($pgb);
    is($ps0->{client_parse}, $NSTMTS,
       "$what: ... nginx's one connection parsed the $NSTMTS statements once");

    my (@out, @problems, @closed);
    for my $round (1 .. 3) {
        $pgb->admin('RECONNECT');
        push @closed, AQ::Faults::wait_until(5, sub { @{ $pgb->admin('SHOW SERVERS') } == 0 })
                      ? 'closed' : 'open: ' . pool_text($pgb);
        my $key = key_of("reconnect-after-$round");
        my ($out, undef, $body) = claim($ngx, $queue, $key);
        push @out, $out;
        push @problems, AQ::Faults::claim_problems($key, $body) if $out eq '200 item';
    }
    is_deeply(\@closed, [('closed') x 3],
              "$what: each RECONNECT closed PgBouncer's server connections");
    is_deeply(\@out, [('200 item') x 3],
              "$what: the claim after each RECONNECT, on a new server connection, answers 200");
    is_deeply(\@problems, [], "$what: ... each item held by its key at the version answered");
    my $ps = ps_delta($ps0, ps_counts($pgb));
    is($ps->{client_parse}, 0,
       "$what: nginx parsed nothing again: it kept its connection and its statements");
    cmp_ok($ps->{server_parse}, '>=', 3,
           "$what: PgBouncer prepared the claim again on each new server connection "
           . "($ps->{server_parse} server parses)");
    is_deeply(AQ::counts($queue), { available => 5, claimed => 5, completed => 0 },
              "$what: five claims, five items taken");
    $ngx->stop;
    is_deeply(log_errors($ngx), [], "$what: nothing at [error] or above in the error log");
    unlike($pgb->log_text, qr/prepared statement .* not found|pooler error/,
           "$what: PgBouncer's log has no statement it could not find");
    $pgb->stop;
}

# ---------------------------------------------------------------------------
# The statement timeout through the pooler, with the statements prepared.
# The claim blocks on a lock held on a direct connection; nginx answers 504
# at its query timeout and closes its connection to PgBouncer; only
# statement_timeout can end the statement while the lock is held (the
# control shows it lingering).

my $TIMEOUT = 1;    # annotation_queue_query_timeout, seconds

for my $st (qw(local off)) {
    my $control = $st eq 'off';
    my $what = "transaction mode, prepare on, statement_timeout $st" . ($control ? ' (control)' : '');
    my $queue = AQ::queue($org, "timeout-$st");
    my $ids = AQ::enqueue_many($queue, 4);
    (my $settings = $SETTINGS) =~ s/statement_timeout local/statement_timeout $st/;
    my $ngx = nginx_via($shared, settings => $settings, query => $TIMEOUT,
                        connect => AQ::Faults::scaled(3));

    statement_timeout_through(what => $what, ngx => $ngx, queue => $queue, ids => $ids,
                              key => \&key_of, control => $control,
                              timeout => $TIMEOUT, late => $LATE);
}

# The local setting goes with the module's transaction: PgBouncer's one
# server connection, after nginx's claim, shows a later client
# statement_timeout 0.
{
    my $what = 'transaction mode, prepare on, one server connection';
    my $pgb = pgbouncer(pool_size => 1);
    my $queue = AQ::queue($org, 'no-leak');
    AQ::enqueue_many($queue, 2);
    my $ngx = nginx_via($pgb, query => 3);
    my ($out, undef, $body) = claim($ngx, $queue, key_of('no-leak'));
    is($out, '200 item', "$what: a claim answers 200") or diag $body;
    my $s = $pgb->session;
    is_deeply([$s->selectrow_array('SHOW statement_timeout'),
               scalar @{ $pgb->admin('SHOW SERVERS') }], ['0', 1],
              "$what: a session after nginx's claim on PgBouncer's one server connection "
              . 'sees statement_timeout 0: the module\'s local setting did not leak');
    $s->disconnect;
    $ngx->stop;
    is_deeply(log_errors($ngx), [], "$what: nothing at [error] or above in the error log");
    $pgb->stop;
}

# ---------------------------------------------------------------------------
# Fixtures of the blocks.

our %q;
$q{flow} = AQ::Workflow::queue($org, 'flow');
AQ::Workflow::enqueue($q{flow}, 'flow');
our $unknown_queue = AQ::random_uuid();
our $unknown_key   = AQ::well_formed_key();

sub act   { return AQ::Workflow::act(@_) }
sub as    { return AQ::headers(key_of($_[0])) }

AQ::default_blocks();
run_tests();

# ---------------------------------------------------------------------------
# After everything: no statement went missing anywhere.

{
    my @missing = grep { /prepared statement ".*" does not exist/ }
                  split /\n/, AQ::Faults::pg_log();
    is_deeply(\@missing, [],
              'the server\'s log has no "prepared statement ... does not exist" (26000)');
    my @pgb_missing = map { my $p = $_;
                            map { "PgBouncer $p->{n}: $_" }
                            grep { /prepared statement .* not found|prepared statement did not exist/ }
                            split /\n/, $p->log_text } @pgbs;
    is_deeply(\@pgb_missing, [], 'no PgBouncer logged a prepared statement it could not find');
}

__DATA__

=== TEST 1: transaction mode, prepare on (statement_timeout local): claim 200, extend 200, complete 200, then 409 no_items_available
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_PGB";
    annotation_queue_statement_timeout local;
    annotation_queue_prepare on;
--- config eval
$AQ::Workflow::LOCATIONS
--- request eval
[AQ::Workflow::claim($::q{flow}), ::act('extend', 'flow', 1),
 ::act('complete', 'flow', 1, result => { label => 'ok' }),
 AQ::Workflow::claim($::q{flow})]
--- more_headers eval
[(::as('flow')) x 4]
--- error_code eval
[200, 200, 200, 409]
--- response_headers_like eval
[("Cache-Control: no-store") x 3, "Content-Type: application/json(;\\s*charset=utf-8)?"]
--- response_body_filters eval
[[\&AQ::canon],
 [\&AQ::Workflow::brief, AQ::append(sub { AQ::Workflow::state_of('flow') })],
 [\&AQ::Workflow::answer, AQ::append(sub { AQ::Workflow::state_of('flow') })],
 [\&AQ::canon]]
--- response_body eval
[qq({"item":{"claimed_at":"<ts>","id":"<item:flow>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":{"label":"flow"},"queue_id":"<queue:flow>","version":1},"success":true}\n),
 "claimed flow v1, lease 900s\nclaimed v1 by flow\n",
 qq({"item":{"id":"<item:flow>","lease_expires_at":null,"queue_id":"<queue:flow>","status":"completed","version":2},"success":true}\n)
 . qq(completed v2, result {"label": "ok"}\n),
 AQ::error_body('no_items_available')]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: transaction mode, prepare on: 404 queue_not_found, 401 invalid_api_key with WWW-Authenticate (both answered by the database through PgBouncer)
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_PGB";
    annotation_queue_statement_timeout local;
    annotation_queue_prepare on;
--- request eval
[AQ::claim_req($::unknown_queue), AQ::claim_req($::q{flow})]
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
