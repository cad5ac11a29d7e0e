# A new build on a database whose extension is still 1.0: the worker sends nothing (it
# could not record the answers) and says why in the log; after ALTER EXTENSION
# restart_worker UPDATE the waiting request is dispatched and completes.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $agent = start_agent(
	name => 'agent_upgrade',
	services => qq{ok_svc = ( { argv = [ "/bin/true" ]; } );\n});
my $node = new_node('upgrade', no_extension => 1,
	conf => "restart_worker.poll_interval = '1s'\n");
$node->safe_psql('postgres', "CREATE EXTENSION restart_worker VERSION '1.0'");
setup_registry($node, 'host1', $agent->{url}, ok_svc => '');

my $id = request_restart($node, 'ok_svc');
ok($node->wait_for_log(qr/the extension in database "postgres" is older than this build/),
	'the worker says the extension is older than the build');
ok($node->poll_query_until('postgres',
	"SELECT state FROM restart_worker.worker_state()", 'waiting for extension'),
	'the worker waits for the update');
is($node->safe_psql('postgres',
	"SELECT status || ' ' || attempts FROM public.service_restart_requests WHERE id = '$id'"),
	'pending 0', 'nothing was sent');

$node->safe_psql('postgres', 'ALTER EXTENSION restart_worker UPDATE');
ok(wait_status($node, $id, 'completed'), 'after the update the request completes');

$node->stop;
done_testing();
