# The POST asks the agent to hold its answer while the job runs (?wait=0.020), so that a
# quick job is one call; but not while the agent's long-polls take every connection they
# may (max_connections_per_agent - 1): the POSTs then share the connection left, and a
# held answer would hold up the next POST.  A fake agent answers every POST with a
# running job and holds every long-poll.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $fake = fake_agent(name => 'holder', answer => sub {
	my ($m, $p, $id) = @_;
	return undef if $m eq 'GET';    # a long-poll of a job that runs: held
	return [202, job_json($id, status => 'running', finished_at => undef, exit_code => undef)];
});
my $node = new_node('post_wait', conf => <<CONF);
restart_worker.max_connections_per_agent = 3
CONF
setup_registry($node, 'holder', $fake->{url}, w1 => '', w2 => '', w3 => '');

# The long-polls a request's POST leads to, once its 202 is recorded.
sub polls { return scalar grep { /^GET / } fake_calls($fake); }

my $id1 = request_restart($node, 'w1');
ok(wait_for(sub { polls() == 1 }), 'w1: its job is followed with a long-poll');
my $id2 = request_restart($node, 'w2');
ok(wait_for(sub { polls() == 2 }), 'w2: its job is followed too (two long-polls: the most for three connections)');
my $id3 = request_restart($node, 'w3');
ok(wait_status($node, $id3, 'running'), 'w3: the agent accepted it');

my %post = map { (split / /)[2] => (split / /)[1] } grep { /^POST / } fake_calls($fake);
is($post{$id1}, '/v1/restarts?wait=0.020', 'w1: the POST asked the agent to hold its answer');
is($post{$id2}, '/v1/restarts?wait=0.020', 'w2: so did this one (one long-poll in flight)');
is($post{$id3}, '/v1/restarts', 'w3: with the long-polls at their limit, the POST did not');

$node->stop;
done_testing();
