# A claim the standby never received: the primary's worker claimed a request
# asynchronously and its call reached the agent, then the primary died before the claim
# was flushed, so it was never streamed. On the promoted standby the request is pending,
# yet its step ran. The new primary's worker starts after the promotion: until it has
# settled, cancelling the request is refused; then it sends the request again with the
# same id, the agent answers with the job it ran, and the step has run once.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $count = "$tmp/promotion.count";
my $gate = "$tmp/promotion.gate";
my $gated = gated_steps($gate, $count);

my $agent = start_agent(
	name => 'agent_promotion',
	services => <<"SVC");
count_svc = $gated;
SVC

# The primary stops at its crash (no restart): the standby takes over.  Its shared buffers
# are large enough that no backend has to write a page (which would flush the WAL first);
# allows_streaming sets 1MB.
my $primary = new_node('promotion_primary', init => { allows_streaming => 1 },
	conf => $NO_FLUSH_CONF . "restart_after_crash = off\nshared_buffers = '32MB'\n");
setup_registry($primary, 'host1', $agent->{url}, count_svc => '');
ok(worker_as_role($primary),
	'the primary\'s worker runs as its role');
$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('promotion_standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;

spew($gate, '');
my $first = request_restart($primary, 'count_svc');
ok(wait_status($primary, $first, 'completed'), 'a first request completes on the primary');
unlink $gate;

# After the promotion the worker will not be able to log in, until the role may again.
$primary->safe_psql('postgres', 'ALTER ROLE rw_worker NOLOGIN');
$primary->wait_for_catchup($standby);

# The request's own commit is flushed and streamed; the worker's claim and recorded
# "running" are not, with the WAL writer stopped: a WAL sender sends only what was flushed.
# (An end would be flushed, and everything before it: the job runs until after the crash.)
my $walwriter = stop_walwriter($primary);
ok(defined $walwriter, 'the primary\'s WAL writer is stopped while it sleeps');
my $id = request_restart($primary, 'count_svc');
ok(wait_status($primary, $id, 'running'), 'the request runs on the primary');
ok(wait_for(sub { count_lines($count) == 2 }), 'its step started');
ok($standby->poll_query_until('postgres',
	"SELECT status FROM public.service_restart_requests WHERE id = '$id'", 'pending'),
	'the standby has the request, pending');

# The crash: every process of the primary ends without flushing; it does not restart.
ok(defined crash_walwriter($primary, $walwriter, qr/database system is shut down/),
	'the primary crashes and stays down');
$primary->stop('immediate', fail_ok => 1);    # only forgets its pid

my $offset = -s $standby->logfile;
$standby->promote;
ok($standby->wait_for_log(qr/role "rw_worker" is not permitted to log in/, $offset),
	'the worker starts after the promotion and cannot log in');
is(status_attempts($standby, $id),
	'pending 0', 'the claim never reached the standby: the request is pending, as if never sent');
like(cancel_refusal($standby, $id),
	qr/^request \S+ cannot be cancelled yet: it may have reached its agent before the server restarted/,
	'cancelling it on the new primary is refused (55000)');

spew($gate, '');
worker_back($standby, $id, what => 'on the new primary', count_file => $count, runs => 2,
	offset => $offset, settled => 1);

$standby->stop;
done_testing();
