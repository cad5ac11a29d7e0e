# The worker's transactions run in READ COMMITTED whatever default_transaction_isolation
# says (here SERIALIZABLE for the whole cluster), and with standard_conforming_strings on
# whatever its database says (here off; the extension's PL/pgSQL, parsed in the worker's
# session, reads '\d' in a pattern as a backslash and a d only with it on).  Its claims
# and records, written for READ COMMITTED, never fail to serialise and take no predicate
# locks (so they take no part in the callers' serializable conflicts).  Before, under a
# stream of serializable callers they failed again and again, each failure holding the
# worker back a second or more.
# Also: with the database read-only (default_transaction_read_only), the worker writes
# nothing, and once the setting is lifted by a reload the request waiting meanwhile is
# dispatched.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;

use RestartWorkerTest;

my $n = 50;
my $services = join "\n", map { qq{s$_ = ( { argv = [ "/bin/true" ]; } );} } 1 .. $n;
my $agent = start_agent(name => 'agent_isolation', services => $services,
	limits => 'retention_max_jobs = 100000;');
my $node = new_node('isolation', conf => "default_transaction_isolation = 'serializable'\n");
setup_registry($node, 'h', $agent->{url});
$node->safe_psql('postgres',
	"SELECT count(restart_worker.register_service('s' || i, 'h', '0')) FROM generate_series(1, $n) i");
# And standard_conforming_strings off for the worker's database (a worker that connects
# anew takes it).
$node->safe_psql('postgres', 'ALTER DATABASE postgres SET standard_conforming_strings = off');
$node->restart;
is($node->safe_psql('postgres', 'SHOW default_transaction_isolation'), 'serializable',
	'sessions of this cluster are SERIALIZABLE by default');
is($node->safe_psql('postgres', 'SHOW standard_conforming_strings'), 'off',
	'sessions of its database have standard_conforming_strings off');
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
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
my $id = request_restart($node, 's1');
ok(wait_status($node, $id, 'completed'), 'a request completes');
ok($node->safe_psql('postgres',
	"SELECT count(*) > 0 FROM pg_locks WHERE mode = 'SIReadLock' AND pid = $open_pid"),
	'the open serializable transaction holds predicate locks (they can be seen)');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM pg_locks WHERE mode = 'SIReadLock' AND pid = $worker"),
	'0', 'the worker took none: its transactions are not SERIALIZABLE');
$open->query_safe('COMMIT');

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
ok($requests > 100, "many requests were accepted ($requests)");
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 0 FROM public.service_restart_requests WHERE status IN ('pending', 'dispatching', 'running')"),
	'every request ended');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM public.service_restart_requests WHERE status <> 'completed'"),
	'0', 'every request completed');
my @worker_errors = grep { /\[$worker\]/ && /ERROR|could not serialize|failed/ }
  split /\n/, substr(slurp($node->logfile), $log_offset);
is(scalar(@worker_errors), 0, 'the worker logged no error')
  or diag(join "\n", @worker_errors[0 .. ($#worker_errors < 5 ? $#worker_errors : 5)]);
is($node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	$worker, 'the same worker did it all');

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

# An answer judged in SQL: restart_worker.worker_record(), whose PL/pgSQL reads the job's
# time stamps with a pattern ('\d'), parsed in the worker's session.  An exit code written
# 0.0 is such an answer (the C path takes only digits).
my $fake = fake_agent(name => 'fake_isolation', answer => sub {
	my ($method, $path, $id) = @_;
	my $job = job_json($id, exit_code => 'EXIT');
	$job =~ s/"EXIT"/0.0/;
	return [ 202, $job ];
});
$node->safe_psql('postgres', qq{
	SELECT restart_worker.register_agent('fake', '$fake->{url}', '$SECRET');
	SELECT restart_worker.register_service('odd', 'fake', p_cooldown => '0');
});
$id = request_restart($node, 'odd');
ok(wait_status($node, $id, 'completed|failed'), 'a request whose answer is judged in SQL ended');
is($node->safe_psql('postgres',
	"SELECT status || ' ' || exit_code || ' ' || (started_at = '2026-11-26T05:00:00.1Z') "
	  . "|| ' ' || coalesce(error, '') FROM public.service_restart_requests WHERE id = '$id'"),
	'completed 0 true ', 'it completed, with the time its job started');

$node->stop;
done_testing();
