# How the worker judges what it gets back, with fake agents standing in for peers that
# misbehave: only "could not connect", timeouts, lost connections, 5xx and 429 are
# retried; other answers fail at once; a call that may have reached the agent never puts
# its request back to pending (cancellable); an odd answer fails its request, not the
# worker; the request's row never shows hosts, ports or raw answer text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

my $node = new_node('answers', conf => <<CONF);
restart_worker.request_timeout = '1s'
restart_worker.retry_base = '50ms'
restart_worker.retry_max = '200ms'
CONF
my $worker = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'");

# A fake agent and a service on it; returns the fake.
sub fake_service
{
	my ($name, $extra, $answer) = @_;
	my $fake = fake_agent(name => $name, answer => $answer);
	$node->safe_psql('postgres',
		"SELECT restart_worker.register_agent('$name', '$fake->{url}', '$SECRET')");
	$node->safe_psql('postgres',
		"SELECT restart_worker.register_service('${name}_svc', '$name', '0'"
		  . ($extra ? ", $extra" : '') . ")");
	return $fake;
}

# A request for the fake's service that ended in one of $status; returns its row.
sub run_to
{
	my ($fake, $status) = @_;
	my $id = request_restart($node, "$fake->{name}_svc");
	ok(wait_status($node, $id, $status), "$fake->{name}: the request ends $status");
	my $row = row_of($node, $id);
	clean_error($row, $fake);
	return $row;
}

# Nothing of the network in error: no address, port or URL.
sub clean_error
{
	my ($row, $fake) = @_;
	unlike($row->{error} // '', qr/127\.0\.0\.1|localhost|$fake->{port}|https?:/,
		"$fake->{name}: error names no host, port or URL");
}

my $err = '{"error": "%s", "message": "%s"}';

# Never answers: every call times out after it was sent.  The request stays dispatching
# (it cannot be cancelled: the agent may have it), is sent again with the same id, and
# finally says that the agent may have received it.
my $mute = fake_service('mute', 'p_max_attempts => 4', sub { return undef; });
my $id = request_restart($node, 'mute_svc');
ok($node->poll_query_until('postgres',
	"SELECT status = 'dispatching' AND error = 'timed out waiting for the agent'
	 FROM public.service_restart_requests WHERE id = '$id'"),
	'mute: after a timeout the request stays dispatching');
my ($ret, $out, $stderr) = $node->psql('postgres',
	"SELECT restart_worker.cancel_request('$id')");
like($stderr, qr/is dispatching; only a pending request can be cancelled/,
	'mute: a request that may have reached the agent cannot be cancelled');
ok(wait_status($node, $id, 'failed'), 'mute: the request fails');
my $row = row_of($node, $id);
is($row->{error},
	'gave up after 4 attempts: timed out waiting for the agent; the agent may have received the request',
	'mute: error says it may have reached the agent');
my @calls = fake_calls($mute);
is(scalar(grep { $_ eq "POST /v1/restarts?wait=0.020 $id" } @calls), 4,
	'mute: four POSTs, all with the same request id');
clean_error($row, $mute);
$node->safe_psql('postgres', "SELECT restart_worker.register_service('mute_svc', 'mute', '1 hour')");
my (undef, undef, $refusal) = $node->psql('postgres', "SELECT request_service_restart('mute_svc')");
like($refusal, qr/was restarted less than/,
	'mute: a request that may have reached the agent holds the cooldown');
$node->safe_psql('postgres', "SELECT restart_worker.register_service('mute_svc', 'mute', '0')");

# 301: not an agent's answer; failed at once, not retried.
my $moved = fake_service('moved', '', sub {
	return [301, '<html>moved to http://elsewhere.example/</html>'];
});
$row = run_to($moved, 'failed');
like($row->{error}, qr/^invalid answer from the agent \(HTTP 301\)(?:; the agent may have received the request)?$/, "moved: $row->{error}");
is($row->{attempts}, 1, 'moved: not retried');
unlike($row->{error}, qr/elsewhere|html/, 'moved: no text of the answer');

# 202 whose started_at is no time: the request fails, the worker goes on.
my $odd = fake_service('odd', '', sub {
	my ($m, $p, $id) = @_;
	return [202, job_json($id, status => 'running', started_at => 'not a time',
		finished_at => undef)];
});
$row = run_to($odd, 'failed');
like($row->{error}, qr/^invalid answer from the agent \(HTTP 202\)(?:; the agent may have received the request)?$/, "odd: $row->{error}");
is($row->{attempts}, 1, 'odd: not retried');
is(scalar(grep { /^POST / } fake_calls($odd)), 1, 'odd: one POST');

# An exit code out of range is just as odd.
my $big = fake_service('big', '', sub {
	my ($m, $p, $id) = @_;
	return [200, job_json($id, exit_code => 99999999999)];
});
$row = run_to($big, 'failed');
like($row->{error}, qr/^invalid answer from the agent \(HTTP 200\)(?:; the agent may have received the request)?$/, "big: $row->{error}");

# The common answer, a job object, is read in C (src/job.c), anything else in SQL; both
# take an answer the same way.  Escapes, a time zone offset, a key given twice (the last
# one counts, as in jsonb) and a negative exit code, on the C path:
my $esc = fake_service('esc', '', sub {
	my ($m, $p, $id) = @_;
	my $json = job_json($id, exit_code => -3, started_at => '2026-11-26T07:00:00.5+02:00',
		output => 'OUT');
	$json =~ s/"OUT"/"caf\\u00e9 \\"q\\"\\n\\ud83d\\ude00"/;
	$json =~ s/^\{/{"status":"failed",/;
	return [200, $json];
});
$row = run_to($esc, 'completed');
is($node->safe_psql('postgres', qq{
	SELECT output = E'caf\\u00e9 "q"\\n\\U0001F600', exit_code,
		   started_at = '2026-11-26 05:00:00.5+00'
	FROM public.service_restart_requests WHERE id = '$row->{id}'}),
	't|-3|t', 'esc: escapes, offset and a repeated key read as jsonb reads them');

# A zero character in the output: jsonb has none, so the SQL path takes this answer and
# puts U+FFFD in its place; the text "\u0000" (its backslash escaped) stays as it is.
my $nul = fake_service('nul', '', sub {
	my ($m, $p, $id) = @_;
	my $json = job_json($id, output => 'OUT');
	$json =~ s/"OUT"/"a\\u0000b \\\\u0000"/;
	return [200, $json];
});
$row = run_to($nul, 'completed');
is($node->safe_psql('postgres',
	"SELECT output = E'a\\uFFFDb \\\\u0000' FROM public.service_restart_requests WHERE id = '$row->{id}'"),
	't', 'nul: the zero character is replaced, the text \u0000 is not');

# exit_code must be a number, a time stamp may be 2000-01-01 (PostgreSQL's epoch): both
# paths agree.
my $strcode = fake_service('strcode', '', sub {
	my ($m, $p, $id) = @_;
	my $json = job_json($id, exit_code => 'EXIT');
	$json =~ s/"EXIT"/"3"/;
	return [200, $json];
});
$row = run_to($strcode, 'failed');
like($row->{error}, qr/^invalid answer from the agent \(HTTP 200\)(?:; the agent may have received the request)?$/, "strcode: $row->{error}");
my $epoch = fake_service('epoch', '', sub {
	my ($m, $p, $id) = @_;
	return [200, job_json($id, started_at => '2000-01-01T00:00:00Z',
		finished_at => '2000-01-01T00:00:00Z')];
});
$row = run_to($epoch, 'completed');
is($node->safe_psql('postgres',
	"SELECT started_at = '2000-01-01 00:00:00+00' AND completed_at = '2000-01-01 00:00:00+00'
	 FROM public.service_restart_requests WHERE id = '$row->{id}'"),
	't', 'epoch: 2000-01-01 is a time like any other');

# Nested too deep for the parser (an error on the C path, caught on the SQL path): the
# request fails with "invalid answer", the worker goes on.
my $deep = fake_service('deep', '', sub {
	my ($m, $p, $id) = @_;
	my $json = job_json($id, status => 'running', finished_at => undef, output => 'OUT');
	$json =~ s/"OUT"/'[' x 200000 . ']' x 200000/e;
	return [202, $json];
});
$row = run_to($deep, 'failed');
like($row->{error}, qr/^invalid answer from the agent \(HTTP 202\)(?:; the agent may have received the request)?$/, "deep: $row->{error}");

is($node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'restart_worker'"),
	$worker, 'the same worker survived every odd answer');

# 503 from something in between (no agent error object), twice, then the job: retried
# as dispatching (never pending), then completed with the same id.
my $proxy = fake_service('proxy', '', sub {
	my ($m, $p, $id, $n) = @_;
	return [503, '<html>bad gateway at 10.1.2.3</html>'] if $n <= 2;
	return [202, job_json($id)];
});
$id = request_restart($node, 'proxy_svc');
ok(wait_status($node, $id, 'completed'), 'proxy: 503 is retried until the job completes');
$row = row_of($node, $id);
is($row->{attempts}, 3, 'proxy: after three attempts');
is($row->{output}, "fake output\n", "proxy: the job's output is recorded");
is(scalar(grep { /^POST \S+ $id$/ } fake_calls($proxy)), 3, 'proxy: three POSTs, same id');
ok($node->log_contains("request $id: agent http://127.0.0.1:$proxy->{port} answered HTTP 503"),
	'proxy: the details are in the server log');

# The agent's own 429 too_many_jobs: nothing ran, so the request is pending again and can
# be cancelled during the backoff.
my $busy = fake_service('busy', 'p_max_attempts => 100', sub {
	return [429, sprintf($err, 'too_many_jobs', 'too many jobs are running')];
});
$node->safe_psql('postgres', q{
	CREATE FUNCTION try_cancel(p uuid) RETURNS boolean LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM restart_worker.cancel_request(p);
		RETURN true;
	EXCEPTION WHEN object_not_in_prerequisite_state THEN
		RETURN false;
	END $$});
$id = request_restart($node, 'busy_svc');
ok($node->poll_query_until('postgres',
	"SELECT try_cancel(id) FROM public.service_restart_requests
	 WHERE id = '$id' AND attempts >= 2"),
	'busy: a pending request is cancelled during the backoff');
$row = row_of($node, $id);
is($row->{status}, 'cancelled', 'busy: cancelled');
$id = request_restart($node, 'busy_svc');
ok($node->poll_query_until('postgres',
	"SELECT uncertain_at IS NULL
	    AND error = 'the agent could not take the request: HTTP 429 too_many_jobs: too many jobs are running'
	    AND try_cancel(id)
	 FROM public.service_restart_requests WHERE id = '$id' AND attempts >= 1"),
	'busy: pending again, with the agent\'s reason, and cancelled');

# 5xx is retried until the maximum attempts, quoting the agent's own error object.
my $broken = fake_service('broken', 'p_max_attempts => 2', sub {
	return [500, sprintf($err, 'internal_error', 'disk full')];
});
$row = run_to($broken, 'failed');
is($row->{error},
	'gave up after 2 attempts: the agent could not take the request: HTTP 500 internal_error: disk full',
	'broken: the agent said nothing ran, so no doubt in error');

# Other 4xx: failed at once with the agent's reason, not retried.
for my $case ([400, 'bad_request', 'malformed body'], [409, 'service_busy', 'still running'],
	[401, 'invalid_signature', 'no matching signature'])
{
	my ($code, $what, $msg) = @$case;
	my $f = fake_service("refuse$code", '', sub { return [$code, sprintf($err, $what, $msg)]; });
	$row = run_to($f, 'failed');
	is($row->{error}, "agent refused the request: HTTP $code $what: $msg",
		"refuse$code: the agent's reason");
	is($row->{attempts}, 1, "refuse$code: not retried");
}

# A 404 that is no agent's: only the status is quoted.
my $web = fake_service('web', '', sub { return [404, 'Not Found on web01.internal:8080']; });
$row = run_to($web, 'failed');
is($row->{error}, 'agent refused the request: HTTP 404', 'web: only the status');

# The job was accepted, then every answer is an empty 503: the last error is that, not an
# earlier answer's text, and the request times out as a running job.
my $lost = fake_service('lost', "p_deadline => '3s'", sub {
	my ($m, $p, $id, $n) = @_;
	return [202, job_json($id, status => 'running', finished_at => undef, exit_code => undef,
		output => 'SECRET-OUTPUT')] if $n == 1;
	return [503, ''];
});
$row = run_to($lost, 'failed');
is($row->{error},
	'timed out (the job was still running on the agent) (last error: the agent could not take the request: HTTP 503)',
	'lost: timed out with the last error');
ok(defined $row->{dispatched_at}, 'lost: it had been dispatched');

# The connection is closed without an answer: it may have reached the agent, so the
# request is retried as dispatching, with the same id, and gives up saying so.
my $hangup = fake_service('hangup', 'p_max_attempts => 2', sub { return 'close'; });
$row = run_to($hangup, 'failed');
is($row->{error},
	'gave up after 2 attempts: the connection to the agent was lost; the agent may have received the request',
	"hangup: $row->{error}");
ok(defined $row->{uncertain_at}, 'hangup: it holds the cooldown, as one that may have been sent');
is(scalar(grep { /^POST \S+ $row->{id}$/ } fake_calls($hangup)), 2, 'hangup: two POSTs, same id');

# The agent dies having read a request that came on a kept-alive connection, before
# answering: libcurl sends the request again on a new connection, which is refused, and
# reports a failure to connect.  But the agent may have the request: it stays dispatching
# (it cannot be cancelled) and holds the cooldown, as a lost connection.  (Before, it went
# back to pending, "could not connect to the agent".)
my $crash = fake_agent(name => 'crash', keep_alive => 1, answer => sub {
	my ($m, $p, $id, $n) = @_;
	return $n == 1 ? [202, job_json($id)] : 'crash';
});
$node->safe_psql('postgres',
	"SELECT restart_worker.register_agent('crash', '$crash->{url}', '$SECRET');
	 SELECT restart_worker.register_service('crash_svc', 'crash', '0');
	 SELECT restart_worker.register_service('crash_svc2', 'crash', '1 hour', p_max_attempts => 2);");
$id = request_restart($node, 'crash_svc');
ok(wait_status($node, $id, 'completed'), 'crash: a first request completes, its connection kept');
$id = request_restart($node, 'crash_svc2');
ok(wait_status($node, $id, 'failed'), 'crash: the second request fails once the agent is gone');
$row = row_of($node, $id);
is($row->{error},
	'gave up after 2 attempts: could not connect to the agent; the agent may have received the request',
	"crash: $row->{error}");
ok(defined $row->{uncertain_at}, 'crash: the request holds the cooldown, as one that may have been sent');
like(slurp($node->logfile), qr/request $id: call to agent \S+ failed \(network\)/,
	'crash: the first call counts as a lost connection, not as a failure to connect');
is(scalar(grep { /^POST \S+ $id$/ } fake_calls($crash)), 1, 'crash: the agent read the request once');
(undef, undef, $refusal) = $node->psql('postgres', "SELECT request_service_restart('crash_svc2')");
like($refusal, qr/was restarted less than/, 'crash: a new request waits for the cooldown');

# An https agent that accepts connections and never answers the TLS handshake: the calls
# time out before any request went out, so they are failures to connect: the request never
# reached the agent and holds no cooldown.  (Before, "timed out waiting for the agent".)
my (undef, $tls_port) = unresponsive_listener();
$node->safe_psql('postgres',
	"SELECT restart_worker.register_agent('mutetls', 'https://127.0.0.1:$tls_port', '$SECRET');
	 SELECT restart_worker.register_service('mutetls_svc', 'mutetls', '1 hour', p_max_attempts => 2);");
$id = request_restart($node, 'mutetls_svc');
ok(wait_status($node, $id, 'failed'), 'mutetls: the request fails');
$row = row_of($node, $id);
is($row->{error}, 'gave up after 2 attempts: could not connect to the agent', "mutetls: $row->{error}");
ok(!defined $row->{uncertain_at}, 'mutetls: no cooldown: nothing was sent');

# An answer larger than restart_worker.max_response_size (1 MB): failed at once; as the
# call was sent, the agent may have taken the request.
my $huge = fake_service('huge', '', sub {
	my ($m, $p, $id) = @_;
	return [202, job_json($id, output => 'x' x (2 * 1024 * 1024))];
});
$row = run_to($huge, 'failed');
is($row->{error},
	'invalid answer from the agent (larger than restart_worker.max_response_size); the agent may have received the request',
	"huge: $row->{error}");
is($row->{attempts}, 1, 'huge: not retried');

# The service is taken out of the registry (an admin deleting its row) while its request
# waits for an agent that is down: it fails at its next attempt, and nothing is sent.
my $gone = fake_service('gone', 'p_max_attempts => 100', sub { return 'close'; });
kill 'KILL', $gone->{pid};
waitpid($gone->{pid}, 0);
$gone->{pid} = undef;
$id = request_restart($node, 'gone_svc');
ok($node->poll_query_until('postgres',
	"SELECT status = 'pending' AND attempts >= 1 FROM public.service_restart_requests WHERE id = '$id'"),
	'gone: the request waits for its agent');
$node->safe_psql('postgres', "DELETE FROM restart_worker.services WHERE name = 'gone_svc'");
ok(wait_status($node, $id, 'failed'), 'gone: the request fails');
$row = row_of($node, $id);
is($row->{error}, 'the service or its agent is no longer registered', "gone: $row->{error}");

$node->stop;
done_testing();
