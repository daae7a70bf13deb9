package AQ::Citus;

# A Citus cluster for the suites of t/citus: a coordinator and two workers
# on this machine (scripts/citus.sh), sql/ then sql/citus/ applied; AQ's
# database is the coordinator's (AQ_TEST_DB_DSN), so that AQ's fixtures
# (org, key, queue, enqueue) and nginx's annotation_queue_database go
# through the coordinator.  Load it before AQ:
#
#   use lib 't/lib';
#   use AQ::Citus;      # starts the cluster (skips the suite without Citus)
#   use AQ;
#
# The cluster is stopped and removed when the suite ends.  AQ_CITUS_KEEP=1
# keeps its directory (the nodes' logs).

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(remove_tree);
use File::Temp qw(tempdir);

our $TOP = abs_path(dirname(__FILE__) . '/../../..');
our ($DIR, $DSN);
my $OWNER = $$;

my $pkglib = `/usr/lib/postgresql/15/bin/pg_config --pkglibdir 2>/dev/null`;
chomp $pkglib;
if (!-f "$pkglib/citus.so") {
    require Test::More;
    Test::More::plan(skip_all => 'Citus is not installed for PostgreSQL 15 '
                     . '(scripts/build-citus.sh, or make test-citus)');
}

$DIR = tempdir('aq-citus-XXXXXX', TMPDIR => 1, CLEANUP => 0);
chmod 0711, $DIR;
$DSN = `"$TOP/scripts/citus.sh" start "$DIR/cluster"`;
die "AQ::Citus: scripts/citus.sh start failed\n" if $? != 0;
chomp $DSN;
$ENV{AQ_TEST_DB_DSN} = $DSN;

require AQ;

# every key is flagged there (sql/citus/001_distribute.sql): the lean claim
# would only send each claim on to the wide one
$AQ::HTTP = "    annotation_queue_claim_wide on;\n";

END {
    if ($$ == $OWNER && $DIR) {
        local $?;
        system("$TOP/scripts/citus.sh", 'stop', "$DIR/cluster");
        remove_tree($DIR) unless $ENV{AQ_CITUS_KEEP};
    }
}

sub port { my $p = `"$TOP/scripts/citus.sh" port "$DIR/cluster" $_[0]`; chomp $p; return $p }

sub stop_node  { system("$TOP/scripts/citus.sh", 'stop-node',  "$DIR/cluster", $_[0]) == 0 or die }
sub start_node { system("$TOP/scripts/citus.sh", 'start-node', "$DIR/cluster", $_[0]) == 0 or die }

# The node (worker1, worker2) that holds a queue's items.
sub node_of {
    my ($queue) = @_;
    my ($port) = AQ::dbh()->selectrow_array(
        q{SELECT s.nodeport FROM citus_shards s
           WHERE s.table_name = 'annotation_queue.items'::regclass
             AND s.shardid = get_shard_id_for_distribution_column(
                                 'annotation_queue.items', ?::uuid)},
        undef, $queue);
    for my $node (qw(worker1 worker2)) {
        return $node if defined $port && port($node) == $port;
    }
    return "port " . ($port // 'none');
}

# { worker1 => [queue, ...], worker2 => [...] }: $n queues of $org on each
# worker (created until both have $n; the others are left empty).
sub queues_on_both {
    my ($org, $n, %o) = @_;
    my %on = (worker1 => [], worker2 => []);
    for my $try (1 .. 200 * $n) {
        last if @{ $on{worker1} } >= $n && @{ $on{worker2} } >= $n;
        my $q = AQ::queue($org, ($o{prefix} // 'citus') . "-$try-" . int(rand(1e9)));
        my $node = node_of($q);
        push @{ $on{$node} }, $q if $on{$node} && @{ $on{$node} } < $n;
    }
    return \%on;
}

# The number of tasks of EXPLAIN of $sql with the typed parameters
# [[type, value], ...] (a prepared statement, run as the module runs it):
# the sum over its distributed steps (subplans included), and the plan.
sub tasks {
    my ($name, $sql, @params) = @_;
    my $dbh = AQ::dbh();
    my $types = join ', ', map { $_->[0] } @params;
    $dbh->do("DEALLOCATE $name") if $dbh->selectrow_array(
        'SELECT count(*) FROM pg_prepared_statements WHERE name = ?', undef, $name);
    $dbh->do("PREPARE $name ($types) AS $sql");
    my $args = join ', ', map { $dbh->quote($_->[1]) . "::$_->[0]" } @params;
    my $plan = join "\n", map { $_->[0] } @{ $dbh->selectall_arrayref(
        "EXPLAIN (COSTS OFF) EXECUTE $name ($args)") };
    my $count = 0;
    $count += $1 while $plan =~ /Task Count: (\d+)/g;
    return ($count, $plan);
}

1;
