# Authentication: the Authorization header, key format, unknown / revoked /
# expired keys, WWW-Authenticate, and the key never reaching the error log.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use Test::Nginx::Socket 'no_plan';

our $org = AQ::org('auth');
our $queue = AQ::queue($org, 'auth');
AQ::enqueue_many($queue, 50, prefix => 'auth');

our %k = (
    good     => AQ::key($org, rater => 'good'),
    revoked  => AQ::key($org, rater => 'revoked'),
    expired  => AQ::key($org, rater => 'expired', expires_in => '-1 hour'),
    tomorrow => AQ::key($org, rater => 'tomorrow', expires_in => '1 day'),
    expiring => AQ::key($org, rater => 'expiring', expires_in => '1 day'),
    logged   => AQ::key($org, rater => 'logged'),
    logged2  => AQ::key($org, rater => 'logged2'),
    lower    => AQ::key($org, rater => 'lower'),
    upper    => AQ::key($org, rater => 'upper'),
    unknown  => AQ::well_formed_key(),
);
AQ::revoke($k{revoked});

# Keys that break the format in one way each (the rest is well formed).
my $body = AQ::random_hex(64);
our %malformed = (
    'bad prefix'          => 'aqx_' . $body . AQ::key_checksum($body),
    'no prefix'           => $body . AQ::key_checksum($body),
    'prefix only'         => 'aqk_',
    'body of 63 digits'   => 'aqk_' . substr($body, 1) . AQ::key_checksum(substr $body, 1),
    'body of 65 digits'   => 'aqk_' . "a$body" . AQ::key_checksum("a$body"),
    'bad checksum'        => 'aqk_' . $body . join('', map { sprintf '%x', (hex($_) + 1) % 16 }
                                                  split //, AQ::key_checksum($body)),
    'no checksum'         => 'aqk_' . $body,
    'last checksum digit' => 'aqk_' . $body . substr(AQ::key_checksum($body), 0, 7)
                             . sprintf('%x', (hex(substr AQ::key_checksum($body), 7) + 1) % 16),
    'uppercase body'      => 'aqk_' . uc($body) . AQ::key_checksum(uc $body),
    'non-hex digit'       => 'aqk_' . 'g' . substr($body, 1)
                             . AQ::key_checksum('g' . substr $body, 1),
    'uppercase prefix'    => 'AQK_' . $body . AQ::key_checksum($body),
);
# An uppercase checksum needs a letter in it to differ from the lowercase one.
{
    my $lettered = $body;
    $lettered = AQ::random_hex(64) until AQ::key_checksum($lettered) =~ /[a-f]/;
    $malformed{'uppercase checksum'} = 'aqk_' . $lettered . uc AQ::key_checksum($lettered);
}
our @malformed_names = sort keys %malformed;

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: no Authorization header: 401 missing_api_key with WWW-Authenticate: Bearer
--- request eval
AQ::claim_req($::queue)
--- more_headers
Content-Type: application/json
--- error_code: 401
--- response_headers_like
WWW-Authenticate: Bearer.*
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"missing_api_key","message":"..."},"success":false}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: an Authorization header that is not "Bearer <token>": 401 invalid_authorization
--- request eval
[(AQ::claim_req($::queue)) x 6]
--- more_headers eval
["Authorization: Basic dXNlcjpwYXNzd29yZA==",
 "Authorization: Token $::k{good}",
 "Authorization: $::k{good}",
 "Authorization: Bearer",
 "Authorization: Bearer    ",
 "Authorization: "]
--- error_code eval
[(401) x 6]
--- response_headers_like eval
[("WWW-Authenticate: Bearer.*\nContent-Type: application/json(;\\s*charset=utf-8)?") x 6]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[(qq({"error":{"code":"invalid_authorization","message":"..."},"success":false}\n)) x 6]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: malformed keys are refused without a database round trip: 401 invalid_api_key while the database is down
The database is unreachable: a module that asked it would answer 503.
The last request, a well-formed unknown key, shows that it would.
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DEAD_DSN";
--- request eval
[(AQ::claim_req($::queue)) x (@::malformed_names + 1)]
--- more_headers eval
[(map { AQ::headers($::malformed{$_}) } @::malformed_names),
 AQ::headers($::k{unknown})]
--- error_code eval
[(401) x @::malformed_names, 503]
--- response_headers_like eval
[("WWW-Authenticate: Bearer.*") x @::malformed_names, "Retry-After: \\d+"]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
[(map { "error invalid_api_key\n" } @::malformed_names),
 "error database_unavailable\n"]
--- no_error_log
[alert]
[crit]



=== TEST 4: a well-formed key that the database does not know: 401 invalid_api_key
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
AQ::headers($::k{unknown})
--- error_code: 401
--- response_headers_like
WWW-Authenticate: Bearer.*
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"invalid_api_key","message":"..."},"success":false}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: a revoked key: 401 invalid_api_key, the same answer as an unknown key
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
AQ::headers($::k{revoked})
--- error_code: 401
--- response_headers_like
WWW-Authenticate: Bearer.*
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"invalid_api_key","message":"..."},"success":false}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: an expired key: 401 invalid_api_key; a key that expires tomorrow works
--- request eval
[AQ::claim_req($::queue), AQ::claim_req($::queue)]
--- more_headers eval
[AQ::headers($::k{expired}), AQ::headers($::k{tomorrow})]
--- error_code eval
[401, 200]
--- response_headers_like eval
["WWW-Authenticate: Bearer.*", "Content-Type: application/json(;\\s*charset=utf-8)?"]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["error invalid_api_key\n", "item auth-1 v1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: a key that expires between two requests is refused on the next one
--- request eval
[AQ::claim_req($::queue), AQ::claim_req($::queue)]
--- more_headers eval
[AQ::headers($::k{expiring}), AQ::headers($::k{expiring})]
--- error_code eval
[200, 401]
--- response_body_filters eval
[[\&AQ::brief, AQ::then(sub { AQ::expire_key($::k{expiring}) })], [\&AQ::brief]]
--- response_body eval
["item auth-2 v1\n", "error invalid_api_key\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: the key never reaches the error log (info level): claimed, revoked, unknown, malformed, bad body
--- log_level: info
--- request eval
[AQ::claim_req($::queue), AQ::claim_req($::queue), AQ::claim_req($::queue),
 AQ::claim_req($::queue), AQ::post_req('{"queue_id": nope}'),
 AQ::claim_req(AQ::random_uuid())]
--- more_headers eval
[AQ::headers($::k{logged}), AQ::headers($::k{revoked}), AQ::headers($::k{unknown}),
 AQ::headers($::malformed{'bad checksum'}), AQ::headers($::k{logged}),
 AQ::headers($::k{logged})]
--- error_code eval
[200, 401, 401, 401, 400, 404]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["item auth-3 v1\n", "error invalid_api_key\n", "error invalid_api_key\n",
 "error invalid_api_key\n", "error invalid_json\n", "error queue_not_found\n"]
--- no_error_log eval
[AQ::secret_parts($::k{logged}), AQ::secret_parts($::k{revoked}),
 AQ::secret_parts($::k{unknown}), substr($::malformed{'bad checksum'}, 12),
 '[alert]', '[crit]']



=== TEST 9: the key never reaches the error log when the database is down (info level)
--- log_level: info
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DEAD_DSN";
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
AQ::headers($::k{logged})
--- error_code: 503
--- response_body_filters eval
\&AQ::brief
--- response_body
error database_unavailable
--- no_error_log eval
[AQ::secret_parts($::k{logged}), '[alert]', '[crit]']



=== TEST 10: at debug level, only nginx's own dump of the request headers shows the key
nginx built --with-debug logs every request header at debug level; the
module itself must not log the key.
--- log_level: debug
--- request eval
[AQ::claim_req($::queue), AQ::claim_req($::queue), AQ::claim_req($::queue)]
--- more_headers eval
[AQ::headers($::k{logged2}), AQ::headers($::k{revoked}),
 AQ::headers($::malformed{'bad checksum'})]
--- error_code eval
[200, 401, 401]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["item auth-4 v1\n", "error invalid_api_key\n", "error invalid_api_key\n"]
--- no_error_log eval
[(map { my $s = $_; qr/^(?!.*http header: "Authorization: Bearer ).*\Q$s\E/ }
      AQ::secret_parts($::k{logged2}), AQ::secret_parts($::k{revoked}),
      substr($::malformed{'bad checksum'}, 12)),
 '[error]', '[alert]', '[crit]']



=== TEST 11: "Bearer<key>" without a space: 401 invalid_authorization, even for a valid key; WWW-Authenticate names no invalid token
The key glued to the scheme is not read as a key: a valid one would be
claimed (200) if it were.
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
"Authorization: Bearer$::k{good}\nContent-Type: application/json"
--- error_code: 401
--- response_headers_like
WWW-Authenticate: Bearer realm="annotation_queue"
Cache-Control: no-store
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"invalid_authorization","message":"..."},"success":false}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: the scheme is case-insensitive (RFC 9110): "bearer <key>" and "BEARER <key>" claim
--- pipelined_requests eval
[AQ::claim_req($::queue), AQ::claim_req($::queue)]
--- more_headers eval
["Authorization: bearer $::k{lower}\nContent-Type: application/json",
 "Authorization: BEARER $::k{upper}\nContent-Type: application/json"]
--- error_code eval
[200, 200]
--- response_body_filters eval
\&AQ::brief
--- response_body_like eval
[qr/^item auth-\d+ v1$/, qr/^item auth-\d+ v1$/]
--- no_error_log
[error]
[alert]
[crit]
