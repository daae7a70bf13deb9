# The ways the module connects to PostgreSQL (README, annotation_queue_database:
# "any libpq connection string ... unix socket directories, sslmode"), each
# through a full round of the rater's workflow (claim, extend, complete) on
# an nginx of its own, whose error log must then hold no [error]:
#
#   - TLS: sslmode=require to a server with a self-signed certificate made
#     at test time; the server sees the module's session encrypted
#     (pg_stat_ssl.ssl of the backend whose application_name is
#     nginx_annotation_queue), and the role may not connect without TLS;
#     sslmode=verify-full with that certificate as the root, and with an
#     unrelated root (503 database_unavailable, the cause logged); the
#     server's ssl turned off: sslmode=require answers 503 with the cause
#     logged, and again (nothing hangs), and once ssl is back on the same
#     nginx claims again without a reload;
#   - a password-authenticated role (scram-sha-256): the right password
#     answers 200; a wrong one, or none in the conninfo, answer 503
#     database_unavailable with libpq's error logged, and no password ever
#     appears in nginx's error log;
#   - sslmode=prefer to a server that refuses the role over TLS: libpq
#     starts again without TLS on a new socket inside one connection attempt
#     (the module must follow the socket), and the claim succeeds in clear;
#   - a unix socket (host=<socket directory>, peer authentication): 200,
#     and the backend has no client address (it came over the socket); a
#     directory without the server's socket answers 503.
#
# Every 503 must carry libpq's cause in the error log and reach the client
# before its timeout, a third of the module's connect timeout: the failure
# is seen when libpq sees it, never left to the module's timer.
#
# The suite runs its own PostgreSQL cluster (t/lib/AQ/Cluster.pm: TLS,
# roles, pg_hba.conf).
use strict;
use warnings;

use lib 't/lib';
BEGIN { require AQ::Cluster; AQ::Cluster::start() }
use AQ;
use DBI;
use JSON::PP ();
use Test::More;
use Time::HiRes ();

AQ::Cluster::grant();

my %PW   = %AQ::Cluster::PASSWORD;
my $PORT = $AQ::Cluster::PG{port};
my $JSON = JSON::PP->new->utf8->canonical;

my $org   = AQ::org('connection');
my $queue = AQ::queue($org, 'connection');
AQ::enqueue_many($queue, 40);
my @keys = @{ AQ::keys_for($org, 40) };
sub fresh_key { return shift(@keys) // die "out of keys\n" }

my %URI = (
    claim    => $AQ::URI,
    extend   => '/api/v1/annotations/extend',
    complete => '/api/v1/annotations/complete',
);

my $CLIENT_TIMEOUT  = 10;    # seconds, times AQ::slow() (AQ::Client)
my $CONNECT_TIMEOUT = 3 * $CLIENT_TIMEOUT;

my $JSON_TYPE = qr{^application/json(?:;\s*charset=utf-8)?$};

# ---------------------------------------------------------------------------
# nginx and the module's backends

# One worker, a pool of one connection (so the backend found in
# pg_stat_activity is the one that served the round), the error log at
# debug level (no password even there); returns (nginx, port of the server
# with the workflow's locations).
#
# The connect timeout is three times the clients' timeout: a failure must
# come from what libpq saw, not from the module's timer (a connection
# attempt that hung until the timer would leave the client without an
# answer).
sub nginx_on {
    my ($dsn) = @_;
    my $port = AQ::free_port();
    my $connect = $CONNECT_TIMEOUT * AQ::slow();
    my $ngx = AQ::start_nginx(workers => 1, dsn => $dsn, log_level => 'debug',
                              http => <<"_EOC_");
    annotation_queue_pool_size 1;
    annotation_queue_connect_timeout ${connect}s;

    server {
        listen 127.0.0.1:$port;
        location = $URI{claim}    { annotation_queue_claim; }
        location = $URI{extend}   { annotation_queue_extend; }
        location = $URI{complete} { annotation_queue_complete; }
    }
_EOC_
    return ($ngx, $port);
}

# The module's sessions as role $role: [{pid, application_name, client_addr,
# client_port, ssl, version}]
sub backends_of {
    my ($role) = @_;
    return AQ::dbh()->selectall_arrayref(
        q{SELECT a.pid, a.application_name, a.client_addr::text AS client_addr,
                 a.client_port, s.ssl, s.version
            FROM pg_stat_activity AS a LEFT JOIN pg_stat_ssl AS s USING (pid)
           WHERE a.datname = current_database() AND a.usename = ?
             AND a.application_name = 'nginx_annotation_queue'
           ORDER BY a.pid}, { Slice => {} }, $role);
}

# Stops nginx and waits until its backends are gone (the next case of the
# same role must find its own).
sub stop_nginx {
    my ($ngx, $role) = @_;
    $ngx->stop;
    my $deadline = Time::HiRes::time() + 10 * AQ::slow();
    while (@{ backends_of($role) } && Time::HiRes::time() < $deadline) {
        Time::HiRes::sleep(0.05);
    }
}

# [error], [crit], [alert] and [emerg] lines, and crashed workers.
sub error_lines {
    my ($log) = @_;
    return [grep { /\[(?:error|crit|alert|emerg)\]|exited on signal|core dumped/ }
            split /\n/, $log];
}

# [crit], [alert] and [emerg] lines, and crashed workers.
sub problems_of {
    my ($log) = @_;
    return [grep { /\[(?:crit|alert|emerg)\]|exited on signal|core dumped/ }
            split /\n/, $log];
}

# Which of the passwords appear in a text (the wrong ones of the cases
# below contain the right ones).
sub leaked {
    my ($text) = @_;
    return [grep { index($text, $PW{$_}) >= 0 } sort keys %PW];
}

# ---------------------------------------------------------------------------
# Requests

sub decode { my $d = eval { $JSON->decode($_[0] // '') }; return ref $d eq 'HASH' ? $d : undef }

# "200", or what went wrong with a 200 JSON answer of the workflow.
sub ok_answer {
    my ($status, $h, $body, $err) = @_;
    return "no answer: $err" if !$status;
    my @p;
    push @p, "status $status: $body" if $status != 200;
    push @p, 'Content-Type ' . ($h->{'content-type'} // 'none')
        unless ($h->{'content-type'} // '') =~ $JSON_TYPE;
    push @p, 'Cache-Control ' . ($h->{'cache-control'} // 'none')
        unless ($h->{'cache-control'} // '') =~ /\bno-store\b/;
    my $d = decode($body);
    push @p, "not a success: $body" unless $d && $d->{success} && ref $d->{item} eq 'HASH';
    return @p ? join('; ', @p) : '200';
}

# claim, extend, complete by a fresh key on one client connection: the
# answers, then the item's row.  Returns a list of problems (none: the round
# went through and the database agrees).
sub round {
    my ($port) = @_;
    my $key = fresh_key();
    my $c = AQ::Client->new(port => $port, timeout => $CLIENT_TIMEOUT);
    my @p;

    my ($status, $h, $body, $err) = $c->claim($queue, $key);
    my $ok = ok_answer($status, $h, $body, $err);
    return ("claim: $ok") if $ok ne '200';
    my (undef, $problems) = AQ::inspect($body);
    push @p, map { "claim: $_" } @$problems;
    my $it = decode($body)->{item};
    my ($id, $v) = @$it{qw(id version)};

    ($status, $h, $body, $err) = $c->request(
        uri => $URI{extend}, key => $key,
        body => $JSON->encode({ item_id => $id, version => $v }));
    $ok = ok_answer($status, $h, $body, $err);
    return (@p, "extend: $ok") if $ok ne '200';
    my $ex = decode($body)->{item};
    push @p, "extend: answered $ex->{status} v$ex->{version}, want claimed v$v"
        unless $ex->{id} eq $id && $ex->{status} eq 'claimed' && $ex->{version} == $v;

    ($status, $h, $body, $err) = $c->request(
        uri => $URI{complete}, key => $key,
        body => $JSON->encode({ item_id => $id, version => $v,
                                result => { label => 'good' } }));
    $ok = ok_answer($status, $h, $body, $err);
    return (@p, "complete: $ok") if $ok ne '200';
    my $co = decode($body)->{item};
    push @p, "complete: answered $co->{status} v$co->{version}, want completed v" . ($v + 1)
        unless $co->{id} eq $id && $co->{status} eq 'completed' && $co->{version} == $v + 1;

    my $row = AQ::dbh()->selectrow_hashref(
        q{SELECT status, version, result::text AS result
            FROM annotation_queue.items WHERE id = ?}, undef, $id);
    my $want = 'completed v' . ($v + 1) . ' {"label": "good"}';
    my $got = $row ? "$row->{status} v$row->{version} " . ($row->{result} // 'NULL')
                   : 'no row';
    push @p, "database: $got, want $want" unless $got eq $want;
    return @p;
}

# A claim that must fail for want of the database: "503" or what differs.
sub unavailable {
    my ($port) = @_;
    my $c = AQ::Client->new(port => $port, timeout => $CLIENT_TIMEOUT);
    my ($status, $h, $body, $err) = $c->claim($queue, fresh_key());
    return "no answer: $err" if !$status;
    my @p;
    my $d = decode($body);
    my $code = $d && ref $d->{error} eq 'HASH' ? $d->{error}{code} // '' : '';
    push @p, "$status $body" unless $status == 503 && $code eq 'database_unavailable'
                                     && JSON::PP::is_bool($d->{success}) && !$d->{success};
    push @p, 'Retry-After ' . ($h->{'retry-after'} // 'none')
        unless ($h->{'retry-after'} // '') =~ /^\d+$/;
    push @p, 'Content-Type ' . ($h->{'content-type'} // 'none')
        unless ($h->{'content-type'} // '') =~ $JSON_TYPE;
    return @p ? join('; ', @p) : '503';
}

# ---------------------------------------------------------------------------
# A way that works: a full round, the backend as the server sees it, a
# clean error log.  Returns the backend's row.

sub works {
    my ($what, $dsn, $role, %o) = @_;
    my ($ngx, $port) = nginx_on($dsn);

    my @p = round($port);
    is_deeply(\@p, [], "$what: claim, extend and complete answer 200 and the database agrees")
        or diag explain \@p;

    my $b = backends_of($role);
    is(scalar @$b, 1, "$what: the server has one session of role $role "
                      . "with application_name nginx_annotation_queue")
        or diag explain $b;
    my $row = $b->[0] // {};

    is_deeply(error_lines($ngx->error_log), [], "$what: no [error] in nginx's error log");
    is_deeply(leaked($ngx->error_log), [], "$what: no password in nginx's error log")
        if $o{secret};

    stop_nginx($ngx, $role);
    return $row;
}

# A way that must fail: two claims on new client connections, each 503
# database_unavailable JSON with Retry-After (the second shows that the
# first left nothing stuck), the cause in the error log.
sub fails {
    my ($what, $dsn, $role, $cause) = @_;
    my ($ngx, $port) = nginx_on($dsn);
    my @out = (unavailable($port), unavailable($port));
    is_deeply(\@out, ['503', '503'],
              "$what: claims answer 503 database_unavailable with Retry-After, "
              . "one after the other")
        or diag explain \@out;
    my $log = $ngx->error_log;
    like($log, qr/\[error\].*could not connect to PostgreSQL:.*$cause/,
         "$what: the error log says why")
        or diag $log;
    note "$what: $_" for grep { /\[error\]/ } split /\n/, $log;
    is_deeply(problems_of($log), [], "$what: no [crit], [alert], [emerg] or crash");
    is_deeply(leaked($log), [], "$what: no password in nginx's error log");
    is_deeply(backends_of($role), [], "$what: the server has no session of the module");
    $ngx->stop;
}

# ---------------------------------------------------------------------------
# The cluster is what the cases below assume.

sub dbi_error {
    my (%o) = @_;
    my $dsn = join ';', "dbi:Pg:host=127.0.0.1;port=$PORT;dbname=$AQ::DB",
              map { "$_=$o{$_}" } grep { $_ ne 'user' && $_ ne 'password' } sort keys %o;
    my $h = DBI->connect($dsn, $o{user}, $o{password},
                         { RaiseError => 0, PrintError => 0 });
    return 'connected' if $h && $h->disconnect;
    return $DBI::errstr // 'failed';
}

like(dbi_error(user => 'aq_tls', password => $PW{aq_tls}, sslmode => 'disable'),
     qr/pg_hba\.conf rejects connection .* no encryption/,
     'cluster: aq_tls may not connect without TLS (its 200s below went over TLS)');
like(dbi_error(user => 'aq_pw', password => $PW{aq_pw}, sslmode => 'require'),
     qr/pg_hba\.conf rejects connection .* SSL encryption/,
     'cluster: aq_pw may not connect over TLS');
like(dbi_error(user => 'aq_pw', password => $PW{aq_pw}, sslmode => 'disable'),
     qr/^connected$/, 'cluster: aq_pw connects in clear with its password');

# ---------------------------------------------------------------------------
# TLS

my $tls = sub {
    return AQ::Cluster::conninfo(host => '127.0.0.1', port => $PORT, user => 'aq_tls',
                                 password => $PW{aq_tls}, @_);
};

{
    my $what = 'TLS, sslmode=require, self-signed certificate';
    my $b = works($what, $tls->(sslmode => 'require'), 'aq_tls', secret => 1);
    ok($b->{ssl}, "$what: pg_stat_ssl says the module's session is encrypted")
        or diag explain $b;
    note "$what: $b->{version}" if $b->{version};
}

{
    my $what = 'TLS, sslmode=verify-full, the certificate as root';
    my $b = works($what, $tls->(sslmode => 'verify-full',
                                sslrootcert => $AQ::Cluster::SERVER_CRT),
                  'aq_tls', secret => 1);
    ok($b->{ssl}, "$what: pg_stat_ssl says the module's session is encrypted")
        or diag explain $b;
}

fails('TLS, sslmode=verify-full, another root',
      $tls->(sslmode => 'verify-full', sslrootcert => $AQ::Cluster::OTHER_CRT),
      'aq_tls', qr/certificate verify failed/);

{
    my $what = 'TLS, sslmode=require, the server\'s ssl off';
    AQ::Cluster::set_ssl(0);
    my ($ngx, $port) = nginx_on($tls->(sslmode => 'require'));
    my @out = eval { (unavailable($port), unavailable($port)) };
    my $died = $@;
    my $log = $ngx->error_log;
    AQ::Cluster::set_ssl(1);
    die $died if $died;

    is_deeply(\@out, ['503', '503'],
              "$what: claims answer 503 database_unavailable with Retry-After, "
              . "one after the other")
        or diag explain \@out;
    my $cause = 'server does not support SSL, but SSL was required';
    like($log, qr/\[error\].*could not connect to PostgreSQL:.*\Q$cause\E/,
         "$what: the error log says why")
        or diag $log;
    note "$what: $_" for grep { /\[error\]/ } split /\n/, $log;
    is_deeply(problems_of($log), [], "$what: no [crit], [alert], [emerg] or crash");

    my $n = () = $ngx->error_log =~ /\[error\]/g;
    my @p = round($port);
    is_deeply(\@p, [], "$what, then on again: the same nginx claims, extends and "
                       . "completes without a reload")
        or diag explain \@p;
    my $b = backends_of('aq_tls');
    ok(@$b == 1 && $b->[0]{ssl}, "$what, then on again: its session is encrypted")
        or diag explain $b;
    my $m = () = $ngx->error_log =~ /\[error\]/g;
    is($m, $n, "$what, then on again: no new [error] in nginx's error log");
    is_deeply(leaked($ngx->error_log), [], "$what: no password in nginx's error log");
    stop_nginx($ngx, 'aq_tls');
}

# ---------------------------------------------------------------------------
# A password-authenticated role (scram-sha-256), in clear

my $pw = sub {
    return AQ::Cluster::conninfo(host => '127.0.0.1', port => $PORT, user => 'aq_pw', @_);
};

{
    my $what = 'password, the right one';
    my $b = works($what, $pw->(password => $PW{aq_pw}, sslmode => 'disable'), 'aq_pw',
                  secret => 1);
    ok(defined $b->{ssl} && !$b->{ssl}, "$what: the session is in clear (sslmode=disable)")
        or diag explain $b;
}

fails('password, a wrong one', $pw->(password => "wrong-$PW{aq_pw}", sslmode => 'disable'),
      'aq_pw', qr/password authentication failed for user "aq_pw"/);

fails('password, none in the conninfo (nor in the passfile)',
      $pw->(passfile => $AQ::Cluster::EMPTY_PASSFILE, sslmode => 'disable'),
      'aq_pw', qr/no password supplied/);

{
    my $what = 'sslmode=prefer, the role refused over TLS';
    my $refusals = sub {
        my $refused = 'pg_hba.conf rejects connection for host "127.0.0.1", '
                      . qq{user "aq_pw", database "$AQ::DB", SSL encryption};
        my $n = () = AQ::Cluster::log_text() =~ /\Q$refused\E/g;
        return $n;
    };
    my $before = $refusals->();
    my $b = works($what, $pw->(password => $PW{aq_pw}, sslmode => 'prefer'), 'aq_pw',
                  secret => 1);
    ok(defined $b->{ssl} && !$b->{ssl},
       "$what: libpq fell back to a plain connection and the module followed it")
        or diag explain $b;
    cmp_ok($refusals->(), '>', $before,
           "$what: the server did refuse the TLS attempt first");
}

# ---------------------------------------------------------------------------
# A unix socket, peer authentication

{
    my $role = $AQ::Cluster::PEER_ROLE;
    my $what = "unix socket, peer authentication as $role";
    my $b = works($what, AQ::Cluster::conninfo(host => $AQ::Cluster::SOCKET_DIR,
                                               port => $PORT, user => $role), $role);
    ok(exists $b->{client_addr} && !defined $b->{client_addr},
       "$what: the backend has no client address (it came over the socket)")
        or diag explain $b;
    is($b->{client_port}, -1, "$what: client_port is -1 (a unix socket)")
        or diag explain $b;
}

fails('unix socket, a directory without the server\'s socket',
      AQ::Cluster::conninfo(host => "$AQ::Cluster::TMP/nowhere", port => $PORT,
                            user => $AQ::Cluster::PEER_ROLE),
      $AQ::Cluster::PEER_ROLE, qr/No such file or directory/);

done_testing();
