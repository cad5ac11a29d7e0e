# A pending request ends at its deadline even while every call slot of the worker is
# busy: with restart_worker.max_in_flight = 1 and a long job holding the slot, requests
# for other services wait pending for the slot, and each fails "timed out" once its
# deadline has passed, while the long job still runs.  A request committed after the
# worker looked for the next deadline is seen too (it wakes the worker), also when its
# own deadline comes first.  And while the slot stays busy for longer than the
# safety-net poll's interval, the worker goes on polling once per interval instead of
# spinning (it used to wait with a timeout of zero until a slot was free).
use strict;
use warnings;
use POSIX ();
use Time::HiRes ();
use Time::Local ();

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $gate = "$tmp/deadline.gate";
my $gated = gated_steps($gate);

my $agent = start_agent(
	name => 'agent_deadline',
	services => "long = $gated;\n"
	  . qq{late1 = ( { argv = [ "/bin/true" ]; } );\n}
	  . qq{late2 = ( { argv = [ "/bin/true" ]; } );});

my $node = new_node('deadline', conf => <<CONF);
restart_worker.max_in_flight = 1
CONF
setup_registry($node, 'host1', $agent->{url},
	long => '',
	late1 => "p_deadline => '10 seconds'",
	late2 => "p_deadline => '1 second'",
	late3 => "p_deadline => '3 seconds'",
	map { ("w$_" => '') } 1 .. 5);

my $long = request_restart($node, 'long');
ok(wait_status($node, $long, 'running'), 'the long job runs and holds the only slot');

# late1 first: the worker, woken, finds no free slot and looks for the next deadline
# (a look counts as a poll): late1's.  Then late2, whose deadline comes before late1's.
# (If that look began before late1 was committed, late1's wake-up makes the worker look
# again; either way late2 must fail first, at its own deadline: a worker that let a
# wake-up pass would fail it at late1's deadline, or never.)
my $polls = sub { $node->safe_psql('postgres', 'SELECT polls FROM restart_worker.status()') };
my $polls_before = $polls->();
my $late1 = request_restart($node, 'late1');
ok(wait_for(sub { $polls->() > $polls_before }, 30),
	'the worker looks for the next deadline while the slot is busy');
my $late2 = request_restart($node, 'late2');

ok(wait_status($node, $late2, 'failed', 30), 'late2 fails while waiting for the slot');
ok(wait_status($node, $late1, 'failed', 30), 'late1 fails while waiting for the slot');
is($node->safe_psql('postgres',
	"SELECT status FROM public.service_restart_requests WHERE id = '$long'"), 'running',
	'while the long job still runs');
for my $r ([ late1 => $late1 ], [ late2 => $late2 ])
{
	my ($name, $id) = @$r;
	my $row = row_of($node, $id);
	like($row->{error}, qr/^timed out/, "$name: the error says it timed out");
	is($row->{attempts}, 0, "$name: no call was made");
	is($node->safe_psql('postgres',
		"SELECT completed_at >= deadline_at FROM public.service_restart_requests"
		  . " WHERE id = '$id'"), 't', "$name: not before its deadline");
}
is($node->safe_psql('postgres',
	"SELECT count(*) FROM public.service_restart_requests WHERE id IN ('$late1', '$late2')"
	  . " AND completed_at < (SELECT completed_at FROM public.service_restart_requests"
	  . " WHERE id = '$late1')"), '1', 'late2, whose deadline came first, failed first');

# The poll every second while the slot stays busy: three polls, and little CPU meanwhile.
my $pid = $node->safe_psql('postgres', 'SELECT pid FROM restart_worker.status()');
my $cpu = sub {
	my @f = split ' ', (slurp("/proc/$pid/stat") =~ s/^.*\)\s*//sr);
	return ($f[11] + $f[12]) / POSIX::sysconf(POSIX::_SC_CLK_TCK);
};
$node->safe_psql('postgres', "ALTER SYSTEM SET restart_worker.poll_interval = '1s'");
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
$polls_before = $polls->();
my $cpu_before = $cpu->();
my $t0 = Time::HiRes::time();
ok(wait_for(sub { $polls->() >= $polls_before + 3 }, 60),
	'the safety-net poll goes on while the slot is busy');
my $used = $cpu->() - $cpu_before;
my $wall = Time::HiRes::time() - $t0;
cmp_ok($used, '<', $wall / 2,
	sprintf('the worker does not spin meanwhile (%.2f s of CPU in %.2f s)', $used, $wall));
is($node->safe_psql('postgres',
	"SELECT status FROM public.service_restart_requests WHERE id = '$long'"), 'running',
	'the long job still held the slot');

# A look that fails (here worker_fail_late() raises an error) is tried again later and
# later (1 s, then 2 s, ...): requests committed meanwhile do not make the worker try
# sooner, nor log the error once per request.  Once the look works again, the request
# past its deadline ends.
my $def = $node->safe_psql('postgres',
	"SELECT pg_get_functiondef('restart_worker.worker_fail_late(uuid[])'::regprocedure)");
$node->safe_psql('postgres', q{
	CREATE OR REPLACE FUNCTION restart_worker.worker_fail_late(p_exclude uuid[])
	RETURNS timestamptz LANGUAGE plpgsql
	AS $$ BEGIN RAISE EXCEPTION 'look broken on purpose'; END $$});
my $log_from = -s $node->logfile;
# The times of the failed looks logged so far, in seconds from the log's time stamps (their
# date included, so that a run across midnight is measured right).
my $tries = sub {
	my $log = substr(slurp($node->logfile), $log_from);
	my @at;
	push @at, Time::Local::timegm(0, $5, $4, $3, $2 - 1, $1) + $6
	  while $log =~ /^(\d+)-(\d+)-(\d+) (\d+):(\d+):([\d.]+) \S+ .*look broken on purpose/mg;
	return @at;
};
my $late3 = request_restart($node, 'late3');
ok(wait_for(sub { $tries->() >= 1 }, 30), 'the look fails');
my @wakers = map { request_restart($node, "w$_") } 1 .. 5;
ok(wait_for(sub { $tries->() >= 2 }, 30), 'and is tried again');
my @t = $tries->();
cmp_ok($t[1] - $t[0], '>=', 0.5,
	'a second later, however many requests were committed meanwhile (five)');
$node->safe_psql('postgres', $def);
ok(wait_status($node, $late3, 'failed', 30), 'once the look works again, late3 fails');
like(row_of($node, $late3)->{error}, qr/^timed out/, 'timed out');
$node->safe_psql('postgres', "SELECT restart_worker.cancel_request('$_')") for @wakers;

spew($gate, '');
ok(wait_status($node, $long, 'completed'), 'the long job is followed to its end');
unlike(slurp($agent->{log}), qr/service late[12]/, 'the agent never got the requests that timed out');

$node->stop;
stop_agent($agent);
done_testing();
