# A request the worker takes over after a restart (left dispatching or running by the
# worker before it) and whose call fails in a way worth retrying is retried after its
# backoff, as any other, also while the worker is still taking over the rest. Recovery
# claims take such requests whatever their lease, and goes on until a claim is not cut
# short by the free slots; a request it had put back for a retry was taken again at once,
# and with fewer slots than requests to take over, an agent that was down used up every
# attempt of its requests within a second, instead of over the backoff that gives it time
# to come back ("gave up after 5 attempts").
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

# An agent that takes connections and never answers: the calls stay in flight.
my ($listener, $port) = unresponsive_listener();

my $node = new_node('recovery_backoff', conf => <<'CONF');
restart_worker.max_in_flight = 2
restart_worker.retry_base = '10s'
restart_worker.retry_max = '10s'
restart_worker.request_timeout = '60s'
CONF
setup_registry($node, 'down', "http://127.0.0.1:$port",
	a_svc => 'p_max_attempts => 5', b_svc => 'p_max_attempts => 5');

my %id = map { $_ => request_restart($node, "${_}_svc") } qw(a b);
my $ids = "'$id{a}', '$id{b}'";
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM service_restart_requests WHERE id IN ($ids) "
	  . "AND status = 'dispatching' AND attempts = 1 "
	  . "AND (SELECT in_flight FROM restart_worker.status()) = 2"),
	'both requests are in flight to the agent that does not answer');

# The worker stops with both left dispatching; the next one has one slot, and the agent
# is gone: every call is refused at once.
my $old = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");
$node->safe_psql('postgres', 'ALTER SYSTEM SET restart_worker.max_in_flight = 1');
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old)");
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $old"), 'the worker stopped');
kill 'KILL', $listener;
waitpid($listener, 0);
$node->reload;
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker' AND pid <> $old"),
	'a new worker runs');

# The new worker takes both over, one at a time, and each call is refused.
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM service_restart_requests WHERE id IN ($ids) "
	  . "AND (attempts >= 2 OR status = 'failed')"),
	'the new worker took both requests over');

# Each is put back until its backoff (5 to 10 s) ends: one second before the first of
# them is due, neither has been tried again.
my $due = $node->safe_psql('postgres',
	"SELECT min(next_attempt_at) FROM service_restart_requests WHERE id IN ($ids)");
ok($node->poll_query_until('postgres', "SELECT now() >= '$due'::timestamptz - interval '1 second'"),
	'one second before the first retry is due');
for my $k (qw(a b))
{
	is(status_attempts($node, $id{$k}), 'dispatching 2',
		"request $k: one attempt since the restart, then waiting for its backoff");
}

# Then they are tried again as any retry is.
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM service_restart_requests WHERE id IN ($ids) AND attempts >= 3"),
	'both are tried again once their backoff ended');

done_testing();
