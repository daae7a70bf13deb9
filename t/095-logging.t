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
# The errors nginx itself answers in the module's locations are the
# module's JSON envelope, each with its code and message, counted and
# logged with that outcome: limit_req's 429 and 503, limit_conn's 503
# (with Retry-After), an invalid chunked body (400), client_body_timeout
# while the body trickles (408, which nginx would otherwise close without
# a word), a temporary file that cannot be written (500).  A chunked body
# over client_max_body_size (nginx's own 413): t/030-request.t TEST 22.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Workflow;
use File::Temp qw(tempdir);
use Test::Nginx::Socket 'no_plan';
use Time::HiRes ();

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
sub norm_line {
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
        return $brief . norm_line(AQ::Workflow::log_line('aq.log', $tag)) . "\n";
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
    location = /denied/queue {
        deny all;
        annotation_queue_claim;
    }
    location = /gone/queue {
        return 404;
        annotation_queue_claim;
    }
    location = /timeout/queue {
        client_body_timeout __BODY_TIMEOUT__s;
        annotation_queue_claim;
    }
    location = /tempfile/queue {
        client_body_buffer_size 16;
        client_body_temp_path $TEST_NGINX_AQ_NOT_A_DIR;
        annotation_queue_claim;
    }
_EOC_

our @secret_patterns = map { AQ::secret_parts($k{$_}) } sort keys %k;

# The error bodies of nginx's own errors, exactly.
our %nginx_error = (
    400 => '{"success":false,"error":{"code":"bad_request","message":"the request is malformed"}}',
    408 => '{"success":false,"error":{"code":"request_timeout","message":"the request was not received in time"}}',
    403 => '{"success":false,"error":{"code":"forbidden","message":"access to this endpoint is denied"}}',
    404 => '{"success":false,"error":{"code":"not_found","message":"no such endpoint"}}',
    429 => '{"success":false,"error":{"code":"rate_limited","message":"too many requests, retry later"}}',
    500 => '{"success":false,"error":{"code":"internal_error","message":"internal error"}}',
    503 => '{"success":false,"error":{"code":"service_unavailable","message":"the service is unavailable, retry later"}}',
);

# A response filter: the body as it is, then its access log line.
sub as_is {
    my ($tag) = @_;
    return sub {
        return "$_[0]\n" . norm_line(AQ::Workflow::log_line('aq.log', $tag)) . "\n";
    };
}

# A regular file where a directory should be: client_body_temp_path there
# (nginx starts, mkdir finding it exists) makes writing a body to a
# temporary file fail.
our $not_a_dir = tempdir('aq-095-XXXXXX', TMPDIR => 1, CLEANUP => 1) . '/not-a-directory';
{
    open my $fh, '>', $not_a_dir or die "$not_a_dir: $!";
    close $fh;
}
$ENV{TEST_NGINX_AQ_NOT_A_DIR} = $not_a_dir;

# client_body_timeout of /timeout/queue (TEST 5), and thirds of it the pause
# of its trickle.
our $BODY_TIMEOUT = 1 * AQ::slow();
$AQ::CONFIG =~ s/__BODY_TIMEOUT__/$BODY_TIMEOUT/;

# A claim by dave whose body announces 200 bytes.
sub partial_claim {
    my ($tag, $uri) = @_;
    return "POST $uri HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
           . "Authorization: Bearer $k{dave}\r\nContent-Type: application/json\r\n"
           . "X-Test: $tag\r\nContent-Length: 200\r\n\r\n";
}

# ---------------------------------------------------------------------------
# limit_conn in a claim location: while one claim holds the location's one
# connection (its body not yet sent), another request gets limit_conn's 503
# as the JSON service_unavailable with Retry-After; once the first goes,
# requests are served again.
{
    my $what = 'limit_conn';
    my $ngx = AQ::start_nginx(workers => 1,
        http     => 'limit_conn_zone $binary_remote_addr zone=oneconn:1m;',
        location => 'limit_conn oneconn 1;');
    my $held = AQ::Client->new(port => $ngx->port);
    my $err = $held->send_request(key => $k{dave}, body => '{"queue_id": ',
                                  headers => { 'Content-Length' => 200 });
    is($err, undef, "$what: a claim whose body does not come holds the connection");

    # until the held claim counts (nginx read its header): unlimited, a
    # request without a key gets 401 at once
    my ($st, $h, $body);
    my $deadline = Time::HiRes::time() + 10 * AQ::slow();
    while (1) {
        ($st, $h, $body) = AQ::Client->new(port => $ngx->port)->request(body => '{}');
        last if $st != 401 || Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
    is($st, 503, "$what: another request gets 503");
    like($h->{'content-type'} // '', qr{^application/json(?:;\s*charset=utf-8)?$},
         "$what: ... Content-Type: application/json");
    like($h->{'retry-after'} // '', qr/^\d+$/, "$what: ... with Retry-After");
    is($body, $nginx_error{503}, "$what: ... the JSON error service_unavailable");

    $held->disconnect;
    $deadline = Time::HiRes::time() + 10 * AQ::slow();
    while (1) {
        ($st, $h, $body) = AQ::Client->new(port => $ngx->port)->request(body => '{}');
        last if $st != 503 || Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
    is($st, 401, "$what: once the held claim is gone, requests are served again (401 without a key)");

    $ngx->stop;
    my @bad = grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@bad, [], "$what: no [alert], [crit] or [emerg] in the error log");
    like($ngx->error_log, qr/limiting connections by zone "oneconn"/,
         "$what: nginx logs its limit");
}

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



=== TEST 3: limit_req in a claim location: its 429 (limit_req_status 429) is rate_limited, its 503 (the default) service_unavailable, JSON with Retry-After
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
["Content-Type: application/json", "Content-Type: application/json\nRetry-After: \\d+",
 "Content-Type: application/json", "Content-Type: application/json\nRetry-After: \\d+"]
--- response_body_filters eval
[[\&AQ::brief], [::as_is('r429b')], [\&AQ::brief], [::as_is('r503b')]]
--- response_body_like eval
["^item nginx-1 v1\n\\z",
 "^" . quotemeta($::nginx_error{429}) . "\nt=r429b status=429 key=(?:-|<prefix:dave>) item=- outcome=rate_limited db=-\n\\z",
 "^item nginx-1 v1\n\\z",
 "^" . quotemeta($::nginx_error{503}) . "\nt=r503b status=503 key=(?:-|<prefix:dave>) item=- outcome=service_unavailable db=-\n\\z"]
--- no_error_log
[alert]
[crit]



=== TEST 4: an invalid chunked body, which nginx refuses in the claim location: 400 bad_request, JSON
--- raw_request eval
"POST $AQ::URI HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
. "Authorization: Bearer $::k{dave}\r\nX-Test: badchunk\r\nTransfer-Encoding: chunked\r\n\r\n"
. "zz\r\n{}\r\n0\r\n\r\n"
--- error_code: 400
--- response_body_filters eval
::as_is('badchunk')
--- response_body_like eval
"^" . quotemeta($::nginx_error{400}) . "\nt=badchunk status=400 key=(?:-|<prefix:dave>) item=- outcome=bad_request db=-\n\\z"
--- error_log
client sent invalid chunked body
--- no_error_log
[alert]
[crit]



=== TEST 5: client_body_timeout while the body trickles: 408 request_timeout, JSON, and the connection closes
The header and a first part of the body, a second part a little later, then
nothing: when client_body_timeout expires nginx answers (it would close
without a word) and closes.
--- raw_request eval
[::partial_claim('trickle', '/timeout/queue') . '{"queue_id": ', '"' . $::q{nginx} . '"']
--- raw_request_middle_delay eval
$::BODY_TIMEOUT / 3
--- timeout eval
10 * AQ::slow()
--- error_code: 408
--- response_headers_like
Content-Type: application/json
Connection: close
--- response_body_filters eval
::as_is('trickle')
--- response_body_like eval
"^" . quotemeta($::nginx_error{408}) . "\nt=trickle status=408 key=<prefix:dave> item=- outcome=request_timeout db=-\n\\z"
--- error_log
client timed out sending the request body
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: a body nginx cannot write to its temporary file (client_body_temp_path is a file): 500 internal_error, JSON
--- request eval
AQ::Workflow::req('/tempfile/queue', { queue_id => $::q{nginx}, padding => 'x' x 3000 })
--- more_headers eval
::tagged(tempfile => 'dave')
--- error_code: 500
--- response_body_filters eval
::as_is('tempfile')
--- response_body_like eval
"^" . quotemeta($::nginx_error{500}) . "\nt=tempfile status=500 key=<prefix:dave> item=- outcome=internal_error db=-\n\\z"
--- error_log
Not a directory
--- no_error_log
[alert]



=== TEST 9: deny and return in a claim location: 403 forbidden and 404 not_found, JSON, never internal_error
nginx answers these itself, before the module runs; the module rewrites
them into its JSON with a code of their own.
--- request eval
[AQ::Workflow::req('/denied/queue', { queue_id => $::q{nginx} }),
 AQ::Workflow::req('/gone/queue', { queue_id => $::q{nginx} })]
--- more_headers eval
[map { ::tagged(@$_) } [d403 => 'dave'], [g404 => 'dave']]
--- error_code eval
[403, 404]
--- response_headers_like eval
["Content-Type: application/json", "Content-Type: application/json"]
--- response_body_filters eval
[[::as_is('d403')], [::as_is('g404')]]
--- response_body_like eval
["^" . quotemeta($::nginx_error{403}) . "\nt=d403 status=403 key=- item=- outcome=forbidden db=-\n\\z",
 "^" . quotemeta($::nginx_error{404}) . "\nt=g404 status=404 key=- item=- outcome=not_found db=-\n\\z"]
--- no_error_log
[alert]
[crit]
