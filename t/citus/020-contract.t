# The contract through a Citus coordinator: claim, extend, release, complete
# and skip (the item endpoints naming the queue, as the README asks on
# Citus) answer 200, 400, 401, 404 and 409 as on plain PostgreSQL, each
# checked in the database (t/lib/AQ/ItemQueue.pm, also t/075-item-queue.t),
# for a queue on each worker; and the SQL API of sql/002 and sql/006
# (create_org, create_api_key, revoke_api_key, create_queue, enqueue,
# requeue, queue_stats) works on the coordinator.
use strict;
use warnings;

use lib 't/lib';
use AQ::Citus;
use AQ;
use AQ::ItemQueue;
use Test::More;

AQ::ItemQueue::contract(label => 'Citus');

my $dbh = AQ::dbh();
my $org = AQ::org('api');
my $on = AQ::Citus::queues_on_both($org, 1, prefix => 'api');
my ($c) = (AQ::ItemQueue::start())[1];
my $key = AQ::key($org);

for my $node (qw(worker1 worker2)) {
    my $q = $on->{$node}[0];
    is(AQ::Citus::node_of($q), $node, "the queue is on $node");
    my @ids = map { AQ::enqueue($q, undef, qq({"n": $_}), $_) } 1 .. 3;
    is_deeply([map { $_->[0] } @{ $dbh->selectall_arrayref(
                 q{SELECT count(*) FROM annotation_queue.items WHERE queue_id = ?},
                 undef, $q) }], [3], "enqueue on $node: three items");
    my $stats = $dbh->selectrow_hashref(
        q{SELECT * FROM annotation_queue.queue_stats(?)}, undef, $q);
    is("$stats->{available} $stats->{claimed} $stats->{completed}", '3 0 0',
       "queue_stats on $node: 3 available");

    # the highest priority first
    my ($got, $d) = AQ::ItemQueue::claim($c, $key, $q);
    is($d->{item}{id}, $ids[2], "claim on $node: the highest priority first");

    # an expired lease at the last attempt fails the slot; requeue puts it back
    $dbh->do(q{UPDATE annotation_queue.queues SET max_attempts = 1 WHERE id = ?},
             undef, $q);
    AQ::expire_lease($ids[2]);
    my $key2 = AQ::key($org);
    ($got, $d) = AQ::ItemQueue::claim($c, $key2, $q);
    is($d->{item}{id}, $ids[1], "on $node: the expired slot fails, the next item is claimed");
    is($dbh->selectrow_array(q{SELECT status FROM annotation_queue.items WHERE id = ?},
                             undef, $ids[2]), 'failed', "on $node: the slot is failed");
    is($dbh->selectrow_array(q{SELECT annotation_queue.requeue(?)}, undef, $ids[2]),
       1, "requeue on $node: one slot back");
    is($dbh->selectrow_array(q{SELECT status FROM annotation_queue.items WHERE id = ?},
                             undef, $ids[2]), 'available', "on $node: the slot is available");
}

my $gone = AQ::key($org);
ok($dbh->selectrow_array(q{SELECT annotation_queue.revoke_api_key(?)}, undef, $gone),
   'revoke_api_key: true for a live key');
ok(!$dbh->selectrow_array(q{SELECT annotation_queue.revoke_api_key(?)}, undef, $gone),
   'revoke_api_key: false the second time');
is((AQ::ItemQueue::claim($c, $gone, $on->{worker1}[0]))[0], '401 invalid_api_key',
   'a revoked key: 401 at once');
ok(!eval { AQ::enqueue(AQ::random_uuid(), undef, '{}'); 1 },
   'enqueue to an unknown queue fails (the foreign key)');

done_testing();
