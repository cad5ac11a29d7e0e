# The worker end to end with a real agent: success, a failing step, a service the agent
# does not know, NOTIFY, status(), a request dispatched long before the safety-net poll, and
# proxy settings in the server's environment ignored.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $count = "$tmp/e2e.count";

my $agent = start_agent(
	name => 'agent_e2e',
	services => <<"SVC");
ok_svc = ( { argv = [ "/bin/sh", "-c", "echo run >> $count; echo restarted fine" ]; } );
fail_svc = ( { argv = [ "/bin/sh", "-c", "echo step one" ]; },
             { argv = [ "/bin/sh", "-c", "echo broken >&2; exit 3" ]; } );
SVC

# The safety-net poll is 10 minutes: anything dispatched within this test was woken at COMMIT.
# The server starts with proxies in its environment that lead nowhere: the worker must
# ignore them (README), or no call would reach the agent.
my $node;
{
	local @ENV{qw(http_proxy HTTPS_PROXY ALL_PROXY all_proxy)} = ('http://127.0.0.1:9') x 4;
	$node = new_node('e2e', conf => "restart_worker.poll_interval = '10min'");
}
setup_registry($node, 'host1', $agent->{url},
	ok_svc => '', fail_svc => '', unknown_svc => '');

ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	'the worker runs with its own backend_type');
like($node->safe_psql('postgres', 'SELECT state FROM restart_worker.status()'),
	qr/^(waiting for extension|idle)$/,
	'the worker waits quietly (for the extension, created after it started, or idle)');

my $wakeups0 = $node->safe_psql('postgres', 'SELECT wakeups FROM restart_worker.status()');
my $commits0 = $node->safe_psql('postgres', 'SELECT restart_worker.commit_wakeups()');
my $id = request_restart($node, 'ok_svc');
ok(wait_status($node, $id, 'completed', 60), 'a request completes (within a minute, the poll is every 10)');
my $row = row_of($node, $id);
is($row->{exit_code}, 0, 'exit code recorded');
like($row->{output}, qr/restarted fine/, 'output recorded');
ok(defined $row->{dispatched_at} && defined $row->{started_at} && defined $row->{completed_at},
	'dispatched_at, started_at and completed_at recorded');
is($row->{attempts}, 1, 'one attempt');
is(count_lines($count), 1, 'the step ran once');
# The worker counts the wake-ups of its latch; the safety-net poll (every 10 minutes here)
# is not one, and the request's COMMIT is what set it.
is($node->safe_psql('postgres',
	"SELECT restart_worker.commit_wakeups() > $commits0 AND wakeups > $wakeups0 FROM restart_worker.status()"),
	't', 'woken at commit, not by the safety-net poll');


# A failing step: the job fails with the agent's reason and the step's exit code.
$id = request_restart($node, 'fail_svc');
ok(wait_status($node, $id, 'failed'), 'a failing step fails the request');
$row = row_of($node, $id);
is($row->{exit_code}, 3, 'exit code of the failing step');
like($row->{output}, qr/broken/, 'output of the failing step');
is($row->{error}, 'step 2 exited with code 3', 'error recorded: the step and its exit code');
ok(defined $row->{dispatched_at}, 'a failed job was dispatched');

# A service the registry knows but the agent does not: 404, failed at once, no retry.
$id = request_restart($node, 'unknown_svc');
ok(wait_status($node, $id, 'failed'), 'a service unknown to the agent fails');
$row = row_of($node, $id);
like($row->{error}, qr/^agent refused the request: HTTP 404 unknown_service: /,
	"error gives the agent's reason: $row->{error}");
is($row->{attempts}, 1, 'not retried');
ok(!defined $row->{dispatched_at}, 'never dispatched (no cooldown)');

# NOTIFY: every status change is announced with id, service_name and status.
my $psql = $node->background_psql('postgres');
$psql->query_safe('LISTEN restart_worker');
$id = request_restart($node, 'ok_svc');
ok(wait_status($node, $id, 'completed'), 'second request completes');
my $out = '';
wait_for(sub {
	$out .= $psql->query_safe('SELECT 1');
	$out =~ /"status" : "completed"/ || $out =~ /"status":"completed"/;
}, 30);
$psql->quit;
like($out, qr/Asynchronous notification "restart_worker" with payload "\{"id" : "$id", "service_name" : "ok_svc", "status" : "pending"\}"/,
	'NOTIFY announces pending');
like($out, qr/"id" : "$id".*"status" : "dispatching"/, 'NOTIFY announces dispatching');
like($out, qr/"id" : "$id".*"status" : "completed"/, 'NOTIFY announces completed');
my @seen = $out =~ /"id" : "$id", "service_name" : "ok_svc", "status" : "(\w+)"/g;
is(join(',', @seen), 'pending,dispatching,running,completed',
	"each status announced once, in order (dispatching by the worker after the claim; running "
	  . "also when the 202 is recorded with the job's end): @seen");

# status() shows the worker and its counters: this worker claimed four requests, two
# completed (ok_svc twice) and two failed (fail_svc, unknown_svc), with no retry and no
# call failed; each request took at least its one call.
my $st = $node->safe_psql('postgres',
	"SELECT pid IS NOT NULL, state, queue_depth, in_flight, claimed, completed, failed,
	        retries, call_errors, calls >= 4
	 FROM restart_worker.status()");
is($st, 't|idle|0|0|4|2|2|0|0|t', 'status() shows the worker, its queue and counters');

$node->stop;
done_testing();
