# A streaming standby never dispatches and dispatches after promotion; https to an agent
# with a throwaway CA (and a refusal with the wrong CA); DROP EXTENSION and DROP DATABASE
# of the worker's database.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use HTTP::Tiny;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $count = "$tmp/standby.count";

# ---- standby ----
my $agent = start_agent(
	name => 'agent_standby',
	services => qq{svc = ( { argv = [ "/bin/sh", "-c", "echo run >> $count; echo ok" ]; } );});

# The primary has no worker (library not preloaded), so the request stays pending until
# the promoted standby's worker takes it.
my $primary = new_node('primary', init => { allows_streaming => 1 },
	conf => "shared_preload_libraries = ''");
setup_registry($primary, 'host1', $agent->{url}, svc => '');
$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->append_conf('postgresql.conf', "shared_preload_libraries = 'restart_worker'");
$standby->start;

my $id = request_restart($primary, 'svc');
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres',
	"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	'0', 'no worker runs on the standby');
is($standby->safe_psql('postgres', "SELECT status FROM public.service_restart_requests WHERE id = '$id'"),
	'pending', 'the request replicated to the standby is pending');
is(count_lines($count), 0, 'nothing was dispatched');

$primary->stop;
$standby->promote;
ok(wait_status($standby, $id, 'completed'), 'after promotion the worker dispatches it');
is(count_lines($count), 1, 'the step ran once');
$standby->stop;

# ---- https with a throwaway CA ----
my $pki = "$tmp/pki";
mkdir $pki;
sub openssl { system('openssl', @_, '-quiet') == 0 or system('openssl', @_) == 0 or die "openssl @_ failed"; }
my @ec = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes');
for my $ca ('ca', 'other_ca')
{
	system("openssl req -x509 @ec -keyout $pki/$ca.key -out $pki/$ca.crt -days 2 -subj /CN=$ca >/dev/null 2>&1") == 0
	  or die "openssl CA";
}
spew("$pki/ext", "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
system("openssl req @ec -keyout $pki/server.key -out $pki/server.csr -subj /CN=127.0.0.1 >/dev/null 2>&1") == 0
  or die "openssl CSR";
system("openssl x509 -req -in $pki/server.csr -CA $pki/ca.crt -CAkey $pki/ca.key -CAcreateserial"
	  . " -out $pki/server.crt -days 2 -extfile $pki/ext >/dev/null 2>&1") == 0 or die "openssl sign";
chmod 0600, "$pki/server.key";

my $tls_agent = start_agent(
	name => 'agent_tls',
	tls => { cert => "$pki/server.crt", key => "$pki/server.key" },
	services => qq{svc = ( { argv = [ "/bin/sh", "-c", "echo over tls" ]; } );});
# Its port speaks TLS only: a plain HTTP request gets no HTTP answer.
my $plain = HTTP::Tiny->new(timeout => 10)->get("http://127.0.0.1:$tls_agent->{port}/healthz");
is($plain->{status}, 599, "the agent's port answers no plain HTTP ($plain->{status})");

$RestartWorkerTest::DB = 'rwdb';
my $node = new_node('tls', conf => "restart_worker.ca_file = '$pki/ca.crt'");
setup_registry($node, 'tlshost', $tls_agent->{url}, svc => 'p_max_attempts => 2');
$id = request_restart($node, 'svc');
ok(wait_status($node, $id, 'completed'), 'a request over https completes');
like(row_of($node, $id)->{output}, qr/over tls/, 'with the output');

# Another CA: the certificate is not trusted, no call gets through.
$node->safe_psql('rwdb', "ALTER SYSTEM SET restart_worker.ca_file = '$pki/other_ca.crt'");
$node->reload;
$node->poll_query_until('rwdb', "SELECT current_setting('restart_worker.ca_file') LIKE '%other_ca.crt'");
$id = request_restart($node, 'svc');
ok(wait_status($node, $id, 'failed'), 'with a CA that did not sign the certificate the request fails');
my $row = row_of($node, $id);
is($row->{error}, 'TLS verification of the agent failed',
	'because the certificate is not trusted (no host in the error)');
is($row->{attempts}, 1, 'a TLS failure is not retried');
ok($node->log_contains("request $id: call to agent https://127\\.0\\.0\\.1:\\d+ failed \\(tls\\)"),
	'the details are in the server log');

# ---- DROP EXTENSION, CREATE EXTENSION, DROP DATABASE ----
my $pid = $node->safe_psql('rwdb', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");
$node->safe_psql('rwdb', 'DROP EXTENSION restart_worker CASCADE');
$node->safe_psql('rwdb', 'CREATE EXTENSION restart_worker');
$node->safe_psql('rwdb', "ALTER SYSTEM RESET restart_worker.ca_file");
$node->reload;
setup_registry($node, 'tlshost', $tls_agent->{url}, svc => '');
$id = request_restart($node, 'svc');
ok(wait_status($node, $id, 'completed'), 'after DROP and CREATE EXTENSION requests complete');
is($node->safe_psql('rwdb', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	$pid, 'served by the same worker');

# DROP DATABASE that will fail anyway leaves the worker alone: by a role that does not
# own the database, inside a transaction block, or from a session connected to it.
$node->safe_psql('postgres', 'CREATE ROLE alice LOGIN');
my ($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE rwdb', extra_params => ['-U', 'alice']);
like($err, qr/must be owner of database rwdb/, 'a role that does not own the database may not drop it');
($ret, $out, $err) = $node->psql('postgres', "BEGIN;\nDROP DATABASE rwdb;\nROLLBACK;");
like($err, qr/cannot run inside a transaction block/, 'DROP DATABASE in a transaction block fails');
($ret, $out, $err) = $node->psql('rwdb', 'DROP DATABASE rwdb');
like($err, qr/cannot drop the currently open database/, 'a session cannot drop its own database');
is($node->safe_psql('rwdb', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	$pid, 'and none of these stopped the worker');

my $log_offset = -s $node->logfile;
($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE rwdb');
is($ret, 0, "DROP DATABASE of the worker's database succeeds") or diag $err;
ok($node->wait_for_log(qr/restart_worker: waiting \d+ s before connecting to database "rwdb" again/,
	$log_offset), 'the worker then waits for its database instead of crash looping');
$node->stop;

done_testing();
