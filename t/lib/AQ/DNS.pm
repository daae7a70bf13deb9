package AQ::DNS;

# A DNS server for nginx's resolver in the suites: answers A queries for the
# names it is given, NXDOMAIN for others, or (mute => 1) nothing at all.
#
#   my $dns = AQ::DNS->start(names => { 'db.aq.test' => '127.0.0.1' }, ttl => 1);
#   "resolver 127.0.0.1:" . $dns->port . " ipv6=off;"
#   $dns->queries('db.aq.test');    # A queries answered for that name so far
#   $dns->stop;
#
# It runs in a child process (UDP, one packet at a time); the counts go
# through a file.

use strict;
use warnings;

use IO::Socket::INET;
use POSIX ();
use Time::HiRes ();

sub start {
    my ($class, %o) = @_;
    my $sock = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                     Proto => 'udp') or die "dns: bind: $!";
    my $state = "/tmp/aq-dns-$$-" . int(rand 1e9);
    my $pid = fork // die "dns: fork: $!";
    if ($pid == 0) {
        serve($sock, $o{names} // {}, $o{ttl} // 1, $o{mute}, $state);
        POSIX::_exit(0);
    }
    my $self = bless { pid => $pid, port => $sock->sockport, state => $state }, $class;
    close $sock;
    return $self;
}

sub port { return $_[0]{port} }

sub queries {
    my ($self, $name) = @_;
    open my $fh, '<', "$self->{state}.counts" or return 0;
    while (<$fh>) {
        return $1 if /^\Q$name\E (\d+)$/;
    }
    return 0;
}

sub stop {
    my ($self) = @_;
    return unless $self->{pid};
    kill 'TERM', $self->{pid};
    waitpid $self->{pid}, 0;
    $self->{pid} = undef;
    unlink glob("$self->{state}*");
}

sub DESTROY { $_[0]->stop }

sub serve {
    my ($sock, $names, $ttl, $mute, $state) = @_;
    my %count;
    local $SIG{TERM} = sub { POSIX::_exit(0) };
    while (1) {
        my $from = $sock->recv(my $q, 512) // next;
        next if length $q < 12;
        my ($id, $flags, $qd) = unpack 'n n n', $q;
        my $off = 12;
        my @labels;
        while ($off < length $q) {
            my $len = ord substr $q, $off, 1;
            $off++;
            last if $len == 0;
            push @labels, substr $q, $off, $len;
            $off += $len;
        }
        my ($qtype, $qclass) = unpack 'n n', substr $q, $off, 4;
        my $question = substr $q, 12, $off + 4 - 12;
        my $name = lc join '.', @labels;
        $count{$name}++;
        if (open my $fh, '>', "$state.counts.tmp") {
            print $fh "$_ $count{$_}\n" for sort keys %count;
            close $fh;
            rename "$state.counts.tmp", "$state.counts";
        }
        next if $mute;
        my $addr = $names->{$name};
        my $rd = $flags & 0x0100;
        my ($rcode, $answer) = (3, '');
        if (defined $addr) {
            $rcode = 0;
            if ($qtype == 1) {
                $answer = pack('n n n N n', 0xC00C, 1, 1, $ttl, 4)
                          . pack('C4', split /\./, $addr);
            }
        }
        my $reply = pack('n n n n n n', $id, 0x8080 | $rd | $rcode, 1,
                         length $answer ? 1 : 0, 0, 0)
                    . $question . $answer;
        $sock->send($reply, 0, $from);
    }
}

1;
