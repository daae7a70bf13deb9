# Overlap: a queue that asks for k ratings per item (create_queue(...,
# overlap => k)) holds each item as k slots of one id.
#
#   - Up to k different keys hold the item at once, each its own slot with
#     its own version and lease; the answer says "overlap": {"required": k,
#     "completed": n}.
#   - A key that claimed a slot of an item (and completed, released or lost
#     it) is never handed another slot of that item.
#   - extend, release and complete act on the caller's own slot.
#   - The item is done when k keys completed it; annotation_queue.results
#     has a row per rating, with its rater.
#   - Under concurrent claims and completes (batches included), every item
#     ends with exactly k ratings by k different keys.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Workflow;
use JSON::PP ();
use Test::More;

my $org = AQ::org('overlap');
my $JSON = JSON::PP->new->utf8->canonical;
my $dbh = AQ::dbh();
my %URI = %AQ::Workflow::URI;

my ($ngx, $port) = AQ::Workflow::start_nginx(workers => 1,
    http => 'annotation_queue_pool_size 2;');
my $c = AQ::Client->new(port => $port);

my %k = map { $_ => AQ::Workflow::key($org, $_) } qw(k1 k2 k3 k4 k5);

# (outcome, item) of a request: outcome as AQ::Workflow::outcome has it.
sub call {
    my ($action, $key, $body) = @_;
    my ($st, $h, $b, $e) = $c->request(uri => $URI{$action}, key => $key,
                                       body => $JSON->encode($body));
    my $res = { status => $st, body => $b, error => $e };
    my $doc = eval { $JSON->decode($b // '') };
    return (AQ::Workflow::outcome($res),
            ref $doc eq 'HASH' && ref $doc->{item} eq 'HASH' ? $doc->{item} : {});
}

sub claim { return call('claim', $k{ $_[0] }, { queue_id => $_[1] }) }

sub act {
    my ($action, $who, $it, %more) = @_;
    return call($action, $k{$who},
                { item_id => $it->{id}, version => $it->{version}, %more });
}

# "k1 claimed, k2 completed, available" for the slots of an item, by slot.
sub slots {
    my ($id) = @_;
    my $rows = $dbh->selectall_arrayref(
        q{SELECT i.status, a.rater, c.rater
            FROM annotation_queue.items i
            LEFT JOIN annotation_queue.api_keys a ON a.id = i.claimed_by
            LEFT JOIN annotation_queue.api_keys c ON c.id = i.completed_by
           WHERE i.id = ? ORDER BY i.slot}, undef, $id);
    return join ', ', map {
        $_->[0] eq 'claimed'   ? "$_->[1] claimed"
      : $_->[0] eq 'completed' ? "$_->[2] completed"
      : $_->[0]
    } @$rows;
}

my $q = AQ::queue($org, 'three', overlap => 3);

# a queue's overlap is fixed (sql/008): its items' slots were made from it,
# and the lean claim takes only slot 1 of the items of a queue of overlap 1
for my $to (1, 4) {
    my $ok = eval {
        $dbh->do(q{UPDATE annotation_queue.queues SET overlap = ? WHERE id = ?},
                 undef, $to, $q);
        1;
    };
    is($ok ? 'changed' : $dbh->state, '23514',
       "the overlap of a queue cannot change (3 to $to): check_violation");
}
my $A = AQ::enqueue($q, 'A', { item => 'A' });
my $B = AQ::enqueue($q, 'B', { item => 'B' });

is($dbh->selectrow_array(
       'SELECT count(*) FROM annotation_queue.items WHERE id = ?', undef, $A),
   3, 'enqueue in a queue of overlap 3 makes three slots of one id');

my (%it, $o);

for my $who (qw(k1 k2 k3)) {
    ($o, $it{$who}) = claim($who, $q);
    is("$o " . ($it{$who}{id} // 'none'), "200 claimed v1 $A",
       "overlap 3: $who gets item A at version 1 (three keys hold it at once)");
    is_deeply($it{$who}{overlap}, { required => 3, completed => 0 },
              "overlap 3: $who\'s answer says overlap required 3, completed 0");
}
is(slots($A), 'k1 claimed, k2 claimed, k3 claimed',
   'overlap 3: each of the three keys holds a slot of its own');

($o, $it{k4}) = claim('k4', $q);
is("$o " . ($it{k4}{id} // 'none'), "200 claimed v1 $B",
   'overlap 3: a fourth key gets the next item, A being held three times');

($o, my $again) = claim('k1', $q);
is("$o " . ($again->{id} // 'none') . " v$again->{version}",
   "200 claimed v1 $A v1", 'a key that holds a slot gets it back (resume)');

# each acts on its own slot, all at version 1
($o) = act('extend', 'k1', $it{k1});
is($o, '200 claimed v1', 'extend acts on the caller\'s own slot');
($o) = act('complete', 'k2', $it{k2}, result => { by => 'k2' });
is($o, '200 completed v2', 'complete acts on the caller\'s own slot');
is(slots($A), 'k1 claimed, k2 completed, k3 claimed',
   '... the other slots unchanged');
($o) = act('complete', 'k2', $it{k2}, result => { by => 'k2' });
is($o, '409 stale_claim', 'complete again: 409 stale_claim (k2 holds nothing)');
($o) = act('release', 'k3', $it{k3});
is($o, '200 available v2', 'release acts on the caller\'s own slot');
is(slots($A), 'k1 claimed, k2 completed, available',
   '... its slot is available again');

($o, my $k3b) = claim('k3', $q);
is("$o " . ($k3b->{id} // 'none'), "200 claimed v1 $B",
   'a key that released its slot is not handed the item again: it gets B');
($o, my $k2b) = claim('k2', $q);
is("$o " . ($k2b->{id} // 'none'), "200 claimed v1 $B",
   'a key that completed its slot is not handed the item again: it gets B');

($o) = act('complete', 'k1', $it{k1}, result => { by => 'k1' });
is($o, '200 completed v2', 'k1 completes its slot of A');

($o, my $k5) = claim('k5', $q);
is("$o " . ($k5->{id} // 'none'), "200 claimed v3 $A",
   'a new key gets A\'s released slot (at its next version)');
is_deeply($k5->{overlap}, { required => 3, completed => 2 },
          '... and the answer counts the two completed ratings');

($o) = claim('k1', $q);
is($o, '409 no_items_available',
   '409 when every claimable slot belongs to an item the key had');

($o) = act('complete', 'k5', $k5, result => { by => 'k5' });
is($o, '200 completed v4', 'the third rating completes');
is(slots($A), 'k1 completed, k2 completed, k5 completed',
   'the item is done: three ratings by three keys');
is_deeply($dbh->selectall_arrayref(
              q{SELECT rater, result ->> 'by' FROM annotation_queue.results
                 WHERE item_id = ? ORDER BY rater}, undef, $A),
          [[qw(k1 k1)], [qw(k2 k2)], [qw(k5 k5)]],
          'annotation_queue.results: a row per rating with its rater and result');

# an expired slot goes to a key that never had the item
$dbh->do(q{UPDATE annotation_queue.items
              SET lease_expires_at = now() - interval '1 second'
            WHERE id = ? AND claimed_by = ?}, undef, $B, AQ::key_id($k{k4}));
($o, my $k1b) = claim('k1', $q);
is("$o " . ($k1b->{id} // 'none'), "200 claimed v2 $B",
   'an expired slot goes to a key that never had the item');
($o) = act('extend', 'k4', $it{k4});
is($o, '409 stale_claim', 'the late holder of that slot: 409 stale_claim');
($o) = claim('k4', $q);
is($o, '409 no_items_available',
   'the late holder is not handed its old item again (409: nothing else left)');

# ---------------------------------------------------------------------------
# Concurrent raters: 12 keys claim and complete, a request each at a time,
# until the queue has nothing for them; the pool (2 connections) makes the
# claims wait and batch.  Every item ends with exactly 3 ratings by 3 keys.
{
    my $what = 'concurrent raters, overlap 3';
    my $cq = AQ::queue($org, 'concurrent', overlap => 3);
    my $items = AQ::enqueue_many($cq, 20);
    my @keys = map { AQ::Workflow::key($org, "c$_") } 1 .. 12;
    my @conns = map { AQ::Client->new(port => $port) } @keys;
    my @active = (0 .. $#keys);
    my (%bad, $claims);
    my $deadline = time + 120 * AQ::slow();

    while (@active && time < $deadline) {
        $conns[$_]->send_request(uri => $URI{claim}, key => $keys[$_],
                                 body => qq({"queue_id":"$cq"})) for @active;
        my (@next, %held);
        for my $i (@active) {
            my $res = $conns[$i]->read_response;
            my $doc = eval { $JSON->decode($res->{body} // '') } // {};
            if ($res->{status} == 200) {
                $held{$i} = $doc->{item};
                $claims++;
            } elsif (($doc->{error}{code} // '') ne 'no_items_available') {
                $bad{"claim: $res->{status} " . ($res->{body} // '')}++;
            }
        }
        for my $i (sort keys %held) {
            $conns[$i]->send_request(uri => $URI{complete}, key => $keys[$i],
                body => $JSON->encode({ item_id => $held{$i}{id},
                                        version => $held{$i}{version},
                                        result => { key => $i } }));
        }
        for my $i (sort keys %held) {
            my $res = $conns[$i]->read_response;
            $bad{"complete: $res->{status} $res->{body}"}++
                unless $res->{status} == 200;
            push @next, $i;
        }
        @active = @next;
    }

    is_deeply(\%bad, {}, "$what: every claim answers 200 or 409, every complete 200");
    is(scalar @active, 0, "$what: the raters ran dry before the deadline");
    is($claims, 60, "$what: 60 claims for 20 items of 3 ratings");
    is_deeply($dbh->selectall_arrayref(
                  q{SELECT id, count(*), count(DISTINCT completed_by)
                      FROM annotation_queue.items
                     WHERE queue_id = ? AND status = 'completed'
                     GROUP BY id HAVING count(*) <> 3
                                     OR count(DISTINCT completed_by) <> 3},
                  undef, $cq), [],
              "$what: every item has exactly 3 ratings by 3 different keys");
    is($dbh->selectrow_array(
           q{SELECT count(*) FROM annotation_queue.items
              WHERE queue_id = ? AND status <> 'completed'}, undef, $cq),
       0, "$what: no slot is left undone");
    $_->disconnect for @conns;
}

$ngx->stop;
is_deeply([grep { /\[(?:error|alert|crit|emerg)\]/ } split /\n/, $ngx->error_log],
          [], 'no [error], [alert], [crit] or [emerg] in the error log');

done_testing();
