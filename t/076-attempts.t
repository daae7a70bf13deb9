# The retry limit: create_queue(..., max_attempts => n).  A slot whose
# lease expires for the n-th time is no longer handed out: the claim that
# meets it marks it failed (and claims the next candidate in the same
# request), queue_stats() and the status page count it, and
# annotation_queue.requeue(item) puts it back with its expiries forgotten.
# Without max_attempts, leases may expire any number of times.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Workflow;
use JSON::PP ();
use Test::More;

my $org = AQ::org('attempts');
my $JSON = JSON::PP->new->utf8->canonical;
my $dbh = AQ::dbh();
my %URI = %AQ::Workflow::URI;

my ($ngx, $port) = AQ::Workflow::start_nginx(workers => 1,
    http => 'annotation_queue_pool_size 2;');
my $c = AQ::Client->new(port => $port);

my %k = map { $_ => AQ::Workflow::key($org, $_) } qw(alice bob carol dave);

sub claim {
    my ($who, $queue) = @_;
    my ($st, $h, $b, $e) = $c->claim($queue, $k{$who});
    my $doc = eval { $JSON->decode($b // '') };
    return (AQ::Workflow::outcome({ status => $st, body => $b, error => $e }),
            ref $doc eq 'HASH' && ref $doc->{item} eq 'HASH' ? $doc->{item} : {});
}

sub expire {
    my ($id) = @_;
    $dbh->do(q{UPDATE annotation_queue.items
                  SET lease_expires_at = now() - interval '1 second'
                WHERE id = ? AND status = 'claimed'}, undef, $id);
}

sub state_of {
    my ($id) = @_;
    my $r = $dbh->selectrow_hashref(
        q{SELECT status, expirations, attempts FROM annotation_queue.items
           WHERE id = ?}, undef, $id);
    return "$r->{status}, $r->{expirations} expired, $r->{attempts} claims";
}

sub stats {
    my ($queue) = @_;
    my $r = $dbh->selectrow_hashref(
        'SELECT * FROM annotation_queue.queue_stats(?)', undef, $queue);
    return join ' ', map { "$_=$r->{$_}" } qw(available claimed expired completed failed);
}

my $q = AQ::queue($org, 'two', max_attempts => 2);
my $A = AQ::enqueue($q, 'A', { item => 'A' }, 1);
my $B = AQ::enqueue($q, 'B', { item => 'B' });

my ($o, $it) = claim('alice', $q);
is("$o $it->{id}", "200 claimed v1 $A", 'alice claims A (priority 1)');
expire($A);
is(stats($q), 'available=1 claimed=0 expired=1 completed=0 failed=0',
   'queue_stats: a lease that expired once (of 2 allowed) counts as expired');
($o, $it) = claim('bob', $q);
is("$o $it->{id}", "200 claimed v2 $A", 'bob takes A after its first expiry');
is(state_of($A), 'claimed, 1 expired, 2 claims', 'the expiry is counted');
expire($A);
is(stats($q), 'available=1 claimed=0 expired=0 completed=0 failed=1',
   'queue_stats: a lease that expired for the 2nd time of 2 counts as failed '
   . 'before any claim meets it');
($o, $it) = claim('carol', $q);
is("$o $it->{id}", "200 claimed v1 $B",
   'the claim that meets A at its 2nd expiry marks it failed and takes B '
   . 'in the same request');
is(state_of($A), 'failed, 2 expired, 2 claims', 'A is failed in the database');
is($dbh->selectrow_array(
       q{SELECT claimed_by IS NULL AND lease_expires_at IS NULL
           FROM annotation_queue.items WHERE id = ?}, undef, $A),
   1, '... held by nobody, without a lease');
($o) = claim('dave', $q);
is($o, '409 no_items_available', 'a failed item is never handed out');
($o) = $c->request(uri => $URI{extend}, key => $k{bob},
                   body => qq({"item_id":"$A","version":2}));
is($o, 409, "the failed item's last holder: extend answers 409");
is(stats($q), 'available=0 claimed=1 expired=0 completed=0 failed=1',
   'queue_stats: one failed, one claimed');

is($dbh->selectrow_array('SELECT annotation_queue.requeue(?)', undef, $B), 0,
   'requeue of an item that did not fail: 0, nothing changes');
is($dbh->selectrow_array('SELECT annotation_queue.requeue(?)', undef, $A), 1,
   'requeue of the failed item: 1 slot back');
is(state_of($A), 'available, 0 expired, 2 claims', '... available, its expiries forgotten');
($o, $it) = claim('dave', $q);
is("$o $it->{id}", "200 claimed v5 $A",
   'the requeued item is claimed again (v3 failed, v4 requeued, v5)');

# several failing slots in a row: one request fails them all and claims
# the next; an expired slot at its limit that no claim met is requeued too
{
    my $what = 'a run of items at their last expiry';
    my $rq = AQ::queue($org, 'run', max_attempts => 1);
    my $ids = AQ::enqueue_many($rq, 6);
    for my $i (0 .. 4) {
        my ($oo, $x) = claim('alice', $rq);
        $dbh->do(q{UPDATE annotation_queue.items
                      SET lease_expires_at = now() - interval '1 second'
                    WHERE id = ?}, undef, $x->{id});
        # alice would resume her own expired item: give it to a stranger
        $dbh->do(q{UPDATE annotation_queue.items SET claimed_by = gen_random_uuid()
                    WHERE id = ?}, undef, $x->{id});
    }
    is(stats($rq), 'available=1 claimed=0 expired=0 completed=0 failed=5',
       "$what: queue_stats counts the 5 expired slots of max_attempts 1 as failed");
    my ($oo, $x) = claim('bob', $rq);
    is("$oo $x->{id}", "200 claimed v1 $ids->[5]",
       "$what: one claim fails the 5 and answers the 6th item");
    is($dbh->selectrow_array(
           q{SELECT count(*) FROM annotation_queue.items
              WHERE queue_id = ? AND status = 'failed'}, undef, $rq),
       5, "$what: the 5 are failed in the database");
}

# the key's own slot at its last expiry: its holder, claiming again, does
# not get it back (the claim that resumes an expired lease of the key's own
# fails it too) but the next item
{
    my $what = "the key's own slot at its last expiry";
    my $oq = AQ::queue($org, 'own', max_attempts => 1);
    my $O = AQ::enqueue($oq, 'O', { item => 'O' }, 1);
    my $P = AQ::enqueue($oq, 'P', { item => 'P' });
    my ($oo, $x) = claim('carol', $oq);
    is("$oo $x->{id}", "200 claimed v1 $O", "$what: carol claims O");
    expire($O);
    ($oo, $x) = claim('carol', $oq);
    is("$oo $x->{id}", "200 claimed v1 $P",
       "$what: carol, claiming again, gets P, not O back");
    is(state_of($O), 'failed, 1 expired, 1 claims', "$what: O is failed");
}

# no max_attempts: a lease may expire any number of times
{
    my $nq = AQ::queue($org, 'unlimited');
    my $N = AQ::enqueue($nq, 'N', { item => 'N' });
    for my $who (qw(alice bob carol dave)) {
        my ($oo, $x) = claim($who, $nq);
        is("$oo $x->{id}", "200 claimed v" . ($x->{version} // '?') . " $N",
           "no max_attempts: $who takes N after every expiry");
        expire($N);
    }
    is(state_of($N), 'claimed, 3 expired, 4 claims',
       'no max_attempts: 3 expiries counted, never failed');
}

$ngx->stop;
is_deeply([grep { /\[(?:error|alert|crit|emerg)\]/ } split /\n/, $ngx->error_log],
          [], 'no [error], [alert], [crit] or [emerg] in the error log');

done_testing();
