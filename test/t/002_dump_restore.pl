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

# A database whose extension was updated (here from 1.0) rather than created: pg_dump
# leaves out the grants that update scripts made to the admin roles (it takes them for
# part of the extension), so the README says to run grant_admin() again after restoring
# it; then the admin may execute every function of the extension, as before the dump.
$node->safe_psql('postgres', 'CREATE DATABASE usrc');
$node->safe_psql('postgres', 'CREATE DATABASE udst');
$node->safe_psql('usrc', q{
	CREATE EXTENSION restart_worker VERSION '1.0';
	CREATE ROLE uops LOGIN;
	SELECT restart_worker.grant_admin('uops');
	ALTER EXTENSION restart_worker UPDATE;
});
my $denied = q{SELECT coalesce(string_agg(p.proname, ',' ORDER BY p.proname), '')
	FROM pg_proc p WHERE p.pronamespace = 'restart_worker'::regnamespace
	  AND NOT has_function_privilege('uops', p.oid, 'EXECUTE')};
is($node->safe_psql('usrc', $denied), '', 'after the update the admin may execute every function');
my $udump = $node->basedir . '/usrc.sql';
$node->command_ok([ 'pg_dump', '-d', $node->connstr('usrc'), '-f', $udump ],
	'pg_dump of a database whose extension was updated');
$node->command_ok([ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-q', '-d', $node->connstr('udst'), '-f', $udump ],
	'its dump restores without errors');
note('denied after the restore, before grant_admin(): ' . $node->safe_psql('udst', $denied));
$node->safe_psql('udst', q{SELECT restart_worker.grant_admin('uops')});
is($node->safe_psql('udst', $denied), '',
	'after the restore and grant_admin() again, the admin may execute every function');

$node->stop;
done_testing();
