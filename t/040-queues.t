# Queues and claims over time: unknown queues, other organisations' queues,
# leases (their length, their expiry), revocation, completed items.
#
# Code between two requests of a block (expire a lease, revoke a key) runs
# in the response filter of the first one (AQ::then), on the same nginx
# process and database connections.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use Test::Nginx::Socket 'no_plan';

our $org   = AQ::org('queues');
our $other = AQ::org('someone-else');
our %k;
sub key_of { my ($name) = @_; return $k{$name} //= AQ::key($org, rater => $name) }

our %q;
$q{mine} = AQ::queue($org, 'mine');
AQ::enqueue_many($q{mine}, 3, prefix => 'mine');
$q{theirs} = AQ::queue($other, 'theirs');
AQ::enqueue_many($q{theirs}, 3, prefix => 'theirs');

$q{lease} = AQ::queue($org, 'lease');
AQ::enqueue($q{lease}, 'leased', '{"x": 1}');

$q{short} = AQ::queue($org, 'short', lease => '30 seconds');
AQ::enqueue_many($q{short}, 3, prefix => 'short');
$q{nolease} = AQ::queue($org, 'nolease', lease => undef);
AQ::enqueue_many($q{nolease}, 3, prefix => 'nolease');

$q{revoke} = AQ::queue($org, 'revoke');
AQ::enqueue_many($q{revoke}, 3, prefix => 'revoke');

$q{done} = AQ::queue($org, 'done');
AQ::enqueue($q{done}, 'done', '{"done": true}');
AQ::dbh()->do(q{UPDATE annotation_queue.items SET status = 'completed' WHERE queue_id = ?},
              undef, $q{done});

$q{held} = AQ::queue($org, 'held');
AQ::enqueue($q{held}, 'held', '{"held": true}');

# Expired leases among priorities: expired items of another rater (a
# claimed_by that is no key here) whose leases ran out at given times.
$q{expiry} = AQ::queue($org, 'expiry');
AQ::enqueue($q{expiry}, 'e-avail-1', '{"e": "avail-1"}', 1);
AQ::enqueue($q{expiry}, 'e-avail-0', '{"e": "avail-0"}', 0);
AQ::enqueue($q{expiry}, 'e-exp-5', '{"e": "exp-5"}', 5);
AQ::enqueue($q{expiry}, 'e-exp-1-new', '{"e": "exp-1-new"}', 1);
AQ::enqueue($q{expiry}, 'e-exp-1-old', '{"e": "exp-1-old"}', 1);
AQ::enqueue_many($q{expiry}, 300, priority => -1, prefix => 'e-low');
sub expired_since {
    my ($seconds, @labels) = @_;
    AQ::dbh()->do(q{UPDATE annotation_queue.items
                       SET status = 'claimed', claimed_by = gen_random_uuid(),
                           claimed_at = now() - interval '1 hour',
                           lease_expires_at = now() - ? * interval '1 second',
                           version = 1, attempts = 1
                     WHERE id = ?}, undef, $seconds, AQ::item_id($_))
        for @labels;
}
expired_since(1, 'e-exp-5');
expired_since(60, 'e-exp-1-new');
expired_since(120, 'e-exp-1-old');
expired_since(1000 - $_, "e-low-$_") for 1 .. 300;

our $unknown_queue = AQ::random_uuid();
our @bodies;    # raw bodies kept by ::keep
sub keep { push @bodies, $_[0]; return $_[0] }

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: an unknown queue: 404 queue_not_found
--- request eval
AQ::claim_req($::unknown_queue)
--- more_headers eval
AQ::headers(::key_of('a'))
--- error_code: 404
--- response_headers_like
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"queue_not_found","message":"..."},"success":false}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: another organisation's queue: the very same 404 as an unknown queue; its items stay available
--- request eval
[AQ::claim_req($::unknown_queue), AQ::claim_req($::q{theirs})]
--- more_headers eval
[AQ::headers(::key_of('a')), AQ::headers(::key_of('a'))]
--- error_code eval
[404, 404]
--- response_body_filters eval
[[\&::keep, \&AQ::canon],
 [\&::keep, \&AQ::canon, AQ::append(sub {
     ($::bodies[0] eq $::bodies[1] ? 'byte for byte the body for an unknown queue'
                                   : "differs from the body for an unknown queue: $::bodies[0]")
     . "\n" . AQ::canonical_json(AQ::counts($::q{theirs}))
 })]]
--- response_body eval
[qq({"error":{"code":"queue_not_found","message":"..."},"success":false}\n),
 qq({"error":{"code":"queue_not_found","message":"..."},"success":false}\n)
 . qq(byte for byte the body for an unknown queue\n)
 . qq({"available":3,"claimed":0,"completed":0}\n)]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: the key's own queue answers 200 (the 404 above is about the queue, not the key)
--- request eval
AQ::claim_req($::q{mine})
--- more_headers eval
AQ::headers(::key_of('a'))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item mine-1 v1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: an expired lease makes the item claimable again: attempts and version go up
a claims (v1); b finds nothing; a's lease runs out; b claims (v2); a, whose
claim is gone, finds nothing; b's lease runs out; b claims it anew (v3).
--- request eval
[(AQ::claim_req($::q{lease})) x 5]
--- more_headers eval
[map { AQ::headers(::key_of("lease-$_")) } qw(a b b a b)]
--- error_code eval
[200, 409, 200, 409, 200]
--- response_body_filters eval
my $attempts = AQ::append(sub { 'attempts ' . AQ::item('leased')->{attempts} });
[[\&AQ::brief, $attempts],
 [\&AQ::brief, AQ::then(sub { AQ::expire_lease('leased') })],
 [\&AQ::brief, $attempts],
 [\&AQ::brief, AQ::then(sub { AQ::expire_lease('leased') })],
 [\&AQ::canon, $attempts]]
--- response_body eval
["item leased v1\nattempts 1\n",
 "error no_items_available\n",
 "item leased v2\nattempts 2\n",
 "error no_items_available\n",
 qq({"item":{"claimed_at":"<ts>","id":"<item:leased>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":{"x":1},"queue_id":"<queue:lease>","version":3},"success":true}\nattempts 3\n)]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: after its lease expired, the item is held by its new holder only
The item of TEST 4 is now b's (v3); a gets nothing, b gets it back unchanged.
--- request eval
[(AQ::claim_req($::q{lease})) x 2]
--- more_headers eval
[AQ::headers(::key_of('lease-a')), AQ::headers(::key_of('lease-b'))]
--- error_code eval
[409, 200]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["error no_items_available\n", "item leased v3\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: a queue's own lease sets lease_expires_at (30 seconds)
--- request eval
AQ::claim_req($::q{short})
--- more_headers eval
AQ::headers(::key_of('short'))
--- error_code: 200
--- response_body_filters eval
\&AQ::lease
--- response_body
lease 30s
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: a queue without a lease gets the 15 minutes default of annotation_queue_lease
--- request eval
AQ::claim_req($::q{nolease})
--- more_headers eval
AQ::headers(::key_of('nolease-default'))
--- error_code: 200
--- response_body_filters eval
\&AQ::lease
--- response_body
lease 900s
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: annotation_queue_lease applies to queues without a lease, and only to them
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_lease 10m;
--- request eval
[AQ::claim_req($::q{nolease}), AQ::claim_req($::q{short})]
--- more_headers eval
[AQ::headers(::key_of('nolease-10m')), AQ::headers(::key_of('short-10m'))]
--- error_code eval
[200, 200]
--- response_body_filters eval
\&AQ::lease
--- response_body eval
["lease 600s\n", "lease 30s\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: revocation takes effect on the next request; the organisation's other keys keep working
--- request eval
[(AQ::claim_req($::q{revoke})) x 3]
--- more_headers eval
[AQ::headers(::key_of('revoked')), AQ::headers(::key_of('revoked')),
 AQ::headers(::key_of('not-revoked'))]
--- error_code eval
[200, 401, 200]
--- response_headers_like eval
["Content-Type: application/json(;\\s*charset=utf-8)?", "WWW-Authenticate: Bearer.*",
 "Content-Type: application/json(;\\s*charset=utf-8)?"]
--- response_body_filters eval
[[\&AQ::brief, AQ::then(sub { AQ::revoke(::key_of('revoked')) })],
 [\&AQ::brief], [\&AQ::brief]]
--- response_body eval
["item revoke-1 v1\n", "error invalid_api_key\n", "item revoke-2 v1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: completed items are never handed out: 409
--- request eval
AQ::claim_req($::q{done})
--- more_headers eval
AQ::headers(::key_of('done'))
--- error_code: 409
--- response_body_filters eval
\&AQ::brief
--- response_body
error no_items_available
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: an item under a live lease is not handed to another key, however often it asks
--- request eval
[(AQ::claim_req($::q{held})) x 4]
--- more_headers eval
[AQ::headers(::key_of('holder')), (AQ::headers(::key_of('asker'))) x 3]
--- error_code eval
[200, 409, 409, 409]
--- response_body_filters eval
[[\&AQ::brief], [\&AQ::brief], [\&AQ::brief],
 [\&AQ::brief, AQ::append(sub { my $i = AQ::item('held'); "version $i->{version}, attempts $i->{attempts}" })]]
--- response_body eval
["item held v1\n", "error no_items_available\n", "error no_items_available\n",
 "error no_items_available\nversion 1, attempts 1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: expired leases by priority: higher than the head first, then the same priority (oldest lease first) before the head, lower ones after every available item
In the queue: available items of priority 1 and 0; expired items of
priority 5, of priority 1 (two), and 300 of priority -1 whose leases ran out
before all the others.  Each claim by a new key.
--- request eval
[(AQ::claim_req($::q{expiry})) x 7]
--- more_headers eval
[map { AQ::headers(::key_of("expiry-$_")) } 1 .. 7]
--- error_code eval
[(200) x 7]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["item e-exp-5 v2\n", "item e-exp-1-old v2\n", "item e-exp-1-new v2\n",
 "item e-avail-1 v1\n", "item e-avail-0 v1\n", "item e-low-1 v2\n",
 "item e-low-2 v2\n"]
--- no_error_log
[error]
[alert]
[crit]
