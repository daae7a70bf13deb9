# Claiming: the 200 answer, the payload, the order of the items, resume,
# draining, keep-alive.
#
# Every block claims from its own queue, with keys made for it, so that the
# blocks do not depend on each other.  AQ::canon / AQ::brief compare each
# claimed item with its row (version, timestamps, payload).
use strict;
use warnings;

use lib 't/lib';
use AQ;
use Test::Nginx::Socket 'no_plan';

our $org = AQ::org('claim');
our (%q, %k);

# A fresh key for each name used in a block.
sub key_of { my ($name) = @_; return $k{$name} //= AQ::key($org, rater => $name) }

# shape: one item whose payload exercises JSON (unicode, escapes, nesting,
# numbers beyond double precision).
$q{shape} = AQ::queue($org, 'shape');
AQ::enqueue($q{shape}, 'shape', <<'_JSON_');
{"text": "Ünïcödé ✓ 日本語 😀 \ud83d\ude00", "escapes": "quote \" backslash \\ slash \/ newline \n tab \t ctl \u0001", "nested": {"list": [1, -2, 3.25, 1e3, 1.50, true, false, null, "", []], "empty": {}, "deep": {"a": {"b": {"c": [[{}]]}}}}, "big": 12345678901234567890.123456789, "int64": 9223372036854775807, "tiny": -0.000001}
_JSON_

# types: payloads that are not objects (priorities fix the order).
$q{types} = AQ::queue($org, 'types');
AQ::enqueue($q{types}, 'array',  '[1, "two", {"three": 3}]', 5);
AQ::enqueue($q{types}, 'string', '"just a string"', 4);
AQ::enqueue($q{types}, 'number', '-42.5e-1', 3);
AQ::enqueue($q{types}, 'null',   'null', 2);
AQ::enqueue($q{types}, 'true',   'true', 1);

# prio: highest priority first, FIFO among equals, negative last.
$q{prio} = AQ::queue($org, 'prio');
AQ::enqueue($q{prio}, 'a', '{"n": "a"}', 0);
AQ::enqueue($q{prio}, 'b', '{"n": "b"}', 5);
AQ::enqueue($q{prio}, 'c', '{"n": "c"}', -1);
AQ::enqueue($q{prio}, 'd', '{"n": "d"}', 5);
AQ::enqueue($q{prio}, 'e', '{"n": "e"}', 10);
AQ::enqueue($q{prio}, 'f', '{"n": "f"}', 0);

$q{fifo} = AQ::queue($org, 'fifo');
AQ::enqueue_many($q{fifo}, 5, prefix => 'fifo');

$q{resume} = AQ::queue($org, 'resume');
AQ::enqueue_many($q{resume}, 2, prefix => 'resume');

$q{held} = AQ::queue($org, 'held');
AQ::enqueue_many($q{held}, 1, prefix => 'held');

$q{one} = AQ::queue($org, 'one');
AQ::enqueue_many($q{one}, 2, prefix => 'one');
$q{two} = AQ::queue($org, 'two');
AQ::enqueue_many($q{two}, 2, prefix => 'two');

$q{pair} = AQ::queue($org, 'pair');
AQ::enqueue_many($q{pair}, 2, prefix => 'pair');

$q{drain} = AQ::queue($org, 'drain');
AQ::enqueue_many($q{drain}, 3, prefix => 'drain');

$q{empty} = AQ::queue($org, 'empty');

$q{ka} = AQ::queue($org, 'keepalive');
AQ::enqueue_many($q{ka}, 3, prefix => 'ka');

$q{ka2} = AQ::queue($org, 'keepalive-errors');
AQ::enqueue_many($q{ka2}, 2, prefix => 'ka2');

# big: a payload of over 5 MB, written in PostgreSQL's own normalised JSON
# text (keys by length, ", " and ": ", numbers as written, only what must be
# escaped escaped), so that the text enqueued is the text stored and the
# answer must hold it byte for byte.
our $big_unit = "\xc3\x9cn\xc3\xafc\xc3\xb6d\xc3\xa9 \xe2\x9c\x93 "
              . "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80 "
              . '\"quoted\" back\\\\slash sl/ash \n newline \t tab \u0001 ';
our $big_payload = '{"list": ['
    . join(', ', map { qq({"n": $_, "x": 12345678901234567890.$_, "y": 1.50}) } 1 .. 40_000)
    . '], "text": "' . ($big_unit x 40_000) . '"}';
$q{big} = AQ::queue($org, 'big');
AQ::enqueue($q{big}, 'big', $big_payload);

# The answer to a claim of the big item, checked without decoding 5 MB in
# Perl: the item's head, then the payload byte for byte as enqueued, then
# the version and timestamps; and PostgreSQL parses the whole answer and
# finds in item.payload the stored jsonb.
sub big_check {
    my ($raw) = @_;
    my $row = AQ::item('big');
    my @out;
    push @out, length($big_payload) > 5_000_000 ? 'payload enqueued: over 5 MB'
                                                : 'payload enqueued: only ' . length($big_payload);
    push @out, $row->{payload_text} eq $big_payload
               ? 'stored text: as enqueued' : 'stored text: not as enqueued (not normalised?)';
    my $head = qq({"success":true,"item":{"id":"$row->{id}","queue_id":"$row->{queue_id}","payload":);
    if (substr($raw, 0, length $head) ne $head) {
        push @out, 'answer: does not begin with the item, its queue and "payload": '
                   . substr($raw, 0, 200);
    } else {
        my $got = substr($raw, length $head, length $big_payload);
        if ($got eq $big_payload) {
            push @out, 'answer: the payload byte for byte as enqueued';
        } else {
            my $i = 0;
            $i++ while $i < length($got) && substr($got, $i, 1) eq substr($big_payload, $i, 1);
            push @out, "answer: the payload differs from what was enqueued at byte $i of "
                       . length($big_payload) . ' (' . length($raw) . ' bytes answered)';
        }
        my $rest = length($raw) > length($head) + length($big_payload)
                   ? substr($raw, length($head) + length($big_payload)) : '';
        push @out, $rest =~ /\A,"version":1,"claimed_at":"[^"]+","lease_expires_at":"[^"]+","overlap":\{"required":1,"completed":0\}\}\}\z/
                   ? 'answer: then version 1 and the timestamps, and nothing else'
                   : 'answer: then ' . substr($rest, 0, 200);
    }
    my $same = eval {
        (AQ::dbh()->selectrow_array(
            q{SELECT (?::jsonb) -> 'item' -> 'payload' = payload
                FROM annotation_queue.items WHERE id = ?}, undef, $raw, $row->{id}))[0];
    };
    push @out, !defined $same ? 'answer: not JSON (PostgreSQL cannot parse it)'
             : $same          ? 'answer: JSON whose item.payload is the stored jsonb'
             :                  'answer: item.payload is not the stored jsonb';
    push @out, "item: $row->{status} v$row->{version}";
    return join("\n", @out) . "\n";
}

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: a claim answers 200 with the item: id, queue, payload, version 1, timestamps of its row; Cache-Control: no-store
--- request eval
AQ::claim_req($::q{shape})
--- more_headers eval
AQ::headers(::key_of('shape'))
--- error_code: 200
--- response_headers_like
Content-Type: application/json(;\s*charset=utf-8)?
Cache-Control: no-store
--- response_body_filters eval
\&AQ::canon
--- response_body
{"item":{"claimed_at":"<ts>","id":"<item:shape>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":{"big":12345678901234567890.123456789,"escapes":"quote \" backslash \\ slash / newline \n tab \t ctl \u0001","int64":9223372036854775807,"nested":{"deep":{"a":{"b":{"c":[[{}]]}}},"empty":{},"list":[1,-2,3.25,1000,1.5,true,false,null,"",[]]},"text":"Ünïcödé ✓ 日本語 😀 😀","tiny":-0.000001},"queue_id":"<queue:shape>","version":1},"success":true}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: the lease of a queue created with the default lease is 15 minutes
--- request eval
AQ::claim_req($::q{shape})
--- more_headers eval
AQ::headers(::key_of('shape'))
--- error_code: 200
--- response_body_filters eval
\&AQ::lease
--- response_body
lease 900s
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: payloads that are not objects come back as enqueued (array, string, number, null, true)
--- request eval
[map { AQ::claim_req($::q{types}) } 1 .. 5]
--- more_headers eval
[map { AQ::headers(::key_of("types-$_")) } 1 .. 5]
--- error_code eval
[(200) x 5]
--- response_headers_like eval
[("Content-Type: application/json(;\\s*charset=utf-8)?") x 5]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[
 qq({"item":{"claimed_at":"<ts>","id":"<item:array>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":[1,"two",{"three":3}],"queue_id":"<queue:types>","version":1},"success":true}\n),
 qq({"item":{"claimed_at":"<ts>","id":"<item:string>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":"just a string","queue_id":"<queue:types>","version":1},"success":true}\n),
 qq({"item":{"claimed_at":"<ts>","id":"<item:number>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":-4.25,"queue_id":"<queue:types>","version":1},"success":true}\n),
 qq({"item":{"claimed_at":"<ts>","id":"<item:null>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":null,"queue_id":"<queue:types>","version":1},"success":true}\n),
 qq({"item":{"claimed_at":"<ts>","id":"<item:true>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":true,"queue_id":"<queue:types>","version":1},"success":true}\n),
]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: highest priority first, then enqueue order, negative priorities last, then 409
--- request eval
[map { AQ::claim_req($::q{prio}) } 1 .. 7]
--- more_headers eval
[map { AQ::headers(::key_of("prio-$_")) } 1 .. 7]
--- error_code eval
[(200) x 6, 409]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["item e v1\n", "item b v1\n", "item d v1\n", "item a v1\n", "item f v1\n",
 "item c v1\n", "error no_items_available\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: items of equal priority are claimed in enqueue order (FIFO)
--- request eval
[map { AQ::claim_req($::q{fifo}) } 1 .. 5]
--- more_headers eval
[map { AQ::headers(::key_of("fifo-$_")) } 1 .. 5]
--- error_code eval
[(200) x 5]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
[map { "item fifo-$_ v1\n" } 1 .. 5]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: a key that holds a live claim gets the same item back, same version; the claim is not counted again; each 200 with Cache-Control: no-store
--- request eval
[map { AQ::claim_req($::q{resume}) } 1 .. 3]
--- more_headers eval
[AQ::headers(::key_of('resume-a')), AQ::headers(::key_of('resume-a')),
 AQ::headers(::key_of('resume-b'))]
--- error_code eval
[200, 200, 200]
--- response_headers_like eval
[("Content-Type: application/json\nCache-Control: no-store") x 3]
--- response_body_filters eval
[[\&AQ::brief], [\&AQ::canon],
 [\&AQ::brief, AQ::append(sub { 'attempts ' . AQ::item('resume-1')->{attempts} })]]
--- response_body eval
["item resume-1 v1\n",
 qq({"item":{"claimed_at":"<ts>","id":"<item:resume-1>","lease_expires_at":"<ts>","overlap":{"completed":0,"required":1},"payload":{"n":1},"queue_id":"<queue:resume>","version":1},"success":true}\n),
 "item resume-2 v1\nattempts 1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: the held item comes back even when an item of higher priority arrives meanwhile
--- request eval
[(AQ::claim_req($::q{held})) x 3]
--- more_headers eval
[AQ::headers(::key_of('held-a')), AQ::headers(::key_of('held-a')),
 AQ::headers(::key_of('held-b'))]
--- error_code eval
[200, 200, 200]
--- response_body_filters eval
[[\&AQ::brief, AQ::then(sub { AQ::enqueue($::q{held}, 'urgent', '{"urgent": true}', 100) })],
 [\&AQ::brief], [\&AQ::brief]]
--- response_body eval
["item held-1 v1\n", "item held-1 v1\n", "item urgent v1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: holding an item in one queue does not stop a key from claiming in another
--- request eval
[AQ::claim_req($::q{one}), AQ::claim_req($::q{two}), AQ::claim_req($::q{one}),
 AQ::claim_req($::q{two})]
--- more_headers eval
[(AQ::headers(::key_of('one-two'))) x 4]
--- error_code eval
[200, 200, 200, 200]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["item one-1 v1\n", "item two-1 v1\n", "item one-1 v1\n", "item two-1 v1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: two keys get two different items, each recorded as claimed by its key
--- request eval
[AQ::claim_req($::q{pair}), AQ::claim_req($::q{pair})]
--- more_headers eval
[AQ::headers(::key_of('pair-x')), AQ::headers(::key_of('pair-y'))]
--- error_code eval
[200, 200]
--- response_body_filters eval
[[\&AQ::brief],
 [\&AQ::brief, AQ::append(sub {
     my ($x, $y) = map { AQ::item($_)->{claimed_by} } 'pair-1', 'pair-2';
     ($x eq AQ::key_id(::key_of('pair-x')) ? 'pair-1 held by x' : 'pair-1 held by ?')
     . ', '
     . ($y eq AQ::key_id(::key_of('pair-y')) ? 'pair-2 held by y' : 'pair-2 held by ?')
 })]]
--- response_body eval
["item pair-1 v1\n", "item pair-2 v1\npair-1 held by x, pair-2 held by y\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: a queue is drained, then answers 409 no_items_available
--- request eval
[map { AQ::claim_req($::q{drain}) } 1 .. 4]
--- more_headers eval
[map { AQ::headers(::key_of("drain-$_")) } 1 .. 4]
--- error_code eval
[200, 200, 200, 409]
--- response_headers_like eval
[("Content-Type: application/json(;\\s*charset=utf-8)?") x 4]
--- response_body_filters eval
[[\&AQ::brief], [\&AQ::brief], [\&AQ::brief],
 [\&AQ::canon, AQ::append(sub { AQ::canonical_json(AQ::counts($::q{drain})) })]]
--- response_body eval
["item drain-1 v1\n", "item drain-2 v1\n", "item drain-3 v1\n",
 qq({"error":{"code":"no_items_available","message":"..."},"success":false}\n)
 . qq({"available":0,"claimed":3,"completed":0}\n)]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: an empty queue answers 409 no_items_available
--- request eval
AQ::claim_req($::q{empty})
--- more_headers eval
AQ::headers(::key_of('empty'))
--- error_code: 409
--- response_headers_like
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"no_items_available","message":"..."},"success":false}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: keep-alive: claims and a 409 answered in order on one connection
--- pipelined_requests eval
[map { AQ::claim_req($::q{ka}) } 1 .. 4]
--- more_headers eval
[map { AQ::headers(::key_of("ka-$_")) } 1 .. 4]
--- error_code eval
[200, 200, 200, 409]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["item ka-1 v1\n", "item ka-2 v1\n", "item ka-3 v1\n",
 "error no_items_available\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: keep-alive: a 401 whose body was never parsed leaves the next request on the connection intact
--- pipelined_requests eval
[AQ::claim_req($::q{ka2}), AQ::claim_req($::q{ka2}), AQ::claim_req($::q{ka2}),
 AQ::post_req('{"queue_id": [1, 2, 3'), AQ::claim_req($::q{ka2})]
--- more_headers eval
["Content-Type: application/json",
 AQ::headers(::key_of('ka2-a')),
 "Authorization: Bearer aqk_not_a_key\nContent-Type: application/json",
 AQ::headers(::key_of('ka2-a')),
 AQ::headers(::key_of('ka2-a'))]
--- error_code eval
[401, 200, 401, 400, 200]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["error missing_api_key\n", "item ka2-1 v1\n", "error invalid_api_key\n",
 "error invalid_json\n", "item ka2-1 v1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: a payload of over 5 MB is claimed and answered byte for byte as enqueued
--- request eval
AQ::claim_req($::q{big})
--- more_headers eval
AQ::headers(::key_of('big'))
--- timeout eval
10 * AQ::slow()
--- error_code: 200
--- response_headers_like
Content-Type: application/json
Cache-Control: no-store
--- response_body_filters eval
\&::big_check
--- response_body
payload enqueued: over 5 MB
stored text: as enqueued
answer: the payload byte for byte as enqueued
answer: then version 1 and the timestamps, and nothing else
answer: JSON whose item.payload is the stored jsonb
item: claimed v1
--- no_error_log
[error]
[alert]
[crit]
