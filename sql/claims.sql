-- The worker's claim reads only what it claims, however large the history of requests:
-- the due requests through their partial index, the claimed rows through the primary key.
-- (Before 1.4 the update of the claimed rows was a join that the planner could run as a
-- scan of the whole table, which it did once the table held some thousands of rows.) Its
-- plans are made once, so they may not depend on the arguments: the same calls also check
-- that a claim after a restart still takes over the requests in flight whatever their
-- lease, and that an ordinary claim leaves them alone.
\set VERBOSITY terse
ALTER TABLE service_restart_requests SET (autovacuum_enabled = false);
SELECT restart_worker.register_agent('clhost', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT count(restart_worker.register_service('cl' || i, 'clhost', '0'))
	FROM generate_series(1, 100) i;

-- The history: 5,000 requests that ended. Then 100 pending requests, due now, and two
-- in flight whose lease runs for an hour still.
INSERT INTO service_restart_requests (service_name, status, requested_by_role, requested_at,
									  deadline_at, completed_at)
	SELECT 'cl' || (i % 100 + 1), 'completed', 'postgres', now() - interval '1 day',
		   now() - interval '23 hours', now() - interval '1 day'
	FROM generate_series(1, 5000) i;
INSERT INTO service_restart_requests (service_name, requested_by_role, requested_at,
									  next_attempt_at, deadline_at)
	SELECT 'cl' || i, 'postgres', now() - interval '1 minute', now() - interval '1 minute',
		   now() + interval '1 hour'
	FROM generate_series(3, 100) i;
INSERT INTO service_restart_requests (service_name, status, requested_by_role, attempts,
									  next_attempt_at, deadline_at)
	SELECT 'cl' || i, 'dispatching', 'postgres', 1, now() + interval '1 hour',
		   now() + interval '2 hours'
	FROM generate_series(1, 2) i;
ANALYZE service_restart_requests;

-- Rows of the table read by scanning it whole, as the statistics system has them.
CREATE FUNCTION pg_temp.scanned() RETURNS bigint
LANGUAGE sql AS $$
	SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'service_restart_requests'
$$;
SELECT pg_stat_force_next_flush();
SELECT pg_temp.scanned() AS scanned_before \gset

-- Claims of up to 64, as the worker makes them: 64, then the 34 left; nothing more.
-- Seven calls, so that the plans are kept ones (the first five of a statement are made
-- afresh for their arguments, by default).
CREATE TEMP TABLE claims (call integer, id uuid, maybe_sent boolean);
INSERT INTO claims SELECT 1, id, maybe_sent FROM restart_worker.worker_claim(64, '{}', 60000, false);
INSERT INTO claims SELECT 2, id, maybe_sent FROM restart_worker.worker_claim(64, '{}', 60000, false);
INSERT INTO claims SELECT 3, id, maybe_sent FROM restart_worker.worker_claim(64, '{}', 60000, false);
INSERT INTO claims SELECT 4, id, maybe_sent FROM restart_worker.worker_claim(64, '{}', 60000, false);
INSERT INTO claims SELECT 5, id, maybe_sent FROM restart_worker.worker_claim(64, '{}', 60000, false);
INSERT INTO claims SELECT 6, id, maybe_sent FROM restart_worker.worker_claim(64, '{}', 60000, false);
-- After a restart: the two in flight are taken over, with their lease an hour away, but
-- not those the worker has in flight (its claims above).
INSERT INTO claims SELECT 7, id, maybe_sent
	FROM restart_worker.worker_claim(64, (SELECT array_agg(id) FROM claims), 60000, true);
SELECT pg_stat_force_next_flush();

-- (Requests left pending by earlier tests may be claimed too: they are not counted.)
SELECT c.call, count(*) AS claimed, count(*) FILTER (WHERE c.maybe_sent) AS maybe_sent
	FROM claims c JOIN service_restart_requests q USING (id)
	WHERE q.service_name LIKE 'cl%'
	GROUP BY c.call ORDER BY c.call;
SELECT pg_temp.scanned() - :scanned_before AS rows_scanned;
SELECT q.status, q.attempts, count(*)
	FROM service_restart_requests q JOIN claims c USING (id)
	WHERE q.service_name LIKE 'cl%'
	GROUP BY 1, 2 ORDER BY 1, 2;

DELETE FROM service_restart_requests WHERE service_name LIKE 'cl%';
DELETE FROM restart_worker.services WHERE name LIKE 'cl%';
DELETE FROM restart_worker.agents WHERE name = 'clhost';
ALTER TABLE service_restart_requests RESET (autovacuum_enabled);
