package AQ::Faults;

# Helpers of the fault-injection suites (t/100-restart.t .. t/130-reload.t,
# and the standalone parts of t/060-database.t)
# and of t/manual/exclusivity.pl.  AQ.pm stays the owner of the fixtures;
# this adds what faults need:
#
#   BEGIN { require AQ::Faults; AQ::Faults::own_cluster() }
#   use AQ;          # AQ now makes the suite's database on that cluster
#
# own_cluster() starts a PostgreSQL cluster of the suite's own (scripts/pg.sh
# in a temporary directory), so that it can be stopped and started again
# without touching the cluster other suites share; it is stopped at exit,
# after AQ has dropped its database (this file's END runs after AQ's, being
# compiled first).  pg_stop() is `pg_ctl stop -m immediate`; pg_start()
# starts it again on the same port.
#
# db() is a DBI handle on the suite's database that reconnects when the
# server went away (AQ::dbh() does not: use db() after a restart).

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(basename dirname);
use File::Copy qw(copy);
use File::Path qw(remove_tree);
use File::Temp qw(tempdir);
use IO::Select;
use IO::Socket::INET;
use JSON::PP ();
use POSIX ();
use Socket qw(SOL_SOCKET SO_LINGER);
use Time::HiRes ();

our $TOP = abs_path(dirname(__FILE__) . '/../../..');
our ($PG_TMP, $PG_DIR, $PG_DSN);
my $db;    # db()
my $OWNER_PID = $$;
my $JSON = JSON::PP->new->utf8->allow_nonref;

# ---------------------------------------------------------------------------
# A PostgreSQL cluster of the suite's own.

sub own_cluster {
    $PG_TMP = tempdir('aq-faults-XXXXXX', TMPDIR => 1, CLEANUP => 0);
    chmod 0711, $PG_TMP;    # the postgres user must reach its directory
    $PG_DIR = "$PG_TMP/pg";
    my $dsn = `"$TOP/scripts/pg.sh" start "$PG_DIR"`;
    die "AQ::Faults: scripts/pg.sh start failed\n" if $? != 0;
    chomp $dsn;
    $PG_DSN = $dsn;
    $ENV{AQ_TEST_PG_DSN} = $dsn;
    return $dsn;
}

# pg_ctl stop -m immediate (scripts/pg.sh stop), waits for the postmaster.
sub pg_stop {
    die "AQ::Faults: no cluster of our own\n" unless $PG_DIR;
    forget($db);    # db() reconnects once the server is back
    undef $db;
    system("$TOP/scripts/pg.sh", 'stop', $PG_DIR) == 0
        or die "AQ::Faults: scripts/pg.sh stop failed\n";
}

# Starts it again, on the port it had.
sub pg_start {
    die "AQ::Faults: no cluster of our own\n" unless $PG_DIR;
    my $out = `"$TOP/scripts/pg.sh" start "$PG_DIR"`;
    die "AQ::Faults: scripts/pg.sh start failed\n" if $? != 0;
}

sub pg_log { return $PG_DIR ? slurp("$PG_DIR/postgresql.log") : '' }

# ---------------------------------------------------------------------------
# The suite's database, through a handle that survives a server restart.

sub db {
    return $db if $db && eval { $db->ping };
    forget($db);
    $db = AQ::dbi_connect($AQ::DB);
    return $db;
}

END {
    if ($$ == $OWNER_PID) {
        local $?;
        forget($db);
    }
    if ($$ == $OWNER_PID && $PG_DIR) {
        local $?;
        # keep the server's log beside the suite's nginx server roots
        # (scripts/test.sh copies them to t/servroot-failed/ on failure)
        if (my $root = $ENV{TEST_NGINX_SERVROOT}) {
            copy("$PG_DIR/postgresql.log", "$root-postgresql.log");
        }
        system("$TOP/scripts/pg.sh", 'stop', $PG_DIR);
        remove_tree($PG_TMP);
    }
}

# A session of its own (to hold a lock).
sub session { return AQ::dbi_connect($AQ::DB) }

# Drops a handle whose server went away, without a word to it.
sub forget {
    my ($h) = @_;
    return unless $h;
    $h->{InactiveDestroy} = 1;
    eval { local $h->{PrintWarn} = 0; $h->disconnect };
}

# Holds an ACCESS EXCLUSIVE lock on the items table in $s until
# $s->rollback: every claim blocks behind it.
sub lock_items {
    my ($s) = @_;
    $s->begin_work;
    $s->do('LOCK TABLE annotation_queue.items IN ACCESS EXCLUSIVE MODE');
    return $s;
}

# A gate in the claim's path, for claims blocked while they run: a trigger
# on annotation_queue.items (BEFORE UPDATE, for each row) that first takes a
# share lock on a row of a table of its own.  close_gate($s) holds that row
# FOR UPDATE in session $s: every claim blocks when it comes to update its
# item, inside the executor, with its statement long prepared (LOCK TABLE
# blocks the preparation of a new connection's statements too, since parse
# analysis locks the tables).  open_gate($s) lets them all go on.  In the
# suite's own database only; the trigger costs nothing while the gate is
# open.
sub install_gate {
    my $h = db();
    $h->do('CREATE TABLE IF NOT EXISTS public.aq_fault_gate (id int PRIMARY KEY)');
    $h->do('INSERT INTO public.aq_fault_gate VALUES (1) ON CONFLICT DO NOTHING');
    $h->do(<<'_SQL_');
CREATE OR REPLACE FUNCTION public.aq_fault_gate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM public.aq_fault_gate WHERE id = 1 FOR SHARE;
    RETURN NEW;
END
$$
_SQL_
    $h->do('DROP TRIGGER IF EXISTS aq_fault_gate ON annotation_queue.items');
    $h->do('CREATE TRIGGER aq_fault_gate BEFORE UPDATE ON annotation_queue.items '
           . 'FOR EACH ROW EXECUTE FUNCTION public.aq_fault_gate()');
}

sub close_gate {
    my ($s) = @_;
    $s->begin_work;
    $s->do('SELECT 1 FROM public.aq_fault_gate WHERE id = 1 FOR UPDATE');
    return $s;
}

sub open_gate {
    my ($s) = @_;
    $s->rollback unless $s->{AutoCommit};
}

# nginx's backends in the suite's database: count, optionally of one state
# ('active', 'idle') or waiting on a lock (lock => 1).
sub backends {
    my (%o) = @_;
    my $sql = q{SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database()
                   AND application_name = 'nginx_annotation_queue'};
    my @bind;
    if (defined $o{state}) {
        $sql .= ' AND state = ?';
        push @bind, $o{state};
    }
    $sql .= q{ AND wait_event_type = 'Lock'} if $o{lock};
    return scalar db()->selectrow_array($sql, undef, @bind);
}

# Terminates nginx's backends in the suite's database (and no other session,
# unlike AQ::terminate_backends): their count.
sub terminate_nginx_backends {
    return scalar db()->selectrow_array(
        q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
           WHERE datname = current_database()
             AND application_name = 'nginx_annotation_queue'});
}

# [pid, state, wait_event_type, query] of nginx's backends.
sub backend_rows {
    return db()->selectall_arrayref(
        q{SELECT pid, state, coalesce(wait_event_type, ''), query
            FROM pg_stat_activity
           WHERE datname = current_database()
             AND application_name = 'nginx_annotation_queue'
           ORDER BY pid});
}

# $seconds times AQ::slow(), in whole seconds (rounded up): a time for
# nginx's configuration (which takes no fractions of a second) and for the
# bounds derived from it.
sub scaled { return POSIX::ceil($_[0] * AQ::slow()) }

# Polls $cond every 50 ms until it is true or $timeout seconds (times
# AQ::slow(): what nginx has to bring about takes longer under valgrind)
# passed; returns its last value.
sub wait_until {
    my ($timeout, $cond) = @_;
    my $deadline = Time::HiRes::time() + $timeout * AQ::slow();
    while (1) {
        my $v = $cond->();
        return $v if $v || Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
}

# ---------------------------------------------------------------------------
# nginx's status page (annotation_queue_status): what the pools are doing,
# to wait for ("a claim waits for a connection") instead of sleeping.
#
#   http => ... . AQ::Faults::status_server($sport)   (in AQ::start_nginx)
#   AQ::Faults::wait_until(5, sub { AQ::Faults::pool_state($sport)->{waiting} == 1 })

our $STATUS_URI = '/aq-status';

# A server block that serves the status page on $port (for the http
# directives of AQ::start_nginx).
sub status_server {
    my ($port) = @_;
    return <<"_EOC_";
    server {
        listen 127.0.0.1:$port;
        location = $STATUS_URI {
            annotation_queue_status;
        }
    }
_EOC_
}

# The samples of the status page: { 'name{labels}' => value }, or undef
# when it does not answer 200.
sub status {
    my ($port) = @_;
    my $c = AQ::Client->new(port => $port);
    my ($st, undef, $body) = $c->request(method => 'GET', uri => $STATUS_URI);
    $c->disconnect;
    return undef unless $st && $st == 200;
    my %m;
    for (split /\n/, $body) {
        $m{$1} = $2 if /^([a-z_]+\{[^}]*\})\s+(\d+)$/;
    }
    return \%m;
}

# The pools' gauges summed over pools and workers: { idle, busy, connecting,
# open, waiting }; every count is -1 when the page does not answer.
sub pool_state {
    my ($port) = @_;
    my $m = status($port)
        or return { map { $_ => -1 } qw(idle busy connecting open waiting) };
    my %s = (idle => 0, busy => 0, connecting => 0, waiting => 0);
    while (my ($k, $v) = each %$m) {
        next unless $k =~ /worker="all"/;
        $s{$1} += $v if $k =~ /^annotation_queue_connections\{.*state="(\w+)"/;
        $s{waiting} += $v if $k =~ /^annotation_queue_waiting\{/;
    }
    $s{open} = $s{idle} + $s{busy} + $s{connecting};
    return \%s;
}

# Lines of nginx's error log that match $re.
sub log_count {
    my ($ngx, $re) = @_;
    return scalar grep { /$re/ } split /\n/, $ngx->error_log;
}

# Whether an answer came (or the connection closed) on an AQ::Client whose
# request was sent and not read yet; does not wait.
sub answered_yet {
    my ($c) = @_;
    return 1 if length($c->{buf} // '');
    return 1 unless $c->{sock};
    return IO::Select->new($c->{sock})->can_read(0) ? 1 : 0;
}

# ---------------------------------------------------------------------------
# Claims and their answers.

sub decode { my $d = eval { $JSON->decode($_[0] // '') }; return ref $d eq 'HASH' ? $d : undef }

sub error_code {
    my $d = decode($_[0]) or return undef;
    return ref $d->{error} eq 'HASH' ? $d->{error}{code} : undef;
}

# "200 item", "409 no_items_available", "503 database_unavailable", or
# "0 <transport error>": one word for an answer.
sub outcome {
    my ($status, $body, $err) = @_;
    return "0 " . ($err // 'no answer') if !$status;
    my $d = decode($body);
    return "$status item" if $status == 200 && $d && $d->{success} && ref $d->{item};
    my $code = error_code($body);
    return "$status " . ($code // "unexpected body: $body");
}

# The problems of a 200 answer to a claim by $key: the item must be held by
# that key in the database, at the version answered (a connection reused
# dirty would answer another request's item).
sub claim_problems {
    my ($key, $body) = @_;
    my $d = decode($body);
    return ('not a claimed item') unless $d && ref $d->{item} eq 'HASH';
    return AQ::answers_problems([[$d->{item}{id}, $d->{item}{version}, $key]], dbh => db());
}

# AQ::answers_problems (each answer [item id, version, key]) through db(),
# which survives a restart of the server.
sub answers_problems {
    my ($answers) = @_;
    return AQ::answers_problems($answers, dbh => db());
}

# ---------------------------------------------------------------------------
# nginx: processes and logs.

# The worker pids of a standalone nginx (children of its master).
sub worker_pids {
    my ($ngx) = @_;
    my $master = $ngx->{pid} or return [];
    my @pids;
    opendir my $d, '/proc' or return [];
    for my $p (grep { /^\d+$/ } readdir $d) {
        my $stat = slurp("/proc/$p/stat");
        next unless $stat =~ /^\d+ \(.*\) \S (\d+) /s;
        push @pids, $p if $1 == $master;
    }
    return [sort { $a <=> $b } @pids];
}

sub alive { my ($pid) = @_; return kill(0, $pid) && -e "/proc/$pid" && slurp("/proc/$pid/stat") !~ /^\d+ \(.*\) Z /s }

# Lines of an error log that say a process crashed or the module broke:
# [alert], [crit], [emerg], and the master's "exited on signal".
sub log_problems {
    my ($text, %o) = @_;
    my @bad = grep { /\[(?:alert|crit|emerg)\]|exited on signal|core dumped/ } split /\n/, $text;
    @bad = grep { !$o{allow}->($_) } @bad if $o{allow};
    return \@bad;
}

# The local ports of the TCP connections process $pid holds to
# PostgreSQL's port (its sockets' inodes, looked up in /proc/net/tcp): which
# worker holds which of nginx's server connections (pg_stat_activity's
# client_port).
sub pg_ports_of {
    my ($pid, $pg_port) = @_;
    $pg_port //= $AQ::PG{port};
    my %inode;
    opendir my $d, "/proc/$pid/fd" or return [];
    for my $fd (readdir $d) {
        my $l = readlink "/proc/$pid/fd/$fd" // next;
        $inode{$1} = 1 if $l =~ /^socket:\[(\d+)\]$/;
    }
    my @ports;
    my $hex = sprintf ':%04X', $pg_port;
    for my $table ('/proc/net/tcp', '/proc/net/tcp6') {
        for my $line (split /\n/, slurp($table)) {
            my @f = split ' ', $line;
            next unless @f > 9 && $f[2] =~ /\Q$hex\E$/ && $f[3] eq '01';    # ESTABLISHED
            push @ports, hex((split /:/, $f[1])[1]) if $inode{ $f[9] };
        }
    }
    return [sort { $a <=> $b } @ports];
}

sub pg_sockets_of { return scalar @{ pg_ports_of(@_) } }

# Terminates the backend of the server connection whose client port is
# $port.
sub terminate_port {
    my ($port) = @_;
    return scalar db()->selectrow_array(
        q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
           WHERE datname = current_database() AND client_port = ?}, undef, $port);
}

# ---------------------------------------------------------------------------
# Background clients: $n forked processes run $code->($i) while the caller
# goes on; $bg->stop asks them to end (AQ::Faults::stopping() turns true in
# them) and returns what they returned (JSON-serialisable), in order.

sub background {
    my ($n, $code) = @_;
    my $dir = tempdir('aq-bg-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my @pids;
    for my $i (0 .. $n - 1) {
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            $AQ::Faults::STOP_FILE = "$dir/stop";
            my $res = eval { $code->($i) };
            $res = { died => "$@" } if $@;
            if (open my $fh, '>', "$dir/$i.json") {
                print $fh $JSON->encode($res);
                close $fh;
            }
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    return bless { dir => $dir, pids => \@pids, n => $n }, 'AQ::Faults::Background';
}

our $STOP_FILE;
sub stopping { return defined $STOP_FILE && -e $STOP_FILE }

package AQ::Faults::Background;

# How many of the clients still run.
sub running {
    my ($self) = @_;
    for my $pid (@{ $self->{pids} }) {
        next if $self->{done}{$pid};
        $self->{done}{$pid} = 1 if waitpid($pid, POSIX::WNOHANG()) == $pid;
    }
    return scalar grep { !$self->{done}{$_} } @{ $self->{pids} };
}

sub stop {
    my ($self, %o) = @_;
    open my $fh, '>', "$self->{dir}/stop" or die $!;
    close $fh;
    my $deadline = Time::HiRes::time() + ($o{timeout} // 60) * AQ::slow();
    my %left = map { $_ => 1 } grep { !$self->{done}{$_} } @{ $self->{pids} };
    while (%left) {
        for my $pid (keys %left) {
            delete $left{$pid} if waitpid($pid, POSIX::WNOHANG()) == $pid;
        }
        last unless %left;
        if (Time::HiRes::time() > $deadline) {
            kill 'KILL', keys %left;
            waitpid($_, 0) for keys %left;
            last;
        }
        Time::HiRes::sleep(0.02);
    }
    my @res;
    for my $i (0 .. $self->{n} - 1) {
        my $text = AQ::Faults::slurp("$self->{dir}/$i.json");
        push @res, length $text ? $JSON->decode($text) : { died => 'no result (killed?)' };
    }
    return \@res;
}

package AQ::Faults;

# ---------------------------------------------------------------------------
# Raw clients: bytes, then a close (or a reset with linger => 0).

sub raw_connect {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 5 * AQ::slow())
        or die "connect: $!";
    binmode $s;
    return $s;
}

sub raw_send {
    my ($s, $bytes) = @_;
    local $SIG{PIPE} = 'IGNORE';
    my $off = 0;
    while ($off < length $bytes) {
        my $n = syswrite($s, $bytes, length($bytes) - $off, $off);
        return 0 unless defined $n;
        $off += $n;
    }
    return 1;
}

# Closes; with reset => 1 the kernel sends RST instead of FIN.
sub raw_close {
    my ($s, %o) = @_;
    setsockopt($s, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0)) if $o{reset};
    close $s;
}

# The head and body of a claim, split where the caller wants to stop.
sub claim_bytes {
    my ($queue, $key, %o) = @_;
    my $body = qq({"queue_id":"$queue"});
    my $head = "POST $AQ::URI HTTP/1.1\r\nHost: localhost\r\n"
               . "Authorization: Bearer $key\r\nContent-Type: application/json\r\n"
               . 'Content-Length: ' . ($o{length} // length $body) . "\r\n\r\n";
    return ($head, $body);
}

# ---------------------------------------------------------------------------

sub slurp {
    my ($file) = @_;
    open my $fh, '<', $file or return '';
    local $/;
    return scalar <$fh>;
}

1;
