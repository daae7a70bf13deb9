# nginx -s reload and a killed worker under a steady stream of claims.
#
# A standalone nginx of two workers serves forked clients that claim in a
# loop, each claim with a fresh key: four keep their connection alive, two
# open a new one for every claim.  Meanwhile: `nginx -s reload` (HUP to the
# master), then `kill -9` of one of the new workers.
#
# What must hold:
#   - every claim is answered 200 or 409, with one exception that is the
#     client's to handle, bounded and retried: the connection breaks before
#     any byte of the answer (RST or EOF before the status line).  It happens
#       * at the reload, to a keep-alive connection the old worker closes as
#         idle while the client's next request is on its way (the race every
#         HTTP/1.1 keep-alive client has; RFC 9112 9.3.1 lets it retry);
#       * at the kill, to the requests in flight in the killed worker.
#     Each client has one request at a time, so at most two per client; and
#     at the reload, a new connection never breaks (the listening sockets
#     pass to the new workers; an old worker finishes what it accepted).  The
#     client retries with the same key on a new connection: a claim is safe
#     to repeat (a key holding a live claim gets the same item back), and
#     the retry must be answered 200 or 409.  No other failure (no 5xx, no
#     truncated answer) is accepted.
#   - the new workers serve: after the reload, new worker processes replace
#     the old ones, claims go on being answered once the old ones are gone,
#     and each new worker holds connections to PostgreSQL (its own pool);
#   - the old workers exit, and their server connections close: nginx's
#     backends in pg_stat_activity come back to <= pool_size x workers;
#   - the same after the kill: the master starts a worker in its place, which
#     builds its pool, and the killed one's backends go away;
#   - no item is handed to two keys; the error log has no [alert], [crit] or
#     [emerg] but the master's report of the worker we killed;
#   - a reload while claims are in flight (held at a gate) and waiting in
#     the old workers: they stay until every one is answered 200, then exit
#     and close their connections (last section).
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use Test::More;
use Time::HiRes qw(time sleep);

my $WORKERS = 2;
my $POOL    = 3;
my $CLIENTS = 6;          # 0 .. 3 keep-alive, 4 .. 5 a connection per claim
my $KEYS    = 2500;       # per client (a client that runs out stops)
my $PAUSE   = 0.005;      # between two claims of a client

my $org   = AQ::org('reload');
my $queue = AQ::queue($org, 'reload');
AQ::enqueue_many($queue, $CLIENTS * $KEYS);
my $keys = AQ::keys_for($org, $CLIENTS * $KEYS);

my $ngx = AQ::start_nginx(workers => $WORKERS, http => <<"_EOC_");
    annotation_queue_pool_size $POOL;
    annotation_queue_connect_timeout 2s;
    annotation_queue_query_timeout 5s;
_EOC_
my $port = $ngx->port;

sub phase_log { note sprintf '%.3f %s', time, $_[0] }

my $load = AQ::Faults::background($CLIENTS, sub {
    my ($i) = @_;
    my $keep_alive = $i < 4;
    my @mine = @$keys[$i * $KEYS .. ($i + 1) * $KEYS - 1];
    my $c = AQ::Client->new(port => $port, timeout => 10);
    my %r = (ok => 0, answered => [], broken => [], bad => [], items => {});
    while (!AQ::Faults::stopping()) {
        my $key = shift @mine;
        if (!defined $key) {
            $r{out_of_keys} = 1;
            last;
        }
        my $reused = $c->connected ? 1 : 0;
        my ($st, undef, $body, $err) = $c->claim($queue, $key);
        my $out = AQ::Faults::outcome($st, $body, $err);
        if ($st == 0 && ($err // '') =~ /before the response head/) {
            push @{ $r{broken} }, { t => time, err => $err, reused => $reused };
            $c->disconnect;
            ($st, undef, $body, $err) = $c->claim($queue, $key);
            $out = AQ::Faults::outcome($st, $body, $err);
        }
        if ($out eq '200 item' || $out eq '409 no_items_available') {
            $r{ok}++;
            push @{ $r{answered} }, time;
            if ($out eq '200 item') {
                my $d = AQ::Faults::decode($body);
                $r{items}{ $d->{item}{id} } = $key;
            }
        } else {
            push @{ $r{bad} }, sprintf('%.3f %s', time, $out);
            $c->disconnect;
        }
        $c->disconnect unless $keep_alive;
        Time::HiRes::sleep($PAUSE);
    }
    $r{answered} = [ $r{answered}[0], $r{answered}[-1], $r{answered} ];
    return \%r;
});

sleep 1.5;
my $first = AQ::Faults::worker_pids($ngx);
is(scalar @$first, $WORKERS, "$WORKERS workers at the start");
my @held = map { AQ::Faults::pg_sockets_of($_) } @$first;
my $held = 0;
$held += $_ for @held;
ok($held > 0, 'the first workers hold PostgreSQL connections (' . join(' + ', @held) . ')');

# ---------------------------------------------------------------------------
phase_log('reload');
my $reloaded = time;
my $prefix = $ngx->prefix;
my $out = `$ENV{TEST_NGINX_BINARY} -p $prefix/ -c $prefix/conf/nginx.conf -s reload 2>&1`;
is($?, 0, 'nginx -s reload') or diag $out;

my %old = map { $_ => 1 } @$first;
my $new = AQ::Faults::wait_until(10, sub {
    my @n = grep { !$old{$_} } @{ AQ::Faults::worker_pids($ngx) };
    @n == $WORKERS ? \@n : undef });
ok($new, "the reload starts $WORKERS new workers") or $new = [];

my $gone = AQ::Faults::wait_until(15, sub { !grep { AQ::Faults::alive($_) } @$first });
ok($gone, 'the old workers exit');
my $old_gone_at = time;
phase_log('old workers gone');

sleep 1.5;
my @pooled = map { AQ::Faults::wait_until(5, sub { AQ::Faults::pg_sockets_of($_) }) } @$new;
ok(@$new && !grep({ !$_ } @pooled),
   'each new worker holds PostgreSQL connections of its own pool')
    or diag explain { workers => $new, pg_sockets => \@pooled };
my $fits = AQ::Faults::wait_until(5, sub { AQ::Faults::backends() <= $POOL * $WORKERS });
ok($fits, "the old workers' connections are closed: at most pool_size x workers backends")
    or diag explain AQ::Faults::backend_rows();

# ---------------------------------------------------------------------------
my $victim = $new->[0] // $first->[0];
phase_log("kill -9 $victim");
kill 'KILL', $victim;
my $killed = time;

my $respawned = AQ::Faults::wait_until(10, sub {
    my $now = AQ::Faults::worker_pids($ngx);
    (@$now == $WORKERS && !grep { $_ == $victim } @$now) ? $now : undef });
ok($respawned, 'the master starts a worker in place of the killed one')
    or $respawned = [];
my ($replacement) = grep { my $p = $_; !grep { $_ == $p } @$new } @$respawned;
my $respawned_at = time;

sleep 1.5;
my $rpool = $replacement
    ? AQ::Faults::wait_until(5, sub { AQ::Faults::pg_sockets_of($replacement) }) : 0;
ok($rpool, 'the new worker builds its pool') or diag "replacement: " . ($replacement // 'none');
$fits = AQ::Faults::wait_until(5, sub { AQ::Faults::backends() <= $POOL * $WORKERS });
ok($fits, "the killed worker's connections are closed: at most pool_size x workers backends")
    or diag explain AQ::Faults::backend_rows();

sleep 1;
phase_log('stop');
my $results = $load->stop;

# ---------------------------------------------------------------------------

my @died = map { $_->{died} } grep { $_->{died} } @$results;
is_deeply(\@died, [], 'no client died');
my @bad = map { @{ $_->{bad} || [] } } @$results;
is_deeply(\@bad, [], 'every claim (or its one retry) was answered 200 or 409')
    or diag explain \@bad;
my @short = grep { $_->{out_of_keys} } @$results;
note scalar(@short) . ' clients ran out of keys before the end' if @short;

my @broken = map { @{ $_->{broken} || [] } } @$results;
note sprintf '%d connections broke before an answer (retried): %s', scalar @broken,
             join ', ', map { sprintf '%+.3f s after the %s%s', $_->{t} - ($_->{t} >= $killed ? $killed : $reloaded),
                                      $_->{t} >= $killed ? 'kill' : 'reload',
                                      $_->{reused} ? ' (kept-alive)' : '' } @broken;
# At the reload each old worker closes its idle kept-alive connections as it
# shuts down: a client may lose one to each old worker (it reconnects, and
# a slow old worker may still accept that connection before it stops
# listening); at the kill, only the connection to the killed worker.
my @over = grep {
    my @b = @{ $_->{broken} || [] };
    (grep { $_->{t} < $killed } @b) > $WORKERS || (grep { $_->{t} >= $killed } @b) > 1
} @$results;
is(scalar @over, 0, "at most $WORKERS broken connections per client at the reload "
                    . '(one per old worker), one at the kill')
    or diag explain [map { $_->{broken} } @over];
my @unexplained = grep { !($_->{t} >= $reloaded && $_->{t} < $old_gone_at + 1)
                         && !($_->{t} >= $killed && $_->{t} < $respawned_at + 1) } @broken;
is_deeply(\@unexplained, [], 'connections broke only around the reload and the kill')
    or diag explain \@unexplained;

my @fresh = grep { !$_->{reused} && $_->{t} < $killed } @broken;
is_deeply(\@fresh, [], 'at the reload only kept-alive connections broke: no new connection was '
                       . 'refused or dropped') or diag explain \@fresh;

my $total = 0;
$total += $_->{ok} // 0 for @$results;
my @times = sort { $a <=> $b } map { @{ ref $_->{answered} eq 'ARRAY' ? $_->{answered}[2] : [] } } @$results;
my $after_reload = grep { $_ > $old_gone_at && $_ < $killed } @times;
my $after_kill   = grep { $_ > $respawned_at } @times;
note "$total claims answered; $after_reload between the old workers' exit and the kill, "
     . "$after_kill after the respawn";
cmp_ok($after_reload, '>', 20, 'claims are answered by the new workers after the old ones exited');
cmp_ok($after_kill, '>', 20, 'claims are answered after the killed worker was replaced');

my %holder;
my @twice;
for my $r (@$results) {
    while (my ($item, $key) = each %{ $r->{items} || {} }) {
        push @twice, $item if exists $holder{$item} && $holder{$item} ne $key;
        $holder{$item} = $key;
    }
}
is_deeply(\@twice, [], 'no item was handed to two keys');
my ($dup) = AQ::Faults::db()->selectrow_array(
    q{SELECT count(*) FROM (SELECT claimed_by FROM annotation_queue.items
                             WHERE queue_id = ? AND claimed_by IS NOT NULL
                             GROUP BY claimed_by HAVING count(*) > 1) d}, undef, $queue);
is($dup, 0, 'no key holds two items');

$ngx->stop;
my $problems = AQ::Faults::log_problems($ngx->error_log,
    allow => sub { $_[0] =~ /\[alert\].* worker process $victim exited on signal 9\b/ });
is_deeply($problems, [], 'no [alert], [crit] or [emerg] in the error log but the killed worker')
    or diag explain $problems;

# ---------------------------------------------------------------------------
# A reload while claims are in flight in the old workers: running (held at
# the gate, AQ::Faults::close_gate) and waiting for the pool's one
# connection.  The old workers must stay until they have answered them, and
# answer every one of them 200 once the gate opens (nothing dropped, nothing
# failed for the reload); a claim sent after the reload goes to a new
# worker; then the old workers exit and their connections close.
AQ::Faults::install_gate();
{
    my $what = 'reload with claims in flight';
    my $q = AQ::queue($org, 'reload-in-flight');
    AQ::enqueue_many($q, 20);
    my @k = @{ AQ::keys_for($org, 10) };
    # the claims wait at the gate while nginx reloads, which takes seconds
    # under valgrind (nginx -s reload runs under it too): their query
    # timeout must stay far away
    my $query_timeout = 10 * AQ::slow();
    my $n2 = AQ::start_nginx(workers => $WORKERS, http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_connect_timeout 2s;
    annotation_queue_query_timeout ${query_timeout}s;
_EOC_
    # nginx listens before its master forks the workers (under valgrind,
    # seconds before): wait for them, or one would count as a new worker
    my $old = AQ::Faults::wait_until(5, sub {
        my $w = AQ::Faults::worker_pids($n2);
        @$w == $WORKERS ? $w : undef }) || [];
    my $gate = AQ::Faults::close_gate(AQ::Faults::session());
    my @c;
    for my $key (@k[0 .. 7]) {
        my $c = AQ::Client->new(port => $n2->port, timeout => 20);
        $c->send_request(body => qq({"queue_id":"$q"}), key => $key);
        push @c, [$c, $key];
    }
    my $running = AQ::Faults::wait_until(5, sub { AQ::Faults::backends(lock => 1) >= 1 });
    ok($running, "$what: claims run, held at the gate; the others wait for the connection");
    # the old workers with claims in flight are those holding a connection
    # (which worker takes a client connection is the kernel's choice)
    my @busy = grep { AQ::Faults::pg_sockets_of($_) } @$old;
    note "$what: " . scalar(@busy) . " of the old workers hold claims in flight";

    my $p2 = $n2->prefix;
    my $o = `$ENV{TEST_NGINX_BINARY} -p $p2/ -c $p2/conf/nginx.conf -s reload 2>&1`;
    is($?, 0, "$what: nginx -s reload") or diag $o;
    my %was = map { $_ => 1 } @$old;
    my $new2 = AQ::Faults::wait_until(10, sub {
        my @n = grep { !$was{$_} } @{ AQ::Faults::worker_pids($n2) };
        @n == $WORKERS ? \@n : undef });
    ok($new2, "$what: new workers start");
    sleep 1;
    my @alive = grep { AQ::Faults::alive($_) } @busy;
    ok(@busy && @alive == @busy, "$what: the old workers stay while their claims are in flight");

    my $late = AQ::Client->new(port => $n2->port, timeout => 20);
    $late->send_request(body => qq({"queue_id":"$q"}), key => $k[8]);
    push @c, [$late, $k[8]];
    sleep 0.3;

    AQ::Faults::open_gate($gate);
    my (@out, @problems);
    for (@c) {
        my ($c, $key) = @$_;
        my $r = $c->read_response;
        my $out = AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error});
        push @out, $out;
        push @problems, AQ::Faults::claim_problems($key, $r->{body}) if $out eq '200 item';
    }
    is_deeply(\@out, [('200 item') x 9],
              "$what: once the gate opens, every claim in flight in the old workers, and the one "
              . 'sent after the reload, answers 200') or diag explain \@out;
    is_deeply(\@problems, [], "$what: ... each with an item its key holds");

    my $gone2 = AQ::Faults::wait_until(10, sub { !grep { AQ::Faults::alive($_) } @$old });
    ok($gone2, "$what: then the old workers exit");
    my $fits2 = AQ::Faults::wait_until(5, sub { AQ::Faults::backends() <= 1 * $WORKERS });
    ok($fits2, "$what: ... and their connections close: at most pool_size x workers backends")
        or diag explain AQ::Faults::backend_rows();
    my ($st) = AQ::Faults::outcome((AQ::Client->new(port => $n2->port)->claim($q, $k[9]))[0, 2, 3]);
    is($st, '200 item', "$what: the new workers serve");

    $n2->stop;
    is_deeply(AQ::Faults::log_problems($n2->error_log), [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

done_testing();
