package AQ::Cluster;

# A PostgreSQL cluster of the suite's own, set up for the ways the module
# connects to PostgreSQL (t/065-connection.t):
#
#   BEGIN { require AQ::Cluster; AQ::Cluster::start() }
#   use AQ;                   # AQ makes the suite's database on that cluster
#   AQ::Cluster::grant();     # the roles below may use the suite's database
#
# start() runs scripts/pg.sh start in a temporary directory (PostgreSQL on
# 127.0.0.1 and on a unix socket in that directory), then:
#
#   - TLS: a self-signed certificate (EC P-256, CN and subjectAltName
#     127.0.0.1) made now with `openssl req -x509` in the directory, and
#     ssl = on; a second, unrelated self-signed certificate ($OTHER_CRT) to
#     be a wrong root for sslmode=verify-full;
#   - roles: aq_tls (a password, TLS only: hostssl scram-sha-256,
#     hostnossl reject), aq_pw (a password, plain TCP only: hostnossl
#     scram-sha-256, hostssl reject, so that sslmode=prefer has to fall back
#     to a plain connection), and the role named after the user this runs
#     as (peer authentication over the unix socket: nginx's workers run as
#     that user);
#   - pg_hba.conf: postgres without a password over TCP (the suites'
#     fixtures, scripts/pg.sh), the rules above, nothing else.
#
# The cluster is stopped at exit, after AQ has dropped its database (this
# file's END runs after AQ's, being compiled first).  set_ssl(0) / set_ssl(1)
# turn the server's TLS off and on again (a configuration reload, no
# restart); both wait until a new connection sees the change.

use strict;
use warnings;

use Cwd qw(abs_path);
use DBI;
use File::Basename qw(dirname);
use File::Copy qw(copy);
use File::Path qw(remove_tree);
use File::Temp qw(tempdir);
use Time::HiRes ();

our $TOP = abs_path(dirname(__FILE__) . '/../../..');
our ($TMP, $DIR, $DSN, %PG);
our ($SOCKET_DIR, $SERVER_CRT, $OTHER_CRT, $EMPTY_PASSFILE);
our (%PASSWORD, $PEER_ROLE);
my $OWNER_PID = $$;

sub random_hex {
    my ($n) = @_;
    open my $fh, '<:raw', '/dev/urandom' or die "AQ::Cluster: /dev/urandom: $!\n";
    read($fh, my $bytes, $n) == $n or die "AQ::Cluster: /dev/urandom: short read\n";
    close $fh;
    return unpack 'H*', $bytes;
}

sub run_quiet {
    my (@cmd) = @_;
    my $out = `@{[ join ' ', map { "'$_'" } @cmd ]} 2>&1`;
    die "AQ::Cluster: @cmd failed:\n$out" if $? != 0;
    return $out;
}

# A self-signed certificate for 127.0.0.1 (key, certificate).
sub self_signed {
    my ($key, $crt, $cn) = @_;
    run_quiet('openssl', 'req', '-x509', '-newkey', 'ec',
              '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
              '-days', '2', '-subj', "/CN=$cn",
              '-addext', 'subjectAltName=IP:127.0.0.1',
              '-keyout', $key, '-out', $crt);
}

# Files the server reads must belong to the user it runs as; the key must
# be private to it.
sub give_to_server {
    my (@files) = @_;
    return unless $> == 0;
    my (undef, undef, $uid, $gid) = getpwnam('postgres')
        or die "AQ::Cluster: no postgres user\n";
    chown $uid, $gid, @files or die "AQ::Cluster: chown @files: $!\n";
}

# AQ::slow(), before AQ is loaded (start() runs in a BEGIN block)
sub slow { return defined &AQ::slow ? AQ::slow() : 1 }

sub admin {
    my ($dbname) = @_;
    return DBI->connect("dbi:Pg:host=$PG{host};port=$PG{port};dbname=$dbname",
                        $PG{user}, '',
                        { AutoCommit => 1, RaiseError => 1, PrintError => 0,
                          AutoInactiveDestroy => 1 });
}

sub start {
    $TMP = tempdir('aq-conn-XXXXXX', TMPDIR => 1, CLEANUP => 0);
    chmod 0711, $TMP;    # the postgres user must reach its directory
    $DIR = "$TMP/pg";
    my $dsn = `"$TOP/scripts/pg.sh" start "$DIR"`;
    die "AQ::Cluster: scripts/pg.sh start failed\n" if $? != 0;
    chomp $dsn;
    $DSN = $dsn;
    $ENV{AQ_TEST_PG_DSN} = $dsn;
    %PG = map { split /=/, $_, 2 } split ' ', $dsn;
    $SOCKET_DIR = $DIR;    # pg.sh: -k DIR

    # certificates: the server's, and one it does not have
    my $data = "$DIR/data";
    $SERVER_CRT = "$TMP/server.crt";
    $OTHER_CRT  = "$TMP/other.crt";
    self_signed("$data/server.key", $SERVER_CRT, '127.0.0.1');
    self_signed("$TMP/other.key", $OTHER_CRT, '127.0.0.1');
    copy($SERVER_CRT, "$data/server.crt") or die "AQ::Cluster: copy: $!\n";
    chmod 0600, "$data/server.key";
    chmod 0644, "$data/server.crt", $SERVER_CRT, $OTHER_CRT;
    give_to_server("$data/server.key", "$data/server.crt");

    # an empty password file: libpq finds no password in ~/.pgpass either
    $EMPTY_PASSFILE = "$TMP/empty.pgpass";
    open my $pf, '>', $EMPTY_PASSFILE or die "AQ::Cluster: $EMPTY_PASSFILE: $!\n";
    close $pf;
    chmod 0600, $EMPTY_PASSFILE;

    %PASSWORD = (aq_tls => 'tls-' . random_hex(12), aq_pw => 'pw-' . random_hex(12));
    $PEER_ROLE = getpwuid($>) or die "AQ::Cluster: who am I?\n";

    my $h = admin('postgres');
    $h->do(q{SET password_encryption = 'scram-sha-256'});
    for my $role (sort keys %PASSWORD) {
        $h->do(qq{CREATE ROLE "$role" LOGIN PASSWORD } . $h->quote($PASSWORD{$role}));
    }
    my ($peer_exists) = $h->selectrow_array(
        'SELECT count(*) FROM pg_roles WHERE rolname = ?', undef, $PEER_ROLE);
    $h->do(qq{CREATE ROLE "$PEER_ROLE" LOGIN}) unless $peer_exists;

    open my $hba, '>', "$data/pg_hba.conf" or die "AQ::Cluster: pg_hba.conf: $!\n";
    print $hba <<"_HBA_";
# AQ::Cluster (t/065-connection.t)
# TYPE    DATABASE USER         ADDRESS       METHOD
host      all      postgres     127.0.0.1/32  trust
hostssl   all      aq_tls       127.0.0.1/32  scram-sha-256
hostnossl all      aq_tls       127.0.0.1/32  reject
hostnossl all      aq_pw        127.0.0.1/32  scram-sha-256
hostssl   all      aq_pw        127.0.0.1/32  reject
local     all      "$PEER_ROLE" peer
_HBA_
    close $hba;
    give_to_server("$data/pg_hba.conf");

    # ssl_cert_file and ssl_key_file default to server.crt and server.key
    # in the data directory; ssl takes effect at a reload
    $h->do('ALTER SYSTEM SET ssl = on');
    $h->disconnect;
    reload_until(1);
    return $dsn;
}

# Reloads the server's configuration, then waits until a new session sees
# ssl = on (1) or off (0) (the postmaster reloads pg_hba.conf in the same
# step, before it forks that session).
sub reload_until {
    my ($on) = @_;
    my $h = admin('postgres');
    $h->do('SELECT pg_reload_conf()');
    $h->disconnect;
    my $want = $on ? 'on' : 'off';
    my $deadline = Time::HiRes::time() + 10 * slow();
    while (1) {
        my $s = admin('postgres');
        my ($v) = $s->selectrow_array('SHOW ssl');
        $s->disconnect;
        return if $v eq $want;
        die "AQ::Cluster: ssl is still $v after a reload\n"
            if Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
}

sub set_ssl {
    my ($on) = @_;
    my $h = admin('postgres');
    $h->do('ALTER SYSTEM SET ssl = ' . ($on ? 'on' : 'off'));
    $h->disconnect;
    reload_until($on);
}

# The roles may claim in the suite's database (AQ::DB): what the module's
# statements read and write (src/ngx_aq_sql.h), nothing more.
sub grant {
    my $h = AQ::dbh();
    for my $role (sort(keys %PASSWORD), $PEER_ROLE) {
        next if $role eq 'postgres';
        $h->do(qq{GRANT USAGE ON SCHEMA annotation_queue TO "$role"});
        $h->do(qq{GRANT SELECT ON annotation_queue.api_keys, annotation_queue.queues
                  TO "$role"});
        $h->do(qq{GRANT SELECT, UPDATE ON annotation_queue.items TO "$role"});
        # the claim reads it; the claim and the skip write it (the trigger
        # of sql/007 runs as the role)
        $h->do(qq{GRANT SELECT, INSERT, UPDATE ON annotation_queue.exclusions
                  TO "$role"});
    }
}

# A conninfo of the suite's database (AQ::DB), with these keywords.
sub conninfo {
    my (@kv) = @_;
    my @out;
    while (my ($k, $v) = splice @kv, 0, 2) {
        push @out, "$k=$v";
    }
    return join ' ', @out, "dbname=$AQ::DB";
}

sub log_text {
    return '' unless $DIR;
    open my $fh, '<', "$DIR/postgresql.log" or return '';
    local $/;
    return scalar <$fh>;
}

END {
    if ($$ == $OWNER_PID && $DIR) {
        local $?;
        # keep the server's log beside the suite's nginx server roots
        # (scripts/test.sh copies them to t/servroot-failed/ on failure)
        if (my $root = $ENV{TEST_NGINX_SERVROOT}) {
            copy("$DIR/postgresql.log", "$root-postgresql.log");
        }
        system("$TOP/scripts/pg.sh", 'stop', $DIR);
        # roles are the cluster's: they go with it
        remove_tree($TMP);
    }
}

1;
