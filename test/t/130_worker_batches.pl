# Answers that come in together are recorded together: the worker records the job objects
# of one turn in one transaction, with one call of worker_record_jobs(), and each row ends
# as it would alone, each status change announced in order.  If that call fails, the
# worker records the answers one by one.
#
# To have the answers come in together, the worker is stopped (SIGSTOP) while the jobs
# end: their long-polls are answered into its sockets, and it finds them all at once when
# it goes on (SIGCONT).  The jobs' steps wait on a FIFO that the test opens and closes.
use strict;
use warnings;

use Fcntl qw(O_WRONLY O_NONBLOCK);
use POSIX qw(mkfifo);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $n = 8;
my $fifo = "$PostgreSQL::Test::Utils::tmp_check/batches.fifo";
mkfifo($fifo, 0600) or die "mkfifo: $!";
my @names = map { "r$_" } 1 .. $n;
my $agent = start_agent(
	name => 'agent_batches',
	services => join("\n", map { qq{$_ = ( { argv = [ "/bin/cat", "$fifo" ]; } );} } @names));

my $node = new_node('batches', conf => <<CONF);
restart_worker.max_connections_per_agent = 16
restart_worker.follow_wait = '30s'
restart_worker.request_timeout = '60s'
CONF
setup_registry($node, 'host1', $agent->{url}, map { $_ => '' } @names);
my $worker = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");

# Whether the agent's journal has the final state of every job of @ids.
sub all_ended_on_agent
{
	my (@ids) = @_;
	my $journal = slurp("$agent->{dir}/state/journal");
	for my $id (@ids)
	{
		return 0 unless $journal =~ /^$id \{[^\n]*"status":\s*"completed"/m;
	}
	return 1;
}

# Whether the agent answered the long-poll of every job of @ids (its log says so, and it
# logs before it sends), and as many of the worker's connections to the agent hold data
# not read yet (/proc/net/tcp: the remote address is the agent's port, rx_queue > 0).
sub all_answered
{
	my (@ids) = @_;
	my $log = slurp($agent->{log});
	return 0 if grep { $log !~ m{request GET /v1/restarts/$_\S* from \S+ id=$_: 200 status of job $_ \(completed\)} } @ids;
	my $port = sprintf(':%04X', $agent->{port});
	my $unread = 0;
	for my $line (split /\n/, slurp('/proc/net/tcp'))
	{
		my @f = split ' ', $line;
		next unless @f > 4 && $f[2] =~ /$port$/;
		my (undef, $rx) = split /:/, $f[4];
		$unread++ if hex($rx) > 0;
	}
	return $unread >= scalar @ids;
}

# Request every service at once, wait until every job runs (its 202 recorded) and the
# agent holds its long-poll, then end them all while the worker is stopped, and let it go
# on.
# Returns the request ids.
sub run_round
{
	my ($round) = @_;
	my @ids = split /\n/, $node->safe_psql('postgres',
		"SELECT (public.request_service_restart(s)).id FROM unnest(ARRAY['"
		  . join("','", @names) . "']) s");
	is(scalar @ids, $n, "$round: $n requests made at once");
	ok( wait_for(sub {
				$node->safe_psql('postgres',
					"SELECT count(*) FROM public.service_restart_requests WHERE status = 'running'")
				  == $n;
			}),
		"$round: every job runs");
	ok( wait_for(sub {
				my $log = slurp($agent->{log});
				!grep { $log !~ /job $_: a long poll waits/ } @ids;
			}),
		"$round: the agent holds a long-poll of every job");
	kill 'STOP', $worker;

	# Each open and close of the FIFO ends the steps reading it; a step that opens it late
	# is ended by the next one.
	my $ended = wait_for(sub {
		if (sysopen(my $fh, $fifo, O_WRONLY | O_NONBLOCK))
		{
			close $fh;
		}
		all_ended_on_agent(@ids);
	});
	ok($ended, "$round: the agent ended every job while the worker was stopped");
	ok(wait_for(sub { all_answered(@ids) }),
		"$round: the agent's answers to every long-poll wait in the worker's sockets");
	kill 'CONT', $worker;
	ok( wait_for(sub {
				$node->safe_psql('postgres',
					"SELECT count(*) FROM public.service_restart_requests WHERE status = 'completed' AND id IN ('"
					  . join("','", @ids) . "')") == $n;
			}),
		"$round: every request completed");
	is( $node->safe_psql('postgres',
			"SELECT count(*) FROM public.service_restart_requests WHERE id IN ('"
			  . join("','", @ids) . "') AND exit_code = 0 AND output LIKE '==> step 1: /bin/cat%'"
			  . " AND dispatched_at IS NOT NULL AND started_at IS NOT NULL AND completed_at IS NOT NULL"
			  . " AND error IS NULL"),
		$n, "$round: each row has its job's exit code, output and times");
	return @ids;
}

my $listen = $node->background_psql('postgres');
$listen->query_safe('LISTEN restart_worker');

# The answers of one turn, in one transaction: every row has that transaction's time.
my @ids = run_round('together');
is( $node->safe_psql('postgres',
		"SELECT count(DISTINCT updated_at) FROM public.service_restart_requests WHERE id IN ('"
		  . join("','", @ids) . "')"),
	1, 'the answers that came in together were recorded in one transaction');

my $out = '';
wait_for(sub {
	$out .= $listen->query_safe('SELECT 1');
	my @done = $out =~ /"status" : "completed"/g;
	scalar @done >= $n;
});
$listen->quit;
for my $id (@ids)
{
	my @seen = $out =~ /"id" : "$id", "service_name" : "r\d+", "status" : "(\w+)"/g;
	is(join(',', @seen), 'pending,dispatching,running,completed',
		"request $id: each status announced once, in order");
}

# Called directly: jobs that ended while their rows were still dispatching (a 202 that
# told the end, or a held 202 with its long-poll's answer) are announced running, then
# their end; a job that still runs is announced running once.  The rows are leased far
# ahead, so that the worker leaves them alone.
my @direct = split /\n/, $node->safe_psql('postgres', q{
	INSERT INTO public.service_restart_requests (service_name, status, requested_by_role,
		attempts, deadline_at, next_attempt_at)
	SELECT s, 'dispatching', 'postgres', 1, now() + interval '1 hour', now() + interval '1 hour'
	FROM unnest(ARRAY['r1', 'r2', 'r3']) s
	RETURNING id});
$listen = $node->background_psql('postgres');
$listen->query_safe('LISTEN restart_worker');
is($node->safe_psql('postgres', qq{
	SELECT string_agg(n || ':' || action, ',' ORDER BY n) FROM restart_worker.worker_record_jobs(
		ARRAY['$direct[0]', '$direct[1]', '$direct[2]']::uuid[], ARRAY['completed', 'failed', 'running'],
		ARRAY[now(), now(), now()], ARRAY[now(), now(), NULL], ARRAY[0, 3, NULL], ARRAY['a', 'b', 'c'],
		ARRAY[NULL, 'step 1 exited with code 3', NULL], ARRAY[now(), NULL, NULL]::timestamptz[],
		ARRAY[true, true, false], 60000)}),
	'1:completed,2:failed,3:follow', 'worker_record_jobs() records each job and says what next');
$out = '';
wait_for(sub {
	$out .= $listen->query_safe('SELECT 1');
	my @seen = $out =~ /"status" : "/g;
	scalar @seen >= 5;
});
$listen->quit;
my %expect = ($direct[0] => 'running,completed', $direct[1] => 'running,failed',
	$direct[2] => 'running');
for my $id (@direct)
{
	my @seen = $out =~ /"id" : "$id", "service_name" : "r\d+", "status" : "(\w+)"/g;
	is(join(',', @seen), $expect{$id}, "direct call, request $id: announced $expect{$id}");
}
$node->safe_psql('postgres', "DELETE FROM public.service_restart_requests WHERE id = '$direct[2]'");

# If the call fails, the answers are recorded one by one, and nothing is lost.
$node->safe_psql('postgres', <<'SQL');
CREATE OR REPLACE FUNCTION restart_worker.worker_record_jobs(p_ids uuid[],
	p_status text[], p_started_at timestamptz[], p_finished_at timestamptz[],
	p_exit_code integer[], p_output text[], p_error text[],
	p_dispatched_at timestamptz[], p_running_first boolean[], p_lease_ms integer)
RETURNS TABLE (n integer, action text)
LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'broken by the test'; END $$;
SQL
my $log_start = -s $node->logfile;
@ids = run_round('one by one');
like(
	substr(slurp($node->logfile), $log_start),
	qr/recording \d+ answers at once failed, recording them one by one: broken by the test/,
	'the failed call was logged');
is( $node->safe_psql('postgres',
		"SELECT count(DISTINCT updated_at) FROM public.service_restart_requests WHERE id IN ('"
		  . join("','", @ids) . "')"),
	$n, 'each answer was then recorded in a transaction of its own');
is($node->safe_psql('postgres', 'SELECT completed, failed, call_errors FROM restart_worker.status()'),
	2 * $n . '|0|0', 'status() counts every request completed, once');

$node->stop;
stop_agent($agent);
done_testing();
