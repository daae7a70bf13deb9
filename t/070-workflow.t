# The rater's workflow after a claim: extend (heartbeat), release, complete.
# Each quotes the item's id and the version its claim returned, and is an
# UPDATE ... WHERE id AND version AND claimed_by: success for each, then
# every error (400, 401, 404, 405, 409, 413).
#
# Items are set up per block, each in its own queue, so that a claim's
# answer is known in advance.  Items that a block only tries to change
# without success are claimed in the database at set-up (AQ::Workflow::hold)
# and checked to be unchanged afterwards (AQ::Workflow::unchanged).
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Workflow;
use JSON::PP ();
use Test::Nginx::Socket 'no_plan';

our $org   = AQ::org('workflow');
our $other = AQ::org('workflow-other');

our %k = map { $_ => AQ::Workflow::key($org, $_) } qw(alice bob);
$k{eve}     = AQ::Workflow::key($other, 'eve');
$k{revoked} = AQ::Workflow::key($org, 'revoked');
AQ::revoke($k{revoked});
$k{unknown} = AQ::well_formed_key();

our %q;
sub queue_of {
    my ($label, $org_id, @items) = @_;
    $q{$label} = AQ::Workflow::queue($org_id, $label);
    AQ::Workflow::enqueue($q{$label}, $_) for @items;
    return $q{$label};
}

queue_of('extend', $org, 'ext');
$q{short} = AQ::Workflow::queue($org, 'short', lease => '30 seconds');
AQ::Workflow::enqueue($q{short}, 'short');
$q{nolease} = AQ::Workflow::queue($org, 'nolease', lease => undef);
AQ::Workflow::enqueue($q{nolease}, 'nolease');
queue_of('release', $org, 'rel-1', 'rel-2');
queue_of('complete', $org, 'done');
queue_of('plain', $org, 'plain');
queue_of('race', $org, 'race');
queue_of('twice', $org, 'twice');
queue_of('twice-released', $org, 'twice-r');
queue_of('big', $org, 'big');
AQ::Workflow::hold('big', $k{alice});

# Held by alice at version 1 from the start; nobody changes them.
queue_of('held', $org, 'held');
AQ::Workflow::hold('held', $k{alice});
queue_of('held-other', $org, 'held-b');
AQ::Workflow::hold('held-b', $k{alice});
queue_of('theirs', $other, 'theirs');
AQ::Workflow::hold('theirs', $k{eve});

our $unknown_item = AQ::random_uuid();

# The result a rater sends with complete, as JSON text.
our $result = '{"label": "helpful", "score": 0.1, "ratio": 2.5, "count": 3, '
            . '"tags": ["a", "b"], "nested": {"k": null, "ok": true}, '
            . '"note": "caf\u00e9 \"quoted\""}';

our @bodies;    # raw bodies kept by ::keep
sub keep { push @bodies, $_[0]; return $_[0] }

# The requests, shorter.
sub act   { return AQ::Workflow::act(@_) }
sub req   { return AQ::Workflow::req(@_) }
sub claim { return AQ::Workflow::claim(@_) }
sub as    { return AQ::headers($k{ $_[0] }) }

# "result as sent" when the row's result is the jsonb of the text sent.
sub result_check {
    my ($item, $sent) = @_;
    my ($want) = AQ::dbh()->selectrow_array('SELECT ?::jsonb::text', undef, $sent);
    my $got = AQ::Workflow::row($item)->{result_text};
    return 'result NULL' unless defined $got;
    return $got eq $want ? 'result as sent' : "result $got, sent $want";
}

# Results of megabytes: 'mb' and 'mb-chunked' are held by alice at v1.
queue_of('mb', $org, 'mb');
AQ::Workflow::hold('mb', $k{alice});
queue_of('mb-chunked', $org, 'mb-chunked');
AQ::Workflow::hold('mb-chunked', $k{alice});

# A complete body of about $mb megabytes (a result of strings with escapes,
# unicode and numbers), as JSON text.
sub mb_body {
    my ($item, $mb) = @_;
    my $unit = qq({"text": "caf\\u00e9 \\"q\\" \\\\ \\n \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80 ) . ('x' x 40)
             . qq(", "score": 0.1, "big": 12345678901234567890.123456789});
    my $n = int($mb * 1_000_000 / (length($unit) + 2)) + 1;
    return qq({"item_id": "@{[AQ::item_id($item)]}", "version": 1, "result": {"label": "mb", )
           . qq("parts": [) . join(', ', ($unit) x $n) . ']}}';
}
our %mb = (within => mb_body('mb', 3), beyond => mb_body('mb', 9),
           chunked => mb_body('mb-chunked', 9));

# "result as sent, N MB" when the row's result is PostgreSQL's jsonb of the
# "result" of the body sent (compared in PostgreSQL: megabytes of text).
sub mb_result_check {
    my ($item, $body) = @_;
    my ($same, $len) = AQ::dbh()->selectrow_array(
        q{SELECT i.result = (?::jsonb) -> 'result', length(i.result::text)
            FROM annotation_queue.items i WHERE i.id = ?},
        undef, $body, AQ::item_id($item));
    return 'result NULL' unless defined $len;
    return ($same ? 'result as sent' : 'result differs from what was sent')
           . ($len > 2_500_000 ? ', over 2.5 MB' : ", only $len bytes");
}

# A chunked POST of $body to $uri as alice, in chunks of 64k.
sub chunked_req {
    my ($uri, $body) = @_;
    my $chunks = '';
    for (my $off = 0; $off < length $body; $off += 65536) {
        my $part = substr($body, $off, 65536);
        $chunks .= sprintf("%x\r\n%s\r\n", length $part, $part);
    }
    return "POST $uri HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
           . "Authorization: Bearer $k{alice}\r\nContent-Type: application/json\r\n"
           . "Transfer-Encoding: chunked\r\n\r\n$chunks" . "0\r\n\r\n";
}

# ---------------------------------------------------------------------------
# The race at an expired lease, $ROUNDS (80) times: alice claims an item (v1),
# her lease runs out; then at once bob claims the queue while alice extends
# and completes the item quoting v1.  Exactly one side wins, every round:
#   - bob's claim (200, v2): alice's extend and complete both get 409
#     stale_claim; the row is bob's claim at v2, without a result; and
#     alice's extend and complete sent again afterwards get 409 stale_claim
#     and leave it so;
#   - or alice's complete (200, v2, her result stored): bob gets 409
#     no_items_available; alice's extend is 200 (before her complete) or
#     409 stale_claim (after it).
# Never both, never neither.  The order in which the three requests are
# sent turns each round; which side wins is the database's business (the
# tally is printed, not checked).
{
    my $what = 'race at an expired lease';
    my $ROUNDS = 80;
    my ($ngx, $port) = AQ::Workflow::start_nginx(workers => 2,
        http => 'annotation_queue_pool_size 4;');
    my $alice = AQ::Workflow::key($org, 'race-alice');
    my $bob   = AQ::Workflow::key($org, 'race-bob');
    my %uri   = %AQ::Workflow::URI;
    my $setup = AQ::Client->new(port => $port);
    my @conn  = map { AQ::Client->new(port => $port) } 1 .. 3;
    my (@bad, %tally);

    for my $round (1 .. $ROUNDS) {
        my $queue = AQ::queue($org, "race-$round");
        my $item = AQ::enqueue($queue, undef, { round => $round });
        my $res = { };
        @$res{qw(status headers body error)} = $setup->claim($queue, $alice);
        my $claimed = AQ::Workflow::outcome($res);
        if ($claimed ne '200 claimed v1') {
            push @bad, "round $round: alice's claim: $claimed";
            next;
        }
        AQ::expire_lease($item);

        my $held = JSON::PP->new->canonical->encode({ item_id => $item, version => 1 });
        my $done = JSON::PP->new->canonical->encode(
            { item_id => $item, version => 1, result => { by => 'alice', round => $round } });
        my @reqs = ([uri => $uri{claim}, key => $bob, body => qq({"queue_id":"$queue"})],
                    [uri => $uri{extend}, key => $alice, body => $held],
                    [uri => $uri{complete}, key => $alice, body => $done]);
        my @order = map { ($_ + $round) % 3 } 0 .. 2;
        for my $i (@order) {
            my $err = $conn[$i]->send_request(@{ $reqs[$i] });
            push @bad, "round $round: sending request $i: $err" if $err;
        }
        my ($claim, $extend, $complete) =
            map { AQ::Workflow::outcome($conn[$_]->read_response) } 0 .. 2;
        my $row = AQ::Workflow::row($item);
        my $state = "$row->{status} v$row->{version} by "
                    . AQ::Workflow::holder_name($row->{claimed_by})
                    . ', result ' . ($row->{result_text} // 'NULL');
        my $seen = 'sent ' . join(', ', map { (qw(claim extend complete))[$_] } @order)
                   . "; claim: $claim; extend: $extend; complete: $complete; row: $state";
        $tally{$claim eq '200 claimed v2' ? 'bob' : 'alice'}++;

        if ($claim eq '200 claimed v2') {
            push @bad, "round $round: bob won, but alice did not get 409 stale_claim twice: $seen"
                unless $extend eq '409 stale_claim' && $complete eq '409 stale_claim';
            push @bad, "round $round: bob won, but the row is not his claim at v2: $seen"
                unless $state eq 'claimed v2 by race-bob, result NULL';
            my @again = map {
                my ($st, $h, $b, $e) = $setup->request(@$_);
                AQ::Workflow::outcome({ status => $st, body => $b, error => $e })
            } @reqs[1, 2];
            push @bad, "round $round: after bob's claim, alice's extend and complete again: "
                       . join(', ', @again)
                unless "@again" eq '409 stale_claim 409 stale_claim';
            my $after = AQ::Workflow::row($item);
            push @bad, "round $round: alice's late requests changed the row"
                unless $after->{version} == 2 && ($after->{claimed_by} // '') eq ($row->{claimed_by} // '')
                    && !defined $after->{result_text};
        } elsif ($claim eq '409 no_items_available') {
            push @bad, "round $round: bob got nothing, but alice's complete did not win: $seen"
                unless $complete eq '200 completed v2';
            push @bad, "round $round: alice's extend: $seen"
                unless $extend eq '200 claimed v1' || $extend eq '409 stale_claim';
            push @bad, "round $round: alice won, but the row is not her completed item: $seen"
                unless $state eq qq(completed v2 by nobody, result {"by": "alice", "round": $round});
        } else {
            push @bad, "round $round: bob's claim: $seen";
        }
    }
    is_deeply(\@bad, [], "$what: $ROUNDS rounds, each won by exactly one side (bob's claim "
                         . "or alice's complete), the loser answered 409, the row the winner's")
        or diag(Test::More::explain(\@bad));
    Test::More::note "$what: bob won " . ($tally{bob} // 0) . ', alice won ' . ($tally{alice} // 0);

    $ngx->stop;
    my @log = grep { /\[(?:error|alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@log, [], "$what: no [error], [alert], [crit] or [emerg] in the error log");
}

$AQ::CONFIG = $AQ::Workflow::LOCATIONS;
AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: extend: 200 with the item, the same version, and a lease that starts again from now
The claim's lease is cut to one minute in the database; extend gives the
item the queue's 15 minutes again, and keeps its version, twice.
--- request eval
[::claim($::q{extend}), ::act('extend', 'ext', 1), ::act('extend', 'ext', 1)]
--- more_headers eval
[(::as('alice')) x 3]
--- error_code eval
[200, 200, 200]
--- response_headers_like eval
[("Cache-Control: no-store") x 3]
--- response_body_filters eval
[[\&AQ::brief, AQ::then(sub { AQ::Workflow::set_lease('ext', '1 minute') }),
  AQ::append(sub { AQ::Workflow::lease_db('ext') })],
 [\&AQ::Workflow::answer, AQ::append(sub { AQ::Workflow::lease_db('ext') }),
  AQ::append(sub { AQ::Workflow::state_of('ext') })],
 [\&AQ::Workflow::brief, AQ::append(sub { AQ::Workflow::state_of('ext') })]]
--- response_body eval
["item ext v1\nlease 60s\n",
 qq({"item":{"id":"<item:ext>","lease_expires_at":"<ts>","queue_id":"<queue:extend>","status":"claimed","version":1},"success":true}\n)
 . "lease 900s\nclaimed v1 by alice\n",
 "claimed ext v1, lease 900s\nclaimed v1 by alice\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: extend: the queue's own lease (30 s), or annotation_queue_lease (10m) for a queue without one
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_lease 10m;
--- request eval
[::claim($::q{short}), ::act('extend', 'short', 1),
 ::claim($::q{nolease}), ::act('extend', 'nolease', 1)]
--- more_headers eval
[(::as('alice')) x 4]
--- error_code eval
[200, 200, 200, 200]
--- response_body_filters eval
[[\&AQ::brief, AQ::then(sub { AQ::Workflow::set_lease('short', '5 seconds') })],
 [\&AQ::Workflow::brief],
 [\&AQ::brief, AQ::then(sub { AQ::Workflow::set_lease('nolease', '5 seconds') })],
 [\&AQ::Workflow::brief]]
--- response_body eval
["item short v1\n", "claimed short v1, lease 30s\n",
 "item nolease v1\n", "claimed nolease v1, lease 600s\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: release: 200, version + 1, lease_expires_at null; the item is back in the queue at its place
alice releases rel-1; bob's claim gets rel-1 (v3), not rel-2; alice's next
claim gets rel-2.
--- request eval
[::claim($::q{release}), ::act('release', 'rel-1', 1), ::claim($::q{release}),
 ::claim($::q{release})]
--- more_headers eval
[::as('alice'), ::as('alice'), ::as('bob'), ::as('alice')]
--- error_code eval
[200, 200, 200, 200]
--- response_headers_like eval
[("Cache-Control: no-store") x 4]
--- response_body_filters eval
[[\&AQ::brief],
 [\&AQ::Workflow::answer, AQ::append(sub { AQ::Workflow::state_of('rel-1') })],
 [\&AQ::brief, AQ::append(sub { AQ::Workflow::state_of('rel-1') })],
 [\&AQ::brief]]
--- response_body eval
["item rel-1 v1\n",
 qq({"item":{"id":"<item:rel-1>","lease_expires_at":null,"queue_id":"<queue:release>","status":"available","version":2},"success":true}\n)
 . "available v2\n",
 "item rel-1 v3\nclaimed v3 by bob\n",
 "item rel-2 v1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: complete: 200, version + 1, lease_expires_at null, status completed; items.result holds the object sent
The result is compared with PostgreSQL's jsonb of the very text sent
(numbers such as 0.1 included).  A completed item is never handed out again.
--- request eval
[::claim($::q{complete}),
 ::req('complete', qq({"item_id": "@{[AQ::item_id('done')]}", "version": 1, "result": $::result})),
 ::claim($::q{complete})]
--- more_headers eval
[::as('alice'), ::as('alice'), ::as('bob')]
--- error_code eval
[200, 200, 409]
--- response_headers_like eval
["Cache-Control: no-store", "Cache-Control: no-store", ""]
--- response_body_filters eval
[[\&AQ::brief],
 [\&AQ::Workflow::answer, AQ::append(sub { AQ::Workflow::row('done')->{status} }),
  AQ::append(sub { ::result_check('done', $::result) }),
  AQ::append(sub { defined AQ::Workflow::row('done')->{completed_at} ? 'completed_at set' : 'completed_at NULL' })],
 [\&AQ::brief]]
--- response_body eval
["item done v1\n",
 qq({"item":{"id":"<item:done>","lease_expires_at":null,"queue_id":"<queue:complete>","status":"completed","version":2},"success":true}\n)
 . "completed\nresult as sent\ncompleted_at set\n",
 "error no_items_available\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: complete without a result: 200, items.result stays NULL
--- request eval
[::claim($::q{plain}), ::act('complete', 'plain', 1)]
--- more_headers eval
[(::as('alice')) x 2]
--- error_code eval
[200, 200]
--- response_body_filters eval
[[\&AQ::brief], [\&AQ::Workflow::brief, AQ::append(sub { AQ::Workflow::state_of('plain') })]]
--- response_body eval
["item plain v1\n", "completed plain v2, lease null\ncompleted v2\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: GET, PUT, DELETE on extend, release, complete: 405 method_not_allowed with Allow: POST
--- request eval
[map { my $u = $AQ::Workflow::URI{$_}; ("GET $u", "PUT $u\n{}", "DELETE $u") }
 qw(extend release complete)]
--- more_headers eval
::as('alice')
--- error_code eval
[(405) x 9]
--- response_headers_like eval
[("Allow: POST") x 9]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[(qq({"error":{"code":"method_not_allowed","message":"..."},"success":false}\n)) x 9]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: no item_id: 400 missing_item_id; item_id that is not a UUID string: 400 invalid_item_id
--- request eval
my $id = AQ::item_id('held');
(my $nodash = $id) =~ s/-//g;
my @missing = ('{"version": 1}', '{}', qq({"Item_Id": "$id", "version": 1}),
               qq({"item": {"item_id": "$id"}, "version": 1}));
my @invalid = map { qq({"item_id": $_, "version": 1}) }
              '42', 'null', 'true', '""', '"not-a-uuid"', qq("$nodash"), qq(["$id"]),
              qq("${id}0"), '"' . substr($id, 0, 35) . '"', qq("{$id}");
[(map { ::req('extend', $_) } @missing), (map { ::req('release', $_) } @missing),
 (map { ::req('complete', $_) } @missing),
 (map { ::req('extend', $_) } @invalid), (map { ::req('complete', $_) } @invalid),
 ::req('release', $invalid[4])]
--- more_headers eval
::as('alice')
--- error_code eval
[(400) x 33]
--- response_body_filters eval
[([\&AQ::brief]) x 32, [\&AQ::brief, AQ::append(sub { AQ::Workflow::unchanged('held') })]]
--- response_body eval
[("error missing_item_id\n") x 12, ("error invalid_item_id\n") x 20,
 "error invalid_item_id\nrow unchanged\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: no version: 400 missing_version; a version that is not a non-negative integer (negative, string, fraction...): 400 invalid_version
--- request eval
my $id = AQ::item_id('held');
my @missing = (qq({"item_id": "$id"}), qq({"item_id": "$id", "Version": 1}),
               qq({"item_id": "$id", "result": {"version": 1}}));
my @invalid = map { qq({"item_id": "$id", "version": $_}) }
              '-1', '"1"', '1.5', '0.5', '1e-1', 'null', 'true', '[1]', '{"v": 1}', '""';
[(map { my $b = $_; map { ::req($_, $b) } qw(extend release complete) } @missing),
 (map { my $b = $_; map { ::req($_, $b) } qw(extend release complete) } @invalid)]
--- more_headers eval
::as('alice')
--- error_code eval
[(400) x 39]
--- response_body_filters eval
[([\&AQ::brief]) x 38, [\&AQ::brief, AQ::append(sub { AQ::Workflow::unchanged('held') })]]
--- response_body eval
[("error missing_version\n") x 9, ("error invalid_version\n") x 29,
 "error invalid_version\nrow unchanged\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: complete with a result that is not an object: 400 invalid_result; the item is not completed
--- request eval
my $id = AQ::item_id('held');
[map { ::req('complete', qq({"item_id": "$id", "version": 1, "result": $_})) }
 '"good"', '42', '4.5', 'true', 'false', '[{"label": "good"}]', '[]', '""']
--- more_headers eval
::as('alice')
--- error_code eval
[(400) x 8]
--- response_body_filters eval
[([\&AQ::brief]) x 7, [\&AQ::brief, AQ::append(sub { AQ::Workflow::unchanged('held') })]]
--- response_body eval
[("error invalid_result\n") x 7, "error invalid_result\nrow unchanged\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: a body that is not JSON: 400 invalid_json; JSON that is not an object: 400 invalid_request
--- request eval
my $id = AQ::item_id('held');
my @bad = ('hello', qq({"item_id": "$id", "version": 1),
           qq({"item_id": "$id", "version": 1} trailing),
           qq({"item_id": "$id", "version": 1,}),
           qq({"item_id": "$id", "item_id": "$id", "version": 1}),
           qq({"item_id": "$id", "version": 1, "version": 1}),
           qq({item_id: "$id", version: 1}), '');
my @notobj = ('[]', qq(["$id", 1]), qq("$id"), '1', 'null');
[(map { my $b = $_; map { ::req($_, $b) } qw(extend release complete) } @bad),
 (map { my $b = $_; map { ::req($_, $b) } qw(extend release complete) } @notobj)]
--- more_headers eval
::as('alice')
--- error_code eval
[(400) x 39]
--- response_body_filters eval
[([\&AQ::brief]) x 38, [\&AQ::brief, AQ::append(sub { AQ::Workflow::unchanged('held') })]]
--- response_body eval
[("error invalid_json\n") x 24, ("error invalid_request\n") x 14,
 "error invalid_request\nrow unchanged\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: 401 on each endpoint: no key (missing_api_key), not Bearer (invalid_authorization), malformed, unknown or revoked key (invalid_api_key)
The holder's very body is sent: only the key is wrong.
--- request eval
[map { my $a = $_; map { ::act($a, 'held', 1) } 1 .. 5 } qw(extend release complete)]
--- more_headers eval
my $body = AQ::random_hex(64);
[(("Content-Type: application/json",
   "Authorization: Basic YWxpY2U6c2VjcmV0",
   AQ::headers('aqk_' . $body),
   AQ::headers($::k{unknown}),
   AQ::headers($::k{revoked}))) x 3]
--- error_code eval
[(401) x 15]
--- response_headers_like eval
[(('WWW-Authenticate: Bearer realm="annotation_queue"',
   'WWW-Authenticate: Bearer realm="annotation_queue"',
   'WWW-Authenticate: Bearer realm="annotation_queue", error="invalid_token"',
   'WWW-Authenticate: Bearer realm="annotation_queue", error="invalid_token"',
   'WWW-Authenticate: Bearer realm="annotation_queue", error="invalid_token"')) x 3]
--- response_body_filters eval
[([\&AQ::canon]) x 14, [\&AQ::canon, AQ::append(sub { AQ::Workflow::unchanged('held') })]]
--- response_body eval
[((map { AQ::error_body($_) } qw(missing_api_key invalid_authorization invalid_api_key
                                 invalid_api_key invalid_api_key)) x 2),
 (map { AQ::error_body($_) } qw(missing_api_key invalid_authorization invalid_api_key
                                invalid_api_key)),
 AQ::error_body('invalid_api_key') . "row unchanged\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: 404 item_not_found: an unknown item, and an item of another organisation: byte for byte the same answer
alice quotes eve's item with its very version; eve quotes alice's item.
Neither item changes.
--- request eval
[(map { ::req($_, { item_id => $::unknown_item, version => 1 }),
        ::act($_, 'theirs', 1), ::act($_, 'held', 1) } qw(extend release complete))]
--- more_headers eval
[(::as('alice'), ::as('alice'), ::as('eve')) x 3]
--- error_code eval
[(404) x 9]
--- response_body_filters eval
my @f;
for my $i (0 .. 8) {
    my $first = $i - $i % 3;    # the unknown item's answer of this endpoint
    push @f, [\&::keep, \&AQ::canon, AQ::append(sub {
        return 'kept' if $i == $first;
        return $::bodies[$i] eq $::bodies[$first]
               ? 'byte for byte the answer for an unknown item'
               : "differs from the answer for an unknown item: $::bodies[$i]";
    })];
}
push @{ $f[-1] }, AQ::append(sub { 'theirs: ' . AQ::Workflow::unchanged('theirs') }),
                  AQ::append(sub { 'held: ' . AQ::Workflow::unchanged('held') });
\@f;
--- response_body eval
[(AQ::error_body('item_not_found') . "kept\n",
  AQ::error_body('item_not_found') . "byte for byte the answer for an unknown item\n",
  AQ::error_body('item_not_found') . "byte for byte the answer for an unknown item\n") x 2,
 AQ::error_body('item_not_found') . "kept\n",
 AQ::error_body('item_not_found') . "byte for byte the answer for an unknown item\n",
 AQ::error_body('item_not_found') . "byte for byte the answer for an unknown item\n"
 . "theirs: row unchanged\nheld: row unchanged\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: 409 stale_claim: the holder quotes a version it does not hold (2, 0); nothing changes
--- request eval
[map { ::act($_, 'held', 2), ::act($_, 'held', 0), ::act($_, 'held', 12345678901) }
 qw(extend release complete)]
--- more_headers eval
::as('alice')
--- error_code eval
[(409) x 9]
--- response_body_filters eval
[([\&AQ::canon]) x 8, [\&AQ::canon, AQ::append(sub { AQ::Workflow::unchanged('held') })]]
--- response_body eval
[(AQ::error_body('stale_claim')) x 8, AQ::error_body('stale_claim') . "row unchanged\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: 409 stale_claim: an item held by another key, even with the holder's version; the holder's claim stays intact
bob quotes alice's item and version on each endpoint; then alice extends it.
--- request eval
[::act('extend', 'held-b', 1), ::act('release', 'held-b', 1), ::act('complete', 'held-b', 1),
 ::act('extend', 'held-b', 1)]
--- more_headers eval
[(::as('bob')) x 3, ::as('alice')]
--- error_code eval
[409, 409, 409, 200]
--- response_body_filters eval
[[\&AQ::brief], [\&AQ::brief], [\&AQ::brief, AQ::append(sub { AQ::Workflow::unchanged('held-b') })],
 [\&AQ::Workflow::brief, AQ::append(sub { AQ::Workflow::state_of('held-b') })]]
--- response_body eval
["error stale_claim\n", "error stale_claim\n", "error stale_claim\nrow unchanged\n",
 "claimed held-b v1, lease 900s\nclaimed v1 by alice\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 15: after its lease expired and bob claimed the item, alice (old version) can neither extend, release nor complete it
alice claims (v1), her lease runs out, bob claims (v2).  alice's extend,
release and complete with v1 get 409, and so does her complete quoting
bob's v2: she no longer holds the item.  Her result is not stored; bob's
claim is intact and his complete works.
--- request eval
[::claim($::q{race}), ::claim($::q{race}),
 ::act('extend', 'race', 1), ::act('release', 'race', 1),
 ::req('complete', qq({"item_id": "@{[AQ::item_id('race')]}", "version": 1, "result": {"by": "alice"}})),
 ::req('complete', qq({"item_id": "@{[AQ::item_id('race')]}", "version": 2, "result": {"by": "alice"}})),
 ::req('complete', qq({"item_id": "@{[AQ::item_id('race')]}", "version": 2, "result": {"by": "bob"}}))]
--- more_headers eval
[::as('alice'), ::as('bob'), (::as('alice')) x 4, ::as('bob')]
--- error_code eval
[200, 200, 409, 409, 409, 409, 200]
--- response_body_filters eval
[[\&AQ::brief, AQ::then(sub { AQ::expire_lease('race') })],
 [\&AQ::brief],
 [\&AQ::brief], [\&AQ::brief], [\&AQ::brief],
 [\&AQ::brief, AQ::append(sub { AQ::Workflow::state_of('race') })],
 [\&AQ::Workflow::brief, AQ::append(sub { AQ::Workflow::state_of('race') })]]
--- response_body eval
["item race v1\n", "item race v2\n",
 "error stale_claim\n", "error stale_claim\n", "error stale_claim\n",
 "error stale_claim\nclaimed v2 by bob\n",
 qq(completed race v3, lease null\ncompleted v3, result {"by": "bob"}\n)]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 16: 409 stale_claim once the holder is done: complete twice, release twice, extend or complete a released item
The version after a complete or a release (v2) is no claim either.
--- request eval
[::claim($::q{twice}), ::act('complete', 'twice', 1), ::act('complete', 'twice', 1),
 ::act('complete', 'twice', 2), ::act('extend', 'twice', 2),
 ::claim($::q{'twice-released'}), ::act('release', 'twice-r', 1), ::act('release', 'twice-r', 1),
 ::act('release', 'twice-r', 2), ::act('extend', 'twice-r', 2), ::act('complete', 'twice-r', 2)]
--- more_headers eval
::as('alice')
--- error_code eval
[200, 200, 409, 409, 409, 200, 200, 409, 409, 409, 409]
--- response_body_filters eval
[[\&AQ::brief], [\&AQ::Workflow::brief], [\&AQ::brief], [\&AQ::brief],
 [\&AQ::brief, AQ::append(sub { AQ::Workflow::state_of('twice') })],
 [\&AQ::brief], [\&AQ::Workflow::brief], [\&AQ::brief], [\&AQ::brief], [\&AQ::brief],
 [\&AQ::brief, AQ::append(sub { AQ::Workflow::state_of('twice-r') })]]
--- response_body eval
["item twice v1\n", "completed twice v2, lease null\n",
 "error stale_claim\n", "error stale_claim\n", "error stale_claim\ncompleted v2\n",
 "item twice-r v1\n", "available twice-r v2, lease null\n",
 "error stale_claim\n", "error stale_claim\n", "error stale_claim\n",
 "error stale_claim\navailable v2\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 17: a result over annotation_queue_max_body_size (4k): 413 body_too_large; with a larger limit it is stored
--- config eval
$AQ::Workflow::LOCATIONS . <<"_EOC_"
    location = /large/complete {
        annotation_queue_max_body_size 16k;
        annotation_queue_complete;
    }
_EOC_
--- request eval
my $body = qq({"item_id": "@{[AQ::item_id('big')]}", "version": 1, "result": {"text": ")
           . ('x' x 5000) . '"}}';
[::req('complete', $body), ::req('/large/complete', $body)]
--- more_headers eval
::as('alice')
--- error_code eval
[413, 200]
--- response_body_filters eval
[[\&AQ::brief],
 [\&AQ::Workflow::brief,
  AQ::append(sub { 'result of ' . length(AQ::Workflow::row('big')->{result_text}) . ' bytes' })]]
--- response_body eval
["error body_too_large\n", "completed big v2, lease null\nresult of 5012 bytes\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 18: a result of 3 MB within annotation_queue_max_body_size (8m) is stored as sent; 9 MB (announced) is refused at once with 413 body_too_large
The 9 MB body is refused before it is read; the item stays alice's claim
at v1 until the 3 MB complete.
--- config eval
$AQ::Workflow::LOCATIONS . <<"_EOC_"
    location = /large/complete {
        annotation_queue_max_body_size 8m;
        annotation_queue_complete;
    }
_EOC_
--- request eval
[::req('/large/complete', $::mb{beyond}), ::req('/large/complete', $::mb{within})]
--- more_headers eval
::as('alice')
--- timeout eval
20 * AQ::slow()
--- error_code eval
[413, 200]
--- response_headers_like eval
["Content-Type: application/json", "Content-Type: application/json\nCache-Control: no-store"]
--- response_body_filters eval
[[\&AQ::canon, AQ::append(sub { AQ::Workflow::unchanged('mb') })],
 [\&AQ::Workflow::brief, AQ::append(sub { ::mb_result_check('mb', $::mb{within}) })]]
--- response_body eval
[AQ::error_body('body_too_large') . "row unchanged\n",
 "completed mb v2, lease null\nresult as sent, over 2.5 MB\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 19: a chunked result of 9 MB over annotation_queue_max_body_size (8m): 413 body_too_large, the item unchanged
--- config eval
$AQ::Workflow::LOCATIONS . <<"_EOC_"
    location = /large/complete {
        annotation_queue_max_body_size 8m;
        annotation_queue_complete;
    }
_EOC_
--- raw_request eval
::chunked_req('/large/complete', $::mb{chunked})
--- timeout eval
20 * AQ::slow()
--- error_code: 413
--- response_body_filters eval
[\&AQ::canon, AQ::append(sub { AQ::Workflow::unchanged('mb-chunked') })]
--- response_body eval
AQ::error_body('body_too_large') . "row unchanged\n"
--- no_error_log
[error]
[alert]
[crit]
