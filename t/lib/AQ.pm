package AQ;

# Shared fixtures of the Test::Nginx suites.
#
#   use lib 't/lib';
#   use AQ;                              # before Test::Nginx::Socket
#   use Test::Nginx::Socket 'no_plan';
#   AQ::default_blocks();                # defaults, see there
#
# Loading AQ gives the suite its own database, copied from the
# "annotation_queue" database of the cluster that scripts/test.sh started
# (AQ_TEST_PG_DSN), and exports its conninfo as $ENV{TEST_NGINX_AQ_DSN}: write
# "$TEST_NGINX_AQ_DSN" in http_config / config / main_config.  Run by hand
# (prove -I t/lib t/010-claim.t), it starts its own cluster with
# scripts/pg.sh in a temporary directory.  Everything is dropped or stopped
# at exit.
#
# The sections of a Test::Nginx block that say "eval" run in package
# Test::Base::Filter, all of them before the first block runs: name the
# helpers AQ::..., the suite's fixtures $::name.  Code that must run between
# two requests goes in a response_body_filters sub (see AQ::then).

use strict;
use warnings;

use Cwd qw(abs_path);
use DBI;
use Digest::SHA qw(sha256_hex);
use File::Basename qw(basename dirname);
use File::Path qw(make_path remove_tree);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use JSON::PP ();
use POSIX ();
use Time::HiRes ();
use Time::Local qw(timegm);

our $TOP    = abs_path(dirname(__FILE__) . '/../..');
our $MODULE = "$TOP/build/ngx_http_annotation_queue_module.so";
our $URI    = '/api/v1/annotations/queue';

my $OWNER_PID = $$;
my $JSON      = JSON::PP->new->utf8->allow_bignum->canonical;

our ($DB, $DSN, $DEAD_DSN, $CLUSTER_DIR, %PG);
my ($dbh, @extra_dbh, @nginxes, $seq);
my (%item_label, %label_item, %queue_label);

# ---------------------------------------------------------------------------
# Environment for Test::Nginx (read when Test::Nginx::Util is loaded).

$ENV{TEST_NGINX_BINARY}       ||= '/usr/sbin/nginx';
$ENV{TEST_NGINX_LOAD_MODULES} ||= $MODULE;

for my $so (split ' ', $ENV{TEST_NGINX_LOAD_MODULES}) {
    die "AQ: $so is missing: build the module first (make)\n" unless -f $so;
}

if (my $base = $ENV{AQ_TEST_SERVROOT_BASE}) {
    $ENV{TEST_NGINX_SERVROOT} ||= "$base/" . basename($0, '.t');
}
$ENV{TEST_NGINX_SERVER_PORT} ||= free_port();

# How many times slower than usual nginx runs: 10 under valgrind
# (TEST_NGINX_USE_VALGRIND, scripts/test-valgrind.sh), 1 otherwise;
# AQ_TEST_SLOW=<factor> overrides both.  Suites multiply by it what they
# wait for nginx to do (client timeouts, deadlines) and divide by it the
# rates they expect nginx to keep up with; at 1, nothing changes.
sub slow {
    my $f = $ENV{AQ_TEST_SLOW};
    return $f if defined $f && $f =~ /^\d+(?:\.\d+)?$/ && $f >= 1;
    return $ENV{TEST_NGINX_USE_VALGRIND} ? 10 : 1;
}

# The version of TEST_NGINX_BINARY as nginx_version in C: 1026003 for
# 1.26.3.  The suites run against several (scripts/test-matrix.sh); this is
# for what nginx itself changed between them.
my $nginx_version;
sub nginx_version {
    return $nginx_version if defined $nginx_version;
    my $out = `$ENV{TEST_NGINX_BINARY} -v 2>&1`;
    my ($maj, $min, $pat) = $out =~ m{nginx/(\d+)\.(\d+)\.(\d+)}
        or die "AQ: no version in $ENV{TEST_NGINX_BINARY} -v: $out\n";
    return $nginx_version = $maj * 1000000 + $min * 1000 + $pat;
}

# A server's HTTP/2 listener, e.g. listen_http2("127.0.0.1:$port ssl"):
# "listen ... http2" before nginx 1.25.1; from 1.25.1, where that is
# deprecated (a [warn] at each start), "listen ...; http2 on;".
sub listen_http2 {
    my ($listen) = @_;
    return nginx_version() >= 1025001 ? "listen $listen;\n        http2 on;"
                                      : "listen $listen http2;";
}

# ---------------------------------------------------------------------------
# PostgreSQL: the cluster, then this suite's database.

sub parse_conninfo {
    my ($conninfo) = @_;
    my %kv = map { split /=/, $_, 2 } split ' ', $conninfo;
    return %kv;
}

sub conninfo {
    my (%kv) = @_;
    return join ' ', map { "$_=$kv{$_}" } grep { defined $kv{$_} }
                     qw(host port user dbname);
}

sub dbi_connect {
    my ($dbname) = @_;
    my $h = DBI->connect("dbi:Pg:host=$PG{host};port=$PG{port};dbname=$dbname",
                         $PG{user}, '',
                         { AutoCommit => 1, RaiseError => 1, PrintError => 0,
                           AutoInactiveDestroy => 1, pg_enable_utf8 => 0 });
    $h->do('SET client_min_messages = warning');
    return $h;
}

sub setup_database {
    my $cluster = $ENV{AQ_TEST_PG_DSN};

    # A database to use as it is, neither copied nor dropped: the Citus
    # coordinator's of t/citus (AQ::Citus), which a copy would not
    # distribute.
    if (my $db = $ENV{AQ_TEST_DB_DSN}) {
        %PG = parse_conninfo($db);
        $DB = $PG{dbname};
        $DSN = conninfo(%PG);
        $DEAD_DSN = conninfo(%PG, host => '127.0.0.1', port => free_port());
        $ENV{TEST_NGINX_AQ_DSN}      = $DSN;
        $ENV{TEST_NGINX_AQ_DEAD_DSN} = $DEAD_DSN;
        return;
    }

    if (!$cluster) {
        $CLUSTER_DIR = tempdir('aq-pg-XXXXXX', TMPDIR => 1, CLEANUP => 0);
        chmod 0711, $CLUSTER_DIR;
        $cluster = `"$TOP/scripts/pg.sh" start "$CLUSTER_DIR/pg"`;
        die "AQ: scripts/pg.sh start failed\n" if $? != 0;
        chomp $cluster;
    }

    %PG = parse_conninfo($cluster);
    my $template = $PG{dbname} || 'annotation_queue';

    (my $name = lc basename($0, '.t')) =~ s/[^a-z0-9]+/_/g;
    $DB = "aq_${name}_$$";

    my $admin = dbi_connect('postgres');
    my $ok;
    for my $try (1 .. 5) {
        $ok = eval { $admin->do(qq{CREATE DATABASE "$DB" TEMPLATE "$template"}); 1 };
        last if $ok;
        Time::HiRes::sleep(0.2 * $try);    # the template is busy
    }
    if (!$ok) {
        $admin->do(qq{CREATE DATABASE "$DB"});
        my $dsn = conninfo(%PG, dbname => $DB);
        system("$TOP/scripts/pg.sh", 'apply', $dsn) == 0
            or die "AQ: scripts/pg.sh apply failed\n";
    }
    $admin->disconnect;

    $DSN      = conninfo(%PG, dbname => $DB);
    $DEAD_DSN = conninfo(%PG, host => '127.0.0.1', port => free_port(),
                         dbname => $DB);
    $ENV{TEST_NGINX_AQ_DSN}      = $DSN;
    $ENV{TEST_NGINX_AQ_DEAD_DSN} = $DEAD_DSN;
}

setup_database();

END {
    if ($$ == $OWNER_PID) {
        local $?;
        stop_nginx($_) for reverse @nginxes;
        for my $h (grep { defined } $dbh, @extra_dbh) {
            eval { $h->disconnect };
        }
        if ($DB && %PG && !$ENV{AQ_TEST_DB_DSN}) {
            eval {
                my $admin = dbi_connect('postgres');
                $admin->do(qq{DROP DATABASE IF EXISTS "$DB" WITH (FORCE)});
                $admin->disconnect;
            };
            warn "AQ: could not drop database $DB: $@" if $@;
        }
        if ($CLUSTER_DIR) {
            system("$TOP/scripts/pg.sh", 'stop', "$CLUSTER_DIR/pg");
            remove_tree($CLUSTER_DIR);
        }
    }
}

# The suite's own DBI handle (autocommit).
sub dbh {
    $dbh ||= dbi_connect($DB);
    return $dbh;
}

# Another session, e.g. to hold a lock while nginx runs a query.
sub new_session {
    my $h = dbi_connect($DB);
    push @extra_dbh, $h;
    return $h;
}

# ---------------------------------------------------------------------------
# Fixtures through the SQL API.

sub org {
    my ($name) = @_;
    $name //= 'org-' . ++$seq;
    return scalar dbh()->selectrow_array(
        'SELECT annotation_queue.create_org(?)', undef, $name);
}

# key($org, rater => 'ann', expires_in => '-1 hour'): a plaintext API key.
sub key {
    my ($org, %o) = @_;
    my $rater = $o{rater} // 'rater-' . ++$seq;
    if (defined $o{expires_in}) {
        return scalar dbh()->selectrow_array(
            'SELECT annotation_queue.create_api_key(?, ?, now() + ?::interval)',
            undef, $org, $rater, $o{expires_in});
    }
    return scalar dbh()->selectrow_array(
        'SELECT annotation_queue.create_api_key(?, ?)', undef, $org, $rater);
}

# $n fresh keys of one organisation, in one statement.
sub keys_for {
    my ($org, $n) = @_;
    return dbh()->selectcol_arrayref(
        q{SELECT annotation_queue.create_api_key(?, 'bulk-' || g)
            FROM generate_series(1, ?) AS g ORDER BY g}, undef, $org, $n);
}

# queue($org, 'label') has the default lease (15 minutes);
# queue($org, 'label', lease => '30 seconds'); lease => undef: NULL lease.
# overlap => k, max_attempts => n: create_queue's own.
sub queue {
    my ($org, $label, %o) = @_;
    my $name = $label // 'queue-' . ++$seq;
    my ($sql, @args) = ('SELECT annotation_queue.create_queue(?, ?', $org, $name);
    if (exists $o{lease}) {
        $sql .= ', lease => ?::interval';
        push @args, $o{lease};
    }
    for my $arg (qw(overlap max_attempts)) {
        next unless exists $o{$arg};
        $sql .= ", $arg => ?::int";
        push @args, $o{$arg};
    }
    my $id = dbh()->selectrow_array("$sql)", undef, @args);
    $queue_label{$id} = $name;
    return $id;
}

# enqueue($queue, 'label', '{"json": "text"}' or a Perl structure, $priority)
sub enqueue {
    my ($queue, $label, $payload, $priority) = @_;
    $payload = $JSON->encode($payload) if ref $payload;
    my $id = dbh()->selectrow_array(
        'SELECT annotation_queue.enqueue(?, ?::jsonb, ?)', undef,
        $queue, $payload, $priority // 0);
    label_item($id, $label) if defined $label;
    return $id;
}

# $n items {"n": 1} .. {"n": $n} in this order, labelled "$prefix-1" ..
# when a prefix is given; returns their ids.
sub enqueue_many {
    my ($queue, $n, %o) = @_;
    my $ids = dbh()->selectcol_arrayref(
        q{SELECT annotation_queue.enqueue(?, jsonb_build_object('n', g), ?)
            FROM generate_series(1, ?) AS g ORDER BY g},
        undef, $queue, $o{priority} // 0, $n);
    if (defined $o{prefix}) {
        label_item($ids->[$_ - 1], "$o{prefix}-$_") for 1 .. $n;
    }
    return $ids;
}

sub label_item {
    my ($id, $label) = @_;
    $item_label{$id}    = $label;
    $label_item{$label} = $id;
}

sub item_id { return $label_item{ $_[0] } }

sub revoke {
    my ($key) = @_;
    return scalar dbh()->selectrow_array(
        'SELECT annotation_queue.revoke_api_key(?)', undef, $key);
}

sub expire_key {
    my ($key) = @_;
    dbh()->do(q{UPDATE annotation_queue.api_keys
                   SET expires_at = now() - interval '1 second'
                 WHERE key_hash = annotation_queue.key_hash(?)}, undef, $key);
}

sub key_id {
    my ($key) = @_;
    return scalar dbh()->selectrow_array(
        q{SELECT id FROM annotation_queue.api_keys
           WHERE key_hash = annotation_queue.key_hash(?)}, undef, $key);
}

# Makes an item's lease run out (by label or id).
sub expire_lease {
    my ($item) = @_;
    $item = $label_item{$item} // $item;
    dbh()->do(q{UPDATE annotation_queue.items
                   SET lease_expires_at = now() - interval '1 second'
                 WHERE id = ?}, undef, $item);
}

my $UTC = q{'YYYY-MM-DD"T"HH24:MI:SS.US'};

# An item row (by label or id), timestamps also as UTC text (*_utc).
# An item's row; of an item of several slots (overlap), the slot of that
# version, else a claimed one, else the first.  With the queue's overlap and
# the item's completed slots.
sub item {
    my ($item, $version) = @_;
    $item = $label_item{$item} // $item;
    return dbh()->selectrow_hashref(
        qq{SELECT i.*, payload::text AS payload_text,
                  to_char(claimed_at AT TIME ZONE 'UTC', $UTC) AS claimed_at_utc,
                  to_char(lease_expires_at AT TIME ZONE 'UTC', $UTC)
                      AS lease_expires_at_utc,
                  (SELECT overlap FROM annotation_queue.queues q
                    WHERE q.id = i.queue_id) AS queue_overlap,
                  (SELECT count(*) FROM annotation_queue.items c
                    WHERE c.id = i.id AND c.status = 'completed')
                      AS slots_completed
             FROM annotation_queue.items AS i WHERE id = ?
            ORDER BY i.version = ? DESC NULLS LAST,
                     i.status = 'claimed' DESC, i.slot
            LIMIT 1}, undef, $item, $version);
}

# { available => n, claimed => n, completed => n } of a queue.
sub counts {
    my ($queue) = @_;
    my %c = (available => 0, claimed => 0, completed => 0);
    my $rows = dbh()->selectall_arrayref(
        q{SELECT status, count(*) FROM annotation_queue.items
           WHERE queue_id = ? GROUP BY status}, undef, $queue);
    $c{ $_->[0] } = $_->[1] for @$rows;
    return \%c;
}

# The backends of this suite's database other than ours, e.g. nginx's pool.
sub terminate_backends {
    return scalar dbh()->selectrow_array(
        q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid()
             AND backend_type = 'client backend'});
}

# ---------------------------------------------------------------------------
# Keys, uuids.

sub random_hex {
    my ($n) = @_;
    return join '', map { sprintf '%x', int rand 16 } 1 .. $n;
}

sub key_checksum { return substr sha256_hex($_[0]), 0, 8 }

# A well-formed key (valid checksum) for a 64-hex body (random by default):
# nobody knows it unless the database does.
sub well_formed_key {
    my ($body) = @_;
    $body //= random_hex(64);
    return 'aqk_' . $body . key_checksum($body);
}

sub random_uuid {
    my $h = random_hex(32);
    substr($h, 12, 1) = '4';
    substr($h, 16, 1) = (qw(8 9 a b))[int rand 4];
    return join '-', substr($h, 0, 8), substr($h, 8, 4), substr($h, 12, 4),
                     substr($h, 16, 4), substr($h, 20, 12);
}

# The parts of a key that are secret: everything after its public prefix
# ("aqk_" + 8 digits, which may be logged).  For --- no_error_log.
sub secret_parts {
    my ($key) = @_;
    return (substr($key, 12, 24), substr($key, 36, 24), substr($key, -24));
}

# ---------------------------------------------------------------------------
# Requests for Test::Nginx blocks.

# --- request eval: a claim of a queue.
sub claim_req {
    my ($queue) = @_;
    return "POST $URI\n" . qq({"queue_id":"$queue"});
}

# --- request eval: a POST with this body (Test::Nginx trims whitespace).
sub post_req {
    my ($body) = @_;
    return "POST $URI\n$body";
}

# --- more_headers eval: the headers of a client holding this key.
sub headers {
    my ($key) = @_;
    return "Authorization: Bearer $key\nContent-Type: application/json";
}

# --- raw_request eval: bytes exactly as given.
#   raw_post(key => $k, body => $bytes)            Content-Length
#   raw_post(key => $k, chunks => [$b1, $b2])      Transfer-Encoding: chunked
#   raw_post(..., headers => ["X: y"], length => 5000, method => 'PUT')
sub raw_post {
    my (%o) = @_;
    my $method = $o{method} // 'POST';
    my @h = ('Host: localhost', 'Connection: close');
    push @h, "Authorization: Bearer $o{key}" if defined $o{key};
    push @h, @{ $o{headers} || [] };
    my $body = '';
    if ($o{chunks}) {
        push @h, 'Transfer-Encoding: chunked';
        $body = join('', map { sprintf("%x\r\n%s\r\n", length $_, $_) }
                         @{ $o{chunks} }) . "0\r\n\r\n";
    } elsif (defined $o{body}) {
        $body = $o{body};
        push @h, 'Content-Length: ' . ($o{length} // length $body);
    }
    return "$method $URI HTTP/1.1\r\n" . join('', map { "$_\r\n" } @h)
           . "\r\n" . $body;
}

# ---------------------------------------------------------------------------
# Response checks: --- response_body_filters eval  \&AQ::canon  (or brief,
# lease).  They decode the body, check its shape and compare a claimed item
# with its row, and return text to compare with --- response_body.

my $UUID_RE = qr/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
my $TS_RE   = qr/^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?Z$/;

# "2026-11-28T16:25:53.9Z" -> "2026-11-28T16:25:53.900000"
sub ts_micro {
    my ($ts) = @_;
    return undef unless defined $ts && !ref $ts && $ts =~ $TS_RE;
    return $1 . '.' . substr(($2 // '') . '000000', 0, 6);
}

sub ts_epoch {
    my ($ts) = @_;
    my $m = ts_micro($ts) // return undef;
    my ($y, $mo, $d, $h, $mi, $s, $us) =
        $m =~ /^(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)\.(\d+)$/;
    return timegm($s, $mi, $h, $d, $mo - 1, $y) + $us / 1e6;
}

sub canonical_json { return $JSON->encode($_[0]) }

sub same_keys {
    my ($what, $h, @want) = @_;
    my %want = map { $_ => 1 } @want;
    my @problems;
    push @problems, "$what lacks \"$_\"" for grep { !exists $h->{$_} } @want;
    push @problems, "$what has an unexpected \"$_\""
        for grep { !$want{$_} } sort keys %$h;
    return @problems;
}

# Decodes and checks a response body: ($doc with ids and timestamps replaced
# by placeholders, \@problems, $summary).
sub inspect {
    my ($raw) = @_;
    my $doc = eval { $JSON->decode($raw) };
    if (ref $doc ne 'HASH') {
        return (undef, ["not a JSON object: $raw"], "not a JSON object: $raw");
    }

    my @p;
    my $success = $doc->{success};
    if (!JSON::PP::is_bool($success)) {
        push @p, 'success is not a boolean';
    }

    if ($success && ref $doc->{item} eq 'HASH') {
        push @p, same_keys('body', $doc, qw(success item));
        my $it = $doc->{item};
        push @p, same_keys('item', $it, qw(id queue_id payload version
                                           claimed_at lease_expires_at
                                           overlap));
        my $id = $it->{id};
        my $row = (defined $id && !ref $id && $id =~ $UUID_RE)
                  ? item($id, $it->{version}) : undef;
        if (!$row) {
            push @p, 'item.id is not the id of an item: '
                     . (defined $id ? $id : 'null');
        } else {
            push @p, "item.queue_id is not the item's queue"
                unless ($it->{queue_id} // '') eq $row->{queue_id};
            push @p, "item.version $it->{version} != version $row->{version} in the database"
                unless defined $it->{version} && !ref $it->{version}
                    && $it->{version} eq $row->{version};
            push @p, "the item is $row->{status} in the database"
                unless $row->{status} eq 'claimed';
            for my $ts (qw(claimed_at lease_expires_at)) {
                my $got = ts_micro($it->{$ts});
                if (!defined $got) {
                    push @p, "item.$ts is not an RFC 3339 UTC timestamp: "
                             . ($it->{$ts} // 'null');
                } elsif ($got ne ($row->{"${ts}_utc"} // '')) {
                    push @p, "item.$ts $it->{$ts} != "
                             . ($row->{"${ts}_utc"} // 'NULL') . ' in the database';
                }
            }
            my $o = $it->{overlap};
            if (ref $o ne 'HASH') {
                push @p, 'item.overlap is not an object';
            } else {
                push @p, same_keys('item.overlap', $o, qw(required completed));
                push @p, "item.overlap.required $o->{required} != the queue's "
                         . "overlap $row->{queue_overlap}"
                    unless ($o->{required} // '') eq $row->{queue_overlap};
                push @p, "item.overlap.completed $o->{completed} != "
                         . "$row->{slots_completed} completed slots"
                    unless ($o->{completed} // '') eq $row->{slots_completed};
            }
            my $want = canonical_json($JSON->decode($row->{payload_text}));
            my $got  = canonical_json($it->{payload});
            push @p, "item.payload $got != $want in the database"
                unless $got eq $want;
        }
        $it->{id} = '<item:' . ($item_label{ $id // '' } // $id // 'null') . '>'
            if $row;
        my $q = $it->{queue_id};
        $it->{queue_id} = '<queue:' . $queue_label{$q} . '>'
            if defined $q && !ref $q && $queue_label{$q};
        for my $ts (qw(claimed_at lease_expires_at)) {
            $it->{$ts} = '<ts>' if defined ts_micro($it->{$ts});
        }
        my $v = $it->{version} // 'null';
        return ($doc, \@p, "item " . ($item_label{ $id // '' } // $id // '?') . " v$v");
    }

    if (defined $success && !$success && ref $doc->{error} eq 'HASH') {
        push @p, same_keys('body', $doc, qw(success error));
        my $e = $doc->{error};
        push @p, same_keys('error', $e, qw(code message));
        if (defined $e->{message} && !ref $e->{message} && length $e->{message}) {
            $e->{message} = '...';
        } else {
            push @p, 'error.message is not a non-empty string';
        }
        return ($doc, \@p, 'error ' . ($e->{code} // 'null'));
    }

    push @p, 'neither {"success":true,"item":{..}} nor {"success":false,"error":{..}}';
    return ($doc, \@p, "unexpected body: $raw");
}

# The canonical body (sorted keys, no spaces), ids as <item:label> and
# <queue:label>, timestamps as <ts>, message as "..."; "problems" lists what
# did not match the database or the contract.
sub canon {
    my ($raw) = @_;
    my ($doc, $problems) = inspect($raw);
    return "$problems->[0]\n" unless $doc;
    $doc->{problems} = $problems if @$problems;
    return canonical_json($doc) . "\n";
}

# One line: "item <label> v<version>" or "error <code>", then the problems.
sub brief {
    my ($raw) = @_;
    my (undef, $problems, $summary) = inspect($raw);
    return join('; ', $summary, @$problems) . "\n";
}

# "lease 900s": lease_expires_at - claimed_at of a claimed item.
sub lease {
    my ($raw) = @_;
    my $doc = eval { $JSON->decode($raw) };
    my $it = ref $doc eq 'HASH' ? $doc->{item} : undef;
    return "not a claimed item: $raw\n" unless ref $it eq 'HASH';
    my ($from, $to) = map { ts_epoch($it->{$_}) } qw(claimed_at lease_expires_at);
    return "bad timestamps: $raw\n" unless defined $from && defined $to;
    my $s = sprintf '%.6f', $to - $from;
    $s =~ s/\.?0+$//;
    return "lease ${s}s\n";
}

# A filter that runs code after a response and leaves the body alone:
#   --- response_body_filters eval
#   [[\&AQ::brief, AQ::then(sub { AQ::revoke($::key) })], [\&AQ::brief]]
sub then {
    my (@code) = @_;
    return sub { $_->() for @code; return $_[0] };
}

# A filter that appends a line computed after the response, e.g. from the
# database:  AQ::append(sub { 'attempts ' . AQ::item('a')->{attempts} })
sub append {
    my ($code) = @_;
    return sub { return $_[0] . $code->() . "\n" };
}

# Holds an ACCESS EXCLUSIVE lock on the items table in another session, so
# that every claim blocks until unlock_items().
my $locker;

sub lock_items {
    $locker ||= new_session();
    $locker->begin_work;
    $locker->do('LOCK TABLE annotation_queue.items IN ACCESS EXCLUSIVE MODE');
}

sub unlock_items {
    $locker->rollback if $locker && !$locker->{AutoCommit};
}

# The canonical error body.
sub error_body {
    my ($code) = @_;
    return qq({"error":{"code":"$code","message":"..."},"success":false}\n);
}

# ---------------------------------------------------------------------------
# Test::Nginx defaults (AQ::default_blocks): blocks run in file order, once;
# a block without http_config / config gets the database and the claim
# location; every block is checked for Content-Type: application/json.

our $HTTP_CONFIG = <<'_EOC_';
    annotation_queue_database "$TEST_NGINX_AQ_DSN";
_EOC_

our $CONFIG = <<"_EOC_";
    location = $URI {
        annotation_queue_claim;
    }
_EOC_

our $JSON_CONTENT_TYPE = 'Content-Type: application/json(;\s*charset=utf-8)?';

# Every answer of the module is JSON: a block that does not check
# Content-Type in --- response_headers_like gets that check, for each of its
# requests.
sub add_content_type_check {
    my ($block) = @_;
    return if defined $block->must_die || defined $block->response_headers;
    my $requests = $block->pipelined_requests // $block->request;
    my $add = sub {
        my ($h) = @_;
        return $JSON_CONTENT_TYPE if !defined $h || $h !~ /\S/;
        return $h if $h =~ /^\s*Content-Type\s*:/mi;
        return $h =~ /\n\z/ ? "$h$JSON_CONTENT_TYPE" : "$h\n$JSON_CONTENT_TYPE";
    };
    my $h = $block->response_headers_like;
    if (ref $h eq 'ARRAY') {
        $h = [map { $add->($_) } @$h];
    } elsif (ref $requests eq 'ARRAY') {
        $h = [map { $add->($h) } @$requests];
    } else {
        $h = $add->($h);
    }
    $block->set_value(response_headers_like => $h);
}

sub default_blocks {
    Test::Nginx::Socket::no_shuffle();
    Test::Nginx::Socket::repeat_each(1);
    Test::Nginx::Socket::add_block_preprocessor(sub {
        my ($block) = @_;
        $block->set_value(http_config => $HTTP_CONFIG)
            unless defined $block->http_config;
        $block->set_value(config => $CONFIG) unless defined $block->config;
        add_content_type_check($block);
    });
}

# ---------------------------------------------------------------------------
# A standalone nginx, for what Test::Nginx cannot do (several workers,
# concurrent clients):
#
#   my $ngx = AQ::start_nginx(workers => 2, http => 'annotation_queue_pool_size 4;');
#   my $c = AQ::Client->new(port => $ngx->{port});
#   my ($status, $headers, $body) = $c->claim($queue, $key);

sub free_port {
    my $s = IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1',
                                  LocalPort => 0, Proto => 'tcp', ReuseAddr => 1)
        or die "AQ: no free port: $!\n";
    my $port = $s->sockport;
    close $s;
    return $port;
}

# The text of an nginx.conf.  Options: prefix, port, workers (1), dsn
# ($DSN), http (more http directives), location (more location directives),
# log_level (info), worker_connections (1024), listen (more parameters of
# the listen directive: "reuseport" gives each worker a socket of its own,
# so that the kernel spreads new connections over the workers whatever
# their load).
# Directives every nginx of a suite gets in its http block (t/lib/AQ/Citus.pm
# sets annotation_queue_claim_wide there).
our $HTTP = '';

sub nginx_conf {
    my (%o) = @_;
    my $prefix  = $o{prefix} or die 'nginx_conf: prefix';
    my $port    = $o{port} // 0;
    my $workers = $o{workers} // 1;
    my $dsn     = $o{dsn} // $DSN;
    my $level   = $o{log_level} // 'info';
    my $wconns  = $o{worker_connections} // 1024;
    my $listen  = $o{listen} ? " $o{listen}" : '';
    my $http     = $o{http} // '';
    my $location = $o{location} // '';
    my $load  = join '', map { "load_module $_;\n" }
                         split ' ', $ENV{TEST_NGINX_LOAD_MODULES};
    my $user  = $> == 0 ? "user root;\n" : '';
    return <<"_EOC_";
${load}${user}worker_processes $workers;
daemon off;
master_process on;
error_log $prefix/logs/error.log $level;
pid $prefix/logs/nginx.pid;

events {
    worker_connections $wconns;
}

http {
    access_log off;
    client_body_temp_path $prefix/tmp/client_body;
    proxy_temp_path $prefix/tmp/proxy;
    fastcgi_temp_path $prefix/tmp/fastcgi;
    uwsgi_temp_path $prefix/tmp/uwsgi;
    scgi_temp_path $prefix/tmp/scgi;
    keepalive_requests 100000;

    annotation_queue_database "$dsn";
$HTTP$http
    server {
        listen 127.0.0.1:$port$listen;

        location = $URI {
            annotation_queue_claim;
$location
        }
    }
}
_EOC_
}

sub nginx_prefix {
    my $base = $ENV{TEST_NGINX_SERVROOT} ? "$ENV{TEST_NGINX_SERVROOT}-standalone"
                                         : undef;
    my $prefix;
    if ($base) {
        make_path($base);
        $prefix = tempdir('nginx-XXXXXX', DIR => $base, CLEANUP => 0);
    } else {
        $prefix = tempdir('aq-nginx-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    }
    make_path("$prefix/logs", "$prefix/conf", "$prefix/tmp");
    return $prefix;
}

# nginx -t on a configuration (options of nginx_conf, or conf => text):
# (exit status, output).
sub nginx_test_config {
    my (%o) = @_;
    my $prefix = nginx_prefix();
    my $conf = $o{conf} // nginx_conf(%o, prefix => $prefix,
                                      port => $o{port} // free_port());
    open my $fh, '>', "$prefix/conf/nginx.conf" or die $!;
    print $fh $conf;
    close $fh;
    my $out = `$ENV{TEST_NGINX_BINARY} -t -p $prefix/ -c $prefix/conf/nginx.conf 2>&1`;
    return ($? >> 8, $out);
}

sub start_nginx {
    my (%o) = @_;
    my $prefix = nginx_prefix();
    my $port = free_port();
    open my $fh, '>', "$prefix/conf/nginx.conf" or die $!;
    print $fh nginx_conf(%o, prefix => $prefix, port => $port);
    close $fh;

    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDOUT, '>', "$prefix/logs/stdout.log";
        open STDERR, '>', "$prefix/logs/stderr.log";
        { exec $ENV{TEST_NGINX_BINARY}, '-p', "$prefix/", '-c',
               "$prefix/conf/nginx.conf" }
        POSIX::_exit(127);
    }
    my $ngx = bless { pid => $pid, prefix => $prefix, port => $port }, 'AQ::Nginx';
    push @nginxes, $ngx;

    my $deadline = Time::HiRes::time() + 10 * slow();
    while (1) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                      Proto => 'tcp');
        if ($s) {
            close $s;
            last;
        }
        if (waitpid($pid, POSIX::WNOHANG()) == $pid) {
            $ngx->{pid} = undef;
            die "AQ: nginx exited at start:\n" . slurp("$prefix/logs/stderr.log")
                . slurp("$prefix/logs/error.log");
        }
        die "AQ: nginx does not listen on $port\n" if Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
    return $ngx;
}

# QUIT (graceful), then KILL after 10 s (times AQ::slow(): under valgrind,
# each process checks for leaks as it exits).
sub stop_nginx {
    my ($ngx) = @_;
    my $pid = $ngx->{pid} or return;
    kill 'QUIT', $pid;
    my $deadline = Time::HiRes::time() + 10 * slow();
    while (waitpid($pid, POSIX::WNOHANG()) == 0) {
        if (Time::HiRes::time() > $deadline) {
            kill 'KILL', $pid;
            waitpid($pid, 0);
            last;
        }
        Time::HiRes::sleep(0.05);
    }
    $ngx->{pid} = undef;
}

sub slurp {
    my ($file) = @_;
    open my $fh, '<', $file or return '';
    local $/;
    return scalar <$fh>;
}

# Runs $code->($i) in $n forked processes that start together; returns the
# values they returned (JSON-serialisable), in order.  A child that dies
# returns { died => message }; one still running after timeout seconds
# (120, times AQ::slow()) is killed.
sub parallel {
    my ($n, $code, %o) = @_;
    my $dir = tempdir('aq-par-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    pipe(my $go_r, my $go_w) or die "pipe: $!";
    my @pids;
    for my $i (0 .. $n - 1) {
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            close $go_w;
            my $buf;
            sysread($go_r, $buf, 1);    # EOF: go
            my $res = eval { $code->($i) };
            $res = { died => "$@" } if $@;
            if (open my $fh, '>', "$dir/$i.json") {
                print $fh JSON::PP->new->utf8->allow_nonref->encode($res);
                close $fh;
            }
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    close $go_r;
    close $go_w;    # all children start
    my $deadline = Time::HiRes::time() + ($o{timeout} // 120) * slow();
    my %left = map { $_ => 1 } @pids;
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
    for my $i (0 .. $n - 1) {
        my $text = slurp("$dir/$i.json");
        push @res, length $text
                   ? JSON::PP->new->utf8->allow_nonref->decode($text)
                   : { died => 'no result (killed?)' };
    }
    # now: CLEANUP waits for the suite's end, which a suite that exits
    # through POSIX::_exit or a signal never reaches
    File::Path::remove_tree($dir);
    return \@res;
}

# A pool of keys that forked clients draw from (AQ::parallel): each take()
# hands out the next unused key, or undef when all are gone.  Clients whose
# share of the work is uneven (a worker starved of CPU serves its clients
# seldom) never run out while keys are left for anyone.
#
#   my $pool = AQ::key_pool($org, $items + 2 * $clients);
#   ... in each client: while (defined(my $key = $pool->take)) { ... }
sub key_pool {
    my ($org, $n) = @_;
    return AQ::KeyPool->new(keys_for($org, $n));
}

# The problems of a set of claims answered 200, each [item id, version,
# key, client] as answered (in any order, from any number of clients; client
# is any label, optional): every answer must name an item that the database
# says is claimed by that very key (items.claimed_by = the key's id) at the
# version answered, and no item may be answered twice, whether to two
# clients or twice to one.  With queue => $q, no key may hold two items of
# that queue either.  dbh => $h reads through another handle (one that
# survives a server restart, AQ::Faults::db).  The problems name items and
# answers, never keys.  Returns a list of problems (empty when all is well).
sub answers_problems {
    my ($answers, %o) = @_;
    my $h = $o{dbh} // dbh();
    my (@p, %by_item);
    push @{ $by_item{ $_->[0] // '' } }, $_ for @$answers;
    for my $id (sort keys %by_item) {
        my @a = @{ $by_item{$id} };
        next if @a == 1;
        my %clients = map { ($_->[3] // '') => 1 } @a;
        push @p, sprintf 'item %s answered %d times%s', $id, scalar @a,
                         keys %clients == 1 && defined $a[0][3] ? ' (within one client)' : '';
    }
    if (defined $o{queue}) {
        my ($held) = $h->selectrow_array(
            q{SELECT count(*) FROM (SELECT claimed_by FROM annotation_queue.items
                                     WHERE queue_id = ? AND status = 'claimed'
                                     GROUP BY claimed_by HAVING count(*) > 1) AS t},
            undef, $o{queue});
        push @p, "$held keys hold more than one item of the queue" if $held;
    }
    return @p unless @$answers;
    my $uuid = qr/^[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}$/i;
    my @items = map { defined $_->[0] && $_->[0] =~ $uuid ? $_->[0] : undef } @$answers;
    my @versions = map { defined $_->[1] && $_->[1] =~ /^\d{1,18}$/ ? $_->[1] : undef } @$answers;
    my @keys = map { $_->[2] } @$answers;
    my $rows = $h->selectall_arrayref(
        q{SELECT a.n, i.id IS NOT NULL, i.status, i.version, k.id IS NOT NULL,
                 coalesce(i.claimed_by = k.id, false), i.queue_id
            FROM unnest(?::uuid[], ?::bigint[], ?::text[])
                 WITH ORDINALITY AS a(item, version, key, n)
            LEFT JOIN annotation_queue.items i ON i.id = a.item
            LEFT JOIN annotation_queue.api_keys k
                   ON k.key_hash = annotation_queue.key_hash(a.key)
           ORDER BY a.n}, undef, \@items, \@versions, \@keys);
    for my $r (@$rows) {
        my ($n, $found, $status, $version, $key_found, $mine, $queue) = @$r;
        my ($item, $answered) = @{ $answers->[ $n - 1 ] };
        my $what = 'answer ' . $n . ' (item ' . ($item // 'none') . ')';
        if (!$found) {
            push @p, "$what: not in the database";
            next;
        }
        push @p, "$what: not an item of the queue"
            if defined $o{queue} && $queue ne $o{queue};
        push @p, "$what: the key is not in the database" unless $key_found;
        push @p, "$what: the item is $status" unless $status eq 'claimed';
        push @p, "$what: the item is held by another key" if $key_found && !$mine;
        push @p, "$what: answered v" . ($answered // '?') . ", v$version in the database"
            unless defined $answered && $answered eq $version;
    }
    return @p;
}

# The same for answers as [key, item id, version, client] of one queue.
sub claim_answer_problems {
    my ($queue, $answers) = @_;
    return answers_problems([map { [@$_[1, 2, 0, 3]] } @$answers], queue => $queue);
}

# The hex SHA-256 of a key, as api_keys.key_hash holds it.
sub key_digest_hex { return sha256_hex($_[0]) }

# ---------------------------------------------------------------------------

package AQ::KeyPool;

use Fcntl qw(:flock SEEK_SET);

sub new {
    my ($class, $keys) = @_;
    my $dir = File::Temp::tempdir('aq-keys-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    open my $fh, '>', "$dir/next" or die "AQ::KeyPool: $!";
    print $fh "0\n";
    close $fh;
    return bless { keys => $keys, next => "$dir/next" }, $class;
}

sub size { scalar @{ $_[0]{keys} } }

sub take {
    my ($self) = @_;
    open my $fh, '+<', $self->{next} or die "AQ::KeyPool: $!";
    flock($fh, LOCK_EX) or die "AQ::KeyPool: flock: $!";
    my $i = <$fh>;
    chomp $i;
    seek($fh, 0, SEEK_SET);
    print $fh $i + 1, "\n";
    close $fh;    # unlocks
    return $i < @{ $self->{keys} } ? $self->{keys}[$i] : undef;
}

# How many keys were handed out (in the parent, after the clients).
sub taken {
    my ($self) = @_;
    my $n = AQ::slurp($self->{next});
    chomp $n;
    return $n > @{ $self->{keys} } ? scalar @{ $self->{keys} } : $n;
}

# ---------------------------------------------------------------------------

package AQ::Nginx;

sub port      { $_[0]{port} }
sub prefix    { $_[0]{prefix} }
sub error_log { AQ::slurp("$_[0]{prefix}/logs/error.log") }
sub stop      { AQ::stop_nginx($_[0]) }

# ---------------------------------------------------------------------------
# An HTTP/1.1 keep-alive client.  A request is never retried; one whose
# answer takes longer than timeout seconds (10, times AQ::slow()) fails.

package AQ::Client;

use Errno qw(EINTR);
use IO::Select;
use IO::Socket::INET;
use Socket qw(IPPROTO_TCP TCP_NODELAY);
use Time::HiRes ();

sub new {
    my ($class, %o) = @_;
    $SIG{PIPE} = 'IGNORE';
    return bless { port => $o{port}, timeout => ($o{timeout} // 10) * AQ::slow(),
                   sock => undef, buf => '' }, $class;
}

sub connected { defined $_[0]{sock} }

sub disconnect {
    my ($self) = @_;
    CORE::close($self->{sock}) if $self->{sock};
    $self->{sock} = undef;
    $self->{buf} = '';
}

sub _connect {
    my ($self) = @_;
    return 1 if $self->{sock};
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                  PeerPort => $self->{port}, Proto => 'tcp',
                                  Timeout => $self->{timeout})
        or return 0;
    setsockopt($s, IPPROTO_TCP, TCP_NODELAY, 1);
    binmode $s;
    $self->{sock} = $s;
    $self->{buf} = '';
    return 1;
}

# Sends a request without waiting for the answer.  Options: method, body,
# key, headers => { name => value }.
sub send_request {
    my ($self, %o) = @_;
    $self->_connect or return "connect: $!";
    my $method = $o{method} // 'POST';
    my $body = $o{body} // '';
    my %h = (Host => 'localhost', %{ $o{headers} || {} });
    $h{Authorization} = "Bearer $o{key}" if defined $o{key};
    $h{'Content-Type'} //= 'application/json' if length $body;
    $h{'Content-Length'} //= length $body if $method eq 'POST' || length $body;
    my $req = "$method " . ($o{uri} // $AQ::URI) . " HTTP/1.1\r\n"
              . join('', map { "$_: $h{$_}\r\n" } sort keys %h) . "\r\n" . $body;
    my $off = 0;
    while ($off < length $req) {
        my $n = syswrite($self->{sock}, $req, length($req) - $off, $off);
        if (!defined $n) {
            next if $! == EINTR;
            my $err = "write: $!";
            $self->disconnect;
            return $err;
        }
        $off += $n;
    }
    return undef;
}

sub _fill {
    my ($self, $deadline) = @_;
    my $left = $deadline - Time::HiRes::time();
    return 'timeout' if $left <= 0;
    return 'timeout' unless IO::Select->new($self->{sock})->can_read($left);
    my $n = sysread($self->{sock}, $self->{buf}, 65536, length $self->{buf});
    return "read: $!" unless defined $n;
    return 'closed' if $n == 0;
    return undef;
}

# Reads one response: { status, headers => { lowercase name => value },
# body, error }.  status 0 when none could be read.
sub read_response {
    my ($self) = @_;
    my $res = { status => 0, headers => {}, body => '' };
    if (!$self->{sock}) {
        $res->{error} = 'not connected';
        return $res;
    }
    my $deadline = Time::HiRes::time() + $self->{timeout};
    my $end;
    while (($end = index $self->{buf}, "\r\n\r\n") < 0) {
        if (my $err = $self->_fill($deadline)) {
            $res->{error} = "$err before the response head";
            $self->disconnect;
            return $res;
        }
    }
    my $head = substr $self->{buf}, 0, $end + 4, '';
    my ($status_line, @lines) = split /\r\n/, $head;
    ($res->{status}) = $status_line =~ m{^HTTP/1\.[01] (\d{3})};
    $res->{status} //= 0;
    for (@lines) {
        my ($k, $v) = /^([^:]+):\s*(.*?)\s*$/ or next;
        $res->{headers}{ lc $k } = $v;
    }
    my $h = $res->{headers};
    if (($h->{'transfer-encoding'} // '') =~ /chunked/i) {
        while (1) {
            my $nl;
            while (($nl = index $self->{buf}, "\r\n") < 0) {
                if (my $err = $self->_fill($deadline)) {
                    $res->{error} = "$err in a chunk";
                    $self->disconnect;
                    return $res;
                }
            }
            my $size = hex substr $self->{buf}, 0, $nl + 2, '';
            while (length $self->{buf} < $size + 2) {
                if (my $err = $self->_fill($deadline)) {
                    $res->{error} = "$err in a chunk";
                    $self->disconnect;
                    return $res;
                }
            }
            $res->{body} .= substr $self->{buf}, 0, $size, '';
            substr $self->{buf}, 0, 2, '';
            last if $size == 0;
        }
    } elsif (defined $h->{'content-length'}) {
        my $len = $h->{'content-length'};
        while (length $self->{buf} < $len) {
            if (my $err = $self->_fill($deadline)) {
                $res->{error} = "$err in the body";
                $self->disconnect;
                return $res;
            }
        }
        $res->{body} = substr $self->{buf}, 0, $len, '';
    } else {
        while (!(my $err = $self->_fill($deadline))) { }
        $res->{body} = $self->{buf};
        $self->disconnect;
        return $res;
    }
    $self->disconnect if ($h->{connection} // '') =~ /close/i;
    return $res;
}

# (status, headers, body) of a request on the kept-alive connection.
sub request {
    my ($self, %o) = @_;
    if (my $err = $self->send_request(%o)) {
        return (0, {}, '', $err);
    }
    my $res = $self->read_response;
    return ($res->{status}, $res->{headers}, $res->{body}, $res->{error});
}

sub post {
    my ($self, $body, %headers) = @_;
    return $self->request(body => $body, headers => \%headers);
}

sub claim {
    my ($self, $queue, $key) = @_;
    return $self->request(body => qq({"queue_id":"$queue"}), key => $key);
}

1;
