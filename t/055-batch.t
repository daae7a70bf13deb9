# Batching and the wait list, made deterministic: claims are held inside
# PostgreSQL by a gate (AQ::Faults::install_gate: a trigger that blocks
# every UPDATE of an item while the test holds a row lock), so that the
# requests behind them wait for a connection in a known order, and the
# status page says when they all wait.
#
#   - A batch takes only claims of one queue and one lease: twelve claims
#     waiting interleaved (queue A with one lease, queue B, queue A with
#     another lease) go as three commits of four, each answered with items
#     of its own queue, at its own lease, each held by the key it was
#     answered to.
#   - A key that waits twice in one batch gets one item, the same in both
#     answers.
#   - Two claims of one key running at once on two connections give one
#     item: the second fails on the unique holder index, is run again, and
#     resumes the first's item.
#   - A claim that waits for a connection longer than the connect timeout
#     plus the query timeout gets 503 pool_saturated with Retry-After at
#     that timeout, while the claim ahead of it still runs.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use JSON::PP ();
use Test::More;
use Time::HiRes ();

my $org = AQ::org('batch');
my $JSON = JSON::PP->new->utf8;

AQ::Faults::install_gate();
my $gate = AQ::Faults::session();

sub decode { my $d = eval { $JSON->decode($_[0] // '') }; return ref $d eq 'HASH' ? $d : {} }

# nginx of one worker whose pool has $size connections; a second server on
# $ngx->{port2} has the status page and a claim location with a lease of 7
# minutes (the first's is 10), both on the same pool.
sub start {
    my (%o) = @_;
    my $port2 = AQ::free_port();
    my $ngx = AQ::start_nginx(workers => 1, location => 'annotation_queue_lease 10m;',
                              http => <<"_EOC_");
    annotation_queue_pool_size $o{size};
    annotation_queue_max_waiting 64;
    annotation_queue_connect_timeout $o{connect_timeout};
    annotation_queue_query_timeout $o{query_timeout};

    server {
        listen 127.0.0.1:$port2;

        location = /status {
            annotation_queue_status;
        }

        location = /claim-7m {
            annotation_queue_claim;
            annotation_queue_lease 7m;
        }
    }
_EOC_
    $ngx->{port2} = $port2;
    return $ngx;
}

# The status page's gauge of waiting requests, summed over workers.
sub waiting {
    my ($ngx) = @_;
    my ($status, undef, $body) = AQ::Client->new(port => $ngx->{port2})
        ->request(method => 'GET', uri => '/status');
    return -1 unless $status == 200;
    return $body =~ /^annotation_queue_waiting\{pool="0",worker="all"\} (\d+)$/m ? $1 : -1;
}

sub idle {
    my ($ngx) = @_;
    my ($status, undef, $body) = AQ::Client->new(port => $ngx->{port2})
        ->request(method => 'GET', uri => '/status');
    return -1 unless $status == 200;
    return $body =~ /^annotation_queue_connections\{pool="0",worker="all",state="idle"\} (\d+)$/m
           ? $1 : -1;
}

# Sends a claim of $queue with $key on a client of its own; returns the client.
sub send_claim {
    my ($ngx, $queue, $key, %o) = @_;
    my $c = AQ::Client->new(port => $o{port} // $ngx->port, timeout => 30);
    my $err = $c->send_request(body => qq({"queue_id":"$queue"}), key => $key,
                               uri => $o{uri});
    die "send: $err" if $err;
    return $c;
}

sub log_errors {
    my ($ngx) = @_;
    return [grep { /\[(?:error|alert|crit|emerg)\]/ } split /\n/, $ngx->error_log];
}

# ---------------------------------------------------------------------------

{
    my $what = 'one queue and one lease per batch';
    my $qa = AQ::queue($org, 'batch-a', lease => undef);
    my $qb = AQ::queue($org, 'batch-b', lease => undef);
    AQ::enqueue_many($qa, 12);
    AQ::enqueue_many($qb, 12);
    my $ngx = start(size => 1, connect_timeout => '10s', query_timeout => '60s');

    my ($warm) = AQ::Client->new(port => $ngx->port)->claim($qa, AQ::key($org));
    is($warm, 200, "$what: a first claim opens the pool's one connection");

    AQ::Faults::close_gate($gate);
    my $head = send_claim($ngx, $qa, AQ::key($org));
    ok(AQ::Faults::wait_until(10, sub { AQ::Faults::backends(lock => 1) == 1 }),
       "$what: a claim holds the one connection, blocked in PostgreSQL");

    # interleaved: A at 10m, B at 10m, A at 7m, four times
    my @sent;
    for my $round (1 .. 4) {
        for my $kind (['A', $qa, undef, 600], ['B', $qb, undef, 600],
                      ['A7', $qa, '/claim-7m', 420])
        {
            my ($label, $queue, $uri, $lease) = @$kind;
            my $key = AQ::key($org);
            my $c = send_claim($ngx, $queue, $key,
                               $uri ? (uri => $uri, port => $ngx->{port2}) : ());
            push @sent, { label => $label, queue => $queue, lease => $lease,
                          key => $key, client => $c };
        }
    }
    ok(AQ::Faults::wait_until(10, sub { waiting($ngx) == 12 }),
       "$what: twelve claims wait for the connection");

    AQ::Faults::open_gate($gate);
    my $rh = $head->read_response;
    is($rh->{status}, 200, "$what: the claim ahead answers 200") or diag explain $rh;

    my (@bad, %commits);
    for my $s (@sent) {
        my $r = $s->{client}->read_response;
        my $it = decode($r->{body})->{item};
        if ($r->{status} != 200 || ref $it ne 'HASH') {
            push @bad, "$s->{label}: $r->{status} $r->{body}";
            next;
        }
        push @bad, "$s->{label}: item of queue $it->{queue_id}"
            unless $it->{queue_id} eq $s->{queue};
        my ($lease, $at) = AQ::dbh()->selectrow_array(
            q{SELECT extract(epoch FROM lease_expires_at - claimed_at)::int,
                     claimed_at::text
                FROM annotation_queue.items WHERE id = ?}, undef, $it->{id});
        push @bad, "$s->{label}: lease of $lease s, not $s->{lease}"
            unless ($lease // -1) == $s->{lease};
        push @bad, AQ::claim_answer_problems($s->{queue},
                                             [[$s->{key}, $it->{id}, $it->{version}]]);
        push @{ $commits{$at // 'none'} }, $s->{label};
    }
    is_deeply(\@bad, [], "$what: each claim answered 200 with an item of its own queue, "
                         . "at its own lease, held by its own key");

    my @groups = sort map { join ',', @$_ } values %commits;
    is_deeply(\@groups, ['A,A,A,A', 'A7,A7,A7,A7', 'B,B,B,B'],
              "$what: the twelve went as three commits of four, "
              . "each of one queue and one lease")
        or diag explain \%commits;

    $ngx->stop;
    is_deeply(log_errors($ngx), [], "$what: no [error] in the error log");
}

{
    my $what = 'one key twice in a batch';
    my $q = AQ::queue($org, 'batch-twice');
    AQ::enqueue_many($q, 6);
    my $ngx = start(size => 1, connect_timeout => '10s', query_timeout => '60s');

    my ($warm) = AQ::Client->new(port => $ngx->port)->claim($q, AQ::key($org));
    is($warm, 200, "$what: a first claim opens the pool's one connection");

    AQ::Faults::close_gate($gate);
    my $head = send_claim($ngx, $q, AQ::key($org));
    ok(AQ::Faults::wait_until(10, sub { AQ::Faults::backends(lock => 1) == 1 }),
       "$what: a claim holds the one connection");

    my ($k, $l) = (AQ::key($org), AQ::key($org));
    my @c = (send_claim($ngx, $q, $k), send_claim($ngx, $q, $l), send_claim($ngx, $q, $k));
    ok(AQ::Faults::wait_until(10, sub { waiting($ngx) == 3 }),
       "$what: three claims wait, two of one key");

    AQ::Faults::open_gate($gate);
    is($head->read_response->{status}, 200, "$what: the claim ahead answers 200");
    my @r = map { $_->read_response } @c;
    is_deeply([map { $_->{status} } @r], [200, 200, 200], "$what: all three answer 200")
        or diag explain \@r;
    my @it = map { decode($_->{body})->{item} || {} } @r;
    is($it[0]{id}, $it[2]{id}, "$what: the key's two answers name the same item");
    is($it[0]{version}, $it[2]{version}, "$what: ... at the same version");
    isnt($it[0]{id}, $it[1]{id}, "$what: the other key has another item");
    my @p = AQ::claim_answer_problems($q, [[$k, $it[0]{id}, $it[0]{version}],
                                           [$l, $it[1]{id}, $it[1]{version}]]);
    is_deeply(\@p, [], "$what: each item is held by its key in the database");
    my ($held) = AQ::dbh()->selectrow_array(
        q{SELECT count(*) FROM annotation_queue.items
           WHERE queue_id = ? AND claimed_by = ?}, undef, $q, AQ::key_id($k));
    is($held, 1, "$what: the key holds one item");
    my ($commits) = AQ::dbh()->selectrow_array(
        q{SELECT count(DISTINCT claimed_at) FROM annotation_queue.items
           WHERE id IN (?, ?)}, undef, $it[0]{id}, $it[1]{id});
    is($commits, 1, "$what: the two keys' claims were one batch (one commit)");

    $ngx->stop;
    is_deeply(log_errors($ngx), [], "$what: no [error] in the error log");
}

{
    my $what = 'one key on two connections at once';
    my $q = AQ::queue($org, 'batch-race');
    my @warmq = map { AQ::queue($org, "batch-race-warm-$_") } 1 .. 2;
    AQ::enqueue_many($q, 20);
    AQ::enqueue_many($_, 1) for @warmq;
    my $ngx = start(size => 2, connect_timeout => '10s', query_timeout => '60s');

    # Open both connections: two claims blocked at once need two (claims of
    # two queues, which never go as one batch).
    AQ::Faults::close_gate($gate);
    my @warm = map { send_claim($ngx, $_, AQ::key($org)) } @warmq;
    ok(AQ::Faults::wait_until(10, sub { AQ::Faults::backends(lock => 1) == 2 }),
       "$what: two connections open, each running a claim");
    AQ::Faults::open_gate($gate);
    is_deeply([map { $_->read_response->{status} } @warm], [200, 200],
              "$what: ... both answer 200");
    ok(AQ::Faults::wait_until(10, sub { idle($ngx) == 2 }),
       "$what: both connections are idle in the pool");

    for my $round (1 .. 3) {
        my $k = AQ::key($org);
        AQ::Faults::close_gate($gate);
        my @c = map { send_claim($ngx, $q, $k) } 1 .. 2;
        ok(AQ::Faults::wait_until(10, sub { AQ::Faults::backends(lock => 1) == 2 }),
           "$what, round $round: the key's two claims run at once, one per connection");
        AQ::Faults::open_gate($gate);
        my @r = map { $_->read_response } @c;
        is_deeply([map { $_->{status} } @r], [200, 200],
                  "$what, round $round: both answer 200")
            or diag explain \@r;
        my @it = map { decode($_->{body})->{item} || {} } @r;
        ok(defined $it[0]{id} && ($it[0]{id} // '') eq ($it[1]{id} // ''),
           "$what, round $round: both name the same item");
        is($it[0]{version}, $it[1]{version}, "$what, round $round: ... at the same version");
        my ($held) = AQ::dbh()->selectrow_array(
            q{SELECT count(*) FROM annotation_queue.items
               WHERE queue_id = ? AND claimed_by = ?}, undef, $q, AQ::key_id($k));
        is($held, 1, "$what, round $round: the key holds one item in the database");
        my @p = AQ::claim_answer_problems($q, [[$k, $it[0]{id}, $it[0]{version}]]);
        is_deeply(\@p, [], "$what, round $round: held by the key at the version answered");
    }
    is_deeply(AQ::counts($q), { available => 17, claimed => 3, completed => 0 },
              "$what: the losers' items went back (3 claimed, 17 available)");

    $ngx->stop;
    is_deeply(log_errors($ngx), [], "$what: no [error] in the error log");
}

{
    my $what = 'the wait list times out';
    my $slow = AQ::slow();
    my ($ct, $qt) = (1 * $slow, 3 * $slow);
    my $qa = AQ::queue($org, 'wait-a');
    my $qb = AQ::queue($org, 'wait-b');
    AQ::enqueue_many($qa, 4);
    AQ::enqueue_many($qb, 4);
    my $ngx = start(size => 1, connect_timeout => "${ct}s", query_timeout => "${qt}s");

    my ($warm) = AQ::Client->new(port => $ngx->port)->claim($qa, AQ::key($org));
    is($warm, 200, "$what: a first claim opens the pool's one connection");

    # a holds the connection until the query timeout; then b (of another
    # queue: never batched with c) takes the new connection and holds it
    # for another query timeout; c waits all along.
    AQ::Faults::close_gate($gate);
    my $a = send_claim($ngx, $qa, AQ::key($org));
    ok(AQ::Faults::wait_until(10, sub { AQ::Faults::backends(lock => 1) == 1 }),
       "$what: a claim holds the one connection");
    my $b = send_claim($ngx, $qb, AQ::key($org));
    ok(AQ::Faults::wait_until(10, sub { waiting($ngx) == 1 }), "$what: a second waits");
    my $t0 = Time::HiRes::time();
    my $c = send_claim($ngx, $qa, AQ::key($org));
    ok(AQ::Faults::wait_until(10, sub { waiting($ngx) == 2 }), "$what: a third waits");

    my $rc = $c->read_response;
    my $took = Time::HiRes::time() - $t0;
    is(AQ::Faults::outcome($rc->{status}, $rc->{body}, $rc->{error}), '503 pool_saturated',
       "$what: the third gets 503 pool_saturated") or diag explain $rc;
    like($rc->{headers}{'retry-after'} // '', qr/^\d+$/, "$what: ... with Retry-After");
    like($rc->{headers}{'content-type'} // '', qr{^application/json},
         "$what: ... as JSON");
    cmp_ok($took, '>=', 0.9 * ($ct + $qt),
           "$what: ... not before connect timeout + query timeout");
    ok(!IO::Select->new($b->{sock})->can_read(0),
       "$what: ... while the claim ahead of it still runs");

    my $ra = $a->read_response;
    is(AQ::Faults::outcome($ra->{status}, $ra->{body}, $ra->{error}), '504 query_timeout',
       "$what: the first ends at its query timeout");
    my $rb = $b->read_response;
    is(AQ::Faults::outcome($rb->{status}, $rb->{body}, $rb->{error}), '504 query_timeout',
       "$what: the second ran on a new connection and ends at its query timeout");
    AQ::Faults::open_gate($gate);

    my ($after) = AQ::Client->new(port => $ngx->port)->claim($qa, AQ::key($org));
    is($after, 200, "$what: once the gate opens, claims are served again");

    $ngx->stop;
    like($ngx->error_log, qr/no PostgreSQL connection became free in time/,
         "$what: the timeout is logged");
    is_deeply([grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $ngx->error_log], [],
              "$what: no [alert], [crit] or [emerg] in the error log");
}

done_testing();
