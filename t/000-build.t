# The module loads; its directives are accepted where documented (http,
# server, location) and merge down; invalid values make the configuration
# fail.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use Test::Nginx::Socket 'no_plan';

our $org = AQ::org('build');
our %k;
sub key_of { my ($name) = @_; return $k{$name} //= AQ::key($org, rater => $name) }
our $queue = AQ::queue($org, 'build', lease => undef);
AQ::enqueue_many($queue, 20, prefix => 'build');

# nginx -t, outside Test::Nginx: every directive at every level.
{
    my ($rc, $out) = AQ::nginx_test_config(http => <<'_EOC_', location => <<'_EOC_');
    annotation_queue_pool_size 4;
    annotation_queue_max_waiting 16;
    annotation_queue_connect_timeout 2s;
    annotation_queue_query_timeout 3s;
    annotation_queue_max_body_size 2k;
    annotation_queue_lease 10m;
_EOC_
            annotation_queue_database "host=127.0.0.1 port=5432 user=nobody dbname=elsewhere";
            annotation_queue_pool_size 2;
            annotation_queue_max_waiting 0;
            annotation_queue_connect_timeout 500ms;
            annotation_queue_query_timeout 1s;
            annotation_queue_max_body_size 512;
            annotation_queue_lease 1h;
_EOC_
    is($rc, 0, 'nginx -t accepts every directive at http and location level')
        or diag $out;
    like($out, qr/syntax is ok/, 'nginx -t: syntax is ok');

    unlike($out, qr/blocking call/, 'nginx -t: no warning for an IP address');

    # host names: libpq resolves them with a blocking call, nginx -t says so
    # (and accepts the configuration); addresses, sockets, localhost and
    # hostaddr pass quietly
    ($rc, $out) = AQ::nginx_test_config(
        dsn => 'host=db.invalid,127.0.0.1,::1,/run/postgresql,localhost user=x');
    is($rc, 0, 'nginx -t accepts a host name') or diag $out;
    my @warned = $out =~ /\[warn\] [^"]*"annotation_queue_database" names host "([^"]*)": libpq resolves it with a blocking call/g;
    is_deeply(\@warned, ['db.invalid'], 'nginx -t warns of the host name, and of it only')
        or diag $out;
    ($rc, $out) = AQ::nginx_test_config(
        dsn => 'postgresql://user@db.invalid:5432/x');
    like($out, qr/names host "db\.invalid"/, 'nginx -t warns of a host name in a URI')
        or diag $out;
    ($rc, $out) = AQ::nginx_test_config(dsn => 'host=db.invalid hostaddr=10.0.0.1 user=x');
    unlike($out, qr/blocking call/, 'nginx -t: no warning when hostaddr is given')
        or diag $out;

    ($rc, $out) = AQ::nginx_test_config(http => '    annotation_queue_pool_size many;');
    isnt($rc, 0, 'nginx -t refuses annotation_queue_pool_size many');
    like($out, qr/annotation_queue_pool_size/, 'nginx -t names the directive')
        or diag $out;
}

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: the module loads; every directive at http level; a claim works
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size 4;
    annotation_queue_max_waiting 16;
    annotation_queue_connect_timeout 2s;
    annotation_queue_query_timeout 3s;
    annotation_queue_max_body_size 2k;
    annotation_queue_lease 10m;
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
AQ::headers(::key_of('http'))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item build-1 v1
--- no_error_log
[error]
[alert]
[crit]
[emerg]



=== TEST 2: directives at server and location level; location settings win (lease 1m, max body 64)
--- http_config
--- config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size 2;
    annotation_queue_lease 10m;
    location = /api/v1/annotations/queue {
        annotation_queue_query_timeout 3s;
        annotation_queue_lease 1m;
        annotation_queue_max_body_size 64;
        annotation_queue_claim;
    }
--- request eval
[AQ::claim_req($::queue), AQ::post_req(qq({"queue_id": "$::queue", "pad": "@{['x' x 40]}"}))]
--- more_headers eval
[AQ::headers(::key_of('location')), AQ::headers(::key_of('location'))]
--- error_code eval
[200, 413]
--- response_body_filters eval
[[\&AQ::lease], [\&AQ::brief]]
--- response_body eval
["lease 60s\n", "error body_too_large\n"]
--- no_error_log
[error]
[alert]
[crit]
[emerg]



=== TEST 3: a location's annotation_queue_database overrides the http one (which points nowhere)
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DEAD_DSN";
--- config
    location = /api/v1/annotations/queue {
        annotation_queue_database "$TEST_NGINX_AQ_DSN";
        annotation_queue_claim;
    }
--- request eval
AQ::claim_req($::queue)
--- more_headers eval
AQ::headers(::key_of('override'))
--- error_code: 200
--- response_body_filters eval
\&AQ::brief
--- response_body
item build-3 v1
--- no_error_log
[alert]
[crit]
[emerg]



=== TEST 4: annotation_queue_pool_size: not a number
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size many;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_pool_size"/



=== TEST 5: annotation_queue_pool_size: 0 (a pool without connections)
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_pool_size 0;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*nginx\.conf:\d+/



=== TEST 6: annotation_queue_max_waiting: not a number
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_max_waiting -1;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_max_waiting"/



=== TEST 7: annotation_queue_connect_timeout: not a time
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_connect_timeout soon;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_connect_timeout"/



=== TEST 8: annotation_queue_query_timeout: not a time
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_query_timeout 5parsecs;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_query_timeout"/



=== TEST 9: annotation_queue_max_body_size: not a size
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_max_body_size 4x;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_max_body_size"/



=== TEST 10: annotation_queue_lease: not a time
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_lease forever;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_lease"/



=== TEST 11: annotation_queue_database: a conninfo that libpq cannot parse
--- http_config
    annotation_queue_database "host=127.0.0.1 port";
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*annotation_queue_database/



=== TEST 12: annotation_queue_database: two arguments
--- http_config
    annotation_queue_database "host=127.0.0.1" "port=5432";
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_database"/



=== TEST 13: annotation_queue_claim takes no argument
--- config
    location = /api/v1/annotations/queue {
        annotation_queue_claim yes;
    }
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_claim"/



=== TEST 14: annotation_queue_claim is a location directive, not an http one
--- http_config
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
    annotation_queue_claim;
--- request
GET /
--- must_die
--- suppress_stderr
--- error_log eval
qr/\[emerg\].*"annotation_queue_claim" directive is not allowed here/
