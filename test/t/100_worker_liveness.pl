# The worker stays live while calls hang, and stays quiet while idle:
#  - idle, it runs no query but the safety-net poll (one transaction each) and writes no WAL;
#  - a request committed while calls to another agent hang is dispatched and completes at
#    once, with the safety-net poll at 10 minutes (only the COMMIT wake-up explains it);
#  - SIGHUP while calls hang: a new poll_interval takes effect at once;
#  - SIGTERM while calls hang (request_timeout 10 minutes): the worker exits, a new one
#    starts and sends the same request ids again.
# Nothing sleeps for a fixed time and nothing asserts timings: every wait is for a
# condition, with a deadline.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

# Calls hang for request_timeout: 10 minutes, far beyond every deadline of this test.
# Autovacuum is off so that nothing but the worker could write WAL or commit while it idles
# (wal_level is minimal: no standby snapshots either).
my $node = new_node('liveness', conf => <<CONF);
restart_worker.poll_interval = '1s'
restart_worker.request_timeout = '10min'
autovacuum = off
CONF

my $deadline = 30;    # s, for every wait below; far under request_timeout

sub worker_pid
{
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");
}

# restart_worker.status() as a hash, read from database $db.
sub status_of
{
	my ($db) = @_;
	my $json = $node->safe_psql($db // 'postgres',
		'SELECT row_to_json(s) FROM restart_worker.status() s');
	require JSON::PP;
	return JSON::PP::decode_json($json);
}

ok($node->poll_query_until('postgres',
	"SELECT state = 'idle' FROM restart_worker.status()"), 'the worker is idle');

# ---------------------------------------------------------------------------------------
# 1. Idle: only the safety-net poll, and no WAL.
#
# The test watches from another database, "observer", which has the extension too: its
# restart_worker.status() reads the same shared memory, so that the worker's database sees
# no transaction but the worker's own.  Each poll is one transaction there; a worker that
# ran more queries per poll (or a query per loop iteration) would commit more.
$node->safe_psql('postgres', 'CREATE DATABASE observer');
$node->safe_psql('observer', 'CREATE EXTENSION restart_worker');
my $worker = worker_pid();

my $snapshot_sql = <<SQL;
SELECT s.polls, s.wakeups, s.claimed, pg_current_wal_insert_lsn(),
       (SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres')
FROM restart_worker.status() s
SQL
sub idle_snapshot
{
	my %s;
	@s{qw(polls wakeups claimed lsn commits)} = split /\|/, $node->safe_psql('observer', $snapshot_sql);
	return \%s;
}

# Settle: a poll since the extension in "observer" was created (the worker's caches are
# warm, what came before is flushed), and no session of the test left in the worker's
# database (a backend flushes its counts as it exits, before it leaves pg_stat_activity).
my $p0 = status_of('observer')->{polls};
ok(wait_for(sub {
	$node->safe_psql('observer',
		"SELECT (SELECT polls FROM restart_worker.status()) >= $p0 + 1
		    AND NOT EXISTS (SELECT FROM pg_stat_activity
		                    WHERE datname = 'postgres' AND pid <> $worker)") eq 't'
}, $deadline), 'idle: settled (a poll done, no other session in the worker\'s database)');

my $before = idle_snapshot();
my $polls_wanted = 5;
ok(wait_for(sub { status_of('observer')->{polls} >= $before->{polls} + $polls_wanted }, $deadline),
	"idle: the safety-net poll ran $polls_wanted times (poll_interval 1s)");
my $after = idle_snapshot();
my $polls = $after->{polls} - $before->{polls};
my $commits = $after->{commits} - $before->{commits};

is($after->{lsn}, $before->{lsn}, "idle: no WAL written over $polls polls");
if ($after->{lsn} ne $before->{lsn})
{
	my $wal = $node->data_dir . '/pg_wal';
	diag(`pg_waldump -p $wal -s $before->{lsn} -e $after->{lsn} 2>&1`);
}
# Stats are flushed at most once a second: the first snapshot may miss a poll or two that
# the second one counts.  A worker committing twice per poll would exceed this.
ok($commits <= $polls + 2,
	"idle: transactions in the worker's database ($commits) no more than its polls ($polls) + 2");
ok($commits >= 1, "idle: the worker's polls are seen as transactions ($commits)");
is($after->{wakeups}, $before->{wakeups}, 'idle: no wake-up');
is($after->{claimed}, $before->{claimed}, 'idle: nothing claimed');
is(worker_pid(), $worker, 'idle: the same worker throughout');

# From here on the safety-net poll is 10 minutes.  The reload sets the worker's latch; the
# worker reads the new setting before the claim that follows the wake-up.
sub reloaded
{
	my ($wakeups_before) = @_;
	return $node->safe_psql('postgres',
		"SELECT wakeups > $wakeups_before AND last_poll >= last_wake FROM restart_worker.status()")
	  eq 't';
}
my $w0 = status_of()->{wakeups};
$node->safe_psql('postgres',
	"ALTER SYSTEM SET restart_worker.poll_interval = '10min'; SELECT pg_reload_conf()");
ok(wait_for(sub { reloaded($w0) }, $deadline),
	'poll_interval 10min: the worker was woken by SIGHUP');

# ---------------------------------------------------------------------------------------
# 2. A request committed while calls hang is dispatched at once.
#
# Agent A is a fake that holds the first $held calls without answering (the calls of a
# burst still in flight) and answers later ones with a completed job; agent B is a real
# agent.
my $held = 5;
my $fake = fake_agent(name => 'hold_a', answer => sub {
	my ($m, $p, $id, $n) = @_;
	return undef if $n <= $held;
	return [200, job_json($id)];
});
my $agent = start_agent(name => 'agent_b',
	services => qq{quick = ( { argv = [ "/bin/sh", "-c", "echo quick" ]; } );});
setup_registry($node, 'host_a', $fake->{url}, map { ("a$_" => '') } 1 .. $held);
setup_registry($node, 'host_b', $agent->{url}, quick => '');

# The burst is committed at once, in one transaction.
$node->safe_psql('postgres',
	"SELECT count(public.request_service_restart('a' || i)) FROM generate_series(1, $held) i");
my @a_ids = split /\n/, $node->safe_psql('postgres',
	"SELECT id FROM public.service_restart_requests WHERE service_name LIKE 'a%' ORDER BY id");
is(scalar(@a_ids), $held, "burst: $held requests to agent A");
ok(wait_for(sub { scalar(fake_calls($fake)) >= $held }, $deadline),
	"burst: agent A holds $held calls");
is(status_of()->{in_flight}, $held, "burst: the worker has $held calls in flight");
my $a_list = join ',', map { "'$_'" } @a_ids;
my $a_dispatching = "SELECT count(*) FROM public.service_restart_requests
	WHERE id IN ($a_list) AND status = 'dispatching' AND attempts = 1";

my $polls_before_b = status_of()->{polls};
my $b_id = request_restart($node, 'quick');
ok(wait_status($node, $b_id, 'completed', $deadline),
	"burst: a request to agent B committed meanwhile completes");
is($node->safe_psql('postgres', $a_dispatching), $held,
	"burst: when it completed, A's $held requests were still dispatching (first attempt)");
is(scalar(fake_calls($fake)), $held, 'burst: agent A got no other call');
is(status_of()->{in_flight}, $held, "burst: A's calls are still in flight");
is(row_of($node, $b_id)->{attempts}, 1, 'burst: B\'s request at its first attempt');

# ---------------------------------------------------------------------------------------
# 3. SIGHUP while calls hang: poll_interval 1s takes effect, the safety-net poll runs
# again and again (the reload's own wake-up accounts for one claim only).
my $p1 = status_of()->{polls};
$node->safe_psql('postgres',
	"ALTER SYSTEM SET restart_worker.poll_interval = '1s'; SELECT pg_reload_conf()");
ok(wait_for(sub { status_of()->{polls} >= $p1 + 3 }, $deadline),
	'SIGHUP while calls hang: the new poll_interval took effect');
is($node->safe_psql('postgres', $a_dispatching), $held,
	"SIGHUP: A's requests are still dispatching");
is(status_of()->{in_flight}, $held, 'SIGHUP: the calls are still in flight');
is(worker_pid(), $worker, 'SIGHUP: the same worker');

# ---------------------------------------------------------------------------------------
# 4. SIGTERM while calls hang: the worker exits long before request_timeout, a new one
# starts and sends the same ids again; agent A now answers them.  The safety-net poll is
# back at 10 minutes first, so that no poll's query notices the signal in its stead.
$w0 = status_of()->{wakeups};
$node->safe_psql('postgres',
	"ALTER SYSTEM SET restart_worker.poll_interval = '10min'; SELECT pg_reload_conf()");
ok(wait_for(sub { reloaded($w0) }, $deadline),
	'poll_interval 10min again: the worker was woken by SIGHUP');
kill 'TERM', $worker;
ok(wait_for(sub {
	!kill(0, $worker) && $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE pid = $worker") eq '0'
}, $deadline), 'SIGTERM while calls hang: the worker exits');
ok(wait_for(sub {
	my $p = worker_pid();
	$p ne '' && $p ne $worker;
}, $deadline), 'SIGTERM: a new worker starts');
for my $id (@a_ids)
{
	ok(wait_status($node, $id, 'completed', $deadline), "SIGTERM: request $id completes");
}
my @calls = fake_calls($fake);
is(scalar(@calls), 2 * $held, 'SIGTERM: agent A got each request twice');
for my $id (@a_ids)
{
	is(scalar(grep { $_ eq "POST /v1/restarts?wait=0.020 $id" } @calls), 2,
		"SIGTERM: request $id was sent again with the same id");
}

$node->stop;
done_testing();
