package AQ::Standby;

# A PostgreSQL primary and streaming standbys of the suite's own, for the
# failover suite (t/topology/170-failover.t):
#
#   BEGIN { require AQ::Standby; AQ::Standby::own_primary() }
#   use AQ;                               # the suite's database, on it
#   my $primary = AQ::Standby::primary_node();
#   my $standby = $primary->standby;      # pg_basebackup -R, streaming
#   my $sync    = $primary->standby(sync => 1);
#   ...
#   $primary->kill9;                      # the primary crashes
#   $primary->freeze;                     # ... or hangs (SIGSTOP)
#   $standby->promote;                    # pg_ctl promote
#   AQ::Standby::use_primary($standby);   # AQ's and AQ::Faults::db()'s
#                                         # connections go there now
#
# own_primary() starts a cluster with scripts/pg.sh (initdb, the schema in
# database "annotation_queue", which AQ copies into the suite's database)
# in a temporary directory, then makes it a primary: wal_level = replica,
# max_wal_senders, a replication role (aq_replicator) and its pg_hba.conf
# line.  $node->standby copies it with pg_basebackup -R (a replication slot
# of its own, the WAL streamed during the copy) and starts the copy with
# scripts/pg.sh on a port of its own; it is a hot standby, streaming from
# $node when standby() returns.  With sync => 1 the primary then names it
# synchronous (synchronous_standby_names = '*', synchronous_commit = on)
# and standby() returns once pg_stat_replication says it is: every commit
# acknowledged from then on is on the standby's disk.  The setting is made
# after the copy, so that the standby, once promoted, does not wait for a
# standby of its own.
#
# A promoted standby is a primary like the first: standby() works on it
# (the failover after the failover).
#
# Every cluster is stopped at exit and its directory removed, after AQ has
# dropped its database (this file's END runs after AQ's, being compiled
# first); the servers' logs are kept beside the suite's nginx server roots.

use strict;
use warnings;

use Cwd qw(abs_path);
use DBI;
use File::Basename qw(dirname);
use File::Copy qw(copy);
use File::Path qw(remove_tree);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use POSIX ();
use Time::HiRes ();

our $TOP   = abs_path(dirname(__FILE__) . '/../../..');
our $PGBIN = $ENV{PGBIN} || '/usr/lib/postgresql/15/bin';
our $REPLICATOR = 'aq_replicator';

my $OWNER_PID = $$;
my ($TMP, $PRIMARY, @NODES, $seq);

# AQ::slow(), also before AQ is loaded (own_primary() runs in a BEGIN block)
sub slow { return defined &AQ::slow ? AQ::slow() : 1 }

sub tmp {
    return $TMP if $TMP;
    $TMP = tempdir('aq-standby-XXXXXX', TMPDIR => 1, CLEANUP => 0);
    chmod 0711, $TMP;    # the postgres user must reach its directories
    return $TMP;
}

sub slurp {
    my ($file) = @_;
    open my $fh, '<', $file or return '';
    local $/;
    return scalar <$fh>;
}

sub free_port {
    my $s = IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1',
                                  LocalPort => 0, Proto => 'tcp', ReuseAddr => 1)
        or die "AQ::Standby: no free port: $!\n";
    my $port = $s->sockport;
    close $s;
    return $port;
}

# initdb, pg_ctl and pg_basebackup refuse root: as root they run as the
# postgres user.
sub as_pg { return $> == 0 ? ('runuser', '-u', 'postgres', '--', @_) : @_ }

# Runs a command; dies with its output when it fails; returns its output.
sub run {
    my (@cmd) = @_;
    my $out = tmp() . '/command.out';
    my $pid = fork // die "AQ::Standby: fork: $!\n";
    if ($pid == 0) {
        open STDOUT, '>', $out or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
        { exec @cmd }
        POSIX::_exit(127);
    }
    waitpid($pid, 0);
    my $rc = $?;
    my $text = slurp($out);
    die "AQ::Standby: @cmd failed (status $rc):\n$text" if $rc != 0;
    return $text;
}

sub give_to_postgres {
    my (@paths) = @_;
    return unless $> == 0;
    my (undef, undef, $uid, $gid) = getpwnam('postgres')
        or die "AQ::Standby: no postgres user\n";
    chown $uid, $gid, @paths or die "AQ::Standby: chown @paths: $!\n";
}

# Polls $cond every 50 ms for $timeout seconds (times AQ::slow()); dies
# with $what when it never turns true.
sub wait_for {
    my ($what, $timeout, $cond) = @_;
    my $deadline = Time::HiRes::time() + $timeout * slow();
    while (1) {
        my $v = eval { $cond->() };
        return $v if $v;
        die "AQ::Standby: $what: not after ${timeout}s"
            . ($@ ? " (last error: $@)" : '') . "\n"
            if Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
}

# ---------------------------------------------------------------------------
# The first primary.

sub own_primary {
    die "AQ::Standby: own_primary() twice\n" if $PRIMARY;
    my $node = AQ::Standby::Node->new('primary');
    my $dsn = `"$TOP/scripts/pg.sh" start "$node->{dir}"`;
    die "AQ::Standby: scripts/pg.sh start failed\n" if $? != 0;
    chomp $dsn;
    $node->{port} = slurp("$node->{dir}/port") =~ s/\s+//gr;
    $node->make_primary;
    $PRIMARY = $node;
    $ENV{AQ_TEST_PG_DSN} = $dsn;    # AQ makes the suite's database here
    return $node;
}

sub primary_node { return $PRIMARY }

# From now on AQ (AQ::dbi_connect, its END) and AQ::Faults::db() connect to
# this node.  AQ::dbh() keeps the handle it made first.
sub use_primary {
    my ($node) = @_;
    $PRIMARY = $node;
    $AQ::PG{port} = $node->{port} if %AQ::PG;
}

sub nodes { return @NODES }

sub release_all_sync {
    return unless $$ == $OWNER_PID;
    local $?;
    for my $node (@NODES) {
        next if $node->{frozen} || !$node->running;
        eval {
            $node->release_sync
                if !$node->in_recovery
                   && $node->value('SHOW synchronous_standby_names') ne '';
        };
    }
}

END {
    if ($$ == $OWNER_PID && $TMP) {
        local $?;
        for my $node (@NODES) {
            $node->forget_handles;
            if (my $root = $ENV{TEST_NGINX_SERVROOT}) {
                copy("$node->{dir}/postgresql.log",
                     "$root-$node->{name}-postgresql.log");
            }
            if ($node->{frozen}) {
                eval { $node->kill9 };    # SIGQUIT would wait for SIGCONT
            } elsif ($node->running) {
                system("$TOP/scripts/pg.sh", 'stop', $node->{dir});
            }
        }
        remove_tree($TMP);
    }
}

# ---------------------------------------------------------------------------

package AQ::Standby::Node;

use strict;
use warnings;

use DBI;
use Time::HiRes ();

sub new {
    my ($class, $name) = @_;
    my $dir = AQ::Standby::tmp() . "/$name";
    my $node = bless { name => $name, dir => $dir, data => "$dir/data",
                       handles => {} }, $class;
    push @NODES, $node;
    return $node;
}

sub name { $_[0]{name} }
sub port { $_[0]{port} }
sub dir  { $_[0]{dir} }
sub log_text { return AQ::Standby::slurp("$_[0]{dir}/postgresql.log") }

# A new DBI connection to a database of this node ('postgres' by default).
sub connect {
    my ($self, $dbname) = @_;
    $dbname //= 'postgres';
    my $h = DBI->connect("dbi:Pg:host=127.0.0.1;port=$self->{port};dbname=$dbname",
                         'postgres', '',
                         { AutoCommit => 1, RaiseError => 1, PrintError => 0,
                           PrintWarn => 0, AutoInactiveDestroy => 1 });
    $h->do('SET client_min_messages = warning');
    return $h;
}

# A kept connection, made again when the server went away.
sub db {
    my ($self, $dbname) = @_;
    $dbname //= 'postgres';
    my $h = $self->{handles}{$dbname};
    return $h if $h && eval { $h->ping };
    forget($h);
    return $self->{handles}{$dbname} = $self->connect($dbname);
}

sub forget {
    my ($h) = @_;
    return unless $h;
    $h->{InactiveDestroy} = 1;
    eval { local $h->{PrintWarn} = 0; local $h->{PrintError} = 0; $h->disconnect };
}

sub forget_handles {
    my ($self) = @_;
    forget($_) for values %{ $self->{handles} };
    $self->{handles} = {};
}

sub value {
    my ($self, $sql, @bind) = @_;
    return scalar $self->db->selectrow_array($sql, undef, @bind);
}

# The postmaster's pid (postmaster.pid), or undef.
sub postmaster_pid {
    my ($self) = @_;
    my ($pid) = AQ::Standby::slurp("$self->{data}/postmaster.pid") =~ /^(\d+)/;
    return $pid;
}

sub alive {
    my ($pid) = @_;
    return 0 unless $pid && kill 0, $pid;
    my $stat = AQ::Standby::slurp("/proc/$pid/stat");
    return length $stat && $stat !~ /^\d+ \(.*\) [ZX] /s;
}

sub running { return alive($_[0]->postmaster_pid) }

sub in_recovery { return $_[0]->value('SELECT pg_is_in_recovery()') ? 1 : 0 }

# Makes this running cluster a primary that standbys may copy and stream
# from.  PostgreSQL 15's defaults are already wal_level = replica and
# max_wal_senders = 10; they are set all the same (a restart if that
# changed anything), so that the suite does not lean on defaults.
sub make_primary {
    my ($self) = @_;
    my $h = $self->db;
    my ($exists) = $h->selectrow_array(
        'SELECT count(*) FROM pg_roles WHERE rolname = ?', undef, $AQ::Standby::REPLICATOR);
    $h->do(qq{CREATE ROLE "$AQ::Standby::REPLICATOR" REPLICATION LOGIN}) unless $exists;
    $h->do(q{ALTER SYSTEM SET wal_level = 'replica'});
    $h->do(q{ALTER SYSTEM SET max_wal_senders = 10});
    $h->do(q{ALTER SYSTEM SET max_replication_slots = 10});
    $h->do(q{ALTER SYSTEM SET wal_keep_size = '256MB'});
    $h->do(q{ALTER SYSTEM SET hot_standby = on});

    my $hba = "$self->{data}/pg_hba.conf";
    open my $fh, '>', $hba or die "AQ::Standby: $hba: $!\n";
    print $fh <<"_HBA_";
# AQ::Standby (t/topology/170-failover.t): the fixtures and nginx connect as postgres;
# standbys stream as $AQ::Standby::REPLICATOR
# TYPE  DATABASE     USER           ADDRESS       METHOD
local   all          all                          trust
host    all          all            127.0.0.1/32  trust
host    replication  $AQ::Standby::REPLICATOR  127.0.0.1/32  trust
_HBA_
    close $fh;
    AQ::Standby::give_to_postgres($hba);
    $h->do('SELECT pg_reload_conf()');

    my ($restart) = $h->selectrow_array(
        'SELECT count(*) FROM pg_settings WHERE pending_restart');
    if ($restart) {
        $self->forget_handles;
        system("$AQ::Standby::TOP/scripts/pg.sh", 'stop', $self->{dir}) == 0
            or die "AQ::Standby: scripts/pg.sh stop failed\n";
        $self->start;
    }
    my $wal = $self->value('SHOW wal_level');
    die "AQ::Standby: wal_level is $wal, not replica\n" unless $wal eq 'replica';
    return $self;
}

# scripts/pg.sh start on the node's directory and port: the options every
# cluster of the suites has; a standby's data directory has standby.signal
# and primary_conninfo (pg_basebackup -R), so it starts as a hot standby.
sub start {
    my ($self) = @_;
    my $out = `"$AQ::Standby::TOP/scripts/pg.sh" start "$self->{dir}" $self->{port}`;
    die "AQ::Standby: scripts/pg.sh start $self->{dir} failed\n" if $? != 0;
    return $self;
}

# A new standby of this node: pg_basebackup -R (fast checkpoint, WAL
# streamed, slot aq_<name>), started; returns once it streams (and, with
# sync => 1, once this node counts it as its synchronous standby).
sub standby {
    my ($self, %o) = @_;
    my $name = $o{name} // 'standby' . ++$seq;
    my $node = AQ::Standby::Node->new($name);
    mkdir $node->{dir} or die "AQ::Standby: mkdir $node->{dir}: $!\n";
    chmod 0700, $node->{dir};
    AQ::Standby::give_to_postgres($node->{dir});
    $node->{port} = AQ::Standby::free_port();
    $node->{slot} = "aq_$name";
    $node->{upstream} = $self;

    AQ::Standby::run(AQ::Standby::as_pg(
        "$AQ::Standby::PGBIN/pg_basebackup", '-D', $node->{data},
        '-h', '127.0.0.1', '-p', $self->{port}, '-U', $AQ::Standby::REPLICATOR,
        '-X', 'stream', '-C', '-S', $node->{slot}, '-R',
        '--checkpoint=fast', '--no-sync'));
    # the copy has this node's postgresql.auto.conf; a synchronous standby
    # of its own would make the promoted copy wait at every commit
    my $auto = "$node->{data}/postgresql.auto.conf";
    my $text = AQ::Standby::slurp($auto);
    if ($text =~ /^\s*synchronous_standby_names/m) {
        $text =~ s/^\s*synchronous_standby_names.*\n//mg;
        open my $fh, '>', $auto or die "AQ::Standby: $auto: $!\n";
        print $fh $text;
        close $fh;
        AQ::Standby::give_to_postgres($auto);
    }
    $node->start;

    AQ::Standby::wait_for("$name streams from $self->{name}", 30, sub {
        ($self->replication_state($node)->{state} // '') eq 'streaming'
    });
    die "AQ::Standby: $name is not in recovery\n" unless $node->in_recovery;

    if ($o{sync}) {
        release_sync_at_exit();
        my $h = $self->db;
        $h->do(q{ALTER SYSTEM SET synchronous_standby_names = '*'});
        $h->do(q{ALTER SYSTEM SET synchronous_commit = 'on'});
        $h->do('SELECT pg_reload_conf()');
        AQ::Standby::wait_for("$name is $self->{name}'s synchronous standby", 30, sub {
            ($self->replication_state($node)->{sync_state} // '') eq 'sync'
        });
    }
    return $node;
}

# Makes commits on this node stop waiting for a synchronous standby
# (synchronous_standby_names reset): the commits that waited complete.
sub release_sync {
    my ($self) = @_;
    my $h = $self->db;
    $h->do('ALTER SYSTEM RESET synchronous_standby_names');
    $h->do('SELECT pg_reload_conf()');
    AQ::Standby::wait_for("$self->{name} without a synchronous standby", 30, sub {
        $self->value('SHOW synchronous_standby_names') eq ''
    });
}

# Before AQ drops the suite's database at exit (its END), every primary
# stops waiting for a synchronous standby: one whose standby is gone would
# make DROP DATABASE wait for ever.  An END block compiled now, after AQ's,
# runs before it.
my $release_registered;
sub release_sync_at_exit {
    return if $release_registered++;
    eval 'END { AQ::Standby::release_all_sync() } 1' or die "AQ::Standby: $@";
}

# pg_stat_replication's row (state, sync_state, replay_lsn, ...) of a
# standby of this node, found by its replication slot; {} when none.
sub replication_state {
    my ($self, $standby) = @_;
    my $row = $self->db->selectrow_hashref(
        q{SELECT r.* FROM pg_replication_slots s
            JOIN pg_stat_replication r ON r.pid = s.active_pid
           WHERE s.slot_name = ?}, undef, $standby->{slot});
    return $row // {};
}

sub current_lsn { return $_[0]->value('SELECT pg_current_wal_lsn()::text') }

# Waits until this standby has replayed the WAL its primary had written
# when called (or up to $lsn); returns that LSN.
sub wait_replayed {
    my ($self, $primary, $lsn) = @_;
    $primary //= $self->{upstream};
    $lsn //= $primary->current_lsn;
    AQ::Standby::wait_for("$self->{name} replays up to $lsn", 30, sub {
        $self->value('SELECT pg_last_wal_replay_lsn() >= ?::pg_lsn', $lsn)
    });
    return $lsn;
}

# The server crashes: the postmaster is stopped (SIGSTOP: it forks no
# more), then it and every process it started get SIGKILL at once, as if
# the machine had died; returns when none of them is left.  Its clients see
# their connections reset; new connections are refused.
sub kill9 {
    my ($self) = @_;
    my $pm = $self->postmaster_pid or die "AQ::Standby: $self->{name} has no postmaster\n";
    $self->forget_handles;
    kill 'STOP', $pm;
    my @pids = ($pm, children($pm));
    kill 'KILL', @pids;
    delete $self->{frozen};
    AQ::Standby::wait_for("$self->{name}'s processes gone", 10, sub {
        !grep { alive($_) } @pids
    });
    return scalar @pids;
}

# The server hangs (a paused machine, a server stuck in I/O): SIGSTOP to
# the postmaster and every process it started.  Its port still completes
# TCP handshakes (the kernel's listen queue) but nothing answers: a new
# connection waits for the server's first message forever.  kill9() ends it.
sub freeze {
    my ($self) = @_;
    my $pm = $self->postmaster_pid or die "AQ::Standby: $self->{name} has no postmaster\n";
    $self->forget_handles;
    kill 'STOP', $pm;
    my @pids = children($pm);
    kill 'STOP', @pids if @pids;
    $self->{frozen} = 1;
    return 1 + @pids;
}

sub children {
    my ($ppid) = @_;
    my @pids;
    opendir my $d, '/proc' or return ();
    for my $p (grep { /^\d+$/ } readdir $d) {
        my $stat = AQ::Standby::slurp("/proc/$p/stat");
        push @pids, $p if $stat =~ /^\d+ \(.*\) \S (\d+) /s && $1 == $ppid;
    }
    return @pids;
}

# pg_ctl promote (waits for the end of recovery), then waits until a new
# session may write.
sub promote {
    my ($self) = @_;
    AQ::Standby::run(AQ::Standby::as_pg("$AQ::Standby::PGBIN/pg_ctl", '-D', $self->{data},
                                        '-w', '-t', 60 * AQ::Standby::slow(), 'promote'));
    AQ::Standby::wait_for("$self->{name} out of recovery", 30, sub {
        !$self->in_recovery
    });
    delete $self->{upstream};
    return $self;
}

# The backends of nginx's pool on this node (application_name
# nginx_annotation_queue), in any database.
sub nginx_backends {
    my ($self) = @_;
    return $self->value(q{SELECT count(*) FROM pg_stat_activity
                           WHERE application_name = 'nginx_annotation_queue'});
}

1;
