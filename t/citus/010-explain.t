# On Citus, every statement of src/ngx_aq_sql.h that the module sends for a
# queue is a router query: EXPLAIN of it, prepared and run as the module
# runs it, shows one task, on the worker that holds the queue.  The item
# statements without the queue (a body without "queue_id") are not: Citus
# cannot route them, which is why clients send queue_id on Citus.
use strict;
use warnings;

use lib 't/lib';
use AQ::Citus;
use AQ;
use Test::More;

sub sql_of {
    my ($macro) = @_;
    my $sql = `$^X $AQ::TOP/bench/claim-sql.pl $AQ::TOP/src/ngx_aq_sql.h $macro`;
    die "no $macro\n" if $? != 0 || $sql !~ /\S/;
    return $sql;
}

my $org = AQ::org('explain');
my $key = AQ::key($org);
my $on = AQ::Citus::queues_on_both($org, 1, prefix => 'explain');
my $digest = AQ::dbh()->selectrow_array(
    q{SELECT annotation_queue.key_hash(?)}, undef, $key);
my $hex = unpack 'H*', $digest;

for my $node (qw(worker1 worker2)) {
    my $queue = $on->{$node}[0];
    my $item = AQ::enqueue($queue, undef, '{"n": 1}');
    my $port = AQ::Citus::port($node);
    my @key = (['bytea', '\\x' . $hex]);
    my %stmts = (
        NGX_AQ_CLAIM_SQL => [@key, ['uuid', $queue], ['int8', 900000]],
        NGX_AQ_CLAIM_WIDE_SQL => [@key, ['uuid', $queue], ['int8', 900000]],
        NGX_AQ_CLAIM_WAIT_SQL => [@key, ['uuid', $queue], ['int8', 900000]],
        NGX_AQ_CLAIM_BATCH_SQL => [['text[]', "{$hex}"], ['uuid', $queue],
                                   ['int8', 900000]],
        NGX_AQ_EXTEND_QUEUE_SQL => [@key, ['uuid', $item], ['int8', 1],
                                    ['int8', 900000], ['uuid', $queue]],
        NGX_AQ_RELEASE_QUEUE_SQL => [@key, ['uuid', $item], ['int8', 1],
                                     ['int8', undef], ['uuid', $queue]],
        NGX_AQ_COMPLETE_QUEUE_SQL => [@key, ['uuid', $item], ['int8', 1],
                                      ['jsonb', '{"result": {}}'], ['uuid', $queue]],
        NGX_AQ_SKIP_QUEUE_SQL => [@key, ['uuid', $item], ['int8', 1],
                                  ['int8', undef], ['uuid', $queue]],
    );
    for my $macro (sort keys %stmts) {
        my ($tasks, $plan) = AQ::Citus::tasks(lc "s_$macro", sql_of($macro),
                                              @{ $stmts{$macro} });
        is($tasks, 1, "$macro, a queue on $node: one task")
            or diag($plan);
        like($plan, qr/Node: host=\S+ port=$port /,
             "$macro, a queue on $node: the task runs on $node");
        unlike($plan, qr/distributed_subplan|intermediate_result/,
               "$macro, a queue on $node: no subplan through the coordinator");
    }
}

# without the queue: not one task (a multi-shard plan, or refused)
{
    my $queue = $on->{worker1}[0];
    my $item = AQ::enqueue($queue, undef, '{"n": 2}');
    my ($tasks, $plan) = eval {
        AQ::Citus::tasks('s_extend_any', sql_of('NGX_AQ_EXTEND_SQL'),
                         ['bytea', '\\x' . $hex], ['uuid', $item], ['int8', 1],
                         ['int8', 900000]);
    };
    ok(!defined $tasks || $tasks != 1,
       'NGX_AQ_EXTEND_SQL (no queue): not a one-task router query')
        or diag($plan);
}

done_testing();
