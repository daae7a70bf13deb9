#!/usr/bin/env perl
# Prints the text of a C string macro of src/ngx_aq_sql.h exactly as the
# module sends it: the string literals of the #define concatenated, C escapes
# undone.
#
#   claim-sql.pl [HEADER] [MACRO]        default: src/ngx_aq_sql.h NGX_AQ_CLAIM_SQL
#   claim-sql.pl --pgbench [HEADER] [MACRO]
#       the same statement as a pgbench script line (see bench/README.md):
#       $1 -> (SELECT digest FROM bench.keys WHERE i = :k), $2 -> :queue,
#       $3 -> :lease, and the colons inside string literals written as the
#       escape \072 of an E'' literal (pgbench would take ":MI" for a
#       variable); nothing else changes.
use strict;
use warnings;

my $pgbench = 0;
if (@ARGV && $ARGV[0] eq '--pgbench') { $pgbench = 1; shift @ARGV; }
my $header = shift(@ARGV) // 'src/ngx_aq_sql.h';
my $macro  = shift(@ARGV) // 'NGX_AQ_CLAIM_SQL';

open(my $fh, '<', $header) or die "claim-sql: $header: $!\n";
my $text = do { local $/; <$fh> };
close $fh;

# The text of a macro: its string literals, and the macros it names (the
# claims share fragments, NGX_AQ_WALK_*, NGX_AQ_NEXT_SQL("...", NAME)),
# expanded in place; a function-like macro's arguments are string literals
# or macro names, whose text replaces its parameters.
sub unescape {
    my ($s) = @_;
    $s =~ s/\\(["\\'?nt])/$1 eq 'n' ? "\n" : $1 eq 't' ? "\t" : $1/ge;
    return $s;
}

my $STR = qr/"(?:[^"\\]|\\.)*"/;
my $ARG = qr/(?:$STR|[A-Za-z_][A-Za-z0-9_]*)/;

# An argument's text: a string literal's, a macro's, or (inside a
# function-like macro) the text its parameter of that name was given.
sub arg_text {
    my ($a, $depth, $params) = @_;
    return unescape(substr($a, 1, -1)) if $a =~ /\A"/;
    return $params->{$a} if exists $params->{$a};
    return expand($a, $depth + 1, []);
}

sub expand {
    my ($name, $depth, $args) = @_;
    die "claim-sql: macros nested too deep at $name\n" if $depth > 8;
    $text =~ /^[ \t]*#[ \t]*define[ \t]+\Q$name\E(?![A-Za-z0-9_])(?:\(([a-z_,\s\\]+)\))?((?:[^\n]*\\\n)*[^\n]*)/m
        or die "claim-sql: no #define $name in $header\n";
    # a parameter list may go on over lines (backslash, newline)
    my @params = defined $1 ? grep { length } split(/[\s\\,]+/, $1) : ();
    (my $body = $2) =~ s/\\\n/\n/g;
    die "claim-sql: $name takes " . scalar(@params) . " arguments\n"
        if @params != @{ $args // [] };
    my %arg;
    @arg{@params} = @$args;
    my $sql = '';
    while ($body =~ m{\G(?:\s+|/\*.*?\*/|"((?:[^"\\]|\\.)*)"|([A-Z_][A-Z0-9_]*)(?:\s*\(\s*($ARG(?:\s*,\s*$ARG)*)\s*\))?|([a-z_]+))}gcs) {
        if (defined $2) {
            my ($m, $list) = ($2, $3);
            my @a = defined $list ? ($list =~ /($ARG)/g) : ();
            $sql .= expand($m, $depth + 1,
                           [map { arg_text($_, $depth, \%arg) } @a]);
            next;
        }
        if (defined $4) {
            die "claim-sql: $4 in $name is no parameter\n"
                unless exists $arg{$4};
            $sql .= $arg{$4};
            next;
        }
        next unless defined $1;
        $sql .= unescape($1);
    }
    pos($body) //= 0;
    die "claim-sql: cannot parse $name near: "
        . substr($body, pos($body), 40) . "\n"
        if pos($body) < length($body) && substr($body, pos($body)) =~ /\S/;
    return $sql;
}

my $sql = expand($macro, 0, []);
die "claim-sql: $macro is empty\n" if $sql eq '';

if ($pgbench) {
    # colons inside '...' literals -> \072 in an E'' literal
    my $out = '';
    while ($sql =~ /\G(?:('(?:[^']|'')*')|([^']+))/gc) {
        if (defined $1) {
            my $lit = $1;
            if ($lit =~ /:/) {
                die "claim-sql: backslash in a literal with a colon\n"
                    if $lit =~ /\\/;
                $lit =~ s/:/\\072/g;
                $lit = "E$lit";
            }
            $out .= $lit;
        } else {
            my $code = $2;
            die "claim-sql: parameter \$4 or higher, unsupported\n"
                if $code =~ /\$[4-9]|\$\d\d/;
            $code =~ s/\$1\b/(SELECT digest FROM bench.keys WHERE i = :k)/g;
            $code =~ s/\$2\b/:queue/g;
            $code =~ s/\$3\b/:lease/g;
            $out .= $code;
        }
    }
    die "claim-sql: unbalanced quotes\n" if (pos($sql) // 0) < length($sql);
    $out =~ s/\s+$//;
    $sql = "$out;";
}

print $sql, "\n";
