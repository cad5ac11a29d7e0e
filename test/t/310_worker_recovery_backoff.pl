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

# Stop the worker of node, with its requests left as they are; apply the settings
# (ALTER SYSTEM statements) and kill the listener agent_pid before the next worker
# starts, and wait for it.  what prefixes the test names.
sub restart_worker_with
{
	my ($node, $what, $agent_pid, @settings) = @_;
	my $old = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");
	$node->safe_psql('postgres', $_) for @settings;
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($old)");
	ok($node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $old"), "$what: the worker stopped");
	kill 'KILL', $agent_pid;
	waitpid($agent_pid, 0);
	$node->reload;
	ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker' AND pid <> $old"),
		"$what: a new worker runs");
}

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
restart_worker_with($node, 'first', $listener,
	'ALTER SYSTEM SET restart_worker.max_in_flight = 1');

# The new worker takes both over, one at a time, and each call is refused: each is put
# back (its next attempt within the backoff, not the claim's lease of over two minutes).
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM service_restart_requests WHERE id IN ($ids) "
	  . "AND (status = 'failed' OR (attempts >= 2 AND next_attempt_at < now() + interval '30 seconds'))"),
	'the new worker took both requests over');

# Each is put back until its backoff (5 to 10 s) ends: two seconds before the first of
# them is due, neither has been tried again.
my $due = $node->safe_psql('postgres',
	"SELECT min(next_attempt_at) FROM service_restart_requests WHERE id IN ($ids)");
ok($node->poll_query_until('postgres', "SELECT now() >= '$due'::timestamptz - interval '2 seconds'"),
	'two seconds before the first retry is due');
is($node->safe_psql('postgres',
	"SELECT string_agg(status || ' ' || attempts, ', ' ORDER BY id = '$id{a}' DESC) "
	  . "FROM service_restart_requests WHERE id IN ($ids)"),
	'dispatching 2, dispatching 2',
	'both: one attempt since the restart, then waiting for their backoff');

# Then they are tried again as any retry is.
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM service_restart_requests WHERE id IN ($ids) AND attempts >= 3"),
	'both are tried again once their backoff ended');
$node->stop;

# A request put back while the worker recovers is skipped until its backoff ends, not
# until recovery ends: recovery goes on as long as each claim takes as many requests as
# there are free slots, here while the calls to an agent that does not answer take the
# one slot in turn, and the request, due again meanwhile, waited behind every one of
# them (and one past its deadline was not failed meanwhile). Requests a (agent gone),
# then b and c (agent that does not answer) are left dispatching, their leases in that
# order; the new worker has one slot: a is refused and put back for 1 to 2 s, b's call
# takes 8 s, then a comes before c.
my ($slow_pid, $slow_port) = unresponsive_listener();
my ($gone_pid, $gone_port) = unresponsive_listener();
my $node2 = new_node('recovery_backoff_due', conf => <<'CONF');
restart_worker.max_in_flight = 3
restart_worker.retry_base = '2s'
restart_worker.retry_max = '2s'
restart_worker.request_timeout = '60s'
CONF
setup_registry($node2, 'gone', "http://127.0.0.1:$gone_port", a_svc => 'p_max_attempts => 10');
setup_registry($node2, 'slow', "http://127.0.0.1:$slow_port",
	b_svc => 'p_max_attempts => 10', c_svc => 'p_max_attempts => 10');
my %id2;
for my $k (qw(a b c))
{
	$id2{$k} = request_restart($node2, "${k}_svc");
	ok($node2->poll_query_until('postgres',
		"SELECT status = 'dispatching' AND attempts = 1 FROM service_restart_requests "
		  . "WHERE id = '$id2{$k}'"), "request $k is in flight");
}
restart_worker_with($node2, 'second', $gone_pid,
	'ALTER SYSTEM SET restart_worker.max_in_flight = 1',
	"ALTER SYSTEM SET restart_worker.request_timeout = '8s'");

# Once b and c have both been taken over, a has been tried again in between.
ok($node2->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM service_restart_requests "
	  . "WHERE id IN ('$id2{b}', '$id2{c}') AND attempts >= 2"),
	'the new worker took b and c over');
like(status_attempts($node2, $id2{a}), qr/^dispatching [3-9]$/,
	'request a was tried again once its backoff ended, before c was taken over');

done_testing();
