# A burst of requests committed at once, with the worker limited to 1024 file descriptors
# (the common default): every one completes, with the worker's calls in flight and
# sockets bounded by max_in_flight and max_connections_per_agent (high-water marks kept
# by the worker itself), and SIGHUP is handled while calls are in flight.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $n = 1500;
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
system('prlimit', "--pid=$pid", '--nofile=1024:1024') == 0 or die 'prlimit failed';
like(slurp("/proc/$pid/limits"), qr/Max open files\s+1024\s+1024/,
	'the worker may open 1024 files at most');

$node->safe_psql('postgres',
	"SELECT count(public.request_service_restart('b' || i)) FROM generate_series(1, $n) i");
my $reloaded = 0;
my $done = wait_for(sub {
	my ($busy, $open) = split /\|/, $node->safe_psql('postgres',
		"SELECT in_flight, active FROM restart_worker.status()");
	if (!$reloaded && $busy > 0)
	{
		$node->reload;    # SIGHUP with calls in flight
		$reloaded = 1;
	}
	return $open == 0;
});
my ($max_in_flight, $max_sockets) = split /\|/, $node->safe_psql('postgres',
	'SELECT max_in_flight, max_sockets FROM restart_worker.status()');
ok($done, "all $n requests ended");
ok($reloaded, 'the configuration was reloaded (SIGHUP) while calls were in flight');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM public.service_restart_requests WHERE status = 'completed'"),
	$n, 'all completed');
ok($max_in_flight <= 16, "calls in flight stayed within max_in_flight (max seen $max_in_flight)");
ok($max_in_flight > 1, "calls were made in parallel (max $max_in_flight)");
ok($max_sockets <= 4,
	"the worker's sockets to the agent stayed within max_connections_per_agent (max $max_sockets)");
is($node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	$pid, 'the same worker did it all (SIGHUP while busy did not disturb it)');
is($node->safe_psql('postgres', 'SELECT failed + call_errors FROM restart_worker.status()'),
	'0', 'no call failed');

# The worker's own memory does not grow with the requests it handles: the size of its
# TopMemoryContext (where nothing of a request may stay) after a second burst is that
# after the first, give or take a block.
sub top_memory
{
	my $start = -s $node->logfile;
	$node->safe_psql('postgres', "SELECT pg_log_backend_memory_contexts($pid)");
	my $total;
	wait_for(sub {
		($total) = substr(slurp($node->logfile), $start) =~ /level: 0; TopMemoryContext: (\d+) total/;
		defined $total;
	});
	return $total;
}
my $before = top_memory();
$node->safe_psql('postgres',
	"SELECT count(public.request_service_restart('b' || i)) FROM generate_series(1, $n) i");
ok(wait_for(sub {
	$node->safe_psql('postgres', 'SELECT active FROM restart_worker.status()') == 0 }),
	"a second burst of $n requests ended");
my $after = top_memory();
ok(defined $before && defined $after && $after - $before < 65536,
	"the worker's TopMemoryContext did not grow with $n more requests ($before -> $after bytes)");

$node->stop;
done_testing();
