# Crashes: kill -9 of the worker while a call is being dispatched and while the job runs,
# and an immediate stop and start of Postgres mid-job.  No request is lost and every
# step ran exactly once (counted with a step that appends to a file).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $count = "$tmp/recovery.count";
my $gate = "$tmp/recovery.gate";

# gated_svc runs until the gate file exists (at most a minute).
my $agent = start_agent(
	name => 'agent_recovery',
	services => <<"SVC");
gated_svc = ( { argv = [ "/bin/sh", "-c",
  "echo run >> $count; i=0; while [ ! -e $gate ] && [ \$i -lt 1200 ]; do sleep 0.05; i=\$((i+1)); done; echo gate passed" ]; } );
SVC

my $node = new_node('recovery', conf => 'restart_after_crash = on');
setup_registry($node, 'host1', $agent->{url}, gated_svc => '');

sub worker_pid
{
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");
}

# Wait for a worker other than $old to run.
sub wait_new_worker
{
	my ($old) = @_;
	return $node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker' AND pid <> $old");
}

# Run one gated request through a disruption (and $prepare before the request is made);
# returns its row.
sub through
{
	my ($what, $disrupt, $prepare) = @_;
	unlink $gate;
	my $before = count_lines($count);
	$prepare->() if $prepare;
	my $id = request_restart($node, 'gated_svc');
	$disrupt->($id);
	spew($gate, '');
	ok(wait_status($node, $id, 'completed'), "$what: the request completes");
	is(count_lines($count), $before + 1, "$what: the step ran once");
	return row_of($node, $id);
}

ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	'the worker runs');

# kill -9 while the job runs: the postmaster restarts everything, the new worker takes
# the running request over with the same id and follows it to its end.
through('kill -9 while the job runs', sub {
	my ($id) = @_;
	ok(wait_status($node, $id, 'running'), 'the job runs');
	my $pid = worker_pid();
	kill 'KILL', $pid;
	ok(wait_new_worker($pid), 'a new worker starts');
});

# kill -9 while dispatching: the agent is stopped (SIGSTOP) before the request is made,
# so the POST hangs in flight; the worker dies; the agent resumes and the new worker
# sends the same id again.
through('kill -9 while dispatching', sub {
	my ($id) = @_;
	ok(wait_status($node, $id, 'dispatching'), 'the call is in flight');
	ok($node->poll_query_until('postgres',
		"SELECT in_flight = 1 FROM restart_worker.status()"), 'the worker holds the call');
	my $pid = worker_pid();
	kill 'KILL', $pid;
	ok(wait_new_worker($pid), 'a new worker starts');
	kill 'CONT', $agent->{pid};
	ok(wait_status($node, $id, 'running'), 'the job runs');
}, sub { kill 'STOP', $agent->{pid}; });

# Immediate stop of Postgres mid-job, then start: the request is driven on.
my $row = through('immediate stop and start mid-job', sub {
	my ($id) = @_;
	ok(wait_status($node, $id, 'running'), 'the job runs');
	$node->stop('immediate');
	$node->start;
});
ok(defined $row->{dispatched_at} && defined $row->{completed_at}, 'times recorded after the restart');

$node->stop;
done_testing();
