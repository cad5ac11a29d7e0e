# A worker role without privileges: the worker logs the error and tries again later, less
# and less often, also when new requests come in (not once per request); it neither exits
# nor restarts in a loop, and carries on once the role is granted. After a clean restart
# it is the claim that fails; after a crash, first the settling of what the crash may
# have lost of earlier claims (src/settle.c), and the worker claims nothing meanwhile.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $agent = start_agent(
	name => 'agent_role',
	services => join '', map { qq{svc$_ = ( { argv = [ "/bin/sh", "-c", "echo as a plain role" ]; } );\n} } 1 .. 2);

my $node = new_node('role');
setup_registry($node, 'host1', $agent->{url},
	(map { ("svc$_" => '') } 1 .. 2), (map { ("more$_" => '') } 1 .. 40));

# Make role the worker's, without privileges, and restart: cleanly, or as after a crash.
# Then check that the worker waits and backs off, and serves once granted.
sub without_privileges
{
	my ($role, $case, $svc, $more) = @_;
	$node->safe_psql('postgres', "CREATE ROLE $role LOGIN");
	$node->append_conf('postgresql.conf', "restart_worker.role = '$role'");
	my $offset = -s $node->logfile;
	if ($case eq 'crash')
	{
		$node->stop('immediate');
		$node->start;
	}
	else
	{
		$node->restart;
	}

	ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker' AND usename = '$role'"),
		"$case: the worker runs as the role");
	my $pid = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");
	my $id = request_restart($node, $svc);
	ok(wait_for(sub { $node->log_contains('permission denied', $offset) }, 60),
		"$case: the missing privilege is logged");
	is($node->safe_psql('postgres', "SELECT status FROM public.service_restart_requests WHERE id = '$id'"),
		'pending', "$case: the request waits");
	if ($case eq 'crash')
	{
		ok($node->poll_query_until('postgres', 'SELECT state FROM restart_worker.status()', 'settling'),
			'crash: the worker says it cannot settle');
	}
	else
	{
		isnt($node->safe_psql('postgres', 'SELECT state FROM restart_worker.status()'), 'settling',
			'clean restart: nothing to settle, the claim failed');
	}

	# Twenty more requests, each waking the worker at its commit: the failing claim (or
	# settling) is not tried, and its error logged, once for each.
	my $denials = sub { my @m = substr(slurp_file($node->logfile), $offset) =~ /permission denied/g; return scalar @m; };
	my $before = $denials->();
	request_restart($node, "more$_") for @$more;
	ok(wait_for(sub { $denials->() > $before }, 90), "$case: the failing claim is tried again later");
	is($node->safe_psql('postgres', qq{SELECT count(*) FROM public.service_restart_requests
		WHERE service_name IN (@{[ join ', ', map { "'more$_'" } @$more ]}) AND status = 'pending'}),
		scalar @$more, "$case: the new requests wait too, after that try");
	my $logged = $denials->() - $before;
	ok($logged < 10, "$case: while the claim keeps failing, new requests do not make it log once each ($logged)");
	is($node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
		$pid, "$case: the worker did not exit");

	$node->safe_psql('postgres', "SELECT restart_worker.grant_admin('$role')");
	ok(wait_status($node, $id, 'completed'), "$case: once granted the request completes");
	is($node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
		$pid, "$case: served by the same worker");
}

without_privileges('rw_worker', 'clean restart', 'svc1', [ 1 .. 20 ]);
without_privileges('rw_worker2', 'crash', 'svc2', [ 21 .. 40 ]);

$node->stop;
done_testing();
