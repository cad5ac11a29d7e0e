# Calls in flight move on while commits keep waking the worker.  Each commit of a new
# request sets the worker's latch, and PostgreSQL 15 and 16 have WaitEventSetWait() report
# a set latch alone, without looking at the sockets: when commits come faster than the
# worker's turns, a call whose connection is being made or whose answer has arrived waits
# until the commits pause (src/worker.c now looks at the sockets once more, the latch
# left out).  In bench/run's back-to-back requests such waits reached 50 ms.
#
# A procedure commits, as fast as it can, transactions that wake the worker (each runs an
# insert of no row, whose statement trigger marks it, so that there is nothing to
# dispatch) for STREAM seconds.  Meanwhile another session makes COUNT requests one after
# the other, each once the one before completed.  They must all complete before the stream
# ends: here they took 3 s (the stream lasts ten times that), and more than 20 s when the
# worker looked at its sockets only when its latch happened not to be set (a few times a
# second).  That bound is the test's only timing; every other wait has a deadline.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;

use RestartWorkerTest;

my $STREAM = 30;    # seconds of commits
my $COUNT = 200;    # requests made one after the other meanwhile

my $agent = start_agent(
	name => 'agent_stream',
	services => "svc1 = ( { argv = [ \"/bin/echo\", \"restarted\" ]; } );\n");

# No safety-net poll during the test: only wake-ups and sockets drive the worker.
my $node = new_node('stream', conf => "restart_worker.poll_interval = '1h'");
setup_registry($node, 'host1', $agent->{url}, svc1 => '');

$node->safe_psql('postgres', <<'SQL');
CREATE TABLE stream_log (ended_at timestamptz, commits integer);
CREATE TABLE requests_log (started_at timestamptz, ended_at timestamptz, completed integer);

CREATE PROCEDURE commit_stream(p_seconds float8)
LANGUAGE plpgsql AS $$
DECLARE
	v_end	timestamptz := clock_timestamp() + make_interval(secs => p_seconds);
	v_n		integer := 0;
BEGIN
	WHILE clock_timestamp() < v_end LOOP
		-- No row: the insert's statement trigger still marks the transaction, whose
		-- commit wakes the worker.
		INSERT INTO public.service_restart_requests
			SELECT * FROM public.service_restart_requests WHERE false;
		COMMIT;
		v_n := v_n + 1;
	END LOOP;
	INSERT INTO stream_log VALUES (clock_timestamp(), v_n);
	COMMIT;
END $$;

-- p_count requests of p_service, each made once the one before completed; each must
-- complete within p_timeout seconds.
CREATE PROCEDURE requests_in_turn(p_service text, p_count integer, p_timeout float8)
LANGUAGE plpgsql AS $$
DECLARE
	v_start		timestamptz := clock_timestamp();
	v_id		uuid;
	v_until		timestamptz;
BEGIN
	FOR i IN 1 .. p_count LOOP
		SELECT id INTO v_id FROM public.request_service_restart(p_service);
		COMMIT;
		v_until := clock_timestamp() + make_interval(secs => p_timeout);
		WHILE (SELECT status FROM public.service_restart_requests WHERE id = v_id)
				IS DISTINCT FROM 'completed' LOOP
			IF clock_timestamp() > v_until THEN
				RAISE EXCEPTION 'request % of % not completed within % s', i, p_count, p_timeout;
			END IF;
			PERFORM pg_sleep(0.001);
		END LOOP;
	END LOOP;
	INSERT INTO requests_log VALUES (v_start, clock_timestamp(), p_count);
	COMMIT;
END $$;
SQL

# A first request opens a connection that stays open (kept alive) for the next.
my $first = request_restart($node, 'svc1');
ok(wait_status($node, $first, 'completed'), 'a request completes before the stream');

my $wakeups0 = $node->safe_psql('postgres', 'SELECT restart_worker.commit_wakeups()');
my ($out, $err) = ('', '');
my $stream = IPC::Run::start(
	[ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
	  '-c', "CALL commit_stream($STREAM)" ],
	'>', \$out, '2>', \$err,
	IPC::Run::timeout($STREAM + $PostgreSQL::Test::Utils::timeout_default));
ok($node->poll_query_until('postgres',
	"SELECT restart_worker.commit_wakeups() >= $wakeups0 + 1000"),
	'the stream of commits is under way');

my ($rc, $stdout, $stderr) = $node->psql('postgres', "CALL requests_in_turn('svc1', $COUNT, 10)");
is($rc, 0, "$COUNT requests made one after the other during the stream completed")
  or diag($stderr);
ok($stream->finish, 'the stream ended without an error') or diag($err);

my ($in_time, $took, $commits) = split /\|/, $node->safe_psql('postgres',
	'SELECT r.ended_at < s.ended_at, round(extract(epoch FROM r.ended_at - r.started_at)::numeric, 1),
	        s.commits
	 FROM requests_log r, stream_log s');
is($in_time, 't',
	"all of them before the stream ended (they took $took s; $commits commits in $STREAM s)");
is($node->safe_psql('postgres',
	"SELECT count(*) FROM public.service_restart_requests WHERE status = 'completed'
	   AND output LIKE '%restarted%'"), $COUNT + 1,
	'every request completed with its step\'s output');

done_testing();
