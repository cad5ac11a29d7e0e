# A commit's wake-up is not lost while the worker waits inside a transaction of its own.
# PostgreSQL resets a backend's latch when it waits for a lock, so a request committed
# while the worker's transaction waited for one used to be left until the next timer (the
# 1 s lock timeout's alarm, or here the safety-net poll at an hour).
#
# The worker records a job's end, whose NOTIFY needs the cluster's notify lock; another
# session holds that lock in a commit that waits for a synchronous standby that does not
# exist.  A request is committed while the worker waits; the worker's wait ends with its
# lock timeout (the error is logged, the job's end is recorded later).  The worker then
# claims the request at once: its claim commits synchronously (as every claim does while
# synchronous standbys are configured), so it waits for the missing standby in turn, which
# the test sees.  Nothing but the commit's wake-up explains that
# claim: no reload, no timer due.  If the request did not commit within the worker's wait
# (lock_timeout is 1 s), the scenario is run again with other services.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $gate = "$tmp/wakeup.gate";
my $attempts = 3;

my $services = '';
for my $i (1 .. $attempts)
{
	$services .= "quick$i = ( { argv = [ \"/bin/true\" ]; } );\n";
	$services .= "gated$i = ( { argv = [ \"/bin/sh\", \"-c\", "
	  . "\"i=0; while [ ! -e $gate ] && [ \$i -lt 1200 ]; do sleep 0.05; i=\$((i+1)); done\" ]; } );\n";
}
my $agent = start_agent(name => 'agent_wakeup', services => $services);

# Streaming allowed: a commit waits for synchronous standbys only with WAL senders.
my $node = new_node('wakeup', init => { allows_streaming => 1 },
	conf => "restart_worker.poll_interval = '1h'\n");
setup_registry($node, 'host1', $agent->{url},
	map { ("quick$_" => '', "gated$_" => '') } 1 .. $attempts);

# The request below must not need the notify lock itself.
$node->safe_psql('postgres',
	'ALTER TABLE public.service_restart_requests DISABLE TRIGGER notify_status_insert');

my $monitor = $node->background_psql('postgres');
my $requester = $node->background_psql('postgres');
$requester->query_safe('SET synchronous_commit = local');

# Whether the worker waits for a lock.
sub worker_waits
{
	return $monitor->query_safe(
		"SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
		 WHERE a.backend_type = 'restart_worker' AND NOT l.granted") ne '0';
}

my $exercised = 0;
for my $i (1 .. $attempts)
{
	unlink $gate;
	my $gated = request_restart($node, "gated$i");
	ok(wait_status($node, $gated, 'running'), "attempt $i: the gated job runs");

	sync_standby($node, 'nobody');
	my $holder = $node->background_psql('postgres');
	# A transaction that writes WAL (the temporary table's catalog rows) and notifies.
	$holder->query_until(qr/holding/,
		"SET synchronous_commit = on;\n\\echo holding\n"
		  . "BEGIN; CREATE TEMP TABLE held (a int); NOTIFY elsewhere; COMMIT;\n");
	ok($node->poll_query_until('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'", '1'),
		"attempt $i: a notifying commit waits for the missing standby");

	my $log_offset = -s $node->logfile;
	spew($gate, '');
	ok(wait_for(\&worker_waits, 60),
		"attempt $i: recording the job's end, the worker waits for the notify lock");
	my $id = $requester->query_safe(
		"SELECT id FROM public.request_service_restart('quick$i')");
	my $during = worker_waits();
	ok($node->wait_for_log(qr/canceling statement due to lock timeout/, $log_offset),
		"attempt $i: the worker's wait for the lock timed out");

	if ($during)
	{
		ok($node->poll_query_until('postgres',
			"SELECT count(*) FROM pg_stat_activity
			 WHERE backend_type = 'restart_worker' AND wait_event = 'SyncRep'", '1'),
			"attempt $i: the worker claims the request committed during its wait");
	}
	sync_standby($node, '');
	$holder->quit;
	ok(wait_status($node, $id, 'completed'), "attempt $i: the request completed");
	if ($during)
	{
		$exercised = 1;
		last;
	}
	diag("attempt $i: the worker's wait for the lock ended before the request committed");
}
ok($exercised, 'a request committed while the worker waited for a lock was claimed');

$monitor->quit;
$requester->quit;
$node->stop;
done_testing();
