# Agents on unix sockets (register_agent with a unix: URL): requests reach them and are
# followed to their end, and each agent has restart_worker.max_connections_per_agent
# connections of its own.  libcurl counts connections per host name and port, and the
# worker used to name every unix agent "localhost": two of them shared one limit, so that
# with 2 connections each and a long job followed on each agent, both connections went to
# the long-polls and a new request's POST waited for one of them to come back.
use strict;
use warnings;

use File::Temp qw(tempdir);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $gate = "$tmp/unix.gate";
my $gated = gated_steps($gate);
# A short directory: a unix socket's path has room for about 100 bytes.
my $sockdir = tempdir('rwsockXXXXXX', TMPDIR => 1, CLEANUP => 1);

my $a = start_agent(
	name => 'agent_unix_a',
	unix => "$sockdir/a.sock",
	services => "long_a = $gated;\n" . qq{quick = ( { argv = [ "/bin/sh", "-c", "echo quick" ]; } );});
my $b = start_agent(
	name => 'agent_unix_b',
	unix => "$sockdir/b.sock",
	services => "long_b = $gated;");

my $node = new_node('unix', conf => <<CONF);
restart_worker.max_connections_per_agent = 2
restart_worker.follow_wait = '10s'
CONF
setup_registry($node, 'host_a', $a->{url}, long_a => '', quick => '');
$node->safe_psql('postgres',
	"SELECT restart_worker.register_agent('host_b', '$b->{url}', '$RestartWorkerTest::SECRET')");
$node->safe_psql('postgres',
	"SELECT restart_worker.register_service('long_b', 'host_b', p_cooldown => '0')");

my $long_a = request_restart($node, 'long_a');
my $long_b = request_restart($node, 'long_b');
ok(wait_status($node, $long_a, 'running'), 'a job runs on the first unix-socket agent');
ok(wait_status($node, $long_b, 'running'), 'a job runs on the second');

# Each long job is followed with a long-poll that holds one connection for up to 10 s.
my $quick = request_restart($node, 'quick');
ok(wait_status($node, $quick, 'completed', 30), 'a new request to the first agent completes');
my $row = row_of($node, $quick);
is($row->{attempts}, 1, 'at the first attempt');
like($row->{output}, qr/^quick$/m, 'with the output of its step');
is($node->safe_psql('postgres',
	"SELECT string_agg(status, ',' ORDER BY service_name) FROM public.service_restart_requests"
	  . " WHERE id IN ('$long_a', '$long_b')"), 'running,running',
	'while both long jobs still run');
cmp_ok($node->safe_psql('postgres', 'SELECT max_sockets FROM restart_worker.status()'),
	'>=', 3,
	'the worker had connections of its own to each agent (two to the first, one to the second)');
is($node->safe_psql('postgres', 'SELECT call_errors FROM restart_worker.status()'), '0',
	'no call failed');

spew($gate, '');
ok(wait_status($node, $long_a, 'completed'), 'the long job on the first agent completes');
ok(wait_status($node, $long_b, 'completed'), 'the long job on the second agent completes');

$node->stop;
done_testing();
