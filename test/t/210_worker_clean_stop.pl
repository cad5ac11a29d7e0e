# A clean stop loses no claim (its checkpoint flushes every commit), so after one the
# worker has nothing to settle: a request waiting for its next attempt stays pending, can
# be cancelled at once and holds no cooldown. After a crash the worker settles as before,
# also when a clean stop comes between the crash and its settling: the marker file
# restart_worker.unsettled in the data directory carries that over.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use RestartWorkerTest;

# No agent listens there: every call fails to connect, and its request waits, pending,
# for its next attempt ten minutes later (within the margin): no claim of it is under
# way when the server stops below.
my $node = new_node('clean_stop');
setup_registry($node, 'gone', 'http://127.0.0.1:' . free_port(), svc_a => '', svc_b => '');
ok(worker_as_role($node, "restart_worker.settle_margin = '1h'\n"
		  . "restart_worker.retry_base = '10min'\nrestart_worker.retry_max = '10min'\n"),
	'the worker runs as its role');
my $marker = $node->data_dir . '/restart_worker.unsettled';
my $settled_log = qr/pending requests due before the server started may have reached their agents/;

sub unsettled
{
	return $node->safe_psql('postgres',
		'SELECT restart_worker.worker_unsettled_before() IS NOT NULL') eq 't';
}

ok(!-e $marker, 'after initdb and clean restarts: no marker file');

my $a_id = request_restart($node, 'svc_a');
my $b_id = request_restart($node, 'svc_b');
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM public.service_restart_requests
	 WHERE status = 'pending' AND attempts = 1 AND error LIKE '%connect%'
	   AND next_attempt_at > now() + interval '5 minutes'"),
	'both requests wait for their next attempt');

# A clean stop, and a worker that cannot log in: it could not settle, yet nothing is
# left to settle.
$node->safe_psql('postgres', 'ALTER ROLE rw_worker NOLOGIN');
my $offset = -s $node->logfile;
$node->restart;
ok(!unsettled(), 'clean stop: nothing to settle, with the worker unable to log in');
ok(!-e $marker, 'clean stop: no marker file');
is(cancel_refusal($node, $a_id), '', 'clean stop: a pending request can be cancelled at once');
is(status_attempts($node, $a_id), 'cancelled 1', 'clean stop: it is cancelled');

# Once the worker runs and has claimed (after settling, had it had to), the other
# request is still waiting for its attempt.
$node->safe_psql('postgres', 'ALTER ROLE rw_worker LOGIN');
ok($node->poll_query_until('postgres', 'SELECT polls >= 1 FROM restart_worker.status()'),
	'clean stop: the worker runs and has claimed');
is(status_attempts($node, $b_id), 'pending 1', 'clean stop: the other request still waits, pending');
ok(!$node->log_contains($settled_log, $offset), 'clean stop: the worker settled nothing');
is(row_of($node, $b_id)->{uncertain_at}, undef,
	'clean stop: the request does not hold the cooldown');

# A crash: the worker must settle, and cannot log in to. A clean stop before it has
# settled keeps that so.
$node->safe_psql('postgres', 'ALTER ROLE rw_worker NOLOGIN');
$node->stop('immediate');
$node->start;
ok(unsettled(), 'crash: the worker has to settle');
ok(-e $marker, 'crash: the marker file is made');
like(cancel_refusal($node, $b_id), qr/cannot be cancelled yet/,
	'crash: cancelling a request due before the start is refused');
$offset = -s $node->logfile;
$node->restart;
ok(unsettled(), 'a clean stop before the worker settled: it still has to');
like(cancel_refusal($node, $b_id), qr/cannot be cancelled yet/,
	'a clean stop before the worker settled: cancelling is still refused');

$node->safe_psql('postgres', 'ALTER ROLE rw_worker LOGIN');
ok($node->log_contains(qr/yet to settle what a crash before the last clean stop/, $offset),
	'the log says why the worker has to settle after that clean stop');
ok($node->wait_for_log(qr/\b1 $settled_log/, $offset), 'the worker settles the one pending request');
ok(!unsettled(), 'it has settled');
ok(!-e $marker, 'the marker file is removed');
my $row = row_of($node, $b_id);
is($row->{status}, 'dispatching', 'settled as a request that may have been sent');
ok(defined $row->{uncertain_at}, 'it holds the cooldown');

$node->safe_psql('postgres', 'ALTER ROLE rw_worker NOLOGIN');
$node->restart;
ok(!unsettled(), 'a clean stop after settling: nothing to settle, with the worker unable to log in');

$node->stop;
done_testing();
