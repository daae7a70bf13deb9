# Exclusivity under load, the short form of t/manual/exclusivity.pl (make
# test-exclusivity runs the full one: 100,000 items, 64 clients): 2,500
# items drained by 32 clients through two workers, once steadily and once
# with PostgreSQL stopped and started in the middle.  Every answer is joined
# with the database: each item delivered once, none lost, each held by the
# key it was answered to at the version answered, none left available after
# the 409s, no orphan beyond the keys given up, no client dead, nothing in
# nginx's error log above [error].  The script runs its own PostgreSQL
# cluster (it stops it); this suite only reads its report.
use strict;
use warnings;

use lib 't/lib';
use Test::More;

my %env = (
    AQ_EXCL_ITEMS   => $ENV{AQ_EXCL_ITEMS}   // 2500,
    AQ_EXCL_CLIENTS => $ENV{AQ_EXCL_CLIENTS} // 32,
);
local @ENV{ keys %env } = values %env;

my $out = `$^X -I t/lib t/manual/exclusivity.pl 2>&1`;
my $rc = $? >> 8;

my @runs = $out =~ /^(exclusivity: \d+ items, .*)$/mg;
is(scalar @runs, 2, 'both runs (steady, PostgreSQL restarted) reported')
    or diag $out;

my @names = ('steady run', 'PostgreSQL restarted mid-run');
for my $i (0 .. $#runs) {
    my $line = $runs[$i];
    my $what = $names[$i] // "run $i";
    my %n;
    $n{$2} = $1 while $line =~ /\b(\d+) (duplicates|lost|mismatched|left available|orphaned)\b/g;
    my ($items, $claims) = $line =~ /^exclusivity: (\d+) items, (\d+) claims/;
    is($n{duplicates}, 0, "$what: no item delivered twice (across or within clients)");
    is($n{lost}, 0, "$what: no item lost");
    is($n{mismatched}, 0, "$what: every answer names an item its own key holds, at that version");
    is($n{'left available'}, 0, "$what: no item left available after the 409s (no false 409)");
    is($claims, $items, "$what: every item answered once") if $i == 0;
    unlike($line, qr/VIOLATION/, "$what: no violation") or diag $line;
    note $line;
}
like($out, qr/^exclusivity: ok$/m, 'the check passed as a whole') or diag $out;
is($rc, 0, 'exit status 0');

done_testing();
