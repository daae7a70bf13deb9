# HTTP/2: the claim and the rater's workflow over `listen ... ssl http2`
# (TLS, ALPN h2, a self-signed certificate made here with openssl) and over
# `listen ... http2` in clear text (h2c with prior knowledge: nginx 1.22
# has no Upgrade: h2c), with real HTTP/2 clients:
#
#   - curl --http2 / --http2-prior-knowledge: claim, extend, complete (a
#     body of many DATA frames, beyond the stream's first flow-control
#     window and beyond client_body_buffer_size, so that nginx writes it to
#     a temporary file), and the errors 400, 401, 404, 409, 413 as JSON;
#   - curl --parallel: 100 claims with 100 keys multiplexed on one
#     connection (curl's num_connects and nginx's $connection say one),
#     all in flight at once (held at a gate in PostgreSQL until the status
#     page shows every one of them inside nginx), each answered once with
#     an item its own key holds at the version answered;
#   - h2load -n 100 -c 1 -m 50: one key's 100 claims, 50 streams at a time
#     on one connection: 100 answers 200, all the same item (a key gets its
#     live claim back);
#   - a client of our own (t/lib/AQ/H2.pm, Protocol::HTTP2): bodies without
#     Content-Length (DATA frames only), and RST_STREAM on streams whose
#     claim waits in PostgreSQL or in the pool's wait list, then the whole
#     connection dropped: nginx logs "client canceled stream N" for exactly
#     the streams reset (the line nginx writes when it receives RST_STREAM
#     with CANCEL), the other streams of the connection get their items,
#     claims that only waited never run, the worker is the same process and
#     the error log has nothing at [error] or above;
#   - long-polling claims (Prefer: wait) as streams of one connection: one
#     reset while it waits leaves its place, the others get the items
#     enqueued, with Preference-Applied.
#
# One worker and a pool of one connection, so that "the claim at the gate"
# and "the claims waiting" are known exactly.  Nothing sleeps for nginx or
# PostgreSQL: each step waits (deadlines times AQ::slow()) for what shows
# it, pg_stat_activity, the status page, the error log.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use AQ::H2;
use AQ::Workflow;
use JSON::PP ();
use List::Util ();
use POSIX ();
use Test::More;

my $JSON = JSON::PP->new->utf8->canonical;

for my $tool ('curl', 'h2load', 'openssl') {
    system("command -v $tool >/dev/null 2>&1") == 0
        or BAIL_OUT("$tool is missing: scripts/install-deps.sh installs it");
}
like(`curl -V`, qr/^Features:.*\bHTTP2\b/m, 'curl has HTTP/2 (curl -V lists HTTP2)');

my $org   = AQ::org('http2');
my $other = AQ::org('http2-other');

# ---------------------------------------------------------------------------
# nginx: one server over TLS + h2, one over h2c, the four endpoints in each;
# the status page over HTTP/1.1; an access log that names the connection
# of every request.

my $certdir = AQ::nginx_prefix();
my ($cert, $certkey) = AQ::H2::tls_cert($certdir);
my $access = "$certdir/access.log";
my %port = (tls => AQ::free_port(), h2c => AQ::free_port(), stall => AQ::free_port());
my $sport = AQ::free_port();
my $locations = $AQ::Workflow::LOCATIONS;

my $ngx = AQ::start_nginx(workers => 1, http => <<"_EOC_" . AQ::Faults::status_server($sport));
    annotation_queue_pool_size 1;
    annotation_queue_max_waiting 128;
    annotation_queue_max_body_size 256k;
    annotation_queue_query_timeout ${\ AQ::Faults::scaled(30) }s;
    client_body_buffer_size 16k;

    log_format h2 '\$connection \$server_protocol \$status '
                  '\$annotation_queue_outcome \$annotation_queue_item';

    server {
        ${\ AQ::listen_http2("127.0.0.1:$port{tls} ssl") }
        ssl_certificate $cert;
        ssl_certificate_key $certkey;
        access_log $access h2;
$locations
    }

    server {
        ${\ AQ::listen_http2("127.0.0.1:$port{h2c}") }
        access_log $access h2;
$locations
    }

    server {
        ${\ AQ::listen_http2("127.0.0.1:$port{stall}") }
        client_body_timeout ${\ AQ::Faults::scaled(1) }s;
$locations
    }
_EOC_

# the master listens before it forks its worker
AQ::Faults::wait_until(10, sub { @{ AQ::Faults::worker_pids($ngx) } == 1 });
my $worker = AQ::Faults::worker_pids($ngx);
is(scalar @$worker, 1, 'one worker') or BAIL_OUT('no worker');

my $TEMP_FILE = qr/a client request body is buffered to a temporary file/;
my $json_ct = qr{^application/json(?:;\s*charset=utf-8)?$};
my $uri = \%AQ::Workflow::URI;

sub body_of { my $d = eval { $JSON->decode($_[0] // '') }; return ref $d eq 'HASH' ? $d : {} }

# "200 item", "409 stale_claim", ... of an answer { status, body }.
sub outcome {
    my ($r) = @_;
    return AQ::Faults::outcome($r->{status}, $r->{body}, $r->{error});
}

# The problems of an error answer: JSON, the documented shape, the code.
sub error_problems {
    my ($r, $status, $code) = @_;
    my @p;
    push @p, "status $r->{status}, not $status" unless $r->{status} == $status;
    push @p, 'Content-Type ' . ($r->{headers}{'content-type'} // 'none')
        unless ($r->{headers}{'content-type'} // '') =~ $json_ct;
    my (undef, $problems, $summary) = AQ::inspect($r->{body});
    push @p, @$problems;
    push @p, "answered '$summary', not 'error $code'" unless $summary eq "error $code";
    push @p, "curl: $r->{error}" if $r->{error};
    push @p, "HTTP version '$r->{version}', not 2"
        if defined $r->{version} && $r->{version} ne '2';
    return @p;
}

# The access log's lines written since $offset (bytes).
sub access_lines {
    my ($offset) = @_;
    my $text = AQ::slurp($access);
    return [grep { length } split /\n/, substr($text, $offset // 0)];
}

# Waits until the access log has $n lines past $offset (nginx writes a
# request's line after the client has its answer).
sub wait_access_lines {
    my ($offset, $n) = @_;
    AQ::Faults::wait_until(10, sub { @{ access_lines($offset) } >= $n });
    return access_lines($offset);
}

sub log_len { return length $ngx->error_log }
sub log_since { return substr $ngx->error_log, $_[0] }

# ---------------------------------------------------------------------------
# Claim, extend, complete, and each error, through curl.

sub endpoints {
    my ($t) = @_;
    my $tls = $t eq 'tls';
    my $port = $port{$t};
    my %c = (port => $port, tls => $tls);

    my $q = AQ::Workflow::queue($org, "h2-$t");
    my $id = AQ::Workflow::enqueue($q, "h2-$t", { prompt => "over $t" });
    my $key = AQ::Workflow::key($org, "rater-$t");

    my $r = AQ::H2::curl(%c, key => $key, body => qq({"queue_id":"$q"}));
    is($r->{version}, '2', "$t: curl speaks HTTP/2 to nginx (%{http_version} 2)")
        or diag explain $r;
    is($r->{status}, 200, "$t: claim answers 200") or diag explain $r;
    like($r->{headers}{'content-type'} // '', $json_ct, "$t: claim: Content-Type application/json");
    is($r->{headers}{'cache-control'}, 'no-store', "$t: claim: Cache-Control no-store");
    my (undef, $problems, $summary) = AQ::inspect($r->{body});
    is($summary, "item h2-$t v1", "$t: claim: the item, at version 1")
        or diag $r->{body};
    is_deeply($problems, [], "$t: claim: the body is the documented shape and matches the item's row");
    my $item = body_of($r->{body})->{item} || {};
    is_deeply($item->{payload}, { prompt => "over $t" }, "$t: claim: the payload as enqueued");
    my $v = $item->{version} // 1;

    $r = AQ::H2::curl(%c, key => $key, path => $uri->{extend},
                      body => $JSON->encode({ item_id => $id, version => $v }));
    is(outcome($r), '200 item', "$t: extend answers 200") or diag explain $r;
    like(AQ::Workflow::answer($r->{body}), qr/"status":"claimed","version":$v\}/,
         "$t: extend: the item still claimed, same version, as in the database")
        or diag $r->{body};
    is($r->{headers}{'cache-control'}, 'no-store', "$t: extend: Cache-Control no-store");

    # complete with a result of ~100 kB: many DATA frames (curl sends at
    # most 16 kB each), more than the stream's first window (64 kB: nginx
    # must send WINDOW_UPDATE for the rest), more than client_body_buffer_size
    # (16k: nginx writes it to a temporary file, and says so at [warn])
    my $big = { label => 'long', note => 'x' x (100 * 1024),
                list => [map { { n => $_ } } 1 .. 100] };
    my $body = $JSON->encode({ item_id => $id, version => $v, result => $big });
    cmp_ok(length $body, '>', 65536 + 16384, "$t: the complete body is larger than the first window");
    my $temp = AQ::Faults::log_count($ngx, $TEMP_FILE);
    $r = AQ::H2::curl(%c, key => $key, path => $uri->{complete}, body => $body);
    is(outcome($r), '200 item', "$t: complete with a 100 kB result answers 200") or diag explain $r;
    like(AQ::Workflow::answer($r->{body}), qr/"status":"completed","version":${\ ($v + 1) }\}/,
         "$t: complete: completed, version + 1, as in the database") or diag $r->{body};
    my ($stored) = AQ::dbh()->selectrow_array(
        'SELECT result = ?::jsonb FROM annotation_queue.items WHERE id = ?',
        undef, $JSON->encode($big), $id);
    ok($stored, "$t: complete: the database holds the result as sent, every byte of it");
    is(AQ::Faults::log_count($ngx, $TEMP_FILE), $temp + 1,
       "$t: complete: nginx buffered that body to a temporary file (and the module read it back)");

    # the errors, each as JSON; none changes the item
    AQ::Workflow::snap($id);
    my @p = error_problems(AQ::H2::curl(%c, key => $key, body => '{"queue_id":'), 400, 'invalid_json');
    is_deeply(\@p, [], "$t: a body that is not JSON: 400 invalid_json")
        or diag explain \@p;

    # without a body: see "Answers before the body" below for why
    $r = AQ::H2::curl(%c);
    @p = error_problems($r, 401, 'missing_api_key');
    is_deeply(\@p, [], "$t: no Authorization header: 401 missing_api_key")
        or diag explain \@p;
    is($r->{headers}{'www-authenticate'}, 'Bearer realm="annotation_queue"',
       "$t: ... with WWW-Authenticate: Bearer realm=\"annotation_queue\"");

    $r = AQ::H2::curl(%c, key => $key, path => $uri->{extend},
                      body => $JSON->encode({ item_id => AQ::random_uuid(), version => 1 }));
    @p = error_problems($r, 404, 'item_not_found');
    is_deeply(\@p, [], "$t: extend of an unknown item: 404 item_not_found")
        or diag explain \@p;

    $r = AQ::H2::curl(%c, key => $key, path => $uri->{extend},
                      body => $JSON->encode({ item_id => $id, version => $v }));
    @p = error_problems($r, 409, 'stale_claim');
    is_deeply(\@p, [], "$t: extend of the item once completed: 409 stale_claim")
        or diag explain \@p;

    $r = AQ::H2::curl(%c, key => AQ::key($org), body => qq({"queue_id":"$q"}));
    @p = error_problems($r, 409, 'no_items_available');
    is_deeply(\@p, [], "$t: claim of an empty queue: 409 no_items_available")
        or diag explain \@p;

    my $huge = $JSON->encode({ item_id => $id, version => $v + 1,
                               result => { note => 'y' x (300 * 1024) } });

    # Answers before the body: refused from the headers alone (the key, the
    # announced length), the answer goes before the body has come, and
    # nginx ends the stream with RST_STREAM (NO_ERROR) after it, as RFC 9113
    # 8.1 allows; the client must keep the answer.  curl 7.88.1 (bookworm)
    # does not always (exit 92, or 16 with the whole connection dropped):
    # these go through our client, which keeps it.
    my $h2 = AQ::H2::Conn->new(%c);
    my $sid = $h2->post(path => $uri->{complete}, body => $huge);
    $r = $h2->response($sid);
    @p = error_problems($r, 401, 'missing_api_key');
    is_deeply(\@p, [], "$t: no Authorization header, a 300 kB body on its way: 401 missing_api_key")
        or diag explain \@p;
    is($r->{headers}{'www-authenticate'}, 'Bearer realm="annotation_queue"',
       "$t: ... with WWW-Authenticate");
    $sid = $h2->post(key => $key, path => $uri->{complete}, body => $huge);
    $r = $h2->response($sid);
    @p = error_problems($r, 413, 'body_too_large');
    is_deeply(\@p, [], "$t: a 300 kB body (Content-Length announced) over the 256k limit: "
                      . '413 body_too_large') or diag explain \@p;
    is(AQ::Workflow::unchanged($id), 'row unchanged',
       "$t: the refused requests changed nothing");

    # Bodies of DATA frames alone (no Content-Length), through our client,
    # on the same connection.
    my $q2 = AQ::Workflow::queue($org, "h2-nolength-$t");
    my $id2 = AQ::Workflow::enqueue($q2, "h2-nolength-$t");
    my $key2 = AQ::Workflow::key($org, "nolength-$t");
    $sid = $h2->post(key => $key2, body => qq({"queue_id":"$q2"}), length => 0);
    $r = $h2->response($sid);
    my $doc = body_of($r->{body});
    is(outcome($r) . ' ' . ($doc->{item}{id} // ''), "200 item $id2",
       "$t: a claim whose body has no Content-Length answers 200 with the item") or diag explain $r;
    $temp = AQ::Faults::log_count($ngx, $TEMP_FILE);
    $body = $JSON->encode({ item_id => $id2, version => 1, result => $big });
    $sid = $h2->post(key => $key2, path => $uri->{complete}, body => $body, length => 0);
    $r = $h2->response($sid);
    like(AQ::Workflow::answer($r->{body}), qr/"status":"completed","version":2\}/,
         "$t: complete with a 100 kB result without Content-Length: 200, completed v2")
        or diag explain $r;
    is(AQ::Faults::log_count($ngx, $TEMP_FILE), $temp + 1,
       "$t: ... that body too went to a temporary file");
    $sid = $h2->post(key => $key2, path => $uri->{complete}, body => $huge, length => 0);
    $r = $h2->response($sid);
    @p = error_problems($r, 413, 'body_too_large');
    is_deeply(\@p, [], "$t: a 300 kB body without Content-Length (read, then refused): 413 body_too_large")
        or diag explain \@p;
    $sid = $h2->post(key => $key2, path => $uri->{extend},
                     body => $JSON->encode({ item_id => $id2, version => 2 }));
    @p = error_problems($h2->response($sid), 409, 'stale_claim');
    is_deeply(\@p, [], "$t: the connection serves on after the 413 (409 stale_claim next)")
        or diag explain \@p;
    ok(!$h2->closed, "$t: nginx kept that connection open throughout")
        or diag $h2->closed;
    $h2->close;
}

endpoints($_) for qw(tls h2c);

# A body that stops coming, on a stream beside others (h2c, a server whose
# client_body_timeout is 1 s): the stream ends at the timeout, the other
# streams of the connection get their answers.  The stalled stream gets 408
# request_timeout as JSON, as over HTTP/1 (t/095-logging.t).
{
    my $what = 'a stalled body';
    my $q = AQ::queue($org, 'stalled');
    AQ::enqueue_many($q, 2);
    my ($k1, $k2) = @{ AQ::keys_for($org, 2) };
    my $h2 = AQ::H2::Conn->new(port => $port{stall});
    my $stalled = $h2->post(key => $k1, body => qq({"queue_id":), length => 50, stall => 1);
    my $sid = $h2->post(key => $k2, body => qq({"queue_id":"$q"}));
    my $r = $h2->response($sid);
    is(outcome($r), '200 item', "$what: the other stream of the connection answers 200")
        or diag explain $r;
    $r = $h2->response($stalled);
    ok($r->{status} || $r->{reset},
       "$what: the stalled stream ends at client_body_timeout (answered or reset, not left open)")
        or diag explain $r;
    my @p = error_problems($r, 408, 'request_timeout');
    is_deeply(\@p, [], "$what: the stalled stream gets 408 request_timeout as JSON, as over HTTP/1")
        or diag explain [\@p, $r];
    $sid = $h2->post(key => $k1, body => qq({"queue_id":"$q"}));
    $r = $h2->response($sid);
    is(outcome($r), '200 item', "$what: the connection serves on (its key claims next)")
        or diag explain $r;
    is_deeply(AQ::counts($q), { available => 0, claimed => 2, completed => 0 },
              "$what: the stalled request claimed nothing; the two claims after it did");
    $h2->close;
}

# ---------------------------------------------------------------------------
# 100 claims with 100 keys multiplexed on one connection (curl --parallel),
# all inside nginx at once: held at the gate until the status page shows
# one claim on the pool's connection and 99 waiting for it.

AQ::Faults::install_gate();

sub multiplexed {
    my ($t) = @_;
    my $what = "$t: 100 claims multiplexed on one connection";
    my $q = AQ::queue($org, "multiplexed-$t");
    AQ::enqueue_many($q, 120);
    my @keys = @{ AQ::keys_for($org, 100) };
    my $offset = length AQ::slurp($access);

    my $gate = AQ::Faults::close_gate(AQ::Faults::session());
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        my ($res, $err) = AQ::H2::curl_parallel(
            port => $port{$t}, tls => $t eq 'tls',
            requests => [map { { key => $_, body => qq({"queue_id":"$q"}) } } @keys]);
        my $out = "$certdir/parallel-$t.json";
        open my $fh, '>', $out or POSIX::_exit(1);
        print $fh JSON::PP->new->encode({ res => $res, err => $err });
        close $fh;
        POSIX::_exit(0);
    }
    my $inside = AQ::Faults::wait_until(30, sub {
        AQ::Faults::backends(lock => 1) == 1 && AQ::Faults::pool_state($sport)->{waiting} == 99 });
    ok($inside, "$what: all 100 are in nginx at once (one at the gate in PostgreSQL, 99 waiting)")
        or diag explain [AQ::Faults::pool_state($sport), AQ::Faults::backend_rows()];
    AQ::Faults::open_gate($gate);
    my $done = AQ::Faults::wait_until(60, sub { waitpid($pid, POSIX::WNOHANG()) == $pid });
    if (!$done) {
        kill 'KILL', $pid;
        waitpid($pid, 0);
    }
    ok($done, "$what: curl ends");
    my $got = eval { JSON::PP->new->decode(AQ::slurp("$certdir/parallel-$t.json")) } || {};
    my @res = @{ $got->{res} || [] };
    is($got->{err}, undef, "$what: curl exits 0");
    is(scalar(grep { $_->{version} eq '2' } @res), 100, "$what: each transfer over HTTP/2");
    is((List::Util::sum0(map { $_->{connects} } @res)), 1,
       "$what: curl opened one connection for them all (num_connects)");

    my @out = map { outcome($_) } @res;
    is(scalar(grep { $_ eq '200 item' } @out), 100, "$what: 100 answers 200 with an item")
        or diag explain [grep { $_ ne '200 item' } @out];
    my @bad_head = grep { ($_->{headers}{'content-type'} // '') !~ $json_ct
                          || ($_->{headers}{'cache-control'} // '') ne 'no-store' } @res;
    is(scalar @bad_head, 0, "$what: each with Content-Type application/json and Cache-Control no-store");
    my @answers;
    for my $i (0 .. $#res) {
        my $it = body_of($res[$i]{body})->{item} or next;
        push @answers, [$it->{id}, $it->{version}, $keys[$i], $i];
    }
    my @problems = AQ::answers_problems(\@answers, queue => $q);
    is_deeply(\@problems, [], "$what: each item answered once, held by its own key at the version answered")
        or diag explain \@problems;
    is_deeply(AQ::counts($q), { available => 20, claimed => 100, completed => 0 },
              "$what: the database has 100 items claimed, the rest available");

    my $lines = wait_access_lines($offset, 100);
    my %conns = map { (split ' ', $_)[0] => 1 } @$lines;
    my @h2 = grep { (split ' ', $_)[1] eq 'HTTP/2.0' && (split ' ', $_)[2] eq '200' } @$lines;
    is(scalar @$lines, 100, "$what: nginx logged 100 requests");
    is(scalar keys %conns, 1, "$what: nginx saw them all on one connection (\$connection)")
        or diag explain [sort keys %conns];
    is(scalar @h2, 100, "$what: each HTTP/2.0, 200");
}

# h2load: one key's 100 claims, 50 streams at a time on one connection.
sub h2load_one_key {
    my ($t) = @_;
    my $what = "$t: h2load -n 100 -c 1 -m 50, one key";
    my $q = AQ::queue($org, "h2load-$t");
    AQ::enqueue_many($q, 10);
    my $key = AQ::key($org);
    my $offset = length AQ::slurp($access);
    my $gate = AQ::Faults::close_gate(AQ::Faults::session());
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        my $r = AQ::H2::h2load(port => $port{$t}, tls => $t eq 'tls', n => 100, m => 50,
                               key => $key, body => qq({"queue_id":"$q"}));
        open my $fh, '>', "$certdir/h2load-$t.json" or POSIX::_exit(1);
        print $fh JSON::PP->new->encode($r);
        close $fh;
        POSIX::_exit(0);
    }
    my $inside = AQ::Faults::wait_until(30, sub {
        AQ::Faults::backends(lock => 1) == 1 && AQ::Faults::pool_state($sport)->{waiting} == 49 });
    ok($inside, "$what: 50 streams in nginx at once (one at the gate in PostgreSQL, 49 waiting)")
        or diag explain [AQ::Faults::pool_state($sport), AQ::Faults::backend_rows()];
    AQ::Faults::open_gate($gate);
    my $done = AQ::Faults::wait_until(60, sub { waitpid($pid, POSIX::WNOHANG()) == $pid });
    if (!$done) {
        kill 'KILL', $pid;
        waitpid($pid, 0);
    }
    ok($done, "$what: h2load ends");
    my $r = eval { JSON::PP->new->decode(AQ::slurp("$certdir/h2load-$t.json")) }
            || { requests => {}, status => {}, protocol => 'none', output => '' };
    is($r->{protocol}, $t eq 'tls' ? 'h2' : 'h2c', "$what: h2load negotiated $r->{protocol}")
        or diag $r->{output};
    is_deeply([@{ $r->{requests} }{qw(total done succeeded failed errored timeout)}],
              [100, 100, 100, 0, 0, 0], "$what: 100 requests done, 100 succeeded")
        or diag $r->{output};
    is($r->{status}{'2xx'}, 100, "$what: 100 answers 2xx") or diag $r->{output};
    my $lines = wait_access_lines($offset, 100);
    my %conns = map { (split ' ', $_)[0] => 1 } @$lines;
    my %what = map { join(' ', (split ' ', $_)[1 .. 4]) => 1 } @$lines;
    is(scalar keys %conns, 1, "$what: nginx saw the 100 on one connection");
    is(scalar keys %what, 1, "$what: every answer the same: HTTP/2.0, 200, claimed, one item")
        or diag explain [sort keys %what];
    my ($line) = keys %what;
    my $item = (split ' ', $line // '')[3];
    my @problems = AQ::answers_problems([[$item, 1, $key]], queue => $q);
    is_deeply(\@problems, [], "$what: that item is held by the key at version 1");
    is_deeply(AQ::counts($q), { available => 9, claimed => 1, completed => 0 },
              "$what: the key holds one item, the rest are available");
}

for my $t (qw(tls h2c)) {
    multiplexed($t);
    h2load_one_key($t);
}

# ---------------------------------------------------------------------------
# RST_STREAM while claims wait: stream 1 at the gate in PostgreSQL (the
# pool's one connection), streams 3 .. 15 waiting for that connection;
# streams 1, 5 and 9 reset (CANCEL).

sub canceled_streams {
    my ($since) = @_;
    return [sort { $a <=> $b } log_since($since) =~ /client canceled stream (\d+)/g];
}

sub reset_streams {
    my ($t) = @_;
    my $what = "$t: RST_STREAM";
    my $q = AQ::queue($org, "reset-$t");
    AQ::enqueue_many($q, 20);
    my @keys = @{ AQ::keys_for($org, 9) };
    my $since = log_len();

    my $gate = AQ::Faults::close_gate(AQ::Faults::session());
    my $h2 = AQ::H2::Conn->new(port => $port{$t}, tls => $t eq 'tls');
    my %sid;
    $sid{ $keys[0] } = $h2->post(key => $keys[0], body => qq({"queue_id":"$q"}));
    my $at_gate = AQ::Faults::wait_until(10, sub { $h2->pump(0); AQ::Faults::backends(lock => 1) == 1 });
    ok($at_gate, "$what: the first stream's claim waits at the gate in PostgreSQL")
        or diag explain AQ::Faults::backend_rows();
    $sid{$_} = $h2->post(key => $_, body => qq({"queue_id":"$q"})) for @keys[1 .. 7];
    my $waiting = AQ::Faults::wait_until(10, sub {
        $h2->pump(0); AQ::Faults::pool_state($sport)->{waiting} == 7 });
    ok($waiting, "$what: 7 more streams' claims wait for the pool's connection")
        or diag explain AQ::Faults::pool_state($sport);
    is_deeply([map { $sid{$_} } @keys[0 .. 7]], [1, 3, 5, 7, 9, 11, 13, 15],
              "$what: the claims are streams 1 .. 15 of one connection");

    my @reset = @keys[0, 2, 4];    # streams 1 (at the gate), 5 and 9 (waiting)
    my @kept  = @keys[1, 3, 5, 6, 7];
    $h2->reset($sid{$_}) for @reset;
    my $seen = AQ::Faults::wait_until(10, sub {
        $h2->pump(0);
        @{ canceled_streams($since) } == 3 && AQ::Faults::pool_state($sport)->{waiting} == 5 });
    is_deeply(canceled_streams($since), [1, 5, 9],
              "$what: nginx received RST_STREAM (CANCEL) for streams 1, 5 and 9, and no other "
              . '("client canceled stream N" in its log)');
    ok($seen, "$what: the two waiting streams reset leave the wait list (5 wait)")
        or diag explain AQ::Faults::pool_state($sport);
    ok(AQ::Faults::alive($worker->[0]), "$what: the worker lives");

    AQ::Faults::open_gate($gate);
    my @answers;
    my @out;
    for my $k (@kept) {
        my $r = $h2->response($sid{$k});
        push @out, outcome($r);
        my $it = body_of($r->{body})->{item} or next;
        push @answers, [$it->{id}, $it->{version}, $k, $sid{$k}];
    }
    is_deeply(\@out, [('200 item') x 5], "$what: the other 5 streams of the connection are answered 200")
        or diag explain \@out;
    my @problems = AQ::answers_problems(\@answers, queue => $q);
    is_deeply(\@problems, [], "$what: each an item its own key holds, at the version answered, none twice")
        or diag explain \@problems;

    # The claim reset at the gate had been sent: it commits (its item comes
    # back at the lease's end, or to the same key's next claim); the claims
    # reset while they waited never ran.
    my $held = sub {
        return scalar AQ::dbh()->selectrow_array(
            q{SELECT count(*) FROM annotation_queue.items
               WHERE queue_id = ? AND claimed_by = ?}, undef, $q, AQ::key_id($_[0]));
    };
    my $committed = AQ::Faults::wait_until(10, sub { $held->($reset[0]) == 1 });
    ok($committed, "$what: the claim reset at the gate committed (as a vanished HTTP/1 client's does)");
    is_deeply([map { $held->($_) } @reset[1, 2]], [0, 0],
              "$what: the claims reset while waiting never ran (their keys hold nothing)");
    is_deeply(AQ::counts($q), { available => 14, claimed => 6, completed => 0 },
              "$what: 6 items claimed (5 answered, 1 for the stream reset at the gate)");

    # the same connection serves on, and the reset key gets its item back
    my $sid = $h2->post(key => $reset[0], body => qq({"queue_id":"$q"}));
    my $r = $h2->response($sid);
    my $it = body_of($r->{body})->{item} || {};
    is(outcome($r), '200 item', "$what: a new stream on the same connection answers 200");
    is_deeply([AQ::answers_problems([[$it->{id}, $it->{version}, $reset[0]]], queue => $q)], [],
              "$what: ... with the item the reset stream's claim had taken (resumed, same version)");
    ok(!$h2->closed, "$what: nginx kept the connection open") or diag $h2->closed;
    $h2->close;

    my $idle = AQ::Faults::wait_until(10, sub {
        my $p = AQ::Faults::pool_state($sport);
        $p->{busy} == 0 && $p->{waiting} == 0 && $p->{idle} == 1 });
    ok($idle, "$what: the pool is back to one idle connection") or diag explain AQ::Faults::pool_state($sport);
}

# The whole connection goes (TCP closed, no GOAWAY) while one claim waits at
# the gate and two wait for the connection.
sub drop_connection {
    my ($t) = @_;
    my $what = "$t: connection dropped";
    my $q = AQ::queue($org, "drop-$t");
    AQ::enqueue_many($q, 5);
    my @keys = @{ AQ::keys_for($org, 3) };
    my $gate = AQ::Faults::close_gate(AQ::Faults::session());
    my $h2 = AQ::H2::Conn->new(port => $port{$t}, tls => $t eq 'tls');
    $h2->post(key => $keys[0], body => qq({"queue_id":"$q"}));
    AQ::Faults::wait_until(10, sub { $h2->pump(0); AQ::Faults::backends(lock => 1) == 1 });
    $h2->post(key => $_, body => qq({"queue_id":"$q"})) for @keys[1, 2];
    my $waiting = AQ::Faults::wait_until(10, sub {
        $h2->pump(0); AQ::Faults::pool_state($sport)->{waiting} == 2 });
    ok($waiting, "$what: one claim at the gate, two waiting")
        or diag explain AQ::Faults::pool_state($sport);
    $h2->drop;
    my $left = AQ::Faults::wait_until(10, sub { AQ::Faults::pool_state($sport)->{waiting} == 0 });
    ok($left, "$what: the waiting claims leave the list");
    AQ::Faults::open_gate($gate);
    my $idle = AQ::Faults::wait_until(10, sub {
        my $p = AQ::Faults::pool_state($sport);
        $p->{busy} == 0 && $p->{idle} == 1 });
    ok($idle, "$what: the claim at the gate ends, the pool has its connection idle")
        or diag explain AQ::Faults::pool_state($sport);
    is_deeply(AQ::counts($q), { available => 4, claimed => 1, completed => 0 },
              "$what: only the claim that had been sent committed");
    my $r = AQ::H2::curl(port => $port{$t}, tls => $t eq 'tls', key => AQ::key($org),
                         body => qq({"queue_id":"$q"}));
    is(outcome($r), '200 item', "$what: a new connection's claim answers 200");
}

# ---------------------------------------------------------------------------
# Long-polling claims over HTTP/2: three streams of one connection wait
# (Prefer: wait=10) on an empty queue, parked in nginx (not in PostgreSQL,
# not in the pool's wait list); the middle one is reset (RST_STREAM) while
# it waits and leaves its place; two items enqueued go to the other two,
# one each, with Preference-Applied; then nobody waits.

sub claim_waiters {
    my $m = AQ::Faults::status($sport) or return -1;
    my $n = 0;
    while (my ($k, $v) = each %$m) {
        $n += $v if $k =~ /^annotation_queue_claim_waiters\{.*worker="all"/;
    }
    return $n;
}

sub long_poll {
    my ($t) = @_;
    my $what = "$t: long-poll";
    my $q = AQ::queue($org, "wait-$t");
    my @keys = @{ AQ::keys_for($org, 3) };
    my $since = log_len();
    my $h2 = AQ::H2::Conn->new(port => $port{$t}, tls => $t eq 'tls');
    my @sid = map { $h2->post(key => $_, body => qq({"queue_id":"$q"}),
                              headers => [prefer => 'wait=10']) } @keys;
    my $parked = AQ::Faults::wait_until(10, sub { $h2->pump(0); claim_waiters() == 3 });
    ok($parked, "$what: 3 streams of one connection wait, parked in nginx")
        or diag 'waiters: ' . claim_waiters();
    is(scalar(grep { $h2->answered($_) } @sid), 0, "$what: none is answered yet");
    is(AQ::Faults::pool_state($sport)->{waiting}, 0,
       "$what: none waits for the pool's connection (the database is not asked)");

    $h2->reset($sid[1]);
    my $left = AQ::Faults::wait_until(10, sub {
        $h2->pump(0); claim_waiters() == 2 && @{ canceled_streams($since) } == 1 });
    ok($left, "$what: the stream reset while it waits leaves (2 wait)")
        or diag 'waiters: ' . claim_waiters();
    is_deeply(canceled_streams($since), [$sid[1]],
              "$what: nginx received RST_STREAM (CANCEL) for that stream only");

    my @ids = map { AQ::enqueue($q, undef, qq({"n": $_})) } 1, 2;
    my (@out, @answers);
    for my $i (0, 2) {
        my $r = $h2->response($sid[$i]);
        push @out, outcome($r) . ', Preference-Applied: '
                   . ($r->{headers}{'preference-applied'} // 'none');
        my $it = body_of($r->{body})->{item} or next;
        push @answers, [$it->{id}, $it->{version}, $keys[$i], $sid[$i]];
    }
    is_deeply(\@out, [('200 item, Preference-Applied: wait=10') x 2],
              "$what: the two streams still waiting are answered 200 when items come")
        or diag explain \@out;
    is_deeply([sort map { $_->[0] } @answers], [sort @ids],
              "$what: ... with the two items enqueued, one each");
    is_deeply([AQ::answers_problems(\@answers, queue => $q)], [],
              "$what: each held by its own key, at the version answered");
    ok(AQ::Faults::wait_until(10, sub { claim_waiters() == 0 }),
       "$what: nobody waits any more");
    is(scalar AQ::dbh()->selectrow_array(
           q{SELECT count(*) FROM annotation_queue.items WHERE claimed_by = ?},
           undef, AQ::key_id($keys[1])),
       0, "$what: the reset stream's key holds nothing");
    ok(!$h2->closed, "$what: nginx kept the connection open") or diag $h2->closed;
    $h2->close;
}

for my $t (qw(tls h2c)) {
    reset_streams($t);
    drop_connection($t);
    long_poll($t);
}

is_deeply(AQ::Faults::worker_pids($ngx), $worker, 'the worker is the same process throughout');
$ngx->stop;
my $log = $ngx->error_log;
my @bad = grep { /\[(?:error|alert|crit|emerg)\]|exited on signal|core dumped/ } split /\n/, $log;
is_deeply(\@bad, [], 'nothing at [error], [alert], [crit] or [emerg] in the error log, no crash');
my @keys_logged = grep { /aqk_[0-9a-f]{20}/ } split /\n/, $log;
is_deeply(\@keys_logged, [], 'no API key in the error log');

done_testing();
