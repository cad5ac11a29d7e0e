# pg_dump and restore keep the registry, the request history and who may administer:
# the registry and requests are configuration tables of the extension, and admin rights
# are plain grants that the dump carries (the row level security policies are fixed).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('dump');
$node->init;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'restart_worker'\n");
$node->start;

# Databases the worker does not serve, so the rows stay as written here.
$node->safe_psql('postgres', 'CREATE DATABASE src');
$node->safe_psql('postgres', 'CREATE DATABASE dst');
$node->safe_psql('src', q{
	CREATE EXTENSION restart_worker;
	CREATE ROLE ops LOGIN;
	CREATE ROLE viewer LOGIN;
	SELECT restart_worker.grant_admin('ops');
	SELECT restart_worker.grant_requester('viewer');
	SELECT restart_worker.register_agent('h', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
	SELECT restart_worker.register_service('svc', 'h', '10 minutes', 'the service');
	SELECT request_service_restart('svc');
	UPDATE service_restart_requests SET status = 'completed', dispatched_at = now(), completed_at = now();
});

my $dump = $node->basedir . '/src.sql';
$node->command_ok([ 'pg_dump', '-d', $node->connstr('src'), '-f', $dump ], 'pg_dump of a database with the extension');
$node->command_ok([ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-q', '-d', $node->connstr('dst'), '-f', $dump ],
	'the dump restores without errors');

is($node->safe_psql('dst', 'SELECT name, url FROM restart_worker.agents'),
	'h|http://127.0.0.1:9', 'the agents are restored');
is($node->safe_psql('dst', 'SELECT name, agent, cooldown, description FROM restart_worker.services'),
	'svc|h|00:10:00|the service', 'the services are restored');
is($node->safe_psql('dst', 'SELECT service_name, status FROM service_restart_requests'),
	'svc|completed', 'the request history is restored');

# The admin still sees and changes the registry; the requester still reads requests.
is($node->safe_psql('dst', 'SET ROLE ops; SELECT count(*) FROM restart_worker.agents'),
	'1', 'an admin still reads the registry after the restore');
is($node->safe_psql('dst',
		"SET ROLE ops; SELECT restart_worker.register_service('svc2', 'h'); SELECT count(*) FROM restart_worker.services"),
	"\n2", 'an admin still administers after the restore');
is($node->safe_psql('dst', 'SET ROLE viewer; SELECT count(*) FROM service_restart_requests'),
	'1', 'a requester still reads the requests after the restore');

# And the cooldown, taken from the restored history, still holds.
my ($ret, $out, $err) = $node->psql('dst', "SELECT request_service_restart('svc')");
like($err, qr/was restarted less than/, 'the restored history still holds the cooldown');

$node->stop;
done_testing();
