# Skip (annotation_queue_skip): {"item_id", "version"} of the item the key
# holds.  Like release, the item (or, with overlap, the key's slot) goes
# back to the queue at once, its version incremented; unlike release, it is
# never handed to that key again (annotation_queue.exclusions), whatever the
# queue's overlap.  The errors are release's: 409 stale_claim, 404
# item_not_found, 401, 400.
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::Workflow;
use JSON::PP ();
use Test::More;

my $org = AQ::org('skip');
my $other = AQ::org('skip-other');
my $JSON = JSON::PP->new->utf8->canonical;
my $dbh = AQ::dbh();
my %URI = %AQ::Workflow::URI;

my ($ngx, $port) = AQ::Workflow::start_nginx(workers => 1,
    http => "annotation_queue_pool_size 2;\n"
            . "log_format outcome '\$annotation_queue_outcome';",
    server => <<'_EOC_');
        location = /outcome/skip {
            annotation_queue_skip;
            access_log logs/outcome.log outcome;
        }
_EOC_
my $c = AQ::Client->new(port => $port);

my %k = map { $_ => AQ::Workflow::key($org, $_) } qw(alice bob carol);
$k{eve} = AQ::Workflow::key($other, 'eve');

sub call {
    my ($action, $key, $body, $uri) = @_;
    my ($st, $h, $b, $e) = $c->request(uri => $uri // $URI{$action}, key => $key,
        body => ref $body ? $JSON->encode($body) : $body);
    my $res = { status => $st, body => $b, error => $e };
    my $doc = eval { $JSON->decode($b // '') };
    return (AQ::Workflow::outcome($res),
            ref $doc eq 'HASH' && ref $doc->{item} eq 'HASH' ? $doc->{item} : {},
            $h);
}

sub claim { return call('claim', $k{ $_[0] }, { queue_id => $_[1] }) }

sub skip_item {
    my ($who, $it, $uri) = @_;
    return call('skip', $k{$who}, { item_id => $it->{id}, version => $it->{version} },
                $uri);
}

my $q = AQ::queue($org, 'one');
my $A = AQ::enqueue($q, 'A', { item => 'A' });
my $B = AQ::enqueue($q, 'B', { item => 'B' });

my ($o, $it, $h) = claim('alice', $q);
is("$o $it->{id}", "200 claimed v1 $A", 'alice claims A');
($o, my $sk, $h) = skip_item('alice', $it);
is($o, '200 available v2', 'skip answers 200: the item available again, version 2');
is($sk->{lease_expires_at}, undef, '... without a lease');
is($h->{'cache-control'}, 'no-store', '... Cache-Control: no-store');
is(AQ::Workflow::row($A)->{status}, 'available', 'the item is available in the database');
is($dbh->selectrow_array(
       q{SELECT reason FROM annotation_queue.exclusions
          WHERE item_id = ? AND key_id = ?}, undef, $A, AQ::key_id($k{alice})),
   'skipped', 'annotation_queue.exclusions notes that alice skipped A');
is_deeply($dbh->selectcol_arrayref(
              q{SELECT has_exclusions FROM annotation_queue.api_keys
                 WHERE id = ANY (?) ORDER BY rater},
              undef, [map { AQ::key_id($k{$_}) } qw(alice bob)]),
          [1, 0], 'api_keys.has_exclusions: set for alice (her claims are '
                  . 'the wide claim from now on), not for bob');

($o, my $next) = claim('alice', $q);
is("$o " . ($next->{id} // 'none'), "200 claimed v1 $B",
   'alice is never handed the item she skipped: she gets B, although A comes first');
($o, my $bob) = claim('bob', $q);
is("$o " . ($bob->{id} // 'none'), "200 claimed v3 $A", 'bob gets A (version 3)');
($o) = call('release', $k{bob}, { item_id => $A, version => 3 });
is($o, '200 available v4', 'bob releases A');
($o) = call('complete', $k{alice}, { item_id => $B, version => 1, result => {} });
is($o, '200 completed v2', 'alice completes B');
($o) = claim('alice', $q);
is($o, '409 no_items_available',
   'alice: 409 although A is available (she skipped it), even after a release');
($o, my $bob2) = claim('bob', $q);
is("$o " . ($bob2->{id} // 'none'), "200 claimed v5 $A",
   'bob, who only released A, may take it again (overlap 1: as before)');

# the errors
($o) = skip_item('bob', { id => $A, version => 4 });
is($o, '409 stale_claim', 'a stale version: 409 stale_claim');
($o) = skip_item('carol', $bob2);
is($o, '409 stale_claim', 'an item the key does not hold: 409 stale_claim');
($o) = skip_item('eve', $bob2);
is($o, '404 item_not_found', "another organisation's item: 404 item_not_found");
($o) = skip_item('bob', { id => AQ::random_uuid(), version => 1 });
is($o, '404 item_not_found', 'an unknown item: 404 item_not_found');
($o) = call('skip', $k{bob}, '{"item_id": "nope", "version": 1}');
is($o, '400 invalid_item_id', 'a malformed item id: 400');
($o) = call('skip', AQ::well_formed_key(), { item_id => $A, version => 5 });
is($o, '401 invalid_api_key', 'an unknown key: 401');
is(AQ::Workflow::row($A)->{status} . ' v' . AQ::Workflow::row($A)->{version},
   'claimed v5', '... none of them changed the item');

# skip in a queue of overlap 2: the slot goes back, the key never gets the item
my $q2 = AQ::queue($org, 'two', overlap => 2);
my $C = AQ::enqueue($q2, 'C', { item => 'C' });
($o, my $ca) = claim('alice', $q2);
($o, my $cb) = claim('bob', $q2);
is("$ca->{id} $cb->{id}", "$C $C", 'overlap 2: alice and bob hold C');
($o) = skip_item('alice', $ca);
is($o, '200 available v2', 'overlap 2: alice skips her slot');
($o) = claim('alice', $q2);
is($o, '409 no_items_available', 'overlap 2: alice is not handed C again');
($o, my $cc) = claim('carol', $q2);
is("$o $cc->{id}", "200 claimed v3 $C", 'overlap 2: carol gets the slot alice skipped');

# a batch leaves a key with exclusions to the single claim: it never gets
# what it skipped, even when its claim waits with others for a connection
{
    my $what = 'concurrent claims after skips';
    my $bq = AQ::queue($org, 'batch');
    my $ids = AQ::enqueue_many($bq, 30);
    my @keys = map { AQ::Workflow::key($org, "b$_") } 1 .. 10;
    my @conns = map { AQ::Client->new(port => $port) } @keys;
    # each key skips the first item it gets
    my %skipped;
    for my $i (0 .. $#keys) {
        my ($st, $hh, $b) = $conns[$i]->claim($bq, $keys[$i]);
        my $d = $JSON->decode($b);
        $skipped{$i} = $d->{item}{id};
        my ($st2) = $conns[$i]->request(uri => $URI{skip}, key => $keys[$i],
            body => $JSON->encode({ item_id => $d->{item}{id},
                                    version => $d->{item}{version} }));
        is($st2, 200, "$what: b" . ($i + 1) . ' skips its first item') if $i == 0;
    }
    # all ten claim at once (2 connections: they wait and batch)
    $conns[$_]->send_request(uri => $URI{claim}, key => $keys[$_],
                             body => qq({"queue_id":"$bq"})) for 0 .. $#keys;
    my (@bad, %got);
    for my $i (0 .. $#keys) {
        my $res = $conns[$i]->read_response;
        my $d = eval { $JSON->decode($res->{body}) } // {};
        if ($res->{status} != 200) {
            push @bad, "b" . ($i + 1) . ": $res->{status}";
        } elsif ($d->{item}{id} eq $skipped{$i}) {
            push @bad, "b" . ($i + 1) . ' got the item it skipped';
        } else {
            $got{ $d->{item}{id} }++;
        }
    }
    is_deeply(\@bad, [], "$what: every key gets an item, never the one it skipped");
    is(scalar(grep { $_ > 1 } values %got), 0, "$what: no item twice");
    $_->disconnect for @conns;
}

# $annotation_queue_outcome says "skipped"
{
    my ($o2, $x) = claim('carol', $q);
    my $d = AQ::enqueue($q, 'D', { item => 'D' });
    ($o2, $x) = claim('carol', $q);
    ($o2) = skip_item('carol', $x, '/outcome/skip');
    is($o2, '200 available v2', 'a skip through a location with an access log');
    # nginx logs the request after its answer went out: wait for the line
    my @lines;
    my $deadline = time + 10 * AQ::slow();
    while (time < $deadline) {
        if (open my $fh, '<', "$ngx->{prefix}/logs/outcome.log") {
            @lines = <$fh>;
        }
        last if @lines;
        select(undef, undef, undef, 0.05);
    }
    is_deeply(\@lines, ["skipped\n"], '$annotation_queue_outcome is "skipped"');
}

$ngx->stop;
is_deeply([grep { /\[(?:error|alert|crit|emerg)\]/ } split /\n/, $ngx->error_log],
          [], 'no [error], [alert], [crit] or [emerg] in the error log');

# annotation_queue_claim_wide on: every claim runs the wide statement at
# once (as on Citus, where every key is flagged); skips hold the same
{
    my $what = 'annotation_queue_claim_wide on';
    my ($wngx, $wport) = AQ::Workflow::start_nginx(workers => 1,
        http => "annotation_queue_pool_size 2;\nannotation_queue_claim_wide on;");
    $c = AQ::Client->new(port => $wport);
    my %w = map { $_ => AQ::Workflow::key($org, "wide-$_") } qw(a b);
    @k{keys %w} = values %w;
    my $wq = AQ::queue($org, 'wide');
    my $X = AQ::enqueue($wq, 'X', { item => 'X' }, 1);
    my $Y = AQ::enqueue($wq, 'Y', { item => 'Y' });
    my ($wo, $x) = claim('a', $wq);
    is("$wo $x->{id}", "200 claimed v1 $X", "$what: a claims X");
    ($wo) = skip_item('a', $x);
    is($wo, '200 available v2', "$what: a skips X");
    ($wo, $x) = claim('a', $wq);
    is("$wo $x->{id}", "200 claimed v1 $Y", "$what: a gets Y, never X again");
    ($wo, $x) = claim('b', $wq);
    is("$wo $x->{id}", "200 claimed v3 $X", "$what: b gets X");
    ($wo) = claim('b', $wq);
    is($wo, '200 claimed v3', "$what: b claiming again resumes X");
    $wngx->stop;
    is_deeply([grep { /\[(?:error|alert|crit|emerg)\]/ } split /\n/,
               $wngx->error_log],
              [], "$what: no [error], [alert], [crit] or [emerg] in the error log");
}

done_testing();
