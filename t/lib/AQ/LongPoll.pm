package AQ::LongPoll;

# Helpers of t/190-longpoll.t (long-polling claims, Prefer: wait=N) and of
# bench/longpoll.sh, on top of t/lib/AQ.pm and t/lib/AQ/Faults.pm:
#
#   my $lp = AQ::LongPoll::start(workers => 1, max_wait => '30s');
#   my $c = AQ::LongPoll::wait_claim($lp, $queue, $key, 'wait=5');   # sent
#   AQ::LongPoll::wait_parked($lp, 1);     # the status page shows 1 waiter
#   my $res = $c->read_response;           # { status, headers, body }
#
# Nothing sleeps for synchronisation: a test waits (AQ::Faults::wait_until)
# for the waiters the status page counts, for backends in
# pg_stat_activity, or for the answer itself.

use strict;
use warnings;

use AQ;
use AQ::Faults;
use JSON::PP ();
use Time::HiRes ();

our %URI = (
    claim   => $AQ::URI,
    nowait  => '/nowait/claim',
    release => '/api/v1/annotations/release',
    skip    => '/api/v1/annotations/skip',
);

my $JSON = JSON::PP->new->utf8->allow_bignum->canonical;

# A standalone nginx: the claim (annotation_queue_max_wait as given), a claim
# location with waiting off, release, skip, and the status page on a port
# of its own ({sport}).
sub start {
    my (%o) = @_;
    my $sport = AQ::free_port();
    my $max = $o{max_wait} // '30s';
    $o{pool_size} //= 4;
    $o{http} //= '';
    my $http = <<"_EOC_";
    annotation_queue_pool_size $o{pool_size};
    annotation_queue_max_wait $max;
$o{http}
    server {
        listen 127.0.0.1:$sport;
        location = $AQ::Faults::STATUS_URI {
            annotation_queue_status;
        }
        location = $URI{nowait} {
            annotation_queue_max_wait 0;
            annotation_queue_claim;
        }
        location = $URI{release} {
            annotation_queue_release;
        }
        location = $URI{skip} {
            annotation_queue_skip;
        }
    }
_EOC_
    my $ngx = AQ::start_nginx(workers => $o{workers} // 1,
                              worker_connections => $o{worker_connections} // 4096,
                              log_level => $o{log_level} // 'info',
                              http => $http);
    $ngx->{sport} = $sport;
    return $ngx;
}

# A claim sent with "Prefer: $prefer" (none when undef) on its own
# connection; read its answer with $c->read_response.  Options: port
# (another server's), uri, timeout (seconds, times AQ::slow()).
sub wait_claim {
    my ($ngx, $queue, $key, $prefer, %o) = @_;
    my $c = AQ::Client->new(port => $o{port} // $ngx->{port},
                            timeout => $o{timeout} // 20);
    my %h;
    $h{Prefer} = $prefer if defined $prefer;
    my $err = $c->send_request(body => qq({"queue_id":"$queue"}), key => $key,
                               uri => $o{uri} // $URI{claim}, headers => \%h);
    die "wait_claim: $err\n" if $err;
    $c->{sent_at} = Time::HiRes::time();
    return $c;
}

# The samples of the status page summed over its pools ("all" workers):
# { waiters, wakeups }, -1 when the page does not answer.
sub gauges {
    my ($ngx) = @_;
    my $m = AQ::Faults::status($ngx->{sport})
        or return { waiters => -1, wakeups => -1 };
    my %g = (waiters => 0, wakeups => 0);
    while (my ($k, $v) = each %$m) {
        next unless $k =~ /worker="all"/;
        $g{waiters} += $v if $k =~ /^annotation_queue_claim_waiters\{/;
        $g{wakeups} += $v if $k =~ /^annotation_queue_claim_wakeups_total\{/;
    }
    return \%g;
}

# Waits until the status page counts $n parked waiters (10 s, times
# AQ::slow(), or $timeout): true when it did.
sub wait_parked {
    my ($ngx, $n, $timeout) = @_;
    return AQ::Faults::wait_until($timeout // 10,
                                  sub { gauges($ngx)->{waiters} == $n });
}

# The decoded body of an answer, or undef.
sub body {
    my ($res) = @_;
    my $d = eval { $JSON->decode($res->{body} // '') };
    return ref $d eq 'HASH' ? $d : undef;
}

# "200 <item id>", "409 no_items_available", "0 <error>": an answer, short.
sub outcome {
    my ($res) = @_;
    return "0 " . ($res->{error} // 'no answer') unless $res->{status};
    my $d = body($res) // {};
    return "$res->{status} $d->{item}{id}"
        if $res->{status} == 200 && ref $d->{item} eq 'HASH';
    return "$res->{status} " . ($d->{error}{code} // 'no error code')
        if ref $d->{error} eq 'HASH';
    return "$res->{status} unexpected body";
}

# The backend pids of the LISTEN connections of the suite's database.
sub listeners {
    return AQ::dbh()->selectcol_arrayref(
        q{SELECT pid FROM pg_stat_activity
           WHERE datname = current_database()
             AND query = 'LISTEN annotation_queue' AND state = 'idle'
           ORDER BY pid});
}

# A request of another endpoint (release, skip) on a connection of its own:
# (status, body).
sub act {
    my ($ngx, $what, $key, $item, $version) = @_;
    my $c = AQ::Client->new(port => $ngx->{sport});
    my ($st, undef, $body) = $c->request(
        uri => $URI{$what}, key => $key,
        body => qq({"item_id":"$item","version":$version}));
    $c->disconnect;
    return ($st, $body);
}

# A plain claim (no Prefer): the decoded answer's item, or undef.
sub claim_now {
    my ($ngx, $queue, $key) = @_;
    my $c = AQ::Client->new(port => $ngx->{port});
    my ($st, undef, $body) = $c->claim($queue, $key);
    $c->disconnect;
    return undef unless $st && $st == 200;
    my $d = eval { $JSON->decode($body) } or return undef;
    return $d->{item};
}

1;
