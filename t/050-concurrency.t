# Concurrency: many clients draining one queue through an nginx of two
# workers.  Each item must be claimed exactly once, no client may be told
# 409 while items are still available, nothing may fail with a 5xx.
#
# Each client claims with a fresh key every time (a key holding a live
# claim would get its item back), on one kept-alive connection, and stops at
# its first 409.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use JSON::PP ();
use List::Util qw(max sum0);
use Test::More;
use Time::HiRes ();

my $org = AQ::org('concurrency');

# Runs $clients clients against $ngx until the queue is empty; returns the
# results of the clients: { claims => [[key, id, version, claimed_at]...],
# empty_at => time of the 409, errors => [...], connects => n }.  The clients
# draw fresh keys from one shared pool holding a key for every item, one for
# each client's 409, and as many again to spare: however uneven the clients'
# shares of the items (batching, a worker starved of CPU), none runs out
# while the queue has items.
sub drain {
    my ($ngx, $queue, $items, $clients) = @_;
    my $pool = AQ::key_pool($org, $items + 2 * $clients);
    return AQ::parallel($clients, sub {
        my ($i) = @_;
        my $c = AQ::Client->new(port => $ngx->port, timeout => 20);
        my %r = (claims => [], errors => [], connects => 0);
        while (1) {
            my $key = $pool->take;
            if (!defined $key) {
                $r{out_of_keys} = 1;
                last;
            }
            $r{connects}++ unless $c->connected;
            my ($status, $h, $body, $err) = $c->claim($queue, $key);
            my $doc = eval { JSON::PP->new->utf8->decode($body) };
            if ($status == 200 && $doc && $doc->{success} && ref $doc->{item}) {
                my $it = $doc->{item};
                push @{ $r{claims} }, [$key, $it->{id}, $it->{version}, $it->{claimed_at}];
            } elsif ($status == 409 && $doc && ($doc->{error}{code} // '') eq 'no_items_available') {
                $r{empty_at} = Time::HiRes::time();
                last;
            } else {
                push @{ $r{errors} }, "$status " . ($err // '') . " $body";
                last if @{ $r{errors} } >= 3;
            }
        }
        return \%r;
    });
}

# Checks what drain() returned against the queue.
sub check_drain {
    my ($what, $queue, $items, $results, %o) = @_;

    my @errors = map { @{ $_->{errors} || [] }, ($_->{died} ? "died: $_->{died}" : ()) }
                 @$results;
    is_deeply(\@errors, [], "$what: no client got anything but 200 or 409 (no 5xx)")
        or diag explain [@errors[0 .. ($#errors < 9 ? $#errors : 9)]];

    my @claims = map { @{ $_->{claims} || [] } } @$results;
    my %seen;
    $seen{ $_->[1] }++ for @claims;
    my @twice = grep { $seen{$_} > 1 } keys %seen;
    is(scalar @claims, $items, "$what: $items claims answered 200");
    is_deeply(\@twice, [], "$what: no item was handed out twice");
    is(scalar(grep { ($_->[2] // '') ne '1' } @claims), 0, "$what: every claim has version 1");

    # Each answer joined with the database: the item is held by the very key
    # it was answered to, at that version; no item twice, across clients or
    # within one.
    my @answers;
    for my $i (0 .. $#$results) {
        push @answers, map { [$_->[0], $_->[1], $_->[2], $i] } @{ $results->[$i]{claims} || [] };
    }
    my @problems = AQ::claim_answer_problems($queue, \@answers);
    is_deeply(\@problems, [], "$what: each answer names an item its own key holds, at that version")
        or diag explain [@problems[0 .. ($#problems < 9 ? $#problems : 9)]];

    my $ids = AQ::dbh()->selectcol_arrayref(
        'SELECT id FROM annotation_queue.items WHERE queue_id = ?', undef, $queue);
    my %ours = map { $_ => 1 } @$ids;
    is(scalar(grep { !$ours{$_} } keys %seen), 0, "$what: every claimed id is an item of the queue");

    is_deeply(AQ::counts($queue), { available => 0, claimed => $items, completed => 0 },
              "$what: the database has every item claimed, none left");
    my ($holders) = AQ::dbh()->selectrow_array(
        q{SELECT count(DISTINCT claimed_by) FROM annotation_queue.items WHERE queue_id = ?},
        undef, $queue);
    is($holders, $items, "$what: each item is held by the key that claimed it, one each");

    # A 409 is false if some item was claimed by a transaction that started
    # after the 409 was received: that item was available all along.
    my ($last_claim) = AQ::dbh()->selectrow_array(
        q{SELECT extract(epoch FROM max(claimed_at)) FROM annotation_queue.items
           WHERE queue_id = ?}, undef, $queue);
    my @false = grep { defined $_->{empty_at} && $_->{empty_at} + 0.002 < $last_claim } @$results;
    is(scalar @false, 0, "$what: no 409 before the queue was empty")
        or diag sprintf '%d clients got 409 before the last claim at %.6f (first at %.6f)',
                        scalar @false, $last_claim,
                        (sort { $a <=> $b } map { $_->{empty_at} } @false)[0];

    my $out = grep { $_->{out_of_keys} } @$results;
    is($out, 0, "$what: every client ran until its 409 (none ran out of keys)");

    # Batching really happened: the claims of one batch share one commit,
    # and so one claimed_at (now() is the transaction's start).
    my ($batched) = AQ::dbh()->selectrow_array(
        q{SELECT count(*) FROM (SELECT claimed_at FROM annotation_queue.items
                                 WHERE queue_id = ? GROUP BY claimed_at
                                HAVING count(*) > 1) AS t}, undef, $queue);
    cmp_ok($batched, '>', 0, "$what: some claims were batched (one commit for several)")
        if $o{batched};

    my @reconnected = grep { ($_->{connects} // 0) != 1 } @$results;
    is(scalar @reconnected, 0, "$what: each client kept one connection alive throughout")
        or diag explain [map { $_->{connects} } @reconnected];
}

sub check_log {
    my ($what, $ngx) = @_;
    my @bad = grep { /\[(?:alert|crit|emerg|error)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@bad, [], "$what: no [error], [alert], [crit] or [emerg] in the error log");
}

{
    my $what = '40 clients, 2 workers, default pool';
    my $queue = AQ::queue($org, 'drain-2000');
    AQ::enqueue_many($queue, 2000);
    my $ngx = AQ::start_nginx(workers => 2);
    my $t0 = Time::HiRes::time();
    my $results = drain($ngx, $queue, 2000, 40);
    my $elapsed = Time::HiRes::time() - $t0;
    note sprintf '%s: 2000 claims in %.2f s (%.0f/s)', $what, $elapsed, 2000 / $elapsed;
    check_drain($what, $queue, 2000, $results);

    my $c = AQ::Client->new(port => $ngx->port);
    my ($status, undef, $body) = $c->claim($queue, AQ::key($org));
    is($status, 409, "$what: once drained, a new key gets 409");
    like($body, qr/"no_items_available"/, "$what: ... no_items_available");

    $ngx->stop;
    check_log($what, $ngx);
}

{
    my $what = '64 clients waiting for 2 connections per worker';
    my $queue = AQ::queue($org, 'drain-640');
    AQ::enqueue_many($queue, 640);
    my $ngx = AQ::start_nginx(workers => 2, http => <<'_EOC_');
    annotation_queue_pool_size 2;
    annotation_queue_max_waiting 128;
_EOC_
    my $results = drain($ngx, $queue, 640, 64);
    check_drain($what, $queue, 640, $results, batched => 1);
    $ngx->stop;
    check_log($what, $ngx);
}

done_testing();
