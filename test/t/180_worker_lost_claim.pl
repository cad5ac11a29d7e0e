# Claims commit asynchronously, so a crash may lose one after its call reached the agent:
# the request is pending again although its step ran. Until the worker has settled such
# requests (here it cannot log in after the crash), cancelling them is refused; a request
# made after the restart can still be cancelled. Once the worker runs it sends the
# request again with the same id, the agent answers with the job it has, and the step
# has run once.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $count = "$tmp/lost_claim.count";
my $gate = "$tmp/lost_claim.gate";
my $gated = gated_steps($gate, $count);

my $agent = start_agent(
	name => 'agent_lost_claim',
	services => <<"SVC");
count_svc = $gated;
other_svc = ( { argv = [ "/bin/true" ]; } );
SVC

my $node = new_node('lost_claim', conf => $NO_FLUSH_CONF);
setup_registry($node, 'host1', $agent->{url}, count_svc => '', other_svc => '');
ok(worker_as_role($node, "restart_worker.settle_margin = '2s'\n"),
	'the worker runs as its role');

spew($gate, '');
my $first = request_restart($node, 'count_svc');
ok(wait_status($node, $first, 'completed'), 'a first request completes');
unlink $gate;
is($node->safe_psql('postgres', 'SELECT restart_worker.worker_unsettled_before() IS NULL'),
	't', 'the worker has settled: its claims commit asynchronously');

# After the crash the worker will not be able to log in.
$node->safe_psql('postgres', 'ALTER ROLE rw_worker NOLOGIN');

# With the WAL writer stopped, the worker's asynchronous commits stay in memory: the
# request's own commit is flushed, the claim and the recorded "running" are not. (Its end
# would be flushed, and everything before it: the job runs until after the crash.)
my $walwriter = stop_walwriter($node);
ok(defined $walwriter, 'the WAL writer is stopped while it sleeps');
my $id = request_restart($node, 'count_svc');
ok(wait_status($node, $id, 'running'), 'the request runs before the crash');
ok(wait_for(sub { count_lines($count) == 2 }), 'its step started');

# The crash: the postmaster restarts everything and recovers from what is on disk.
my $crash_at = $node->safe_psql('postgres', 'SELECT now()');
my $offset = crash_walwriter($node, $walwriter);
ok(defined $offset, 'the server restarts after the crash');
ok($node->wait_for_log(qr/role "rw_worker" is not permitted to log in/, $offset),
	'the new worker cannot log in');

is(status_attempts($node, $id),
	'pending 0', 'the claim was lost: the request is pending again, as if never sent');
like(cancel_refusal($node, $id),
	qr/^request \S+ cannot be cancelled yet: it may have reached its agent before the server restarted/,
	'cancelling it is refused (55000), with the reason');
is($node->safe_psql('postgres',
	"SELECT status FROM public.service_restart_requests WHERE id = '$id'"),
	'pending', 'the request is left as it was');
# Nor may its service move to another agent meanwhile: the request may be the old agent's.
$node->safe_psql('postgres',
	"SELECT restart_worker.register_agent('host2', 'http://127.0.0.1:9', '$SECRET')");
my (undef, undef, $move) = $node->psql('postgres',
	"SELECT restart_worker.register_service('count_svc', 'host2', '0')");
like($move, qr/service "count_svc" has a request its agent may be running/,
	'moving its service to another agent is refused (55000)');
is($node->safe_psql('postgres', "SELECT agent FROM restart_worker.services WHERE name = 'count_svc'"),
	'host1', 'the service stays with its agent');

# The worker's first start came after the crash; requests due after it (and the margin for
# clocks that disagree, here 2 s instead of 10 s) are not held back.
is($node->safe_psql('postgres',
	"SELECT restart_worker.worker_unsettled_before()
		BETWEEN '$crash_at'::timestamptz + interval '2 seconds' AND now() + interval '2 seconds'"),
	't', 'the margin is restart_worker.settle_margin');
ok($node->poll_query_until('postgres',
	'SELECT restart_worker.worker_unsettled_before() < now()'),
	'the margin after the first start of the worker has passed');
my $later = request_restart($node, 'other_svc');
is($node->safe_psql('postgres',
	"SELECT (restart_worker.cancel_request('$later')).status"),
	'cancelled', 'a request made after the restart can be cancelled');

# Once the worker runs, it settles: the request is sent again and the agent answers with
# the job it ran.
spew($gate, '');
worker_back($node, $id, count_file => $count, runs => 2, offset => $offset, settled => 1);
is($node->safe_psql('postgres', 'SELECT restart_worker.worker_unsettled_before() IS NULL'),
	't', 'nothing is held back any more');

$node->stop;
done_testing();
