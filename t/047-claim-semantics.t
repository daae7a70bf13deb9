# The claim's exact semantics under concurrency, through nginx.
#
#   - Batch priority inversion: with available items of priorities 2 and 0
#     and an expired item of priority 1, a batch of two hands out 2, then
#     the expired 1, as successive single claims do (never the 0).
#   - No 409 while an item is claimable: two claims racing over one
#     available and one expired item both get 200, round after round (a
#     claim that takes one of them must not hold the other locked).
#   - A batch that rolls back with deadlock_detected (40P01) or
#     serialization_failure (40001) commits nothing: its claims run again
#     one by one and answer 200, not 500.
#   - Resume at the instant of expiry: while another key's claim of the
#     item is in flight, the old holder's claim does not answer that item.
#   - A batch whose result has another number of rows than the requests
#     it answers fails every one of them (500 internal_error, the cause
#     logged) instead of answering them by position.
#
# Batches are made deterministic as in t/055-batch.t: a claim held inside
# PostgreSQL by a gate (AQ::Faults::install_gate) keeps the pool's one
# connection busy while the claims to batch wait for it, and the status
# page says when they all wait.  Faults are injected by triggers of the
# suite's own database, never by a stand-in for PostgreSQL.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use IO::Select;
use JSON::PP ();
use Test::More;

my $org = AQ::org('semantics');
my $JSON = JSON::PP->new->utf8;
my $dbh = AQ::dbh();

AQ::Faults::install_gate();
my $gate = AQ::Faults::session();

# A fault of our own: the batch statement (the one that unnests its keys)
# fails with the SQLSTATE in public.aq_fail as many times as it says (a
# sequence counts them: it is not rolled back with the statement).
$dbh->do('CREATE TABLE public.aq_fail (code text NOT NULL, times int NOT NULL)');
$dbh->do('CREATE SEQUENCE public.aq_fail_seq');
$dbh->do(<<'_SQL_');
CREATE FUNCTION public.aq_fail() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    f public.aq_fail;
BEGIN
    IF current_query() LIKE '%unnest($1::text[])%' THEN
        SELECT * INTO f FROM public.aq_fail LIMIT 1;
        IF FOUND AND nextval('public.aq_fail_seq') <= f.times THEN
            RAISE EXCEPTION 'injected by t/047' USING ERRCODE = f.code;
        END IF;
    END IF;
    RETURN NEW;
END
$$
_SQL_
$dbh->do('CREATE TRIGGER aq_fail BEFORE UPDATE ON annotation_queue.items '
         . 'FOR EACH ROW EXECUTE FUNCTION public.aq_fail()');

sub decode { my $d = eval { $JSON->decode($_[0] // '') }; return ref $d eq 'HASH' ? $d : {} }
sub item_of { my $it = decode($_[0]{body})->{item}; return ref $it eq 'HASH' ? $it : {} }
sub outcome { my ($r) = @_; return AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error}) }

# nginx of one worker whose pool has $size connections; a second server on
# $ngx->{port2} has the status page.
sub start {
    my (%o) = @_;
    my $port2 = AQ::free_port();
    my $ngx = AQ::start_nginx(workers => 1, http => <<"_EOC_");
    annotation_queue_pool_size $o{size};
    annotation_queue_connect_timeout 10s;
    annotation_queue_query_timeout 60s;

    server {
        listen 127.0.0.1:$port2;

        location = /status {
            annotation_queue_status;
        }
    }
_EOC_
    $ngx->{port2} = $port2;
    return $ngx;
}

sub gauge {
    my ($ngx, $re) = @_;
    my ($status, undef, $body) = AQ::Client->new(port => $ngx->{port2})
        ->request(method => 'GET', uri => '/status');
    return -1 unless $status == 200;
    return $body =~ $re ? $1 : -1;
}

sub waiting {
    return gauge($_[0], qr/^annotation_queue_waiting\{pool="0",worker="all"\} (\d+)$/m);
}

sub idle {
    return gauge($_[0], qr/^annotation_queue_connections\{pool="0",worker="all",state="idle"\} (\d+)$/m);
}

sub send_claim {
    my ($ngx, $queue, $key) = @_;
    my $c = AQ::Client->new(port => $ngx->port, timeout => 30);
    my $err = $c->send_request(body => qq({"queue_id":"$queue"}), key => $key);
    die "send: $err" if $err;
    return $c;
}

sub log_lines {
    my ($ngx, $re) = @_;
    return [grep { $_ =~ $re } split /\n/, $ngx->error_log];
}

# Claims $queue with each of @keys in one batch: a claim of another queue
# holds the pool's one connection behind the gate, the claims wait for it
# in this order, the gate opens.  $before runs once they all wait.  Returns
# the answers, in order, and whether the claim ahead answered 200.
my $blocker_q = AQ::queue($org, 'blocker');
AQ::enqueue_many($blocker_q, 20);

sub batch_of {
    my ($ngx, $queue, $keys, $before) = @_;
    AQ::Faults::close_gate($gate);
    my $head = send_claim($ngx, $blocker_q, AQ::key($org));
    my $held = AQ::Faults::wait_until(10, sub { AQ::Faults::backends(lock => 1) == 1 });
    my @c = map { send_claim($ngx, $queue, $_) } @$keys;
    my $all = AQ::Faults::wait_until(10, sub { waiting($ngx) == @$keys });
    $before->() if $before;
    AQ::Faults::open_gate($gate);
    my $ahead = $head->read_response->{status};
    return ([map { $_->read_response } @c], $held && $all && $ahead == 200);
}

sub expire {
    my ($id, $seconds) = @_;
    $dbh->do(q{UPDATE annotation_queue.items
                  SET status = 'claimed', claimed_by = gen_random_uuid(),
                      claimed_at = now() - interval '1 hour',
                      lease_expires_at = now() - ? * interval '1 second',
                      version = 1, attempts = 1
                WHERE id = ?}, undef, $seconds // 10, $id);
}

# ---------------------------------------------------------------------------

{
    my $what = 'batch priority inversion';
    my %q;
    for my $how (qw(single batch)) {
        my $q = $q{$how} = AQ::queue($org, "inversion-$how");
        AQ::enqueue($q, "$how-2", '{"p": 2}', 2);
        AQ::enqueue($q, "$how-0", '{"p": 0}', 0);
        AQ::enqueue($q, "$how-1", '{"p": 1}', 1);
        expire(AQ::item_id("$how-1"));
    }
    my $ngx = start(size => 1);

    my @single = map { item_of({ body => (AQ::Client->new(port => $ngx->port)
                                          ->claim($q{single}, AQ::key($org)))[2] }) }
                 1 .. 2;
    is_deeply([map { $_->{id} // 'none' } @single],
              [AQ::item_id('single-2'), AQ::item_id('single-1')],
              "$what, control: successive single claims give priority 2, then the "
              . 'expired item of priority 1');

    my @keys = (AQ::key($org), AQ::key($org));
    my ($r, $ok) = batch_of($ngx, $q{batch}, \@keys);
    ok($ok, "$what: two claims waited behind a claim held in PostgreSQL");
    is_deeply([map { outcome($_) } @$r], ['200 item', '200 item'], "$what: both answer 200")
        or diag explain $r;
    is_deeply([map { item_of($_)->{id} // 'none' } @$r],
              [AQ::item_id('batch-2'), AQ::item_id('batch-1')],
              "$what: the batch gives priority 2, then the expired item of priority 1, "
              . 'as successive single claims do (not the available item of priority 0)');
    is_deeply([AQ::claim_answer_problems($q{batch},
                   [map { [$keys[$_], item_of($r->[$_])->{id}, item_of($r->[$_])->{version}] }
                        0 .. 1])],
              [], "$what: each item held by the key it was answered to, at that version");
    is(item_of($r->[0])->{claimed_at} // 'none', item_of($r->[1])->{claimed_at} // '',
       "$what: ... in one batch (one commit: one claimed_at)");
    is(AQ::item('batch-0')->{status}, 'available', "$what: priority 0 is left available");

    $ngx->stop;
    is_deeply(log_lines($ngx, qr/\[(?:error|alert|crit|emerg)\]/), [],
              "$what: no [error] in the error log");
}

# Two claims at once, each on a connection of its own, over one available
# and one expired item: whichever takes one, the other must find the
# other.  A claim that locked the available head to read its priority
# and then took the expired item kept the head locked until it committed:
# the other claim skipped both and answered 409.
#
# First made certain: the first claim is held by the gate when it comes to
# update its item, its locks taken; the second claim runs meanwhile (held
# in turn if it found an item, answered at once if not); the gate opens.
# Then left to chance: both sent at once, round after round.
{
    my $what = 'no 409 while an item is claimable';
    my $ROUNDS = 60;
    my $ngx = start(size => 2);
    my $warm = AQ::queue($org, 'race-warm');
    AQ::enqueue_many($warm, 2);
    my @w = map { send_claim($ngx, $warm, AQ::key($org)) } 1 .. 2;
    $_->read_response for @w;
    ok(AQ::Faults::wait_until(10, sub { idle($ngx) == 2 }),
       "$what: the pool has two connections open and idle");

    my $race = sub {
        my ($pe, $pa, $tag, $held) = @_;
        my $q = AQ::queue($org, "race-$tag");
        my $a = AQ::enqueue($q, undef, '{"race": "available"}', $pa);
        my $e = AQ::enqueue($q, undef, '{"race": "expired"}', $pe);
        expire($e);
        my @keys = (AQ::key($org), AQ::key($org));
        my @c;
        if ($held) {
            AQ::Faults::close_gate($gate);
            push @c, send_claim($ngx, $q, $keys[0]);
            AQ::Faults::wait_until(10, sub { AQ::Faults::backends(lock => 1) == 1 });
            push @c, send_claim($ngx, $q, $keys[1]);
            my $sel = IO::Select->new($c[1]{sock});
            AQ::Faults::wait_until(10, sub {
                $sel->can_read(0) || AQ::Faults::backends(lock => 1) == 2 });
            AQ::Faults::open_gate($gate);
        } else {
            @c = map { send_claim($ngx, $q, $_) } @keys;
        }
        my @r = map { $_->read_response } @c;
        my @out = map { outcome($_) } @r;
        my @got = sort map { item_of($_)->{id} // 'none' } @r;
        my @bad;
        push @bad, "@out" if grep { $_ ne '200 item' } @out;
        push @bad, "items @got" if "@got" ne join ' ', sort $a, $e;
        push @bad, AQ::claim_answer_problems(
            $q, [map { [$keys[$_], item_of($r[$_])->{id}, item_of($r[$_])->{version}] }
                     grep { $r[$_]{status} == 200 } 0 .. 1]);
        return (\@bad, \@out);
    };

    for my $case (['expired above the available item', 1, 0],
                  ['expired at the available item\'s priority', 0, 0],
                  ['expired below the available item', 0, 1]) {
        my ($how, $pe, $pa) = @$case;
        my ($bad) = $race->($pe, $pa, "held-$pe-$pa", 1);
        is_deeply($bad, [], "$what, $how: while the first claim is held in its "
                            . 'transaction, the second takes the other item; both 200');

        my (@bad, %outcomes);
        for my $round (1 .. $ROUNDS) {
            my ($b, $out) = $race->($pe, $pa, "$pe-$pa-$round", 0);
            $outcomes{$_}++ for @$out;
            push @bad, map { "round $round: $_" } @$b;
        }
        is_deeply(\@bad, [], "$what, $how: in $ROUNDS rounds of two claims at once, "
                             . 'both answer 200, one item each, held by their keys')
            or diag explain [\%outcomes, @bad[0 .. ($#bad < 9 ? $#bad : 9)]];
    }

    $ngx->stop;
    is_deeply(log_lines($ngx, qr/\[(?:error|alert|crit|emerg)\]/), [],
              "$what: no [error] in the error log");
}

# The batch statement fails once with the SQLSTATE a deadlock between two
# batches that share keys (or a serialization failure) gives: it rolled
# back, nothing was committed, and each of its claims runs again alone.
for my $code (qw(40P01 40001)) {
    my $what = "a batch that fails with $code";
    my $q = AQ::queue($org, "retry-$code");
    AQ::enqueue_many($q, 4);
    my $ngx = start(size => 1);
    $dbh->do('DELETE FROM public.aq_fail');
    $dbh->do('INSERT INTO public.aq_fail VALUES (?, 1)', undef, $code);
    $dbh->do(q{SELECT setval('public.aq_fail_seq', 1, false)});

    my @keys = (AQ::key($org), AQ::key($org));
    my ($r, $ok) = batch_of($ngx, $q, \@keys);
    ok($ok, "$what: two claims waited behind a claim held in PostgreSQL");
    my ($fired) = $dbh->selectrow_array(
        q{SELECT last_value FROM public.aq_fail_seq WHERE is_called});
    is($fired, 1, "$what: the batch statement ran and failed (once)");
    is_deeply([map { outcome($_) } @$r], ['200 item', '200 item'],
              "$what: its claims, run again one by one, answer 200 (not 500)")
        or diag explain $r;
    is_deeply([AQ::claim_answer_problems($q,
                   [map { [$keys[$_], item_of($r->[$_])->{id}, item_of($r->[$_])->{version}] }
                        0 .. 1])],
              [], "$what: ... one item each, held by its key, at version 1");
    is_deeply(AQ::counts($q), { available => 2, claimed => 2, completed => 0 },
              "$what: two items claimed, none lost to the failed batch");
    $dbh->do('DELETE FROM public.aq_fail');

    $ngx->stop;
    is_deeply(log_lines($ngx, qr/\[(?:error|alert|crit|emerg)\]/), [],
              "$what: no [error] in the error log");
}

# Resume at the instant of expiry.  A key holds an item whose lease it
# still sees live; another key's claim of that item is in flight (its lease
# ended by that claim's clock): the item is locked and updated to the
# other key, not yet committed.  A claim of the old holder whose clock
# still says "live" must not answer that item: it skips the locked item
# and claims another (whose entry in the unique holder index waits for
# the other claim to end).  (The
# instant cannot be made through nginx alone, since the other claim's
# clock must be later than the old holder's while its update comes first:
# a session of the test plays the other claim, doing what its statement
# does.)  If that claim rolls back, the old holder gets its item back
# (its new claim fails on the holder index and runs again, resuming).
for my $end (qw(commit rollback)) {
    my $what = "resume while another key's claim of the item is in flight ($end)";
    my $q = AQ::queue($org, "instant-$end");
    my $ids = AQ::enqueue_many($q, 2);
    my ($k, $l) = (AQ::key($org), AQ::key($org));
    my $ngx = start(size => 1);

    my ($status, undef, $body) = AQ::Client->new(port => $ngx->port)->claim($q, $k);
    is(item_of({ body => $body })->{id} // 'none', $ids->[0],
       "$what: the key holds the first item");

    my $other = AQ::Faults::session();
    $other->begin_work;
    $other->do(q{UPDATE annotation_queue.items
                    SET claimed_by = ?, claimed_at = now(),
                        lease_expires_at = now() + interval '15 minutes',
                        version = version + 1, attempts = attempts + 1
                  WHERE id = ?}, undef, AQ::key_id($l), $ids->[0]);
    my $c = send_claim($ngx, $q, $k);
    my $sel = IO::Select->new($c->{sock});
    my $stage = AQ::Faults::wait_until(10, sub {
        $sel->can_read(0) ? 'answered' : AQ::Faults::backends(lock => 1) ? 'waits' : '' });
    note "$what: the old holder's claim $stage before the other claim ended";
    $end eq 'commit' ? $other->commit : $other->rollback;
    my $r = $c->read_response;

    if ($end eq 'commit') {
        is(outcome($r), '200 item', "$what: the old holder's claim answers 200");
        isnt(item_of($r)->{id} // 'none', $ids->[0],
             "$what: ... not with the item the other key took (never both told they hold it)");
        is(item_of($r)->{id} // 'none', $ids->[1], "$what: ... but with the next item");
        is_deeply([AQ::claim_answer_problems($q,
                       [[$k, item_of($r)->{id}, item_of($r)->{version}]])],
                  [], "$what: ... which it holds in the database");
        is(AQ::item($ids->[0])->{claimed_by}, AQ::key_id($l),
           "$what: the other key holds the first item");
    } else {
        is(outcome($r), '200 item', "$what: the old holder's claim answers 200");
        is(item_of($r)->{id} // 'none', $ids->[0], "$what: ... with its item, resumed");
        is(item_of($r)->{version} // 'none', 1, "$what: ... at its version");
        is(AQ::counts($q)->{claimed}, 1, "$what: ... and takes no second item");
    }
    $other->disconnect;

    $ngx->stop;
    is_deeply(log_lines($ngx, qr/\[(?:error|alert|crit|emerg)\]/), [],
              "$what: no [error] in the error log");
}

# A batch's result must have one row per request.  A database whose unique
# holder index is missing (a migration gone wrong) lets a key hold two
# items, and the batch then returns two rows for that key: answering by
# position would give the next request the first key's second item.
{
    my $what = 'a batch result of the wrong number of rows';
    my $q = AQ::queue($org, 'rows');
    my $ids = AQ::enqueue_many($q, 4);
    my ($k, $l) = (AQ::key($org), AQ::key($org));
    $dbh->do('DROP INDEX annotation_queue.items_holder_idx');
    $dbh->do(q{UPDATE annotation_queue.items
                  SET status = 'claimed', claimed_by = ?, claimed_at = now(),
                      lease_expires_at = now() + interval '15 minutes', version = 1
                WHERE id IN (?, ?)}, undef, AQ::key_id($k), @$ids[0, 1]);
    my $ngx = start(size => 1);

    my ($r, $ok) = batch_of($ngx, $q, [$k, $l]);
    ok($ok, "$what: two claims waited behind a claim held in PostgreSQL");
    is_deeply([map { outcome($_) } @$r], ['500 internal_error', '500 internal_error'],
              "$what: every request of the batch answers 500 internal_error")
        or diag explain $r;
    my $logged = log_lines($ngx, qr/a batch of 2 queries returned 3 rows of 13 columns/);
    is(scalar @$logged, 1, "$what: the cause is logged once") or diag $ngx->error_log;
    is_deeply(log_lines($ngx, qr/\[error\]/), $logged,
              "$what: ... and nothing else at [error] (no request logs a missing result)")
        or diag $ngx->error_log;

    $dbh->do(q{UPDATE annotation_queue.items
                  SET status = 'available', claimed_by = NULL, claimed_at = NULL,
                      lease_expires_at = NULL
                WHERE id = ?}, undef, $ids->[1]);
    $dbh->do(q{CREATE UNIQUE INDEX items_holder_idx
                   ON annotation_queue.items (claimed_by, queue_id)
                WHERE status = 'claimed'});
    $ngx->stop;
    is_deeply(log_lines($ngx, qr/\[(?:alert|crit|emerg)\]/), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

done_testing();
