# Row locks held by someone else never freeze the worker: a due request locked in an open
# transaction is skipped (others are dispatched meanwhile) and taken once the lock is
# gone; an outcome whose row is locked is recorded once the lock is gone, while other
# requests go on.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $gate = "$tmp/locks.gate";

my $gated = gated_steps($gate);
my $agent = start_agent(
	name => 'agent_locks',
	services => <<"SVC");
quick = ( { argv = [ "/bin/sh", "-c", "echo quick" ]; } );
other = ( { argv = [ "/bin/sh", "-c", "echo other" ]; } );
gated = $gated;
SVC

my $node = new_node('locks');
setup_registry($node, 'host1', $agent->{url}, quick => '', other => '', gated => '');

# A pending request (agent down) locked by an admin: the worker skips it.
stop_agent($agent);
my $locked = request_restart($node, 'quick');
ok($node->poll_query_until('postgres',
	"SELECT status = 'pending' AND attempts >= 3 FROM public.service_restart_requests WHERE id = '$locked'"),
	'with the agent down the request waits, pending');
my $admin = $node->background_psql('postgres');
# Lock it while it is pending (not while the worker has it in flight).
ok(wait_for(sub {
	$admin->query_safe('BEGIN');
	my $s = $admin->query_safe(
		"SELECT status FROM public.service_restart_requests WHERE id = '$locked' FOR UPDATE");
	return 1 if $s =~ /pending/;
	$admin->query_safe('ROLLBACK');
	return 0;
}, 60), 'an admin locks the pending request in an open transaction');
restart_agent($agent);
# The locked request is due (its backoff over) before the other one is made, so that the
# claims that take the other one meet it; reading the row is not blocked by the lock.
ok($node->poll_query_until('postgres',
	"SELECT next_attempt_at <= now() FROM public.service_restart_requests WHERE id = '$locked'"),
	'the locked request is due');
my $log_offset = -s $node->logfile;
my $id = request_restart($node, 'other');
ok(wait_status($node, $id, 'completed'), 'another request completes while one row is locked');
is($node->safe_psql('postgres', "SELECT status FROM public.service_restart_requests WHERE id = '$locked'"),
	'pending', 'the locked request was skipped');
unlike(substr(slurp($node->logfile), $log_offset), qr/lock timeout/,
	'skipped, not waited for (no claim ran into the lock timeout)');
$admin->query_safe('COMMIT');
ok(wait_status($node, $locked, 'completed'), 'once the lock is gone it completes');

# A running job whose row is locked when its outcome comes back.
unlink $gate;
my $gated = request_restart($node, 'gated');
ok(wait_status($node, $gated, 'running'), 'the gated job runs');
$admin->query_safe('BEGIN');
$admin->query_safe("SELECT 1 FROM public.service_restart_requests WHERE id = '$gated' FOR UPDATE");
spew($gate, '');
# the agent's journal: one line "<id> <job object>" per record, the last one of an id is its state
ok(wait_for(sub {
	my ($last) = reverse grep { substr($_, 0, 37) eq "$gated " } split /\n/, slurp("$agent->{dir}/state/journal");
	return ($last // '') =~ /"status"\s*:\s*"completed"/;
}, 60), 'the job ends on the agent');
# The worker has its outcome (the long-poll was answered) before the next request is made.
ok(wait_for(sub {
	slurp($agent->{log}) =~ m{request GET /v1/restarts/\Q$gated\E\S* from \S+ id=\S+: 200 status of job \S+ \(completed\)};
}, 60), 'the worker got the outcome');
$log_offset = -s $node->logfile;
$id = request_restart($node, 'quick');
ok(wait_status($node, $id, 'completed'), 'another request completes while the outcome waits');
is($node->safe_psql('postgres', "SELECT status FROM public.service_restart_requests WHERE id = '$gated'"),
	'running', 'the locked row was not waited for');
unlike(substr(slurp($node->logfile), $log_offset), qr/lock timeout/,
	'no recording ran into the lock timeout');
$admin->query_safe('COMMIT');
$admin->quit;
ok(wait_status($node, $gated, 'completed'), 'once the lock is gone the outcome is recorded');

$node->stop;
done_testing();
