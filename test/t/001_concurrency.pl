# Requests made at the same instant: exactly one row per service, the others PT409.
# Also checks that installing tells PostgREST to reload its schema cache.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;

my $sessions = 8;

my $node = PostgreSQL::Test::Cluster->new('concurrency');
$node->init;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'restart_worker'\n");
$node->start;

# A database the worker does not serve: these rows must stay as the requests left them.
$node->safe_psql('postgres', 'CREATE DATABASE conc');

my ($out, $err) = ('', '');
$node->psql('conc', "LISTEN pgrst;\nCREATE EXTENSION restart_worker;",
	stdout => \$out, stderr => \$err, on_error_die => 1);
like($out, qr/Asynchronous notification "pgrst" with payload "reload schema"/,
	'CREATE EXTENSION asks PostgREST to reload its schema cache');

$node->safe_psql('conc', q{
	SELECT restart_worker.register_agent('h', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
	SELECT restart_worker.register_service('svc', 'h', '0');
	SELECT restart_worker.register_service('svc-' || i, 'h', '0') FROM generate_series(1, 8) i;
});

# Start $sessions psql processes that each request a restart of the service returned by
# $service->(i), all blocked behind a lock on the registry that a controlling session
# holds; release them together and return their outputs.
sub race
{
	my ($service, $isolation) = @_;
	my $ctl = $node->background_psql('conc');
	$ctl->query_safe('BEGIN');
	$ctl->query_safe('LOCK TABLE restart_worker.services IN EXCLUSIVE MODE');

	my (@h, @out, @err);
	for my $i (1 .. $sessions)
	{
		($out[$i], $err[$i]) = ('', '');
		local $ENV{PGOPTIONS} = "-c default_transaction_isolation=$isolation";
		my $svc = $service->($i);
		$h[$i] = IPC::Run::start(
			[
				'psql', '-X', '-A', '-t', '-v', 'VERBOSITY=verbose',
				'-d', $node->connstr('conc'),
				'-c', "SELECT status FROM request_service_restart('$svc')"
			],
			'>', \$out[$i], '2>', \$err[$i]);
	}
	ok( $node->poll_query_until('conc',
			"SELECT count(*) = $sessions FROM pg_stat_activity "
			  . "WHERE wait_event_type = 'Lock' AND query LIKE '%request_service_restart%'"),
		"all $sessions sessions wait at the same point");
	$ctl->query_safe('COMMIT');
	$ctl->quit;
	$_->finish for @h[1 .. $sessions];
	return map { [ $out[$_], $err[$_] ] } 1 .. $sessions;
}

# Count the sessions that got a row and those refused.  With a transaction-wide snapshot
# (REPEATABLE READ, SERIALIZABLE) a loser cannot see the winner's row: it fails with 40001
# and a retry gets PT409.
sub tally
{
	my ($refusal, @results) = @_;
	my ($won, $refused, $other) = (0, 0, 0);
	for my $r (@results)
	{
		if ($r->[0] =~ /^pending$/m) { $won++ }
		elsif ($r->[1] =~ $refusal) { $refused++ }
		else { $other++; diag("unexpected: $r->[0] $r->[1]") }
	}
	return ($won, $refused, $other);
}

for my $isolation ('read\ committed', 'repeatable\ read', 'serializable')
{
	(my $label = $isolation) =~ s/\\//g;
	$node->safe_psql('conc', "DELETE FROM service_restart_requests");
	my $refusal = qr/ERROR:\s+PT409: A restart request is already pending/;
	$refusal = qr/ERROR:\s+(PT409: A restart request is already pending|40001: could not serialize)/
	  if $label ne 'read committed';
	my ($won, $refused, $other) = tally($refusal, race(sub { 'svc' }, $isolation));
	is($won, 1, "$label: exactly one session's request is accepted");
	is($refused, $sessions - 1, "$label: the others are refused");
	is($other, 0, "$label: no other outcome");
	is($node->safe_psql('conc', "SELECT count(*) FROM service_restart_requests WHERE service_name = 'svc'"),
		'1', "$label: exactly one row was written");
}

# A caller whose snapshot is older than another request cannot miss that request and
# its cooldown: it fails to serialise instead of being accepted.
$node->safe_psql('conc', "DELETE FROM service_restart_requests");
$node->safe_psql('conc', "SELECT restart_worker.register_service('svc', 'h', '1 hour')");
my $old = $node->background_psql('conc', on_error_stop => 0);
$old->query_safe('BEGIN ISOLATION LEVEL REPEATABLE READ');
$old->query_safe('SELECT count(*) FROM service_restart_requests');
$node->safe_psql('conc', q{
	SELECT request_service_restart('svc');
	UPDATE service_restart_requests SET status = 'completed', dispatched_at = now(), completed_at = now();
});
$old->query("SELECT status FROM request_service_restart('svc')");
like($old->{stderr}, qr/could not serialize access/,
	'a stale snapshot cannot slip past a newer request and its cooldown');
$old->query('ROLLBACK');
$old->quit;
is($node->safe_psql('conc', "SELECT count(*) FROM service_restart_requests"), '1',
	'the stale request wrote nothing');
$node->safe_psql('conc', "SELECT restart_worker.register_service('svc', 'h', '0')");

# Requests for different services do not get in each other's way.
$node->safe_psql('conc', "DELETE FROM service_restart_requests");
my ($won, $refused, $other) = tally(qr/^$/, race(sub { "svc-$_[0]" }, 'read\ committed'));
is($won, $sessions, 'requests for different services made at once are all accepted');
is($node->safe_psql('conc', "SELECT count(DISTINCT service_name) FROM service_restart_requests"),
	$sessions, 'one row for each service');

# A row written beside the API (an admin's INSERT, not committed yet) while a request is
# made: the request waits at the index that allows one active request per service and,
# once the row is committed, is refused with PT409, saying that another request was made
# at the same time.
$node->safe_psql('conc', "DELETE FROM service_restart_requests");
my $admin = $node->background_psql('conc');
$admin->query_safe('BEGIN');
$admin->query_safe(q{INSERT INTO service_restart_requests (service_name, requested_by_role, deadline_at)
	VALUES ('svc', 'postgres', now() + interval '1 hour')});
my ($o, $e) = ('', '');
my $h = IPC::Run::start(
	[
		'psql', '-X', '-A', '-t', '-v', 'VERBOSITY=verbose', '-d', $node->connstr('conc'),
		'-c', "SELECT status FROM request_service_restart('svc')"
	],
	'>', \$o, '2>', \$e);
ok( $node->poll_query_until('conc',
		"SELECT count(*) = 1 FROM pg_stat_activity "
		  . "WHERE wait_event_type = 'Lock' AND query LIKE '%request_service_restart%'"),
	'the request waits for the row not yet committed');
$admin->query_safe('COMMIT');
$admin->quit;
$h->finish;
like($e, qr/ERROR:\s+PT409: A restart request is already pending/, 'then it is refused with PT409');
like($e, qr/DETAIL:\s+Another request for service "svc" was made at the same time/,
	'saying that another request was made at the same time');
is($node->safe_psql('conc', "SELECT count(*) FROM service_restart_requests"), '1',
	'and writes nothing');

# Start psql running $sql in the background; returns its handle and a reference to its
# standard error.
sub start_psql
{
	my ($sql) = @_;
	my ($o, $e) = ('', '');
	my $h = IPC::Run::start(
		[ 'psql', '-X', '-A', '-t', '-v', 'VERBOSITY=verbose', '-d', $node->connstr('conc'), '-c', $sql ],
		'>', \$o, '2>', \$e);
	return ($h, \$e);
}

# remove_agent() and register_service() for the same agent at the same time end in the
# documented errors, never in a foreign key violation (23503, before 1.10), whichever
# comes first; each waits for the other's transaction.
$node->safe_psql('conc', q{
	SELECT restart_worker.register_agent('h-new', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
	SELECT restart_worker.register_agent('h-gone', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
});

# A service given to the agent, not committed yet, while the agent is removed: the removal
# waits, then sees the service and refuses (2BP01).
my $reg = $node->background_psql('conc');
$reg->query_safe('BEGIN');
$reg->query_safe("SELECT restart_worker.register_service('svc-new', 'h-new', '0')");
my ($rh, $re) = start_psql("SELECT restart_worker.remove_agent('h-new')");
ok( $node->poll_query_until('conc',
		"SELECT count(*) = 1 FROM pg_stat_activity "
		  . "WHERE wait_event_type = 'Lock' AND query LIKE '%remove_agent%'"),
	'remove_agent() waits for a register_service() of the agent not yet committed');
$reg->query_safe('COMMIT');
$reg->quit;
$rh->finish;
like($$re, qr/ERROR:\s+2BP01: agent "h-new" still serves services: svc-new/,
	'then it refuses with 2BP01, naming the new service');
is($node->safe_psql('conc', "SELECT agent FROM restart_worker.services WHERE name = 'svc-new'"),
	'h-new', 'the agent and its new service stay');

# The agent removed, not committed yet, while a service is given to it: the registration
# waits, then finds the agent unknown (22023).
my $rem = $node->background_psql('conc');
$rem->query_safe('BEGIN');
$rem->query_safe("SELECT restart_worker.remove_agent('h-gone')");
($rh, $re) = start_psql("SELECT restart_worker.register_service('svc-gone', 'h-gone', '0')");
ok( $node->poll_query_until('conc',
		"SELECT count(*) = 1 FROM pg_stat_activity "
		  . "WHERE wait_event_type = 'Lock' AND query LIKE '%register_service%'"),
	'register_service() waits for a remove_agent() of its agent not yet committed');
$rem->query_safe('COMMIT');
$rem->quit;
$rh->finish;
like($$re, qr/ERROR:\s+22023: unknown agent "h-gone"/, 'then it finds the agent unknown (22023)');
is($node->safe_psql('conc',
	"SELECT count(*) FROM restart_worker.agents a FULL JOIN restart_worker.services s ON s.agent = a.name "
	  . "WHERE a.name = 'h-gone' OR s.name = 'svc-gone'"),
	'0', 'the agent is gone and no service was made');

# With a transaction-wide snapshot (REPEATABLE READ, SERIALIZABLE) the one that waited
# cannot see what the other committed: it fails to serialise (40001; retried, it gives the
# error above), never with a foreign key violation (23503).
$node->safe_psql('conc', q{
	SELECT restart_worker.register_agent('h-rr', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
	SELECT restart_worker.register_agent('h-rr-gone', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
});
$reg = $node->background_psql('conc');
$reg->query_safe('BEGIN');
$reg->query_safe("SELECT restart_worker.register_service('svc-rr', 'h-rr', '0')");
($rh, $re) = start_psql('BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM restart_worker.agents; '
	  . "SELECT restart_worker.remove_agent('h-rr'); COMMIT");
ok( $node->poll_query_until('conc',
		"SELECT count(*) = 1 FROM pg_stat_activity "
		  . "WHERE wait_event_type = 'Lock' AND query LIKE '%remove_agent%'"),
	'REPEATABLE READ: remove_agent() waits for a register_service() of the agent');
$reg->query_safe('COMMIT');
$reg->quit;
$rh->finish;
like($$re, qr/ERROR:\s+40001: /, 'REPEATABLE READ: then it fails to serialise (40001)');
is($node->safe_psql('conc', "SELECT agent FROM restart_worker.services WHERE name = 'svc-rr'"),
	'h-rr', 'REPEATABLE READ: the agent and its new service stay');

$rem = $node->background_psql('conc');
$rem->query_safe('BEGIN');
$rem->query_safe("SELECT restart_worker.remove_agent('h-rr-gone')");
($rh, $re) = start_psql('BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM restart_worker.agents; '
	  . "SELECT restart_worker.register_service('svc-rr-gone', 'h-rr-gone', '0'); COMMIT");
ok( $node->poll_query_until('conc',
		"SELECT count(*) = 1 FROM pg_stat_activity "
		  . "WHERE wait_event_type = 'Lock' AND query LIKE '%register_service%'"),
	'REPEATABLE READ: register_service() waits for a remove_agent() of its agent');
$rem->query_safe('COMMIT');
$rem->quit;
$rh->finish;
like($$re, qr/ERROR:\s+40001: /, 'REPEATABLE READ: then it fails to serialise (40001)');
is($node->safe_psql('conc', "SELECT count(*) FROM restart_worker.services WHERE name = 'svc-rr-gone'"),
	'0', 'REPEATABLE READ: no service was made');

$node->stop;
done_testing();
