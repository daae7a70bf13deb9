# PostgreSQL slow: a claim blocked by a lock that another session holds on
# the items table (AQ::Faults::lock_items).
#
#   - It gets 504 query_timeout at annotation_queue_query_timeout (1 s), not
#     before and not much after (2 s later at most, times AQ::slow(): room
#     for a loaded machine, and still a fraction of the client's timeout).
#   - Its connection is dropped, not reused dirty: the backend that ran it
#     goes away, and the next claims (on a pool of one connection, so on its
#     successor) answer their own items, each held by its key in the
#     database at the version answered.
#   - The server-side statement is bounded too: the module connects with
#     options=-c statement_timeout=<query timeout>, so shortly after the 504,
#     while the lock is still held, no statement of nginx's is active any
#     more.  A control run, whose conninfo sets its own statement_timeout of
#     30 s (an "options" in the conninfo replaces the module's), shows the
#     statement lingering behind the lock instead: the check can tell.
#   - The control also shows what a 504 means: the claim may still commit
#     when the server finishes it (the lock goes away before its own
#     statement_timeout); the same key then gets that item back (resume),
#     and nobody else gets it.
#   - Claims waiting for the pool's one connection behind a blocked claim:
#     when the table is locked (the new connection cannot even prepare its
#     statements), each is answered 503 or 504 within connect timeout +
#     query timeout; when the claims block in the executor (a gate,
#     AQ::Faults::close_gate), they run together on the new connection and
#     each gets 504 at the query timeout; none takes an item, and their keys
#     claim normally afterwards.
#   - annotation_queue_max_waiting 0 turns waiting off, not the pool: a
#     claim that finds a connection free (or room to open one) is served;
#     one that finds every connection busy gets 503 pool_saturated at once
#     (while the claim that holds the connection is still unanswered).
#
# Every wait for nginx or PostgreSQL is a wait for a condition
# (AQ::Faults::wait_until, deadlines times AQ::slow()); the bounds on how
# late an answer may come leave a loaded machine seconds of room.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use Test::More;
use Time::HiRes qw(time sleep);

my $org   = AQ::org('slow');
my %k;
sub key_of { my ($name) = @_; return $k{$name} //= AQ::key($org, rater => $name) }

my $TIMEOUT = 1;    # annotation_queue_query_timeout, seconds
my $CONNECT = AQ::Faults::scaled(2);    # annotation_queue_connect_timeout, unless told
my $LATE    = 2 * AQ::slow();    # how late after its timer an answer may come

sub slow_nginx {
    my (%o) = @_;
    my $connect = delete $o{connect} // $CONNECT;
    my $extra = delete $o{extra} // '';
    return AQ::start_nginx(workers => 1, %o, http => <<"_EOC_");
    $extra
    annotation_queue_pool_size 1;
    annotation_queue_connect_timeout ${connect}s;
    annotation_queue_query_timeout ${TIMEOUT}s;
_EOC_
}

# pids of nginx's backends in this database
sub backend_pids { return [map { $_->[0] } @{ AQ::Faults::backend_rows() }] }

sub claim {
    my ($ngx, $queue, $key) = @_;
    my $c = AQ::Client->new(port => $ngx->port, timeout => 10);
    my $t0 = time;
    my ($status, $h, $body, $err) = $c->claim($queue, $key);
    return (AQ::Faults::outcome($status, $body, $err), time - $t0, $body, $h);
}

sub item_of { my $d = AQ::Faults::decode($_[0]); return $d && ref $d->{item} ? $d->{item} : {} }

# The server bounds the statement whichever way the module tells it: in the
# startup options (the default), or set_config() pipelined before each
# statement (annotation_queue_statement_timeout local, the way through a
# pooler), with named statements or unnamed ones (annotation_queue_prepare).
sub server_bounds_the_statement {
    my ($what, $tag, %o) = @_;
    my $queue = AQ::queue($org, "slow-$tag");
    my $ids = AQ::enqueue_many($queue, 5, prefix => "slow-$tag");
    my $ngx = slow_nginx(%o);

    my ($out, undef, $body) = claim($ngx, $queue, key_of("$tag-warm"));
    is($out, '200 item', "$what: a first claim opens the pool's one connection");
    my $before = backend_pids();
    is(scalar @$before, 1, "$what: ... one backend") or diag explain AQ::Faults::backend_rows();

    my $locker = AQ::Faults::lock_items(AQ::Faults::session());
    my ($o504, $took, $b504, $h504) = claim($ngx, $queue, key_of("$tag-blocked"));
    my $answered = time;
    is($o504, '504 query_timeout', "$what: a claim blocked by the lock gets 504 query_timeout")
        or diag $b504;
    like($h504->{'content-type'} // '', qr{^application/json}, "$what: ... as JSON");
    cmp_ok($took, '>=', $TIMEOUT - 0.1, "$what: ... not before the query timeout");
    cmp_ok($took, '<', $TIMEOUT + $LATE, "$what: ... at the query timeout (${TIMEOUT}s), took "
                                         . sprintf('%.3f s', $took));

    # the lock is still held: only statement_timeout can end the statement
    # (PostgreSQL does not notice a closed client while it waits on a lock;
    # the control below shows it still there 1 s after the 504, with the 30 s
    # of its own statement_timeout to go)
    my $gone = AQ::Faults::wait_until(5, sub { AQ::Faults::backends(state => 'active') == 0 });
    my $after = time - $answered;
    ok($gone, "$what: the server ended the statement too: within " . 5 * AQ::slow()
              . ' s of the 504, with the lock still held, no statement of nginx is active')
        or diag explain AQ::Faults::backend_rows();
    note sprintf '%s: no active statement %.3f s after the 504', $what, $after;

    my $dropped = AQ::Faults::wait_until(2, sub {
        my %now = map { $_ => 1 } @{ backend_pids() };
        !$now{ $before->[0] } });
    ok($dropped, "$what: the timed-out connection was closed (its backend is gone)")
        or diag explain AQ::Faults::backend_rows();

    $locker->rollback;

    my ($o1, undef, $b1) = claim($ngx, $queue, key_of("$tag-next"));
    is($o1, '200 item', "$what: once the lock is gone, the next claim answers 200") or diag $b1;
    is(item_of($b1)->{id} // '', $ids->[1], "$what: ... with the next item of the queue")
        or diag $b1;
    is_deeply([AQ::Faults::claim_problems(key_of("$tag-next"), $b1)], [],
              "$what: ... held by its key in the database at the version answered");
    my $now = backend_pids();
    ok(@$now == 1 && $now->[0] != $before->[0], "$what: ... on a new connection")
        or diag explain [$before, $now];

    my ($o2, undef, $b2) = claim($ngx, $queue, key_of("$tag-blocked"));
    is($o2, '200 item', "$what: the key whose claim timed out claims again: 200") or diag $b2;
    is(item_of($b2)->{id} // '', $ids->[2],
       "$what: ... a new item: the cancelled claim took nothing") or diag $b2;
    is(item_of($b2)->{version} // '', 1, "$what: ... at version 1");
    is_deeply([AQ::Faults::claim_problems(key_of("$tag-blocked"), $b2)], [],
              "$what: ... held by that key in the database");

    is_deeply(AQ::counts($queue), { available => 2, claimed => 3, completed => 0 },
              "$what: three items claimed, two left");

    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

server_bounds_the_statement('statement_timeout from the module', 'startup');
server_bounds_the_statement('statement_timeout set locally', 'local',
                            extra => "annotation_queue_statement_timeout local;");
server_bounds_the_statement('statement_timeout set locally, unnamed statements', 'unnamed',
                            extra => "annotation_queue_statement_timeout local;\n"
                                     . "annotation_queue_prepare off;");

# Controls: the statement left unbounded by the server lingers behind the
# lock, so the checks above can tell.
sub statement_lingers {
    my ($what, $tag, %o) = @_;
    my $queue = AQ::queue($org, "slow-$tag");
    my $ids = AQ::enqueue_many($queue, 5, prefix => $tag);
    my $ngx = slow_nginx(%o);

    my ($out) = claim($ngx, $queue, key_of("$tag-c-warm"));
    is($out, '200 item', "$what: a first claim answers 200");
    my $before = backend_pids();

    my $locker = AQ::Faults::lock_items(AQ::Faults::session());
    my ($o504, $took) = claim($ngx, $queue, key_of("$tag-c-blocked"));
    is($o504, '504 query_timeout', "$what: a claim blocked by the lock gets 504 at the query "
                                   . sprintf('timeout (%.3f s)', $took));

    sleep 1;
    my $rows = AQ::Faults::backend_rows();
    is_deeply([map { "$_->[1] $_->[2]" } @$rows], ['active Lock'],
              "$what: 1 s after the 504 its statement still waits on the lock in PostgreSQL "
              . '(so the check above can tell)')
        or diag explain $rows;

    $locker->rollback;    # the lingering statement now runs, and commits
    my $done = AQ::Faults::wait_until(3, sub { AQ::Faults::backends(state => 'active') == 0 });
    ok($done, "$what: once the lock is gone, the statement ends");

    my ($o1, undef, $b1) = claim($ngx, $queue, key_of("$tag-c-next"));
    is($o1, '200 item', "$what: the next claim answers 200") or diag $b1;
    is(item_of($b1)->{id} // '', $ids->[2],
       "$what: ... with its own item (the timed-out claim committed the one before)")
        or diag $b1;
    is_deeply([AQ::Faults::claim_problems(key_of("$tag-c-next"), $b1)], [],
              "$what: ... held by its key in the database at the version answered");
    ok(!grep({ $_ == $before->[0] } @{ backend_pids() }),
       "$what: ... not on the connection that timed out");

    my $late = AQ::item($ids->[1]);
    is($late->{claimed_by} // '', AQ::key_id(key_of("$tag-c-blocked")),
       "$what: the claim answered 504 committed when the lock went away");
    my ($o2, undef, $b2) = claim($ngx, $queue, key_of("$tag-c-blocked"));
    is(item_of($b2)->{id} // '', $ids->[1],
       "$what: ... and its key gets that item back when it claims again (resume)")
        or diag $b2;
    is(item_of($b2)->{version} // '', 1, "$what: ... at version 1");

    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

statement_lingers('control: statement_timeout 30s from the conninfo', 'control',
                  dsn => "$AQ::DSN options='-c statement_timeout=30s'");
statement_lingers('control: annotation_queue_statement_timeout off', 'off',
                  extra => 'annotation_queue_statement_timeout off;');

# Claims wait for the pool's one connection behind a blocked claim.  When
# it times out, the connection is closed and a new one opened for them.
#
# With the items table locked, the new connection cannot even prepare its
# statements (parse analysis locks the tables): the claims that waited are
# answered within the bound the README gives a waiting claim (connect
# timeout + query timeout) with 503 or 504.  (This version answers 503
# database_unavailable: a preparation that times out counts as a failed
# connection.  The new connection's connect timer and the waiting claims'
# own timers end at nearly the same time, connect + query timeout after the
# claims came: when nginx runs late, a claim's own timer may come first,
# and the README's answer to a claim that waited that long is 503
# pool_saturated.)
{
    my $what = 'claims waiting while the table is locked';
    my $queue = AQ::queue($org, 'slow-locked');
    AQ::enqueue_many($queue, 10);
    my $ngx = slow_nginx();
    my ($warm) = claim($ngx, $queue, key_of('l-warm'));
    is($warm, '200 item', "$what: a first claim answers 200");

    my $locker = AQ::Faults::lock_items(AQ::Faults::session());
    my $first = AQ::Client->new(port => $ngx->port, timeout => 15);
    $first->send_request(body => qq({"queue_id":"$queue"}), key => key_of('l-first'));
    ok(AQ::Faults::wait_until(3, sub { AQ::Faults::backends(lock => 1) >= 1 }),
       "$what: a claim runs, blocked by the lock") or diag explain AQ::Faults::backend_rows();
    my $t0 = time;
    my @waiting = map { [AQ::Client->new(port => $ngx->port, timeout => 15), key_of("l-$_")] } 1 .. 5;
    $_->[0]->send_request(body => qq({"queue_id":"$queue"}), key => $_->[1]) for @waiting;
    my $r = $first->read_response;
    is(AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error}), '504 query_timeout',
       "$what: the blocked claim gets 504");

    my (@out, @late);
    for (@waiting) {
        my $w = $_->[0]->read_response;
        my $took = time - $t0;
        my $out = AQ::Faults::outcome($w->{status}, $w->{body}, $w->{error});
        push @out, $out;
        push @late, sprintf('%s after %.3f s', $out, $took) if $took > $CONNECT + $TIMEOUT + $LATE;
    }
    my @bad = grep { !/^(?:503 (?:database_unavailable|pool_saturated)|504 query_timeout)$/ } @out;
    is_deeply(\@bad, [], "$what: the claims that waited get 503 or 504") or diag explain \@out;
    is_deeply(\@late, [], "$what: ... within connect timeout + query timeout");
    note "$what: the claims that waited got " . join ', ', @out;
    $locker->rollback;

    is_deeply(AQ::counts($queue), { available => 9, claimed => 1, completed => 0 },
              "$what: none of them took an item");
    my @again = map { (claim($ngx, $queue, $_))[0] } map({ $_->[1] } @waiting), key_of('l-first');
    is_deeply(\@again, [('200 item') x 6], "$what: once the lock is gone, their keys claim: 200 each");

    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

# The same with claims blocked while they run (AQ::Faults::close_gate: the
# statement is prepared, the claim waits when it updates its item): the new
# connection prepares, and the claims that waited go out on it together
# (one statement for the claims of one queue, in this version); blocked in
# turn, each of them gets 504 query_timeout at the query timeout after it
# got the connection, none takes an item, and the connection is dropped.
# The connect timeout is long here: the claims' own wait (connect + query
# timeout) must not end before they got the new connection, even when
# nginx runs late.
AQ::Faults::install_gate();
{
    my $what = 'claims waiting behind a blocked one';
    my $queue = AQ::queue($org, 'slow-gate');
    AQ::enqueue_many($queue, 10);
    my $ngx = slow_nginx(connect => AQ::Faults::scaled(5));
    my ($warm) = claim($ngx, $queue, key_of('g-warm'));
    is($warm, '200 item', "$what: a first claim answers 200");
    my %old = map { $_ => 1 } @{ backend_pids() };

    my $gate = AQ::Faults::close_gate(AQ::Faults::session());
    my $first = AQ::Client->new(port => $ngx->port, timeout => 15);
    $first->send_request(body => qq({"queue_id":"$queue"}), key => key_of('g-first'));
    ok(AQ::Faults::wait_until(3, sub { AQ::Faults::backends(lock => 1) >= 1 }),
       "$what: a claim runs, held at the gate") or diag explain AQ::Faults::backend_rows();
    my $t0 = time;
    my @waiting = map { [AQ::Client->new(port => $ngx->port, timeout => 15), key_of("g-$_")] } 1 .. 5;
    $_->[0]->send_request(body => qq({"queue_id":"$queue"}), key => $_->[1]) for @waiting;

    my $r = $first->read_response;
    is(AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error}), '504 query_timeout',
       "$what: the blocked claim gets 504");
    # (the backend of the claim that timed out may linger a moment)
    my $second = AQ::Faults::wait_until(3, sub {
        my @rows = grep { !$old{ $_->[0] } } @{ AQ::Faults::backend_rows() };
        @rows == 1 && $rows[0][2] eq 'Lock' ? $rows[0] : undef });
    ok($second, "$what: the claims that waited run on a new connection, blocked in turn")
        or diag explain AQ::Faults::backend_rows();
    note "$what: they went " . ($second && $second->[3] =~ /unnest/ ? 'as one batch statement'
                                                                  : 'one by one');
    my (@out, @took);
    for (@waiting) {
        my $w = $_->[0]->read_response;
        push @out, AQ::Faults::outcome($w->{status}, $w->{body}, $w->{error});
        push @took, time - $t0;
    }
    is_deeply(\@out, [('504 query_timeout') x 5],
              "$what: each of the claims that waited gets 504 query_timeout");
    my @late = grep { $_ > 2 * $TIMEOUT + $LATE } @took;
    is_deeply(\@late, [], "$what: ... at the query timeout after they got the connection "
                          . sprintf('(%.3f s .. %.3f s after they were sent)', $took[0], $took[-1]));
    my $idle = AQ::Faults::wait_until(2, sub { AQ::Faults::backends(state => 'active') == 0 });
    ok($idle, "$what: ... and no statement of theirs lingers behind the gate")
        or diag explain AQ::Faults::backend_rows();
    ok(!grep({ $second && $_->[0] == $second->[0] } @{ AQ::Faults::backend_rows() }),
       "$what: ... their connection was dropped");
    AQ::Faults::open_gate($gate);

    is_deeply(AQ::counts($queue), { available => 9, claimed => 1, completed => 0 },
              "$what: none of the timed-out claims took an item");
    my (@again, @problems);
    for my $k ((map { $_->[1] } @waiting), key_of('g-first')) {
        my ($o, undef, $b) = claim($ngx, $queue, $k);
        push @again, $o;
        push @problems, AQ::Faults::claim_problems($k, $b) if $o eq '200 item';
        push @problems, 'version ' . item_of($b)->{version} if (item_of($b)->{version} // 1) != 1;
    }
    is_deeply(\@again, [('200 item') x 6], "$what: once the gate opens, their keys claim: 200 each");
    is_deeply(\@problems, [], "$what: ... each a new item at version 1, held by its key");

    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

# Waiting turned off: a claim that finds every connection busy gets 503
# pool_saturated at once instead of waiting for the slow one; a claim that
# finds a connection free, or room to open one, is served (README: "0
# disables waiting", not the pool).
{
    my $what = 'annotation_queue_max_waiting 0';
    my $queue = AQ::queue($org, 'no-waiting');
    AQ::enqueue_many($queue, 5);
    # (the slow claim's query timeout must outlast the steps that wait
    # while it is blocked)
    my $query_timeout = AQ::Faults::scaled(10);
    my $ngx = AQ::start_nginx(workers => 1, http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_max_waiting 0;
    annotation_queue_query_timeout ${query_timeout}s;
_EOC_

    my ($o1, undef, $b1) = claim($ngx, $queue, key_of('nw-first'));
    is($o1, '200 item', "$what: a first claim opens the pool's connection and answers 200")
        or diag $b1;
    my ($o2, undef, $b2) = claim($ngx, $queue, key_of('nw-second'));
    is($o2, '200 item', "$what: the next claim reuses it: 200") or diag $b2;

    my $locker = AQ::Faults::lock_items(AQ::Faults::session());
    my $slow = AQ::Client->new(port => $ngx->port, timeout => 10);
    $slow->send_request(body => qq({"queue_id":"$queue"}), key => key_of('nw-slow'));
    ok(AQ::Faults::wait_until(3, sub { AQ::Faults::backends(lock => 1) >= 1 }),
       "$what: a claim holds the connection, blocked by the lock")
        or diag explain AQ::Faults::backend_rows();
    my ($o3, $took, $b3, $h3) = claim($ngx, $queue, key_of('nw-busy'));
    is($o3, '503 pool_saturated', "$what: while the connection is busy, a claim gets 503 "
                                  . 'pool_saturated') or diag $b3;
    # a claim that waited would be answered after the slow one at the
    # earliest (when it ends, or at its query timeout)
    ok(!AQ::Faults::answered_yet($slow), "$what: ... at once: the slow claim is not answered yet");
    note sprintf '%s: the 503 came after %.3f s', $what, $took;
    like($h3->{'retry-after'} // '', qr/^\d+$/, "$what: ... with Retry-After");
    $locker->rollback;
    my $r = $slow->read_response;
    is(AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error}), '200 item',
       "$what: the slow claim answers 200 once the lock is gone");

    $ngx->stop;
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

done_testing();
