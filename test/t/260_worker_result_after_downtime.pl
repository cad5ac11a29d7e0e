# A job its agent accepted may end while nobody follows it: here the server is down. Once
# the server is back, past the request's deadline, the worker asks the agent for the job
# (extension 1.9: the claim takes such a request for a last look) and records how it
# ended: a job that ended in time is completed, with its exit code and output; one still
# running is failed "timed out". Before 1.9 the first claim failed both "timed out"
# without asking, and the first one's result was lost; so it was with a first 1.9 when the
# claim had fewer call slots than such requests. Neither job runs again.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my ($gate_ended, $gate_still) = ("$tmp/downtime_ended.gate", "$tmp/downtime_still.gate");
my ($runs_ended, $runs_still) = ("$tmp/downtime_ended.count", "$tmp/downtime_still.count");

my $agent = start_agent(
	name => 'agent_downtime',
	services => 'ended = ' . gated_steps($gate_ended, $runs_ended) . ";\n"
	  . 'still = ' . gated_steps($gate_still, $runs_still) . ";\n");
my $node = new_node('downtime');
setup_registry($node, 'host1', $agent->{url},
	ended => "p_deadline => '8s'", still => "p_deadline => '8s'");

# The job still running is requested first: its deadline comes first.
my $still = request_restart($node, 'still');
my $ended = request_restart($node, 'ended');
ok(wait_status($node, $ended, 'running'), 'the first job runs');
ok(wait_status($node, $still, 'running'), 'the second job runs');
my $deadline = $node->safe_psql('postgres',
	"SELECT extract(epoch FROM max(deadline_at)) FROM public.service_restart_requests
	 WHERE id IN ('$ended', '$still')");

# The server stops; meanwhile the first job ends on the agent, before its deadline.
$node->stop('fast');
spew($gate_ended, '');
ok(wait_for(sub { slurp($agent->{log}) =~ /job $ended: .*completed/ }, 30),
	'the first job ends on the agent while the server is down');
# When it ended, from the agent's journal (its last record of the id).
my ($record) = reverse grep { /^$ended / } split /\n/, slurp("$agent->{dir}/state/journal");
my $finished_at = JSON::PP::decode_json(substr($record // "$ended {}", length($ended) + 1))->{finished_at};
ok(defined $finished_at, "the agent journaled its end ($finished_at)");

# The server comes back once both deadlines have passed, with one call slot: its first
# claim can take one of the two requests for a look (the one whose deadline came first),
# and the other must wait for the next claim, not be failed unasked.
ok(wait_for(sub { time() > $deadline + 1 }, 30), 'the deadlines pass while the server is down');
$node->append_conf('postgresql.conf', 'restart_worker.max_in_flight = 1');
$node->start;
is($node->safe_psql('postgres',
	"SELECT '$finished_at'::timestamptz < deadline_at FROM public.service_restart_requests
	 WHERE id = '$ended'"), 't', 'it ended before its deadline');

ok(wait_status($node, $ended, 'completed|failed'), 'the first request ends');
my $row = row_of($node, $ended);
is($row->{status}, 'completed', 'as its job ended on the agent: completed')
  or diag("error: " . ($row->{error} // 'NULL'));
is($row->{exit_code}, 0, 'with its exit code');
like($row->{output} // '', qr/gated/, 'and its output');

ok(wait_status($node, $still, 'completed|failed'), 'the second request ends');
$row = row_of($node, $still);
is($row->{status}, 'failed', 'its job still running past the deadline: failed');
is($row->{error}, 'timed out (the job was still running on the agent)', 'timed out, as the agent said');

spew($gate_still, '');
ok(wait_for(sub { slurp($agent->{log}) =~ /job $still: .*completed/ }, 30),
	'the second job ends on the agent');
is(count_lines($runs_ended), 1, 'the first job ran once');
is(count_lines($runs_still), 1, 'the second job ran once');

$node->stop;
stop_agent($agent);
done_testing();
