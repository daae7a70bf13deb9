package AQ::Proxy;

# A TCP proxy between nginx and PostgreSQL that can forget its connections
# the way a NAT or a firewall does: after forget(), the connections it
# carries stop forwarding without a word (no FIN, no RST: bytes are read
# and dropped both ways), while new connections are forwarded as before.
#
#   my $proxy = AQ::Proxy->start(to_port => $pg_port);
#   ... "host=127.0.0.1 port=" . $proxy->port ...
#   $proxy->forget;        # every connection open now goes silent
#   $proxy->carried;       # connections it has accepted so far
#   $proxy->stop;
#
# It runs in a child process of the test (a select loop); forget() is a
# SIGUSR1, answered through a file so that the test knows it took effect.

use strict;
use warnings;

use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes ();

sub start {
    my ($class, %o) = @_;
    my $listen = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 64,
        ReuseAddr => 1, Proto => 'tcp') or die "proxy: listen: $!";
    my $state = "/tmp/aq-proxy-$$-" . int(rand 1e9);

    my $pid = fork // die "proxy: fork: $!";
    if ($pid == 0) {
        run($listen, $o{to_host} // '127.0.0.1', $o{to_port}, $state);
        POSIX::_exit(0);
    }
    close $listen;
    my $self = bless { pid => $pid, port => undef, state => $state }, $class;
    return $self->_wait_ready;
}

sub _wait_ready {
    my ($self) = @_;
    for (1 .. 500) {
        if (-s "$self->{state}.port") {
            open my $fh, '<', "$self->{state}.port" or die;
            chomp($self->{port} = <$fh>);
            return $self if $self->{port};
        }
        Time::HiRes::sleep(0.01);
    }
    die "proxy: did not start";
}

sub port { return $_[0]{port} }

sub _read_state {
    my ($self, $what) = @_;
    open my $fh, '<', "$self->{state}.$what" or return 0;
    my $v = <$fh> // 0;
    chomp $v;
    return $v;
}

# connections accepted so far
sub carried { return $_[0]->_read_state('carried') }

sub forget {
    my ($self) = @_;
    my $before = $self->_read_state('forgot');
    kill 'USR1', $self->{pid};
    for (1 .. 500) {
        return 1 if $self->_read_state('forgot') > $before;
        Time::HiRes::sleep(0.01);
    }
    die "proxy: forget() not acknowledged";
}

sub stop {
    my ($self) = @_;
    return unless $self->{pid};
    kill 'TERM', $self->{pid};
    waitpid $self->{pid}, 0;
    $self->{pid} = undef;
    unlink glob("$self->{state}.*");
}

sub DESTROY { $_[0]->stop }

sub _write_state {
    my ($state, $what, $v) = @_;
    open my $fh, '>', "$state.$what.tmp" or return;
    print $fh "$v\n";
    close $fh;
    rename "$state.$what.tmp", "$state.$what";
}

sub run {
    my ($listen, $host, $port, $state) = @_;
    my %peer;       # fileno -> the other socket
    my %sock;       # fileno -> socket
    my %silent;     # fileno -> 1: read and drop
    my ($carried, $forgot, $forget) = (0, 0, 0);

    local $SIG{USR1} = sub { $forget = 1 };
    local $SIG{TERM} = sub { POSIX::_exit(0) };

    my $sel = IO::Select->new($listen);
    _write_state($state, 'carried', 0);
    _write_state($state, 'forgot', 0);
    _write_state($state, 'port', $listen->sockport);

    while (1) {
        if ($forget) {
            $forget = 0;
            $silent{$_} = 1 for keys %sock;
            _write_state($state, 'forgot', ++$forgot);
        }
        my @ready = $sel->can_read(0.05);
        for my $s (@ready) {
            if ($s == $listen) {
                my $c = $listen->accept or next;
                my $u = IO::Socket::INET->new(PeerAddr => $host, PeerPort => $port,
                                              Proto => 'tcp');
                if (!$u) { close $c; next; }
                $peer{ fileno $c } = $u;
                $peer{ fileno $u } = $c;
                $sock{ fileno $c } = $c;
                $sock{ fileno $u } = $u;
                $sel->add($c, $u);
                _write_state($state, 'carried', ++$carried);
                next;
            }
            # closed already, with its peer, earlier in this round
            my $fd = fileno $s;
            next unless defined $fd && $sock{$fd};
            my $n = sysread $s, my $buf, 65536;
            if (!$n) {
                my $o = $peer{$fd};
                for my $x ($s, $o) {
                    next unless $x;
                    my $xfd = fileno $x;
                    next unless defined $xfd;
                    $sel->remove($x);
                    delete $peer{$xfd};
                    delete $sock{$xfd};
                    delete $silent{$xfd};
                    close $x;
                }
                next;
            }
            next if $silent{$fd};
            my $o = $peer{$fd} or next;
            my $off = 0;
            while ($off < $n) {
                my $w = syswrite $o, $buf, $n - $off, $off;
                last unless defined $w;
                $off += $w;
            }
        }
    }
}

1;
