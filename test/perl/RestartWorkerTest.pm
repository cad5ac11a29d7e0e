# Shared helpers of the restart_worker TAP tests: a cluster with the worker, a real
# restart-agent process on loopback, requests and waiting for their states.
#
# Everything waits by polling until a condition holds or a deadline passes; nothing
# sleeps for a fixed time, and nothing asserts timings.
package RestartWorkerTest;

use strict;
use warnings;

use Exporter 'import';
use File::Path qw(make_path);
use IO::Socket::INET;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our @EXPORT = qw(
	$SECRET agent_binary start_agent stop_agent restart_agent wait_for
	new_node setup_registry request_restart wait_status row_of slurp spew count_lines
	unresponsive_listener free_port fake_agent fake_calls job_json gated_steps
	$NO_FLUSH_CONF stop_walwriter crash_walwriter worker_as_role cancel_refusal
	status_attempts worker_back worker_sockets_to sync_standby
);

# The signing secret shared by the tests' agents and the registry.
our $SECRET = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';

# The database the helpers use (the worker's, restart_worker.database).
our $DB = 'postgres';

my @agents;

sub slurp
{
	my ($f) = @_;
	open(my $fh, '<', $f) or return '';
	local $/;
	my $s = <$fh>;
	return $s // '';
}

sub spew
{
	my ($f, $s) = @_;
	open(my $fh, '>', $f) or die "$f: $!";
	print $fh $s;
	close $fh;
}

# Lines in a file (0 if it does not exist): how many times a counting step ran.
sub count_lines
{
	my $s = slurp(@_);
	return scalar(() = $s =~ /\n/g);
}

# Poll $cond every 20 ms until it returns true or $timeout seconds pass; returns its value.
sub wait_for
{
	my ($cond, $timeout) = @_;
	my $end = time + ($timeout // $PostgreSQL::Test::Utils::timeout_default);
	while (time < $end)
	{
		my $r = $cond->();
		return $r if $r;
		sleep 0.02;
	}
	return $cond->();
}

# The restart-agent binary: built in the tree under test, or installed.
sub agent_binary
{
	my $build = $ENV{RW_BUILD_DIR} // '.';
	return "$build/agent/restart-agent" if -x "$build/agent/restart-agent";
	return '/usr/local/bin/restart-agent';
}

# A TCP port nobody listens on right now.
sub free_port
{
	my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1)
	  or die "socket: $!";
	my $port = $s->sockport;
	close $s;
	return $port;
}

# The steps (libconfig text) of a service whose one step waits until the file $gate
# exists (at most 60 s), then prints "gated": a job that runs until the test lets it end.
# With $count, the step first appends a line to that file, to count its runs.
sub gated_steps
{
	my ($gate, $count) = @_;
	my $wait = "i=0; while [ ! -e $gate ] && [ \$i -lt 1200 ]; do sleep 0.05; i=\$((i+1)); done";
	my $run = defined $count ? "echo run >> $count; " : '';
	return qq|( { argv = [ "/bin/sh", "-c", "$run$wait; echo gated" ]; } )|;
}


# Start an agent.  Options: name (directory), services (libconfig text of the services
# group), port (default: a free one, so that a restarted agent keeps its URL), tls
# ({cert, key}), limits (extra libconfig text inside limits), unix (the path of a unix
# socket to listen on instead of a port; keep it short).  Returns a hash with pid, port,
# url, dir, log.
sub start_agent
{
	my (%o) = @_;
	my $name = $o{name} // 'agent';
	my $dir = "$PostgreSQL::Test::Utils::tmp_check/$name";
	make_path("$dir/state");
	spew("$dir/secrets", "$SECRET\n");
	chmod 0600, "$dir/secrets";
	my $port = $o{unix} ? undef : ($o{port} // free_port());
	my $listen = $o{unix} ? "unix:$o{unix}" : "127.0.0.1:$port";
	my $tls = $o{tls} ? "tls_cert = \"$o{tls}{cert}\";\ntls_key = \"$o{tls}{key}\";\n" : '';
	my $limits = $o{limits} // '';
	spew("$dir/agent.conf", <<"CONF");
listen = "$listen";
$tls
secrets_file = "$dir/secrets";
state_dir = "$dir/state";
limits = { max_jobs = 64; max_wait = 30; kill_grace = 1; connection_timeout = 60;
           per_ip_connection_limit = 64; $limits };
services = {
$o{services}
};
CONF
	my $a = { name => $name, port => $port, dir => $dir, log => "$dir/agent.log",
		scheme => $o{tls} ? 'https' : 'http', conf => "$dir/agent.conf" };
	$a->{url} = $o{unix} ? "unix:$o{unix}"
	  : "$a->{scheme}://" . ($o{host} // '127.0.0.1') . ":$port";
	_spawn_agent($a);
	push @agents, $a;
	return $a;
}

# Run the agent process of $a and wait until it listens.
sub _spawn_agent
{
	my ($a) = @_;
	my $before = length(slurp($a->{log}));
	my $pid = fork;
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDERR, '>>', $a->{log}) or die;
		open(STDOUT, '>>', $a->{log}) or die;
		exec(agent_binary(), '--config', $a->{conf}) or die "exec: $!";
	}
	$a->{pid} = $pid;
	my $up = wait_for(sub { substr(slurp($a->{log}), $before) =~ /listening on/ }, 30);
	die "agent $a->{name} did not start:\n" . slurp($a->{log}) unless $up;
	return $a;
}

# Stop an agent (SIGTERM, or the given signal) and reap it.
sub stop_agent
{
	my ($a, $sig) = @_;
	return unless $a->{pid};
	kill($sig // 'TERM', $a->{pid});
	my $done = wait_for(sub { waitpid($a->{pid}, WNOHANG) == $a->{pid} }, 30);
	unless ($done)
	{
		kill('KILL', $a->{pid});
		waitpid($a->{pid}, 0);
	}
	$a->{pid} = undef;
}

# Start a stopped agent again on the same port and state directory.
sub restart_agent
{
	my ($a) = @_;
	return _spawn_agent($a);
}

END
{
	local $?;
	stop_agent($_, 'KILL') for @agents;
}

# A listener that accepts connections and never answers: an unresponsive agent.
# Returns (pid, port); the child exits when the test ends.
sub unresponsive_listener
{
	my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 64,
		ReuseAddr => 1) or die "listen: $!";
	my $port = $s->sockport;
	my $pid = fork;
	if ($pid == 0)
	{
		my @held;
		while (my $c = $s->accept) { push @held, $c; }
		exit 0;
	}
	close $s;
	push @agents, { pid => $pid, name => 'unresponsive' };
	return ($pid, $port);
}

# A stand-in for a misbehaving agent, for tests only (the real agent is the peer of every
# test of the happy path).  $answer->($method, $path, $id, $n) is called for the n-th
# request (from 1; $id is the request id from the body or the path) and returns
# [status, body] to answer with, undef to read the request and never answer, 'close' to
# close the connection without an answer, or 'crash' to close it and the listening socket
# and exit (an agent that died with the request read).  With keep_alive => 1 the answers
# keep the connection open for the next request.  Every request is logged as
# "METHOD PATH ID" in $fake->{log}; see fake_calls().  Returns a hash with pid, port,
# url, log.
sub fake_agent
{
	my (%o) = @_;
	my $name = $o{name} // 'fake';
	my $log = "$PostgreSQL::Test::Utils::tmp_check/$name.calls";
	unlink $log;
	my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 64,
		ReuseAddr => 1) or die "listen: $!";
	my $port = $s->sockport;
	my $pid = fork;
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		my (@held, $n);
		while (my $c = $s->accept)
		{
			# keep_alive: the next request may come on the same connection.
			while (1)
			{
				my ($method, $path, $body) = _fake_read_request($c);
				last unless defined $method;
				my $id = $path =~ m{/v1/restarts/([0-9a-f-]{36})} ? $1
				  : $body =~ /"request_id"\s*:\s*"([0-9a-f-]{36})"/ ? $1 : '';
				$n++;
				open(my $fh, '>>', $log) or die;
				print $fh "$method $path $id\n";
				close $fh;
				my $r = $o{answer}->($method, $path, $id, $n);
				if (!defined $r) { push @held, $c; last; }
				if (!ref $r && $r eq 'close') { close $c; last; }
				# An agent that dies with the request read: nothing answers any more.  The
				# listening socket goes first, so that a new connection is refused.
				if (!ref $r && $r eq 'crash') { close $s; close $c; exit 0; }
				my ($code, $text) = @$r;
				$text //= '';
				print $c "HTTP/1.1 $code Whatever\r\nContent-Type: application/json\r\n"
				  . "Content-Length: " . length($text) . "\r\n"
				  . ($o{keep_alive} ? '' : "Connection: close\r\n") . "\r\n$text";
				next if $o{keep_alive};
				close $c;
				last;
			}
		}
		exit 0;
	}
	close $s;
	my $a = { pid => $pid, name => $name, port => $port, log => $log,
		url => "http://127.0.0.1:$port" };
	push @agents, $a;
	return $a;
}

# Read one HTTP request (headers and a Content-Length body) from a socket.
sub _fake_read_request
{
	my ($c) = @_;
	my $buf = '';
	while ($buf !~ /\r\n\r\n/)
	{
		my $r = sysread($c, $buf, 65536, length $buf);
		return unless $r;
	}
	my ($head, $body) = split /\r\n\r\n/, $buf, 2;
	my ($method, $path) = $head =~ /^(\S+) (\S+)/;
	my $len = $head =~ /^content-length:\s*(\d+)/mi ? $1 : 0;
	while (length($body) < $len)
	{
		my $r = sysread($c, $body, $len - length($body), length $body);
		last unless $r;
	}
	return ($method, $path, $body);
}

# The requests a fake agent got, as "METHOD PATH ID" lines.
sub fake_calls
{
	my ($fake) = @_;
	return grep { length } split /\n/, slurp($fake->{log});
}

# A job object as the agent would answer it, with fields overridden by %o.
sub job_json
{
	my ($id, %o) = @_;
	require JSON::PP;
	my %job = (request_id => $id, service => 'svc', requested_by => undef,
		requested_at => '2026-11-26T05:00:00.000000Z', status => 'completed',
		accepted_at => '2026-11-26T05:00:00.100000Z', started_at => '2026-11-26T05:00:00.100000Z',
		finished_at => '2026-11-26T05:00:01.000000Z', exit_code => 0, signal => undef,
		steps => [], output => "fake output\n", output_truncated => JSON::PP::false(),
		error => undef, %o);
	return JSON::PP->new->canonical->encode(\%job);
}

# The TCP connections of process $pid to port $port on this host: its socket descriptors
# whose peer is that port, as { fd => "inode state" } (state as /proc/net/tcp gives it: 01
# established, 08 closed by the peer).
sub worker_sockets_to
{
	my ($pid, $port) = @_;
	my %state;
	for my $line (split /\n/, slurp('/proc/net/tcp'))
	{
		my @f = split ' ', $line;
		next unless @f > 9 && $f[2] =~ /:([0-9A-F]{4})$/ && hex($1) == $port;
		$state{ $f[9] } = $f[3];
	}
	my %socks;
	opendir(my $dh, "/proc/$pid/fd") or die "cannot read /proc/$pid/fd: $!";
	for my $fd (grep { /^\d+$/ } readdir $dh)
	{
		my $target = readlink("/proc/$pid/fd/$fd") // '';
		$socks{$fd} = "$1 $state{$1}" if $target =~ /^socket:\[(\d+)\]$/ && exists $state{$1};
	}
	closedir $dh;
	return \%socks;
}

# Point synchronous_standby_names of $node at standby $names ('nobody': one that does
# not exist, so that synchronous commits wait), or at none (''), and check it took.
sub sync_standby
{
	my ($node, $names) = @_;
	$node->append_conf('postgresql.conf', "synchronous_standby_names = '$names'");
	$node->reload;
	ok($node->poll_query_until($DB, "SHOW synchronous_standby_names", $names),
		"synchronous_standby_names is '$names'");
}

# A new cluster with the worker preloaded and quick retries for tests; extra settings
# in $o{conf}.  Started, with the extension created unless $o{no_extension}.
sub new_node
{
	my ($name, %o) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%{ $o{init} // {} });
	$node->append_conf('postgresql.conf', <<"CONF");
shared_preload_libraries = 'restart_worker'
restart_worker.database = '$DB'
restart_worker.retry_base = '100ms'
restart_worker.retry_max = '1s'
restart_worker.connect_timeout = '2s'
restart_worker.request_timeout = '10s'
restart_worker.follow_wait = '5s'
log_min_messages = 'info'
@{[ $o{conf} // '' ]}
CONF
	$node->start;
	if ($DB ne 'postgres')
	{
		$node->safe_psql('postgres', "CREATE DATABASE $DB");
		$node->restart;    # the worker found no database at its first start
	}
	$node->safe_psql($DB, 'CREATE EXTENSION restart_worker') unless $o{no_extension};
	return $node;
}

# Register an agent and services (hash of service name => extra arguments text).
sub setup_registry
{
	my ($node, $agent_name, $url, %services) = @_;
	$node->safe_psql($DB,
		"SELECT restart_worker.register_agent('$agent_name', '$url', '$SECRET')");
	for my $s (sort keys %services)
	{
		my $extra = $services{$s} ? ", $services{$s}" : '';
		$node->safe_psql($DB,
			"SELECT restart_worker.register_service('$s', '$agent_name', p_cooldown => '0'$extra)");
	}
}

# Request a restart as a plain database caller; returns the request id.
sub request_restart
{
	my ($node, $service) = @_;
	return $node->safe_psql($DB,
		"SELECT id FROM public.request_service_restart('$service')");
}

# Wait until a request reaches one of the given statuses (a regex alternation); true if
# it did.
sub wait_status
{
	my ($node, $id, $status, $timeout) = @_;
	my $end = time + ($timeout // $PostgreSQL::Test::Utils::timeout_default);
	while (time < $end)
	{
		my $s = $node->safe_psql($DB,
			"SELECT status FROM public.service_restart_requests WHERE id = '$id'");
		return 1 if $s =~ /^(?:$status)$/;
		sleep 0.05;
	}
	return 0;
}

# A request's row as a hash (the columns as text).
sub row_of
{
	my ($node, $id) = @_;
	my $json = $node->safe_psql($DB,
		"SELECT row_to_json(r) FROM public.service_restart_requests r WHERE id = '$id'");
	require JSON::PP;
	return JSON::PP::decode_json($json);
}

# Settings under which nothing but the WAL writer flushes a cluster's asynchronous
# commits: no autovacuum, no checkpoint, no background writer; and a crash restarts it.
our $NO_FLUSH_CONF = "restart_after_crash = on\nautovacuum = off\n"
  . "checkpoint_timeout = '1h'\nbgwriter_lru_maxpages = 0\n";

# Stop the WAL writer (SIGSTOP) while it sleeps, not while it holds the lock commits need
# to write, so that asynchronous commits stay in memory; returns its pid, or undef if it
# never was asleep.
sub stop_walwriter
{
	my ($node) = @_;
	my $pid = $node->safe_psql($DB,
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'");
	return undef unless $pid =~ /^\d+$/;
	for (1 .. 50)
	{
		kill 'STOP', $pid;
		return $pid if $node->safe_psql($DB,
			"SELECT wait_event = 'WalWriterMain' FROM pg_stat_activity WHERE pid = $pid") eq 't';
		kill 'CONT', $pid;
	}
	return undef;
}

# Kill the stopped WAL writer: the postmaster ends every process, losing the commits that
# were not flushed, and restarts them to recover from what is on disk (or, with
# restart_after_crash off, stops).  Returns the offset of the server log before the crash,
# or undef if the server did not say so in time (it says $said, by default that it
# restarts).
sub crash_walwriter
{
	my ($node, $pid, $said) = @_;
	my $offset = -s $node->logfile;
	$said //= qr/all server processes terminated; reinitializing/;
	kill 'KILL', $pid;
	return eval { $node->wait_for_log($said, $offset) } ? $offset : undef;
}

# Create the role rw_worker (LOGIN, an admin of the extension) and make it the worker's,
# with the extra settings conf; restarts the node.  True once the worker runs as it.  A
# test can then keep a new worker from connecting with ALTER ROLE rw_worker NOLOGIN.
sub worker_as_role
{
	my ($node, $conf) = @_;
	$node->safe_psql($DB, q{CREATE ROLE rw_worker LOGIN;
		SELECT restart_worker.grant_admin('rw_worker')});
	$node->append_conf('postgresql.conf',
		"restart_worker.role = 'rw_worker'\n" . ($conf // ''));
	$node->restart;
	return $node->poll_query_until($DB,
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker' AND usename = 'rw_worker'");
}

# Ask an admin's cancel_request() for request id; returns the message of its refusal
# (SQLSTATE 55000), or '' if it was not refused (it then cancelled the request).
sub cancel_refusal
{
	my ($node, $id) = @_;
	my ($rc, $out, $err) = $node->psql($DB, qq{DO \$\$
BEGIN
	PERFORM restart_worker.cancel_request('$id');
EXCEPTION WHEN object_not_in_prerequisite_state THEN
	RAISE NOTICE 'refused: %', SQLERRM;
END;
\$\$});
	return $err =~ /refused: (.*)/ ? $1 : '';
}

# A request's status and attempts, as "status attempts".
sub status_attempts
{
	my ($node, $id) = @_;
	return $node->safe_psql($DB,
		"SELECT status || ' ' || attempts FROM public.service_restart_requests WHERE id = '$id'");
}

# Let the worker (role rw_worker) log in again after a crash, and check that it drives
# request id to its end once: the call is sent again with the same id and the agent
# answers with the job it ran, so the step (counting its runs in count_file) has still
# run runs times.  With settled, the worker must first have settled the request as one
# that may have been sent (log since offset; the row holds the cooldown); without, it
# must have settled nothing.  what prefixes the test names.
sub worker_back
{
	my ($node, $id, %o) = @_;
	my $what = defined $o{what} ? "$o{what}: " : '';
	$node->safe_psql($DB, 'ALTER ROLE rw_worker LOGIN');
	ok(wait_status($node, $id, 'completed'), "${what}the request completes again");
	is(count_lines($o{count_file}), $o{runs}, "${what}the step ran once for it");
	my $row = row_of($node, $id);
	is($row->{exit_code}, 0, "${what}with the exit code of the job that ran");
	my $settled = qr/pending requests due before the server started may have reached their agents/;
	if ($o{settled})
	{
		ok($node->log_contains(qr/\b1 $settled/, $o{offset}), "${what}the worker settled it first");
		ok(defined $row->{uncertain_at},
			"${what}the request holds the cooldown as one that may have been sent");
	}
	else
	{
		ok(!$node->log_contains(qr/\d+ $settled/, $o{offset}), "${what}nothing was settled");
	}
}

1;
