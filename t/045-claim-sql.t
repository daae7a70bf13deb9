# The claim statements of src/ngx_aq_sql.h run directly against PostgreSQL,
# exactly as the module prepares them (bench/claim-sql.pl reads them).
#
# The batch (NGX_AQ_CLAIM_BATCH_SQL, what a connection sends for up to 16
# waiting claims of one queue): its order is the single claim's (expired
# items of a higher priority than the available head, then of the same
# priority, then the available items), each key checked, a held item given
# back, a key given twice one item, and nothing taken that the single claim
# would not take first.  Through nginx, batches only form when every
# connection is busy (t/110-slow.t and t/120-abort.t make them).
#
# The plans of both statements: every read of items an index range of the
# index made for it, whatever the statistics say.
use strict;
use warnings;

use lib 't/lib';
use AQ;
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

# --- nothing available: the batch leaves expired items to the single claim --
my $dry = AQ::queue($org, 'batch-dry');
AQ::enqueue($dry, 'd-exp', '{"d": 1}', 0);
expired_since(5, 'd-exp');
is_deeply(batch($dry, qw(k1 k2)), [[1, 1, undef, undef], [1, 1, undef, undef]],
          'with nothing available, no item: each claim runs the single claim next');
is(AQ::item('d-exp')->{version}, 1, '... which takes the expired item (untouched here)');

# --- plans: each lookup through the index made for it --------------------
#
# Both statements, planned generic (what a connection's prepared statement
# ends up with) and custom, right after ANALYZE of a table of 50,000 items
# where nothing is claimed (the statistics under which the planner once weighed
# items_expiry_idx and items_holder_idx the same and found a key's own item
# by reading every claimed item of the queue): items_expiry_idx is only
# used with a lease end in its index condition, items_holder_idx only with
# claimed_by in it, and items is never read in full.
$dbh->do('UPDATE annotation_queue.items SET status = ?, claimed_by = NULL, '
         . 'claimed_at = NULL, lease_expires_at = NULL WHERE status = ?',
         undef, 'available', 'claimed');
my $plan_q = AQ::queue($org, 'batch-plans');
$dbh->do(q{INSERT INTO annotation_queue.items (queue_id, payload)
           SELECT ?, jsonb_build_object('n', g) FROM generate_series(1, 50000) AS g},
         undef, $plan_q);
$dbh->do('VACUUM ANALYZE annotation_queue.items');
my $single = `$^X $AQ::TOP/bench/claim-sql.pl $AQ::TOP/src/ngx_aq_sql.h NGX_AQ_CLAIM_SQL`;
$dbh->do("PREPARE plan_single (bytea, uuid, int8) AS $single");
$dbh->do("PREPARE plan_batch (text[], uuid, int8) AS $sql");
my $digests = '{' . join(',', map { digest($key{$_}) } qw(k1 k2)) . '}';
for my $mode (qw(force_generic_plan force_custom_plan)) {
    $dbh->do("SET plan_cache_mode = $mode");
    for my $stmt (['single', 'EXECUTE plan_single (decode(?, \'hex\'), ?, 900000)',
                   digest($key{k3})],
                  ['batch', 'EXECUTE plan_batch (?, ?, 900000)', $digests]) {
        my ($name, $exec, $arg) = @$stmt;
        my $lines = $dbh->selectcol_arrayref("EXPLAIN (COSTS OFF) $exec", undef,
                                             $arg, $plan_q);
        my (@bad, $scan);
        for my $l (@$lines) {
            if ($l =~ /Seq Scan on items/) {
                push @bad, $l;
            }
            if ($l =~ /Index (?:Only )?Scan using (items_\w+)/) {
                $scan = $1;
                push @bad, "$l (no index condition)"
                    if $scan =~ /^items_(?:expiry|holder)_idx$/;
                next;
            }
            next unless $scan && $l =~ /Index Cond: (.*)/;
            my $cond = $1;
            if ($scan eq 'items_expiry_idx' || $scan eq 'items_holder_idx') {
                pop @bad;
                push @bad, "$scan: $cond"
                    if ($scan eq 'items_expiry_idx' && $cond !~ /lease_expires_at/)
                    || ($scan eq 'items_holder_idx' && $cond !~ /claimed_by/);
            }
            $scan = undef;
        }
        is_deeply(\@bad, [], "$name claim, $mode: every items scan is an index range "
                             . 'of the index made for it') or diag join "\n", @$lines;
    }
}

done_testing();
