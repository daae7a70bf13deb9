package AQ::ItemQueue;

# The endpoints with the item's "queue_id" in the body (the statements that
# name the queue in every scan of items, as Citus needs to route them):
# every status of the contract, checked against the database.  Shared by
# t/075-item-queue.t (plain PostgreSQL) and t/citus/020-contract.t (the
# same checks through a Citus coordinator):
#
#   use AQ; use AQ::ItemQueue;
#   AQ::ItemQueue::contract();      # Test::More tests
#
# Each check claims its own item in its own queue, so that the answers are
# known in advance.

use strict;
use warnings;

use AQ;
use JSON::PP ();
use Test::More;

our %URI = (
    claim    => $AQ::URI,
    extend   => '/api/v1/annotations/extend',
    release  => '/api/v1/annotations/release',
    complete => '/api/v1/annotations/complete',
    skip     => '/api/v1/annotations/skip',
);
our @ITEM_ACTIONS = qw(extend release complete skip);

my $JSON = JSON::PP->new->utf8->canonical;

# nginx of one worker with the five endpoints; returns ($ngx, $client).
sub start {
    my (%o) = @_;
    my $port = AQ::free_port();
    my $locations = join '', map {
        "        location = $URI{$_} { annotation_queue_$_; }\n"
    } ('claim', @ITEM_ACTIONS);
    my $ngx = AQ::start_nginx(workers => 1, http => <<"_EOC_", %o);
    annotation_queue_query_timeout 30s;

    server {
        listen 127.0.0.1:$port;
$locations    }
_EOC_
    return ($ngx, AQ::Client->new(port => $port));
}

sub decode {
    my $d = eval { $JSON->decode($_[0] // '') };
    return ref $d eq 'HASH' ? $d : {};
}

# "200 <status> v<version>" or "<status> <error code>" of an answer
sub brief {
    my ($status, $body, $err) = @_;
    return "0 $err" if !$status;
    my $d = decode($body);
    if ($status == 200) {
        my $it = $d->{item} || {};
        return "200 " . ($it->{status} // 'claimed') . " v" . ($it->{version} // '?');
    }
    return "$status " . ($d->{error}{code} // '?');
}

sub act {
    my ($c, $action, $key, %body) = @_;
    my ($s, $h, $b, $e) = $c->request(uri => $URI{$action}, key => $key,
                                      body => $JSON->encode(\%body));
    return (brief($s, $b, $e), decode($b));
}

sub claim {
    my ($c, $key, $queue) = @_;
    return act($c, 'claim', $key, queue_id => $queue);
}

sub row {
    my ($id) = @_;
    return AQ::dbh()->selectrow_hashref(
        q{SELECT status, version, claimed_by, exclude, result::text AS result,
                 lease_expires_at::text AS lease_expires_at
            FROM annotation_queue.items WHERE id = ? ORDER BY slot LIMIT 1},
        undef, $id);
}

sub exclusion {
    my ($id, $key) = @_;
    return scalar AQ::dbh()->selectrow_array(
        q{SELECT reason FROM annotation_queue.exclusions
           WHERE item_id = ?
             AND key_id = (SELECT id FROM annotation_queue.api_keys
                            WHERE key_hash = annotation_queue.key_hash(?))},
        undef, $id, $key);
}

# The whole contract; %o: label (for the test names).
sub contract {
    my (%o) = @_;
    my $on = $o{label} ? " ($o{label})" : '';
    my ($ngx, $c) = start();

    my $org   = AQ::org('iq-' . int(rand(1e9)));
    my $other = AQ::org('iq-other-' . int(rand(1e9)));
    my $key   = AQ::key($org);
    my $key2  = AQ::key($org);
    my $eve   = AQ::key($other);
    my $revoked = AQ::key($org);
    AQ::revoke($revoked);
    my $unknown = AQ::well_formed_key();

    # claim: 200, 400, 401, 404, 409
    my $q = AQ::queue($org, 'iq-claim-' . int(rand(1e9)));
    AQ::enqueue($q, undef, '{"n": 1}');
    my $empty = AQ::queue($org, 'iq-empty-' . int(rand(1e9)));
    my $theirs = AQ::queue($other, 'iq-theirs-' . int(rand(1e9)));
    my ($got, $d) = claim($c, $key, $q);
    is($got, '200 claimed v1', "claim: 200 with the queue's item$on");
    is($d->{item}{queue_id}, $q, "claim: the item's queue_id is the queue$on");
    is((claim($c, $key, $q))[0], '200 claimed v1',
       "claim again by the holder: 200, the same item and version$on");
    is((claim($c, $key2, $q))[0], '409 no_items_available',
       "claim of a drained queue: 409 no_items_available$on");
    is((claim($c, $key, $empty))[0], '409 no_items_available',
       "claim of an empty queue: 409 no_items_available$on");
    is((claim($c, $unknown, $q))[0], '401 invalid_api_key',
       "claim with an unknown key: 401 invalid_api_key$on");
    is((claim($c, $revoked, $q))[0], '401 invalid_api_key',
       "claim with a revoked key: 401 invalid_api_key$on");
    is((claim($c, $key, $theirs))[0], '404 queue_not_found',
       "claim of another organisation's queue: 404 queue_not_found$on");
    is((claim($c, $key, AQ::random_uuid()))[0], '404 queue_not_found',
       "claim of an unknown queue: 404 queue_not_found$on");
    is((act($c, 'claim', $key))[0], '400 missing_queue_id',
       "claim without queue_id: 400 missing_queue_id$on");

    # the item endpoints, with queue_id
    my %want = (extend => 'claimed v1', release => 'available v2',
                complete => 'completed v2', skip => 'available v2');
    for my $action (@ITEM_ACTIONS) {
        my $qa = AQ::queue($org, "iq-$action-" . int(rand(1e9)),
                           lease => '10 minutes');
        my $qb = AQ::queue($org, "iq-$action-b-" . int(rand(1e9)));
        my $id = AQ::enqueue($qa, undef, '{"n": 1}');
        AQ::enqueue($qb, undef, '{"n": 2}');
        my ($g, $cd) = claim($c, $key, $qa);
        is($g, '200 claimed v1', "$action: the item is claimed first$on");
        my $version = $cd->{item}{version} // 1;
        AQ::dbh()->do(q{UPDATE annotation_queue.items
                           SET lease_expires_at = now() + interval '1 minute'
                         WHERE id = ?}, undef, $id);
        my $before = row($id);

        my %body = (item_id => $id, version => $version, queue_id => $qa);
        $body{result} = { label => 'ok', score => 0.5 } if $action eq 'complete';

        is((act($c, $action, $key, %body, queue_id => $qb))[0],
           '404 item_not_found',
           "$action naming another queue of the organisation: 404 item_not_found$on");
        is((act($c, $action, $key, %body, queue_id => $theirs))[0],
           '404 item_not_found',
           "$action naming another organisation's queue: 404 item_not_found$on");
        is((act($c, $action, $key, %body, item_id => AQ::random_uuid()))[0],
           '404 item_not_found', "$action of an unknown item: 404 item_not_found$on");
        is((act($c, $action, $unknown, %body))[0], '401 invalid_api_key',
           "$action with an unknown key: 401 invalid_api_key$on");
        is((act($c, $action, $key, %body, queue_id => 'not-a-uuid'))[0],
           '400 invalid_queue_id', "$action with a queue_id not a UUID: 400 invalid_queue_id$on");
        is((act($c, $action, $key, %body, queue_id => undef))[0],
           '400 invalid_queue_id', "$action with a queue_id null: 400 invalid_queue_id$on");
        is((act($c, $action, $key, %body, version => $version + 7))[0],
           '409 stale_claim', "$action with a stale version: 409 stale_claim$on");
        is((act($c, $action, $key2, %body))[0], '409 stale_claim',
           "$action by a key that does not hold it: 409 stale_claim$on");
        is_deeply(row($id), $before, "$action: the refused requests changed nothing$on");

        my ($ok, $ad) = act($c, $action, $key, %body);
        is($ok, "200 $want{$action}", "$action naming its queue: 200 $want{$action}$on");
        is($ad->{item}{queue_id}, $qa, "$action: the answer's queue_id$on");
        my $after = row($id);
        if ($action eq 'extend') {
            my ($left) = AQ::dbh()->selectrow_array(
                q{SELECT extract(epoch FROM ?::timestamptz - now())}, undef,
                $after->{lease_expires_at});
            cmp_ok($left, '>', 300,
                   "extend: the lease starts again (the queue's 10 minutes)$on");
        } elsif ($action eq 'complete') {
            is($JSON->encode(decode($after->{result})),
               '{"label":"ok","score":0.5}', "complete: the result is stored$on");
        } elsif ($action eq 'skip') {
            is(exclusion($id, $key), 'skipped',
               "skip: the item is noted as skipped for the key$on");
            is((claim($c, $key, $qa))[0], '409 no_items_available',
               "skip: the key never gets the item again$on");
            is((claim($c, $key2, $qa))[0], '200 claimed v3',
               "skip: another key gets it$on");
        }
        is($after->{exclude}, $action eq 'skip' ? 'skipped' : undef,
           "$action: items.exclude holds the row's last note ("
           . ($action eq 'skip' ? 'skipped' : 'none') . ")$on");
    }

    # overlap 2: a key takes one slot; the claim notes it (the trigger)
    my $q2 = AQ::dbh()->selectrow_array(
        q{SELECT annotation_queue.create_queue(?, ?, overlap => 2)}, undef,
        $org, 'iq-overlap-' . int(rand(1e9)));
    my $id2 = AQ::enqueue($q2, undef, '{"n": 1}');
    my ($g2, $d2) = claim($c, $key, $q2);
    is($g2, '200 claimed v1', "overlap 2: a key claims a slot$on");
    is(exclusion($id2, $key), 'claimed', "overlap 2: the claim is noted$on");
    is((act($c, 'release', $key, item_id => $id2, version => 1,
            queue_id => $q2))[0], '200 available v2',
       "overlap 2: the key releases its slot$on");
    is((claim($c, $key, $q2))[0], '409 no_items_available',
       "overlap 2: the key gets no other slot of the item$on");
    is((claim($c, $key2, $q2))[0], '200 claimed v3',
       "overlap 2: another key gets the released slot (the first)$on");
    is(AQ::dbh()->selectrow_array(
           q{SELECT count(*) FROM annotation_queue.items i
              WHERE i.exclude IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM annotation_queue.exclusions x
                                 WHERE x.queue_id = i.queue_id
                                   AND x.item_id = i.id)}),
       0, "every note of items.exclude is in annotation_queue.exclusions$on");

    AQ::stop_nginx($ngx);
    my $log = AQ::slurp("$ngx->{prefix}/logs/error.log");
    my @bad = grep { /\[(error|crit|alert|emerg)\]/ } split /\n/, $log;
    is_deeply(\@bad, [], "no error in nginx's log$on");
}

1;
