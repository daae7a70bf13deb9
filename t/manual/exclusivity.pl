#!/usr/bin/env perl
# Exclusivity under load: a queue of N items drained by C clients through an
# nginx of two workers, each item claimed exactly once; then again while
# PostgreSQL is stopped (pg_ctl stop -m immediate) and started once in the
# middle: still no item claimed twice, and every item ends claimed or
# claimable.  Like Jepsen's total-queue: every item is delivered once, lost,
# or duplicated, and only the first is allowed.
#
#   make test-exclusivity                                     # 100,000 items, 64 clients
#   perl -I t/lib t/manual/exclusivity.pl                     # the same, built already
#   AQ_EXCL_ITEMS=5000 perl -I t/lib t/manual/exclusivity.pl  # a quick check
#
# make test runs a short form (2,500 items, 32 clients): t/135-exclusivity.t.
#
# Environment: AQ_EXCL_ITEMS (100000), AQ_EXCL_CLIENTS (64), AQ_EXCL_WORKERS
# (2), AQ_EXCL_POOL (8, per worker), AQ_EXCL_DOWN (seconds PostgreSQL stays
# down, 1).  It builds nothing: run `make` first.  It runs its own
# PostgreSQL cluster (scripts/pg.sh in a temporary directory), never the
# one of $AQ_TEST_PG_DSN, since it stops it.
#
# Each claim uses a fresh key (a key holding a live claim gets its item
# back, so reusing keys would measure resumes).  A claim that fails (503,
# 504, a broken connection: the server went away) is repeated with the same
# key until it is answered 200 or 409: if the failed attempt committed, the
# repeat gets that item back, so even an answer lost with the server is
# delivered once.  A key is given up after AQ_EXCL_GIVE_UP seconds (30) of
# failures; its item, if any, stays claimed ("orphaned").
#
# Checked for each run, from the clients' answers and the database:
#   duplicates   an item answered to two keys, or claimed twice (version or
#                attempts above 1): must be 0
#   lost         items neither claimed nor available: must be 0
#   mismatched   an answered item the database says another key holds, or
#                at another version: must be 0
#   left         items still available after every client got 409 (a false
#                409): must be 0
#   orphaned     items claimed in the database that no client was answered:
#                at most the keys given up
# and no client died, no [alert]/[crit]/[emerg] or crashed worker in nginx's
# error log.  One line per run:
#
#   exclusivity: 100000 items, 100000 claims, 0 duplicates, 0 lost, ...
#
# and the exit status is 1 on any violation.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/../lib";
BEGIN {
    delete $ENV{AQ_TEST_PG_DSN};    # our own cluster: we stop it
    $ENV{PG_MAX_CONNECTIONS} ||= 200;
    require AQ::Faults;
    AQ::Faults::own_cluster();
}
use AQ;
use Digest::SHA qw(sha256_hex);
use Fcntl qw(:flock SEEK_SET);
use File::Temp qw(tempdir);
use Time::HiRes qw(time sleep);

$| = 1;
my $N       = $ENV{AQ_EXCL_ITEMS}   // 100_000;
my $CLIENTS = $ENV{AQ_EXCL_CLIENTS} // 64;
my $WORKERS = $ENV{AQ_EXCL_WORKERS} // 2;
my $POOL    = $ENV{AQ_EXCL_POOL}    // 8;
my $DOWN    = $ENV{AQ_EXCL_DOWN}    // 1;
my $GIVE_UP = $ENV{AQ_EXCL_GIVE_UP} // 30;
my $BATCH   = 16;    # keys a client takes from the shared supply at once

sub say_ { print "# ", @_, "\n" }

my $org = AQ::org('exclusivity');

# keys, handed out through a shared counter (flock); the second run uses
# them again, on another queue, where none of them holds anything
my $nkeys = $N + ($BATCH + 2) * $CLIENTS;
my $t0 = time;
my $keys = AQ::keys_for($org, $nkeys);
say_ sprintf '%d keys in %.1f s', $nkeys, time - $t0;

my $ngx = AQ::start_nginx(workers => $WORKERS, http => <<"_EOC_");
    annotation_queue_pool_size $POOL;
    annotation_queue_max_waiting 1024;
    annotation_queue_connect_timeout 2s;
    annotation_queue_query_timeout 10s;
_EOC_
say_ "nginx: $WORKERS workers, pool $POOL, on port ", $ngx->port;

my $tmp = tempdir('aq-excl-XXXXXX', TMPDIR => 1, CLEANUP => 1);

sub take_keys {
    my ($counter) = @_;
    open my $fh, '+<', $counter or die "$counter: $!";
    flock $fh, LOCK_EX or die "flock: $!";
    my $next = <$fh> // 0;
    chomp $next;
    my $from = $next || 0;
    my $to = $from + $BATCH - 1;
    $to = $nkeys - 1 if $to > $nkeys - 1;
    seek $fh, 0, SEEK_SET;
    truncate $fh, 0;
    print $fh $to + 1, "\n";
    close $fh;
    return $from > $to ? () : ($from .. $to);
}

# One client: fresh keys until the queue answers 409.
sub client {
    my ($queue, $counter) = @_;
    my $c = AQ::Client->new(port => $ngx->port, timeout => 30);
    my %r = (claims => [], fail => {}, retried => 0, abandoned => 0);
    my @mine;
    KEY: while (1) {
        @mine = take_keys($counter) unless @mine;
        if (!@mine) {
            $r{out_of_keys} = 1;
            last;
        }
        my $ki = shift @mine;
        my $first = time;
        my $tries = 0;
        while (1) {
            $tries++;
            my ($st, undef, $body, $err) = $c->claim($queue, $keys->[$ki]);
            my $out = AQ::Faults::outcome($st, $body, $err);
            if ($out eq '200 item') {
                my $it = AQ::Faults::decode($body)->{item};
                push @{ $r{claims} }, [$it->{id}, $ki, $it->{version}];
                $r{retried}++ if $tries > 1;
                next KEY;
            }
            if ($out eq '409 no_items_available') {
                $r{empty_at} = time;
                last KEY;
            }
            $out =~ s/^0 .*/broken connection/;
            $r{fail}{$out}++;
            $c->disconnect if !$st;
            if (time - $first > $GIVE_UP) {
                $r{abandoned}++;
                next KEY;
            }
            sleep 0.05;
        }
    }
    return \%r;
}

my $violations = 0;

sub run {
    my ($name, %o) = @_;
    my $queue = AQ::queue($org, $name);
    my $t = time;
    AQ::Faults::db()->selectrow_array(
        q{SELECT count(annotation_queue.enqueue(?, jsonb_build_object('n', g)))
            FROM generate_series(1, ?) AS g}, undef, $queue, $N);
    say_ sprintf '%s: %d items in %.1f s', $name, $N, time - $t;

    my $counter = "$tmp/$name.counter";
    open my $fh, '>', $counter or die $!;
    print $fh "0\n";
    close $fh;

    $t = time;
    my $bg = AQ::Faults::background($CLIENTS, sub { client($queue, $counter) });
    # the clients end by themselves at their 409; stop() only collects
    my $restarted = '';
    if ($o{restart}) {
        my $half = int($N / 2);
        AQ::Faults::wait_until(3600, sub {
            !$bg->running || (eval { AQ::Faults::db()->selectrow_array(
                q{SELECT count(*) FROM annotation_queue.items
                   WHERE queue_id = ? AND status = 'claimed'}, undef, $queue) } // 0) >= $half });
        my $at = time - $t;
        AQ::Faults::forget(AQ::Faults::db());
        AQ::Faults::pg_stop();
        sleep $DOWN;
        AQ::Faults::pg_start();
        $restarted = sprintf ', PostgreSQL restarted at %.1f s (down %.1f s)', $at, time - $t - $at;
    }
    my $results = wait_clients($bg);
    my $elapsed = time - $t;

    check($name, $queue, $results, $elapsed, $restarted);
}

sub wait_clients {
    my ($bg) = @_;
    # stop() writes the stop file, which client() does not read: it waits
    # for the children to end on their own, up to an hour
    return $bg->stop(timeout => 3600);
}

sub check {
    my ($name, $queue, $results, $elapsed, $restarted) = @_;
    my (%answered, %dup_answer, $claims, %fail, $retried, $abandoned, $died, $no_keys);
    for my $r (@$results) {
        if ($r->{died}) {
            $died++;
            say_ "$name: a client died: $r->{died}";
            next;
        }
        $no_keys++ if $r->{out_of_keys};
        $retried += $r->{retried};
        $abandoned += $r->{abandoned};
        $fail{$_} += $r->{fail}{$_} for keys %{ $r->{fail} };
        for my $cl (@{ $r->{claims} }) {
            my ($id, $ki, $version) = @$cl;
            $claims++;
            $dup_answer{$id}++ if exists $answered{$id};
            $answered{$id} = [$ki, $version];
        }
    }
    $claims //= 0;

    my $rows = AQ::Faults::db()->selectall_arrayref(
        q{SELECT i.id, i.status, i.version, i.attempts, encode(k.key_hash, 'hex')
            FROM annotation_queue.items i
            LEFT JOIN annotation_queue.api_keys k ON k.id = i.claimed_by
           WHERE i.queue_id = ?}, undef, $queue);
    my %status;
    my ($twice, $mismatch, $orphans) = (0, 0, 0);
    my %db;
    for my $row (@$rows) {
        my ($id, $status, $version, $attempts, $hash) = @$row;
        $db{$id} = 1;
        $status{$status}++;
        $twice++ if $version > 1 || $attempts > 1;
        if ($status eq 'claimed') {
            if (my $a = $answered{$id}) {
                $mismatch++ if ($hash // '') ne sha256_hex($keys->[ $a->[0] ])
                               || $a->[1] ne $version;
            } else {
                $orphans++;
            }
        } elsif ($answered{$id}) {
            $mismatch++;    # answered, yet not claimed in the database
        }
    }
    $mismatch += grep { !$db{$_} } keys %answered;
    my $duplicates = keys(%dup_answer) + $twice;
    my $claimed    = $status{claimed} // 0;
    my $available  = $status{available} // 0;
    my $lost       = $N - $claimed - $available;
    my $fails      = join(', ', map { "$fail{$_} $_" } sort keys %fail) || 'none';

    my @v;
    push @v, "$duplicates duplicates"        if $duplicates;
    push @v, "$lost lost"                    if $lost;
    push @v, "$mismatch mismatched"          if $mismatch;
    push @v, "$available left available"     if $available;
    push @v, "$orphans orphaned > $abandoned keys given up" if $orphans > ($abandoned // 0);
    push @v, "$died clients died"            if $died;
    push @v, "$no_keys clients ran out of keys" if $no_keys;

    printf "exclusivity: %d items, %d claims, %d duplicates, %d lost, %d mismatched, "
           . "%d left available, %d orphaned, %d claimed in the database; "
           . "%.1f s (%.0f claims/s)%s; failed attempts: %s; %d keys repeated until answered, %d given up%s\n",
           $N, $claims, $duplicates, $lost, $mismatch, $available, $orphans, $claimed,
           $elapsed, $claims / ($elapsed || 1), $restarted, $fails, $retried // 0,
           $abandoned // 0, @v ? ' -- VIOLATION: ' . join(', ', @v) : '';
    $violations += @v;
}

run('steady');
run('restart', restart => 1);

$ngx->stop;
my $problems = AQ::Faults::log_problems($ngx->error_log);
if (@$problems) {
    print "exclusivity: nginx's error log: $_\n" for @$problems[0 .. ($#$problems < 9 ? $#$problems : 9)];
    $violations++;
}
print $violations ? "exclusivity: FAILED\n" : "exclusivity: ok\n";
exit($violations ? 1 : 0);
