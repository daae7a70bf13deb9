# The HTTP contract: openapi.yaml describes every answer of the claim,
# extend, release and complete endpoints and of the status page, and the
# module answers as described.
#
# One nginx serves the documented paths in several virtual servers (by
# Host), each configured to bring about some of the answers: api.test, the
# README's configuration with a generous per-key limit (so that the
# RateLimit headers show); dead.test, a database nobody listens for;
# saturated.test, one connection and no wait list; slow.test, a 1 s query
# timeout; trickle.test, a 1 s client_body_timeout; limited.test, a
# per-key limit of 1r/m; limit-req-503.test and
# limit-req-429.test, nginx's limit_req with its default 503 and with 429.
# A trigger in the suite's database makes PostgreSQL refuse chosen items
# (500) or hold every update at a gate (pool_saturated, query_timeout).
#
# Every answer the suite receives, fixtures included, is validated against
# openapi.yaml (t/lib/AQ/Contract.pm: JSON::Validator's OpenAPI 3 support,
# plus statuses and headers the description lacks); at the end, every
# documented (path, method, status), and every error code documented for
# it, must have been produced.  The suite also shows that the check fails
# on descriptions that lack a member, a header, a code or a status.
#
# AQ_CONTRACT_OPENAPI=<file> checks the module against another description
# (to see the suite fail on one that lacks something).
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Contract;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use JSON::PP ();
use Test::More;
use Time::HiRes ();

my $contract = AQ::Contract->new;
my $JSON = JSON::PP->new->utf8->canonical;

my %URI = (
    claim    => '/api/v1/annotations/queue',
    extend   => '/api/v1/annotations/extend',
    release  => '/api/v1/annotations/release',
    complete => '/api/v1/annotations/complete',
    skip     => '/api/v1/annotations/skip',
);
my @ITEM_ACTIONS = qw(extend release complete skip);
my @ACTIONS = ('claim', @ITEM_ACTIONS);
my $STATUS_URI = '/internal/annotation-queue/metrics';

# ---------------------------------------------------------------------------
# The description itself

is_deeply([$contract->spec_errors], [],
          'openapi.yaml is a valid OpenAPI 3.0 document (the 3.0 meta-schema)');

{
    my @bad;
    my $schema = $contract->schema;
    my $paths = $schema->get(['paths']);
    for my $path (sort keys %$paths) {
        for my $method (sort keys %{ $paths->{$path} }) {
            my $op = $paths->{$path}{$method};
            my @media;
            if (my $rb = $op->{requestBody}) {
                push @media, map { ["$method $path request $_",
                                    $rb->{content}{$_}] }
                             sort keys %{ $rb->{content} };
            }
            for my $status (sort keys %{ $op->{responses} }) {
                my $r = $op->{responses}{$status};
                push @media, map { ["$method $path $status $_",
                                    $r->{content}{$_}] }
                             sort keys %{ $r->{content} || {} };
                for my $h (sort keys %{ $r->{headers} || {} }) {
                    my $ho = $r->{headers}{$h};
                    next unless exists $ho->{example};
                    push @bad,
                        map { "$method $path $status header $h example: $_" }
                        $schema->validate($ho->{example}, $ho->{schema});
                }
            }
            for my $m (@media) {
                my ($where, $media) = @$m;
                my @ex;
                push @ex, ['example', $media->{example}]
                    if exists $media->{example};
                push @ex, map { ["examples/$_", $media->{examples}{$_}{value}] }
                          sort keys %{ $media->{examples} || {} };
                push @bad, "$where has no example" unless @ex;
                for my $ex (@ex) {
                    push @bad, map { "$where $ex->[0]: $_" }
                               $schema->validate($ex->[1], $media->{schema});
                }
            }
        }
    }
    is_deeply(\@bad, [], 'every request and answer has an example, '
                         . 'and each example is valid');
}

# ---------------------------------------------------------------------------
# nginx: the documented paths in several virtual servers

my $port = AQ::free_port();
my $query_timeout_ms = 1000 * AQ::slow();
my $long_ms = 30000 * AQ::slow();
my $body_timeout_ms = 1000 * AQ::slow();

sub endpoints {
    my ($indent) = @_;
    return join '', map {
        "${indent}location = $URI{$_} { annotation_queue_$_; }\n"
    } @ACTIONS;
}

sub server {
    my ($name, $directives, %o) = @_;
    my $endpoints = endpoints('        ');
    return <<"_EOC_";
    server {
        listen 127.0.0.1:$port;
        server_name $name;
$directives
$endpoints
    }
_EOC_
}

my $ep_nested = endpoints('            ');
my $http = <<"_EOC_";
    annotation_queue_limit_zone zone=contract:1m rate=1000r/s;
    annotation_queue_limit_zone zone=tight:1m rate=1r/m;
    limit_req_zone \$binary_remote_addr zone=contract503:1m rate=1r/m;
    limit_req_zone \$binary_remote_addr zone=contract429:1m rate=1r/m;

    # the README's configuration (the default server of the port)
    server {
        listen 127.0.0.1:$port;
        server_name api.test;
        client_max_body_size 8k;

        location /api/v1/annotations/ {
            annotation_queue_limit zone=contract burst=100000;

$ep_nested
        }

        location = $STATUS_URI {
            annotation_queue_status;
        }
    }
_EOC_
$http .= server('dead.test',
                qq{        annotation_queue_database "$AQ::DEAD_DSN";});
$http .= server('saturated.test', <<"_EOC_");
        annotation_queue_pool_size 1;
        annotation_queue_max_waiting 0;
        annotation_queue_query_timeout ${long_ms}ms;
_EOC_
$http .= server('slow.test', <<"_EOC_");
        annotation_queue_pool_size 4;
        annotation_queue_connect_timeout ${long_ms}ms;
        annotation_queue_query_timeout ${query_timeout_ms}ms;
_EOC_
$http .= server('trickle.test', <<"_EOC_");
        client_body_timeout ${body_timeout_ms}ms;
_EOC_
$http .= server('limited.test',
                '        annotation_queue_limit zone=tight;');
$http .= server('limit-req-503.test',
                '        limit_req zone=contract503;');
$http .= server('limit-req-429.test', <<'_EOC_');
        limit_req zone=contract429;
        limit_req_status 429;
_EOC_

my $ngx = AQ::start_nginx(http => $http);

# nginx listens on our port too once the workers are up
{
    my $deadline = Time::HiRes::time() + 10 * AQ::slow();
    until (IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                 Proto => 'tcp'))
    {
        BAIL_OUT("nginx does not listen on $port")
            if Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
}

# ---------------------------------------------------------------------------
# Fixtures: the suite's own database

my $org   = AQ::org('contract');
my $other = AQ::org('contract-other');

sub queue_with {
    my ($n, %o) = @_;
    my $q = AQ::queue($o{org} // $org);
    AQ::enqueue($q, undef, { n => $_, text => "item $_" }) for 1 .. $n;
    return $q;
}

# A trigger on items, in this suite's database only: an UPDATE of an item
# listed in public.contract_fail raises an error (the statement fails in
# PostgreSQL: 500 internal_error), and every UPDATE of an item first takes a
# share lock on public.contract_gate's row, which close_gate() holds FOR
# UPDATE in another session: the statements block in the executor, their
# connections busy, until open_gate().
AQ::dbh()->do($_) for
    'CREATE TABLE public.contract_fail (id uuid PRIMARY KEY)',
    'CREATE TABLE public.contract_gate (id int PRIMARY KEY)',
    'INSERT INTO public.contract_gate VALUES (1)',
    <<'_SQL_',
CREATE FUNCTION public.contract_fault() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.contract_fail WHERE id = NEW.id) THEN
        RAISE EXCEPTION 'contract test: this item refuses updates';
    END IF;
    PERFORM 1 FROM public.contract_gate WHERE id = 1 FOR SHARE;
    RETURN NEW;
END
$$
_SQL_
    'CREATE TRIGGER contract_fault BEFORE UPDATE ON annotation_queue.items '
        . 'FOR EACH ROW EXECUTE FUNCTION public.contract_fault()';

sub fail_item {
    AQ::dbh()->do('INSERT INTO public.contract_fail VALUES (?)', undef, $_[0]);
}

my $gate;
sub close_gate {
    $gate ||= AQ::new_session();
    $gate->begin_work;
    $gate->do('SELECT 1 FROM public.contract_gate WHERE id = 1 FOR UPDATE');
}
sub open_gate { $gate->rollback if $gate && !$gate->{AutoCommit} }

# nginx's backends of this database waiting on a lock
sub blocked_backends {
    return scalar AQ::dbh()->selectrow_array(
        q{SELECT count(*) FROM pg_stat_activity
           WHERE datname = current_database()
             AND application_name = 'nginx_annotation_queue'
             AND wait_event_type = 'Lock'});
}

# ---------------------------------------------------------------------------
# Requests and their checks

my @secrets;    # of every key the suite used: never in the error log

sub key {
    my ($o) = @_;
    my $k = AQ::key($o // $org);
    push @secrets, AQ::secret_parts($k);
    return $k;
}

sub body_of {
    my ($h, %more) = @_;
    return $JSON->encode({ item_id => $h->{id}, version => $h->{version},
                           %more });
}

sub claim_body { return $JSON->encode({ queue_id => $_[0] }) }

# A body each endpoint accepts, for requests refused before the database
# looks at it.
sub valid_body {
    my ($action) = @_;
    return $action eq 'claim' ? claim_body($_[1])
                              : qq({"item_id":"$_[1]","version":1});
}

# One request, its status and error code as expected, and the answer as
# openapi.yaml describes it: one test.
sub answer {
    my ($name, $req, $status, $code) = @_;
    my $res = AQ::Contract::request($port, %$req);
    return verify($name, $res, $status, $code);
}

sub verify {
    my ($name, $res, $status, $code) = @_;
    my @p = $contract->check($res);
    push @p, "status $res->{status}, expected $status"
        unless $res->{status} == $status;
    my $got = AQ::Contract::code_of($res);
    push @p, 'error code ' . ($got // 'none') . ', expected '
             . ($code // 'none')
        unless ($got // '') eq ($code // '');
    note AQ::Contract::show($res);
    my $what = $code ? "$status $code" : $status;
    ok(!@p, "$name: $what, as openapi.yaml describes")
        or diag join("\n", @p) . "\n" . AQ::Contract::show($res);
    return $res;
}

# A claimed item: { key, id, version, queue }; the claim is checked too.
sub hold {
    my ($why) = @_;
    my $q = queue_with(1);
    my $k = key();
    my $res = answer("claim ($why)",
                     { uri => $URI{claim}, key => $k, body => claim_body($q) },
                     200);
    my $doc = AQ::Contract::json_of($res) || {};
    my $it = ref $doc->{item} eq 'HASH' ? $doc->{item} : {};
    return { key => $k, id => $it->{id} // AQ::random_uuid(),
             version => $it->{version} // 0, queue => $q };
}

# ---------------------------------------------------------------------------
# 200: the whole round

my $round = hold('the round');
my $again = answer('claim again with the same key (a resume)',
                   { uri => $URI{claim}, key => $round->{key},
                     body => claim_body($round->{queue}) }, 200);
is(AQ::Contract::json_of($again)->{item}{id}, $round->{id},
   'claim again: the same item');
ok(defined $again->{headers}{ratelimit},
   'claim again: the key is counted now: RateLimit headers');

answer('extend the held item', { uri => $URI{extend}, key => $round->{key},
                                 body => body_of($round) }, 200);
answer('complete it with a result',
       { uri => $URI{complete}, key => $round->{key},
         body => body_of($round, result => { helpful => JSON::PP::true,
                                             score => 4 }) },
       200);
my $rel = hold('to release');
answer('release a held item', { uri => $URI{release}, key => $rel->{key},
                                body => body_of($rel) }, 200);
my $skp = hold('to skip');
answer('skip a held item', { uri => $URI{skip}, key => $skp->{key},
                             body => body_of($skp) }, 200);
my $nores = hold('to complete without a result');
answer('complete with "result": null',
       { uri => $URI{complete}, key => $nores->{key},
         body => body_of($nores, result => undef) }, 200);

# ---------------------------------------------------------------------------
# 400, 401, 404, 405, 409, 413 on the README's server

my $k = key();
answer('claim an empty queue (the key learned by the rate limit)',
       { uri => $URI{claim}, key => $k, body => claim_body(queue_with(0)) },
       409, 'no_items_available');

my $uuid = AQ::random_uuid();
my %bad_body = (
    invalid_json    => 'not json',
    invalid_request => '[1, 2]',
);
for my $a (@ACTIONS) {
    for my $c (sort keys %bad_body) {
        answer("$a: body " . $bad_body{$c}, { uri => $URI{$a}, key => $k,
                                              body => $bad_body{$c} }, 400, $c);
    }
    answer("$a: a malformed chunked body (nginx's 400)",
           { uri => $URI{$a}, key => $k, raw_body => "zz\r\n{}\r\n0\r\n\r\n" },
           400, 'bad_request');
}
answer('claim: no queue_id', { uri => $URI{claim}, key => $k, body => '{}' },
       400, 'missing_queue_id');
answer('claim: queue_id not a UUID', { uri => $URI{claim}, key => $k,
                                       body => '{"queue_id":"nope"}' },
       400, 'invalid_queue_id');
for my $a (@ITEM_ACTIONS) {
    answer("$a: no item_id",
           { uri => $URI{$a}, key => $k, body => '{"version":1}' },
           400, 'missing_item_id');
    answer("$a: item_id not a UUID", { uri => $URI{$a}, key => $k,
                                       body => '{"item_id":42,"version":1}' },
           400, 'invalid_item_id');
    answer("$a: no version", { uri => $URI{$a}, key => $k,
                               body => qq({"item_id":"$uuid"}) },
           400, 'missing_version');
    answer("$a: version 1.5", { uri => $URI{$a}, key => $k,
                                body => qq({"item_id":"$uuid","version":1.5}) },
           400, 'invalid_version');
    answer("$a: queue_id not a UUID",
           { uri => $URI{$a}, key => $k,
             body => qq({"item_id":"$uuid","version":1,"queue_id":"nope"}) },
           400, 'invalid_queue_id');
}
answer('complete: a result that is not an object',
       { uri => $URI{complete}, key => $k,
         body => qq({"item_id":"$uuid","version":1,"result":[1]}) },
       400, 'invalid_result');

my $revoked = key();
answer('claim with a key about to be revoked',
       { uri => $URI{claim}, key => $revoked, body => claim_body(queue_with(0)) },
       409, 'no_items_available');
AQ::revoke($revoked);

for my $a (@ACTIONS) {
    my $body = valid_body($a, $uuid);
    answer("$a: no Authorization header", { uri => $URI{$a}, body => $body },
           401, 'missing_api_key');
    answer("$a: Authorization: Basic",
           { uri => $URI{$a}, body => $body,
             authorization => 'Basic YWxpY2U6c2VjcmV0' },
           401, 'invalid_authorization');
    answer("$a: a malformed key", { uri => $URI{$a}, body => $body,
                                    key => 'aqk_0123456789' },
           401, 'invalid_api_key');
    answer("$a: a well-formed key the database does not know",
           { uri => $URI{$a}, body => $body, key => AQ::well_formed_key() },
           401, 'invalid_api_key');
    answer("$a: a revoked key the rate limit counts (RateLimit headers on a 401)",
           { uri => $URI{$a}, body => $body, key => $revoked },
           401, 'invalid_api_key');

    for my $m (qw(GET HEAD PUT)) {
        answer("$a: $m", { uri => $URI{$a}, method => $m, key => $k }, 405,
               $m eq 'HEAD' ? undef : 'method_not_allowed');
    }

    answer("$a: a Content-Length over 4k",
           { uri => $URI{$a}, key => $k, body => 'x' x 5000 },
           413, 'body_too_large');
    answer("$a: a chunked body over 4k",
           { uri => $URI{$a}, key => $k, chunks => ['x' x 3000, 'x' x 2000] },
           413, 'body_too_large');
    answer("$a: a chunked body over client_max_body_size (nginx's 413)",
           { uri => $URI{$a}, key => $k, chunks => [('x' x 3000) x 3] },
           413, 'body_too_large');
}

answer('claim: a queue that does not exist',
       { uri => $URI{claim}, key => $k, body => claim_body($uuid) },
       404, 'queue_not_found');
answer("claim: another organisation's queue",
       { uri => $URI{claim}, key => $k,
         body => claim_body(queue_with(1, org => $other)) },
       404, 'queue_not_found');

for my $a (@ITEM_ACTIONS) {
    answer("$a: an item that does not exist",
           { uri => $URI{$a}, key => $k, body => valid_body($a, $uuid) },
           404, 'item_not_found');
    my $h = hold("for a stale $a");
    answer("$a: a version the key does not hold",
           { uri => $URI{$a}, key => $h->{key},
             body => body_of({ %$h, version => $h->{version} + 7 }) },
           409, 'stale_claim');
}

# HEAD: the 405's headers, no body
{
    my $res = AQ::Contract::request($port, uri => $URI{claim}, method => 'HEAD');
    is($res->{body}, '', 'HEAD: no body after the 405 head');
}

# ---------------------------------------------------------------------------
# 408: a body that stops coming (trickle.test: client_body_timeout 1 s)

{
    my %flight;
    for my $a (@ACTIONS) {
        $flight{$a} = AQ::Contract::start_request(
            $port, host => 'trickle.test', uri => $URI{$a}, key => $k,
            body => '{"queue_id":', length => 100,
            timeout => 30);
    }
    for my $a (@ACTIONS) {
        verify("trickle.test: $a whose body stops after 12 of 100 bytes",
               AQ::Contract::finish_request($flight{$a}), 408,
               'request_timeout');
    }
}

# ---------------------------------------------------------------------------
# 429: the per-key limit (limited.test: rate 1r/m, burst 0) and limit_req

my $lk = key();
answer('limited.test: the first claim of a key (not counted yet)',
       { host => 'limited.test', uri => $URI{claim}, key => $lk,
         body => claim_body(queue_with(0)) },
       409, 'no_items_available');
for my $a (@ACTIONS) {
    my $res = answer("limited.test: $a over the key's rate",
                     { host => 'limited.test', uri => $URI{$a}, key => $lk,
                       body => '{}' },
                     429, 'rate_limited');
    like($res->{headers}{'ratelimit-policy'} // '', qr/^"tight";q=1;w=\d+$/,
         "limited.test: $a: RateLimit-Policy names the zone, quota 1");
}

answer('limit-req-429.test: the first request passes limit_req',
       { host => 'limit-req-429.test', uri => $URI{claim}, key => $k,
         body => claim_body(queue_with(0)) },
       409, 'no_items_available');
for my $a (@ACTIONS) {
    answer("limit-req-429.test: $a refused by limit_req (limit_req_status 429)",
           { host => 'limit-req-429.test', uri => $URI{$a}, key => $k,
             body => '{}' },
           429, 'rate_limited');
}

# ---------------------------------------------------------------------------
# 503: limit_req's default status, a dead database

answer('limit-req-503.test: the first request passes limit_req',
       { host => 'limit-req-503.test', uri => $URI{claim}, key => $k,
         body => claim_body(queue_with(0)) },
       409, 'no_items_available');
for my $a (@ACTIONS) {
    answer("limit-req-503.test: $a refused by limit_req",
           { host => 'limit-req-503.test', uri => $URI{$a}, key => $k,
             body => '{}' },
           503, 'service_unavailable');
}

for my $a (@ACTIONS) {
    answer("dead.test: $a while PostgreSQL cannot be reached",
           { host => 'dead.test', uri => $URI{$a}, key => $k,
             body => valid_body($a, $uuid) },
           503, 'database_unavailable');
}

# ---------------------------------------------------------------------------
# 500: PostgreSQL refuses the statement (the item's trigger raises)

{
    my $q = queue_with(1);
    my ($id) = AQ::dbh()->selectrow_array(
        'SELECT id FROM annotation_queue.items WHERE queue_id = ?', undef, $q);
    fail_item($id);
    answer('claim: PostgreSQL refuses the update of the item',
           { uri => $URI{claim}, key => key(), body => claim_body($q) },
           500, 'internal_error');
    for my $a (@ITEM_ACTIONS) {
        my $h = hold("for a refused $a");
        fail_item($h->{id});
        answer("$a: PostgreSQL refuses the update of the item",
               { uri => $URI{$a}, key => $h->{key}, body => body_of($h) },
               500, 'internal_error');
    }
}

# ---------------------------------------------------------------------------
# 503 pool_saturated: saturated.test has one connection and no wait list.
# A claim holds the connection, blocked in the gate (its query timeout is
# long); requests that come meanwhile find no connection.

sub wait_blocked {
    my ($n) = @_;
    my $deadline = Time::HiRes::time() + 10 * AQ::slow();
    my $got = 0;
    until (($got = blocked_backends()) >= $n
           || Time::HiRes::time() > $deadline)
    {
        Time::HiRes::sleep(0.02);
    }
    return $got;
}

{
    my $q = queue_with(1);
    close_gate();
    my $blocker = AQ::Contract::start_request(
        $port, host => 'saturated.test', uri => $URI{claim}, key => key(),
        body => claim_body($q), timeout => 60);
    is(wait_blocked(1), 1,
       'saturated.test: a claim waits in the gate, holding the connection');

    for my $a (@ACTIONS) {
        answer("saturated.test: $a while the connection is busy",
               { host => 'saturated.test', uri => $URI{$a}, key => $k,
                 body => valid_body($a, $uuid) },
               503, 'pool_saturated');
    }
    open_gate();
    verify('saturated.test: the blocked claim, once the gate opens',
           AQ::Contract::finish_request($blocker), 200);
}

# 504 query_timeout: slow.test's statements may run 1 s; each blocks in the
# gate on a connection of its own until then.

{
    my %blocker = (claim => { queue => queue_with(1), key => key() });
    $blocker{$_} = hold("to block its $_") for @ITEM_ACTIONS;

    close_gate();
    my %flight;
    for my $a (@ACTIONS) {
        my $b = $blocker{$a};
        $flight{$a} = AQ::Contract::start_request(
            $port, host => 'slow.test', uri => $URI{$a}, key => $b->{key},
            body => $a eq 'claim' ? claim_body($b->{queue}) : body_of($b),
            timeout => 60);
    }
    for my $a (@ACTIONS) {
        verify("slow.test: $a blocked past the query timeout",
               AQ::Contract::finish_request($flight{$a}), 504,
               'query_timeout');
    }
    open_gate();
}

# ---------------------------------------------------------------------------
# The status page

{
    my $res = answer('the status page',
                     { uri => $STATUS_URI, method => 'GET' }, 200);
    like($res->{headers}{'content-type'} // '',
         qr{^text/plain; version=0\.0\.4$},
         'the status page: text/plain; version=0.0.4 (Prometheus)');
    like($res->{body},
         qr/^annotation_queue_answers_total\{pool="0",worker="all",
            endpoint="claim",outcome="claimed"\}\ [1-9]/mx,
         'the status page counts the claims answered');
}

# ---------------------------------------------------------------------------
# The check itself fails where the description and an answer differ

{
    my $dir = tempdir('aq-contract-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my $n = 0;
    my $mutant = sub {
        my ($edit) = @_;
        my $data = AQ::Contract::load_yaml($contract->file);
        $edit->($data);
        my $file = "$dir/openapi-" . ++$n . '.yaml';
        AQ::Contract::dump_yaml($file, $data);
        return AQ::Contract->new(file => $file);
    };
    my $k2 = key();
    my $q = queue_with(1);
    my $claim = AQ::Contract::request($port, uri => $URI{claim}, key => $k2,
                                      body => claim_body($q));
    my $again = AQ::Contract::request($port, uri => $URI{claim}, key => $k2,
                                      body => claim_body($q));
    my $dead = AQ::Contract::request($port, host => 'dead.test',
                                     uri => $URI{claim}, key => $k2,
                                     body => claim_body($q));
    is_deeply([$contract->check($claim), $contract->check($again),
               $contract->check($dead)], [],
              'the answers the mutated descriptions are tried on are valid');

    my $m = $mutant->(sub {
        my $item = $_[0]{components}{schemas}{ClaimedItem};
        delete $item->{properties}{claimed_at};
        $item->{required} = [grep { $_ ne 'claimed_at' } @{ $item->{required} }];
    });
    like(join("\n", $m->check($claim)),
         qr{/body/item: Properties not allowed: claimed_at},
         'a description without item.claimed_at refuses the claim answer');

    $m = $mutant->(sub {
        my $r = $_[0]{paths}{$URI{claim}}{post}{responses}{200};
        delete $r->{headers}{RateLimit};
    });
    like(join("\n", $m->check($again)), qr{header RateLimit is not documented},
         'a description without the RateLimit header refuses it');

    $m = $mutant->(sub {
        delete $_[0]{components}{responses}{Unavailable}{headers}{'Retry-After'};
    });
    like(join("\n", $m->check($dead)), qr{header Retry-After is not documented},
         'a description without Retry-After on 503 refuses the 503');

    $m = $mutant->(sub {
        my $e = $_[0]{components}{schemas}{UnavailableError}{properties}{error};
        $e->{properties}{code}{enum} = ['pool_saturated'];
    });
    like(join("\n", $m->check($dead)), qr{/body/error/code: Not in enum list},
         'a description without the code database_unavailable refuses it');

    $m = $mutant->(sub {
        delete $_[0]{paths}{$URI{claim}}{post}{responses}{503};
    });
    like(join("\n", $m->check($dead)), qr{status 503 is not documented},
         'a description without 503 for the claim refuses the 503');

    $m = $mutant->(sub {
        $_[0]{paths}{$URI{claim}}{post}{responses}{418} =
            { description => 'never answered' };
    });
    $m->check($claim);
    ok((grep { $_ eq "POST $URI{claim} 418" } $m->uncovered),
       'a documented status no answer produced is reported as uncovered');

    # every documented response is enforced: a body of another shape and
    # the lack of each required header are refused
    my (@lax, $n_responses);
    for my $d ($contract->documented) {
        my ($path, $method, $status) = @$d;
        my $r = $contract->response_object($path, $method, $status);
        my ($media) = sort keys %{ $r->{content} || {} };
        my @required =
            grep { $contract->resolve($r->{headers}{$_})->{required} }
            sort keys %{ $r->{headers} || {} };
        my $fake = {
            method => $method, uri => $path, status => $status,
            header_list => [['Content-Type', $media // 'application/json']],
            headers => { 'content-type' => $media // 'application/json' },
            body => ($media // '') eq 'text/plain' ? 'not metrics'
                                                  : '{"success":"maybe"}',
        };
        my $problems = join "\n", $contract->check($fake);
        $n_responses++;
        push @lax, "$method $path $status: a body of another shape passes"
            unless $problems =~ m{: /body};
        push @lax, map { "$method $path $status: passes without $_" }
                   grep { $problems !~ m{: /\Q$_\E: Missing property} }
                   @required;
    }
    is_deeply(\@lax, [], "the check enforces each of the $n_responses "
                         . 'documented responses: its body schema and its '
                         . 'required headers');

    my $extra = { %$claim, body => do {
        my $doc = AQ::Contract::json_of($claim);
        $doc->{item}{extra} = 1;
        $JSON->encode($doc);
    } };
    like(join("\n", $contract->check($extra)),
         qr{Properties not allowed: extra},
         'openapi.yaml refuses an answer with a member it does not list');
}

# ---------------------------------------------------------------------------
# nginx's error log, and what no answer produced

{
    my $log = $ngx->error_log;
    my @bad = grep { /\[(?:alert|crit|emerg)\]|exited on signal|core dumped/ }
              split /\n/, $log;
    is_deeply(\@bad, [], 'the error log has no alert, crit or emerg');
    my @leaked = grep { index($log, $_) >= 0 } @secrets;
    is(scalar @leaked, 0, 'no API key reached the error log');
    like($log, qr/contract test: this item refuses updates/,
         "the error log says why PostgreSQL refused the statements (the 500s)");
}

is_deeply([$contract->uncovered], [],
          'every documented (path, method, status), and each error code '
          . 'documented for it, was produced, as described');

done_testing();
