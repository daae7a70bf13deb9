# Long-polling claims: "Prefer: wait=N" (RFC 7240) on a claim that finds
# nothing claimable waits up to N seconds (capped by
# annotation_queue_max_wait) and answers 200 as soon as an item becomes
# claimable, else 409 when the wait ends; both with Preference-Applied.
#
# A standalone nginx (one worker unless said) with the status page, which
# counts the parked waiters: every test waits for the waiters to show there
# (AQ::LongPoll::wait_parked) before it makes an item claimable, and for
# the answer itself; nothing sleeps for synchronisation, and no test
# asserts a latency (only that an answer came before the wait's end).
#
# What must hold:
#   - Prefer parsing: "wait=5", "respond-async, wait=5", names in any case,
#     spaces around "=", a quoted value, a wait above max_wait (capped in
#     Preference-Applied), wait=0 and garbage (ignored: 409 at once, no
#     Preference-Applied), a location with annotation_queue_max_wait 0;
#   - an enqueue, a release, a skip, a requeue and an expired lease (a
#     queue with a 2 s lease) each wake a parked waiter, which gets the
#     item before its wait ends;
#   - first come, first served: two waiters, one item: the first to park
#     gets it, the second keeps waiting and gets the next;
#   - a client that goes away while it waits frees its place;
#   - the wait ends empty: 409 no_items_available with Preference-Applied,
#     not before its end;
#   - 1,000 waiting clients, then 1,000 items in one statement: each client
#     gets exactly one item, no item twice;
#   - the LISTEN connection terminated (pg_terminate_backend): the waiters
#     claim once more, the listener reconnects, a later enqueue still wakes;
#   - a reload (HUP) while clients wait: each is answered (200 or 409), the
#     old worker exits;
#   - no [error], [crit], [alert] or [emerg] in the error log.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use AQ::LongPoll;
use Test::More;
use Time::HiRes qw(time);

my $org = AQ::org('longpoll');
my @keys = @{ AQ::keys_for($org, 1200) };
my $k = 0;
sub key { return $keys[$k++] }

# 1,000 claims arrive at once: the pool's wait list must hold them
my $ngx = AQ::LongPoll::start(workers => 1, pool_size => 4,
                              max_wait => '30s',
                              http => 'annotation_queue_max_waiting 2048;');

sub waiter { return AQ::LongPoll::wait_claim($ngx, @_) }
sub parked { return AQ::LongPoll::wait_parked($ngx, @_) }
sub outcome { return AQ::LongPoll::outcome($_[0]) }
sub applied { return $_[0]{headers}{'preference-applied'} // '(none)' }

# ---------------------------------------------------------------------------
# Prefer parsing: on a queue with items a claim answers at once, with the
# wait it was granted in Preference-Applied.

my $full = AQ::queue($org, 'full');
AQ::enqueue_many($full, 20);

for my $case (['wait=5', 'wait=5'],
              ['respond-async, wait=5', 'wait=5'],
              ['WAIT=5', 'wait=5'],
              ['Wait = 7 ; foo=bar', 'wait=7'],
              ['handling=lenient, wait="3"', 'wait=3'],
              ['wait=600', 'wait=30'],
              ['wait=5, wait=9', 'wait=5'],
              ['wait=0', '(none)'])
{
    my ($prefer, $want) = @$case;
    my $res = waiter($full, key(), $prefer)->read_response;
    is(outcome($res) =~ /^200 [0-9a-f-]{36}$/ ? 'item' : outcome($res), 'item',
       "Prefer: $prefer: a queue with items answers 200 with an item");
    is(applied($res), $want, "Prefer: $prefer: Preference-Applied $want");
}

# Garbage is ignored: on an empty queue the claim answers 409 at once (its
# client gives up after 3 s, well before any wait it could be granted).

my $empty = AQ::queue($org, 'empty');

for my $prefer ('wait=abc', 'wait=', 'wait=5x', 'waiting=5', 'wait=-1',
                'wait=0', 'respond-async')
{
    my $res = waiter($empty, key(), $prefer, timeout => 3)->read_response;
    is(outcome($res), '409 no_items_available',
       "Prefer: $prefer on an empty queue: 409 at once");
    is(applied($res), '(none)', "Prefer: $prefer: no Preference-Applied");
}

{
    my $res = waiter($empty, key(), 'wait=5', timeout => 3,
                     port => $ngx->{sport},
                     uri => $AQ::LongPoll::URI{nowait})->read_response;
    is(outcome($res), '409 no_items_available',
       'annotation_queue_max_wait 0: wait=5 answers 409 at once');
    is(applied($res), '(none)', 'annotation_queue_max_wait 0: no Preference-Applied');
}

# ---------------------------------------------------------------------------
# What wakes a waiter.

sub woken_by {
    my ($what, $queue, $key, $make) = @_;
    my $c = waiter($queue, $key, 'wait=25');
    ok(parked(1), "$what: the waiter parks (status page: 1 waiter)");
    my $item = $make->();
    my $res = $c->read_response;
    my $elapsed = time - $c->{sent_at};
    is(outcome($res), "200 $item", "$what: the waiter gets the item");
    is(applied($res), 'wait=25', "$what: Preference-Applied wait=25");
    ok($elapsed < 25, "$what: answered before its wait ended");
    ok(parked(0), "$what: no waiter left");
}

{
    my $q = AQ::queue($org, 'enqueue');
    woken_by('enqueue', $q, key(), sub { AQ::enqueue($q, 'enq', { n => 1 }) });
}

{
    my $q = AQ::queue($org, 'release');
    AQ::enqueue($q, 'rel', { n => 1 });
    my $holder = key();
    my $it = AQ::LongPoll::claim_now($ngx, $q, $holder);
    ok($it, 'release: the holder claims the only item');
    woken_by('release', $q, key(), sub {
        my ($st) = AQ::LongPoll::act($ngx, 'release', $holder, $it->{id},
                                     $it->{version});
        is($st, 200, 'release: the holder releases it');
        return $it->{id};
    });
}

{
    my $q = AQ::queue($org, 'skip');
    AQ::enqueue($q, 'skp', { n => 1 });
    my $holder = key();
    my $it = AQ::LongPoll::claim_now($ngx, $q, $holder);
    ok($it, 'skip: the holder claims the only item');
    woken_by('skip', $q, key(), sub {
        my ($st) = AQ::LongPoll::act($ngx, 'skip', $holder, $it->{id},
                                     $it->{version});
        is($st, 200, 'skip: the holder skips it');
        return $it->{id};
    });
}

{
    my $q = AQ::queue($org, 'requeue');
    my $id = AQ::enqueue($q, 'req', { n => 1 });
    AQ::dbh()->do(q{UPDATE annotation_queue.items SET status = 'failed'
                     WHERE id = ?}, undef, $id);
    woken_by('requeue', $q, key(), sub {
        my ($n) = AQ::dbh()->selectrow_array(
            'SELECT annotation_queue.requeue(?)', undef, $id);
        is($n, 1, 'requeue: the failed item is put back');
        return $id;
    });
}

{
    my $q = AQ::queue($org, 'lease', lease => '2 seconds');
    AQ::enqueue($q, 'lse', { n => 1 });
    my $holder = key();
    my $it = AQ::LongPoll::claim_now($ngx, $q, $holder);
    ok($it, 'expired lease: the holder claims the only item (2 s lease)');
    # the waiter's 409 tells nginx when that lease ends: nothing else wakes it
    woken_by('expired lease', $q, key(), sub { return $it->{id} });
}

# ---------------------------------------------------------------------------
# First come, first served; a client that goes away frees its place.

{
    my $q = AQ::queue($org, 'fifo');
    my $first = waiter($q, key(), 'wait=25');
    ok(parked(1), 'FIFO: the first waiter parks');
    my $second = waiter($q, key(), 'wait=25');
    ok(parked(2), 'FIFO: the second waiter parks');
    my $a = AQ::enqueue($q, 'fifo-1', { n => 1 });
    is(outcome($first->read_response), "200 $a",
       'FIFO: the first to park gets the first item');
    ok(parked(1), 'FIFO: the second still waits (1 waiter)');
    ok(!AQ::Faults::answered_yet($second), 'FIFO: the second has no answer yet');
    my $b = AQ::enqueue($q, 'fifo-2', { n => 2 });
    is(outcome($second->read_response), "200 $b",
       'FIFO: the second gets the next item');
}

{
    my $q = AQ::queue($org, 'abort');
    my $gone = waiter($q, key(), 'wait=25');
    ok(parked(1), 'abort: the first waiter parks');
    my $next = waiter($q, key(), 'wait=25');
    ok(parked(2), 'abort: the second waiter parks');
    $gone->disconnect;
    ok(parked(1), 'abort: the client that went away left its place');
    my $a = AQ::enqueue($q, 'abort-1', { n => 1 });
    is(outcome($next->read_response), "200 $a",
       'abort: the next waiter gets the item');
}

# ---------------------------------------------------------------------------
# The wait ends empty.

{
    my $c = waiter($empty, key(), 'wait=2');
    my $res = $c->read_response;
    my $elapsed = time - $c->{sent_at};
    is(outcome($res), '409 no_items_available',
       'wait=2 on an empty queue: 409 no_items_available when it ends');
    is(applied($res), 'wait=2', 'wait=2 on an empty queue: Preference-Applied wait=2');
    ok($elapsed >= 1.9, 'wait=2 on an empty queue: not answered before the wait ended');
    my $d = AQ::LongPoll::body($res);
    is_deeply([$d->{success}, $d->{error}{code}], [JSON::PP::false(), 'no_items_available'],
              'wait=2 on an empty queue: the JSON error body');
}

# ---------------------------------------------------------------------------
# 1,000 waiting clients, then 1,000 items in one statement.

{
    my $N = 1000;
    my $q = AQ::queue($org, 'thousand');
    my $t0 = time;
    my @c = map { waiter($q, key(), 'wait=30', timeout => 60) } 1 .. $N;
    ok(parked($N, 15), "$N clients: all $N park");
    note sprintf '%d clients parked in %.2f s', $N, time - $t0;
    $t0 = time;
    my $ids = AQ::enqueue_many($q, $N);
    my (%got, %outcomes, $twice);
    for my $c (@c) {
        my $o = outcome($c->read_response);
        $c->disconnect;
        if ($o =~ /^200 (\S+)$/) {
            $twice++ if $got{$1}++;
            $outcomes{200}++;
        } else {
            $outcomes{$o}++;
        }
    }
    note sprintf '%d items handed out in %.2f s', $N, time - $t0;
    is_deeply(\%outcomes, { 200 => $N }, "$N clients: each gets 200 with an item");
    is($twice // 0, 0, "$N clients: no item twice");
    is_deeply([sort keys %got], [sort @$ids], "$N clients: every item was handed out");
    my $held = AQ::dbh()->selectrow_array(
        q{SELECT count(DISTINCT claimed_by) FROM annotation_queue.items
           WHERE queue_id = ? AND status = 'claimed'}, undef, $q);
    is($held, $N, "$N clients: the database has $N items held by $N keys");
    ok(parked(0), "$N clients: no waiter left");
}

# ---------------------------------------------------------------------------
# The listener terminated.

{
    my $q = AQ::queue($org, 'terminate');
    my $c = waiter($q, key(), 'wait=25');
    ok(parked(1), 'listener terminated: a waiter parks');
    my $old = AQ::Faults::wait_until(5, sub { @{ AQ::LongPoll::listeners() } == 1 });
    ok($old, 'listener terminated: one LISTEN connection in pg_stat_activity');
    my ($pid) = @{ AQ::LongPoll::listeners() };
    my $wakeups = AQ::LongPoll::gauges($ngx)->{wakeups};
    AQ::dbh()->do('SELECT pg_terminate_backend(?)', undef, $pid);
    ok(AQ::Faults::wait_until(10, sub {
           AQ::LongPoll::gauges($ngx)->{wakeups} > $wakeups }),
       'listener terminated: the waiter is woken to claim once more');
    ok(AQ::Faults::wait_until(10, sub {
           my $l = AQ::LongPoll::listeners();
           @$l == 1 && $l->[0] != $pid }),
       'listener terminated: the listener reconnects');
    ok(parked(1), 'listener terminated: the waiter waits on (1 waiter)');
    ok(!AQ::Faults::answered_yet($c), 'listener terminated: no answer yet');
    my $a = AQ::enqueue($q, 'term-1', { n => 1 });
    is(outcome($c->read_response), "200 $a",
       'listener terminated: a later enqueue still wakes the waiter');
    ok(AQ::Faults::log_count($ngx, qr/LISTEN connection was lost/) >= 1,
       'listener terminated: the loss is logged');
}

# ---------------------------------------------------------------------------
# A reload while clients wait.

{
    my $q = AQ::queue($org, 'reload');
    my @c = map { waiter($q, key(), 'wait=30') } 1 .. 3;
    ok(parked(3), 'reload: three waiters park');
    my $old = AQ::Faults::worker_pids($ngx);
    is(scalar @$old, 1, 'reload: one worker before');
    kill 'HUP', $ngx->{pid};
    my @o = map { outcome($_->read_response) } @c;
    is_deeply(\@o, [('409 no_items_available') x 3],
              'reload: each waiter is answered (409, nothing to claim)');
    ok(AQ::Faults::wait_until(10, sub { !grep { AQ::Faults::alive($_) } @$old }),
       'reload: the old worker exits');
    my $c = waiter($q, key(), 'wait=25');
    ok(parked(1), 'reload: a new worker takes waiters');
    my $a = AQ::enqueue($q, 'reload-1', { n => 1 });
    is(outcome($c->read_response), "200 $a", 'reload: and wakes them');
}

AQ::stop_nginx($ngx);

my @bad = grep { /\[(error|crit|alert|emerg)\]/ } split /\n/, $ngx->error_log;
is_deeply(\@bad, [], 'no [error], [crit], [alert] or [emerg] in the error log');

done_testing();
