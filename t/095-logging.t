# The log variables in an access log line, and the errors nginx itself
# makes in the module's locations (limit_req) answered as JSON.
#
#   $annotation_queue_key       the key's public prefix (aqk_ + 8 digits),
#                               once the key is well formed; never the key
#   $annotation_queue_item      the item claimed or acted on
#   $annotation_queue_outcome   claimed, extended, released, completed, or
#                               the error code answered
#   $annotation_queue_db_time   seconds spent waiting for PostgreSQL (0.002);
#                               "-" when the request never reached it
#
# Every request carries an X-Test header that the log_format writes as
# t=...; a response filter finds that line in logs/aq.log (AQ::Workflow::
# log_line) and shows it with the key's prefix as <prefix:name>, ids as
# <item:label> and a time as <secs>.
#
# A chunked body over client_max_body_size (nginx's own 413) is answered
# as JSON: t/030-request.t TEST 22.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Workflow;
use Test::Nginx::Socket 'no_plan';

our $org = AQ::org('logging');
our %k = map { $_ => AQ::Workflow::key($org, $_) } qw(alice bob carol dave);
$k{unknown} = AQ::well_formed_key();
our $body_hex = AQ::random_hex(64);
$k{malformed} = 'aqk_' . $body_hex . '00000000';    # a wrong checksum
$k{malformed} = 'aqk_' . $body_hex . 'ffffffff'
    if AQ::key_checksum($body_hex) eq '00000000';

our %q;
$q{log} = AQ::Workflow::queue($org, 'log');
AQ::Workflow::enqueue($q{log}, 'log-1');
$q{errors} = AQ::Workflow::queue($org, 'errors');
AQ::Workflow::enqueue($q{errors}, "errors-$_") for 1 .. 3;
$q{nginx} = AQ::Workflow::queue($org, 'nginx');
AQ::Workflow::enqueue($q{nginx}, "nginx-$_") for 1 .. 3;
our $unknown_item = AQ::random_uuid();
AQ::label_item($unknown_item, 'unknown');

my %label_of = (map({ AQ::item_id($_) => $_ }
                    'log-1', (map { "errors-$_" } 1 .. 3), (map { "nginx-$_" } 1 .. 3)),
                $unknown_item => 'unknown');
my %prefix_of = map { substr($k{$_}, 0, 12) => $_ } keys %k;

# A log line with its variables made readable.
sub norm {
    my ($line) = @_;
    $line =~ s{\bkey=(aqk_[0-9a-f]{8})(?=\s|$)}{'key=<prefix:' . ($prefix_of{$1} // '?') . '>'}e;
    $line =~ s{\bitem=([0-9a-f-]{36})(?=\s|$)}{'item=<item:' . ($label_of{$1} // $1) . '>'}e;
    $line =~ s{\bdb=\d+\.\d{3}(?=\s|$)}{db=<secs>};
    return $line;
}

# A response filter: the answer in brief, then its access log line.
sub logged {
    my ($tag) = @_;
    return sub {
        my ($body) = @_;
        my $brief = $body =~ /"status"/ ? AQ::Workflow::brief($body) : AQ::brief($body);
        return $brief . norm(AQ::Workflow::log_line('aq.log', $tag)) . "\n";
    };
}

# Every key's secret part, anywhere in the block's logs.
sub no_secrets {
    my $logs = '';
    for my $f (qw(aq.log access.log error.log)) {
        $logs .= AQ::slurp(AQ::Workflow::log_file($f));
    }
    my @found = grep { index($logs, $_) >= 0 }
                map { AQ::secret_parts($k{$_}) } sort keys %k;
    return @found ? "the logs hold secret parts of keys: @found" : 'no key in the logs';
}

# headers for a request tagged $tag, as $who (undef: no Authorization)
sub tagged {
    my ($tag, $who) = @_;
    my $auth = !defined $who    ? 'Content-Type: application/json'
             : $who eq 'BASIC'  ? "Authorization: Basic YWxpY2U6c2VjcmV0\nContent-Type: application/json"
             :                    AQ::headers($k{$who});
    return "$auth\nX-Test: $tag";
}

$AQ::HTTP_CONFIG = <<'_EOC_';
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_limit_zone zone=logzone:1m rate=6r/m;
    limit_req_zone $binary_remote_addr zone=perip429:1m rate=1r/m;
    limit_req_zone $binary_remote_addr zone=perip503:1m rate=1r/m;
    log_format aq 't=$http_x_test status=$status key=$annotation_queue_key '
                  'item=$annotation_queue_item outcome=$annotation_queue_outcome '
                  'db=$annotation_queue_db_time';
_EOC_

$AQ::CONFIG = "    access_log logs/aq.log aq;\n" . $AQ::Workflow::LOCATIONS . <<'_EOC_';
    location = /limited/queue {
        annotation_queue_limit zone=logzone burst=0;
        annotation_queue_claim;
    }
    location = /small/queue {
        annotation_queue_max_body_size 100;
        annotation_queue_claim;
    }
    location = /limit_req/429 {
        limit_req zone=perip429;
        limit_req_status 429;
        annotation_queue_claim;
    }
    location = /limit_req/503 {
        limit_req zone=perip503;
        annotation_queue_claim;
    }
    location = /plain {
        return 200 '{"plain": true}';
    }
_EOC_

our @secret_patterns = map { AQ::secret_parts($k{$_}) } sort keys %k;

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: the workflow's outcomes: claimed, extended, stale_claim, released, completed, no_items_available, item_not_found; key prefix, item and database time
--- request eval
[AQ::claim_req($::q{log}),
 AQ::Workflow::act('extend', 'log-1', 1),
 AQ::Workflow::act('extend', 'log-1', 7),
 AQ::Workflow::act('release', 'log-1', 1),
 AQ::claim_req($::q{log}),
 AQ::Workflow::act('complete', 'log-1', 3, result => { ok => JSON::PP::true() }),
 AQ::claim_req($::q{log}),
 AQ::Workflow::act('extend', $::unknown_item, 1)]
--- more_headers eval
[map { ::tagged(@$_) } [claim => 'alice'], [extend => 'alice'], [stale => 'alice'],
 [release => 'alice'], [again => 'alice'], [complete => 'alice'], [empty => 'bob'],
 [unknown => 'alice']]
--- error_code eval
[200, 200, 409, 200, 200, 200, 409, 404]
--- response_body_filters eval
[(map { [::logged($_)] } qw(claim extend stale release again complete empty)),
 [::logged('unknown'), AQ::append(\&::no_secrets)]]
--- response_body eval
["item log-1 v1\nt=claim status=200 key=<prefix:alice> item=<item:log-1> outcome=claimed db=<secs>\n",
 "claimed log-1 v1, lease 900s\nt=extend status=200 key=<prefix:alice> item=<item:log-1> outcome=extended db=<secs>\n",
 "error stale_claim\nt=stale status=409 key=<prefix:alice> item=<item:log-1> outcome=stale_claim db=<secs>\n",
 "available log-1 v2, lease null\nt=release status=200 key=<prefix:alice> item=<item:log-1> outcome=released db=<secs>\n",
 "item log-1 v3\nt=again status=200 key=<prefix:alice> item=<item:log-1> outcome=claimed db=<secs>\n",
 "completed log-1 v4, lease null\nt=complete status=200 key=<prefix:alice> item=<item:log-1> outcome=completed db=<secs>\n",
 "error no_items_available\nt=empty status=409 key=<prefix:bob> item=- outcome=no_items_available db=<secs>\n",
 "error item_not_found\nt=unknown status=404 key=<prefix:alice> item=<item:unknown> outcome=item_not_found db=<secs>\n"
 . "no key in the logs\n"]
--- log_level: info
--- no_error_log eval
["[error]", "[alert]", "[crit]", @::secret_patterns]



=== TEST 2: answers without a database trip: db is "-"; the key prefix only once the key is well formed
--- request eval
[AQ::claim_req($::q{errors}), AQ::claim_req($::q{errors}), AQ::claim_req($::q{errors}),
 "GET $AQ::URI", AQ::post_req('{"queue_id": '),
 AQ::Workflow::req('extend', { item_id => 'not-a-uuid', version => 1 }),
 AQ::Workflow::req('/small/queue', { queue_id => $::q{errors}, padding => 'x' x 100 }),
 AQ::Workflow::req('/limited/queue', { queue_id => $::q{errors} }),
 AQ::Workflow::req('/limited/queue', { queue_id => $::q{errors} }),
 AQ::claim_req($::q{errors}),
 "GET /plain"]
--- more_headers eval
[map { ::tagged(@$_) } [nokey => undef], [basic => 'BASIC'], [malformed => 'malformed'], [get => 'alice'],
 [json => 'alice'], [itemid => 'alice'], [large => 'alice'], [limited1 => 'carol'],
 [limited2 => 'carol'], [unknownkey => 'unknown'], [plain => 'alice']]
--- error_code eval
[401, 401, 401, 405, 400, 400, 413, 200, 429, 401, 200]
--- response_headers_like eval
[("") x 10, 'Content-Type: text/plain']
--- response_body_filters eval
[(map { [::logged($_)] } qw(nokey basic malformed get json itemid large limited1 limited2 unknownkey)),
 [sub { AQ::Workflow::log_line('aq.log', 'plain') . "\n" }, AQ::append(\&::no_secrets)]]
--- response_body eval
["error missing_api_key\nt=nokey status=401 key=- item=- outcome=missing_api_key db=-\n",
 "error invalid_authorization\nt=basic status=401 key=- item=- outcome=invalid_authorization db=-\n",
 "error invalid_api_key\nt=malformed status=401 key=- item=- outcome=invalid_api_key db=-\n",
 "error method_not_allowed\nt=get status=405 key=- item=- outcome=method_not_allowed db=-\n",
 "error invalid_json\nt=json status=400 key=<prefix:alice> item=- outcome=invalid_json db=-\n",
 "error invalid_item_id\nt=itemid status=400 key=<prefix:alice> item=- outcome=invalid_item_id db=-\n",
 "error body_too_large\nt=large status=413 key=<prefix:alice> item=- outcome=body_too_large db=-\n",
 "item errors-1 v1\nt=limited1 status=200 key=<prefix:carol> item=<item:errors-1> outcome=claimed db=<secs>\n",
 "error rate_limited\nt=limited2 status=429 key=<prefix:carol> item=- outcome=rate_limited db=-\n",
 "error invalid_api_key\nt=unknownkey status=401 key=<prefix:unknown> item=- outcome=invalid_api_key db=<secs>\n",
 "t=plain status=200 key=- item=- outcome=- db=-\nno key in the logs\n"]
--- log_level: info
--- no_error_log eval
["[error]", "[alert]", "[crit]", @::secret_patterns]



=== TEST 3: limit_req in a claim location: its 429 (limit_req_status 429) and its 503 (the default) are JSON errors
rate=1r/m per address: the first claim of each location passes, the second
is refused by limit_req before the module runs.
--- request eval
[(AQ::Workflow::req('/limit_req/429', { queue_id => $::q{nginx} })) x 2,
 (AQ::Workflow::req('/limit_req/503', { queue_id => $::q{nginx} })) x 2]
--- more_headers eval
[map { ::tagged(@$_) } [r429a => 'dave'], [r429b => 'dave'], [r503a => 'dave'], [r503b => 'dave']]
--- error_code eval
[200, 429, 200, 503]
--- response_headers_like eval
[("Content-Type: application/json") x 4]
--- response_body_filters eval
[[\&AQ::brief], [::logged('r429b')], [\&AQ::brief], [::logged('r503b')]]
--- response_body_like eval
["^item nginx-1 v1\n\\z",
 "^error rate_limited\nt=r429b status=429 key=(?:-|<prefix:dave>) item=- outcome=rate_limited db=-\n\\z",
 "^item nginx-1 v1\n\\z",
 "^error [a-z_]+\nt=r503b status=503 key=(?:-|<prefix:dave>) item=- outcome=[a-z_]+ db=-\n\\z"]
--- no_error_log
[alert]
[crit]
