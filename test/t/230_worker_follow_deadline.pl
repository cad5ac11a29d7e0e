# A request whose job runs past its deadline ends "timed out" at its deadline, also when
# its long-poll waits in the queue for a connection to the agent (each connection that
# long-polls may take is held by another job's long-poll): at the deadline it starts
# anyway, asking the agent not to wait, instead of once a long-poll ahead of it came back.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $gate = "$tmp/follow_deadline.gate";
my $gated = gated_steps($gate);

my $agent = start_agent(
	name => 'agent_follow_deadline',
	services => "long = $gated;\nshort = $gated;\n");

# Two connections to the agent: one for long-polls, one kept for new requests.
my $node = new_node('follow_deadline', conf => <<CONF);
restart_worker.max_connections_per_agent = 2
restart_worker.follow_wait = '30s'
CONF
setup_registry($node, 'host1', $agent->{url}, long => '', short => "p_deadline => '3s'");

my $long = request_restart($node, 'long');
ok(wait_status($node, $long, 'running'), 'the long job runs');
ok(wait_for(sub { slurp($agent->{log}) =~ /job $long: a long poll waits/ }, 30),
	'its long-poll holds the one connection long-polls may take, for up to 30 s');

my $short = request_restart($node, 'short');
ok(wait_status($node, $short, 'failed', 15),
	'a request with a 3 s deadline fails at its deadline, not when that long-poll comes back');
my $row = row_of($node, $short);
is($row->{error}, 'timed out (the job was still running on the agent)',
	'timed out, its job still running');
ok(defined $row->{dispatched_at}, 'it had been dispatched');
is($node->safe_psql('postgres',
	"SELECT status FROM public.service_restart_requests WHERE id = '$long'"),
	'running', 'the long job runs on');

spew($gate, '');
ok(wait_status($node, $long, 'completed'), 'and is followed to its end');

$node->stop;
done_testing();
