# An agent registered before 1.9 may have a port outside 1-65535 in its URL: register_agent()
# of 1.9 refuses one, and the table's check too (valid_agent_url()), even for a superuser,
# but a row made before stays. So the rows are made as they were then, with 1.8, and the
# extension updated. A request for a service on such an agent fails at once, without a
# retry and without a call, saying that the agent's URL is not usable and what to do
# (before 1.10: "invalid answer from the agent" for port 70000, and for port 0 "could not
# connect", tried again until the attempts ran out). So does one whose URL libcurl refuses
# though register_agent() took it before 1.11, such as an IPv4 address in brackets: the
# worker tells libcurl's refusal of a URL apart. Registering the agent again mends it.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $agent = start_agent(
	name => 'agent_unusable_url',
	services => qq{zero_svc = ( { argv = [ "/bin/sh", "-c", "echo zero" ]; } );\n});

my $node = new_node('unusable_url', no_extension => 1);
$node->safe_psql('postgres', "CREATE EXTENSION restart_worker VERSION '1.8'");
setup_registry($node, 'port_zero', 'http://127.0.0.1:0', zero_svc => "");
setup_registry($node, 'port_big', 'http://127.0.0.1:70000', big_svc => "");
setup_registry($node, 'bracketed', 'http://[127.0.0.1]:8787', bracket_svc => '');
$node->safe_psql('postgres', 'ALTER EXTENSION restart_worker UPDATE');
is($node->safe_psql('postgres',
	"SELECT (e.extversion = a.default_version) || ': ' "
	  . "|| string_agg(url, ' ' ORDER BY url COLLATE \"C\") "
	  . "FROM pg_extension e, pg_available_extensions a, restart_worker.agents "
	  . "WHERE e.extname = 'restart_worker' AND a.name = e.extname "
	  . "GROUP BY e.extversion, a.default_version"),
	'true: http://127.0.0.1:0 http://127.0.0.1:70000 http://[127.0.0.1]:8787',
	'after the update to the current version the agents keep their URLs');

# Since 1.11 register_agent() refuses the bracketed IPv4 address too (regress admin).
my ($rc, $out, $err) = $node->psql('postgres',
	"SELECT restart_worker.register_agent('bracketed', 'http://[127.0.0.1]:8787', '$SECRET')");
like($err, qr/agent URL "http:\/\/\[127\.0\.0\.1\]:8787" is not usable/,
	'register_agent() of 1.11 refuses an IPv4 address in brackets');

my $usable = "the agent's URL is not usable: register the agent again (restart_worker.register_agent())";
for my $case (['zero_svc', 'port 0', 'http://127.0.0.1:0'],
	['big_svc', 'port 70000', 'http://127.0.0.1:70000'],
	['bracket_svc', 'IPv4 in brackets', 'http://[127.0.0.1]:8787'])
{
	my ($svc, $what, $url) = @$case;
	my $offset = -s $node->logfile;
	my $id = request_restart($node, $svc);
	ok(wait_status($node, $id, 'failed'), "$what: the request fails");
	my $row = row_of($node, $id);
	is($row->{error}, $usable, "$what: saying that the agent's URL is not usable, and what to do");
	is($row->{attempts}, 1, "$what: at once, not tried again");
	ok(!defined $row->{uncertain_at}, "$what: as one that certainly never reached an agent");
	ok($node->log_contains(qr/request \Q$id\E: call to agent \Q$url\E failed \(url\)/, $offset),
		"$what: the log names the URL");
}

# Registered again with a usable URL, the agent's services work.
$node->safe_psql('postgres',
	"SELECT restart_worker.register_agent('port_zero', '$agent->{url}', '$SECRET')");
my $id = request_restart($node, 'zero_svc');
ok(wait_status($node, $id, 'completed'), 'registered again with a usable URL, a request completes');

$node->stop;
done_testing();
