# The worker pins the session settings its statements are written for, whatever the
# cluster, its database or its role says.  Here the cluster is SERIALIZABLE by default,
# its database has standard_conforming_strings off, and its role (no superuser) has
# row_security off, exit_on_error on and session_replication_role replica.  Before, each
# of these broke it: under SERIALIZABLE its claims and records failed to serialise
# against the callers' requests (each failure holding it back a second or more); with
# row_security off every claim failed; with exit_on_error on, an error it catches on
# purpose (an answer that is not JSON) made it exit, again and again; as a replica its
# updates announced nothing; and the extension's PL/pgSQL it runs read '\d' in a pattern
# as 'd' (an answer judged in SQL was never recorded).  And its claims read and update the
# requests through indexes under the row level security that applies to such a role, and
# are not compiled with JIT (before 1.12 each claim scanned the table, and was compiled:
# a second of CPU a claim).  Also: with the database read-only
# (default_transaction_read_only, which it honours) the worker writes nothing, and once
# the setting is lifted by a reload the request waiting meanwhile is dispatched.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;

use RestartWorkerTest;

my $n = 50;
my $services = join "\n", map { qq{s$_ = ( { argv = [ "/bin/true" ]; } );} } 1 .. $n;
my $agent = start_agent(name => 'agent_settings', services => $services,
	limits => 'retention_max_jobs = 100000;');
my $node = new_node('settings', conf => <<'CONF');
default_transaction_isolation = 'serializable'
shared_preload_libraries = 'restart_worker,auto_explain'
CONF
setup_registry($node, 'h', $agent->{url});
$node->safe_psql('postgres',
	"SELECT count(restart_worker.register_service('s' || i, 'h', '0')) FROM generate_series(1, $n) i");
ok(worker_as_role($node), 'the worker runs as a role that is no superuser');
$node->safe_psql('postgres', q{
	ALTER ROLE rw_worker SET row_security = off;
	ALTER ROLE rw_worker SET exit_on_error = on;
	ALTER ROLE rw_worker SET session_replication_role = replica;
	ALTER DATABASE postgres SET standard_conforming_strings = off;
});
$node->restart;
is($node->safe_psql('postgres',
	"SELECT concat_ws(' ', current_setting('default_transaction_isolation'), "
	  . "current_setting('standard_conforming_strings'), current_setting('row_security'), "
	  . "current_setting('exit_on_error'), current_setting('session_replication_role'))",
	extra_params => [ '-U', 'rw_worker' ]),
	'serializable off off on replica', "the worker's role gets these settings when it logs in");
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker' AND usename = 'rw_worker'"),
	'the worker runs');
my $worker = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");

# A serializable transaction left open keeps the predicate locks (SIReadLock) of every
# serializable transaction that overlaps it, committed or not: a worker transaction in
# SERIALIZABLE would leave its own in pg_locks until this one ends.
my $open = $node->background_psql('postgres');
$open->query_safe('BEGIN');
$open->query_safe('SELECT count(*) FROM public.service_restart_requests');
my $open_pid = $open->query_safe('SELECT pg_backend_pid()');
my $listen = $node->background_psql('postgres');
$listen->query_safe('LISTEN restart_worker');
my $id = request_restart($node, 's1');
ok(wait_status($node, $id, 'completed'), 'a request completes');
ok($node->safe_psql('postgres',
	"SELECT count(*) > 0 FROM pg_locks WHERE mode = 'SIReadLock' AND pid = $open_pid"),
	'the open serializable transaction holds predicate locks (they can be seen)');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM pg_locks WHERE mode = 'SIReadLock' AND pid = $worker"),
	'0', 'the worker took none: its transactions are not SERIALIZABLE');
$open->query_safe('COMMIT');
my $heard = '';
ok(wait_for(sub {
	$heard .= $listen->query_safe('SELECT 1');
	return $heard =~ /"id" : "$id", "service_name" : "s1", "status" : "completed"/;
}), "the worker's update announced the end (its triggers fired)");
$listen->quit;

# Callers in SERIALIZABLE requesting restarts as fast as they can for a few seconds while
# the worker claims and records: the worker never fails to serialise.  (Callers may fail
# among themselves with 40001 when two ask for one service at once, as documented.)
my $log_offset = -s $node->logfile;
my $script = "$PostgreSQL::Test::Utils::tmp_check/request.sql";
spew($script, <<'SQL');
\set s random(1, 50)
DO $$ BEGIN PERFORM public.request_service_restart('s' || :s); EXCEPTION WHEN SQLSTATE 'PT409' OR SQLSTATE 'PT429' THEN NULL; END $$;
SQL
my ($out, $err) = ('', '');
IPC::Run::run([ 'pgbench', '-n', '-c', '4', '-T', '5', '--max-tries=1', '-f', $script,
	'-h', $node->host, '-p', $node->port, 'postgres' ], '>', \$out, '2>', \$err);
my ($made) = $out =~ /number of transactions actually processed: (\d+)/;
ok(($made // 0) > 0, "the callers made their requests (" . ($made // 0) . " calls)");
my $requests = $node->safe_psql('postgres', 'SELECT count(*) FROM public.service_restart_requests');
ok($requests > 1, "requests were accepted meanwhile ($requests)");
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 0 FROM public.service_restart_requests WHERE status IN ('pending', 'dispatching', 'running')"),
	'every request ended');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM public.service_restart_requests WHERE status <> 'completed'"),
	'0', 'every request completed');
my @worker_errors = grep { /\[$worker\]/ && /ERROR|FATAL|could not serialize|failed/ }
  split /\n/, substr(slurp($node->logfile), $log_offset);
is(scalar(@worker_errors), 0, 'the worker logged no error')
  or diag(join "\n", @worker_errors[0 .. ($#worker_errors < 5 ? $#worker_errors : 5)]);

# A read-only database: the worker's claim fails (it writes), is logged and tried again
# later; lifting the setting with a reload lets the waiting request go.
$node->append_conf('postgresql.conf', "default_transaction_read_only = on\n");
$node->reload;
ok($node->poll_query_until('postgres', 'SHOW default_transaction_read_only', 'on'),
	'the database is read-only');
$log_offset = -s $node->logfile;
$id = $node->safe_psql('postgres', q{
	SET default_transaction_read_only = off;
	SELECT id FROM public.request_service_restart('s2')});
ok(wait_for(sub {
	substr(slurp($node->logfile), $log_offset) =~ /\[$worker\] ERROR:  cannot execute [A-Z ]+ in a read-only transaction/;
}), 'the worker cannot claim in a read-only database, and says why');
is($node->safe_psql('postgres', "SELECT status FROM public.service_restart_requests WHERE id = '$id'"),
	'pending', 'the request waits, pending');
$node->adjust_conf('postgresql.conf', 'default_transaction_read_only', 'off');
$node->reload;
ok(wait_status($node, $id, 'completed'), 'once the database may be written again, it completes');

# Answers judged in SQL by restart_worker.worker_record(), whose PL/pgSQL reads the job's
# time stamps with a pattern ('\d') and catches the error of an answer that is not JSON.
# An exit code written 0.0 is such an answer (the C path takes only digits).
my $fake = fake_agent(name => 'fake_settings', answer => sub {
	my ($method, $path, $id, $n) = @_;
	return [ 202, 'not json' ] if $n == 1;
	my $job = job_json($id, exit_code => 'EXIT');
	$job =~ s/"EXIT"/0.0/;
	return [ 202, $job ];
});
$node->safe_psql('postgres', qq{
	SELECT restart_worker.register_agent('fake', '$fake->{url}', '$SECRET');
	SELECT restart_worker.register_service('odd', 'fake', p_cooldown => '0');
});
$id = request_restart($node, 'odd');
ok(wait_status($node, $id, 'failed'), 'a request whose answer is not JSON fails');
like($node->safe_psql('postgres', "SELECT error FROM public.service_restart_requests WHERE id = '$id'"),
	qr/^invalid answer from the agent \(HTTP 202\)/, 'as an invalid answer');
$id = request_restart($node, 'odd');
ok(wait_status($node, $id, 'completed|failed'), 'a request whose answer is judged in SQL ended');
is($node->safe_psql('postgres',
	"SELECT status || ' ' || exit_code || ' ' || (started_at = '2026-11-26T05:00:00.1Z') "
	  . "|| ' ' || coalesce(error, '') FROM public.service_restart_requests WHERE id = '$id'"),
	'completed 0 true ', 'it completed, with the time its job started');
# The worker's own plans, logged by auto_explain from the next reload on: its claims read
# and update the requests through indexes (before 1.12 the claim's update scanned the
# whole table under row level security, which applies to a role that is no superuser, and
# the plan's cost had it compiled with JIT at each claim: about a second of CPU), and
# nothing of it is compiled with JIT.
$node->append_conf('postgresql.conf',
	"auto_explain.log_min_duration = 0\nauto_explain.log_nested_statements = on\n");
$node->reload;
$log_offset = -s $node->logfile;
my @plans;
ok(wait_for(sub {
	my $id = request_restart($node, 's4');
	wait_status($node, $id, 'completed');
	# a log entry: its first line and the lines that go on it (tab-indented)
	@plans = grep { /^\S+ \S+ \S+ \[$worker\] LOG:  duration: .* plan:/ }
	  split /\n(?=\S)/, substr(slurp($node->logfile), $log_offset);
	return grep { /attempts = q.attempts \+ 1/ } @plans;
}), "the worker's plans are logged, its claim's among them");
my @scans = grep { /Seq Scan on service_restart_requests/ } @plans;
is(scalar(@scans), 0, "no plan of the worker scans the requests table")
  or diag($scans[0]);
ok((grep { /attempts = q.attempts \+ 1/ && /service_restart_requests_pkey/ } @plans),
	"the claim updates the rows it claims through the primary key");
is(scalar(grep { /\n\s*JIT:/ } @plans), 0, 'nothing of the worker is compiled with JIT');

is($node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	$worker, 'the same worker did it all');

$node->stop;
done_testing();
