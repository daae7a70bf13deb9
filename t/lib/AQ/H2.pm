package AQ::H2;

# HTTP/2 helpers of t/180-http2.t, on top of t/lib/AQ.pm (which the suite
# loads first: this file does not, so that it makes no database itself):
#
#   tls_cert($dir)          a self-signed certificate for localhost (openssl)
#   curl(%o)                one request through curl (--http2 over TLS, or
#                           --http2-prior-knowledge in clear text)
#   curl_parallel(%o)       many requests multiplexed by one curl
#   h2load(%o)              h2load's summary of a run
#   AQ::H2::Conn            an HTTP/2 connection of our own (Protocol::HTTP2,
#                           Debian's libprotocol-http2-perl) that sends
#                           requests as streams and can reset one of them
#                           (RST_STREAM), which neither curl nor h2load lets
#                           a test do at a moment of its choosing
#
# Each request names its transport: tls => 1 (https, ALPN h2, the
# certificate checked against tls_cert's) or not (h2c with prior knowledge:
# nginx 1.22 has no Upgrade: h2c).

use strict;
use warnings;

use File::Path ();
use File::Temp qw(tempdir);
use JSON::PP ();
use POSIX ();
use Time::HiRes ();

our $CERT;    # tls_cert's certificate, which curl and Conn trust

# A key and a self-signed certificate for "localhost" (and 127.0.0.1) in
# $dir: (certificate, key).  EC P-256, so that it takes no time to make.
sub tls_cert {
    my ($dir) = @_;
    my ($cert, $key) = ("$dir/localhost.crt", "$dir/localhost.key");
    my @cmd = ('openssl', 'req', '-x509', '-newkey', 'ec',
               '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
               '-keyout', $key, '-out', $cert, '-days', '2',
               '-subj', '/CN=localhost',
               '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1');
    my $out = `@{[ join ' ', map { "'$_'" } @cmd ]} 2>&1`;
    die "AQ::H2: openssl req failed: $out\n" if $? != 0;
    $CERT = $cert;
    return ($cert, $key);
}

sub url {
    my ($port, $path, $tls) = @_;
    return ($tls ? 'https' : 'http') . "://localhost:$port$path";
}

sub _slurp { return AQ::slurp($_[0]) }

sub _spew {
    my ($file, $text) = @_;
    open my $fh, '>', $file or die "AQ::H2: $file: $!";
    binmode $fh;
    print $fh $text;
    close $fh;
}

# The options every curl run gets: the transport, and localhost as
# 127.0.0.1 (nginx listens there only).
sub _curl_transport {
    my ($port, $tls) = @_;
    return ('--resolve', "localhost:$port:127.0.0.1",
            $tls ? ('--http2', '--cacert', $CERT) : ('--http2-prior-knowledge'));
}

# Parses a header dump (curl -D): { status, headers => { lc name =>
# value } }.  The last response head counts.
sub _parse_head {
    my ($text) = @_;
    my @heads = grep { /\S/ } split /\r?\n\r?\n/, $text;
    my $head = $heads[-1] // '';
    my ($status_line, @lines) = split /\r?\n/, $head;
    my %r = (status_line => $status_line // '', headers => {});
    ($r{status}) = ($status_line // '') =~ m{^HTTP/\S+ (\d{3})};
    $r{status} //= 0;
    for (@lines) {
        my ($k, $v) = /^([^:]+):\s*(.*?)\s*$/ or next;
        $r{headers}{ lc $k } = $v;
    }
    return \%r;
}

# One request through curl:
#   curl(port => $p, tls => 1, path => $uri, key => $k, body => $bytes,
#        method => 'POST', headers => ['X: y'])
# Returns { status, headers, body, version (curl's %{http_version}: "2"),
# status_line, error (curl's exit code and stderr, or undef) }.
sub curl {
    my (%o) = @_;
    my $dir = tempdir('aq-curl-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my @cmd = ('curl', '-sS', _curl_transport($o{port}, $o{tls}),
               '--max-time', 30 * AQ::slow(),
               '-D', "$dir/head", '-o', "$dir/body",
               '-w', '%{http_version}', '-X', $o{method} // 'POST');
    push @cmd, '-H', "Authorization: Bearer $o{key}" if defined $o{key};
    push @cmd, map { ('-H', $_) } @{ $o{headers} || [] };
    if (defined $o{body}) {
        _spew("$dir/req", $o{body});
        push @cmd, '-H', 'Content-Type: application/json',
                   '--data-binary', "\@$dir/req";
    }
    push @cmd, url($o{port}, $o{path} // $AQ::URI, $o{tls});
    my $pid = open(my $out, '-|') // die "AQ::H2: fork: $!";
    if (!$pid) {
        open STDERR, '>', "$dir/err";
        exec @cmd or POSIX::_exit(127);
    }
    local $/;
    my $version = <$out> // '';
    close $out;
    my $rc = $? >> 8;
    my $r = _parse_head(_slurp("$dir/head"));
    $r->{body} = _slurp("$dir/body");
    $r->{version} = $version;
    $r->{error} = $rc ? "curl exit $rc: " . _slurp("$dir/err") : undef;
    File::Path::remove_tree($dir);    # CLEANUP misses forked callers
    return $r;
}

# Many requests multiplexed by one curl (--parallel, --parallel-max):
#   curl_parallel(port => $p, tls => 1, requests => [{ key, body, path }, ...])
# Each request has its own headers (its own key).  Returns an array of
# { status, headers, body, version, connects } in the order given, and
# curl's error (undef when it exited 0).  connects is curl's
# %{num_connects}: the connections that transfer opened (summed over all,
# 1 when they all shared one).
sub curl_parallel {
    my (%o) = @_;
    my $dir = tempdir('aq-curlp-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my @reqs = @{ $o{requests} };
    my $q = sub { my $s = shift; $s =~ s/(["\\])/\\$1/g; return qq("$s") };
    # After "next", curl forgets the options of the transfer before: each
    # transfer gets the transport options, except --http2-prior-knowledge,
    # which goes on the command line (the first transfer) only: with it in
    # every transfer, curl 7.88.1 fails all transfers but the first ("Error
    # in the HTTP2 framing layer"); without it, the others multiplex on the
    # first one's connection (curl_parallel's callers check that they did:
    # HTTP/2, one connection).
    my @t = grep { $_ ne '--http2-prior-knowledge' } _curl_transport($o{port}, $o{tls});
    my $transport = '';
    while (my $opt = shift @t) {
        $opt =~ s/^--//;
        $transport .= @t && $t[0] !~ /^--/ ? "$opt = " . $q->(shift @t) . "\n" : "$opt\n";
    }
    my $config = '';
    for my $i (0 .. $#reqs) {
        my $r = $reqs[$i];
        _spew("$dir/$i.req", $r->{body} // '');
        $config .= "next\n" if $i;
        $config .= $transport
                 . 'url = ' . $q->(url($o{port}, $r->{path} // $AQ::URI, $o{tls})) . "\n"
                 . "request = POST\n"
                 . 'header = ' . $q->("Authorization: Bearer $r->{key}") . "\n"
                 . 'header = ' . $q->('Content-Type: application/json') . "\n"
                 . 'data-binary = ' . $q->("\@$dir/$i.req") . "\n"
                 . 'dump-header = ' . $q->("$dir/$i.head") . "\n"
                 . 'output = ' . $q->("$dir/$i.body") . "\n"
                 . 'write-out = ' . $q->("%{http_version} %{num_connects} $i\\n") . "\n"
                 . 'max-time = ' . (60 * AQ::slow()) . "\n";
    }
    _spew("$dir/config", $config);
    my @cmd = ('curl', '-sS', $o{tls} ? () : '--http2-prior-knowledge', '--parallel',
               '--parallel-max', $o{max} // scalar @reqs, '-K', "$dir/config");
    my $pid = open(my $out, '-|') // die "AQ::H2: fork: $!";
    if (!$pid) {
        open STDERR, '>', "$dir/err";
        exec @cmd or POSIX::_exit(127);
    }
    my %w;
    while (my $line = <$out>) {
        $w{$3} = [$1, $2] if $line =~ /^(\S+) (\d+) (\d+)$/;
    }
    close $out;
    my $rc = $? >> 8;
    my @res;
    for my $i (0 .. $#reqs) {
        my $r = _parse_head(_slurp("$dir/$i.head"));
        $r->{body} = _slurp("$dir/$i.body");
        ($r->{version}, $r->{connects}) = @{ $w{$i} || ['', 0] };
        push @res, $r;
    }
    # curl's messages, without the progress meter --parallel prints
    my $err = $rc ? "curl exit $rc: "
                    . join("\n", _slurp("$dir/err") =~ /(curl: \(\d+\)[^\n]*)/g)
                  : undef;
    File::Path::remove_tree($dir);    # CLEANUP misses forked callers
    return (\@res, $err);
}

# h2load -n $n -c 1 -m $m against one endpoint, every request the same
# (h2load sends one request again and again):
#   h2load(port => $p, tls => 1, n => 100, m => 50, key => $k, body => $b)
# Returns { requests => { total, started, done, succeeded, failed, errored,
# timeout }, status => { 2xx, 3xx, 4xx, 5xx }, protocol => "h2" | "h2c",
# output, rc }.
sub h2load {
    my (%o) = @_;
    my $dir = tempdir('aq-h2load-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    _spew("$dir/body", $o{body});
    my @cmd = ('h2load', '-n', $o{n}, '-c', 1, '-m', $o{m},
               '-T', 30 * AQ::slow(),    # connection inactivity timeout
               '-H', "authorization: Bearer $o{key}",
               '-H', 'content-type: application/json',
               '-d', "$dir/body",
               ($o{tls} ? 'https' : 'http') . "://127.0.0.1:$o{port}"
               . ($o{path} // $AQ::URI));
    my $pid = open(my $out, '-|') // die "AQ::H2: fork: $!";
    if (!$pid) {
        open STDERR, '>&', \*STDOUT;
        exec @cmd or POSIX::_exit(127);
    }
    local $/;
    my $text = <$out> // '';
    close $out;
    my %r = (output => $text, rc => $? >> 8, requests => {}, status => {});
    if ($text =~ /^requests: (.*)$/m) {
        my $l = $1;
        $r{requests}{$2} = $1 while $l =~ /(\d+) (\w+)/g;
    }
    if ($text =~ /^status codes: (.*)$/m) {
        my $l = $1;
        $r{status}{$2} = $1 while $l =~ /(\d+) (\dxx)/g;
    }
    ($r{protocol}) = $text =~ /^Application protocol: (\S+)/m;
    File::Path::remove_tree($dir);    # CLEANUP misses forked callers
    return \%r;
}

# ---------------------------------------------------------------------------
# A connection of our own: requests as streams of one connection, each read
# when the caller wants it, and RST_STREAM on the stream of the caller's
# choice.
#
#   my $h2 = AQ::H2::Conn->new(port => $p, tls => 1);
#   my $sid = $h2->post(key => $k, body => $json);    # the stream's id
#   $h2->reset($sid);                                 # RST_STREAM CANCEL
#   my $r = $h2->response($sid);   # { status, headers, body, reset, error }

package AQ::H2::Conn;

use Errno qw(EAGAIN EINTR EWOULDBLOCK);
use IO::Select;
use IO::Socket::INET;
use Protocol::HTTP2::Client;
use Protocol::HTTP2::Constants qw(:errors);
use Time::HiRes ();

sub new {
    my ($class, %o) = @_;
    $SIG{PIPE} = 'IGNORE';
    my $sock;
    if ($o{tls}) {
        require IO::Socket::SSL;
        $sock = IO::Socket::SSL->new(
            PeerAddr => '127.0.0.1', PeerPort => $o{port},
            SSL_alpn_protocols => ['h2'],
            SSL_ca_file => $AQ::H2::CERT, SSL_verifycn_name => 'localhost',
            SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_PEER(),
            Timeout => 10 * AQ::slow())
            or die "AQ::H2::Conn: TLS connect: $! $IO::Socket::SSL::SSL_ERROR\n";
        my $alpn = $sock->alpn_selected // '';
        die "AQ::H2::Conn: ALPN chose '$alpn', not h2\n" unless $alpn eq 'h2';
    } else {
        $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $o{port},
                                      Proto => 'tcp', Timeout => 10 * AQ::slow())
            or die "AQ::H2::Conn: connect: $!\n";
    }
    binmode $sock;
    $sock->blocking(0);
    my $self = bless { sock => $sock, tls => $o{tls}, port => $o{port},
                       res => {}, closed => 0, out => '',
                       timeout => ($o{timeout} // 20) * AQ::slow() }, $class;
    $self->{client} = Protocol::HTTP2::Client->new(
        keepalive => 1,
        on_error  => sub { $self->{conn_error} = $_[0] });
    return $self;
}

sub client { $_[0]{client} }
sub closed { $_[0]{closed} }

# Sends a request as a new stream; returns the stream's id.  Options: path,
# method (POST), key, body (no body: a request without DATA frames),
# length (a Content-Length header: the body's length, or this value; 0: none),
# headers => [name => value, ...], stall (the body without END_STREAM: the
# request stays open, waiting for more).
sub post {
    my ($self, %o) = @_;
    my @h;
    push @h, authorization => "Bearer $o{key}" if defined $o{key};
    push @h, 'content-type' => 'application/json' if defined $o{body};
    my $len = exists $o{length} ? $o{length} : defined $o{body} ? length $o{body} : undef;
    push @h, 'content-length' => $len if $len;
    push @h, @{ $o{headers} || [] };
    my %req = (':scheme' => $self->{tls} ? 'https' : 'http',
               ':authority' => "localhost:$self->{port}",
               ':path' => $o{path} // $AQ::URI,
               ':method' => $o{method} // 'POST',
               headers => \@h);
    $req{data} = $o{body} if defined $o{body};
    my $sid;
    my $client = $self->{client};
    # stall => 1: the body goes without END_STREAM, as from a client that
    # stopped sending (request() always ends the stream with the body)
    my $send_data = \&Protocol::HTTP2::Connection::send_data;
    no warnings 'redefine';
    local *Protocol::HTTP2::Connection::send_data = sub {
        my ($con, $id, $chunk) = @_;
        return $send_data->($con, $id, $chunk, 0);
    } if $o{stall};
    use warnings 'redefine';
    $client->request(
        %req,
        on_done => sub {
            my ($headers, $data) = @_;
            $self->_done($sid, $headers, $data);
        },
        on_error => sub {
            $self->{res}{$sid} = { status => 0, headers => {}, body => '',
                                   reset => $_[0] };
        });
    $sid = $client->{con}{last_stream};
    $self->{sent}{$sid} = 1;
    $self->pump(0);
    return $sid;
}

sub _done {
    my ($self, $sid, $headers, $data) = @_;
    my %h;
    my @l = @{ $headers || [] };
    while (my ($k, $v) = splice @l, 0, 2) {
        $h{ lc $k } = exists $h{ lc $k } ? "$h{ lc $k }, $v" : $v;
    }
    $self->{res}{$sid} = { status => delete $h{':status'} // 0, headers => \%h,
                           body => $data // '' };
}

# RST_STREAM (CANCEL by default) on stream $sid, sent at once.
sub reset {
    my ($self, $sid, $code) = @_;
    $self->{client}{con}->stream_error($sid, $code // CANCEL);
    $self->{reset_sent}{$sid} = 1;
    $self->pump(0);
}

# Writes what the library has queued, reads what the server sent, for at
# most $wait seconds (0: what is there now).  Returns false once the
# connection is gone.
sub pump {
    my ($self, $wait) = @_;
    return 0 if $self->{closed};
    my $client = $self->{client};
    while (my $frame = $client->next_frame) {
        $self->{out} .= $frame;
    }
    my $sock = $self->{sock};
    my $deadline = Time::HiRes::time() + ($wait // 0);
    while (1) {
        while (length $self->{out}) {
            my $n = syswrite($sock, $self->{out});
            if (!defined $n) {
                last if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR
                        || ($self->{tls} && $IO::Socket::SSL::SSL_ERROR
                            && $IO::Socket::SSL::SSL_ERROR == IO::Socket::SSL::SSL_WANT_WRITE());
                $self->_gone("write: $!");
                return 0;
            }
            substr($self->{out}, 0, $n, '');
        }
        my $got = 0;
        while (1) {
            my $buf;
            my $n = sysread($sock, $buf, 65536);
            if (!defined $n) {
                last if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR
                        || ($self->{tls} && $IO::Socket::SSL::SSL_ERROR
                            && $IO::Socket::SSL::SSL_ERROR == IO::Socket::SSL::SSL_WANT_READ());
                $self->_gone("read: $!");
                return 0;
            }
            if ($n == 0) {
                $self->_gone('closed by the server');
                return 0;
            }
            $got = 1;
            $client->feed($buf);
        }
        while (my $frame = $client->next_frame) {
            $self->{out} .= $frame;
        }
        next if $got || length $self->{out} && IO::Select->new($sock)->can_write(0);
        my $left = $deadline - Time::HiRes::time();
        last if $left <= 0;
        my $sel = IO::Select->new($sock);
        if (length $self->{out}) {
            IO::Select::select($sel, $sel, undef, $left > 0.05 ? 0.05 : $left);
        } else {
            $sel->can_read($left > 0.05 ? 0.05 : $left);
        }
        last if $self->{stop} && $self->{stop}->();
    }
    return 1;
}

sub _gone {
    my ($self, $why) = @_;
    $self->{closed} = $why;
    for my $sid (keys %{ $self->{sent} }) {
        $self->{res}{$sid} //= { status => 0, headers => {}, body => '',
                                 error => "connection $why" };
    }
}

# Whether stream $sid has its answer (or its reset) yet, after reading what
# is there.
sub answered {
    my ($self, $sid) = @_;
    $self->pump(0);
    return exists $self->{res}{$sid};
}

# The answer of stream $sid, waiting for it up to the connection's timeout.
sub response {
    my ($self, $sid) = @_;
    my $deadline = Time::HiRes::time() + $self->{timeout};
    until (exists $self->{res}{$sid}) {
        my $left = $deadline - Time::HiRes::time();
        if ($left <= 0 || !$self->pump($left > 0.2 ? 0.2 : $left)) {
            last if exists $self->{res}{$sid};
            return { status => 0, headers => {}, body => '',
                     error => $self->{closed} ? "connection $self->{closed}"
                                              : 'timeout' };
        }
    }
    return $self->{res}{$sid};
}

# Closes the TCP connection without a GOAWAY (a client that vanishes).
sub drop {
    my ($self) = @_;
    close $self->{sock};
    $self->{closed} = 'dropped';
}

# GOAWAY, then close.
sub close {
    my ($self) = @_;
    return if $self->{closed};
    $self->{client}->close;
    $self->pump(0);
    close $self->{sock};
    $self->{closed} = 'closed';
}

1;
