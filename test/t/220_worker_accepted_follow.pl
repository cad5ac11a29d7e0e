# A request the agent accepted (running) is taken up again by asking the agent for its
# job, never by sending the request again: an agent that no longer knows the id (its
# journal lost, or the job pruned) answers 404, and the request fails instead of running
# its steps a second time. (Extension 1.7; before, such a request was sent again.)
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $count = "$tmp/accepted.count";
my $gate = "$tmp/accepted.gate";
my $gated = gated_steps($gate, $count);

# gated_svc runs until the gate file exists (at most a minute).
my $agent = start_agent(
	name => 'agent_accepted',
	services => <<"SVC");
gated_svc = $gated;
SVC

my $node = new_node('accepted');
setup_registry($node, 'host1', $agent->{url}, gated_svc => '');

# The job runs; the worker's "running" (committed asynchronously) is made durable with a
# checkpoint, then the cluster crashes.
my $id = request_restart($node, 'gated_svc');
ok(wait_status($node, $id, 'running'), 'the job runs on the agent');
$node->safe_psql('postgres', 'CHECKPOINT');
$node->stop('immediate');

# Meanwhile the job ends, and the agent loses its journal (a new disk, say).
spew($gate, '');
ok(wait_for(sub { slurp($agent->{log}) =~ /job $id: completed/ }, 60),
	'the job ends on the agent while the cluster is down');
stop_agent($agent);
unlink("$agent->{dir}/state/journal") or die "cannot remove the agent's journal: $!";
restart_agent($agent);

$node->start;
ok(wait_status($node, $id, 'failed'), 'taken up again after the restart, the request fails');
my $row = row_of($node, $id);
like($row->{error}, qr/^agent refused the request: HTTP 404 unknown_job/,
	'the agent no longer knows its job: 404');
is(count_lines($count), 1, 'and its step did not run again');
my $posts = () = slurp($agent->{log}) =~ /request POST \S+ from \S+ id=$id: /g;
is($posts, 1, 'the request was sent once; after the restart the worker asked for its job');

# With the job still known to the agent, the same path follows it to its end.
unlink $gate;
$id = request_restart($node, 'gated_svc');
ok(wait_status($node, $id, 'running'), 'a second job runs');
$node->safe_psql('postgres', 'CHECKPOINT');
$node->stop('immediate');
$node->start;
spew($gate, '');
ok(wait_status($node, $id, 'completed'), 'taken up again after a crash, it completes');
is(count_lines($count), 2, 'each step ran once');
$posts = () = slurp($agent->{log}) =~ /request POST \S+ from \S+ id=$id: /g;
is($posts, 1, 'and was sent once');

done_testing();
