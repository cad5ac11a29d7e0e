# This build on an extension still at 1.5 (no worker_settle(), no check in cancel())
# commits its claims synchronously: a crash that loses every asynchronous commit keeps
# the claim, and the request is driven on as dispatching. After ALTER EXTENSION UPDATE
# (to 1.7, whose worker_claim() is made again with a column more, under the worker's kept
# plan), with the worker running, its claims commit asynchronously: the same crash loses one,
# and the worker settles that request at its next start; and so again after the update to
# 1.8. Either way the step runs once. Then the updates to 1.9, 1.10, 1.11 and 1.12, under the
# running worker.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $count = "$tmp/older_extension.count";
my $gate = "$tmp/older_extension.gate";
my $gated = gated_steps($gate, $count);

my $agent = start_agent(
	name => 'agent_older_extension',
	services => <<"SVC");
count_svc = $gated;
SVC

my $node = new_node('older_extension', no_extension => 1, conf => $NO_FLUSH_CONF);
$node->safe_psql('postgres', "CREATE EXTENSION restart_worker VERSION '1.5'");
setup_registry($node, 'host1', $agent->{url}, count_svc => '');
ok(worker_as_role($node, "restart_worker.settle_margin = '0'\n"),
	'the worker runs as its role');

# A request runs while the WAL writer is stopped, then the server crashes with the new
# worker unable to log in, and the job ends; returns the request id and the log offset of
# the crash. (An end would be flushed, and everything before it: the job runs until after
# the crash.)
sub request_then_crash
{
	my ($what) = @_;
	my $before = count_lines($count);
	unlink $gate;
	$node->safe_psql('postgres', 'ALTER ROLE rw_worker NOLOGIN');
	my $walwriter = stop_walwriter($node);
	ok(defined $walwriter, "$what: the WAL writer is stopped while it sleeps");
	my $id = request_restart($node, 'count_svc');
	ok(wait_status($node, $id, 'running'), "$what: the request runs before the crash");
	ok(wait_for(sub { count_lines($count) == $before + 1 }), "$what: its step started");
	my $offset = crash_walwriter($node, $walwriter);
	ok(defined $offset, "$what: the server restarts after the crash");
	ok($node->wait_for_log(qr/role "rw_worker" is not permitted to log in/, $offset),
		"$what: the new worker cannot log in");
	spew($gate, '');
	return ($id, $offset, $before + 1);
}

spew($gate, '');
my $first = request_restart($node, 'count_svc');
ok(wait_status($node, $first, 'completed'), 'a first request completes on 1.5');

my ($id, $offset, $runs) = request_then_crash('1.5');
is(status_attempts($node, $id),
	'dispatching 1', '1.5: the claim was kept (synchronous); only the recorded answer was lost');
worker_back($node, $id, what => '1.5', count_file => $count, runs => $runs, offset => $offset);

$node->safe_psql('postgres', "ALTER EXTENSION restart_worker UPDATE TO '1.7'");
is($node->safe_psql('postgres',
	"SELECT extversion FROM pg_extension WHERE extname = 'restart_worker'"),
	'1.7', 'the extension is updated while the worker runs');
spew($gate, '');
my $after = request_restart($node, 'count_svc');
ok(wait_status($node, $after, 'completed'), 'a request completes on 1.7');

($id, $offset, $runs) = request_then_crash('1.7');
is(status_attempts($node, $id),
	'pending 0', '1.7: the claim was lost (asynchronous): the request is pending again');
worker_back($node, $id, what => '1.7', count_file => $count, runs => $runs, offset => $offset,
	settled => 1);

# 1.8 replaces worker_settle() among others and pins every function's search path anew,
# under the running worker's kept plans: requests go on, and a lost claim is settled.
$node->safe_psql('postgres', "ALTER EXTENSION restart_worker UPDATE TO '1.8'");
is($node->safe_psql('postgres',
	"SELECT extversion FROM pg_extension WHERE extname = 'restart_worker'"),
	'1.8', 'the extension is updated to 1.8 while the worker runs');
spew($gate, '');
$after = request_restart($node, 'count_svc');
ok(wait_status($node, $after, 'completed'), 'a request completes on 1.8');
($id, $offset, $runs) = request_then_crash('1.8');
is(status_attempts($node, $id),
	'pending 0', '1.8: the claim was lost (asynchronous): the request is pending again');
worker_back($node, $id, what => '1.8', count_file => $count, runs => $runs, offset => $offset,
	settled => 1);

# 1.9 replaces worker_claim() again, under the running worker's kept plan.
$node->safe_psql('postgres', "ALTER EXTENSION restart_worker UPDATE TO '1.9'");
is($node->safe_psql('postgres',
	"SELECT extversion FROM pg_extension WHERE extname = 'restart_worker'"),
	'1.9', 'the extension is updated to 1.9 while the worker runs');
$after = request_restart($node, 'count_svc');
ok(wait_status($node, $after, 'completed'), 'a request completes on 1.9');

# 1.10 replaces worker_claim() once more (a due request past its deadline is not taken).
$node->safe_psql('postgres', "ALTER EXTENSION restart_worker UPDATE TO '1.10'");
is($node->safe_psql('postgres',
	"SELECT extversion FROM pg_extension WHERE extname = 'restart_worker'"),
	'1.10', 'the extension is updated to 1.10 while the worker runs');
$after = request_restart($node, 'count_svc');
ok(wait_status($node, $after, 'completed'), 'a request completes on 1.10');

# 1.11 adds a C function, curl_url_usable(), that register_agent() asks (the worker's
# library has it already) and replaces check_url(); the worker's functions stay.
$node->safe_psql('postgres', "ALTER EXTENSION restart_worker UPDATE TO '1.11'");
is($node->safe_psql('postgres',
	"SELECT extversion FROM pg_extension WHERE extname = 'restart_worker'"),
	'1.11', 'the extension is updated to 1.11 while the worker runs');
$after = request_restart($node, 'count_svc');
ok(wait_status($node, $after, 'completed'), 'a request completes on 1.11');

# 1.12 replaces worker_claim(), which the worker has prepared: its next claim plans anew.
$node->safe_psql('postgres', 'ALTER EXTENSION restart_worker UPDATE');
is($node->safe_psql('postgres',
	"SELECT extversion FROM pg_extension WHERE extname = 'restart_worker'"),
	'1.12', 'the extension is updated to 1.12 while the worker runs');
$after = request_restart($node, 'count_svc');
ok(wait_status($node, $after, 'completed'), 'a request completes on 1.12');

$node->stop;
done_testing();
