package AQ::PgBouncer::Checks;

# What the PgBouncer suites share (t/topology/160-pgbouncer.t, PgBouncer
# 1.18; t/manual/pgbouncer-prepared.t, 1.21 and later): a claim and its
# outcome, the server's log and locks, the error log, and the check that
# PostgreSQL itself ends a statement through the pooler.

use strict;
use warnings;

use AQ;
use AQ::Faults;
use Exporter 'import';
use Test::More;    # no plan here: the suites have theirs
use Time::HiRes qw(time);

our @EXPORT_OK = qw(claim lock_waiters timeout_cancels log_errors
                    statement_timeout_through drain);

# One claim on a new client connection: (outcome, seconds, body, headers).
sub claim {
    my ($ngx, $queue, $key) = @_;
    my $c = AQ::Client->new(port => $ngx->port, timeout => 20);
    my $t0 = time;
    my ($status, $h, $body, $err) = $c->claim($queue, $key);
    return (AQ::Faults::outcome($status, $body, $err), time - $t0, $body, $h);
}

# Backends of the suite's database waiting on a lock (the module's claims
# behind AQ::Faults::lock_items; the locker itself does not wait).
sub lock_waiters {
    return scalar AQ::Faults::db()->selectrow_array(
        q{SELECT count(*) FROM pg_stat_activity
           WHERE datname = current_database() AND wait_event_type = 'Lock'});
}

# Lines of the server's log that say statement_timeout cancelled a
# statement.
sub timeout_cancels {
    my $n = () = AQ::Faults::pg_log() =~ /ERROR:  canceling statement due to statement timeout/g;
    return $n;
}

# The error log's lines at [error] and above, but those matching $allow.
sub log_errors {
    my ($ngx, $allow) = @_;
    return [grep { /\[(?:error|alert|crit|emerg)\]|exited on signal/ && !($allow && /$allow/) }
            split /\n/, $ngx->error_log];
}

# The claim blocks on a lock held on a direct connection; nginx answers 504
# at its query timeout and closes its connection to PgBouncer; only
# statement_timeout can end the statement while the lock is held.  With
# control => 1 (annotation_queue_statement_timeout off) the statement
# lingers, and commits once the lock goes: the check can tell the server's
# timeout from nginx's.  Options: what (the tests' prefix), ngx (its
# claims go through PgBouncer), queue and ids (4 items enqueued), key (a
# name -> key function), timeout (the query timeout, s), late (how late an
# answer may come, s), control.
sub statement_timeout_through {
    my (%o) = @_;
    my ($what, $ngx, $queue, $ids, $control) = @o{qw(what ngx queue ids control)};
    my ($key_of, $TIMEOUT, $LATE) = @o{qw(key timeout late)};

    my ($warm, undef, $wb) = claim($ngx, $queue, $key_of->("$what warm"));
    is($warm, '200 item', "$what: a first claim answers 200") or diag $wb;

    my $cancels = timeout_cancels();
    my $locker = AQ::Faults::lock_items(AQ::Faults::session());
    my ($out, $took, $body, $h) = claim($ngx, $queue, $key_of->("$what blocked"));
    is($out, '504 query_timeout', "$what: a claim blocked by a row lock gets 504 query_timeout")
        or diag $body;
    like($h->{'content-type'} // '', qr{^application/json}, "$what: ... as JSON");
    cmp_ok($took, '<', $TIMEOUT + $LATE, "$what: ... at the query timeout ("
                                         . sprintf('%.3f s', $took) . ')');

    if (!$control) {
        my $gone = AQ::Faults::wait_until(5, sub {
            lock_waiters() == 0 && timeout_cancels() > $cancels });
        ok($gone, "$what: with the lock still held, PostgreSQL cancelled the statement itself: "
                  . '"canceling statement due to statement timeout" in its log, '
                  . 'no backend waits on the lock')
            or diag 'lock waiters ' . lock_waiters() . ', cancels ' . timeout_cancels()
                    . " (before $cancels)";
        is(timeout_cancels(), $cancels + 1, "$what: ... exactly one statement cancelled");
    } else {
        Time::HiRes::sleep(1);
        is(lock_waiters(), 1, "$what: 1 s after the 504 the statement still waits on the lock "
                              . '(so the check can tell the server\'s timeout from nginx\'s)');
        is(timeout_cancels(), $cancels, "$what: ... and PostgreSQL cancelled nothing");
    }
    $locker->rollback;

    if ($control) {
        # the lingering statement runs once the lock is gone, and commits
        my $key_id = AQ::key_id($key_of->("$what blocked"));
        ok(AQ::Faults::wait_until(5, sub {
               (AQ::item($ids->[1])->{claimed_by} // '') eq $key_id }),
           "$what: once the lock is gone, the lingering statement commits the claim "
           . 'answered 504 (what the server-side timeout prevents)');
    } else {
        is_deeply(AQ::counts($queue), { available => 3, claimed => 1, completed => 0 },
                  "$what: the cancelled claim took nothing");
    }
    my ($next, undef, $nb) = claim($ngx, $queue, $key_of->("$what next"));
    is($next, '200 item', "$what: the next claim answers 200") or diag $nb;
    is_deeply([AQ::Faults::claim_problems($key_of->("$what next"), $nb)], [],
              "$what: ... held by its key at the version answered");
    $ngx->stop;
    is_deeply(log_errors($ngx, qr/PostgreSQL query timed out, closing the connection/), [],
              "$what: no error in the error log but the query timeout's");
}

# $clients clients of $org drain $queue ($items items) through $ngx: fresh
# keys from one pool, one kept-alive connection each, until their first
# 409.  Each client's { claims => [[key, item, version], ...], errors,
# connects, answers, empty_at, out_of_keys }.
sub drain {
    my ($org, $ngx, $queue, $items, $clients) = @_;
    my $pool = AQ::key_pool($org, $items + 2 * $clients);
    return AQ::parallel($clients, sub {
        my $c = AQ::Client->new(port => $ngx->port, timeout => 20);
        my %r = (claims => [], errors => [], connects => 0, answers => 0);
        while (defined(my $key = $pool->take)) {
            $r{connects}++ unless $c->connected;
            my ($status, undef, $body, $err) = $c->claim($queue, $key);
            $r{answers}++;
            my $doc = AQ::Faults::decode($body);
            if ($status == 200 && $doc && $doc->{success} && ref $doc->{item}) {
                push @{ $r{claims} }, [$key, $doc->{item}{id}, $doc->{item}{version}];
            } elsif ($status == 409 && (AQ::Faults::error_code($body) // '') eq 'no_items_available') {
                $r{empty_at} = time;
                return \%r;
            } else {
                push @{ $r{errors} }, AQ::Faults::outcome($status, $body, $err);
                last if @{ $r{errors} } >= 3;
            }
        }
        $r{out_of_keys} = 1 unless @{ $r{errors} };
        return \%r;
    });
}

1;
