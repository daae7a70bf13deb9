package AQ::Contract;

# The module's answers against openapi.yaml (t/150-contract.t).
#
#   my $c = AQ::Contract->new;                  # $ENV{AQ_CONTRACT_OPENAPI}
#                                               # or openapi.yaml
#   my $res = AQ::Contract::request($port, method => 'POST', uri => ...,
#                                   key => $key, body => $json);
#   my @problems = $c->check($res);             # empty: as described
#   my @missing  = $c->uncovered;               # documented, never seen
#
# check() holds one answer to the description with JSON::Validator's
# OpenAPI 3 support (status, headers, body) and adds what validate_response
# does not see: a status the operation does not list, a header the
# response does not list (beyond HTTP/1.1's plumbing), a header twice, a
# body where none is described, a body that is not the media type
# described.  Every answer it is given is recorded: uncovered() lists the
# documented (path, method, status) and (path, method, status, error code)
# that no answer produced.
#
# request() speaks HTTP/1.1 on a fresh connection (Connection: close) and
# keeps every response header line, in order, duplicates included;
# start_request() and finish_request() split it for requests that must be in
# flight together.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IO::Select;
use IO::Socket::INET;
use JSON::Validator::Schema::OpenAPIv3;
use Mojo::JSON ();
use Time::HiRes ();
use YAML::XS ();

our $TOP = abs_path(dirname(__FILE__) . '/../../..');

# Headers any HTTP/1.1 answer may carry whatever the description says.
our %PLUMBING = map { $_ => 1 }
    qw(date server connection content-length transfer-encoding keep-alive
       content-type);

my @METHODS = qw(get put post delete options head patch trace);

sub new {
    my ($class, %o) = @_;
    my $file = $o{file} // $ENV{AQ_CONTRACT_OPENAPI} // "$TOP/openapi.yaml";
    my $data = load_yaml($file);
    my $self = bless { file => $file, data => $data, seen => {} }, $class;
    $self->{schema} = JSON::Validator::Schema::OpenAPIv3->new($file);
    # against the meta-schema first, then with its references resolved
    $self->{spec_errors} = [map { "$_" } @{ $self->{schema}->errors }];
    $self->{schema}->resolve;
    $self->inline_refs;
    return $self;
}

# JSON::Validator 5.14 looks a response up without following a reference
# ("$ref: '#/components/responses/...'": it would then validate nothing),
# and copies a response's header objects before it validates them, which
# loses the resolution of a header that is a reference: put the objects
# themselves in their places.
sub inline_refs {
    my ($self) = @_;
    my $schema = $self->{schema};
    my $target = sub {
        my ($node) = @_;
        my $ref = ref $node eq 'HASH' ? $node->{'$ref'} : undef;
        return $node unless defined $ref && !ref $ref;
        (my $pointer = $ref) =~ s/^#//;
        return $schema->get($pointer)
            // die "AQ::Contract: unresolved reference $ref\n";
    };
    my $paths = $schema->get(['paths']) || {};
    for my $item (values %$paths) {
        for my $op (values %$item) {
            next unless ref $op eq 'HASH' && ref $op->{responses} eq 'HASH';
            my $responses = $op->{responses};
            for my $status (keys %$responses) {
                my $r = $responses->{$status} =
                    $target->($responses->{$status});
                my $headers = $r->{headers} or next;
                $headers->{$_} = $target->($headers->{$_}) for keys %$headers;
            }
        }
    }
}

# YAML with true and false as JSON booleans (YAML::XS's own are read-only
# scalars that JSON::Validator cannot take).
sub load_yaml {
    my ($file) = @_;
    local $YAML::XS::Boolean = 'JSON::PP';
    return YAML::XS::LoadFile($file);
}

sub dump_yaml {
    my ($file, $data) = @_;
    local $YAML::XS::Boolean = 'JSON::PP';
    YAML::XS::DumpFile($file, $data);
}

sub file   { $_[0]{file} }
sub data   { $_[0]{data} }
sub schema { $_[0]{schema} }

# The description's own problems: openapi.yaml against the OpenAPI 3.0
# meta-schema (carried offline by libjson-validator-perl).
sub spec_errors {
    my ($self) = @_;
    return @{ $self->{spec_errors} };
}

# A local reference ("#/components/...") resolved in the raw document.
sub resolve {
    my ($self, $node) = @_;
    my $seen = 0;
    while (ref $node eq 'HASH' && defined $node->{'$ref'}) {
        my $ref = $node->{'$ref'};
        die "AQ::Contract: only local references: $ref\n"
            unless $ref =~ s{^#/}{};
        $node = $self->{data};
        for my $part (split m{/}, $ref) {
            $part =~ s/~1/\//g;
            $part =~ s/~0/~/g;
            $node = ref $node eq 'HASH' ? $node->{$part} : undef;
        }
        die "AQ::Contract: unresolved reference #/$ref\n" unless defined $node;
        die "AQ::Contract: reference loop at #/$ref\n" if ++$seen > 20;
    }
    return $node;
}

sub response_object {
    my ($self, $path, $method, $status) = @_;
    my $op = $self->{data}{paths}{$path}
             && $self->{data}{paths}{$path}{lc $method};
    return undef unless $op && $op->{responses};
    my $r = $op->{responses}{$status};
    return defined $r ? $self->resolve($r) : undef;
}

# The error codes a response's JSON schema allows (error.code's enum).
sub codes_of {
    my ($self, $response) = @_;
    my $media = $response->{content} && $response->{content}{'application/json'}
        or return ();
    my $s = $self->resolve($media->{schema}) or return ();
    my $error = $s->{properties} && $self->resolve($s->{properties}{error})
        or return ();
    my $code = $error->{properties}
               && $self->resolve($error->{properties}{code})
        or return ();
    return @{ $code->{enum} || [] };
}

# Every documented [path, METHOD, status, [codes]].
sub documented {
    my ($self) = @_;
    my @d;
    my $paths = $self->{data}{paths} || {};
    for my $path (sort keys %$paths) {
        for my $method (@METHODS) {
            my $op = $paths->{$path}{$method} or next;
            for my $status (sort keys %{ $op->{responses} || {} }) {
                my $r = $self->resolve($op->{responses}{$status});
                push @d, [$path, uc $method, $status, [$self->codes_of($r)]];
            }
        }
    }
    return @d;
}

# What the answers checked so far did not produce: "POST /path 503" and
# "POST /path 503 pool_saturated" lines.
sub uncovered {
    my ($self) = @_;
    my @missing;
    for my $d ($self->documented) {
        my ($path, $method, $status, $codes) = @$d;
        my $k = "$method $path $status";
        push @missing, $k unless $self->{seen}{$k};
        push @missing, map { "$k $_" } grep { !$self->{seen}{"$k $_"} } @$codes;
    }
    return @missing;
}

# The operation an answer is described by: the request's own, except that
# an API endpoint's 405 (any method but POST) is described under its POST
# operation, the endpoint's only one.
sub operation_of {
    my ($self, $res) = @_;
    my $method = $res->{method};
    my $path = $res->{uri};
    $path =~ s/\?.*//s;
    my $item = $self->{data}{paths}{$path};
    if ($item && !$item->{lc $method} && $res->{status} == 405
        && $item->{post})
    {
        return ($path, 'POST');
    }
    return ($path, $method);
}

# The problems of one answer (a request() result) against the
# description; records it for uncovered().
sub check {
    my ($self, $res) = @_;
    my @p;

    return ('no answer: ' . ($res->{error} // 'nothing read'))
        unless $res->{status};
    push @p, "transport: $res->{error}" if $res->{error};

    my ($path, $method) = $self->operation_of($res);
    my $status = $res->{status};
    my $where = "$method $path $status";

    if (!$self->{data}{paths}{$path}) {
        return ("$path is not a documented path");
    }
    if (!$self->{data}{paths}{$path}{lc $method}) {
        return ("$method $path is not a documented operation");
    }
    my $response = $self->response_object($path, $method, $status);
    if (!$response) {
        return ("$where: status $status is not documented for $method $path");
    }

    # headers: documented, once each
    my %documented = map { lc $_ => $_ } keys %{ $response->{headers} || {} };
    my %count;
    for my $h (@{ $res->{header_list} }) {
        my $name = lc $h->[0];
        $count{$name}++;
        next if $PLUMBING{$name};
        push @p, "$where: header $h->[0] is not documented for this response"
            unless $documented{$name};
    }
    push @p, map { "$where: header $_ sent $count{$_} times" }
             grep { $count{$_} > 1 } sort keys %count;

    # body: the media type described, or none
    my $ctype = $res->{headers}{'content-type'};
    my $media_key;
    my $body_value;
    my $has_body = length($res->{body} // '') > 0;
    my @media = sort keys %{ $response->{content} || {} };

    if (!@media) {
        push @p, "$where: a body where the description has none" if $has_body;
    } elsif ($res->{method} ne 'HEAD') {
        if (!defined $ctype) {
            push @p, "$where: no Content-Type";
        } else {
            (my $mt = lc $ctype) =~ s/\s*;.*//s;
            ($media_key) = grep { lc $_ eq $mt } @media;
            push @p, "$where: Content-Type $ctype is not one of @media"
                unless $media_key;
        }
        if ($media_key && $media_key =~ m{^application/json}) {
            $body_value = eval { Mojo::JSON::decode_json($res->{body}) };
            if ($@ || !defined $body_value && $res->{body} !~ /^\s*null\s*$/) {
                push @p, "$where: the body is not JSON: $res->{body}";
                $media_key = undef;
            }
        } elsif ($media_key) {
            $body_value = $res->{body};
        }
    }

    # JSON::Validator: headers (required, schemas) and the body's schema
    {
        my $headers = $res->{headers};
        my @errors = $self->{schema}->validate_response(
            [lc $method, $path, $status],
            {
                header => sub {
                    my ($name) = @_;
                    my $v = $headers->{ lc $name };
                    return { exists => defined $v ? 1 : 0, value => $v };
                },
                body => sub {
                    return { exists => 0 } unless defined $media_key;
                    return { exists => 1, value => $body_value,
                             content_type => $media_key };
                },
            });
        push @p, map { "$where: $_" } @errors;
    }

    # coverage: the answer as described
    if (!@p) {
        $self->{seen}{$where} = 1;
        if (ref $body_value eq 'HASH' && ref $body_value->{error} eq 'HASH'
            && defined $body_value->{error}{code})
        {
            $self->{seen}{"$where $body_value->{error}{code}"} = 1;
        }
    }
    return @p;
}

# The error code of an answer, or undef.
sub code_of {
    my ($res) = @_;
    my $doc = eval { Mojo::JSON::decode_json($res->{body} // '') };
    return ref $doc eq 'HASH' && ref $doc->{error} eq 'HASH'
           ? $doc->{error}{code} : undef;
}

sub json_of {
    my ($res) = @_;
    my $doc = eval { Mojo::JSON::decode_json($res->{body} // '') };
    return $doc;
}

# ---------------------------------------------------------------------------
# HTTP/1.1, one request per connection.
#
#   request($port, method => 'POST', uri => '/api/...', host => 'api.test',
#           key => $key, authorization => 'Basic x', body => '{...}',
#           length => 100 (announced instead of the body's),
#           chunks => [...], raw_body => "chunked bytes", headers => ['X: y'],
#           timeout => 10)
#
# returns { method, uri, status, header_list => [[name, value]...],
# headers => { lowercase name => value }, body, error }.

# AQ::slow() when the suite's fixtures are loaded (1 otherwise).
sub slow { return defined &AQ::slow ? AQ::slow() : 1 }

sub start_request {
    my ($port, %o) = @_;
    local $SIG{PIPE} = 'IGNORE';
    my $method = $o{method} // 'POST';
    my $uri = $o{uri} // '/api/v1/annotations/queue';
    my @h = ('Host: ' . ($o{host} // 'api.test'), 'Connection: close');
    push @h, "Authorization: Bearer $o{key}" if defined $o{key};
    push @h, "Authorization: $o{authorization}" if defined $o{authorization};
    push @h, @{ $o{headers} || [] };
    my $body = '';
    if ($o{chunks}) {
        push @h, 'Content-Type: application/json', 'Transfer-Encoding: chunked';
        $body = join('', map { sprintf("%x\r\n%s\r\n", length $_, $_) }
                         @{ $o{chunks} }) . "0\r\n\r\n";
    } elsif (defined $o{raw_body}) {
        push @h, 'Content-Type: application/json', 'Transfer-Encoding: chunked';
        $body = $o{raw_body};
    } elsif (defined $o{body}) {
        push @h, 'Content-Type: application/json',
                 'Content-Length: ' . ($o{length} // length $o{body});
        $body = $o{body};
    }
    my $req = "$method $uri HTTP/1.1\r\n" . join('', map { "$_\r\n" } @h)
              . "\r\n" . $body;

    my $flight = { method => $method, uri => $uri,
                   timeout => ($o{timeout} // 10) * slow() };
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp',
                                  Timeout => $flight->{timeout});
    if (!$s) {
        $flight->{error} = "connect: $!";
        return $flight;
    }
    binmode $s;
    my $off = 0;
    while ($off < length $req) {
        my $n = syswrite($s, $req, length($req) - $off, $off);
        last unless defined $n;    # the server may answer and close early
        $off += $n;
    }
    $flight->{sock} = $s;
    return $flight;
}

# Reads the answer to a start_request() until the server closes the
# connection.
sub finish_request {
    my ($flight) = @_;
    my $res = { method => $flight->{method}, uri => $flight->{uri},
                status => 0, header_list => [], headers => {}, body => '' };
    if (!$flight->{sock}) {
        $res->{error} = $flight->{error} // 'not sent';
        return $res;
    }
    my $s = $flight->{sock};
    my $buf = '';
    my $deadline = Time::HiRes::time() + $flight->{timeout};
    while (1) {
        my $left = $deadline - Time::HiRes::time();
        if ($left <= 0 || !IO::Select->new($s)->can_read($left)) {
            $res->{error} = 'timeout';
            last;
        }
        my $n = sysread($s, $buf, 65536, length $buf);
        last if !$n;    # EOF (or a reset after the answer)
    }
    close $s;
    delete $flight->{sock};

    my $end = index $buf, "\r\n\r\n";
    if ($end < 0) {
        $res->{error} //= 'no complete response head';
        return $res;
    }
    my ($status_line, @lines) = split /\r\n/, substr($buf, 0, $end);
    ($res->{status}) = $status_line =~ m{^HTTP/1\.[01] (\d{3})};
    $res->{status} //= 0;
    for (@lines) {
        my ($k, $v) = /^([^:]+):[ \t]*(.*?)[ \t]*$/ or next;
        push @{ $res->{header_list} }, [$k, $v];
        $res->{headers}{ lc $k } = $v;
    }
    my $body = substr $buf, $end + 4;
    if (($res->{headers}{'transfer-encoding'} // '') =~ /chunked/i) {
        my $out = '';
        while ($body =~ s/^([0-9a-fA-F]+)[^\r\n]*\r\n//) {
            my $size = hex $1;
            last if $size == 0;
            $out .= substr $body, 0, $size, '';
            $body =~ s/^\r\n//;
        }
        $body = $out;
    } elsif (defined(my $len = $res->{headers}{'content-length'})) {
        if ($flight->{method} eq 'HEAD') {
            $body = '';
        } else {
            $res->{error} //= "short body: " . length($body) . " of $len"
                if length $body < $len;
            $body = substr $body, 0, $len;
        }
    }
    $res->{body} = $body;
    return $res;
}

sub request {
    my ($port, %o) = @_;
    return finish_request(start_request($port, %o));
}

# One line for a test's diagnostics.
sub show {
    my ($res) = @_;
    my $h = join '', map { "  $_->[0]: $_->[1]\n" }
                     @{ $res->{header_list} || [] };
    return "$res->{method} $res->{uri} -> $res->{status}"
           . ($res->{error} ? " ($res->{error})" : '') . "\n$h  $res->{body}\n";
}

1;
