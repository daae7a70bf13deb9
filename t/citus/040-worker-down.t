# A worker stopped mid-run: clients keep claiming from a queue on each
# worker through an nginx pointed at the coordinator; worker2 is stopped
# (immediate shutdown) while they run, then started again.  Claims to the
# queue on worker1 keep answering 200 throughout; those to the queue on
# worker2 answer 503 database_unavailable while it is down (the
# coordinator's SQLSTATE 08006: nothing ran) and 200 again once it is back;
# nothing answers anything else, and every item is handed out once.  (The
# keys are made beforehand: writes to a reference table, api_keys among
# them, need every worker.)
use strict;
use warnings;

use lib 't/lib';
use AQ::Citus;
use AQ;
use File::Temp qw(tempdir);
use JSON::PP ();
use Test::More;
use Time::HiRes ();

my $CLIENTS_PER_QUEUE = 3;

my $org = AQ::org('down');
my $on = AQ::Citus::queues_on_both($org, 1, prefix => 'down');
my ($qa, $qb) = ($on->{worker1}[0], $on->{worker2}[0]);
is(AQ::Citus::node_of($qa), 'worker1', 'queue A is on worker1');
is(AQ::Citus::node_of($qb), 'worker2', 'queue B is on worker2');
AQ::enqueue_many($_, 6000) for $qa, $qb;

my $ngx = AQ::start_nginx(workers => 1, http => <<'_EOC_');
    annotation_queue_query_timeout 30s;
    annotation_queue_connect_timeout 10s;
_EOC_

my $flags = tempdir('aq-down-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $keys = AQ::key_pool($org, 8000);
my @probe_keys = @{ AQ::keys_for($org, 50) };

# the clients stop when the suite does, whatever happened
END { if (open my $fh, '>', "$flags/stop") { close $fh } }

sub decode { my $d = eval { JSON::PP->new->utf8->decode($_[0] // '') }; return ref $d eq 'HASH' ? $d : {} }

# Each client claims from its queue with a fresh key until the stop flag,
# noting [time, status, code or item id, version, key].
my $results;
my $pid = fork // die "fork: $!";
if ($pid == 0) {
    my $res = AQ::parallel(2 * $CLIENTS_PER_QUEUE, sub {
        my ($i) = @_;
        my $queue = $i % 2 ? $qb : $qa;
        my $c = AQ::Client->new(port => $ngx->port, timeout => 60);
        my @seen;
        until (-e "$flags/stop") {
            my $key = $keys->take // last;
            my ($status, $h, $body, $err) = $c->claim($queue, $key);
            my $d = decode($body);
            push @seen, [Time::HiRes::time(), $status,
                         $status == 200 ? ($d->{item}{id}, $d->{item}{version}, $key)
                                        : ($d->{error}{code} // $err // '')];
            Time::HiRes::sleep(0.01) if $status != 200;
        }
        return { queue => $queue, seen => \@seen };
    }, timeout => 600);
    open my $fh, '>', "$flags/results.json" or die;
    print $fh JSON::PP->new->encode($res);
    close $fh;
    POSIX::_exit(0);
}

sub claimed {
    my ($q) = @_;
    return scalar AQ::dbh()->selectrow_array(
        q{SELECT count(*) FROM annotation_queue.items
           WHERE queue_id = ? AND status = 'claimed'}, undef, $q);
}

sub wait_for {
    my ($what, $cond) = @_;
    my $deadline = Time::HiRes::time() + 60 * AQ::slow();
    until ($cond->()) {
        if (Time::HiRes::time() > $deadline) {
            fail("waited for: $what");
            return 0;
        }
        Time::HiRes::sleep(0.1);
    }
    pass($what);
    return 1;
}

my $probe = AQ::Client->new(port => $ngx->port, timeout => 60);
sub probe {
    my ($q) = @_;
    # a key is used up by a 200 only
    my ($status, $h, $body) = $probe->claim($q, $probe_keys[0]);
    shift @probe_keys if $status == 200;
    return "$status " . (decode($body)->{error}{code} // '');
}

wait_for('both queues are being claimed (50 claims each)',
         sub { claimed($qa) >= 50 && claimed($qb) >= 50 });

my $stopped = Time::HiRes::time();
AQ::Citus::stop_node('worker2');
is(probe($qb), '503 database_unavailable', 'worker2 down: a claim to its queue answers 503 database_unavailable');
my $a_at_stop = claimed($qa);
wait_for('worker2 down: claims to the queue on worker1 go on (100 more)',
         sub { claimed($qa) >= $a_at_stop + 100 });
is(probe($qa), '200 ', 'worker2 down: a claim to the queue on worker1 answers 200');
is(probe($qb), '503 database_unavailable', 'worker2 still down: 503 again');

AQ::Citus::start_node('worker2');
my $started = Time::HiRes::time();
wait_for('worker2 back: a claim to its queue answers 200 again',
         sub { probe($qb) eq '200 ' });
my $b_back = claimed($qb);
wait_for("worker2 back: the clients' claims to its queue go on (50 more)",
         sub { claimed($qb) >= $b_back + 50 });

open my $sf, '>', "$flags/stop" or die;
close $sf;
waitpid($pid, 0);
$results = JSON::PP->new->decode(AQ::slurp("$flags/results.json") || '[]');

my (@a, @b);
for my $r (@$results) {
    push @{ $r->{queue} eq $qa ? \@a : \@b }, @{ $r->{seen} || [] } if ref $r eq 'HASH' && $r->{queue};
}
is(scalar(@$results), 2 * $CLIENTS_PER_QUEUE, 'every client reported');
my @a_bad = grep { $_->[1] != 200 } @a;
is_deeply([map { "$_->[1] $_->[2]" } @a_bad[0 .. ($#a_bad < 4 ? $#a_bad : 4)]], [],
          'the queue on worker1: every claim answered 200, worker2 down or not');
cmp_ok(scalar(grep { $_->[0] > $stopped && $_->[0] < $started } @a), '>', 0,
       'the queue on worker1: claims answered while worker2 was down');
my @b_other = grep { $_->[1] != 200 && "$_->[1] $_->[2]" ne '503 database_unavailable' } @b;
is_deeply([map { "$_->[1] $_->[2]" } @b_other[0 .. ($#b_other < 4 ? $#b_other : 4)]], [],
          'the queue on worker2: nothing but 200 and 503 database_unavailable');
cmp_ok(scalar(grep { $_->[1] == 503 } @b), '>', 0,
       "the queue on worker2: the clients saw 503 while it was down");
cmp_ok(scalar(grep { $_->[1] == 200 && $_->[0] > $started } @b), '>', 0,
       'the queue on worker2: the clients got 200 again once it was back');
my @b_503_late = grep { $_->[1] == 503 && $_->[0] < $stopped } @b;
is(scalar @b_503_late, 0, 'the queue on worker2: no 503 before it was stopped');

for my $pair ([$qa, \@a, 'worker1'], [$qb, \@b, 'worker2']) {
    my ($q, $seen, $node) = @$pair;
    my @answers = map { [$_->[2], $_->[3], $_->[4]] } grep { $_->[1] == 200 } @$seen;
    my @problems = AQ::answers_problems(\@answers, queue => $q);
    is_deeply(\@problems, [], "the queue on $node: each item answered once, held by its key at that version")
        or diag explain [@problems[0 .. ($#problems < 9 ? $#problems : 9)]];
}

AQ::stop_nginx($ngx);
my @bad = grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
is_deeply(\@bad, [], 'no [alert], [crit] or [emerg] in the error log');
my @errors = grep { /\[error\]/ && !/08006|remote node|connection to the server|could not connect|terminat/ }
             split /\n/, $ngx->error_log;
is_deeply([@errors[0 .. ($#errors < 4 ? $#errors : 4)]], [],
          "the error log's [error] lines are the lost worker's");

done_testing();
