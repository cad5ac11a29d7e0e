# An end the worker decides itself (it gave up on an agent it could not reach, the
# deadline passed while the job ran) is committed durably: the agent's journal does not
# hold it, so a crash that lost it would bring the request back, and the restart would
# run after all once the request had been announced failed. An end the agent reported is
# committed durably too: lost, it would be replaced after the restart by the worker's
# own "timed out" once the deadline had passed meanwhile. The worker's other outcomes
# are committed asynchronously; here they stay in memory for up to 10 s (a slow WAL
# writer, no autovacuum), so that an immediate stop right after loses what was not
# committed durably.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $gone_runs = "$tmp/durable_gone.count";
my $late_runs = "$tmp/durable_late.count";
my $late_gate = "$tmp/durable_late.gate";
unlink $late_gate;
# The late job runs until the test opens its gate (at most 60 s), then counts its end.
my $late_wait = "i=0; while [ ! -e $late_gate ] && [ \$i -lt 1200 ]; do sleep 0.05; i=\$((i+1)); done";

my $agent = start_agent(
	name => 'agent_durable',
	services => <<"SVC");
gone_svc = ( { argv = [ "/bin/sh", "-c", "echo run >> $gone_runs" ]; } );
late_svc = ( { argv = [ "/bin/sh", "-c", "$late_wait; echo run >> $late_runs" ]; } );
quick_svc = ( { argv = [ "/bin/echo", "quick and done" ]; } );
SVC

my $node = new_node('durable', conf => "wal_writer_delay = '10s'\nautovacuum = off");
setup_registry($node, 'host1', $agent->{url},
	gone_svc => 'p_max_attempts => 1',
	late_svc => "p_deadline => '2s'",
	quick_svc => "p_deadline => '3s'");

# Crash the cluster (immediate stop), run what is given to happen meanwhile, start it
# again and wait until the worker has made its first claim, the one that takes over what
# was left dispatching or running.
sub crash_and_restart
{
	my ($meanwhile) = @_;
	$node->stop('immediate');
	$meanwhile->() if $meanwhile;
	$node->start;
	ok($node->poll_query_until('postgres',
		'SELECT polls >= 1 AND in_flight = 0 FROM restart_worker.status()'),
		'after the crash the worker made its first claim');
}

# Gave up: the agent is down and the service allows one attempt.
stop_agent($agent);
my $id = request_restart($node, 'gone_svc');
ok(wait_status($node, $id, 'failed'), 'with the agent down and one attempt allowed, the request fails');
crash_and_restart(sub { restart_agent($agent) });
my $row = row_of($node, $id);
is($row->{status}, 'failed', 'a crash right after it leaves the request failed');
is($row->{error}, 'gave up after 1 attempts: could not connect to the agent', 'with its error');
is(count_lines($gone_runs), 0, 'and its step never ran, though the agent is back');

# The deadline passed while the job ran: failed "timed out"; the job then ends on the
# agent, during the crash. (Lost, that end would be found again after the restart, but
# by the claim's look for requests past their deadline, which no longer knows that the
# job was running: "timed out; the agent may have received the request".)
$id = request_restart($node, 'late_svc');
ok(wait_status($node, $id, 'running'), 'the slow job runs');
ok(wait_status($node, $id, 'failed'), 'and fails at its deadline');
crash_and_restart(sub {
	spew($late_gate, '');
	ok(wait_for(sub { count_lines($late_runs) == 1 }, 30), 'the job ends on the agent meanwhile');
});
$row = row_of($node, $id);
is($row->{status}, 'failed', 'a crash right after it leaves the request failed, not completed');
is($row->{error}, 'timed out (the job was still running on the agent)', 'with its error');

# The agent reported the end: completed, with its output. The cluster crashes right after
# and starts again only once the deadline has passed.
$id = request_restart($node, 'quick_svc');
ok(wait_status($node, $id, 'completed'), 'a quick job completes');
my $deadline = $node->safe_psql('postgres',
	"SELECT extract(epoch FROM deadline_at) FROM public.service_restart_requests WHERE id = '$id'");
crash_and_restart(sub {
	ok(wait_for(sub { time() > $deadline + 1 }, 30), 'its deadline passes while the cluster is down');
});
$row = row_of($node, $id);
is($row->{status}, 'completed', 'a crash right after it leaves the request completed, not timed out');
is($row->{exit_code}, 0, 'with its exit code');
like($row->{output}, qr/quick and done/, 'and its output');

done_testing();
