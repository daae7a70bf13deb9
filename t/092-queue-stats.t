# The depth of a queue: annotation_queue.queue_stats() (sql/006) counted in
# every state, and the status page's queue numbers
# (annotation_queue_status_queues, annotation_queue_status_interval):
# annotation_queue_queue_items{queue, state},
# annotation_queue_queue_oldest_available_seconds{queue},
# annotation_queue_queue_read_timestamp_seconds{queue},
# annotation_queue_queue_read_age_seconds{queue} and
# annotation_queue_queue_read_ok{queue}.
#
# The status locations read the queues as a role of their own, so that the
# suite can see their backends apart from the claims' (pg_stat_activity by
# user name) and cut them off (NOLOGIN) while the claims go on.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Workflow;
use IO::Select;
use Test::More;
use Time::HiRes ();

my $dbh = AQ::dbh();
my $org = AQ::org('queue-stats');

# ---------------------------------------------------------------------------
# Fixtures: slots put in a state directly (the claim's own paths are other
# suites' business), by item and slot.

# The items of $queue, in the order they were enqueued (their first seq).
sub items_of {
    my ($queue) = @_;
    return $dbh->selectcol_arrayref(
        q{SELECT id FROM annotation_queue.items WHERE queue_id = ?
           GROUP BY id ORDER BY min(seq)}, undef, $queue);
}

# set_slot($item, $slot, 'live' | 'expired' | 'completed' | 'failed',
#          expirations => n)
sub set_slot {
    my ($item, $slot, $state, %o) = @_;
    my %sql = (
        live      => q{status = 'claimed', claimed_by = gen_random_uuid(),
                       claimed_at = now(), lease_expires_at = now() + interval '1 hour'},
        expired   => q{status = 'claimed', claimed_by = gen_random_uuid(),
                       claimed_at = now() - interval '2 hours',
                       lease_expires_at = now() - interval '1 second'},
        completed => q{status = 'completed', claimed_by = NULL, lease_expires_at = NULL,
                       completed_at = now()},
        failed    => q{status = 'failed', claimed_by = NULL, lease_expires_at = NULL},
    );
    $dbh->do("UPDATE annotation_queue.items SET $sql{$state}, expirations = ?
               WHERE id = ? AND slot = ?", undef, $o{expirations} // 0, $item, $slot);
}

sub stats {
    my ($queue) = @_;
    my $r = $dbh->selectrow_hashref(
        'SELECT * FROM annotation_queue.queue_stats(?)', undef, $queue);
    return join ' ', map { "$_=" . ($r->{$_} // 'NULL') }
                     qw(available claimed expired completed failed);
}

sub age {
    my ($queue) = @_;
    return scalar $dbh->selectrow_array(
        'SELECT oldest_available_age FROM annotation_queue.queue_stats(?)', undef, $queue);
}

sub queue_with {
    my ($name, %o) = @_;
    return scalar $dbh->selectrow_array(
        'SELECT annotation_queue.create_queue(?, ?, ?::interval, ?, ?)', undef,
        $org, $name, '15 minutes', $o{overlap} // 1, $o{max_attempts});
}

sub fill {
    my ($queue, $n) = @_;
    AQ::enqueue_many($queue, $n);
    return items_of($queue);
}

# ---------------------------------------------------------------------------
# queue_stats() in SQL.
{
    my $what = 'queue_stats';

    # overlap 1, no retry limit: each state once, and an expired lease of
    # many expiries is still only expired
    my $q = queue_with('sql-plain');
    my $it = fill($q, 7);
    set_slot($it->[2], 1, 'live');
    set_slot($it->[3], 1, 'expired', expirations => 50);
    set_slot($it->[4], 1, 'completed');
    set_slot($it->[5], 1, 'failed');
    set_slot($it->[6], 1, 'completed');
    is(stats($q), 'available=2 claimed=1 expired=1 completed=2 failed=1',
       "$what: overlap 1, no max_attempts: each slot counted in its state, "
       . "an expired lease of any number of expiries is expired");

    # overlap 2, max_attempts 2: slots counted, not items; an expired slot
    # at its last allowed expiry is failed, one before it expired
    $q = queue_with('sql-overlap', overlap => 2, max_attempts => 2);
    $it = fill($q, 5);
    my $slots = $dbh->selectrow_array(
        'SELECT count(*) FROM annotation_queue.items WHERE queue_id = ?', undef, $q);
    is($slots, 10, "$what: 5 items of overlap 2 are 10 slots");
    is(stats($q), 'available=10 claimed=0 expired=0 completed=0 failed=0',
       "$what: overlap 2: 5 new items count 10 available slots");
    set_slot($it->[1], 1, 'live');
    set_slot($it->[2], 1, 'expired', expirations => 0);
    set_slot($it->[2], 2, 'completed');
    set_slot($it->[3], 1, 'expired', expirations => 1);
    set_slot($it->[3], 2, 'failed');
    set_slot($it->[4], 1, 'completed');
    set_slot($it->[4], 2, 'completed');
    is(stats($q), 'available=3 claimed=1 expired=1 completed=3 failed=2',
       "$what: overlap 2, max_attempts 2: a slot at its last allowed expiry "
       . "(1 expiry before) is failed, one with none before is expired");

    # max_attempts 1: the first expiry fails the slot; a live lease is
    # claimed whatever its expiries
    $q = queue_with('sql-one-attempt', max_attempts => 1);
    $it = fill($q, 3);
    set_slot($it->[0], 1, 'expired', expirations => 0);
    set_slot($it->[1], 1, 'live', expirations => 3);
    is(stats($q), 'available=1 claimed=1 expired=0 completed=0 failed=1',
       "$what: max_attempts 1: an expired lease is failed, a live one claimed");

    # the same as the claim decides: a claim on the expired slot of
    # max_attempts 1 marks it failed (the slot counted failed before and after)
    my $fails_now = $dbh->selectrow_array(
        q{SELECT count(*) FROM annotation_queue.items i
            JOIN annotation_queue.queues q ON q.id = i.queue_id
           WHERE i.queue_id = ? AND i.status = 'claimed'
             AND i.lease_expires_at <= now() AND i.expirations + 1 >= q.max_attempts},
        undef, $q);
    is($fails_now, 1, "$what: the slot it counts failed is the one the claim's rule "
                      . "(expirations + 1 >= max_attempts) would fail");

    # an unknown queue, and an empty one: zeros, no age
    my $unknown = AQ::random_uuid();
    is(stats($unknown) . ' age=' . (age($unknown) // 'NULL'),
       'available=0 claimed=0 expired=0 completed=0 failed=0 age=NULL',
       "$what: an unknown queue: zeros and no age");
    my $empty = queue_with('sql-empty');
    is(stats($empty) . ' age=' . (age($empty) // 'NULL'),
       'available=0 claimed=0 expired=0 completed=0 failed=0 age=NULL',
       "$what: an empty queue: zeros and no age");

    # the oldest available slot's age: enqueued 300 s ago (an older slot
    # that is claimed, or of another queue, does not count); when it is
    # taken, the next one's (100 s)
    $q = queue_with('sql-age');
    $it = fill($q, 3);
    $dbh->do(q{UPDATE annotation_queue.items SET created_at = now() - ?::interval
                WHERE id = ?}, undef, $_->[1], $_->[0])
        for [$it->[0], '1000 seconds'], [$it->[1], '300 seconds'], [$it->[2], '100 seconds'];
    set_slot($it->[0], 1, 'live');
    my $a = age($q);
    ok($a >= 300 && $a < 300 + 60 * AQ::slow(),
       "$what: the age is the oldest available slot's (300 s), not a claimed one's: $a");
    set_slot($it->[1], 1, 'completed');
    $a = age($q);
    ok($a >= 100 && $a < 100 + 60 * AQ::slow(),
       "$what: once it is done, the next available slot's (100 s): $a");
    set_slot($it->[2], 1, 'failed');
    is(age($q) // 'NULL', 'NULL', "$what: no available slot left: no age");
}

# ---------------------------------------------------------------------------
# The status page.

# The role the status locations read as: may log in, may read the queues.
my $ROLE = 'aq_stats_' . AQ::random_hex(8);
$dbh->do(qq{CREATE ROLE "$ROLE" LOGIN});
$dbh->do(qq{GRANT USAGE ON SCHEMA annotation_queue TO "$ROLE"});
$dbh->do(qq{GRANT SELECT ON annotation_queue.items, annotation_queue.queues,
                            annotation_queue.api_keys TO "$ROLE"});
my $STATS_DSN = AQ::conninfo(AQ::parse_conninfo($AQ::DSN), user => $ROLE);

END {
    # the database goes with AQ's END; the role is the cluster's
    if ($dbh) {
        eval {
            $dbh->do(qq{REVOKE ALL ON annotation_queue.items, annotation_queue.queues,
                                      annotation_queue.api_keys FROM "$ROLE"});
            $dbh->do(qq{REVOKE ALL ON SCHEMA annotation_queue FROM "$ROLE"});
            $dbh->do(qq{SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE usename = '$ROLE'});
        };
    }
}

# The backends of the status locations' role: "pid@query_start" of each
# that ever ran (or prepared) the statement, sorted.
sub stats_backends {
    my $rows = $dbh->selectcol_arrayref(
        q{SELECT pid || '@' || coalesce(query_start::text, '-')
            FROM pg_stat_activity
           WHERE usename = ? AND datname = current_database()
           ORDER BY pid}, undef, $ROLE);
    return join ' ', @$rows;
}

sub page {
    my ($port, %o) = @_;
    my ($st, $h, $body, $err) = AQ::Client->new(port => $port)
        ->request(method => $o{method} // 'GET', uri => $o{uri} // '/status');
    return ($st, $h, $body, AQ::Workflow::parse_prometheus($body // ''), $err);
}

# The queue samples of a parsed page, for $queue: "available=.. claimed=..
# expired=.. completed=.. failed=..", or "absent".
sub items_line {
    my ($p, $queue) = @_;
    my @v = map { AQ::Workflow::sample($p, 'annotation_queue_queue_items',
                                       queue => $queue, state => $_) }
            qw(available claimed expired completed failed);
    return 'absent' unless grep { defined } @v;
    return join ' ', map { ("available", "claimed", "expired", "completed", "failed")[$_]
                           . '=' . ($v[$_] // 'absent') } 0 .. 4;
}

sub qsample {
    my ($p, $name, $queue) = @_;
    return AQ::Workflow::sample($p, "annotation_queue_queue_$name", queue => $queue)
           // 'absent';
}

# every sample of a family with a queue label, and of which queues
sub queues_shown {
    my ($p) = @_;
    my %q;
    $q{ $_->[1]{queue} }++ for grep { defined $_->[1]{queue} } @{ $p->{samples} };
    return \%q;
}

sub bad_log_lines {
    my ($ngx) = @_;
    return [grep { /\[(?:alert|crit|emerg)\]|segfault|exited on signal/ } split /\n/, $ngx->error_log];
}

my $qa = queue_with('page-a', overlap => 2);
my $qb = queue_with('page-b', max_attempts => 1);
my $qc = queue_with('page-unlisted');
{
    my $it = fill($qa, 4);            # 8 slots
    set_slot($it->[0], 1, 'live');
    set_slot($it->[0], 2, 'completed');
    set_slot($it->[1], 1, 'expired');
    set_slot($it->[3], 2, 'expired');
    # the oldest available slot: the second slot of the second item
    $dbh->do(q{UPDATE annotation_queue.items SET created_at = now() - interval '1000 seconds'
                WHERE id = ?}, undef, $it->[1]);
    $it = fill($qb, 3);
    set_slot($it->[0], 1, 'expired');   # its first expiry fails it
    set_slot($it->[1], 1, 'failed');
    fill($qc, 2);
}
my $want_a = 'available=4 claimed=1 expired=2 completed=1 failed=0';
my $want_b = 'available=1 claimed=0 expired=0 completed=0 failed=2';

# the interval: long enough for two page reads and a database change in
# between on a loaded machine
my $interval = 2 * AQ::slow();
my $sport = AQ::free_port();
my $ngx = AQ::start_nginx(http => <<"_EOC_");
    server {
        listen 127.0.0.1:$sport;

        location = /status {
            annotation_queue_status;
            annotation_queue_database "$STATS_DSN";
            annotation_queue_pool_size 3;
            annotation_queue_status_queues $qa;
            annotation_queue_status_queues \U$qb\E;
            annotation_queue_status_interval ${interval}s;
        }

        location = /plain {
            annotation_queue_status;
        }
    }
_EOC_

{
    my $what = 'page';

    # claims go on without the status location's pool ever connecting
    my $keys = AQ::keys_for($org, 2);
    my $c = AQ::Client->new(port => $ngx->port);
    my ($st) = $c->claim($qc, $keys->[0]);
    is($st, 200, "$what: a claim answers 200");
    is(stats_backends(), '', "$what: before any page is asked for, the status "
                             . "location has no connection (nothing read, not on a claim's path)");

    my $t0 = time;
    my ($h, $body, $p);
    ($st, $h, $body, $p) = page($sport);
    my $t1 = time;
    is($st, 200, "$what: the page answers 200");
    like($h->{'content-type'} // '', qr{^text/plain; version=0\.0\.4$},
         "$what: Content-Type text/plain; version=0.0.4");
    is_deeply($p->{problems}, [], "$what: valid text format, each family together")
        or diag $body;
    is(items_line($p, $qa), $want_a,
       "$what: queue A (overlap 2): its slots by state");
    is(items_line($p, lc $qb), $want_b,
       "$what: queue B (max_attempts 1, configured in capitals, shown in lowercase): "
       . "an expired lease at its last attempt counts as failed");
    my $age = qsample($p, 'oldest_available_seconds', $qa);
    ok($age =~ /^\d+\.\d{3}$/ && $age >= 1000 && $age < 1000 + 60 * AQ::slow(),
       "$what: queue A's oldest available slot is 1000 s old: $age");
    my $ts = qsample($p, 'read_timestamp_seconds', $qa);
    ok($ts =~ /^\d+\.\d{3}$/ && $ts >= $t0 - 1 && $ts <= $t1 + 1,
       "$what: the read's Unix time is when the page was asked for: $ts in [$t0, $t1]");
    my $ra = qsample($p, 'read_age_seconds', $qa);
    ok($ra =~ /^\d+\.\d{3}$/ && $ra < $interval,
       "$what: the numbers are younger than the interval: $ra s");
    is(join(' ', map { qsample($p, 'read_ok', $_) } $qa, lc $qb), '1 1',
       "$what: read_ok 1 for both queues");
    my $shown = queues_shown($p);
    is(join(' ', sort keys %$shown), join(' ', sort $qa, lc $qb),
       "$what: only the configured queues show (not queue C, whose claim went through)");
    is($shown->{$qa}, 9, "$what: 9 samples a queue: 5 states, age, read time, read age, read_ok");
    my @types = map { "$_->[0] $_->[1]" } grep { $_->[0] =~ /^annotation_queue_queue_/ } @{ $p->{families} };
    is("@types", join(' ', map { "annotation_queue_queue_$_ gauge" }
                           qw(items oldest_available_seconds read_timestamp_seconds
                              read_age_seconds read_ok)),
       "$what: five gauge families, after the pools'");
    ok(defined AQ::Workflow::sample($p, 'annotation_queue_waiting', pool => 0, worker => 'all'),
       "$what: the pools' metrics are there too");
    like($body, qr/^# HELP annotation_queue_queue_items \S.*\n# TYPE annotation_queue_queue_items gauge\n/m,
         "$what: HELP then TYPE, as the pools' families");

    # a status location without queues: no queue family at all
    my ($pst, $ph, $pbody, $pp) = page($sport, uri => '/plain');
    is($pst, 200, "$what: a status location without queues answers 200");
    is(scalar(grep { $_->[0] =~ /^annotation_queue_queue_/ } @{ $pp->{families} }), 0,
       "$what: ... and shows no queue family");

    # -----------------------------------------------------------------------
    # caching: a change in the database does not show before the interval;
    # no statement reached PostgreSQL for the second page
    $what = 'cache';
    my $before = stats_backends();
    isnt($before, '', "$what: the status location's backend ran the read");
    AQ::enqueue_many($qa, 3);
    ($st, $h, $body, $p) = page($sport);
    my $ts2 = qsample($p, 'read_timestamp_seconds', $qa);
    is("$st " . items_line($p, $qa), "200 $want_a",
       "$what: a second page within the interval shows the same numbers although "
       . "3 items were enqueued");
    is($ts2, $ts, "$what: ... and the same read time");
    is(stats_backends(), $before,
       "$what: ... and no statement reached PostgreSQL (the status role's backends "
       . "and their last statement's start unchanged)");

    # after the interval, the new numbers (polled; each poll within an
    # interval is answered from the worker's copy)
    my $want_new = 'available=10 claimed=1 expired=2 completed=1 failed=0';
    my $deadline = Time::HiRes::time() + 5 * $interval + 10 * AQ::slow();
    my $seen = '';
    while (Time::HiRes::time() < $deadline) {
        ($st, $h, $body, $p) = page($sport);
        $seen = items_line($p, $qa);
        last if $seen eq $want_new;
        Time::HiRes::sleep(0.2);
    }
    is($seen, $want_new, "$what: after the interval the page shows the 3 new items "
                         . "(6 slots of overlap 2)");
    my $ts3 = qsample($p, 'read_timestamp_seconds', $qa);
    ok($ts3 > $ts, "$what: ... read later: $ts3 > $ts");
    isnt(stats_backends(), $before, "$what: ... by a statement that reached PostgreSQL");

    # -----------------------------------------------------------------------
    # page requests that come while the read runs wait for that one read
    $what = 'shared read';
    AQ::lock_items();
    my $deadline2 = Time::HiRes::time() + 5 * $interval + 10 * AQ::slow();
    # the next read starts with the first page after the interval: ask
    # until a read waits on the lock
    my @clients;
    my $blocked = 0;
    while (!$blocked && Time::HiRes::time() < $deadline2) {
        my $cl = AQ::Client->new(port => $sport, timeout => 30);
        $cl->send_request(method => 'GET', uri => '/status');
        # either it answers from the worker's copy, or a read starts and
        # waits on the lock (and the page with it)
        while (Time::HiRes::time() < $deadline2) {
            $blocked = $dbh->selectrow_array(
                q{SELECT count(*) FROM pg_stat_activity
                   WHERE usename = ? AND wait_event_type = 'Lock'}, undef, $ROLE);
            last if $blocked;
            if (IO::Select->new($cl->{sock})->can_read(0.05)) {
                $cl->read_response;
                $cl->disconnect;
                $cl = undef;
                last;
            }
        }
        push @clients, $cl if $blocked && $cl;
    }
    is($blocked, 1, "$what: a page started a read, which waits on the locked items table");
    push @clients, map { my $cl = AQ::Client->new(port => $sport, timeout => 30);
                         $cl->send_request(method => 'GET', uri => '/status'); $cl } 1 .. 3;
    # one more, that goes away while it waits
    my $gone = AQ::Client->new(port => $sport, timeout => 30);
    $gone->send_request(method => 'GET', uri => '/status');
    # the statements of the status role now, and how many wait on the lock:
    # a second read would show here (waiting too) or after (a new start)
    my ($waiting_reads, $during) = $dbh->selectrow_array(
        q{SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'),
                 string_agg(pid || '@' || coalesce(query_start::text, '-'), ' ' ORDER BY pid)
            FROM pg_stat_activity
           WHERE usename = ? AND datname = current_database()}, undef, $ROLE);
    is($waiting_reads, 1, "$what: 5 pages asked for, one read waits on the lock");
    $gone->disconnect;
    AQ::unlock_items();
    my @res = map { $_->read_response } @clients;
    my @lines = map { "$_->{status} " . items_line(AQ::Workflow::parse_prometheus($_->{body}), $qa) }
                @res;
    is(stats_backends(), $during, "$what: no other statement started for the pages that waited");
    is_deeply(\@lines, [("200 $want_new") x 4],
              "$what: once unlocked, the 4 waiting pages answer 200 with the numbers of that read");
    my %ts = map { qsample(AQ::Workflow::parse_prometheus($_->{body}), 'read_timestamp_seconds', $qa) => 1 }
             @res;
    is(scalar(keys %ts), 1, "$what: ... all of the same read");
    is_deeply([grep { /\[(?:error|alert|crit|emerg)\]/ } split /\n/, $ngx->error_log], [],
              "$what: no [error], [alert], [crit] or [emerg] in the error log so far "
              . "(the page that went away included)");

    # -----------------------------------------------------------------------
    # the database refuses the status role: the page answers all the same
    $what = 'database down';
    my ($lst, $lh, $lbody, $lp) = page($sport);
    my $last_ts = qsample($lp, 'read_timestamp_seconds', $qa);
    $dbh->do(qq{ALTER ROLE "$ROLE" NOLOGIN});
    $dbh->selectrow_array(q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                             WHERE usename = ?}, undef, $ROLE);
    my $deadline3 = Time::HiRes::time() + 5 * $interval + 10 * AQ::slow();
    my $ok = '';
    while (Time::HiRes::time() < $deadline3) {
        ($st, $h, $body, $p) = page($sport);
        $ok = "$st " . qsample($p, 'read_ok', $qa);
        last if $ok eq '200 0';
        Time::HiRes::sleep(0.2);
    }
    is($ok, '200 0', "$what: the page answers 200 and says the read failed (read_ok 0)");
    like($h->{'content-type'} // '', qr{^text/plain; version=0\.0\.4$},
         "$what: Content-Type text/plain; version=0.0.4");
    is_deeply($p->{problems}, [], "$what: valid text format") or diag $body;
    is(items_line($p, $qa), $want_new, "$what: the last good read's numbers stay");
    is(qsample($p, 'read_timestamp_seconds', $qa), $last_ts, "$what: ... with its read time");
    ok(qsample($p, 'read_age_seconds', $qa) >= $interval,
       "$what: ... and their age, older than the interval: "
       . qsample($p, 'read_age_seconds', $qa));
    ok(defined AQ::Workflow::sample($p, 'annotation_queue_pool_size', pool => 1),
       "$what: the pools' metrics are there");
    my @failed = grep { /the status page could not read its queues/ } split /\n/, $ngx->error_log;
    ok(@failed >= 1 && $failed[0] =~ /\[error\]/,
       "$what: the failure is logged at [error]: " . ($failed[0] // 'none'));
    ($st) = $c->claim($qc, $keys->[1]);
    is($st, 200, "$what: claims go on meanwhile");

    # back: the numbers are read again
    $what = 'database back';
    $dbh->do(qq{ALTER ROLE "$ROLE" LOGIN});
    my $deadline4 = Time::HiRes::time() + 5 * $interval + 10 * AQ::slow();
    $ok = '';
    while (Time::HiRes::time() < $deadline4) {
        ($st, $h, $body, $p) = page($sport);
        $ok = "$st " . qsample($p, 'read_ok', $qa);
        last if $ok eq '200 1';
        Time::HiRes::sleep(0.2);
    }
    is($ok, '200 1', "$what: once the role may log in again, the next read succeeds");
    ok(qsample($p, 'read_timestamp_seconds', $qa) > $last_ts, "$what: ... a newer read");

    $ngx->stop;
    is_deeply(bad_log_lines($ngx), [], "$what: no [alert], [crit], [emerg] in the error log");
}

# ---------------------------------------------------------------------------
# A database never reached: no numbers, only the failure.
{
    my $what = 'never read';
    my $port = AQ::free_port();
    my $dead = AQ::start_nginx(http => <<"_EOC_");
    server {
        listen 127.0.0.1:$port;

        location = /status {
            annotation_queue_status;
            annotation_queue_database "$AQ::DEAD_DSN";
            annotation_queue_status_queues $qa;
        }
    }
_EOC_
    my ($st, $h, $body, $p) = page($port);
    is($st, 200, "$what: the page answers 200");
    is_deeply($p->{problems}, [], "$what: valid text format") or diag $body;
    is(items_line($p, $qa), 'absent', "$what: no queue numbers");
    is(qsample($p, 'read_timestamp_seconds', $qa) . ' ' . qsample($p, 'read_age_seconds', $qa),
       'absent absent', "$what: no read time, no age");
    is(qsample($p, 'read_ok', $qa), 0, "$what: read_ok 0");
    ok(defined AQ::Workflow::sample($p, 'annotation_queue_pool_size', pool => 1),
       "$what: the pools' metrics are there");
    $dead->stop;
    my @failed = grep { /the status page could not read its queues/ } split /\n/, $dead->error_log;
    is(scalar(@failed), 1, "$what: the failed read is logged once");
    like($failed[0] // '', qr/\[error\]/, "$what: ... at [error]");
    is_deeply(bad_log_lines($dead), [], "$what: no [alert], [crit], [emerg]");
}

# ---------------------------------------------------------------------------
# nginx -t.
{
    my $what = 'nginx -t';
    my $conf = sub {
        my ($status_location) = @_;
        my $port = AQ::free_port();
        return (http => "    server {\n        listen 127.0.0.1:$port;\n"
                        . "        location = /status {\n$status_location\n        }\n    }\n");
    };
    my ($rc, $out) = AQ::nginx_test_config($conf->(
        "annotation_queue_status; annotation_queue_status_queues $qa not-a-uuid;"));
    isnt($rc, 0, "$what: a bad uuid fails");
    like($out, qr/\[emerg\] \d+#\d+: invalid queue id "not-a-uuid" in "annotation_queue_status_queues": a uuid/,
         "$what: ... saying which and why") or diag $out;
    ($rc, $out) = AQ::nginx_test_config($conf->(
        "annotation_queue_status; annotation_queue_status_queues $qa;\n"
        . "annotation_queue_status_queues " . uc($qa) . ";"));
    isnt($rc, 0, "$what: a queue listed twice fails");
    like($out, qr/\[emerg\] \d+#\d+: duplicate queue id "\U$qa\E" in "annotation_queue_status_queues"/, "$what: ... duplicate queue id") or diag $out;
    ($rc, $out) = AQ::nginx_test_config($conf->("annotation_queue_status_queues $qa;"));
    isnt($rc, 0, "$what: queues without annotation_queue_status fail");
    like($out, qr/\[emerg\] \d+#\d+: "annotation_queue_status_queues" needs "annotation_queue_status"/,
         "$what: ... saying so") or diag $out;
    ($rc, $out) = AQ::nginx_test_config($conf->(
        "annotation_queue_status; annotation_queue_status_queues $qa; "
        . "annotation_queue_status_interval 0;"));
    isnt($rc, 0, "$what: an interval of 0 fails");
    like($out, qr/\[emerg\] \d+#\d+: "annotation_queue_status_interval" directive must be positive/,
         "$what: ... must be positive") or diag $out;
    ($rc, $out) = AQ::nginx_test_config($conf->(
        "annotation_queue_status; annotation_queue_status_queues $qa "
        . uc(AQ::random_uuid()) . "; annotation_queue_status_interval 30s;"));
    is($rc, 0, "$what: two queues, one in capitals, and an interval pass") or diag $out;
}

done_testing();
