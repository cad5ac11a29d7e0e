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
# for its next attempt.
my $node = new_node('clean_stop');
setup_registry($node, 'gone', 'http://127.0.0.1:' . free_port(), svc_a => '', svc_b => '');
ok(worker_as_role($node, "restart_worker.settle_margin = '1h'\n"),
	'the worker runs as its role');
my $marker = $node->data_dir . '/restart_worker.unsettled';
my $settled_log = qr/pending requests due before the server started may have reached their agents/;

sub unsettled
{
	return $node->safe_psql('postgres',
		'SELECT restart_worker.worker_unsettled_before() IS NOT NULL') eq 't';
}

sub tried
{
	my ($id, $attempts) = @_;
	return $node->poll_query_until('postgres',
		"SELECT status = 'pending' AND attempts >= $attempts AND error LIKE '%connect%'
		 FROM public.service_restart_requests WHERE id = '$id'");
}

ok(!unsettled(), 'after initdb and clean restarts there is nothing to settle');
ok(!-e $marker, 'no marker file');

my $a_id = request_restart($node, 'svc_a');
my $b_id = request_restart($node, 'svc_b');
ok(tried($a_id, 1) && tried($b_id, 1), 'both requests wait for their next attempt');

# A clean stop, and a worker that cannot log in: it could not settle, yet nothing is
# left to settle.
$node->safe_psql('postgres', 'ALTER ROLE rw_worker NOLOGIN');
my $offset = -s $node->logfile;
$node->restart;
ok(!unsettled(), 'clean stop: nothing to settle, the worker not even started');
ok(!-e $marker, 'clean stop: no marker file');
is(cancel_refusal($node, $a_id), '', 'clean stop: a pending request can be cancelled at once');
like(status_attempts($node, $a_id), qr/^cancelled /, 'clean stop: it is cancelled');

my $b_attempts = (split / /, status_attempts($node, $b_id))[1];
$node->safe_psql('postgres', 'ALTER ROLE rw_worker LOGIN');
ok(tried($b_id, $b_attempts + 1), 'clean stop: the worker tries the other one again, as pending');
ok(!$node->log_contains($settled_log, $offset), 'clean stop: the worker settled nothing');
is(row_of($node, $b_id)->{uncertain_at}, undef,
	'clean stop: the request does not hold the cooldown');

# A crash: the worker must settle, and cannot log in to. A clean stop before it has
# settled keeps that so.
$node->safe_psql('postgres', 'ALTER ROLE rw_worker NOLOGIN');
$node->stop('immediate');
$offset = -s $node->logfile;
$node->start;
ok(unsettled(), 'crash: the worker has to settle');
ok(-e $marker, 'crash: the marker file is made');
like(cancel_refusal($node, $b_id), qr/cannot be cancelled yet/,
	'crash: cancelling a request due before the start is refused');
$node->restart;
ok(unsettled(), 'a clean stop before the worker settled: it still has to');
like(cancel_refusal($node, $b_id), qr/cannot be cancelled yet/,
	'a clean stop before the worker settled: cancelling is still refused');

$node->safe_psql('postgres', 'ALTER ROLE rw_worker LOGIN');
ok($node->poll_query_until('postgres',
	'SELECT restart_worker.worker_unsettled_before() IS NULL'), 'the worker settles');
ok($node->log_contains(qr/\b1 $settled_log/, $offset), 'it settled the one pending request');
ok(!-e $marker, 'the marker file is removed');
my $row = row_of($node, $b_id);
ok($row->{status} =~ /^(?:dispatching|failed)$/ && defined $row->{uncertain_at},
	"settled as a request that may have been sent ($row->{status})");

$node->safe_psql('postgres', 'ALTER ROLE rw_worker NOLOGIN');
$node->restart;
ok(!unsettled(), 'a clean stop after settling: nothing to settle, the worker not even started');

$node->stop;
done_testing();
