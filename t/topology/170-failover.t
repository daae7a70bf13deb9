# Failover against a real streaming standby (t/lib/AQ/Standby.pm: a
# primary, standbys copied with pg_basebackup -R, kill -9 of the primary,
# pg_ctl promote), with the module pointed at both servers the way README
# says ("host=A,B port=PA,PB ... target_session_attrs=read-write"):
#
#   - a connection that lands on a read-only server is never used for a
#     claim: a conninfo naming only the standby with target_session_attrs=
#     read-write fails to connect (503 database_unavailable, libpq's
#     reason logged); one naming only the standby without it connects, and
#     the claim fails in the standby (SQLSTATE 25006) and answers 503
#     database_unavailable, the connection closed (none stays on the
#     standby), the item untouched on the primary; a host list with the
#     standby first claims on the primary;
#   - a failover under load, asynchronous replication: 32 clients claim
#     continuously (a fresh key per item, a 503 retried with the same key)
#     through two workers; the primary is killed (SIGKILL to all its
#     processes), then the standby promoted.  Every answer is a 200 or a
#     503 database_unavailable with Retry-After (never a 500, never an
#     answer later than the connect plus the query timeout); the claims
#     sent while no primary exists all answer 503; the first claims after
#     the promotion succeed within the connect timeout (the gap is noted);
#     every 200 answered after the kill is held on the new primary by its
#     key at the version answered; no key holds two items.  What the
#     asynchronous standby lost (claims answered 200 before the kill whose
#     row on the new primary is not that key's claim, items answered to two
#     keys across the failover) is measured and noted, not asserted;
#   - the same with synchronous replication (synchronous_standby_names =
#     '*', synchronous_commit = on) from the promoted standby to a new one:
#     every claim answered 200, before the kill or after, is on the new
#     primary, held by the key that got it at the version answered, and no
#     item was answered to two keys;
#   - a primary that hangs (SIGSTOP) instead of dying, listed first, its
#     standby promoted: every claim still gets 200 or 503 within the
#     connect timeout; once the hung server is killed, claims reach the new
#     primary;
#   - a synchronous standby that is gone while the primary still names it:
#     claims answer 504 query_timeout at the query timeout, their backends
#     wait on in PostgreSQL, their claims invisible; once the primary stops
#     waiting, those claims are committed and a key's retry gets its item
#     back.
#
#   - why each host of a list failed is logged on one line; a first host
#     that never answers is passed by after the conninfo's connect_timeout
#     (the module applies it host by host, as libpq does only when it
#     connects blocking), and the claims reach the promoted standby listed
#     second; without connect_timeout (the control) they get 503 until the
#     module's connect timeout.
#
# AQ_FAILOVER_LONG=1 adds AQ_FAILOVER_ROUNDS (5) more asynchronous
# failovers, each to a new standby of the last primary, and notes the
# losses summed over all of them.
#
# The gap and the losses are printed with note (prove -v).
use strict;
use warnings;

use lib 't/lib';
BEGIN { require AQ::Standby; AQ::Standby::own_primary() }
use AQ;
use AQ::Faults ();
use List::Util qw(max min);
use Test::More;
use Time::HiRes qw(time sleep);

my $WORKERS  = 2;
my $POOL     = 8;
my $CLIENTS  = 32;
my $CONNECT_TIMEOUT = AQ::Faults::scaled(3);    # seconds
my $QUERY_TIMEOUT   = AQ::Faults::scaled(5);
# no answer may take longer than a request may wait (connect and query
# timeouts); the clients give up later than that, so a hang is seen as one
my $HANG            = $CONNECT_TIMEOUT + $QUERY_TIMEOUT;
my $CLIENT_TIMEOUT  = $HANG / AQ::slow() + 5;   # AQ::Client scales it
# claims answered 200 before the kill, and after the promotion, in a round
my $BEFORE = 200;
my $AFTER  = 200;
my $ITEMS  = 5000;                              # per round: never a 409
my $KEYS   = 4000;                              # per round: never out of keys

my $primary = AQ::Standby::primary_node();
my $standby = $primary->standby(name => 'standby1');

my $org = AQ::org('failover');
my %queue = map { $_ => AQ::queue($org, $_) } qw(small async sync);
AQ::enqueue_many($queue{small}, 20);
AQ::enqueue_many($queue{$_}, $ITEMS) for qw(async sync);
my %pool = map { $_ => AQ::key_pool($org, $KEYS) } qw(async sync);
my @small_keys = @{ AQ::keys_for($org, 20) };    # one per claim of the small queue
my @long = $ENV{AQ_FAILOVER_LONG} ? (1 .. ($ENV{AQ_FAILOVER_ROUNDS} || 5)) : ();
for my $r (@long) {
    $queue{"long$r"} = AQ::queue($org, "long$r");
    AQ::enqueue_many($queue{"long$r"}, $ITEMS);
    $pool{"long$r"} = AQ::key_pool($org, $KEYS);
}
# the fixtures reach the standby before anything is killed; AQ::dbh()'s
# handle would die with the first primary: from here on each node's own
# ($node->db, which reconnects)
$standby->wait_replayed($primary);
AQ::dbh()->disconnect;

my $JSON_TYPE = qr{^application/json(?:;\s*charset=utf-8)?$};

sub dsn {
    my (@nodes) = @_;
    my @o;
    unshift @o, splice(@nodes, -2) while @nodes && !ref $nodes[-1];
    my %o = @o;
    my $dsn = 'host=' . join(',', ('127.0.0.1') x @nodes)
              . ' port=' . join(',', map { $_->port } @nodes)
              . " dbname=$AQ::DB user=postgres";
    $dsn .= " target_session_attrs=$o{tsa}" if $o{tsa};
    $dsn .= " connect_timeout=$o{host_timeout}" if $o{host_timeout};
    return $dsn;
}

# An nginx of $workers workers and pools of $pool connections to $dsn,
# with the status page on a port of its own: (nginx, status port).
sub nginx_for {
    my ($dsn, %o) = @_;
    my $sport = AQ::free_port();
    my $ngx = AQ::start_nginx(
        workers => $o{workers} // 1, dsn => $dsn, listen => 'reuseport',
        http => "    annotation_queue_pool_size " . ($o{pool} // 1) . ";\n"
                . "    annotation_queue_connect_timeout "
                . ($o{connect} // $CONNECT_TIMEOUT) . "s;\n"
                . "    annotation_queue_query_timeout ${QUERY_TIMEOUT}s;\n"
                . AQ::Faults::status_server($sport));
    return ($ngx, $sport);
}

# The claim answers counted by the status page: { outcome => n } over all
# workers; undef when the page does not answer.
sub answered {
    my ($sport) = @_;
    my $m = AQ::Faults::status($sport) or return undef;
    my %n;
    while (my ($k, $v) = each %$m) {
        next unless $k =~ /^annotation_queue_answers_total\{/
                    && $k =~ /worker="all"/ && $k =~ /endpoint="claim"/;
        $n{$1} += $v if $k =~ /outcome="(\w+)"/;
    }
    return \%n;
}

sub answered_count {
    my ($sport, $outcome) = @_;
    my $n = answered($sport) or return -1;
    return $n->{$outcome} // 0;
}

# One claim on a new client connection: (status, headers, body, error).
sub claim_once {
    my ($ngx, $q, $key) = @_;
    my $c = AQ::Client->new(port => $ngx->port, timeout => $CLIENT_TIMEOUT);
    my @r = $c->claim($q, $key);
    $c->disconnect;
    return @r;
}

# A 503 database_unavailable JSON answer with Retry-After: '' or what is
# wrong with it.
sub unavailable_problem {
    my ($status, $h, $body, $err) = @_;
    my $out = AQ::Faults::outcome($status, $body, $err);
    return $out unless $out eq '503 database_unavailable';
    return "$out without Retry-After" unless ($h->{'retry-after'} // '') =~ /^\d+$/;
    return "$out as $h->{'content-type'}"
        unless ($h->{'content-type'} // '') =~ $JSON_TYPE;
    my $d = AQ::Faults::decode($body);
    return "$out: $body" unless $d && JSON::PP::is_bool($d->{success}) && !$d->{success}
                                && ($d->{error}{message} // '') ne '';
    return '';
}

# The items a key holds in a queue, on a node.
sub held_by {
    my ($node, $q, $key) = @_;
    return $node->db($AQ::DB)->selectcol_arrayref(
        q{SELECT i.id FROM annotation_queue.items i
            JOIN annotation_queue.api_keys k ON k.id = i.claimed_by
           WHERE i.queue_id = ? AND k.key_hash = annotation_queue.key_hash(?)},
        undef, $q, $key);
}

# ---------------------------------------------------------------------------
# A connection that lands on a read-only server is never used for claims.

{
    my $what = 'standby only, target_session_attrs=read-write';
    my ($ngx) = nginx_for(dsn($standby, tsa => 'read-write'));
    my $key = shift @small_keys;
    my ($st, $h, $body, $err) = claim_once($ngx, $queue{small}, $key);
    is(unavailable_problem($st, $h, $body, $err), '',
       "$what: a claim answers 503 database_unavailable JSON with Retry-After");
    like($ngx->error_log,
         qr/could not connect to PostgreSQL: .*port ${\ $standby->port } failed: (?:session is read-only|server is in hot standby mode)/,
         "$what: libpq refused the standby (read-only), and nginx logged why");
    is_deeply(held_by($primary, $queue{small}, $key), [],
              "$what: the key holds nothing on the primary");
    ok(AQ::Faults::wait_until(5, sub { $standby->nginx_backends == 0 }),
       "$what: no connection of nginx stays on the standby");
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in nginx's error log");
    $ngx->stop;
}

{
    my $what = 'standby only, no target_session_attrs';
    my ($ngx) = nginx_for(dsn($standby));
    for my $n (1, 2) {
        my $key = shift @small_keys;
        my ($st, $h, $body, $err) = claim_once($ngx, $queue{small}, $key);
        is(unavailable_problem($st, $h, $body, $err), '',
           "$what: claim $n answers 503 database_unavailable JSON with Retry-After "
           . '(the statement fails in the standby)')
            or diag "claim $n: $st $body";
        is_deeply(held_by($primary, $queue{small}, $key), [],
                  "$what: claim $n: the key holds nothing on the primary");
        ok(AQ::Faults::wait_until(5, sub { $standby->nginx_backends == 0 }),
           "$what: claim $n: the connection is closed after the failure, "
           . 'none stays on the standby');
    }
    my @failed = grep { /failed: 25006 / } split /\n/, $ngx->error_log;
    is(scalar @failed, 2,
       "$what: nginx logged each claim's failure as SQLSTATE 25006 "
       . '(read_only_sql_transaction): each claim met the standby on a new connection')
        or diag $ngx->error_log;
    note "$what: $_" for @failed[0 .. 0];
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in nginx's error log");
    $ngx->stop;
}

{
    my $what = 'host list with the standby first, target_session_attrs=read-write';
    my ($ngx) = nginx_for(dsn($standby, $primary, tsa => 'read-write'));
    my $key = shift @small_keys;
    my ($st, $h, $body, $err) = claim_once($ngx, $queue{small}, $key);
    is(AQ::Faults::outcome($st, $body, $err), '200 item',
       "$what: a claim answers 200 (libpq passed the standby by)");
    my $d = AQ::Faults::decode($body) // {};
    is_deeply([AQ::answers_problems([[$d->{item}{id}, $d->{item}{version}, $key]],
                                    dbh => $primary->db($AQ::DB))], [],
              "$what: the item answered is held by the key on the primary, at that version");
    is($standby->nginx_backends, 0, "$what: nginx holds no connection to the standby");
    cmp_ok($primary->nginx_backends, '>=', 1, "$what: ... and its connection to the primary");
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in nginx's error log");
    $ngx->stop;
}

# ---------------------------------------------------------------------------
# Failover under load.

# $CLIENTS clients claim from queue $q until told to stop; each answer is
# [sent, answered, status, item id, version, key, note] (key only for a
# 200; note: the error code, or what was wrong).  A 200 moves a client to
# its next key; any other answer is retried with the same key after a
# pause (a client honouring Retry-After, shortened so that the clients see
# the promotion soon).
sub clients {
    my ($ngx, $q, $pool) = @_;
    my $port = $ngx->port;
    return AQ::Faults::background($CLIENTS, sub {
        my $c = AQ::Client->new(port => $port, timeout => $CLIENT_TIMEOUT);
        my (@a, $key);
        my $pause = 0.05 * AQ::slow();
        while (!AQ::Faults::stopping()) {
            $key //= $pool->take;
            if (!defined $key) {
                push @a, [time, time, -1, undef, undef, undef, 'out of keys'];
                last;
            }
            my $t0 = time;
            my ($st, $h, $body, $err) = $c->claim($q, $key);
            my $t1 = time;
            my $d = AQ::Faults::decode($body);
            if ($st == 200 && $d && $d->{success} && ref $d->{item} eq 'HASH') {
                push @a, [$t0, $t1, 200, $d->{item}{id}, $d->{item}{version}, $key, ''];
                undef $key;
                next;
            }
            my $p = unavailable_problem($st, $h, $body, $err);
            push @a, [$t0, $t1, $st, undef, undef, undef,
                      $p eq '' ? 'database_unavailable' : substr($p, 0, 300)];
            sleep $pause;
        }
        return \@a;
    });
}

# How the claims answered 200 before the kill stand on the new primary:
# { held => n, lost => [...], other_key => [...], other_version => [...] }
# (lost: the item is not claimed any more, its claim was not replicated).
sub fate {
    my ($node, $answers) = @_;
    my %f = (held => 0, lost => [], other_key => [], other_version => []);
    return \%f unless @$answers;
    my $rows = $node->db($AQ::DB)->selectall_arrayref(
        q{SELECT a.n, i.status, i.version, coalesce(i.claimed_by = k.id, false)
            FROM unnest(?::uuid[], ?::text[]) WITH ORDINALITY AS a(item, key, n)
            JOIN annotation_queue.items i ON i.id = a.item
            LEFT JOIN annotation_queue.api_keys k
                   ON k.key_hash = annotation_queue.key_hash(a.key)
           ORDER BY a.n}, undef,
        [map { $_->[3] } @$answers], [map { $_->[5] } @$answers]);
    for my $r (@$rows) {
        my ($n, $status, $version, $mine) = @$r;
        my $a = $answers->[ $n - 1 ];
        if ($status ne 'claimed') {
            push @{ $f{lost} }, $a->[3];
        } elsif (!$mine) {
            push @{ $f{other_key} }, $a->[3];
        } elsif ($version ne $a->[4]) {
            push @{ $f{other_version} }, $a->[3];
        } else {
            $f{held}++;
        }
    }
    return \%f;
}

# A failover under load from $old (the primary) to $new (its standby):
# runs the clients, kills $old once $BEFORE claims were answered, waits
# for claims to meet no primary, promotes $new, waits for $AFTER claims,
# stops the clients; checks what every mode must hold and returns what
# was seen.
sub failover {
    my ($what, $old, $new, $q, $pool) = @_;
    my ($ngx, $sport) = nginx_for(dsn($old, $new, tsa => 'read-write'),
                                  workers => $WORKERS, pool => $POOL);
    my $bg = clients($ngx, $q, $pool);
    my %t;

    my $loaded = AQ::Faults::wait_until(60, sub { answered_count($sport, 'claimed') >= $BEFORE });
    ok($loaded, "$what: $CLIENTS clients claim through $WORKERS workers ($BEFORE claims answered)")
        or diag explain answered($sport);

    $t{kill} = time;
    $old->kill9;
    $t{killed} = time;
    my $down0 = answered_count($sport, 'database_unavailable');
    my $down = AQ::Faults::wait_until(30, sub {
        answered_count($sport, 'database_unavailable') >= $down0 + 3 * $CLIENTS });
    ok($down, "$what: with the primary killed, claims are answered 503 "
              . "database_unavailable (status page)")
        or diag explain answered($sport);

    $t{promote} = time;
    $new->promote;
    $t{promoted} = time;
    AQ::Standby::use_primary($new);
    my $claimed0 = answered_count($sport, 'claimed');
    my $back = AQ::Faults::wait_until(60, sub {
        answered_count($sport, 'claimed') >= $claimed0 + $AFTER });
    ok($back, "$what: after the promotion, claims are answered 200 again ($AFTER claims)")
        or diag explain answered($sport);

    my $res = $bg->stop;
    $t{stopped} = time;
    my $log = $ngx->error_log;
    my $held_conns = $new->nginx_backends;
    $ngx->stop;

    my @died = map { $_->{died} } grep { ref $_ eq 'HASH' } @$res;
    is_deeply(\@died, [], "$what: no client died") or diag explain \@died;
    my @all = map { ref $_ eq 'ARRAY' ? @$_ : () } @$res;

    my %outcomes;
    $outcomes{ $_->[2] == 200 ? '200 item' : "$_->[2] $_->[6]" }++ for @all;
    my @bad = grep { $_ ne '200 item' && $_ ne '503 database_unavailable' } sort keys %outcomes;
    is_deeply([map { "$_ (x$outcomes{$_})" } @bad], [],
              "$what: every answer is a 200 with an item or a 503 database_unavailable "
              . 'JSON with Retry-After (no 500, no other code, no transport error)');
    note "$what: answers: " . join ', ', map { "$outcomes{$_} x $_" } sort keys %outcomes;

    my @took = map { $_->[1] - $_->[0] } grep { $_->[2] > 0 } @all;
    my $slowest = max(@took) // 0;
    cmp_ok($slowest, '<', $HANG,
           "$what: no answer took as long as the connect plus the query timeout "
           . "(${HANG}s): nothing hung");

    # sent once every process of the old primary was gone, answered before
    # the promotion began: no primary existed for them
    my @none = grep { $_->[0] > $t{killed} && $_->[1] < $t{promote} } @all;
    my @none_bad = grep { $_->[2] != 503 || $_->[6] ne 'database_unavailable' } @none;
    ok(@none > 0 && !@none_bad,
       "$what: the claims sent while no primary existed (" . scalar(@none)
       . ') all answered 503 database_unavailable with Retry-After')
        or diag explain [map { "$_->[2] $_->[6]" } @none_bad];

    my @ok = grep { $_->[2] == 200 } @all;
    my @before = grep { $_->[0] < $t{killed} } @ok;
    my @after  = grep { $_->[0] >= $t{killed} } @ok;
    my $first = min(map { $_->[1] } @after);
    my %seen = (
        down      => $t{promote} - $t{killed},
        promote   => $t{promoted} - $t{promote},
        last_200  => max(map { $_->[1] } @before) // $t{kill},
        first_200 => $first,
        slowest   => $slowest,
        before    => \@before,
        after     => \@after,
        answers   => scalar @all,
    );
    ok(defined $first && $first - $t{promoted} < $CONNECT_TIMEOUT,
       "$what: the first claim sent after the kill to succeed answered within the "
       . "connect timeout (${CONNECT_TIMEOUT}s) of the end of the promotion");
    if (defined $first) {
        $seen{gap} = $first - $t{promoted};
        $seen{outage} = $first - $seen{last_200};
        note sprintf "%s: kill -9 at 0; no primary for %.3f s; pg_ctl promote took %.3f s; "
                     . 'first 200 %.3f s after the promotion ended (%.3f s after '
                     . 'pg_ctl promote began); last 200 before the kill answered at %.3f s, '
                     . 'so clients saw no 200 for %.3f s; slowest answer %.3f s',
                     $what, $seen{down}, $seen{promote}, $seen{gap}, $first - $t{promote},
                     $seen{last_200} - $t{kill}, $seen{outage}, $slowest;
    }

    my $db = $new->db($AQ::DB);
    is_deeply([AQ::answers_problems([map { [@$_[3, 4, 5]] } @after], dbh => $db, queue => $q)], [],
              "$what: every claim answered 200 after the kill (" . scalar(@after)
              . ') is held on the new primary by its key, at the version answered; '
              . 'no key holds two items')
        or diag explain [AQ::answers_problems([map { [@$_[3, 4, 5]] } @after], dbh => $db)];

    # the log: connecting failed with libpq's reason, no statement ran on
    # the standby, nothing crashed
    my $old_port = $old->port;
    like($log, qr/could not connect to PostgreSQL: connection to server at "127\.0\.0\.1", port $old_port failed: Connection refused/,
         "$what: nginx's error log says why connecting failed while no primary existed "
         . '(the killed primary refused)');
    like($log, qr/could not connect to PostgreSQL: .*; .*(?:session is read-only|server is in hot standby mode)/,
         "$what: ... and, on the same line, why the standby was passed by (read-only)");
    unlike($log, qr/failed: 25006 /, "$what: no claim ran on the standby (no SQLSTATE 25006)");
    is_deeply(AQ::Faults::log_problems($log), [],
              "$what: no [alert], [crit] or [emerg] in nginx's error log, no crashed worker");
    my @logged = grep { /annotation queue: / && /\[(?:error|warn)\]/ } split /\n/, $log;
    my %kinds;
    for (@logged) {
        my ($k) = /annotation queue: (.{0,60})/;
        $k =~ s/\d+/N/g;
        $kinds{$k}++;
    }
    note "$what: nginx logged " . join '; ', map { "$kinds{$_} x \"$_\"" } sort keys %kinds;
    cmp_ok($held_conns, '<=', $WORKERS * $POOL,
           "$what: nginx holds at most workers x pool size connections to the new primary");

    # claims the old primary committed that no client was answered 200 for
    # (in flight at the kill; their keys retried, and a retry gets the item
    # back when the claim reached the standby)
    my %answered = map { $_->[3] => 1 } @ok;
    my $claimed = $db->selectcol_arrayref(
        q{SELECT id FROM annotation_queue.items WHERE queue_id = ? AND status = 'claimed'},
        undef, $q);
    $seen{orphans} = scalar grep { !$answered{$_} } @$claimed;
    return \%seen;
}

# Items answered 200 to two keys (across the failover).
sub answered_twice {
    my (@answers) = @_;
    my %n;
    $n{ $_->[3] }++ for @answers;
    return scalar grep { $n{$_} > 1 } keys %n;
}

my %loss = (claims => 0, lost => 0, other_key => 0, other_version => 0, twice => 0,
            rounds => 0, gaps => []);

sub measure_async {
    my ($what, $seen) = @_;
    my $f = fate(AQ::Standby::primary_node(), $seen->{before});
    my $twice = answered_twice(@{ $seen->{before} }, @{ $seen->{after} });
    note sprintf '%s: of %d claims answered 200 before the kill, %d are held on the new '
                 . 'primary as answered, %d were lost (the item is available again), %d are '
                 . 'held there by another key, %d at another version; %d items were '
                 . 'answered to two keys; %d items claimed on the new primary were never '
                 . 'answered 200', $what, scalar @{ $seen->{before} }, $f->{held},
                 scalar @{ $f->{lost} }, scalar @{ $f->{other_key} },
                 scalar @{ $f->{other_version} }, $twice, $seen->{orphans};
    $loss{rounds}++;
    $loss{claims} += @{ $seen->{before} };
    $loss{$_} += @{ $f->{$_} } for qw(lost other_key other_version);
    $loss{twice} += $twice;
    push @{ $loss{gaps} }, $seen->{gap} if defined $seen->{gap};
}

{
    my $what = 'asynchronous failover';
    my $seen = failover($what, $primary, $standby, $queue{async}, $pool{async});
    measure_async($what, $seen);
    $primary = $standby;
}

{
    my $what = 'synchronous failover';
    my $sync = $primary->standby(name => 'standby2', sync => 1);
    is($primary->replication_state($sync)->{sync_state}, 'sync',
       "$what: the new standby is the primary's synchronous standby");
    my $seen = failover($what, $primary, $sync, $queue{sync}, $pool{sync});
    my @all = (@{ $seen->{before} }, @{ $seen->{after} });
    my $db = $sync->db($AQ::DB);
    is_deeply([AQ::answers_problems([map { [@$_[3, 4, 5]] } @{ $seen->{before} }],
                                    dbh => $db, queue => $queue{sync})], [],
              "$what: every claim answered 200 before the kill ("
              . scalar(@{ $seen->{before} }) . ') is on the promoted standby, held by '
              . 'the key that got it, at the version answered');
    is_deeply([AQ::answers_problems([map { [@$_[3, 4, 5]] } @all], dbh => $db,
                                    queue => $queue{sync})], [],
              "$what: across the failover no item was answered twice, to two keys or to one");
    note sprintf '%s: %d items claimed on the new primary were never answered 200 '
                 . '(claims in flight at the kill)', $what, $seen->{orphans};
    $primary = $sync;
}

# The primary hangs instead (SIGSTOP: its port completes TCP handshakes,
# nothing answers), listed first; its standby is promoted.  libpq tries
# the hosts of a list in order, and in a non-blocking connect
# (PQconnectPoll) it does not apply connect_timeout per host.  Without a
# connect_timeout in the conninfo the attempt waits on the first host until
# the module's connect timeout ends it: every claim gets 503
# database_unavailable with Retry-After, in time (the control).  With
# connect_timeout=2, the module applies it host by host, as libpq does when
# it connects blocking: after 2 s on the silent host the attempt goes on
# with the next, and the claims reach the promoted standby listed second.
# Once the hung server is gone (killed: its port refuses), claims reach the
# new primary at once either way.
sub claim_four {
    my ($ngx) = @_;
    my @c = map { [AQ::Client->new(port => $ngx->port, timeout => $CLIENT_TIMEOUT), shift @small_keys] }
            1 .. 4;
    my $t0 = time;
    $_->[0]->send_request(body => qq({"queue_id":"$queue{small}"}), key => $_->[1]) for @c;
    my (@out, @bad, @took);
    for (@c) {
        my $r = $_->[0]->read_response;
        push @took, time - $t0;
        my $out = AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error});
        push @out, $out;
        push @bad, $out unless $out eq '200 item'
                               || unavailable_problem(@$r{qw(status headers body error)}) eq '';
    }
    return (\@out, \@bad, \@took);
}

{
    my $what = 'hung primary listed first';
    my $next = $primary->standby(name => 'standby3');
    $primary->freeze;
    $next->promote;
    AQ::Standby::use_primary($next);

    my $connect = AQ::Faults::scaled(6);
    my ($per_host) = nginx_for(dsn($primary, $next, tsa => 'read-write', host_timeout => 2),
                               workers => 1, pool => 4, connect => $connect);
    my ($out, $bad, $took) = claim_four($per_host);
    is_deeply($out, [('200 item') x 4],
              "$what, connect_timeout=2 in the conninfo: the claims reach the promoted "
              . 'standby listed second') or diag explain [$bad, $took];
    cmp_ok(max(@$took), '<', $connect,
           "$what, connect_timeout=2: ... before the module's connect timeout (${connect}s): "
           . sprintf('%.2f s', max(@$took)));
    like($per_host->error_log,
         qr/\[warn\] .*annotation queue: host "127\.0\.0\.1" port "@{[ $primary->port ]}" did not answer within connect_timeout \(2000 ms\), trying the next host/,
         "$what, connect_timeout=2: nginx's error log says which host was passed by, and why");
    is_deeply(AQ::Faults::log_problems($per_host->error_log), [],
              "$what, connect_timeout=2: no [alert], [crit] or [emerg] in nginx's error log");
    $per_host->stop;

    my ($ngx) = nginx_for(dsn($primary, $next, tsa => 'read-write'), workers => 1, pool => 4);
    ($out, $bad, $took) = claim_four($ngx);
    is_deeply($bad, [], "$what, control without connect_timeout: 4 concurrent claims each "
                        . 'answer 200 or 503 database_unavailable JSON with Retry-After');
    cmp_ok(max(@$took), '<', $CONNECT_TIMEOUT + 1,
           "$what, control: ... each within the connect timeout (${CONNECT_TIMEOUT}s): "
           . 'nothing hangs');
    note sprintf '%s, control: answers %s, after %s', $what, join(', ', @$out),
                 join(', ', map { sprintf '%.3f s', $_ } @$took);
    is_deeply([grep { $_ eq '200 item' } @$out], [],
              "$what, control: ... none reaches the standby listed second (the attempt "
              . 'stays on the silent host)');
    like($ngx->error_log, qr/connecting to PostgreSQL timed out/,
         "$what, control: nginx's error log says the connection attempt timed out");

    $primary->kill9;
    my ($st, $h, $body, $err) = claim_once($ngx, $queue{small}, shift @small_keys);
    is(AQ::Faults::outcome($st, $body, $err), '200 item',
       "$what: once the hung server is killed (its port refuses), a claim answers 200 "
       . 'from the new primary');
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in nginx's error log");
    $ngx->stop;
    $primary = $next;
}

# The synchronous standby goes away and nothing takes it out of
# synchronous_standby_names (no HA manager): each commit waits for it.  A
# claim answers 504 query_timeout at the query timeout (PostgreSQL's
# statement_timeout ends before the commit, so the server does not bound
# the wait), its backend goes on waiting after nginx closed the connection,
# and its claim is invisible meanwhile.  Once the primary stops waiting
# (synchronous_standby_names reset), those claims are committed: the key's
# retry gets the same item back.
{
    my $what = 'synchronous standby gone';
    my $gone = $primary->standby(name => 'standby4', sync => 1);
    my ($ngx, $sport) = nginx_for(dsn($primary, tsa => 'read-write'), workers => 1, pool => 2);
    $gone->kill9;
    my @c = map { [AQ::Client->new(port => $ngx->port, timeout => $CLIENT_TIMEOUT), shift @small_keys] }
            1 .. 2;
    my $t0 = time;
    $_->[0]->send_request(body => qq({"queue_id":"$queue{small}"}), key => $_->[1]) for @c;
    my (@out, @took);
    for (@c) {
        my $r = $_->[0]->read_response;
        push @took, time - $t0;
        push @out, AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error});
    }
    is_deeply(\@out, [('504 query_timeout') x 2],
              "$what: 2 concurrent claims answer 504 query_timeout");
    cmp_ok(max(@took), '<', $QUERY_TIMEOUT + 1,
           "$what: ... at the query timeout (${QUERY_TIMEOUT}s): nothing hangs");
    note sprintf '%s: answered after %s', $what, join ', ', map { sprintf '%.3f s', $_ } @took;
    my $waiting = sub {
        $primary->value(q{SELECT count(*) FROM pg_stat_activity
                           WHERE datname = ? AND wait_event = 'SyncRep'}, $AQ::DB)
    };
    # (the two claims may have gone out as one statement: one backend or two)
    ok(AQ::Faults::wait_until(5, sub {
           AQ::Faults::pool_state($sport)->{busy} == 0 && $waiting->() >= 1 }),
       "$what: nginx gave the claims up (no connection of its pool is busy); "
       . 'their backends still wait for the standby')
        or diag explain $primary->db->selectall_arrayref(
            q{SELECT application_name, state, wait_event FROM pg_stat_activity
               WHERE datname = ?}, undef, $AQ::DB);
    is_deeply([map { @{ held_by($primary, $queue{small}, $_->[1]) } } @c], [],
              "$what: meanwhile their claims are invisible (no key holds an item)");
    $primary->release_sync;
    ok(AQ::Faults::wait_until(10, sub { $waiting->() == 0 }),
       "$what: with synchronous_standby_names reset, the commits that waited complete");
    my @held = map { held_by($primary, $queue{small}, $_->[1]) } @c;
    is_deeply([map { scalar @$_ } @held], [1, 1],
              "$what: ... and each key answered 504 now holds an item (the claim committed)");
    my ($st, $h, $body, $err) = claim_once($ngx, $queue{small}, $c[0][1]);
    my $d = AQ::Faults::decode($body) // {};
    is(AQ::Faults::outcome($st, $body, $err) . ' ' . ($d->{item}{id} // 'none'),
       "200 item $held[0][0]",
       "$what: the key's retry answers 200 with that same item (resumed)");
    is_deeply(AQ::Faults::log_problems($ngx->error_log), [],
              "$what: no [alert], [crit] or [emerg] in nginx's error log");
    $ngx->stop;
}

for my $r (@long) {
    my $what = "asynchronous failover $r (AQ_FAILOVER_LONG)";
    my $next = $primary->standby(name => "long$r");
    my $seen = failover($what, $primary, $next, $queue{"long$r"}, $pool{"long$r"});
    measure_async($what, $seen);
    $primary = $next;
}

note sprintf 'asynchronous replication over %d failovers: %d claims answered 200 before '
             . 'the kill; %d lost, %d held by another key, %d at another version; %d items '
             . 'answered to two keys; gaps after the promotion: %s',
             $loss{rounds}, $loss{claims}, $loss{lost}, $loss{other_key},
             $loss{other_version}, $loss{twice},
             join(', ', map { sprintf '%.3f s', $_ } @{ $loss{gaps} });

done_testing();
