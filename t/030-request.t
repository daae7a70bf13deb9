# The request: method, body size, body JSON, queue_id, and the order in
# which these checks are made (method, Authorization, body size, JSON, then
# the database).
use strict;
use warnings;

use lib 't/lib';
use AQ;
use Test::Nginx::Socket 'no_plan';

our $org = AQ::org('request');
our $queue = AQ::queue($org, 'request');
AQ::enqueue_many($queue, 50, prefix => 'req');
our $small = AQ::queue($org, 'small-bodies');
AQ::enqueue_many($small, 5, prefix => 'small');

our %k;
sub key_of { my ($name) = @_; return $k{$name} //= AQ::key($org, rater => $name) }

our $revoked = AQ::key($org, rater => 'revoked');
AQ::revoke($revoked);
our $unknown = AQ::well_formed_key();

# A claim body of exactly $len bytes: {"queue_id":"..."} padded with spaces.
sub body_of_length {
    my ($len, $q) = @_;
    my $head = qq({"queue_id":"$q");
    return $head . (' ' x ($len - length($head) - 1)) . '}';
}

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: GET, PUT, DELETE, PATCH, OPTIONS: 405 method_not_allowed with Allow: POST, before authentication
--- request eval
["GET $AQ::URI", "PUT $AQ::URI\n{\"queue_id\":\"$::queue\"}", "DELETE $AQ::URI",
 "PATCH $AQ::URI\n{\"queue_id\":\"$::queue\"}", "OPTIONS $AQ::URI"]
--- error_code eval
[(405) x 5]
--- response_headers_like eval
[("Allow: POST") x 5]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[(qq({"error":{"code":"method_not_allowed","message":"..."},"success":false}\n)) x 5]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: HEAD: 405 with Allow: POST, and no body
--- request eval
"HEAD $AQ::URI"
--- error_code: 405
--- response_headers_like
Allow: POST
--- response_body eval
""
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: a body that is not JSON: 400 invalid_json
--- request eval
[map { AQ::post_req($_) }
 'hello',
 qq({"queue_id": "$::queue"),
 qq({'queue_id': '$::queue'}),
 qq({"queue_id": "$::queue"} trailing),
 qq({"queue_id": "$::queue"}{"queue_id": "$::queue"}),
 qq({"queue_id": "$::queue",}),
 qq({queue_id: "$::queue"})]
--- more_headers eval
AQ::headers(::key_of('json'))
--- error_code eval
[(400) x 7]
--- response_headers_like eval
[("Content-Type: application/json(;\\s*charset=utf-8)?") x 7]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[(qq({"error":{"code":"invalid_json","message":"..."},"success":false}\n)) x 7]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: JSON that is not an object: 400 invalid_request
--- request eval
[map { AQ::post_req($_) } '[]', qq(["$::queue"]), qq("$::queue"), '42', 'null', 'true']
--- more_headers eval
AQ::headers(::key_of('json'))
--- error_code eval
[(400) x 6]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[(qq({"error":{"code":"invalid_request","message":"..."},"success":false}\n)) x 6]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: an object without queue_id: 400 missing_queue_id
--- request eval
[map { AQ::post_req($_) } '{}', qq({"queue": "$::queue"}), qq({"Queue_Id": "$::queue"}),
 qq({"item": {"queue_id": "$::queue"}})]
--- more_headers eval
AQ::headers(::key_of('json'))
--- error_code eval
[(400) x 4]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[(qq({"error":{"code":"missing_queue_id","message":"..."},"success":false}\n)) x 4]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 6: queue_id that is not a UUID string in 8-4-4-4-12 form: 400 invalid_queue_id
--- request eval
my $q = $::queue;
(my $nodash = $q) =~ s/-//g;
(my $moved = $nodash) =~ s/^(.{4})(.{8})(.{4})(.{4})(.{12})$/$1-$2-$3-$4-$5/;
[map { AQ::post_req(qq({"queue_id": $_})) }
 '42', 'null', 'true', qq(["$q"]), qq({"id": "$q"}), '""', '"not-a-uuid"',
 qq("$nodash"), qq("{$q}"), qq("urn:uuid:$q"), '"' . substr($q, 0, 35) . 'g"',
 qq("${q}0"), '"' . substr($q, 0, 35) . '"', qq(" $q"), qq("$moved")]
--- more_headers eval
AQ::headers(::key_of('json'))
--- error_code eval
[(400) x 15]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
[("error invalid_queue_id\n") x 15]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 7: an uppercase UUID is a UUID: it names the same queue
--- request eval
AQ::post_req(qq({"queue_id": "@{[uc $::queue]}"}))
--- more_headers eval
AQ::headers(::key_of('uppercase'))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item req-1 v1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 8: the body may carry other members and whitespace; Content-Type is not required
--- request eval
[AQ::post_req(qq({\n  "note": {"x": [1, 2]},\n  "queue_id" :\t"$::queue"\n}\n)),
 AQ::claim_req($::queue)]
--- more_headers eval
[AQ::headers(::key_of('members')), "Authorization: Bearer " . ::key_of('no-content-type')]
--- error_code eval
[200, 200]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["item req-2 v1\n", "item req-3 v1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 9: invalid UTF-8 in the body: 400 invalid_json
--- request eval
[map { AQ::post_req($_) }
 qq({"queue_id": "$::queue", "note": "\xff"}),
 qq({"queue_id": "$::queue", "note": "\xc3\x28"}),
 qq({"queue_id": "$::queue", "note": "\xc0\xaf"}),
 qq({"queue_id": "$::queue", "note": "\xed\xa0\x80"}),
 qq({"queue_id": "$::queue", "note": "\xf4\x90\x80\x80"}),
 qq({"queue_id": "$::queue", "note": "\xe2\x82"}),
 qq({"queue_id\xe9": "$::queue"})]
--- more_headers eval
AQ::headers(::key_of('utf8'))
--- error_code eval
[(400) x 7]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[(qq({"error":{"code":"invalid_json","message":"..."},"success":false}\n)) x 7]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 10: valid UTF-8 elsewhere in the body is fine
--- request eval
AQ::post_req(qq({"note": "Ünïcödé 日本語 😀 \\ud83d\\ude00", "queue_id": "$::queue"}))
--- more_headers eval
AQ::headers(::key_of('utf8-ok'))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item req-4 v1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 11: a NUL in the body, escaped or raw: 400 invalid_json
--- request eval
[map { AQ::post_req($_) }
 qq({"queue_id": "$::queue\\u0000"}),
 qq({"queue_id": "$::queue", "note": "a\\u0000b"}),
 qq({"queue_id": "$::queue\x00"}),
 qq({"queue_id": "$::queue"}\x00),
 qq({"queue_id": "$::queue", "n\\u0000": 1})]
--- more_headers eval
AQ::headers(::key_of('nul'))
--- error_code eval
[(400) x 5]
--- response_body_filters eval
\&AQ::canon
--- response_body eval
[(qq({"error":{"code":"invalid_json","message":"..."},"success":false}\n)) x 5]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 12: an empty body (Content-Length: 0): 400 invalid_json
--- raw_request eval
AQ::raw_post(key => ::key_of('empty'), body => '')
--- error_code: 400
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"invalid_json","message":"..."},"success":false}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 13: no body at all (no Content-Length): 400 invalid_json
--- raw_request eval
AQ::raw_post(key => ::key_of('empty'))
--- error_code: 400
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"invalid_json","message":"..."},"success":false}
--- no_error_log
[error]
[alert]
[crit]



=== TEST 14: a body of only whitespace: 400 invalid_json
--- raw_request eval
AQ::raw_post(key => ::key_of('empty'), body => " \r\n\t ")
--- error_code: 400
--- response_body_filters eval
\&AQ::brief
--- response_body
error invalid_json
--- no_error_log
[error]
[alert]
[crit]



=== TEST 15: a body of exactly 4k (the default annotation_queue_max_body_size) is read
--- raw_request eval
AQ::raw_post(key => ::key_of('4k'), body => ::body_of_length(4096, $::queue))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item req-5 v1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 16: a Content-Length over 4k: 413 body_too_large
--- raw_request eval
AQ::raw_post(key => ::key_of('4k+1'), body => ::body_of_length(4097, $::queue))
--- error_code: 413
--- response_headers_like
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"body_too_large","message":"..."},"success":false}
--- no_error_log
[alert]
[crit]



=== TEST 17: a Content-Length over the limit is refused at once, without waiting for the body
The request announces 100 kB and sends 20 bytes: the answer must come
within a second, without the rest of the body (after it nginx may linger
before closing: --- abort).
--- raw_request eval
AQ::raw_post(key => ::key_of('huge'), body => '{"queue_id": "x"}   ', length => 100_000)
--- abort
--- timeout: 1
--- error_code: 413
--- response_body_filters eval
\&AQ::brief
--- response_body
error body_too_large
--- no_error_log
[alert]
[crit]



=== TEST 18: a Content-Length over nginx's own client_max_body_size (1m, its default) gets the same JSON 413
Test::Nginx raises client_max_body_size to 30M; this block puts back
nginx's default.
--- config
    location = /api/v1/annotations/queue {
        client_max_body_size 1m;
        annotation_queue_claim;
    }
--- raw_request eval
AQ::raw_post(key => ::key_of('huge'), body => '{"queue_id": "x"}   ', length => 2_000_000)
--- abort
--- timeout: 1
--- error_code: 413
--- response_headers_like
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"body_too_large","message":"..."},"success":false}
--- no_error_log
[alert]
[crit]



=== TEST 19: annotation_queue_max_body_size applies: 100 bytes pass, 101 bytes get 413
--- config
    location = /api/v1/annotations/queue {
        annotation_queue_max_body_size 100;
        annotation_queue_claim;
    }
--- request eval
["POST $AQ::URI\n" . ::body_of_length(100, $::small),
 "POST $AQ::URI\n" . ::body_of_length(101, $::small)]
--- more_headers eval
[AQ::headers(::key_of('100')), AQ::headers(::key_of('101'))]
--- error_code eval
[200, 413]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["item small-1 v1\n", "error body_too_large\n"]
--- no_error_log
[alert]
[crit]



=== TEST 20: a chunked body within the limit is read
--- raw_request eval
AQ::raw_post(key => ::key_of('chunked'),
             chunks => ['{"queue_', qq(id": "$::queue"), '}'])
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item req-6 v1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 21: a chunked body over the limit: 413 body_too_large
--- raw_request eval
AQ::raw_post(key => ::key_of('chunked-big'),
             chunks => [qq({"queue_id": "$::queue"), (' ' x 1000) x 5, '}'])
--- error_code: 413
--- response_headers_like
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"body_too_large","message":"..."},"success":false}
--- no_error_log
[alert]
[crit]



=== TEST 22: a chunked body over nginx's own client_max_body_size (1m) gets the same JSON 413
--- config
    location = /api/v1/annotations/queue {
        client_max_body_size 1m;
        annotation_queue_claim;
    }
--- raw_request eval
AQ::raw_post(key => ::key_of('chunked-huge'),
             chunks => [qq({"queue_id": "$::queue"), (' ' x 10_000) x 110, '}'])
--- abort
--- timeout: 2
--- error_code: 413
--- response_headers_like
Content-Type: application/json(;\s*charset=utf-8)?
--- response_body_filters eval
\&AQ::brief
--- response_body
error body_too_large
--- no_error_log
[alert]
[crit]



=== TEST 23: order: the method comes first (GET with a malformed key and no body: 405)
--- request eval
"GET $AQ::URI"
--- more_headers
Authorization: Bearer nonsense
--- error_code: 405
--- response_headers_like
Allow: POST
--- response_body_filters eval
\&AQ::brief
--- response_body
error method_not_allowed
--- no_error_log
[error]
[alert]
[crit]



=== TEST 24: order: Authorization before body size (oversized body: 401 missing_api_key, 401 invalid_api_key)
--- request eval
[("POST $AQ::URI\n" . ::body_of_length(5000, $::queue)) x 2]
--- more_headers eval
["Content-Type: application/json", "Authorization: Bearer aqk_0123"]
--- error_code eval
[401, 401]
--- response_headers_like eval
[("WWW-Authenticate: Bearer.*") x 2]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["error missing_api_key\n", "error invalid_api_key\n"]
--- no_error_log
[alert]
[crit]



=== TEST 25: order: a malformed key is refused before the body is parsed (invalid JSON: 401)
--- request eval
AQ::post_req('{"queue_id": ')
--- more_headers
Authorization: Bearer aqk_0123
--- error_code: 401
--- response_body_filters eval
\&AQ::brief
--- response_body
error invalid_api_key
--- no_error_log
[error]
[alert]
[crit]



=== TEST 26: order: body size before JSON (oversized invalid JSON: 413)
--- request eval
"POST $AQ::URI\n" . ('[' x 5000)
--- more_headers eval
AQ::headers(::key_of('order'))
--- error_code: 413
--- response_body_filters eval
\&AQ::brief
--- response_body
error body_too_large
--- no_error_log
[alert]
[crit]



=== TEST 27: order: the body before the database (unknown or revoked key with a bad body: 400)
--- request eval
[AQ::post_req('not json'), AQ::post_req('{}'), AQ::post_req('{"queue_id": 1}'),
 AQ::post_req('[]')]
--- more_headers eval
[AQ::headers($::unknown), AQ::headers($::revoked), AQ::headers($::unknown),
 AQ::headers($::revoked)]
--- error_code eval
[400, 400, 400, 400]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["error invalid_json\n", "error missing_queue_id\n", "error invalid_queue_id\n",
 "error invalid_request\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 28: order: in the database, the key before the queue (unknown key, unknown queue: 401)
--- request eval
[AQ::claim_req(AQ::random_uuid()), AQ::claim_req(AQ::random_uuid())]
--- more_headers eval
[AQ::headers($::unknown), AQ::headers($::revoked)]
--- error_code eval
[401, 401]
--- response_body_filters eval
\&AQ::brief
--- response_body eval
["error invalid_api_key\n", "error invalid_api_key\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 29: a body nginx buffered to a temporary file (client_body_buffer_size 16) is read from it
--- config
    location = /api/v1/annotations/queue {
        client_body_buffer_size 16;
        annotation_queue_claim;
    }
--- request eval
"POST $AQ::URI\n" . ::body_of_length(4000, $::small)
--- more_headers eval
AQ::headers(::key_of('temp-file'))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item small-2 v1
--- error_log
a client request body is buffered to a temporary file
--- no_error_log
[error]
[alert]
[crit]



=== TEST 30: invalid JSON in a temporary file: 400 invalid_json
--- config
    location = /api/v1/annotations/queue {
        client_body_buffer_size 16;
        annotation_queue_claim;
    }
--- request eval
AQ::post_req('{"queue_id": "' . ('x' x 3000))
--- more_headers eval
AQ::headers(::key_of('temp-file-bad'))
--- error_code: 400
--- response_body_filters eval
\&AQ::brief
--- response_body
error invalid_json
--- error_log
a client request body is buffered to a temporary file
--- no_error_log
[error]
[alert]
[crit]



=== TEST 31: a chunked body buffered to a temporary file is read from it
--- config
    location = /api/v1/annotations/queue {
        client_body_buffer_size 16;
        annotation_queue_claim;
    }
--- raw_request eval
AQ::raw_post(key => ::key_of('temp-chunked'),
             chunks => ['{"queue_id"', ': ', qq("$::small"), ' ' x 3000, '}'])
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item small-3 v1
--- error_log
a client request body is buffered to a temporary file
--- no_error_log
[error]
[alert]
[crit]



=== TEST 32: client_body_in_file_only: the body is read from its file
--- config
    location = /api/v1/annotations/queue {
        client_body_in_file_only clean;
        annotation_queue_claim;
    }
--- request eval
AQ::claim_req($::small)
--- more_headers eval
AQ::headers(::key_of('file-only'))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item small-4 v1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 33: an Authorization header of 8000 bytes (inside nginx's 8k header buffers): 401 invalid_api_key
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
"Authorization: Bearer aqk_" . ('0' x 7970)
--- error_code: 401
--- response_headers_like
WWW-Authenticate: Bearer.*
--- response_body_filters eval
\&AQ::brief
--- response_body
error invalid_api_key
--- no_error_log
[error]
[alert]
[crit]



=== TEST 34: three headers of 7000 bytes before a valid key (4 large buffers of 8k): the claim is served
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
CORE::join("\n", map({ "X-Padding-$_: " . ('p' x 7000) } 1 .. 3),
     AQ::headers(::key_of('many-headers')))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item req-7 v1
--- no_error_log
[error]
[alert]
[crit]



=== TEST 35: a header line over large_client_header_buffers: nginx's own 400 before any location is chosen, never a 5xx
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
"Authorization: Bearer aqk_" . ('0' x 9000)
--- error_code: 400
--- response_headers_like
Content-Type: text/html
--- error_log
client sent too long header line
--- no_error_log
[alert]
[crit]



=== TEST 36: the same with the README's server-level error_page: the 400 is JSON
--- config
    error_page 494 = @annotation_queue_header_too_large;

    location @annotation_queue_header_too_large {
        default_type application/json;
        return 400 '{"success":false,"error":{"code":"header_too_large","message":"a request header is larger than the server accepts"}}\n';
    }

    location = /api/v1/annotations/queue {
        annotation_queue_claim;
    }
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
"Authorization: Bearer aqk_" . ('0' x 9000)
--- error_code: 400
--- response_body_filters eval
\&AQ::canon
--- response_body
{"error":{"code":"header_too_large","message":"..."},"success":false}
--- error_log
client sent too long header line
--- no_error_log
[alert]
[crit]



=== TEST 37: a malformed header line: nginx's own 400 before any location is chosen (HTML, as for header lines too long), never a 5xx
Inside the module's locations nginx's own 400 (an invalid chunked body) is
the JSON bad_request: t/095-logging.t TEST 4.
--- raw_request eval
"POST $AQ::URI HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
. "Authorization: Bearer aqk_0123\r\nNo colon in this header line\r\n"
. "Content-Length: 2\r\n\r\n{}"
--- error_code: 400
--- response_headers_like
Content-Type: text/html
--- error_log
client sent invalid header line
--- no_error_log
[alert]
[crit]
