# The claim statements of src/ngx_aq_sql.h run directly against PostgreSQL,
# exactly as the module prepares them (bench/claim-sql.pl reads them).
#
# The batch (NGX_AQ_CLAIM_BATCH_SQL, what a connection sends for up to 16
# waiting claims of one queue): its order is the single claim's (by
# priority, and within a priority the expired items, oldest lease first,
# before the available ones), each key checked, a held item given back, a
# key given twice one item: it hands out what successive single claims
# would, expired items included when nothing is available.  Through nginx,
# batches only form when every connection is busy (t/047-claim-semantics.t,
# t/110-slow.t and t/120-abort.t make them).
#
# Locks: a claim (single or batch) locks only the rows it takes; another
# session can take every other row with SKIP LOCKED while it is open.
#
# The plans of both statements: every read of items an index range of the
# index made for it, whatever the statistics say.  Their cost: in a queue
# with 50,000 live claims above the available head's priority, expired
# leases below it and many completed items, each statement reads fewer than
# 100 buffers (EXPLAIN (ANALYZE, BUFFERS)), as on a fresh queue.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use JSON::PP ();
use Test::More;

my $sql = `$^X $AQ::TOP/bench/claim-sql.pl $AQ::TOP/src/ngx_aq_sql.h NGX_AQ_CLAIM_BATCH_SQL`;
is($?, 0, 'the batch statement is read from src/ngx_aq_sql.h') or BAIL_OUT('no SQL');

my $dbh = AQ::dbh();
my $sth = $dbh->prepare($sql);
my $LEASE_MS = 900_000;

my $org = AQ::org('batch');
my $other = AQ::org('batch-other');
my %key = map { $_ => AQ::key($org, rater => "batch-$_") } qw(k1 k2 k3 k4 k5 k6 held);
$key{stranger} = AQ::key($other, rater => 'batch-stranger');
$key{unknown} = AQ::well_formed_key();
$key{revoked} = AQ::key($org, rater => 'batch-revoked');
AQ::revoke($key{revoked});

my %label_of;    # item id -> label
sub label { my ($id) = @_; return defined $id ? ($label_of{$id} // $id) : undef }

sub digest { return scalar $dbh->selectrow_array(
    q{SELECT encode(annotation_queue.key_hash(?), 'hex')}, undef, $_[0]) }

sub expired_since {
    my ($seconds, @labels) = @_;
    $dbh->do(q{UPDATE annotation_queue.items
                  SET status = 'claimed', claimed_by = gen_random_uuid(),
                      claimed_at = now() - interval '1 hour',
                      lease_expires_at = now() - ? * interval '1 second',
                      version = 1, attempts = 1
                WHERE id = ?}, undef, $seconds, AQ::item_id($_)) for @labels;
}

# [[key_ok, queue_ok, item label or undef, version or undef], ...]
sub batch {
    my ($queue, @names) = @_;
    my $digests = '{' . join(',', map { digest($key{$_}) } @names) . '}';
    $sth->execute($digests, $queue, $LEASE_MS);
    my @rows;
    while (my $r = $sth->fetchrow_arrayref) {
        push @rows, [$r->[0] ? 1 : 0, $r->[1] ? 1 : 0, label($r->[2]), $r->[5]];
    }
    return \@rows;
}

# --- the order of the single claim ------------------------------------------
my $q = AQ::queue($org, 'batch-order');
AQ::enqueue($q, 'b-avail-1', '{"b": "avail-1"}', 1);
AQ::enqueue($q, "b-avail-0-$_", qq({"b": "avail-0-$_"}), 0) for 1 .. 3;
AQ::enqueue($q, 'b-exp-5', '{"b": "exp-5"}', 5);
AQ::enqueue($q, 'b-exp-1', '{"b": "exp-1"}', 1);
AQ::enqueue($q, 'b-exp-low', '{"b": "exp-low"}', -1);
AQ::enqueue($q, 'b-held', '{"b": "held"}', 9);
$label_of{ AQ::item_id($_) } = $_
    for 'b-avail-1', (map { "b-avail-0-$_" } 1 .. 3), qw(b-exp-5 b-exp-1 b-exp-low b-held);
expired_since(10, 'b-exp-5', 'b-exp-1');
expired_since(1000, 'b-exp-low');
$dbh->do(q{UPDATE annotation_queue.items
              SET status = 'claimed', claimed_by = ?, claimed_at = now(),
                  lease_expires_at = now() + interval '1 hour', version = 4
            WHERE id = ?}, undef, AQ::key_id($key{held}), AQ::item_id('b-held'));

is_deeply(batch($q, qw(k1 k2 k3 held unknown k1 revoked stranger k4 k5 k6)),
          [[1, 1, 'b-exp-5', 2],        # k1: expired, priority above the head
           [1, 1, 'b-exp-1', 2],        # k2: expired, the head's priority
           [1, 1, 'b-avail-1', 1],      # k3: the available head
           [1, 1, 'b-held', 4],         # held: its own item back, same version
           [0, 0, undef, undef],        # unknown key
           [1, 1, 'b-exp-5', 2],        # k1 again: the same item
           [0, 0, undef, undef],        # revoked key
           [1, 0, undef, undef],        # a key of another organisation
           [1, 1, 'b-avail-0-1', 1],    # k4 .. k6: the rest in enqueue order
           [1, 1, 'b-avail-0-2', 1],
           [1, 1, 'b-avail-0-3', 1]],
          'one statement, in the single claim\'s order: expired above the head, '
          . 'expired at its priority, available; held items back; bad keys no item');

my $rows = $dbh->selectall_arrayref(
    q{SELECT i.id, k.rater FROM annotation_queue.items i
        JOIN annotation_queue.api_keys k ON k.id = i.claimed_by
       WHERE i.queue_id = ? AND i.status = 'claimed' ORDER BY k.rater}, undef, $q);
is_deeply([map { [label($_->[0]), $_->[1]] } @$rows],
          [['b-held', 'batch-held'], ['b-exp-5', 'batch-k1'], ['b-exp-1', 'batch-k2'],
           ['b-avail-1', 'batch-k3'], ['b-avail-0-1', 'batch-k4'],
           ['b-avail-0-2', 'batch-k5'], ['b-avail-0-3', 'batch-k6']],
          'the database agrees: each key holds the item it was given, one each');
is(AQ::item('b-exp-low')->{status}, 'claimed', 'the expired item of a lower priority was left');
is(AQ::item('b-exp-low')->{version}, 1, '... untouched (version 1)');

# --- nothing available: expired items, in the single claim's order ---------
my $dry = AQ::queue($org, 'batch-dry');
AQ::enqueue($dry, 'd-exp-0', '{"d": 0}', 0);
AQ::enqueue($dry, 'd-exp-3', '{"d": 3}', 3);
AQ::enqueue($dry, 'd-exp-0-old', '{"d": "0-old"}', 0);
$label_of{ AQ::item_id($_) } = $_ for qw(d-exp-0 d-exp-3 d-exp-0-old);
expired_since(5, 'd-exp-0', 'd-exp-3');
expired_since(50, 'd-exp-0-old');
my @fresh = map { "dry-$_" } 1 .. 4;
$key{$_} = AQ::key($org, rater => $_) for @fresh;
is_deeply(batch($dry, @fresh),
          [[1, 1, 'd-exp-3', 2],          # the highest priority first
           [1, 1, 'd-exp-0-old', 2],      # then the lease that ended first
           [1, 1, 'd-exp-0', 2],
           [1, 1, undef, undef]],         # the queue ran dry: the single claim next
          'with nothing available, the batch takes the expired items in the single '
          . 'claim\'s order: priority, then the lease that ended first');

# --- the priority inversion of a batch --------------------------------------
# Available items of priorities 2 and 0, an expired item of priority 1:
# successive single claims give 2, then 1 (the expired item goes before the
# available items of lower priorities), and so must a batch.
my $single_sql = `$^X $AQ::TOP/bench/claim-sql.pl $AQ::TOP/src/ngx_aq_sql.h NGX_AQ_CLAIM_SQL`;
my $single_sth = $dbh->prepare($single_sql);
sub single {
    my ($queue, $name) = @_;
    $single_sth->execute('\\x' . digest($key{$name}), $queue, $LEASE_MS);
    my $r = $single_sth->fetchrow_arrayref;
    $single_sth->finish;
    return label($r->[2]);
}
my %inv;
for my $how (qw(single batch)) {
    my $iq = $inv{$how} = AQ::queue($org, "inversion-$how");
    AQ::enqueue($iq, "$how-avail-2", '{"p": 2}', 2);
    AQ::enqueue($iq, "$how-avail-0", '{"p": 0}', 0);
    AQ::enqueue($iq, "$how-exp-1", '{"p": 1}', 1);
    $label_of{ AQ::item_id($_) } = $_ for map { "$how-$_" } qw(avail-2 avail-0 exp-1);
    expired_since(5, "$how-exp-1");
    $key{"$how-$_"} = AQ::key($org, rater => "inv-$how-$_") for 1 .. 2;
}
is_deeply([single($inv{single}, 'single-1'), single($inv{single}, 'single-2')],
          ['single-avail-2', 'single-exp-1'],
          'inversion, control: successive single claims give priority 2, then the '
          . 'expired item of priority 1');
is_deeply([map { $_->[2] } @{ batch($inv{batch}, 'batch-1', 'batch-2') }],
          ['batch-avail-2', 'batch-exp-1'],
          'inversion: a batch of two gives priority 2, then the expired item of '
          . 'priority 1 (not the available item of priority 0)');
is(AQ::item('batch-avail-0')->{status}, 'available', '... and leaves priority 0 available');

# --- locks: a claim locks only the rows it takes ----------------------------
# While the claiming transaction is open, another session takes every row
# it can with SKIP LOCKED: what it cannot take is what the claim locked.
my $session = AQ::new_session();
sub locked_by {
    my ($queue, $run) = @_;
    $dbh->begin_work;
    my @took = $run->();
    my $free = $session->selectcol_arrayref(
        q{SELECT id FROM annotation_queue.items WHERE queue_id = ?
              AND status <> 'completed' FOR UPDATE SKIP LOCKED}, undef, $queue);
    my $all = $dbh->selectcol_arrayref(
        q{SELECT id FROM annotation_queue.items WHERE queue_id = ?
              AND status <> 'completed'}, undef, $queue);
    $dbh->rollback;
    my %free = map { $_ => 1 } @$free;
    return { took => [sort @took], locked => [sort map { label($_) } grep { !$free{$_} } @$all] };
}
for my $case (['expired above the head', 3, 0], ['expired at the head\'s priority', 0, 0],
              ['expired below the head', 0, 3]) {
    my ($what, $pe, $pa) = @$case;
    (my $tag = $what) =~ s/\W+/-/g;
    my $lq = AQ::queue($org, "locks-$tag");
    AQ::enqueue($lq, "$tag-avail", '{"l": "avail"}', $pa);
    AQ::enqueue($lq, "$tag-avail-2", '{"l": "avail-2"}', $pa);
    AQ::enqueue($lq, "$tag-exp", '{"l": "exp"}', $pe);
    AQ::enqueue($lq, "$tag-exp-2", '{"l": "exp-2"}', $pe);
    $label_of{ AQ::item_id($_) } = $_ for map { "$tag-$_" } qw(avail avail-2 exp exp-2);
    expired_since(10, "$tag-exp");
    expired_since(5, "$tag-exp-2");
    $key{"locks-$tag-$_"} = AQ::key($org, rater => "locks-$tag-$_") for 1 .. 3;
    my $first = $pe >= $pa ? "$tag-exp" : "$tag-avail";
    my $second = $pe >= $pa ? "$tag-exp-2" : "$tag-avail-2";
    is_deeply(locked_by($lq, sub { single($lq, "locks-$tag-1") }),
              { took => [$first], locked => [$first] },
              "locks, $what: the single claim locks the one row it takes");
    is_deeply(locked_by($lq, sub { map { $_->[2] } @{ batch($lq, "locks-$tag-2", "locks-$tag-3") } }),
              { took => [sort $first, $second], locked => [sort $first, $second] },
              "locks, $what: a batch of two locks the two rows it takes");
}

# --- plans: each lookup through the index made for it --------------------
#
# Both statements, planned generic (what a connection's prepared statement
# ends up with) and custom, right after ANALYZE of a table of 50,000 items
# where nothing is claimed (the statistics under which the planner once weighed
# items_expiry_idx and items_holder_idx the same and found a key's own item
# by reading every claimed item): items_expiry_idx and items_available_idx
# are only used with the queue in their index condition and never to find a
# key's item (no claimed_by among their filters), items_holder_idx only with
# claimed_by in its index condition, and items is never read in full.
$dbh->do('UPDATE annotation_queue.items SET status = ?, claimed_by = NULL, '
         . 'claimed_at = NULL, lease_expires_at = NULL WHERE status = ?',
         undef, 'available', 'claimed');
my $plan_q = AQ::queue($org, 'batch-plans');
$dbh->do(q{INSERT INTO annotation_queue.items (queue_id, payload)
           SELECT ?, jsonb_build_object('n', g) FROM generate_series(1, 50000) AS g},
         undef, $plan_q);
$dbh->do('VACUUM ANALYZE annotation_queue.items');
$dbh->do("PREPARE plan_single (bytea, uuid, int8) AS $single_sql");
my $wide_sql = `$^X $AQ::TOP/bench/claim-sql.pl $AQ::TOP/src/ngx_aq_sql.h NGX_AQ_CLAIM_WIDE_SQL`;
$dbh->do("PREPARE plan_wide (bytea, uuid, int8) AS $wide_sql");
my $wait_sql = `$^X $AQ::TOP/bench/claim-sql.pl $AQ::TOP/src/ngx_aq_sql.h NGX_AQ_CLAIM_WAIT_SQL`;
$dbh->do("PREPARE plan_wait (bytea, uuid, int8) AS $wait_sql");
$dbh->do("PREPARE plan_batch (text[], uuid, int8) AS $sql");
my @plan_stmts = (['single', 'EXECUTE plan_single (decode(?, \'hex\'), ?, 900000)', 'k3'],
                  ['wide', 'EXECUTE plan_wide (decode(?, \'hex\'), ?, 900000)', 'k3'],
                  ['wait', 'EXECUTE plan_wait (decode(?, \'hex\'), ?, 900000)', 'k3'],
                  ['batch', 'EXECUTE plan_batch (?, ?, 900000)', 'k1', 'k2']);
sub plan_arg {
    my ($stmt) = @_;
    my @names = @$stmt[2 .. $#$stmt];
    return $stmt->[0] =~ /^(?:single|wide|wait)/ ? digest($key{ $names[0] })
                                  : '{' . join(',', map { digest($key{$_}) } @names) . '}';
}
for my $mode (qw(force_generic_plan force_custom_plan)) {
    $dbh->do("SET plan_cache_mode = $mode");
    for my $stmt (@plan_stmts) {
        my $name = $stmt->[0];
        my $lines = $dbh->selectcol_arrayref("EXPLAIN (COSTS OFF) $stmt->[1]", undef,
                                             plan_arg($stmt), $plan_q);
        my (@bad, $scan, $cond);
        my $done = sub {
            return unless $scan;
            push @bad, "$scan without an index condition" unless defined $cond;
            push @bad, "$scan: $cond"
                if defined $cond
                   && (($scan eq 'items_holder_idx' && $cond !~ /claimed_by/)
                       || ($scan ne 'items_holder_idx' && $scan ne 'items_pkey'
                           && $cond !~ /queue_id = /));
            $scan = $cond = undef;
        };
        for my $l (@$lines) {
            push @bad, $l if $l =~ /Seq Scan on items/;
            if ($l =~ /Index (?:Only )?Scan using (items_\w+)/) {
                $done->();
                $scan = $1;
                next;
            }
            next unless $scan;
            if ($l =~ /Index Cond: (.*)/) {
                $cond = $1;
            } elsif ($l =~ /Filter: (.*)/) {
                push @bad, "$scan filters on $1" if $scan ne 'items_holder_idx'
                                                   && $scan ne 'items_pkey'
                                                   && $1 =~ /claimed_by/;
                $done->();
            } elsif ($l !~ /^\s+(?:Index Cond|Filter|Heap Fetches)/) {
                $done->();
            }
        }
        $done->();
        is_deeply(\@bad, [], "$name claim, $mode: every items scan is an index range "
                             . 'of the index made for it') or diag join "\n", @$lines;
    }
}

# --- routable by queue: every items scan states the queue id -----------------
#
# With items distributed by queue_id (Citus), a statement runs on one shard
# only when every scan of items names the queue: an index condition or a
# filter on queue_id, the id lookups (items_pkey) and the update included.
for my $mode (qw(force_generic_plan force_custom_plan)) {
    $dbh->do("SET plan_cache_mode = $mode");
    for my $stmt (@plan_stmts) {
        my $name = $stmt->[0];
        my $lines = $dbh->selectcol_arrayref("EXPLAIN (COSTS OFF) $stmt->[1]", undef,
                                             plan_arg($stmt), $plan_q);
        my (@scans, $cur);
        for my $l (@$lines) {
            if ($l =~ /(?:Seq Scan on items|Index (?:Only )?Scan using (items_\w+))/) {
                $cur = { scan => $1 // 'seq scan', conds => '' };
                push @scans, $cur;
                next;
            }
            if ($cur && $l =~ /^\s+(?:Index Cond|Filter|Recheck Cond): (.*)/) {
                $cur->{conds} .= " $1";
            } elsif ($l !~ /^\s+(?:Index Cond|Filter|Recheck Cond|Heap Fetches)/) {
                $cur = undef;
            }
        }
        my @unrouted = map { "$_->{scan}:$_->{conds}" } grep { $_->{conds} !~ /queue_id = / } @scans;
        cmp_ok(scalar @scans, '>=', 5, "$name claim, $mode: the plan's items scans are seen")
            or diag join "\n", @$lines;
        is_deeply(\@unrouted, [], "$name claim, $mode: every items scan states the queue id "
                                  . '(a single-shard statement under Citus)')
            or diag join "\n", @$lines;
    }
}

# Citus routes a statement as one task only if its CTEs are SELECT, UPDATE
# or DELETE (an INSERT makes it a plan of several steps through the
# coordinator): no statement of the module inserts (the exclusions are the
# trigger's, sql/007), and every scan of exclusions states the queue too.
{
    my %text = map { $_ => scalar `$^X $AQ::TOP/bench/claim-sql.pl $AQ::TOP/src/ngx_aq_sql.h $_` }
               qw(NGX_AQ_CLAIM_SQL NGX_AQ_CLAIM_WAIT_SQL NGX_AQ_CLAIM_WIDE_SQL
                  NGX_AQ_CLAIM_BATCH_SQL
                  NGX_AQ_EXTEND_SQL
                  NGX_AQ_RELEASE_SQL NGX_AQ_COMPLETE_SQL NGX_AQ_SKIP_SQL
                  NGX_AQ_EXTEND_QUEUE_SQL NGX_AQ_RELEASE_QUEUE_SQL
                  NGX_AQ_COMPLETE_QUEUE_SQL NGX_AQ_SKIP_QUEUE_SQL);
    is_deeply([grep { $text{$_} !~ /\S/ } sort keys %text], [],
              'every statement is read from src/ngx_aq_sql.h');
    is_deeply([grep { $text{$_} =~ /\b(?:INSERT|DELETE)\b/i } sort keys %text], [],
              'no statement inserts or deletes (Citus routes only SELECT and UPDATE CTEs)');
    my @unrouted;
    for my $name (sort keys %text) {
        next unless $name =~ /CLAIM|QUEUE/;
        # each scan: from "annotation_queue.items <alias>" to the next scan
        my @parts = split /annotation_queue\.(items|exclusions)\s+(\w+)/, $text{$name};
        shift @parts;
        while (my ($table, $alias, $rest) = splice @parts, 0, 3) {
            push @unrouted, "$name: $table $alias"
                unless $rest =~ /\b\Q$alias\E\.queue_id = \$\d/;
        }
    }
    is_deeply(\@unrouted, [], 'the claims and the item statements naming the queue: '
                               . 'every scan of items and exclusions states the queue id')
        or diag explain \@unrouted;
}

# --- cost: bounded whatever the queue's state --------------------------------
#
# A queue in a state real queues reach: 50,000 live claims at priorities 1
# to 5 (each lease its own), available items at priority 0 (the head) and
# -2, 5,000 expired leases at priority -1 and 20,000 completed items.  A
# claim with a range on the priority above the head reads every live claim
# (the lease only a filter): hundreds of buffers.  Each statement, both
# plans, must read fewer than 100 (shared hit + read, EXPLAIN (ANALYZE,
# BUFFERS) of the whole statement, the claim's update included) and take
# the head; a batch, 50 more for each further claim it makes (its update
# and its key).  Run in a transaction rolled back, so each sees the same
# state.
my $dirty = AQ::queue($org, 'dirty');
$dbh->do(q{INSERT INTO annotation_queue.items
               (queue_id, payload, priority, status, claimed_by, claimed_at,
                lease_expires_at, version, attempts)
           SELECT ?, jsonb_build_object('live', g), 1 + g % 5, 'claimed',
                  gen_random_uuid(), now(),
                  now() + interval '1 hour' + g * interval '1 millisecond', 1, 1
             FROM generate_series(1, 50000) AS g}, undef, $dirty);
$dbh->do(q{INSERT INTO annotation_queue.items
               (queue_id, payload, priority, status, claimed_by, claimed_at,
                lease_expires_at, version, attempts)
           SELECT ?, jsonb_build_object('expired', g), -1, 'claimed',
                  gen_random_uuid(), now() - interval '2 hours',
                  now() - interval '1 hour' + g * interval '1 millisecond', 1, 1
             FROM generate_series(1, 5000) AS g}, undef, $dirty);
$dbh->do(q{INSERT INTO annotation_queue.items
               (queue_id, payload, priority, status, version, attempts, completed_at)
           SELECT ?, jsonb_build_object('done', g), g % 10, 'completed', 2, 1, now()
             FROM generate_series(1, 20000) AS g}, undef, $dirty);
my $head = AQ::enqueue($dirty, 'dirty-head', '{"dirty": "head"}', 0);
$label_of{$head} = 'dirty-head';
AQ::enqueue($dirty, undef, '{"dirty": 0}', 0) for 1 .. 20;
AQ::enqueue($dirty, undef, '{"dirty": -2}', -2) for 1 .. 5;
$dbh->do('VACUUM ANALYZE annotation_queue.items');
$key{$_} = AQ::key($org, rater => $_) for qw(dirty-1 dirty-2 dirty-3);
@plan_stmts = (['single', 'EXECUTE plan_single (decode(?, \'hex\'), ?, 900000)', 'dirty-1'],
               ['wide single', 'EXECUTE plan_wide (decode(?, \'hex\'), ?, 900000)', 'dirty-1'],
               ['wait single', 'EXECUTE plan_wait (decode(?, \'hex\'), ?, 900000)', 'dirty-1'],
               ['batch of one', 'EXECUTE plan_batch (?, ?, 900000)', 'dirty-1'],
               ['batch of two', 'EXECUTE plan_batch (?, ?, 900000)', 'dirty-2', 'dirty-3']);
for my $mode (qw(force_generic_plan force_custom_plan)) {
    $dbh->do("SET plan_cache_mode = $mode");
    for my $stmt (@plan_stmts) {
        my $name = $stmt->[0];
        $dbh->begin_work;
        my $json = $dbh->selectrow_array("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) $stmt->[1]",
                                         undef, plan_arg($stmt), $dirty);
        my $took = $dbh->selectcol_arrayref(
            q{SELECT i.id FROM annotation_queue.items i
                JOIN annotation_queue.api_keys k ON k.id = i.claimed_by
               WHERE i.queue_id = ? AND k.rater = ?}, undef, $dirty, $stmt->[2]);
        $dbh->rollback;
        my $plan = JSON::PP->new->decode($json)->[0]{Plan};
        my $buffers = $plan->{'Shared Hit Blocks'} + $plan->{'Shared Read Blocks'};
        my $bound = 100 + 50 * ($#$stmt - 2);
        cmp_ok($buffers, '<', $bound, "dirty queue, $name claim, $mode: fewer than $bound "
                                      . "buffers (read $buffers)");
        is_deeply([map { label($_) } @$took], ['dirty-head'],
                  "dirty queue, $name claim, $mode: ... and it takes the head");
    }
}

# --- exclusions: a probe per candidate -----------------------------------
#
# A key with 5,000 exclusions in the dirty queue (items it skipped, or
# slots it took in a queue of overlap > 1), the head among them: the lean
# claim takes nothing and says "wide" (one probe of exclusions_key_idx);
# the wide claim leaves the head out by one probe of exclusions_pkey per
# candidate (queue, item and key in its index condition), never by reading
# the key's exclusions, so it still reads fewer than 100 buffers, and takes
# the next item.  The batch serves no key with exclusions (the single
# claims do).
{
    my $k = AQ::key($org, rater => 'dirty-excluded');
    $key{'dirty-excluded'} = $k;
    my $kid = AQ::key_id($k);
    $dbh->do(q{INSERT INTO annotation_queue.exclusions
                   (item_id, key_id, queue_id, reason)
               SELECT gen_random_uuid(), ?, ?, 'skipped'
                 FROM generate_series(1, 5000)}, undef, $kid, $dirty);
    $dbh->do(q{INSERT INTO annotation_queue.exclusions
                   (item_id, key_id, queue_id, reason)
               VALUES (?, ?, ?, 'skipped')}, undef, $head, $kid, $dirty);
    $dbh->do('ANALYZE annotation_queue.exclusions');
    $dbh->begin_work;
    my $lean = $dbh->selectrow_arrayref(
        'EXECUTE plan_single (decode(?, \'hex\'), ?, 900000)', undef,
        digest($k), $dirty);
    $dbh->rollback;
    is_deeply([@$lean[2, 12]], [undef, 1],
              'exclusions, lean claim: it takes nothing and says "wide"');
    my $stmt = ['wide', 'EXECUTE plan_wide (decode(?, \'hex\'), ?, 900000)',
                'dirty-excluded'];
    for my $mode (qw(force_generic_plan force_custom_plan)) {
        $dbh->do("SET plan_cache_mode = $mode");
        my $lines = $dbh->selectcol_arrayref("EXPLAIN (COSTS OFF) $stmt->[1]", undef,
                                             plan_arg($stmt), $dirty);
        my @probes;
        for my $i (0 .. $#$lines) {
            next unless $lines->[$i] =~ /Scan (?:using (\w+) )?on exclusions/;
            my $index = $1 // 'seq scan';
            my $cond = ($lines->[$i + 1] // '') =~ /Index Cond: (.*)/ ? $1 : 'none';
            push @probes, "$index: $cond";
        }
        is_deeply([grep { !/^exclusions_pkey: .*queue_id = .*item_id = .*key_id = /
                          && !/^exclusions_pkey: .*key_id = .*item_id = /
                        } @probes], [],
                  "exclusions, wide claim, $mode: every read of exclusions "
                  . 'probes its primary key by queue, item and key')
            or diag join "\n", @probes, @$lines;
        cmp_ok(scalar @probes, '>=', 2, "exclusions, wide claim, $mode: "
                                        . 'both candidates probe it');
        $dbh->begin_work;
        my $json = $dbh->selectrow_array("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) $stmt->[1]",
                                         undef, plan_arg($stmt), $dirty);
        my $took = $dbh->selectcol_arrayref(
            q{SELECT i.id FROM annotation_queue.items i
               WHERE i.queue_id = ? AND i.claimed_by = ?}, undef, $dirty, $kid);
        $dbh->rollback;
        my $plan = JSON::PP->new->decode($json)->[0]{Plan};
        my $buffers = $plan->{'Shared Hit Blocks'} + $plan->{'Shared Read Blocks'};
        cmp_ok($buffers, '<', 100, "exclusions, wide claim, $mode: fewer than 100 "
                                   . "buffers with 5,000 exclusions (read $buffers)");
        is(scalar @$took, 1, "exclusions, wide claim, $mode: it takes an item");
        isnt($took->[0] // '', $head, "exclusions, wide claim, $mode: ... not the "
                                      . 'head it may no longer take');
    }
    my $rows = batch($dirty, 'dirty-excluded');
    is($rows->[0][2], undef, 'exclusions, batch: a key with exclusions gets no '
                             . 'item from the batch (its claim runs alone)');
}

done_testing();
