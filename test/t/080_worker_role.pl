# A worker role without privileges: the worker logs the error and tries again later, less
# and less often, also when new requests come in (not once per request); it neither exits
# nor restarts in a loop, and carries on once the role is granted.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $agent = start_agent(
	name => 'agent_role',
	services => qq{svc = ( { argv = [ "/bin/sh", "-c", "echo as a plain role" ]; } );});

my $node = new_node('role');
setup_registry($node, 'host1', $agent->{url}, svc => '', map { ("more$_" => '') } 1 .. 20);
$node->safe_psql('postgres', 'CREATE ROLE rw_worker LOGIN');
$node->append_conf('postgresql.conf', "restart_worker.role = 'rw_worker'");
$node->restart;

ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker' AND usename = 'rw_worker'"),
	'the worker runs as the role');
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");
my $id = request_restart($node, 'svc');
ok(wait_for(sub { $node->log_contains('permission denied') }, 60),
	'the missing privilege is logged');
is($node->safe_psql('postgres', "SELECT status FROM public.service_restart_requests WHERE id = '$id'"),
	'pending', 'the request waits');
# The first thing the worker does is settling what a crash may have lost (src/settle.c);
# without the privilege it cannot, and claims nothing meanwhile.
ok($node->poll_query_until('postgres', 'SELECT state FROM restart_worker.status()', 'settling'),
	'the worker says it cannot settle');

# Twenty more requests, each waking the worker at its commit: the failing claim is not
# tried (and its error logged) once for each.
sub denials { my @m = slurp_file($node->logfile) =~ /permission denied/g; return scalar @m; }
my $before = denials();
request_restart($node, "more$_") for 1 .. 20;
is($node->safe_psql('postgres', q{SELECT count(*) FROM public.service_restart_requests
	WHERE service_name LIKE 'more%' AND status = 'pending'}), '20', 'the new requests wait too');
ok(wait_for(sub { denials() > $before }, 90), 'the failing claim is tried again later');
my $logged = denials() - $before;
ok($logged < 10, "while the claim keeps failing, new requests do not make it log once each ($logged)");
is($node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	$pid, 'the worker did not exit');

$node->safe_psql('postgres', "SELECT restart_worker.grant_admin('rw_worker')");
ok(wait_status($node, $id, 'completed'), 'once granted the request completes');
is($node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	$pid, 'served by the same worker');

$node->stop;
done_testing();
