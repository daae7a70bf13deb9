# Exactly once on Citus: 64 clients drain four queues, two on each worker
# (placement checked with citus_shards and
# get_shard_id_for_distribution_column), through an nginx of two workers
# pointed at the coordinator.  Each client claims with a fresh key every
# time, on one kept-alive connection, from the queue given by its number,
# until its 409.  Every item is handed out exactly once, to the key the
# database says holds it, at version 1; no client sees anything but 200
# and 409.
use strict;
use warnings;

use lib 't/lib';
use AQ::Citus;
use AQ;
use JSON::PP ();
use Test::More;

my $CLIENTS = 64;
my $PER_QUEUE = 200;

my $org = AQ::org('drain');
my $on = AQ::Citus::queues_on_both($org, 2, prefix => 'drain');
my @queues = (@{ $on->{worker1} }, @{ $on->{worker2} });
is(scalar @queues, 4, 'four queues, two on each worker');
is(AQ::Citus::node_of($_), 'worker1', 'a queue on worker1') for @{ $on->{worker1} };
is(AQ::Citus::node_of($_), 'worker2', 'a queue on worker2') for @{ $on->{worker2} };
AQ::enqueue_many($_, $PER_QUEUE) for @queues;
my $items = $PER_QUEUE * @queues;

my $ngx = AQ::start_nginx(workers => 2, http => <<'_EOC_');
    annotation_queue_query_timeout 60s;
_EOC_
my $pool = AQ::key_pool($org, $items + 2 * $CLIENTS);

my $results = AQ::parallel($CLIENTS, sub {
    my ($i) = @_;
    my $queue = $queues[$i % @queues];
    my $c = AQ::Client->new(port => $ngx->port, timeout => 60);
    my %r = (claims => [], errors => [], queue => $queue);
    while (1) {
        my $key = $pool->take;
        if (!defined $key) {
            $r{out_of_keys} = 1;
            last;
        }
        my ($status, $h, $body, $err) = $c->claim($queue, $key);
        my $doc = eval { JSON::PP->new->utf8->decode($body) };
        if ($status == 200 && $doc && ref $doc->{item}) {
            push @{ $r{claims} }, [$doc->{item}{id}, $doc->{item}{version}, $key, $i,
                                   $doc->{item}{queue_id}];
        } elsif ($status == 409 && $doc && ($doc->{error}{code} // '') eq 'no_items_available') {
            last;
        } else {
            push @{ $r{errors} }, "$status " . ($err // '') . " $body";
            last if @{ $r{errors} } >= 3;
        }
    }
    return \%r;
}, timeout => 600);

my @errors = map { @{ $_->{errors} || [] }, ($_->{died} ? "died: $_->{died}" : ()) } @$results;
is_deeply(\@errors, [], 'no client got anything but 200 or 409')
    or diag explain [@errors[0 .. ($#errors < 9 ? $#errors : 9)]];
is(scalar(grep { $_->{out_of_keys} } @$results), 0, 'every client ran until its 409');

my @claims = map { @{ $_->{claims} || [] } } @$results;
is(scalar @claims, $items, "$items claims answered 200");
my %seen;
$seen{ $_->[0] }++ for @claims;
is(scalar(grep { $seen{$_} > 1 } keys %seen), 0, 'no item was handed out twice');
is(scalar(grep { ($_->[1] // '') ne '1' } @claims), 0, 'every claim has version 1');
is(scalar(grep { my $r = $_; grep { $_->[4] ne $r->{queue} } @{ $r->{claims} } } @$results),
   0, "each client's items are of its own queue");

for my $q (@queues) {
    my @answers = map { [$_->[0], $_->[1], $_->[2], $_->[3]] }
                  grep { $_->[4] eq $q } @claims;
    my @problems = AQ::answers_problems(\@answers, queue => $q);
    is_deeply(\@problems, [],
              'a queue on ' . AQ::Citus::node_of($q)
              . ': each answer names an item its own key holds, at that version')
        or diag explain [@problems[0 .. ($#problems < 9 ? $#problems : 9)]];
    is_deeply(AQ::counts($q), { available => 0, claimed => $PER_QUEUE, completed => 0 },
              'a queue on ' . AQ::Citus::node_of($q) . ': every item claimed, none left');
}

AQ::stop_nginx($ngx);
my @bad = grep { /\[(?:alert|crit|emerg|error)\]/ } split /\n/, $ngx->error_log;
is_deeply(\@bad, [], 'no [error], [alert], [crit] or [emerg] in the error log');

done_testing();
