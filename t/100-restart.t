# PostgreSQL stopped (pg_ctl stop -m immediate) and started again under a
# running nginx of two workers: while the pools are idle (claims meet the
# server down), between two claims (no claim sees it down), and while claims
# are in flight (held at a gate in the executor, AQ::Faults::close_gate):
#
#   - after a restart that no claim saw (stop, start, then claims), no claim
#     fails on a connection to the server that went away;
#   - claims in flight get 503 or 504 JSON within the query timeout:
#     claims running alone, claims that went out together on one connection,
#     claims waiting for a connection (see below);
#   - claims made while the server is down get 503 database_unavailable
#     with Retry-After, at once: well before the shortest timer (the connect
#     timeout) could have answered them;
#   - once the server is back on the same port, the first claims succeed
#     without an nginx reload, and then every pooled connection has
#     recovered: pool_size x workers x 3 claims one after the other, each on
#     a new client connection (so that both workers take some), then as many
#     again from parallel clients: every one is a 200 whose item the database
#     says the key holds (none fails on a stale connection);
#   - nginx never holds more than pool_size x workers server connections,
#     and its error log has no [alert], [crit], [emerg] or crashed worker.
#
# The timeouts are long (and scale with AQ::slow()): the steps between
# sending claims and stopping the server wait for what nginx and PostgreSQL
# must do (pg_stat_activity, the status page), which takes a while on a
# loaded machine, and no claim may time out meanwhile.  "At once" is a
# bound half as long as the shortest timer a claim could wait for.
#
# The suite runs its own PostgreSQL cluster (AQ::Faults::own_cluster): the
# one scripts/test.sh started serves the other suites and is never stopped.
use strict;
use warnings;

use lib 't/lib';
BEGIN { require AQ::Faults; AQ::Faults::own_cluster() }
use AQ;
use List::Util qw(max);
use Test::More;
use Time::HiRes qw(time sleep);

my $WORKERS         = 2;
my $POOL            = 3;
my $CONNECT_TIMEOUT = AQ::Faults::scaled(5);     # seconds, times AQ::slow()
my $QUERY_TIMEOUT   = AQ::Faults::scaled(10);
# "at once": each 503 of a stopped server within this; one that waited for
# a timer would take the connect timeout at least
my $FAST            = $CONNECT_TIMEOUT / 2;
# The first claims after a restart open connections to a server that has
# just recovered (cold caches, on a loaded machine 0.1-1 s); a pool that
# waited for a timer to recover would take the connect timeout (and the
# query timeout, for a claim that waited) or fail.
my $FIRST           = $CONNECT_TIMEOUT - 1;

my $org   = AQ::org('restart');
my $queue = AQ::queue($org, 'restart');
AQ::enqueue_many($queue, 3000);
my @keys = @{ AQ::keys_for($org, 2000) };    # one fresh key per claim
my $next_key = 0;
sub fresh_key { return $keys[ $next_key++ ] // die "out of keys\n" }
sub take_keys { my ($n) = @_; return [map { fresh_key() } 1 .. $n] }

# fixtures are all made: AQ's own handle would not survive the restarts
# (AQ::Faults::db() reconnects)
AQ::dbh()->disconnect;

# The clients use a second server of the same nginx that listens with
# reuseport: each worker has a listening socket of its own and the kernel
# spreads new connections evenly (by a hash of their addresses), so that
# each worker gets its share of the claims in flight (with one shared
# socket, a busy machine may hand nearly all of them to one worker).
# That server also serves the status page (AQ::Faults::pool_state).
my $port = AQ::free_port();
my $ngx = AQ::start_nginx(workers => $WORKERS, http => <<"_EOC_");
    annotation_queue_pool_size $POOL;
    annotation_queue_connect_timeout ${CONNECT_TIMEOUT}s;
    annotation_queue_query_timeout ${QUERY_TIMEOUT}s;
    log_format timing '\$msec \$pid \$status \$request_time db=\$annotation_queue_db_time '
                      '\$annotation_queue_outcome';

    server {
        listen 127.0.0.1:$port reuseport;
        access_log logs/access.log timing;
        location = $AQ::URI {
            annotation_queue_claim;
        }
        location = $AQ::Faults::STATUS_URI {
            annotation_queue_status;
        }
    }
_EOC_

# One claim on a new client connection: (outcome, seconds, headers, problems).
sub claim_once {
    my ($key) = @_;
    my $c = AQ::Client->new(port => $port, timeout => 15);
    my $t0 = time;
    my ($status, $h, $body, $err) = $c->claim($queue, $key);
    my $took = time - $t0;
    my $out = AQ::Faults::outcome($status, $body, $err);
    my @p = $out eq '200 item' ? AQ::Faults::claim_problems($key, $body) : ();
    return ($out, $took, $h, \@p);
}

# Every pooled connection serves: $n sequential claims on new connections,
# then $n parallel clients of 3 claims each.  All must be 200 and agree
# with the database.
sub check_recovered {
    my ($what) = @_;
    my $n = $POOL * $WORKERS * 3;

    my (@bad, @problems);
    for my $key (@{ take_keys($n) }) {
        my ($out, undef, undef, $p) = claim_once($key);
        push @bad, $out unless $out eq '200 item';
        push @problems, @$p;
    }
    is_deeply(\@bad, [], "$what: $n claims one after the other on new connections: all 200")
        or diag explain \@bad;

    my $keys = take_keys($n * 3);
    my $res = AQ::parallel($n, sub {
        my ($i) = @_;
        my $c = AQ::Client->new(port => $port, timeout => 15);
        my @r;
        for my $key (@$keys[$i * 3 .. $i * 3 + 2]) {
            my ($status, undef, $body, $err) = $c->claim($queue, $key);
            push @r, [$key, AQ::Faults::outcome($status, $body, $err), $body];
        }
        return \@r;
    });
    my @answers = map { ref $_ eq 'ARRAY' ? @$_ : ['', "died: $_->{died}", ''] } @$res;
    my @pbad = map { $_->[1] } grep { $_->[1] ne '200 item' } @answers;
    is_deeply(\@pbad, [], "$what: $n parallel clients x 3 claims: all 200")
        or diag explain \@pbad;
    push @problems, AQ::Faults::claim_problems($_->[0], $_->[2])
        for grep { $_->[1] eq '200 item' } @answers;
    is_deeply(\@problems, [], "$what: every item answered is held by the key that claimed it")
        or diag explain \@problems;

    cmp_ok(AQ::Faults::backends(), '<=', $POOL * $WORKERS,
           "$what: nginx holds at most pool_size x workers connections");
}

# Claims while the server is down: each 503 database_unavailable with
# Retry-After, each at once.  Sequential on new connections, then parallel.
sub check_down {
    my ($what) = @_;
    my (@bad, @slow, @times);
    for (1 .. 2 * $POOL * $WORKERS) {
        my ($out, $took, $h) = claim_once(fresh_key());
        push @times, $took;
        push @bad, $out unless $out eq '503 database_unavailable'
                               && ($h->{'retry-after'} // '') =~ /^\d+$/
                               && ($h->{'content-type'} // '') =~ m{^application/json};
        push @slow, sprintf('%.3f s', $took) if $took >= $FAST;
    }
    is_deeply(\@bad, [], "$what: new claims get 503 database_unavailable JSON with Retry-After")
        or diag explain \@bad;
    is_deeply(\@slow, [], "$what: ... each at once (under $FAST s)") or diag explain \@slow;
    note sprintf '%s: slowest 503 in %.3f s', $what, max(@times);

    # concurrent claims from one process (forked clients would measure
    # their own start on a loaded machine): all sent, then all read
    my @burst = map { [AQ::Client->new(port => $port, timeout => 15), fresh_key()] }
                1 .. 2 * $POOL * $WORKERS;
    my $t0 = time;
    $_->[0]->send_request(body => qq({"queue_id":"$queue"}), key => $_->[1]) for @burst;
    my @pbad;
    for (@burst) {
        my $r = $_->[0]->read_response;
        my $took = time - $t0;
        my $out = AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error});
        push @pbad, $took >= $FAST ? sprintf('%s after %.3f s', $out, $took) : $out;
    }
    @pbad = grep { $_ ne '503 database_unavailable' } @pbad;
    is_deeply(\@pbad, [], "$what: concurrent new claims: all 503 database_unavailable at once")
        or diag explain \@pbad;
}

# The first claims once the server is back: each on a new connection, and
# they must succeed (no reload, no waiting for a pool's timer).
sub check_first {
    my ($what) = @_;
    my (@out, @took);
    for (1 .. 4) {
        my ($out, $took, undef, $p) = claim_once(fresh_key());
        push @took, $took;
        push @out, $out eq '200 item' && !@$p && $took < $FIRST ? 'ok'
                   : sprintf('%s in %.3f s %s', $out, $took, join '; ', @$p);
    }
    note "$what: the first claims took " . join ', ', map { sprintf '%.3f s', $_ } @took;
    is_deeply(\@out, [('ok') x 4],
              "$what: the first claims after the restart answer 200, without a reload")
        or diag explain \@out;
}

# ---------------------------------------------------------------------------

{
    my $what = 'warm';
    check_recovered($what);
    cmp_ok(AQ::Faults::backends(), '>', 0, "$what: the pools hold connections");
}

{
    my $what = 'stopped while idle';
    AQ::Faults::pg_stop();
    # the claims must meet the server down, not connections nginx has not
    # yet seen closed: the idle connections' ends are read as they close
    my $seen = AQ::Faults::wait_until(5, sub { AQ::Faults::pool_state($port)->{open} == 0 });
    ok($seen, "$what: nginx closes its idle connections to the server that went away")
        or diag explain AQ::Faults::pool_state($port);
    check_down($what);

    AQ::Faults::pg_start();
    check_first("$what, restarted");
    check_recovered("$what, restarted");
}

{
    my $what = 'stopped and started again between two claims';
    # no claim meets the server down: the pools still hold the connections
    # of the server that went away when the first claims come
    check_recovered('before the restart');
    AQ::Faults::pg_stop();
    AQ::Faults::pg_start();
    check_first($what);
    check_recovered($what);
}

# In flight at the stop: in each worker, claims that run alone, claims that
# went out together on one connection (one statement for the claims of one
# queue that waited, in this version), and claims still waiting for a
# connection.  All are held at the gate (AQ::Faults::close_gate: blocked in
# the executor).  To get the claims that wait out together, one connection
# of each worker is closed by the server (pg_terminate_backend: its claim
# gets 503): the worker opens another and sends the waiting claims on it.
AQ::Faults::install_gate();

# Sends $n claims at once, each on its own connection: [client, time sent].
sub send_claims {
    my ($n) = @_;
    my @clients;
    for (1 .. $n) {
        my $c = AQ::Client->new(port => $port, timeout => $QUERY_TIMEOUT / AQ::slow() + 10);
        $c->send_request(body => qq({"queue_id":"$queue"}), key => fresh_key());
        push @clients, [$c, time];
    }
    return @clients;
}

{
    my $what = 'stopped while claims are in flight';

    # every worker's pool full and idle first: claims held at the gate make
    # each worker open all its connections; then they go through
    my $gate = AQ::Faults::close_gate(AQ::Faults::session());
    my @warm = send_claims(4 * $POOL * $WORKERS);
    my $full = AQ::Faults::wait_until(5, sub {
        AQ::Faults::backends(lock => 1) >= $POOL * $WORKERS ? 1 : 0 });
    AQ::Faults::open_gate($gate);
    my @wout = map { AQ::Faults::outcome(@{ $_->[0]->read_response }{qw(status body error)}) } @warm;
    is_deeply([grep { $_ ne '200 item' } @wout], [],
              "$what: with the gate closed then opened, every worker fills its pool: all 200");
    my @held = map { AQ::Faults::pg_sockets_of($_) } @{ AQ::Faults::worker_pids($ngx) };
    is_deeply(\@held, [($POOL) x $WORKERS], "$what: ... each worker holds $POOL connections");

    # then: each worker's connections each take a claim, alone; the others wait
    AQ::Faults::close_gate($gate);
    my $n = 4 * $POOL * $WORKERS;
    my @clients = send_claims($n);
    my $blocked = AQ::Faults::wait_until(5, sub {
        AQ::Faults::backends(lock => 1) >= $POOL * $WORKERS ? 1 : 0 });
    ok($blocked, "$what: every pooled connection runs a claim held at the gate")
        or diag explain AQ::Faults::backend_rows();
    my %before = map { $_->[0] => 1 } @{ AQ::Faults::backend_rows() };
    my @workers = @{ AQ::Faults::worker_pids($ngx) };
    my @victims = map { AQ::Faults::pg_ports_of($_)->[0] // () } @workers;
    my $terminated = 0;
    $terminated += AQ::Faults::terminate_port($_) for @victims;
    is($terminated, $WORKERS, "$what: one connection of each worker is closed by the server");
    $blocked = AQ::Faults::wait_until(5, sub {
        my @lock = grep { $_->[2] eq 'Lock' } @{ AQ::Faults::backend_rows() };
        my @new = grep { !$before{ $_->[0] } } @lock;
        @lock == $POOL * $WORKERS && @new == $WORKERS });
    ok($blocked, "$what: ... and replaced: the claims that waited run on it, held at the gate")
        or diag explain AQ::Faults::backend_rows();
    my $batches = grep { $_->[2] eq 'Lock' && $_->[3] =~ /unnest/ } @{ AQ::Faults::backend_rows() };
    note "$what: $batches of the statements in flight carry several claims";

    # and more claims that wait, every connection being busy
    my $waited = AQ::Faults::pool_state($port)->{waiting};
    push @clients, send_claims(2 * $POOL * $WORKERS);
    $n = @clients;
    my $waiting = AQ::Faults::wait_until(5, sub {
        AQ::Faults::pool_state($port)->{waiting} == $waited + 2 * $POOL * $WORKERS });
    ok($waiting, "$what: ... and " . 2 * $POOL * $WORKERS . " more claims wait for a connection")
        or diag explain AQ::Faults::pool_state($port);

    AQ::Faults::pg_stop();
    my $stopped = time;
    AQ::Faults::forget($gate);    # its session died with the server

    # (each answer is read after the ones before it: the time of an answer
    # is at most when it was read)
    my (@bad, @late, @took, %seen);
    for (@clients) {
        my ($c, $sent) = @$_;
        my $r = $c->read_response;
        my $took = time - $sent;
        push @took, $took;
        my $out = AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error});
        $seen{$out}++;
        push @bad, $out unless $out =~ /^(?:503 database_unavailable|504 query_timeout)$/
                               && ($r->{headers}{'content-type'} // '') =~ m{^application/json};
        push @late, sprintf('%s %.3f s after the stop', $out, time - $stopped)
            if time - $stopped > $QUERY_TIMEOUT;
    }
    is_deeply(\@bad, [], "$what: each of the $n claims in flight gets 503 or 504 JSON")
        or diag explain \@bad;
    is_deeply(\@late, [], "$what: ... within the query timeout (${QUERY_TIMEOUT}s) of the stop")
        or diag explain \@late;
    note sprintf '%s: %s; slowest %.3f s after its request, all answered %.3f s after the stop',
                 $what, join(', ', map { "$seen{$_} $_" } sort keys %seen), max(@took),
                 time - $stopped;

    check_down("$what, still down");

    AQ::Faults::pg_start();
    check_first("$what, restarted");
    check_recovered("$what, restarted");
}

$ngx->stop;
my $bad = AQ::Faults::log_problems($ngx->error_log);
is_deeply($bad, [], 'no [alert], [crit], [emerg] or crashed worker in the error log')
    or diag explain $bad;

done_testing();
