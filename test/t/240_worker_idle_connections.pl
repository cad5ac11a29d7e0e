# Connections kept alive between calls.  libcurl lets go of a socket at the end of each
# call whose connection it keeps; the worker leaves such a socket parked in its wait event
# set rather than building the set anew (src/http.c).  When the agent closes idle
# connections (here: it stops), the parked sockets become ready:
#  - the worker does not spin on them: while the agent is gone its CPU time stays well
#    under the time that passes;
#  - once the agent is back, new requests go out on new connections and complete (a new
#    socket often gets the number of a closed one; the test notes which).
# Nothing asserts a timing: the CPU bound is half of the time that passed, and every wait
# is for a condition, with a deadline.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use POSIX ();
use Time::HiRes qw(time);

use RestartWorkerTest;

my $agent = start_agent(
	name => 'agent_idle',
	services => join('', map { "svc$_ = ( { argv = [ \"/bin/echo\", \"restarted $_\" ]; } );\n" } 1 .. 3));

my $node = new_node('idle', conf => "restart_worker.poll_interval = '1s'");
setup_registry($node, 'host1', $agent->{url}, map { ("svc$_" => '') } 1 .. 3);

# Three requests at once: the worker calls the agent over up to three connections, which
# stay open, idle, once the requests completed.
sub request_all
{
	my $ids = $node->safe_psql('postgres',
		"SELECT string_agg(id::text, ' ' ORDER BY id) FROM generate_series(1, 3) i,
		 LATERAL public.request_service_restart('svc' || i)");
	return split ' ', $ids;
}

my @ids = request_all();
ok(wait_status($node, $_, 'completed'), "request $_ completed") for @ids;
is($node->safe_psql('postgres', 'SELECT sockets FROM restart_worker.status()'), '0',
	'between calls the worker watches no socket for libcurl');

my $worker = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");

# The worker's CPU time (user + system) in clock ticks.
sub worker_ticks
{
	my @f = split ' ', (slurp("/proc/$worker/stat") =~ s/^.*\)\s+//sr);
	return $f[11] + $f[12];
}

my $kept = worker_sockets_to($worker, $agent->{port});
ok(scalar(grep { / 01$/ } values %$kept) >= 1,
	'the worker keeps its connections to the agent open between calls (' . scalar(keys %$kept) . ')');

# The agent goes away: its end closes the connections the worker keeps.  Over the next
# two safety-net polls (about two seconds) the worker must mostly sleep.
stop_agent($agent);
ok(wait_for(sub { my $now = worker_sockets_to($worker, $agent->{port}); !grep { / 01$/ } values %$now }, 30),
	'the agent closed them: the worker\'s parked sockets are ready to read (their end)');
my $hz = POSIX::sysconf(POSIX::_SC_CLK_TCK());    # what /proc/<pid>/stat counts in
my $ticks0 = worker_ticks();
my $t0 = time;
my $polls0 = $node->safe_psql('postgres', 'SELECT polls FROM restart_worker.status()');
ok($node->poll_query_until('postgres', "SELECT polls >= $polls0 + 2 FROM restart_worker.status()"),
	'the worker goes on polling with the agent gone');
my $cpu = (worker_ticks() - $ticks0) / $hz;
my $wall = time - $t0;
cmp_ok($cpu, '<', $wall / 2,
	sprintf('the worker does not spin on the closed connections (%.2f s of CPU in %.2f s)', $cpu, $wall));
is($node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"), $worker,
	'the same worker is still running');

# The agent is back: new requests go out on new connections and complete.
restart_agent($agent);
for my $round (1 .. 2)
{
	@ids = request_all();
	ok(wait_status($node, $_, 'completed'), "after the agent came back, round $round: request $_ completed")
	  for @ids;
}
is($node->safe_psql('postgres',
	"SELECT count(*) FROM public.service_restart_requests WHERE status <> 'completed'"), '0',
	'every request completed');
my $now = worker_sockets_to($worker, $agent->{port});
note('descriptor numbers of closed connections taken by new ones: '
	  . join(' ', grep { exists $now->{$_} && $now->{$_} ne $kept->{$_} } sort keys %$kept));

done_testing();
