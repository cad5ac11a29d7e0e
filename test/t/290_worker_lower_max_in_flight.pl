# A reload that lowers restart_worker.max_in_flight below the calls in flight lets those
# calls go on: their long-polls keep their connections instead of waiting in libcurl's
# queue for one, where their timeout ran (they timed out and were retried with nothing
# wrong with the agent).  No request is claimed until the calls are fewer than the new
# limit, and once they are, the new limit holds, for calls and kept connections alike.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $gate = "$tmp/lower.gate";
my $gated = gated_steps($gate);
my @long = map { "g$_" } 1 .. 4;

my $agent = start_agent(
	name => 'agent_lower',
	services => join('', map { "$_ = $gated;\n" } @long)
	  . qq{quick = ( { argv = [ "/bin/true" ]; } );});

# Long-polls of 1 s, each allowed 1 s more: one waiting in a queue behind three others
# on a single connection runs out of time.
my $node = new_node('lower', conf => <<CONF);
restart_worker.max_in_flight = 4
restart_worker.max_connections_per_agent = 8
restart_worker.follow_wait = '1s'
restart_worker.request_timeout = '1s'
CONF
setup_registry($node, 'host1', $agent->{url}, quick => '', map { ($_ => '') } @long);

my %ids = map { $_ => request_restart($node, $_) } @long;
ok(wait_status($node, $ids{$_}, 'running'), "gated job $_ runs") for @long;

my $status = sub {
	my ($col) = @_;
	return $node->safe_psql('postgres', "SELECT $col FROM restart_worker.status()");
};
$node->append_conf('postgresql.conf', 'restart_worker.max_in_flight = 1');
$node->reload;
my $calls = $status->('calls');
my $quick = request_restart($node, 'quick');

# Twelve long-polls later (three each; at most one a second through one connection),
# or as soon as one call failed.
my $went_on = wait_for(
	sub { $status->('call_errors') > 0 || $status->('calls') >= $calls + 12 }, 60);
ok($went_on, 'the jobs were followed after the reload');
is($status->('call_errors'), '0', 'no long-poll timed out after max_in_flight was lowered');
is($status->('in_flight'), '4', 'the four calls are still in flight');
is($node->safe_psql('postgres',
	"SELECT status FROM public.service_restart_requests WHERE id = '$quick'"), 'pending',
	'a request made meanwhile waits: the calls are more than the new limit');

my $worker = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");
my $established = sub {
	return scalar grep { / 01$/ } values %{ worker_sockets_to($worker, $agent->{port}) };
};
is($established->(), 4, 'each call in flight has a connection of its own');

spew($gate, '');
ok(wait_status($node, $ids{$_}, 'completed'), "job $_ is followed to its end") for @long;
is($node->safe_psql('postgres',
	"SELECT string_agg(DISTINCT attempts::text, ',') FROM public.service_restart_requests"
	  . " WHERE service_name LIKE 'g%'"), '1', 'each at its first attempt');
ok(wait_status($node, $quick, 'completed'), 'then it completes');

# The new limit holds: of two long jobs requested now, the second waits for the first's
# slot while the first is followed (two long-polls after the second's commit).
unlink $gate;
my $first = request_restart($node, 'g1');
ok(wait_status($node, $first, 'running'), 'a new long job runs');
my $second = request_restart($node, 'g2');
$calls = $status->('calls');
ok(wait_for(sub { $status->('calls') >= $calls + 2 }, 30), 'the first job is followed');
is($node->safe_psql('postgres',
	"SELECT status FROM public.service_restart_requests WHERE id = '$second'"), 'pending',
	'the second waits for the only slot');
spew($gate, '');
ok(wait_status($node, $_, 'completed'), 'both complete in turn') for $first, $second;
# The connections kept came down with the calls: libcurl closes an idle one as each call
# ends while it keeps more than the limit (before, it kept the four).
ok(wait_for(sub { $established->() <= 1 }, 30),
	'the worker keeps no more connections than the new limit (' . $established->() . ')');

$node->stop;
done_testing();
