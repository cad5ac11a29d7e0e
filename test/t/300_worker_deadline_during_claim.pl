# A request whose deadline passes while its claim commits is never sent. A claim takes
# only the requests before their deadline (since 1.10), judged at the start of its
# transaction; its calls start once it has committed. While synchronous standbys are
# configured every claim commits synchronously, so with a standby that lags (here, one
# that does not exist) the commit waits, and the deadline of a request it claimed can
# pass meanwhile. Such a request must end "timed out" without a call: sent then, with no
# time left (the POST gets at least a millisecond), the agent accepts it and runs its
# steps after the deadline.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $count = "$tmp/late_commit.count";

my $agent = start_agent(
	name => 'agent_deadline_commit',
	services => qq{warm = ( { argv = [ "/bin/true" ]; } );\n}
	  . qq{late_svc = ( { argv = [ "/bin/sh", "-c", "echo run >> $count" ]; } );\n});

# Streaming allowed: a commit waits for synchronous standbys only with WAL senders.
my $node = new_node('deadline_commit', init => { allows_streaming => 1 });
setup_registry($node, 'host1', $agent->{url},
	warm => '', late_svc => "p_deadline => '2 seconds'");

# A first request leaves the worker a connection to the agent, kept alive.
my $warm = request_restart($node, 'warm');
ok(wait_status($node, $warm, 'completed'), 'a first request completes');

sync_standby($node, 'nobody');
my $id = $node->safe_psql('postgres',
	"SET synchronous_commit = local; SELECT id FROM public.request_service_restart('late_svc')");
ok($node->poll_query_until('postgres',
	"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'restart_worker' AND wait_event = 'SyncRep'",
	'1'), 'the claim of the request waits in its commit for the missing standby');
ok($node->poll_query_until('postgres',
	"SELECT clock_timestamp() > deadline_at + interval '500 ms' FROM public.service_restart_requests WHERE id = '$id'"),
	'meanwhile the request\'s deadline passes');
my $log_offset = -s $node->logfile;
sync_standby($node, '');

ok(wait_status($node, $id, 'failed'), 'the request fails');
my $row = row_of($node, $id);
like($row->{error}, qr/^timed out/, 'it timed out');
unlike($row->{error}, qr/may have received/, 'as one that certainly never reached its agent');
ok(!defined $row->{uncertain_at}, 'it holds no cooldown');
ok($node->log_contains(qr/request \Q$id\E: call to agent \S+ failed \(timeout\): the request's deadline passed before its call could be sent/,
	$log_offset), 'the log says why it was not sent');

# Whatever reached the agent on that connection has been read once the agent answered a
# later request.
my $after = request_restart($node, 'warm');
ok(wait_status($node, $after, 'completed'), 'a later request completes');
unlike(slurp($agent->{log}), qr/\Q$id\E/, 'the agent never heard of the late request');
is(count_lines($count), 0, 'its step never ran');

$node->stop;
done_testing();
