#!/usr/bin/env perl
# bench/longpoll.sh (make bench-longpoll): what long-polling claims cost.
#
#   (a) latency from an enqueue to the waiter's answer: one waiter parked
#       (Prefer: wait=20) on an empty queue, then one item enqueued through
#       annotation_queue.enqueue (autocommit): the time from before that
#       statement to the answer's last byte; median and p99 over
#       BENCH_LP_TRIES (100) tries;
#   (b) BENCH_LP_WAITERS (10,000) waiters parked on one worker: the
#       worker's CPU time (utime + stime of /proc/<pid>/stat) and
#       PostgreSQL's transactions (xact_commit + xact_rollback of
#       pg_stat_database, the suite's database, our own statement taken
#       off) over BENCH_LP_IDLE (30) seconds of waiting; then as many items
#       in one statement, and the time until every waiter has its item.
#
# Figures, never assertions.  Runs on the test fixtures (t/lib/AQ.pm: a
# PostgreSQL cluster of its own unless AQ_TEST_PG_DSN is set).
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/../t/lib";
use AQ;
use AQ::Faults;
use AQ::LongPoll;
use POSIX ();
use Time::HiRes qw(time sleep);

my $TRIES   = $ENV{BENCH_LP_TRIES}   // 100;
my $WAITERS = $ENV{BENCH_LP_WAITERS} // 10000;
my $IDLE    = $ENV{BENCH_LP_IDLE}    // 30;

$| = 1;
my $TICK = POSIX::sysconf(POSIX::_SC_CLK_TCK()) || 100;

sub cpu {
    my ($pid) = @_;
    my $stat = AQ::slurp("/proc/$pid/stat");
    $stat =~ s/^.*\) //s;
    my @f = split ' ', $stat;
    return ($f[11] + $f[12]) / $TICK;    # utime, stime (fields 14, 15)
}

sub xacts {
    return scalar AQ::dbh()->selectrow_array(
        q{SELECT xact_commit + xact_rollback FROM pg_stat_database
           WHERE datname = current_database()});
}

sub pct {
    my ($p, @v) = @_;
    @v = sort { $a <=> $b } @v;
    return $v[ POSIX::ceil($p / 100 * @v) - 1 ];
}

my $org = AQ::org('bench-longpoll');
my @keys = @{ AQ::keys_for($org, $TRIES + $WAITERS + 10) };

my $ngx = AQ::LongPoll::start(workers => 1, pool_size => 8, max_wait => '120s',
                              worker_connections => $WAITERS + 1024,
                              log_level => 'warn',
                              http => 'annotation_queue_max_waiting '
                                      . ($WAITERS + 1024) . ';');

# (a) ------------------------------------------------------------------------
my $q = AQ::queue($org, 'latency');
my @lat;
for my $i (1 .. $TRIES) {
    my $c = AQ::LongPoll::wait_claim($ngx, $q, $keys[$i], 'wait=20');
    AQ::LongPoll::wait_parked($ngx, 1) or die "try $i: the waiter did not park\n";
    my $t0 = time;
    AQ::enqueue($q, undef, { n => $i });
    my $res = $c->read_response;
    my $t = time - $t0;
    die "try $i: " . AQ::LongPoll::outcome($res) . "\n" unless $res->{status} == 200;
    push @lat, $t * 1000;
    $c->disconnect;
}
printf "(a) enqueue -> answer, %d tries: median %.2f ms, p99 %.2f ms, max %.2f ms\n",
    $TRIES, pct(50, @lat), pct(99, @lat), pct(100, @lat);

# (b) ------------------------------------------------------------------------
my $wq = AQ::queue($org, 'many');
my $t0 = time;
my @c = map { AQ::LongPoll::wait_claim($ngx, $wq, $keys[$TRIES + $_], 'wait=120',
                                       timeout => 180) } 1 .. $WAITERS;
AQ::LongPoll::wait_parked($ngx, $WAITERS, 120)
    or die "(b) not all $WAITERS waiters parked\n";
printf "(b) %d waiters parked in %.1f s\n", $WAITERS, time - $t0;

# Backends flush their statistics at most once a second (PostgreSQL 15):
# ours is made to flush before the second reading; nginx's, idle, flush
# within 10 s of their last statement.  Besides, the backends of nginx whose
# state changed during the wait (pg_stat_activity).
sleep 11;
my ($worker) = @{ AQ::Faults::worker_pids($ngx) };
my ($cpu0, $x0) = (cpu($worker), xacts());
my ($since) = AQ::dbh()->selectrow_array('SELECT clock_timestamp()');
sleep $IDLE;
AQ::dbh()->do('SELECT pg_stat_force_next_flush()');
my ($cpu1, $x1) = (cpu($worker), xacts());
my ($busy) = AQ::dbh()->selectrow_array(
    q{SELECT count(*) FROM pg_stat_activity
       WHERE datname = current_database() AND pid <> pg_backend_pid()
         AND state_change > ?}, undef, $since);
printf "(b) over %d s of waiting: worker CPU %.2f s, PostgreSQL transactions "
     . "%d, nginx backends that ran a statement %d\n",
    $IDLE, $cpu1 - $cpu0, $x1 - $x0 - 3, $busy;   # 3 of ours: x0, since, flush

$t0 = time;
AQ::enqueue_many($wq, $WAITERS);
my (%seen, $ok, $twice);
for my $c (@c) {
    my $o = AQ::LongPoll::outcome($c->read_response);
    $c->disconnect;
    next unless $o =~ /^200 (\S+)/;
    $ok++;
    $twice++ if $seen{$1}++;
}
printf "(b) %d items in one statement: %d waiters answered 200 in %.1f s, "
     . "%d items twice\n", $WAITERS, $ok // 0, time - $t0, $twice // 0;
AQ::stop_nginx($ngx);
