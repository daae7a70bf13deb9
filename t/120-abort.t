# Clients that go away: raw sockets that close (FIN) or reset (RST) the
# connection in the middle of the body, right after the headers, right after
# a complete request, after two pipelined requests, while their claim runs
# (blocked on a lock) and while it waits for a connection.  Then:
#
#   - no crash: the worker is the same process, and the error log has no
#     [alert], [crit], [emerg] or "exited on signal";
#   - no leaked connection: nginx holds at most pool_size x workers server
#     connections, none of them busy; and the pool serves at full size:
#     with every claim blocked on a lock, pool_size claims run at once (one
#     per connection), and once the lock goes, pool_size parallel claims all
#     answer 200 quickly, each with an item its key holds;
#   - an item claimed for a client that vanished (the claim commits: the
#     server never hears of the client) returns to the queue when its lease
#     expires: another key claims it then, with attempts = 2 and version 2,
#     and not before;
#   - clients that go away while their claims run together on one
#     connection (claims that waited for it go as one statement in this
#     version): those that stayed get their items, the pool serves on.
#
# One worker, so that "the pool" is exactly one pool of pool_size
# connections (which worker takes a connection is the kernel's choice).
#
# No step sleeps for nginx or PostgreSQL to have done something: each waits
# (AQ::Faults::wait_until, deadlines times AQ::slow()) for what shows it:
# pg_stat_activity, the status page (connections, claims waiting), the
# error log's "client prematurely closed connection", the lease's end in
# the database.  The pauses of the clients themselves (a client that sends,
# waits a little, and goes) stay: nothing depends on their length.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use Test::More;
use Time::HiRes qw(time sleep);

my $POOL = 4;
my $PER  = 8;    # sockets per way of going away

my $org   = AQ::org('abort');
my $queue = AQ::queue($org, 'abort');
AQ::enqueue_many($queue, 400);
my @keys = @{ AQ::keys_for($org, 600) };
my $next_key = 0;
sub fresh_key { return $keys[ $next_key++ ] // die "out of keys\n" }

# The timeouts times AQ::slow(); the claims blocked by the lock must not
# time out while the steps around them wait for nginx.
my $CONNECT_TIMEOUT = AQ::Faults::scaled(2);
my $QUERY_TIMEOUT   = AQ::Faults::scaled(10);
my $sport = AQ::free_port();    # the status page
my $ngx = AQ::start_nginx(workers => 1, http => <<"_EOC_" . AQ::Faults::status_server($sport));
    annotation_queue_pool_size $POOL;
    annotation_queue_max_waiting 64;
    annotation_queue_connect_timeout ${CONNECT_TIMEOUT}s;
    annotation_queue_query_timeout ${QUERY_TIMEOUT}s;
_EOC_
my $port = $ngx->port;

sub pool_state { return AQ::Faults::pool_state($sport) }

# nginx's notices of clients gone while their request waited for its answer
my $GONE = qr/client prematurely closed connection/;
sub gone_count { return AQ::Faults::log_count($_[0] // $ngx, $GONE) }

# The gate (AQ::Faults::install_gate): a claim held there has its
# statements prepared; a claim blocked by the table lock on a new
# connection would not even get them prepared.
AQ::Faults::install_gate();

# Opens every connection of the pool: $POOL claims of $POOL queues (claims
# of one queue that wait go out together, on one connection) held at the
# gate until each runs on a connection of its own.
sub fill_pool {
    my ($what) = @_;
    my $gate = AQ::Faults::close_gate(AQ::Faults::session());
    my @c;
    for my $i (1 .. $POOL) {
        my $q = AQ::queue($org, "fill-$i-" . AQ::random_hex(4));
        AQ::enqueue_many($q, 1);
        my $c = AQ::Client->new(port => $port, timeout => 10);
        $c->send_request(body => qq({"queue_id":"$q"}), key => fresh_key());
        push @c, $c;
    }
    my $full = AQ::Faults::wait_until(5, sub { AQ::Faults::backends(lock => 1) == $POOL });
    AQ::Faults::open_gate($gate);
    my @out = map { my $r = $_->read_response;
                    AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error}) } @c;
    ok($full && !grep({ $_ ne '200 item' } @out),
       "$what: the pool opens its $POOL connections (claims held at the gate, then 200)")
        or diag explain [AQ::Faults::backend_rows(), \@out];
}

sub claim_once {
    my ($key) = @_;
    my $c = AQ::Client->new(port => $port, timeout => 10);
    my ($status, undef, $body, $err) = $c->claim($queue, $key);
    return (AQ::Faults::outcome($status, $body, $err), $body);
}

my ($warm) = claim_once(fresh_key());
is($warm, '200 item', 'a first claim answers 200');
my $workers = AQ::Faults::worker_pids($ngx);
is(scalar @$workers, 1, 'one worker') or diag explain $workers;

# ---------------------------------------------------------------------------
# The ways of going away.  Each sub opens its sockets, sends, and closes
# (with reset => 1: SO_LINGER 0, the kernel sends RST).

sub go_away {
    my ($n, $bytes_of, %o) = @_;
    my @s;
    for (1 .. $n) {
        my $s = AQ::Faults::raw_connect($port);
        AQ::Faults::raw_send($s, $bytes_of->(fresh_key()));
        push @s, $s;
    }
    sleep($o{before_close} // 0.05);
    AQ::Faults::raw_close($_, reset => $o{reset}) for @s;
}

my %ways = (
    'in the middle of the body' => sub {
        my ($head, $body) = AQ::Faults::claim_bytes($queue, $_[0]);
        return $head . substr($body, 0, 10);
    },
    'right after the headers' => sub {
        my ($head) = AQ::Faults::claim_bytes($queue, $_[0]);
        return $head;
    },
    'in the middle of the headers' => sub {
        my ($head) = AQ::Faults::claim_bytes($queue, $_[0]);
        return substr($head, 0, 40);
    },
    'right after a complete request' => sub {
        my ($head, $body) = AQ::Faults::claim_bytes($queue, $_[0]);
        return $head . $body;
    },
    'after two pipelined requests' => sub {
        my ($head, $body) = AQ::Faults::claim_bytes($queue, $_[0]);
        my ($head2, $body2) = AQ::Faults::claim_bytes($queue, fresh_key());
        return $head . $body . $head2 . $body2;
    },
    'with a body longer than announced' => sub {
        my ($head, $body) = AQ::Faults::claim_bytes($queue, $_[0], length => 5);
        return $head . $body;
    },
);

for my $way (sort keys %ways) {
    for my $reset (0, 1) {
        go_away($PER, $ways{$way}, reset => $reset);
    }
}

# while the claim runs (blocked on the lock: every connection busy) and
# while it waits for a connection (the rest).  First the claims of the
# clients gone so far end, and the pool holds all its connections (a new
# one could not prepare its statements while the table is locked).
{
    my $idle = AQ::Faults::wait_until(10, sub {
        my $p = pool_state();
        $p->{busy} == 0 && $p->{waiting} == 0 && $p->{connecting} == 0 });
    ok($idle, 'the claims of the clients gone so far end') or diag explain pool_state();
    fill_pool('before the lock');

    my $locker = AQ::Faults::lock_items(AQ::Faults::session());
    for my $reset (0, 1) {
        my $how = $reset ? '(RST)' : '(FIN)';
        my @s;
        for (1 .. 2 * $POOL) {
            my $s = AQ::Faults::raw_connect($port);
            my ($head, $body) = AQ::Faults::claim_bytes($queue, fresh_key());
            AQ::Faults::raw_send($s, $head . $body);
            push @s, $s;
        }
        # the first time, $POOL of the claims run and the others wait; the
        # second time the connections still run the first claims (their
        # clients gone), and all wait
        my $waiting = $reset ? 2 * $POOL : $POOL;
        my $busy = AQ::Faults::wait_until(5, sub {
            AQ::Faults::backends(lock => 1) == $POOL && pool_state()->{waiting} == $waiting });
        ok($busy, "going away during the query $how: every connection runs a blocked claim, "
                  . "$waiting claims wait for one")
            or diag explain [AQ::Faults::backend_rows(), pool_state()];
        my $gone = gone_count();
        AQ::Faults::raw_close($_, reset => $reset) for @s;
        my $seen = AQ::Faults::wait_until(5, sub {
            gone_count() >= $gone + 2 * $POOL && pool_state()->{waiting} == 0 });
        ok($seen, "going away during the query $how: nginx sees every client go, "
                  . 'the waiting ones leave the list')
            or diag explain [gone_count() - $gone, pool_state()];
    }
    $locker->rollback;
}

# the claims of the vanished clients end (they commit)
my $quiet = AQ::Faults::wait_until(10, sub {
    AQ::Faults::backends(state => 'active') == 0 && pool_state()->{busy} == 0 });
ok($quiet, 'the claims of the clients that went away all end')
    or diag explain [AQ::Faults::backend_rows(), pool_state()];

# ---------------------------------------------------------------------------

is_deeply(AQ::Faults::worker_pids($ngx), $workers,
          'no crash: the worker is the same process');
is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
          'no [alert], [crit], [emerg] or "exited on signal" in the error log');

cmp_ok(AQ::Faults::backends(), '<=', $POOL,
       "no leaked connection: nginx holds at most pool_size ($POOL) connections")
    or diag explain AQ::Faults::backend_rows();

{
    my $what = 'the pool serves at full size';
    my $locker = AQ::Faults::lock_items(AQ::Faults::session());
    my @c = map { AQ::Client->new(port => $port, timeout => 10) } 1 .. $POOL + 1;
    my @k = map { fresh_key() } @c;
    $c[$_]->send_request(body => qq({"queue_id":"$queue"}), key => $k[$_]) for 0 .. $#c;
    my $all = AQ::Faults::wait_until(5, sub {
        AQ::Faults::backends(lock => 1) == $POOL && pool_state()->{waiting} == 1 });
    ok($all, "$what: $POOL claims run at once, one on each connection, and one waits")
        or diag explain [AQ::Faults::backend_rows(), pool_state()];
    # the pool decided when the last claim came: it waits, no connection
    # is opened for it
    is(pool_state()->{open}, $POOL, "$what: ... and nginx holds no more connections than that");
    is(AQ::Faults::backends(), $POOL, "$what: ... nor does PostgreSQL see more");
    $locker->rollback;

    my (@bad, @problems);
    for my $i (0 .. $#c) {
        my $r = $c[$i]->read_response;
        my $out = AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error});
        push @bad, $out unless $out eq '200 item';
        push @problems, AQ::Faults::claim_problems($k[$i], $r->{body}) if $out eq '200 item';
    }
    is_deeply(\@bad, [], "$what: once the lock is gone, they and one that waited answer 200")
        or diag explain \@bad;
    is_deeply(\@problems, [], "$what: ... each with an item its key holds")
        or diag explain \@problems;

    my @k2 = map { fresh_key() } 1 .. $POOL;
    my $res = AQ::parallel($POOL, sub {
        my ($i) = @_;
        my $t0 = time;
        my ($out, $body) = claim_once($k2[$i]);
        return [$out, time - $t0, $body];
    });
    # (a claim that waited out a timer would be a 503)
    my @pbad = map { ref $_ eq 'ARRAY' ? ($_->[0] eq '200 item' ? () : "$_->[0] in $_->[1] s")
                                       : "died: $_->{died}" } @$res;
    is_deeply(\@pbad, [], "$what: $POOL parallel claims all answer 200")
        or diag explain \@pbad;
    note sprintf "$what: the parallel claims took %s s",
                 join ', ', map { ref $_ eq 'ARRAY' ? sprintf('%.3f', $_->[1]) : '?' } @$res;
    my @p2 = map { AQ::Faults::claim_problems($k2[$_], $res->[$_][2]) }
             grep { ref $res->[$_] eq 'ARRAY' && $res->[$_][0] eq '200 item' } 0 .. $#k2;
    is_deeply(\@p2, [], "$what: ... each with an item its key holds") or diag explain \@p2;
}

# ---------------------------------------------------------------------------
# The lease brings back an item whose client vanished.

# The lease is long enough for the steps between the claims and the check
# that nobody else gets the items before it ends (3 s, times AQ::slow()).
{
    my $what = 'lease';
    my $lease = AQ::Faults::scaled(3);
    my $lq = AQ::queue($org, 'short-lease', lease => "$lease seconds");
    my $ids = AQ::enqueue_many($lq, 2, prefix => 'lease');
    my ($ka, $kb, $kc, $kd) = map { AQ::key($org, rater => "lease-$_") } qw(a b c d);

    # a: its client goes away while the claim runs (blocked on the lock)
    my $locker = AQ::Faults::lock_items(AQ::Faults::session());
    my $s = AQ::Faults::raw_connect($port);
    my ($head, $body) = AQ::Faults::claim_bytes($lq, $ka);
    AQ::Faults::raw_send($s, $head . $body);
    ok(AQ::Faults::wait_until(5, sub { AQ::Faults::backends(lock => 1) >= 1 }),
       "$what: a claim runs, blocked by the lock") or diag explain AQ::Faults::backend_rows();
    my $gone = gone_count();
    AQ::Faults::raw_close($s);
    ok(AQ::Faults::wait_until(5, sub { gone_count() > $gone }),
       "$what: ... nginx sees its client go");
    $locker->rollback;

    # b: its client goes away right after sending
    $s = AQ::Faults::raw_connect($port);
    ($head, $body) = AQ::Faults::claim_bytes($lq, $kb);
    AQ::Faults::raw_send($s, $head . $body);
    AQ::Faults::raw_close($s);

    my $claimed = AQ::Faults::wait_until(3, sub { AQ::counts($lq)->{claimed} == 2 });
    ok($claimed, "$what: the claims of both vanished clients committed");
    my ($est, undef, $ebody, $eerr) = AQ::Client->new(port => $port)->claim($lq, $kc);
    my $early = AQ::Faults::outcome($est, $ebody, $eerr);
    is($early, '409 no_items_available', "$what: before the leases expire, another key gets 409");
    # (which of the two runs first once the lock is gone is the server's choice)
    is_deeply([sort map { AQ::item($_)->{claimed_by} // '' } @$ids],
              [sort map { AQ::key_id($_) } $ka, $kb],
              "$what: ... the items are held by the keys of the clients that left");
    my $expired = AQ::Faults::wait_until($lease + 5, sub {
        !AQ::Faults::db()->selectrow_array(
            q{SELECT count(*) FROM annotation_queue.items
               WHERE queue_id = ? AND lease_expires_at > now()}, undef, $lq) });
    ok($expired, "$what: the leases expire");

    my %got;
    for my $k ($kc, $kd) {
        my ($st, undef, $b, $err) = AQ::Client->new(port => $port)->claim($lq, $k);
        my $d = AQ::Faults::decode($b);
        is(AQ::Faults::outcome($st, $b, $err), '200 item',
           "$what: once they expired, another key claims an item") or diag $b;
        my $id = $d && ref $d->{item} ? $d->{item}{id} : '';
        $got{$id} = [$d->{item}{version}, AQ::item($id)];
        is_deeply([AQ::Faults::claim_problems($k, $b)], [], "$what: ... held by that key");
    }
    is_deeply([sort keys %got], [sort @$ids], "$what: both items came back, one to each key");
    is_deeply([map { [$got{$_}[0], $got{$_}[1]{attempts}] } sort keys %got], [[2, 2], [2, 2]],
              "$what: ... at version 2, with attempts = 2");
}

$ngx->stop;
is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
          'at the end: no [alert], [crit], [emerg] or "exited on signal" in the error log');

sub outcome_of {
    my ($port, $queue, $key) = @_;
    my ($st, undef, $body, $err) = AQ::Client->new(port => $port)->claim($queue, $key);
    return AQ::Faults::outcome($st, $body, $err);
}

# ---------------------------------------------------------------------------
# Clients that go away while their claims run together: claims that waited
# for a pool of one connection go out on it as one statement (in this
# version) when it frees up.  The statement is held at the gate
# (AQ::Faults::close_gate) while three of its five clients go away (two
# close, one resets); then the gate opens.  The two that stayed get their
# items; the claims of those who left commit (their keys hold their items),
# and the pool goes on serving.

{
    my $what = 'together';
    my $bq = AQ::queue($org, 'together');
    AQ::enqueue_many($bq, 20);
    my $ssport = AQ::free_port();
    my $small = AQ::start_nginx(workers => 1, http => <<"_EOC_" . AQ::Faults::status_server($ssport));
    annotation_queue_pool_size 1;
    annotation_queue_connect_timeout ${CONNECT_TIMEOUT}s;
    annotation_queue_query_timeout ${QUERY_TIMEOUT}s;
_EOC_
    my $sport = $small->port;
    is(outcome_of($sport, $bq, fresh_key()), '200 item', "$what: a first claim answers 200");
    my $spids = AQ::Faults::worker_pids($small);

    my $gate = AQ::Faults::close_gate(AQ::Faults::session());
    my $first = AQ::Faults::raw_connect($sport);
    my ($head, $body) = AQ::Faults::claim_bytes($bq, fresh_key());
    AQ::Faults::raw_send($first, $head . $body);
    ok(AQ::Faults::wait_until(5, sub { AQ::Faults::backends(lock => 1) >= 1 }),
       "$what: a claim runs, held at the gate") or diag explain AQ::Faults::backend_rows();

    my @k = map { fresh_key() } 1 .. 5;
    my @s = map {
        my $c = AQ::Client->new(port => $sport, timeout => 15);
        $c->send_request(body => qq({"queue_id":"$bq"}), key => $_);
        $c } @k;
    ok(AQ::Faults::wait_until(5, sub { AQ::Faults::pool_state($ssport)->{waiting} == 5 }),
       "$what: five claims wait for the connection")
        or diag explain AQ::Faults::pool_state($ssport);
    # the first claim's connection goes: the five waiting go out on the next
    # (the terminated backend may linger a moment in pg_stat_activity)
    my %old = map { $_->[0] => 1 } @{ AQ::Faults::backend_rows() };
    is(AQ::Faults::terminate_nginx_backends(), 1, "$what: the blocked claim's backend is terminated");
    my $second = AQ::Faults::wait_until(5, sub {
        my @rows = grep { !$old{ $_->[0] } } @{ AQ::Faults::backend_rows() };
        @rows == 1 && $rows[0][2] eq 'Lock' && AQ::Faults::pool_state($ssport)->{waiting} == 0
            ? $rows[0] : undef });
    ok($second, "$what: the five claims that waited run on a new connection, held at the gate")
        or diag explain [AQ::Faults::backend_rows(), AQ::Faults::pool_state($ssport)];
    note "$what: they went " . ($second && $second->[3] =~ /unnest/ ? 'as one batch statement'
                                                                  : 'one by one');
    my $gone = gone_count($small);
    $s[0]->disconnect;
    $s[1]->disconnect;
    AQ::Faults::raw_close($s[2]{sock}, reset => 1);
    $s[2]{sock} = undef;
    ok(AQ::Faults::wait_until(5, sub { gone_count($small) >= $gone + 3 }),
       "$what: nginx sees the three clients go");
    AQ::Faults::open_gate($gate);

    my @out;
    for my $i (3, 4) {
        my $r = $s[$i]->read_response;
        my $o = AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error});
        push @out, $o eq '200 item' ? (AQ::Faults::claim_problems($k[$i], $r->{body}), $o) : $o;
    }
    is_deeply(\@out, ['200 item', '200 item'],
              "$what: the two clients that stayed get their items, held by their keys")
        or diag explain \@out;
    AQ::Faults::wait_until(5, sub { AQ::Faults::backends(state => 'active') == 0 });
    my @holders = map { AQ::Faults::db()->selectrow_array(
        q{SELECT count(*) FROM annotation_queue.items i
            JOIN annotation_queue.api_keys k ON k.id = i.claimed_by
           WHERE i.queue_id = ? AND k.key_hash = annotation_queue.key_hash(?)}, undef, $bq, $_) }
        @k[0 .. 2];
    is_deeply(\@holders, [1, 1, 1],
              "$what: the claims of the clients that left committed: their keys hold one item each");

    my @after = map { outcome_of($sport, $bq, fresh_key()) } 1 .. 3;
    is_deeply(\@after, [('200 item') x 3], "$what: the pool serves on: 200, 200, 200");
    is_deeply(AQ::Faults::worker_pids($small), $spids, "$what: no crash: the same worker");
    cmp_ok(AQ::Faults::backends(), '<=', 1, "$what: no leaked connection");
    $small->stop;
    is_deeply(AQ::Faults::log_problems($small->error_log), [],
              "$what: no [alert], [crit], [emerg] or \"exited on signal\" in the error log");
}

done_testing();
