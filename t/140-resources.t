# Resources nginx runs out of.
#
# worker_connections exhausted: the module's PostgreSQL socket needs one of
# the worker's connections, like a client's.  With every connection taken,
# the claim that has to open the pool's connection gets 503
# database_unavailable (JSON, Retry-After), nginx's own alert "N
# worker_connections are not enough" is in the error log, and the socket
# libpq opened is not left behind (the worker holds no socket to
# PostgreSQL); once a client goes, claims are served again on the slot it
# freed.
#
# The worker's connections: its listening socket, its channel to the master,
# the clients, the PostgreSQL sockets.  With worker_connections 4, one client
# that holds its connection (headers half sent: nginx cannot close it to
# make room, unlike an idle keep-alive connection) and the claiming client
# leave none for PostgreSQL.
#
# Nothing sleeps for nginx to have done something: each step waits (with a
# deadline times AQ::slow()) for what shows it in the error log (debug
# level: the holder's request line read; the holder gone).
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Faults;
use Test::More;

my $org   = AQ::org('resources');
my $queue = AQ::queue($org, 'resources');
AQ::enqueue_many($queue, 10);
my @keys = @{ AQ::keys_for($org, 4) };

my $ngx = AQ::start_nginx(workers => 1, worker_connections => 4,
                          log_level => 'debug', http => <<'_EOC_');
    annotation_queue_pool_size 1;
_EOC_
my $port = $ngx->port;

my $worker;

sub log_count { return AQ::Faults::log_count($ngx, $_[0]) }
sub wait_log {
    my ($re, $n) = @_;
    return AQ::Faults::wait_until(10, sub { log_count($re) >= ($n // 1) });
}

# The worker's TCP sockets to PostgreSQL's port, in any state (a socket
# libpq opened and nobody closed would be one, connected or not).
sub pg_sockets {
    my %inode;
    opendir my $d, "/proc/$worker/fd" or return -1;
    for my $fd (readdir $d) {
        my $l = readlink "/proc/$worker/fd/$fd" // next;
        $inode{$1} = 1 if $l =~ /^socket:\[(\d+)\]$/;
    }
    my $remote = sprintf ':%04X', $AQ::PG{port};
    my $n = 0;
    for my $table ('/proc/net/tcp', '/proc/net/tcp6') {
        for my $line (split /\n/, AQ::slurp($table)) {
            my @f = split ' ', $line;
            $n++ if @f > 9 && $f[2] =~ /\Q$remote\E$/ && $inode{ $f[9] };
        }
    }
    return $n;
}

# AQ::start_nginx knocked at the port to see nginx listen: that connection
# must be gone before the slots are counted.
ok(wait_log(qr/client closed connection while waiting for request/),
   'the probe connection of the start is closed by nginx')
    or diag $ngx->error_log;
my $workers = AQ::Faults::worker_pids($ngx);
is(scalar @$workers, 1, 'one worker') or diag explain $workers;
$worker = $workers->[0];

# The holder: a request line and a header, no end of the headers.
my $holder = AQ::Faults::raw_connect($port);
AQ::Faults::raw_send($holder, "GET /holder HTTP/1.1\r\nHost: localhost\r\n");
ok(wait_log(qr{http request line: "GET /holder HTTP/1\.1"}),
   'nginx has read the half-sent request of the client that holds a connection')
    or diag $ngx->error_log;

my $NOT_ENOUGH = qr/\[alert\] .*\b4 worker_connections are not enough/;
is(log_count($NOT_ENOUGH), 0, 'no connection was refused before the claim');

my $c = AQ::Client->new(port => $port);
my ($status, $h, $body, $err) = $c->claim($queue, $keys[0]);
is($status, 503, 'no connection left for PostgreSQL: the claim answers 503')
    or diag "$err / $body";
is(AQ::Faults::error_code($body), 'database_unavailable',
   'the 503 is database_unavailable')
    or diag $body;
my $d = AQ::Faults::decode($body) // {};
is_deeply([sort keys %$d], ['error', 'success'],
          'the 503 body is the error envelope');
ok(JSON::PP::is_bool($d->{success}) && !$d->{success},
   'the 503 body says success false');
like($d->{error}{message} // '', qr/\S/, 'the 503 error has a message');
like($h->{'content-type'} // '', qr{^application/json\b},
     'the 503 is application/json');
like($h->{'retry-after'} // '', qr/^\d+$/, 'the 503 carries Retry-After');
is(log_count($NOT_ENOUGH), 1,
   'the error log has nginx\'s alert "4 worker_connections are not enough"')
    or diag $ngx->error_log;
is(pg_sockets(), 0,
   'the socket libpq opened for the claim was closed: the worker holds none')
    or diag explain AQ::Faults::backend_rows();
is(AQ::counts($queue)->{claimed}, 0, 'nothing was claimed');

# The holder goes; its connection is free for PostgreSQL.
AQ::Faults::raw_close($holder);
ok(wait_log(qr/client prematurely closed connection/),
   'nginx sees the client that held a connection gone')
    or diag $ngx->error_log;

($status, $h, $body, $err) = $c->claim($queue, $keys[0]);
is($status, 200, 'with a connection free again, the claim is served (200)')
    or diag "$err / $body";
is_deeply([AQ::Faults::claim_problems($keys[0], $body)], [],
          'the item answered is held by the key at that version');

($status, $h, $body, $err) = $c->claim($queue, $keys[1]);
is($status, 200, 'the next claim (another key) is served on the kept connection')
    or diag "$err / $body";
is_deeply([AQ::Faults::claim_problems($keys[1], $body)], [],
          'its item is held by its key at that version');
is(pg_sockets(), 1, 'the worker holds its pool\'s one socket to PostgreSQL');
is(AQ::Faults::backends(), 1, 'PostgreSQL has the one backend of nginx\'s pool')
    or diag explain AQ::Faults::backend_rows();
is(log_count($NOT_ENOUGH), 1, 'no other connection was refused');
$c->disconnect;

$ngx->stop;
is_deeply(AQ::Faults::log_problems($ngx->error_log,
                                   allow => sub { $_[0] =~ $NOT_ENOUGH }),
          [], 'no other alert, crit, emerg or crash in the error log');

done_testing();
