# A burst of requests committed at once: every one completes, with the worker's calls in
# flight and sockets bounded by max_in_flight and max_connections_per_agent (so a large
# burst cannot exhaust file descriptors), and SIGHUP is handled while calls are in flight.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $n = 300;
my $services = join "\n", map { qq{b$_ = ( { argv = [ "/bin/true" ]; } );} } 1 .. $n;
my $agent = start_agent(name => 'agent_burst', services => $services,
	limits => 'retention_max_jobs = 100000;');

my $node = new_node('burst', conf => <<CONF);
restart_worker.max_in_flight = 16
restart_worker.max_connections_per_agent = 4
CONF
$node->safe_psql('postgres', "SELECT restart_worker.register_agent('h', '$agent->{url}', '$SECRET')");
$node->safe_psql('postgres',
	"SELECT count(restart_worker.register_service('b' || i, 'h', '0')) FROM generate_series(1, $n) i");

my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");
sub fds { my @f = glob("/proc/$pid/fd/*"); return scalar @f; }
sub sockets { return scalar grep { (readlink($_) // '') =~ /^socket:/ } glob("/proc/$pid/fd/*"); }
my $base_sockets = sockets();

$node->safe_psql('postgres',
	"SELECT count(public.request_service_restart('b' || i)) FROM generate_series(1, $n) i");
my ($max_sockets, $max_in_flight, $reloaded) = (0, 0, 0);
my $done = wait_for(sub {
	my $s = sockets();
	$max_sockets = $s if $s > $max_sockets;
	my ($busy, $open) = split /\|/, $node->safe_psql('postgres',
		"SELECT in_flight, active FROM restart_worker.status()");
	$max_in_flight = $busy if $busy > $max_in_flight;
	if (!$reloaded && $busy > 0)
	{
		$node->reload;    # SIGHUP with calls in flight
		$reloaded = 1;
	}
	return $open == 0;
});
ok($done, "all $n requests ended");
is($node->safe_psql('postgres',
	"SELECT count(*) FROM public.service_restart_requests WHERE status = 'completed'"),
	$n, 'all completed');
ok($max_in_flight <= 16, "calls in flight stayed within max_in_flight (max seen $max_in_flight)");
ok($max_sockets - $base_sockets <= 4,
	"the worker's sockets to the agent stayed within max_connections_per_agent (max seen "
	  . ($max_sockets - $base_sockets) . ")");
is($node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	$pid, 'the same worker did it all (SIGHUP while busy did not disturb it)');
is($node->safe_psql('postgres', 'SELECT failed + call_errors FROM restart_worker.status()'),
	'0', 'no call failed');

$node->stop;
done_testing();
