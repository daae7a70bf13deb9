# The per-key rate limit: annotation_queue_limit_zone (http) and
# annotation_queue_limit zone=... burst=... | off.
#
# A key is counted only once PostgreSQL accepted it: its first request
# creates its bucket and is not counted; each later one adds a request to a
# leaky bucket of burst + 1 (limit_req's semantics), so burst + 1 requests
# pass at once, then 429 rate_limited with Retry-After, RateLimit-Policy
# and RateLimit.  The rate here is 1r/m (a request leaks every minute), the
# slowest a zone has, so that nothing leaks while a block runs, however slow
# the machine (valgrind included): what these blocks count never depends on
# how fast they run.
#
# The standalone parts (before run_tests) need what Test::Nginx cannot do:
# thousands of requests on kept-alive connections, two workers, parallel
# clients, and waiting what Retry-After says: there the rates are fast
# (r/s, and r/m of a few seconds) and AQ::slow() times slower under
# valgrind, and nothing waits for less than Retry-After.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Workflow;
use JSON::PP ();
use Time::HiRes ();
use Test::Nginx::Socket 'no_plan';

our $org = AQ::org('limit');
our %k = map { $_ => AQ::Workflow::key($org, $_) }
         qw(burst first second forged nested endpoints);

our %q;
for my $name (qw(burst two forged nested endpoints)) {
    $q{$name} = AQ::Workflow::queue($org, $name);
    AQ::Workflow::enqueue($q{$name}, "$name-$_") for 1 .. 3;
}
our $unknown_item = AQ::random_uuid();

# The zones' rate in requests per minute, and what the module derives from
# it: its rate in 1/1000 of a request per second, the seconds a bucket of
# burst=3 takes to drain (RateLimit-Policy's w) and the longest Retry-After
# (one request to leak).
our $PER_MIN = 1;
our $RATE    = "${PER_MIN}r/m";
my $milli    = int($PER_MIN * 1000 / 60);
our $WINDOW  = window(4, $milli);
our $RETRY   = '(?:' . join('|', 1 .. window(1, $milli)) . ')';

# Seconds for $n requests to leak at $milli thousandths of a request per
# second, rounded up.
sub window {
    my ($n, $milli) = @_;
    my $ms = int(($n * 1000 * 1000 + $milli - 1) / $milli);
    return int(($ms + 999) / 1000);
}

# Well-formed keys (valid checksum) that the database does not know.
sub forged { return map { AQ::well_formed_key() } 1 .. $_[0] }

# Well-formed unknown keys with the public prefix ("aqk_" + 8 digits) of $key.
sub same_prefix {
    my ($key, $n) = @_;
    return map { AQ::well_formed_key(substr($key, 4, 8) . AQ::random_hex(56)) } 1 .. $n;
}

sub error_code_of {
    my ($body) = @_;
    my $doc = eval { JSON::PP->new->utf8->decode($body) };
    return ref $doc eq 'HASH' && ref $doc->{error} eq 'HASH' ? $doc->{error}{code} : undef;
}

# ---------------------------------------------------------------------------
# Forged keys neither evict a valid key's bucket nor take room: with a zone
# of 32k (a few hundred buckets), 600 forged keys leave a spent key spent,
# while 600 valid keys (the control) do push it out.
{
    my $what = 'small zone';
    my $queue = AQ::Workflow::queue($org, 'small-zone');
    AQ::Workflow::enqueue($queue, 'small-1');
    my $empty = AQ::Workflow::queue($org, 'small-empty');
    my $spent = AQ::Workflow::key($org, 'spent');
    my $ngx = AQ::start_nginx(workers => 1,
        http     => "annotation_queue_limit_zone zone=tiny:32k rate=$RATE;",
        location => 'annotation_queue_limit zone=tiny burst=1;');
    my $c = AQ::Client->new(port => $ngx->port);

    my @st = map { ($c->claim($queue, $spent))[0] } 1 .. 3;
    is_deeply(\@st, [200, 200, 429], "$what: a key with burst=1 gets 2 answers, then 429");

    my @keys = (forged(300), same_prefix($spent, 300));
    my %seen;
    $seen{ ($c->claim($queue, $_))[0] }++ for @keys;
    is_deeply(\%seen, { 401 => 600 }, "$what: 600 forged keys get 401, never 429");

    my ($status, $h, $body) = $c->claim($queue, $spent);
    is($status, 429, "$what: after them the spent key is still spent (its bucket was kept)");
    is(error_code_of($body), 'rate_limited', "$what: ... rate_limited");

    # The control: valid keys take room, and evict the least recently used.
    my $valid = AQ::keys_for($org, 600);
    %seen = ();
    $seen{ ($c->claim($empty, $_))[0] }++ for @$valid;
    is_deeply(\%seen, { 409 => 600 }, "$what: 600 valid keys are answered (409, their queue is empty)");
    ($status) = $c->claim($queue, $spent);
    is($status, 200, "$what: control: 600 valid keys did evict the spent key's bucket (a fresh budget)");

    $ngx->stop;
    my @bad = grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@bad, [], "$what: no [alert], [crit] or [emerg] in the error log");
}

# ---------------------------------------------------------------------------
# The limit is one for all workers: two workers, 8 kept-alive connections
# (4 served by each worker) sending 5 claims each at once, after the key's
# first request.  burst=9: exactly 9 of the 40 pass, whichever worker
# serves them; a limit per worker would let up to 18 pass.
{
    my $what = 'two workers';
    my $queue = AQ::Workflow::queue($org, 'two-workers');
    AQ::Workflow::enqueue($queue, 'workers-1');
    my $key = AQ::Workflow::key($org, 'workers');
    my $ngx = AQ::start_nginx(workers => 2, listen => 'reuseport',
        http     => "annotation_queue_limit_zone zone=shared:1m rate=$RATE;",
        location => "annotation_queue_limit zone=shared burst=9;\n"
                  . '            add_header X-Worker $pid always;');

    my $by = AQ::Workflow::worker_connections($ngx->port, 4);
    my @conns = map { @{ $by->{$_} } } sort keys %$by;
    is(scalar(@conns), 8, "$what: 4 connections served by each of the 2 workers")
        or diag(Test::More::explain({ map { $_ => scalar @{ $by->{$_} } } keys %$by }));

    my ($first) = AQ::Client->new(port => $ngx->port)->claim($queue, $key);
    is($first, 200, "$what: the key's first request (not counted) answers 200");

    my $res = AQ::parallel(scalar @conns, sub {
        my ($i) = @_;
        my $c = $conns[$i];
        return [map { my ($s, $h, $b) = $c->claim($queue, $key);
                      [$s, $h->{ratelimit} // '', error_code_of($b) // '',
                       $h->{'x-worker'} // ''] } 1 .. 5];
    });
    my @answers = map { ref $_ eq 'ARRAY' ? @$_ : ["died: $_->{died}"] } @$res;
    my %count;
    $count{ $_->[0] }++ for @answers;
    is_deeply(\%count, { 200 => 9, 429 => 31 },
              "$what: 40 claims at once on 8 connections: 9 answered 200, 31 got 429")
        or diag(Test::More::explain(\@answers));
    is(scalar(grep { $_->[0] == 429 && $_->[2] ne 'rate_limited' } @answers), 0,
       "$what: each 429 is rate_limited");
    my @left = sort { $a <=> $b } map { $_->[1] =~ /;r=(\d+);/ ? $1 : 'none' }
               grep { $_->[0] == 200 } @answers;
    is_deeply(\@left, [0 .. 8], "$what: the 200s tell r=8 .. r=0, each once");
    my %pids = map { $_->[3] => 1 } @answers;
    is(scalar(keys %pids), 2, "$what: both workers answered");

    $ngx->stop;
    my @bad = grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@bad, [], "$what: no [alert], [crit] or [emerg] in the error log");
}

# ---------------------------------------------------------------------------
# A key over its rate recovers after Retry-After, with a rate in r/s and one
# in r/m: its first request creates its bucket; then requests until one gets
# 429 (burst=1: the third, unless a request leaked meanwhile); the client
# waits what Retry-After says, no more, and its next request is served.
# Twice each.  The rates: 2r/s, and 30r/m (a request leaks in 2 s, so that
# a Retry-After short by a second fails), AQ::slow() times slower under
# valgrind (1r/s and 3r/m; the Retry-After to wait grows with them).
{
    my $what = 'recovery';
    my $rs = (int(2 / AQ::slow()) || 1) . 'r/s';
    my $rm = (int(30 / AQ::slow()) || 1) . 'r/m';
    my %zone = (rs => $rs, rm => $rm);
    my $server = '';
    for my $z (sort keys %zone) {
        $server .= "        location = /$z/queue {\n"
                 . "            annotation_queue_limit zone=$z burst=1;\n"
                 . "            annotation_queue_claim;\n"
                 . "        }\n";
    }
    my ($ngx, $port) = AQ::Workflow::start_nginx(workers => 2,
        http => join('', map { "    annotation_queue_limit_zone zone=$_:1m rate=$zone{$_};\n" }
                             sort keys %zone),
        server => $server);

    for my $z (sort keys %zone) {
        my ($n, $unit) = $zone{$z} =~ /^(\d+)r\/([sm])$/;
        my $milli = int($n * 1000 / ($unit eq 's' ? 1 : 60));
        my $w = window(2, $milli);
        my $policy = qq("$z";q=2;w=$w);
        my $queue = AQ::Workflow::queue($org, "recovery-$z");
        AQ::Workflow::enqueue($queue, "recovery-$z-1");
        my $key = AQ::Workflow::key($org, "recovery-$z");
        my $c = AQ::Client->new(port => $port);
        my $claim = sub {
            my ($st, $h, $b, $err) = $c->request(uri => "/$z/queue", key => $key,
                                                 body => qq({"queue_id":"$queue"}));
            return { status => $st, headers => $h, body => $b, error => $err };
        };
        my (@bad, @waited);
        my $first = $claim->();
        push @bad, "first request: $first->{status}" unless $first->{status} == 200;
        for my $round (1 .. 2) {
            my ($limited, @passed);
            for (1 .. 20) {
                my $r = $claim->();
                if ($r->{status} == 429) {
                    $limited = $r;
                    last;
                }
                push @passed, $r->{status};
                push @bad, "round $round: a request answered $r->{status}"
                    unless $r->{status} == 200;
                push @bad, "round $round: a 200 with RateLimit-Policy "
                           . ($r->{headers}{'ratelimit-policy'} // 'none')
                    unless ($r->{headers}{'ratelimit-policy'} // '') eq $policy;
            }
            if (!$limited) {
                push @bad, "round $round: no 429 in 20 requests (@passed)";
                last;
            }
            my $h = $limited->{headers};
            push @bad, "round $round: the 429 is " . (error_code_of($limited->{body}) // 'not JSON')
                unless (error_code_of($limited->{body}) // '') eq 'rate_limited';
            push @bad, "round $round: the 429's RateLimit-Policy is "
                       . ($h->{'ratelimit-policy'} // 'none')
                unless ($h->{'ratelimit-policy'} // '') eq $policy;
            push @bad, "round $round: the 429's RateLimit is " . ($h->{ratelimit} // 'none')
                unless ($h->{ratelimit} // '') =~ /^"$z";r=0;t=\d+$/;
            my $after = $h->{'retry-after'} // '';
            if ($after !~ /^\d+$/ || $after < 1 || $after > $w) {
                push @bad, "round $round: Retry-After '$after', not 1 .. $w";
                last;
            }
            push @waited, $after;
            Time::HiRes::sleep($after);
            my $r = $claim->();
            push @bad, "round $round: after waiting Retry-After ($after s) the next request "
                       . "answered $r->{status}"
                       . ($r->{status} == 429 ? ' (Retry-After ' . ($r->{headers}{'retry-after'} // '-') . ')' : '')
                unless $r->{status} == 200;
            push @bad, "round $round: ... without RateLimit " . ($r->{headers}{ratelimit} // 'none')
                unless ($r->{headers}{ratelimit} // '') =~ /^"$z";r=\d+;t=\d+$/;
        }
        is_deeply(\@bad, [], "$what: rate=$zone{$z} burst=1: twice a 429 rate_limited with "
                             . "RateLimit-Policy $policy and Retry-After of 1 .. $w s; after "
                             . 'waiting it the next request is served')
            or diag(Test::More::explain(\@bad));
        Test::More::note("$what: rate=$zone{$z}: waited @waited s");
    }

    $ngx->stop;
    my @log = grep { /\[(?:error|alert|crit|emerg)\]/ } split /\n/, $ngx->error_log;
    is_deeply(\@log, [], "$what: no [error], [alert], [crit] or [emerg] in the error log");
}

# ---------------------------------------------------------------------------
# Configuration errors fail nginx -t.
{
    my ($rc, $out) = AQ::nginx_test_config(
        location => 'annotation_queue_limit zone=nosuch burst=1;');
    isnt($rc, 0, 'nginx -t: annotation_queue_limit of an unknown zone fails');
    like($out, qr/nosuch/, '... naming the zone') or diag $out;

    ($rc, $out) = AQ::nginx_test_config(
        http => 'annotation_queue_limit_zone zone=z:1m rate=10r/s;',
        location => 'annotation_queue_limit zone=z burst=-1;');
    isnt($rc, 0, 'nginx -t: a negative burst fails');
}

$AQ::HTTP_CONFIG = <<"_EOC_";
    annotation_queue_database "\$TEST_NGINX_AQ_DSN";
    annotation_queue_limit_zone zone=raters:1m rate=$RATE;
_EOC_

$AQ::CONFIG = <<'_EOC_';
    location /api/v1/annotations/ {
        annotation_queue_limit zone=raters burst=3;

        location = /api/v1/annotations/queue {
            annotation_queue_claim;
        }
        location = /api/v1/annotations/extend {
            annotation_queue_extend;
        }
        location = /api/v1/annotations/unlimited {
            annotation_queue_limit off;
            annotation_queue_claim;
        }
    }
_EOC_

our $POLICY = qq(RateLimit-Policy: "raters";q=4;w=$WINDOW);
sub left { return qq(RateLimit: "raters";r=$_[0];t=\\d+) }

AQ::default_blocks();
run_tests();

__DATA__

=== TEST 1: a burst from one key: burst + 1 answers, then 429 rate_limited with Retry-After, RateLimit-Policy and RateLimit
burst=3: the first request creates the key's bucket; the next three fill it
(r=2, 1, 0); the fifth and sixth get 429.
--- request eval
[(AQ::claim_req($::q{burst})) x 6]
--- more_headers eval
AQ::headers($::k{burst})
--- error_code eval
[200, 200, 200, 200, 429, 429]
--- response_headers_like eval
["",
 "$::POLICY\n" . ::left(2),
 "$::POLICY\n" . ::left(1),
 "$::POLICY\n" . ::left(0),
 "$::POLICY\n" . ::left(0) . "\nRetry-After: $::RETRY",
 "$::POLICY\n" . ::left(0) . "\nRetry-After: $::RETRY"]
--- response_body_filters eval
[([\&AQ::brief]) x 4, [\&AQ::canon], [\&AQ::canon]]
--- response_body eval
[("item burst-1 v1\n") x 4,
 (qq({"error":{"code":"rate_limited","message":"..."},"success":false}\n)) x 2]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 2: a second key is not affected by the first key's burst; each has its own budget
--- request eval
[(AQ::claim_req($::q{two})) x 11]
--- more_headers eval
[(AQ::headers($::k{first})) x 5, (AQ::headers($::k{second})) x 5, AQ::headers($::k{first})]
--- error_code eval
[200, 200, 200, 200, 429, 200, 200, 200, 200, 429, 429]
--- response_headers_like eval
["", ::left(2), ::left(1), ::left(0), ::left(0),
 "", ::left(2), ::left(1), ::left(0), ::left(0), ::left(0)]
--- response_body_filters eval
[([\&AQ::brief]) x 11]
--- response_body eval
[("item two-1 v1\n") x 4, "error rate_limited\n",
 ("item two-2 v1\n") x 4, "error rate_limited\n", "error rate_limited\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 3: forged keys never make a valid key get 429: well-formed unknown keys, keys sharing its public prefix, one forged key many times
The valid key's first request creates its bucket; then 10 unknown keys,
10 keys with its public 12-character prefix, one unknown key 6 times and
keys with its prefix and a wrong checksum: all 401, none 429.  The valid
key still has its whole budget: r=2, 1, 0, then 429.
--- request eval
[(AQ::claim_req($::q{forged})) x 40]
--- more_headers eval
my $k = $::k{forged};
my $wrong_sum = substr($k, 0, -1) . (substr($k, -1) eq '0' ? '1' : '0');
my $once = (::forged(1))[0];
[AQ::headers($k),
 (map { AQ::headers($_) } ::forged(10)),
 (map { AQ::headers($_) } ::same_prefix($k, 10)),
 (AQ::headers($once)) x 6,
 AQ::headers($wrong_sum), AQ::headers(substr($k, 0, 12) . ('0' x 64)),
 (map { AQ::headers($_) } ::same_prefix($k, 6)),
 (AQ::headers($k)) x 5]
--- error_code eval
[200, (401) x 34, 200, 200, 200, 429, 429]
--- response_body_filters eval
[([\&AQ::brief]) x 40]
--- response_body eval
["item forged-1 v1\n", ("error invalid_api_key\n") x 34,
 ("item forged-1 v1\n") x 3, "error rate_limited\n", "error rate_limited\n"]
--- response_headers_like eval
["", ("WWW-Authenticate: Bearer.*") x 34, ::left(2), ::left(1), ::left(0), ::left(0), ::left(0)]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 4: annotation_queue_limit off in a nested location: no limit there; the enclosing location's limit still applies
Six claims of the key in the unlimited location: all 200 without RateLimit
headers.  Then the limited location: 200, r=2, 1, 0, 429.  The unlimited
location still answers the spent key.
--- request eval
my $unlimited = AQ::Workflow::req('/api/v1/annotations/unlimited', { queue_id => $::q{nested} });
[($unlimited) x 6, (AQ::claim_req($::q{nested})) x 5, $unlimited]
--- more_headers eval
AQ::headers($::k{nested})
--- error_code eval
[(200) x 6, 200, 200, 200, 200, 429, 200]
--- raw_response_headers_unlike eval
[("(?i)\\r\\nRateLimit") x 6, ('\r\nX-Not-A-Header') x 5, "(?i)\\r\\nRateLimit"]
--- response_headers_like eval
[("") x 7, ::left(2), ::left(1), ::left(0), ::left(0), ""]
--- response_body_filters eval
[([\&AQ::brief]) x 12]
--- response_body eval
[("item nested-1 v1\n") x 10, "error rate_limited\n", "item nested-1 v1\n"]
--- no_error_log
[error]
[alert]
[crit]



=== TEST 5: one budget per key across the endpoints of the zone; every answer to a counted key carries the headers, errors too
The key claims (its bucket is created), extends three times (r=2, 1, 0),
then gets 429 on extend and on claim.  A 404 for an unknown item (before
the budget is spent) carries RateLimit too.
--- request eval
[AQ::claim_req($::q{endpoints}),
 AQ::Workflow::act('extend', 'endpoints-1', 1),
 AQ::Workflow::req('extend', { item_id => $::unknown_item, version => 1 }),
 AQ::Workflow::act('extend', 'endpoints-1', 1),
 AQ::Workflow::act('extend', 'endpoints-1', 1),
 AQ::claim_req($::q{endpoints})]
--- more_headers eval
AQ::headers($::k{endpoints})
--- error_code eval
[200, 200, 404, 200, 429, 429]
--- response_headers_like eval
["", "$::POLICY\n" . ::left(2), "$::POLICY\n" . ::left(1), "$::POLICY\n" . ::left(0),
 "$::POLICY\n" . ::left(0) . "\nRetry-After: \\d+",
 "$::POLICY\n" . ::left(0) . "\nRetry-After: \\d+"]
--- response_body_filters eval
[[\&AQ::brief], ([\&AQ::Workflow::brief]) x 5]
--- response_body eval
["item endpoints-1 v1\n", "claimed endpoints-1 v1, lease 900s\n", "error item_not_found\n",
 "claimed endpoints-1 v1, lease 900s\n", "error rate_limited\n", "error rate_limited\n"]
--- no_error_log
[error]
[alert]
[crit]
