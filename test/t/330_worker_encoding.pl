# An agent's answer is UTF-8; the worker stores it in the database's encoding.  A step's
# output that is not ASCII is kept as it was printed in a UTF8 database, and in a LATIN1 or
# EUC_JP one each character the encoding cannot hold becomes '?'.  Before, a LATIN1
# database stored the UTF-8 bytes as Latin-1 characters (garbled), and in an EUC_JP one
# the answer was judged invalid: the request failed although its step had run.  An answer
# that is not UTF-8 at all is an invalid answer in any encoding.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

# "café 中 😀" and a newline, as UTF-8 bytes, printed by the step.
my $agent = start_agent(name => 'agent_encoding', services => <<'SVC');
text = ( { argv = [ "/bin/sh", "-c", "printf 'caf\\303\\251 \\344\\270\\255 \\360\\237\\230\\200\\n'" ]; } );
SVC

# The output's UTF-8 bytes (hex) must contain $want (hex of UTF-8).
sub utf8_hex { return unpack('H*', $_[0]) }

my %cases = (
	UTF8 => "caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80\n",
	LATIN1 => "caf\xc3\xa9 ? ?\n",
	EUC_JP => " \xe4\xb8\xad ?\n",    # "中" is in EUC_JP, the emoji is not
);
my %nodes;
for my $enc (sort keys %cases)
{
	my $node = new_node("encoding_\L$enc", init => { extra => [ "--encoding=$enc", '--locale=C' ] });
	$nodes{$enc} = $node;
	setup_registry($node, 'h', $agent->{url}, text => '');
	my $id = request_restart($node, 'text');
	ok(wait_status($node, $id, 'completed|failed'), "$enc: the request ended");
	is($node->safe_psql('postgres',
		"SELECT status FROM public.service_restart_requests WHERE id = '$id'"),
		'completed', "$enc: it completed");
	my $hex = utf8_hex($cases{$enc});
	ok($node->safe_psql('postgres',
		"SELECT position(decode('$hex', 'hex') IN convert_to(output, 'UTF8')) > 0 "
		  . "FROM public.service_restart_requests WHERE id = '$id'") eq 't',
		"$enc: the output reads as printed, but for the characters the encoding lacks")
	  or diag($node->safe_psql('postgres',
		"SELECT encode(convert_to(output, 'UTF8'), 'hex') FROM public.service_restart_requests WHERE id = '$id'"));
}

# An answer that is not UTF-8 (bytes 0xff 0xfe in the output) from something that is not
# our agent, to a LATIN1 database, where every byte would read as a character.
my $node = $nodes{LATIN1};
my $fake = fake_agent(name => 'fake_encoding', answer => sub {
	my ($method, $path, $id) = @_;
	my $job = job_json($id, output => 'BYTES');
	$job =~ s/BYTES/\xff\xfe/;
	return [ 202, $job ];
});
$node->safe_psql('postgres', qq{
	SELECT restart_worker.register_agent('fake', '$fake->{url}', '$SECRET');
	SELECT restart_worker.register_service('other', 'fake', p_cooldown => '0');
});
my $id = request_restart($node, 'other');
ok(wait_status($node, $id, 'completed|failed'), 'the answer that is not UTF-8 was recorded');
like($node->safe_psql('postgres', "SELECT status || ': ' || error FROM public.service_restart_requests WHERE id = '$id'"),
	qr/^failed: invalid answer from the agent \(HTTP 202\)/, 'as an invalid answer');

$_->stop for values %nodes;
done_testing();
