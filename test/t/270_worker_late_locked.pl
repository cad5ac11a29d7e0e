# A request past its deadline whose row someone else holds (here register_service(),
# moving its service to another agent in an open transaction) is never sent. A claim first
# fails the requests past their deadline, skipping the locked one; before 1.10, if the lock
# was gone by the time the same claim took the due requests, that one was among them, and
# was sent to its agent with no time left (a call of about a millisecond). The test stops
# the claim between the two, in a trigger on the failure of another late request, and
# releases the lock there. The late request must then be left alone, failed "timed out" by
# the next claim, without a call; while it is locked the worker must not spin on it (it is
# due, and cannot be taken: the worker looks again a second later).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $agent = start_agent(
	name => 'agent_late_locked',
	services => qq{late_svc = ( { argv = [ "/bin/sh", "-c", "echo late" ]; } );\n});

# A failed call is tried again at its deadline at the latest (worker_record()): with an
# hour's backoff, each request's second look comes at its deadline, from a claim.
my $node = new_node('late_locked',
	conf => "restart_worker.retry_base = '1h'\nrestart_worker.retry_max = '1h'\n");
# Both services start on an agent nobody listens for: their calls fail to connect.
setup_registry($node, 'gone', 'http://127.0.0.1:' . free_port(),
	late_svc => "p_deadline => '3 seconds'", pause_svc => "p_deadline => '10 seconds'");
setup_registry($node, 'host1', $agent->{url});

# The pause: when a claim fails a request of pause_svc, it waits in this trigger until a
# row appears in claim_gate (each of its queries sees what committed meanwhile), for three
# minutes at most, so that a test that dies before opening the gate leaves no stuck worker.
$node->safe_psql('postgres', q{
	CREATE TABLE public.claim_gate (opened boolean);
	CREATE FUNCTION public.pause_claim() RETURNS trigger LANGUAGE plpgsql AS $$
	DECLARE
		v_context text;
		v_until timestamptz := clock_timestamp() + interval '3 minutes';
	BEGIN
		GET DIAGNOSTICS v_context = PG_CONTEXT;
		IF v_context LIKE '%worker_claim%' THEN
			WHILE NOT EXISTS (SELECT FROM public.claim_gate) AND clock_timestamp() < v_until LOOP
				PERFORM pg_sleep(0.02);
			END LOOP;
		END IF;
		RETURN NULL;
	END;
	$$;
	CREATE TRIGGER pause_claim AFTER UPDATE ON public.service_restart_requests
		FOR EACH ROW WHEN (NEW.service_name = 'pause_svc' AND NEW.status = 'failed')
		EXECUTE FUNCTION public.pause_claim();
});

my $late = request_restart($node, 'late_svc');
ok($node->poll_query_until('postgres',
	"SELECT status = 'pending' AND attempts = 1 FROM public.service_restart_requests WHERE id = '$late'"),
	'the first call of the late request fails; it waits, pending, for its deadline');

# An admin moves the service to the agent that listens, in a transaction left open: that
# locks the request's row.
my $admin = $node->background_psql('postgres');
$admin->query_safe('BEGIN');
$admin->query_safe(
	"SELECT restart_worker.register_service('late_svc', 'host1', p_cooldown => '0')");
is($admin->query_safe(
	"SELECT status || ' ' || attempts FROM public.service_restart_requests WHERE id = '$late'"),
	'pending 1', 'the admin holds the pending request\'s row');

my $pause = request_restart($node, 'pause_svc');
ok($node->poll_query_until('postgres',
	"SELECT status = 'pending' AND attempts = 1 FROM public.service_restart_requests WHERE id = '$pause'"),
	'the request whose failure pauses a claim waits, pending, for its deadline');

# Past its deadline and locked, the late request is due and cannot be taken: the claims
# look again a second later each time, not in a loop.
ok($node->poll_query_until('postgres',
	"SELECT now() > deadline_at + interval '500 ms' FROM public.service_restart_requests WHERE id = '$late'"),
	'the late request is past its deadline');
my ($polls, $since) = split /\|/, $node->safe_psql('postgres',
	"SELECT s.polls, now() FROM restart_worker.status() s");
ok($node->poll_query_until('postgres', "SELECT now() >= '$since'::timestamptz + interval '2 seconds'"),
	'two seconds pass');
my $more = $node->safe_psql('postgres', "SELECT polls - $polls FROM restart_worker.status()");
cmp_ok($more, '<=', 5, "the worker does not spin on the locked row ($more claims in two seconds)");
is($node->safe_psql('postgres',
	"SELECT status || ' ' || attempts FROM public.service_restart_requests WHERE id = '$late'"),
	'pending 1', 'the locked request was neither taken nor failed');

# At pause_svc's deadline a claim fails it, having skipped the locked request, and stops.
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker' AND wait_event = 'PgSleep'"),
	'a claim that failed the other late request is paused');
my $log_offset = -s $node->logfile;
$admin->query_safe('COMMIT');
$admin->quit;
$node->safe_psql('postgres', 'INSERT INTO public.claim_gate VALUES (true)');

ok(wait_status($node, $late, 'failed'), 'once the lock is gone the late request fails');
my $row = row_of($node, $late);
is($row->{error}, 'timed out (last error: could not connect to the agent)',
	'failed "timed out", with the error of its last call');
is($row->{attempts}, 1, 'with no call more: the paused claim did not take it');
ok(!$node->log_contains(qr/request \Q$late\E: call to agent/, $log_offset),
	'the worker made no call for it');
unlike(slurp($agent->{log}), qr/\Q$late\E/, 'the agent never heard of it');
is($node->safe_psql('postgres',
	"SELECT status || ': ' || error FROM public.service_restart_requests WHERE id = '$pause'"),
	'failed: timed out (last error: could not connect to the agent)',
	'the other late request failed "timed out"');

# The service's new agent was there all along.
my $id = request_restart($node, 'late_svc');
ok(wait_status($node, $id, 'completed'), 'a new request of the moved service completes');

$node->stop;
done_testing();
