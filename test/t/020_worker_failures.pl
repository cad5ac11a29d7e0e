# How the worker copes with agents that fail: down then up (retried, then completed),
# never back (failed after the maximum attempts), unresponsive (timed out), a job that
# outlives its deadline, gone while a job runs (followed with growing delays), a wrong
# secret (refused, not retried).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $count = "$tmp/failures.count";

my $agent = start_agent(
	name => 'agent_failures',
	services => <<"SVC");
flaky_svc = ( { argv = [ "/bin/sh", "-c", "echo run >> $count; echo back up" ]; } );
slow_svc = ( { argv = [ "/bin/sh", "-c", "echo slow; sleep 20" ]; } );
long_svc = ( { argv = [ "/bin/sh", "-c", "echo long; sleep 30" ]; } );
SVC

my $node = new_node('failures');
setup_registry($node, 'host1', $agent->{url},
	flaky_svc => 'p_max_attempts => 100',
	slow_svc => "p_deadline => '3s'",
	long_svc => '');

# Every retry the worker records (an error, and the next attempt less than 30 s away; a
# claim's lease, which keeps the error, is request_timeout + follow_wait + 60 s = 75 s
# here) is logged with its attempt and delay, to check the backoff the README documents:
# before attempt n+1 the worker waits d = min(retry_max, retry_base * 2^(n-1)), of which
# the second half is random, so between d/2 and d.
$node->safe_psql('postgres', q{
	CREATE TABLE retry_log (service text, attempts integer, delay_ms float8);
	GRANT INSERT ON retry_log TO PUBLIC;
	CREATE FUNCTION log_retry() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
	SET search_path = pg_catalog, public AS $$
	BEGIN
		IF NEW.error IS NOT NULL AND NEW.next_attempt_at - NEW.updated_at < interval '30 s' THEN
			INSERT INTO retry_log VALUES (NEW.service_name, NEW.attempts,
				extract(epoch FROM NEW.next_attempt_at - NEW.updated_at) * 1000);
		END IF;
		RETURN NULL;
	END $$;
	CREATE TRIGGER log_retry AFTER UPDATE ON public.service_restart_requests
		FOR EACH ROW EXECUTE FUNCTION log_retry();
});
# The retries of a service outside their window, as "attempts:delay" (none is right).
my $off_backoff = sub {
	my ($svc) = @_;
	return $node->safe_psql('postgres', qq{
		SELECT coalesce(string_agg(attempts || ':' || round(delay_ms::numeric, 1), ' '), '')
		FROM retry_log, LATERAL (SELECT least(1000, 100 * power(2, attempts - 1)) AS d) w
		WHERE service = '$svc' AND (delay_ms < w.d / 2 - 1 OR delay_ms > w.d + 1)});
};

# Agent down, then up: the request is retried with backoff and completes.
stop_agent($agent);
my $id = request_restart($node, 'flaky_svc');
ok($node->poll_query_until('postgres',
	"SELECT attempts >= 2 AND status IN ('pending', 'dispatching') AND error IS NOT NULL
	 FROM public.service_restart_requests WHERE id = '$id'"),
	'with the agent down the request is retried');
my $row = row_of($node, $id);
ok(!defined $row->{dispatched_at}, "not dispatched while the agent is down ($row->{error})");
ok(!defined $row->{uncertain_at}, 'nothing was sent (the connection was refused): no cooldown held');
is($row->{error}, 'could not connect to the agent', 'the error says so');
restart_agent($agent);
ok(wait_status($node, $id, 'completed'), 'once the agent is back the request completes');
$row = row_of($node, $id);
ok($row->{attempts} >= 2, "completed after $row->{attempts} attempts");
is($node->safe_psql('postgres', "SELECT count(*) FROM retry_log WHERE service = 'flaky_svc'"),
	$row->{attempts} - 1, 'every attempt but the last was followed by a retry');
is($off_backoff->('flaky_svc'), '', 'each retry waited retry_base * 2^(attempts-1), its second half random');
is($row->{error}, undef, 'no error left on the completed request');
is(count_lines($count), 1, 'the step ran once');

# An agent that never comes back: failed after the service's maximum attempts.
$node->safe_psql('postgres', "SELECT restart_worker.register_agent('gone', 'http://127.0.0.1:" . free_port() . "', '$SECRET')");
$node->safe_psql('postgres', "SELECT restart_worker.register_service('gone_svc', 'gone', '0', p_max_attempts => 3)");
$id = request_restart($node, 'gone_svc');
ok(wait_status($node, $id, 'failed'), 'a request to an agent that never answers fails');
$row = row_of($node, $id);
is($row->{attempts}, 3, 'after the maximum attempts');
is($row->{error}, 'gave up after 3 attempts: could not connect to the agent',
	'error says so, without host or port');
ok(!defined $row->{dispatched_at}, 'never dispatched, so no cooldown');
is($node->safe_psql('postgres', "SELECT count(*) FROM public.request_service_restart('gone_svc')"),
	'1', 'a new request for the service is accepted at once');
$node->safe_psql('postgres', "SELECT restart_worker.cancel_request(id) FROM public.service_restart_requests
	WHERE service_name = 'gone_svc' AND status = 'pending'");

# An agent that accepts connections and never answers: timed out at the deadline.
my (undef, $port) = unresponsive_listener();
$node->safe_psql('postgres', "SELECT restart_worker.register_agent('mute', 'http://127.0.0.1:$port', '$SECRET')");
$node->safe_psql('postgres', "SELECT restart_worker.register_service('mute_svc', 'mute', '0', p_deadline => '2s')");
$id = request_restart($node, 'mute_svc');
ok(wait_status($node, $id, 'failed'), 'a request to an unresponsive agent fails');
$row = row_of($node, $id);
like($row->{error}, qr/^timed out/, "with \"timed out\": $row->{error}");

# A job still running at its deadline: failed "timed out", though it was dispatched.  Its
# long-poll asks the agent to wait no longer than the deadline (follow_wait is 25 s), so
# the agent answers "running" rather than the call timing out.
my $errors_before = $node->safe_psql('postgres', 'SELECT call_errors FROM restart_worker.status()');
$id = request_restart($node, 'slow_svc');
ok(wait_status($node, $id, 'running'), 'the slow job runs');
ok(wait_status($node, $id, 'failed'), 'and fails at its deadline');
$row = row_of($node, $id);
is($row->{error}, 'timed out (the job was still running on the agent)',
	'with "timed out", learnt from the agent, not from a call that timed out');
ok(defined $row->{dispatched_at}, 'it had been dispatched');
is($node->safe_psql('postgres', 'SELECT call_errors FROM restart_worker.status()'),
	$errors_before, 'no call timed out');

# The agent goes away while a job runs: the calls that follow the job are retried, each
# after a longer delay (retry_base 100 ms here, doubled each time up to retry_max 1 s,
# half of it random), not every 100 ms until the deadline. A retry's delay is on the row:
# next_attempt_at - updated_at.
$id = request_restart($node, 'long_svc');
ok(wait_status($node, $id, 'running'), 'the long job runs');
stop_agent($agent, 'KILL');
ok($node->poll_query_until('postgres',
	"SELECT status = 'running' AND error IS NOT NULL
	        AND next_attempt_at - updated_at BETWEEN interval '400 ms' AND interval '2 s'
	 FROM public.service_restart_requests WHERE id = '$id'"),
	'with the agent gone, the calls following its job are retried after longer and longer delays');
$row = row_of($node, $id);
ok($row->{attempts} >= 4, "each call made again is an attempt ($row->{attempts})");
ok($node->poll_query_until('postgres',
	"SELECT count(*) >= 3 FROM retry_log WHERE service = 'long_svc'"),
	'three of those retries are logged');
is($off_backoff->('long_svc'), '',
	'each waited retry_base * 2^(attempts-1), at most retry_max, its second half random');
restart_agent($agent);
ok(wait_status($node, $id, 'failed'), 'once the agent is back, the job it lost is failed');
is(row_of($node, $id)->{error}, 'agent restarted during the job', 'with the reason the agent gives');

# A wrong secret: 401, refused at once with the agent's reason, not retried.
$node->safe_psql('postgres', "SELECT restart_worker.register_agent('badkey', '$agent->{url}',
	'whsec_' || encode(convert_to('0123456789abcdefghijklmnopqrstuv', 'UTF8'), 'base64'))");
$node->safe_psql('postgres', "SELECT restart_worker.register_service('flaky_svc', 'badkey', '0')");
$id = request_restart($node, 'flaky_svc');
ok(wait_status($node, $id, 'failed'), 'a call with a wrong signature fails');
$row = row_of($node, $id);
like($row->{error}, qr/^agent refused the request: HTTP 401 invalid_signature: /,
	"error gives the agent's reason: $row->{error}");
is($row->{attempts}, 1, 'not retried');
is(count_lines($count), 1, 'nothing ran');

$node->stop;
done_testing();
