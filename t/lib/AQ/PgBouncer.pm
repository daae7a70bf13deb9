package AQ::PgBouncer;

# A real PgBouncer (/usr/sbin/pgbouncer, Debian bookworm's 1.18) in front of
# the suite's PostgreSQL (the cluster AQ.pm set up: %AQ::PG), for
# t/topology/160-pgbouncer.t; another build (scripts/build-pgbouncer.sh: trixie's
# 1.24, for t/manual/pgbouncer-prepared.t) with AQ_PGBOUNCER=/path or
# start(binary => /path):
#
#   use AQ;                  # first: the suite's database and cluster
#   use AQ::PgBouncer;
#   my $pgb = AQ::PgBouncer->start(pool_mode => 'transaction', pool_size => 2);
#   AQ::start_nginx(dsn => $pgb->conninfo, ...);
#   $pgb->pool->{cl_waiting};        # SHOW POOLS, the suite's database
#   $pgb->pause; $pgb->resume;       # PAUSE / RESUME on the admin console
#   $pgb->kill; $pgb->start_again;   # a crash (SIGKILL), then the same port
#   $pgb->session;                   # a DBI session through it
#   $pgb->version;                   # "1.18.0" (pgbouncer --version)
#   $pgb->stats->{total_bind_count}; # SHOW STATS, the suite's database
#
# start() writes a configuration in a temporary directory of its own and
# runs pgbouncer in the foreground (not -d), as the postgres user when we
# are root (pgbouncer refuses to run as root; the user scripts/pg.sh runs
# PostgreSQL as), on 127.0.0.1 and a free port, no unix socket.  Options:
#
#   pool_mode   session (default) | transaction | statement
#   pool_size   default_pool_size (4): server connections per database and
#               user
#   settings    { name => value }: more [pgbouncer] settings, or overrides
#               of the defaults below
#   binary      the pgbouncer to run ($AQ::PgBouncer::BINARY: AQ_PGBOUNCER
#               or /usr/sbin/pgbouncer)
#
# Every database name goes to the suite's cluster ("* = host= port=");
# auth_type trust with an auth_file naming the cluster's user (trust still
# wants the user listed there); that user is the admin console's
# (admin_users): $pgb->admin('SHOW POOLS') runs psql on the "pgbouncer"
# database.  It is ready when the console answers.  Every instance is
# stopped at exit (SIGTERM, then SIGKILL); its log is kept beside the
# suite's nginx server roots ($TEST_NGINX_SERVROOT-pgbouncer-<n>.log, which
# scripts/test.sh copies to t/servroot-failed/ on failure), and its
# directory removed.

use strict;
use warnings;

use DBI;
use File::Copy qw(copy);
use File::Path qw(remove_tree);
use File::Temp qw(tempdir);
use POSIX ();
use Time::HiRes ();

our $BINARY = $ENV{AQ_PGBOUNCER} // '/usr/sbin/pgbouncer';
our $PSQL   = 'psql';

my $OWNER_PID = $$;
my @instances;
my $seq = 0;

die "AQ::PgBouncer: $BINARY is missing: scripts/install-deps.sh installs pgbouncer"
    . ($ENV{AQ_PGBOUNCER} ? ', scripts/build-pgbouncer.sh builds a newer one' : '') . "\n"
    unless -x $BINARY;

sub slow { return defined &AQ::slow ? AQ::slow() : 1 }

# The postgres user's uid and gid when we are root, else ().
sub run_as {
    return () unless $> == 0;
    my (undef, undef, $uid, $gid) = getpwnam('postgres')
        or die "AQ::PgBouncer: no postgres user\n";
    return ($uid, $gid);
}

sub start {
    my ($class, %o) = @_;
    die "AQ::PgBouncer: load AQ first\n" unless %AQ::PG;
    my $self = bless {
        mode     => $o{pool_mode} // 'session',
        size     => $o{pool_size} // 4,
        settings => { %{ $o{settings} || {} } },
        port     => $o{port} // AQ::free_port(),
        n        => ++$seq,
        binary   => $o{binary} // $BINARY,
    }, $class;
    die "AQ::PgBouncer: $self->{binary} is missing\n" unless -x $self->{binary};
    $self->{dir} = tempdir('aq-pgbouncer-XXXXXX', TMPDIR => 1, CLEANUP => 0);
    chmod 0711, $self->{dir};
    if (my ($uid, $gid) = run_as()) {
        chown $uid, $gid, $self->{dir}
            or die "AQ::PgBouncer: chown $self->{dir}: $!\n";
    }
    push @instances, $self;
    $self->write_config;
    $self->start_again;
    return $self;
}

sub port     { $_[0]{port} }
sub dir      { $_[0]{dir} }
sub mode     { $_[0]{mode} }
sub pid      { $_[0]{pid} }
sub log_file { "$_[0]{dir}/pgbouncer.log" }
sub log_text { return _slurp($_[0]->log_file) }
sub binary   { $_[0]{binary} }

# The version the binary says it is ("1.24.1"), or '' (no instance needed:
# AQ::PgBouncer->version, or version(binary => $path)).
sub version {
    my ($self, %o) = @_;
    my $bin = $o{binary} // (ref $self ? $self->{binary} : $BINARY);
    my $out = `"$bin" --version 2>/dev/null` // '';
    return $out =~ /^PgBouncer (\S+)/ ? $1 : '';
}

# The conninfo of the suite's database through this PgBouncer (for nginx's
# annotation_queue_database, or anything libpq).
sub conninfo {
    my ($self, %o) = @_;
    return "host=127.0.0.1 port=$self->{port} user=$AQ::PG{user} dbname="
           . ($o{dbname} // $AQ::DB);
}

sub write_config {
    my ($self) = @_;
    my $d = $self->{dir};
    my %s = (
        listen_addr               => '127.0.0.1',
        listen_port               => $self->{port},
        unix_socket_dir           => '',
        auth_type                 => 'trust',
        auth_file                 => "$d/userlist.txt",
        admin_users               => $AQ::PG{user},
        pool_mode                 => $self->{mode},
        default_pool_size         => $self->{size},
        min_pool_size             => 0,
        reserve_pool_size         => 0,
        max_client_conn           => 500,
        logfile                   => "$d/pgbouncer.log",
        pidfile                   => "$d/pgbouncer.pid",
        # a failed server login is tried again after 1 s, not 15
        server_login_retry        => 1,
        # PgBouncer's own bound on a client waiting for a server
        # connection: far beyond the module's timeouts, which must act first
        query_wait_timeout        => 120,
        %{ $self->{settings} },
    );
    open my $ini, '>', "$d/pgbouncer.ini" or die "AQ::PgBouncer: $d/pgbouncer.ini: $!\n";
    print $ini "; AQ::PgBouncer (t/topology/160-pgbouncer.t)\n[databases]\n",
               "* = host=$AQ::PG{host} port=$AQ::PG{port}\n\n[pgbouncer]\n";
    print $ini "$_ = $s{$_}\n" for sort keys %s;
    close $ini;
    open my $users, '>', "$d/userlist.txt" or die "AQ::PgBouncer: userlist.txt: $!\n";
    print $users qq("$AQ::PG{user}" ""\n);
    close $users;
    chmod 0644, "$d/pgbouncer.ini", "$d/userlist.txt";
}

# Starts pgbouncer (again, on its port) and waits until its admin console
# answers (10 s, times AQ::slow()).
sub start_again {
    my ($self) = @_;
    die "AQ::PgBouncer: already running\n" if $self->{pid};
    my $d = $self->{dir};
    unlink "$d/pgbouncer.pid";
    my @ids = run_as();
    my $pid = fork // die "AQ::PgBouncer: fork: $!\n";
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$d/stderr.log";
        open STDERR, '>>', "$d/stderr.log";
        POSIX::setsid();
        if (@ids) {
            my ($uid, $gid) = @ids;
            $) = "$gid $gid";
            POSIX::setgid($gid) or POSIX::_exit(126);
            POSIX::setuid($uid) or POSIX::_exit(126);
        }
        { exec $self->{binary}, "$d/pgbouncer.ini" }
        POSIX::_exit(127);
    }
    $self->{pid} = $pid;
    my $deadline = Time::HiRes::time() + 10 * slow();
    while (1) {
        if (waitpid($pid, POSIX::WNOHANG()) == $pid) {
            $self->{pid} = undef;
            die "AQ::PgBouncer: pgbouncer exited at start (status $?):\n"
                . $self->log_text;
        }
        last if eval { $self->admin('SHOW VERSION'); 1 };
        die "AQ::PgBouncer: the admin console does not answer on $self->{port}:\n"
            . "$@\n" . $self->log_text
            if Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
    return $self;
}

# Sends a signal (KILL: a crash; TERM: PgBouncer's immediate shutdown;
# INT: its safe shutdown, which waits for the clients) and waits until the
# process is gone (10 s, times AQ::slow(), then SIGKILL).
sub kill {
    my ($self, $signal) = @_;
    my $pid = $self->{pid} or return;
    CORE::kill($signal // 'KILL', $pid);
    my $deadline = Time::HiRes::time() + 10 * slow();
    while (waitpid($pid, POSIX::WNOHANG()) == 0) {
        if (Time::HiRes::time() > $deadline) {
            CORE::kill('KILL', $pid);
            waitpid($pid, 0);
            last;
        }
        Time::HiRes::sleep(0.02);
    }
    $self->{pid} = undef;
}

sub stop { $_[0]->kill('TERM') }

sub restart {
    my ($self, $signal) = @_;
    $self->kill($signal);
    return $self->start_again;
}

# Runs a command on the admin console (psql, simple query protocol, which
# the console requires); returns its rows as hashes (by column name).  Dies
# on an error, or when the command takes longer than timeout seconds (10,
# times AQ::slow(): PAUSE waits for the server connections to be released).
sub admin {
    my ($self, $command, %o) = @_;
    my $timeout = POSIX::ceil(($o{timeout} // 10) * slow());
    my @cmd = ('timeout', '-s', 'KILL', $timeout, $PSQL, '-X', '-q', '-A',
               '-F', "\t", '-P', 'footer=off', '-v', 'ON_ERROR_STOP=1',
               '-h', '127.0.0.1', '-p', $self->{port}, '-U', $AQ::PG{user},
               '-d', 'pgbouncer', '-c', $command);
    local $ENV{PGCONNECT_TIMEOUT} = $timeout;
    local $ENV{PGAPPNAME} = 'aq_pgbouncer_admin';
    my $err = "$self->{dir}/admin-$$.err";
    my $pid = open(my $fh, '-|') // die "AQ::PgBouncer: fork: $!\n";
    if ($pid == 0) {
        open STDERR, '>', $err;
        { exec @cmd }
        POSIX::_exit(127);
    }
    my @lines = <$fh>;
    close $fh;
    my $rc = $?;
    my $msg = _slurp($err);
    unlink $err;
    chomp @lines;
    die "AQ::PgBouncer: $command: "
        . ($rc >> 8 == 137 || ($rc & 127) ? 'timed out' : 'exit ' . ($rc >> 8))
        . ": $msg\n"
        if $rc != 0;
    return [] unless @lines;
    my @head = split /\t/, shift(@lines), -1;
    my @rows;
    for my $l (@lines) {
        my @v = split /\t/, $l, -1;
        push @rows, { map { $head[$_] => $v[$_] } 0 .. $#head };
    }
    return \@rows;
}

# The SHOW POOLS row of a database (the suite's by default), or a row of
# zeros when PgBouncer has no pool for it yet.
sub pool {
    my ($self, $db) = @_;
    $db //= $AQ::DB;
    for my $r (@{ $self->admin('SHOW POOLS') }) {
        return $r if $r->{database} eq $db;
    }
    return { database => $db, map { $_ => 0 }
             qw(cl_active cl_waiting sv_active sv_idle sv_used sv_tested sv_login) };
}

# The SHOW STATS row of a database (the suite's by default), or {} when
# PgBouncer has none for it yet.  The total_* columns are counted as
# things happen; from 1.21 on they include total_client_parse_count,
# total_server_parse_count and total_bind_count (named prepared
# statements: what clients parsed, what PgBouncer had to prepare on its
# server connections, what was bound).
sub stats {
    my ($self, $db) = @_;
    $db //= $AQ::DB;
    for my $r (@{ $self->admin('SHOW STATS') }) {
        return $r if $r->{database} eq $db;
    }
    return {};
}

# PAUSE (waits until every server connection is released: in transaction
# mode, until the transactions in flight end) and RESUME.
sub pause  { $_[0]->admin('PAUSE', timeout => $_[1] // 10) }
sub resume { $_[0]->admin('RESUME') }

# A DBI session through this PgBouncer, on the suite's database.  In
# session mode it holds a server connection for as long as it is
# connected; in transaction mode, while it is in a transaction.
sub session {
    my ($self, %o) = @_;
    return DBI->connect("dbi:Pg:host=127.0.0.1;port=$self->{port};dbname="
                        . ($o{dbname} // $AQ::DB),
                        $AQ::PG{user}, '',
                        { AutoCommit => 1, RaiseError => 1, PrintError => 0,
                          AutoInactiveDestroy => 1,
                          # pgbouncer < 1.21 in transaction mode cannot keep
                          # a named statement: send each one unnamed
                          pg_server_prepare => 0 });
}

sub _slurp {
    my ($file) = @_;
    open my $fh, '<', $file or return '';
    local $/;
    return scalar <$fh>;
}

END {
    if ($$ == $OWNER_PID) {
        local $?;
        for my $self (@instances) {
            $self->kill('TERM');
            if (my $root = $ENV{TEST_NGINX_SERVROOT}) {
                copy($self->log_file, "$root-pgbouncer-$self->{n}.log");
            }
            remove_tree($self->{dir});
        }
    }
}

1;
