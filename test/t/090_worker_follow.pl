# Long-polls of running jobs never take every connection to an agent: with as many jobs
# running as there are connections, a new request's POST still gets through at once (the
# first attempt, no timeout), and every job is followed to its end.  The long-polls that
# wait for a connection take turns: a quick job is seen completed while the long jobs
# ahead of it in the queue still run.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $gate = "$tmp/follow.gate";
my $gated = gated_steps($gate);

my $agent = start_agent(
	name => 'agent_follow',
	services => "g1 = $gated;\ng2 = $gated;\ng3 = $gated;\n"
	  . qq{quick = ( { argv = [ "/bin/sh", "-c", "echo quick" ]; } );});

my $node = new_node('follow', conf => <<CONF);
restart_worker.max_connections_per_agent = 2
restart_worker.follow_wait = '1s'
restart_worker.request_timeout = '5s'
CONF
setup_registry($node, 'host1', $agent->{url}, g1 => '', g2 => '', g3 => '', quick => '');

my %ids = map { $_ => request_restart($node, $_) } qw(g1 g2 g3);
ok(wait_status($node, $ids{$_}, 'running'), "gated job $_ runs") for sort keys %ids;
my $quick = $ids{quick} = request_restart($node, 'quick');
ok(wait_status($node, $quick, 'running|completed'),
	'a new request reaches the agent while the gated jobs run');

# Wait until the quick job is completed, or until a gated job is not running any more
# (its gate loop gave up): the quick job must not wait for the long jobs to end.
my @gated = map { $ids{$_} } qw(g1 g2 g3);
my $gated_list = join(', ', map { "'$_'" } @gated);
my $quick_done = "SELECT status = 'completed' FROM public.service_restart_requests"
  . " WHERE id = '$quick'";
wait_for(
	sub {
		$node->safe_psql('postgres', $quick_done) eq 't'
		  || $node->safe_psql('postgres',
			"SELECT count(*) FROM public.service_restart_requests"
			  . " WHERE id IN ($gated_list) AND status = 'running'") ne '3';
	});
is($node->safe_psql('postgres', $quick_done), 't',
	'the quick job is followed to its end');
is($node->safe_psql('postgres',
	"SELECT string_agg(status, ',') FROM public.service_restart_requests"
	  . " WHERE id IN ($gated_list)"), 'running,running,running',
	'while the long jobs queued before it still run');
my $row = row_of($node, $quick);
is($row->{attempts}, 1, 'at the first attempt');
is($node->safe_psql('postgres', 'SELECT call_errors FROM restart_worker.status()'), '0',
	'no call timed out waiting for a connection');

spew($gate, '');
ok(wait_status($node, $ids{$_}, 'completed'), "job $_ is followed to its end") for sort keys %ids;

$node->stop;
done_testing();
