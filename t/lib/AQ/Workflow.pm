package AQ::Workflow;

# Helpers of the suites about the rater's workflow and what surrounds it
# (t/070-workflow.t, t/080-limit.t, t/090-status.t, t/095-logging.t), on top
# of t/lib/AQ.pm:
#
#   use lib 't/lib';
#   use AQ;
#   use AQ::Workflow;
#   use Test::Nginx::Socket 'no_plan';
#
# Like AQ's, the helpers run in the "eval" sections of the blocks (before
# the first block runs) or in response filters (between two requests of a
# block): name them AQ::Workflow::... (or W::... after the alias below).

use strict;
use warnings;

use AQ;
use JSON::PP ();
use POSIX ();
use Time::HiRes ();

our %URI = (
    claim    => $AQ::URI,
    extend   => '/api/v1/annotations/extend',
    release  => '/api/v1/annotations/release',
    complete => '/api/v1/annotations/complete',
    skip     => '/api/v1/annotations/skip',
);

# The five endpoints, one location each (a block's --- config).
our $LOCATIONS = <<"_EOC_";
    location = $URI{claim} {
        annotation_queue_claim;
    }
    location = $URI{extend} {
        annotation_queue_extend;
    }
    location = $URI{release} {
        annotation_queue_release;
    }
    location = $URI{complete} {
        annotation_queue_complete;
    }
    location = $URI{skip} {
        annotation_queue_skip;
    }
_EOC_

my $JSON = JSON::PP->new->utf8->allow_bignum->canonical->allow_nonref;

my (%item_label, %queue_label, %key_name, %snapshot);

# ---------------------------------------------------------------------------
# Fixtures with names, so that answers and rows can be shown by name.

# key($org, 'alice'): a plaintext key whose holder shows as "alice".
sub key {
    my ($org, $name, %o) = @_;
    my $key = AQ::key($org, rater => $name, %o);
    $key_name{ AQ::key_id($key) } = $name;
    return $key;
}

sub queue {
    my ($org, $label, %o) = @_;
    my $id = AQ::queue($org, $label, %o);
    $queue_label{$id} = $label;
    return $id;
}

sub enqueue {
    my ($queue, $label, $payload, $priority) = @_;
    my $id = AQ::enqueue($queue, $label, $payload // { label => $label }, $priority);
    $item_label{$id} = $label;
    return $id;
}

sub id_of {
    my ($item) = @_;
    return AQ::item_id($item) // $item;
}

# Makes $key hold an item in the database, as a claim would (version + 1);
# remembers the row for unchanged().  Returns the new version.
sub hold {
    my ($item, $key, %o) = @_;
    my $lease = $o{lease} // '15 minutes';
    my ($v) = AQ::dbh()->selectrow_array(
        q{UPDATE annotation_queue.items
             SET status = 'claimed', claimed_by = ?, claimed_at = now(),
                 lease_expires_at = now() + ?::interval,
                 version = version + 1, attempts = attempts + 1
           WHERE id = ? RETURNING version},
        undef, AQ::key_id($key), $lease, id_of($item));
    snap($item);
    return $v;
}

# Sets the lease of an item to end in $interval from now.
sub set_lease {
    my ($item, $interval) = @_;
    AQ::dbh()->do(q{UPDATE annotation_queue.items
                       SET lease_expires_at = now() + ?::interval WHERE id = ?},
                  undef, $interval, id_of($item));
}

sub row {
    my ($item) = @_;
    return AQ::dbh()->selectrow_hashref(
        q{SELECT *, result::text AS result_text FROM annotation_queue.items
           WHERE id = ?}, undef, id_of($item));
}

# Remembers an item's row; unchanged() compares with it.
sub snap {
    my ($item) = @_;
    $snapshot{ id_of($item) } = row($item);
}

# "row unchanged", or "row changed: column old -> new, ...".
sub unchanged {
    my ($item) = @_;
    my $was = $snapshot{ id_of($item) } or return "no snapshot of $item";
    my $now = row($item);
    my @diff;
    for my $col (sort keys %$was) {
        my ($a, $b) = map { defined $_ ? $_ : 'NULL' } $was->{$col}, $now->{$col};
        push @diff, "$col $a -> $b" if $a ne $b;
    }
    return @diff ? 'row changed: ' . join(', ', @diff) : 'row unchanged';
}

sub holder_name {
    my ($key_id) = @_;
    return 'nobody' unless defined $key_id;
    return $key_name{$key_id} // $key_id;
}

# "claimed v1 by alice" / "available v2" / "completed v2", then the result
# as PostgreSQL stores it when there is one.
sub state_of {
    my ($item) = @_;
    my $r = row($item) or return "no item $item";
    my $s = "$r->{status} v$r->{version}";
    $s .= ' by ' . holder_name($r->{claimed_by}) if $r->{status} eq 'claimed';
    $s .= ' (claimed_by ' . holder_name($r->{claimed_by}) . ')'
        if $r->{status} ne 'claimed' && defined $r->{claimed_by};
    $s .= ", result $r->{result_text}" if defined $r->{result_text};
    return $s;
}

# Seconds rounded to 10: 899.7 -> 900, 29.99 -> 30.
sub round10 {
    my ($s) = @_;
    return POSIX::floor(($s + 5) / 10) * 10;
}

# "lease 900s" (the lease left in the database, rounded to 10 s) or
# "lease null".
sub lease_db {
    my ($item) = @_;
    my ($left) = AQ::dbh()->selectrow_array(
        q{SELECT extract(epoch FROM lease_expires_at - now())
            FROM annotation_queue.items WHERE id = ?}, undef, id_of($item));
    return defined $left ? 'lease ' . round10($left) . 's' : 'lease null';
}

# ---------------------------------------------------------------------------
# Requests.

# --- request eval: a POST of this body (a string or a Perl structure) to an
# endpoint (claim, extend, release, complete).
sub req {
    my ($action, $body) = @_;
    my $uri = $URI{$action} // $action;
    $body = $JSON->encode($body) if ref $body;
    return "POST $uri\n$body";
}

# act('extend', 'label', 1) / act('complete', 'label', 1, result => {...})
sub act {
    my ($action, $item, $version, %more) = @_;
    return req($action, { item_id => id_of($item), version => $version, %more });
}

sub claim {
    my ($queue) = @_;
    return req('claim', { queue_id => $queue });
}

# ---------------------------------------------------------------------------
# Answers: --- response_body_filters eval

my $UUID_RE = qr/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

# The canonical text of an extend / release / complete answer: sorted keys,
# ids as <item:label> and <queue:label>, a timestamp as <ts>; then
# "problems" when the answer is not the documented shape or differs from the
# item's row.  Error answers as AQ::canon has them.
sub answer {
    my ($raw) = @_;
    my $doc = eval { $JSON->decode($raw) };
    return "not JSON: $raw\n" unless ref $doc eq 'HASH';
    return AQ::canon($raw) unless ref $doc->{item} eq 'HASH';

    my @p;
    push @p, 'success is not true'
        unless JSON::PP::is_bool($doc->{success}) && $doc->{success};
    push @p, AQ::same_keys('body', $doc, qw(success item));
    my $it = $doc->{item};
    push @p, AQ::same_keys('item', $it, qw(id queue_id status version
                                           lease_expires_at));
    my $id = $it->{id};
    my $row = (defined $id && !ref $id && $id =~ $UUID_RE) ? AQ::item($id) : undef;
    if (!$row) {
        push @p, 'item.id is not the id of an item: ' . ($id // 'null');
    } else {
        push @p, "item.queue_id is not the item's queue"
            unless ($it->{queue_id} // '') eq $row->{queue_id};
        push @p, "item.status " . ($it->{status} // 'null')
                 . " != $row->{status} in the database"
            unless ($it->{status} // '') eq $row->{status};
        my $v = $it->{version};
        push @p, 'item.version is not an integer'
            unless defined $v && !ref $v && $v =~ /^\d+$/;
        push @p, 'item.version ' . ($v // 'null')
                 . " != $row->{version} in the database"
            unless defined $v && $v eq $row->{version};
        my $ts = $it->{lease_expires_at};
        if (defined $row->{lease_expires_at_utc}) {
            my $got = AQ::ts_micro($ts);
            push @p, 'item.lease_expires_at ' . ($ts // 'null') . ' != '
                     . "$row->{lease_expires_at_utc} in the database"
                unless defined $got && $got eq $row->{lease_expires_at_utc};
        } elsif (defined $ts) {
            push @p, "item.lease_expires_at $ts, NULL in the database";
        }
    }
    $it->{id} = '<item:' . ($item_label{$id} // $id) . '>' if $row;
    my $q = $it->{queue_id};
    $it->{queue_id} = '<queue:' . $queue_label{$q} . '>'
        if defined $q && !ref $q && $queue_label{$q};
    $it->{lease_expires_at} = '<ts>' if defined AQ::ts_micro($it->{lease_expires_at});
    $doc->{problems} = \@p if @p;
    return AQ::canonical_json($doc) . "\n";
}

# One line: "extended <label> v1 claimed, lease 900s" ("lease null" once
# released or completed; the lease left as the answer says, rounded to
# 10 s), "error <code>", then the problems of answer().
sub brief {
    my ($raw) = @_;
    my $doc = eval { $JSON->decode($raw) };
    return "not JSON: $raw\n" unless ref $doc eq 'HASH';
    return AQ::brief($raw) unless ref $doc->{item} eq 'HASH';
    my $it = $doc->{item};
    my $canon = $JSON->decode(answer($raw));
    my $lease = 'lease null';
    if (defined $it->{lease_expires_at}) {
        my $t = AQ::ts_epoch($it->{lease_expires_at});
        $lease = defined $t ? 'lease ' . round10($t - Time::HiRes::time()) . 's'
                            : "lease $it->{lease_expires_at}";
    }
    my $label = $item_label{ $it->{id} // '' } // $it->{id} // 'null';
    return join('; ', "$it->{status} $label v" . ($it->{version} // 'null')
                      . ", $lease", @{ $canon->{problems} || [] }) . "\n";
}

# ---------------------------------------------------------------------------
# The access log of a Test::Nginx block (its server root's logs/).

sub log_file {
    my ($name) = @_;
    return Test::Nginx::Util::server_root() . "/logs/$name";
}

# The line of logs/$file that holds "t=$tag " (the block's requests carry an
# X-Test header, the log_format writes t=$http_x_test), waiting up to 3 s
# for nginx's log phase, which ends after the client has its answer.
sub log_line {
    my ($file, $tag) = @_;
    my $path = log_file($file);
    my $deadline = Time::HiRes::time() + 3;
    while (1) {
        if (open my $fh, '<', $path) {
            while (my $line = <$fh>) {
                chomp $line;
                return $line if $line =~ /(?:^|\s)t=\Q$tag\E(?:\s|$)/;
            }
        }
        return "no line t=$tag in $path" if Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
}

# ---------------------------------------------------------------------------
# A standalone nginx of several workers (AQ::start_nginx): kept-alive
# connections known to be served by each worker.  The claim location must
# tell its worker:  location => 'add_header X-Worker $pid always;'.  Each
# connection is probed with a GET (405 before the key is even read: no
# database, no rate limit); uri => '/elsewhere' probes another location
# instead (e.g. nginx's own 404, which the status page does not count: the
# X-Worker header then at the http level).  Returns { pid => [AQ::Client x
# $per_worker] } with $workers pids, or fewer if connections for 30 s (times
# AQ::slow(), 200 at least) did not reach them all; pids in except => [...]
# are not taken.

sub worker_connections {
    my ($port, $per_worker, %o) = @_;
    my $workers = $o{workers} // 2;
    my %except = map { $_ => 1 } @{ $o{except} || [] };
    my %by;
    # a worker starved of CPU may accept nothing for a while: try for a
    # time (scaled), not a number of times
    my $deadline = Time::HiRes::time() + 30 * AQ::slow();
    for (my $n = 0; $n < 200 || Time::HiRes::time() < $deadline; $n++) {
        my $c = AQ::Client->new(port => $port, timeout => $o{timeout} // 20);
        my ($st, $h) = $c->request(method => 'GET', uri => $o{uri});
        my $pid = $h->{'x-worker'};
        if (defined $pid && !$except{$pid} && @{ $by{$pid} ||= [] } < $per_worker
            && $c->connected)
        {
            push @{ $by{$pid} }, $c;
        } else {
            $c->disconnect;
        }
        last if keys %by >= $workers && !grep { @$_ < $per_worker } values %by;
    }
    return \%by;
}

# A standalone nginx (AQ::start_nginx, whose options it takes) that also
# serves the four endpoints on a second port, with server => more
# directives of that server: returns ($ngx, $port).
sub start_nginx {
    my (%o) = @_;
    my $port = AQ::free_port();
    my $server = $o{server} // '';
    my $http = ($o{http} // '') . <<"_EOC_";
    server {
        listen 127.0.0.1:$port;
$LOCATIONS$server
    }
_EOC_
    return (AQ::start_nginx(%o, http => $http), $port);
}

# The answer of an AQ::Client request (send_request, then read_response):
# "200 claimed v2", "200 completed v2", "409 stale_claim", or "0 <error>".
sub outcome {
    my ($res) = @_;
    return '0 ' . ($res->{error} // 'no answer') unless $res->{status};
    my $doc = eval { $JSON->decode($res->{body}) };
    if (ref $doc eq 'HASH' && ref $doc->{item} eq 'HASH') {
        my $it = $doc->{item};
        return "$res->{status} " . ($it->{status} // 'claimed') . ' v' . ($it->{version} // 'null');
    }
    if (ref $doc eq 'HASH' && ref $doc->{error} eq 'HASH') {
        return "$res->{status} " . ($doc->{error}{code} // 'null');
    }
    return "$res->{status} unexpected body: $res->{body}";
}

# ---------------------------------------------------------------------------
# Prometheus text (t/090-status.t).

# Parses the text format: { samples => [[name, {labels}, value, line]...],
# families => [[name, type]...], problems => [...] }.  A problem: a sample
# whose family has no "# HELP" and "# TYPE" before it, a family whose
# samples are not contiguous, a line that is none of these.
sub parse_prometheus {
    my ($text) = @_;
    my (%help, %type, %done, @samples, @families, @p);
    my $current = '';
    for my $line (split /\n/, $text) {
        if ($line =~ /^# HELP (\w+) \S/) {
            push @p, "HELP $1 twice" if $help{$1}++;
            next;
        }
        if ($line =~ /^# TYPE (\w+) (counter|gauge|histogram|summary|untyped)$/) {
            push @p, "TYPE $1 twice" if $type{$1};
            push @p, "TYPE $1 before its HELP" unless $help{$1};
            $type{$1} = $2;
            push @families, [$1, $2];
            $done{$current} = 1 if $current ne '';
            $current = $1;
            next;
        }
        if ($line =~ /^(\w+)(?:\{(.*)\})? (\S+)$/) {
            my ($name, $labels, $value) = ($1, $2 // '', $3);
            my %l;
            while ($labels =~ /\G(\w+)="((?:[^"\\]|\\.)*)"(?:,|$)/gc) {
                $l{$1} = $2;
            }
            push @p, "bad labels in: $line"
                if length $labels && (pos($labels) // 0) != length $labels;
            push @p, "value is not a number in: $line"
                unless $value =~ /^-?\d+(?:\.\d+)?(?:e[-+]?\d+)?$/i;
            push @p, "$name without # TYPE before it" unless $type{$name};
            push @p, "$name after another family began (not contiguous)"
                if $done{$name} || ($type{$name} && $current ne $name);
            push @samples, [$name, \%l, $value, $line];
            next;
        }
        next if $line eq '';
        push @p, "not a line of the text format: $line";
    }
    return { samples => \@samples, families => \@families, problems => \@p };
}

# The value of the sample of $name whose labels are exactly %labels (undef
# when absent).
sub sample {
    my ($parsed, $name, %labels) = @_;
    SAMPLE: for my $s (@{ $parsed->{samples} }) {
        next unless $s->[0] eq $name;
        next unless keys %{ $s->[1] } == keys %labels;
        for (keys %labels) {
            next SAMPLE unless defined $s->[1]{$_} && $s->[1]{$_} eq $labels{$_};
        }
        return $s->[2];
    }
    return undef;
}

1;
