-- The worker's functions find a request they already know by its id alone, however the
-- statistics describe the table. After a quiet spell they say that almost no request is
-- active; a burst then makes thousands active. Recording what an agent answered for one of
-- them must read its row through the primary key, never scan the partial indexes of the
-- active requests (which would read every active request: thousands per answer).
\set VERBOSITY terse
ALTER TABLE service_restart_requests SET (autovacuum_enabled = false);
SELECT restart_worker.register_agent('lkhost', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT count(restart_worker.register_service('lk' || i, 'lkhost', '0'))
	FROM generate_series(1, 2000) i;

-- The quiet table: 200 requests that ended, and statistics taken then.
INSERT INTO service_restart_requests (service_name, status, requested_by_role, requested_at,
									  deadline_at, completed_at)
	SELECT 'lk' || i, 'completed', 'postgres', now() - interval '1 day',
		   now() - interval '23 hours', now() - interval '1 day'
	FROM generate_series(1, 200) i;
ANALYZE service_restart_requests;

-- The burst: 2,000 requests dispatching (ids fixed for the calls below).
INSERT INTO service_restart_requests (id, service_name, status, requested_by_role, attempts,
									  requested_at, deadline_at)
	SELECT ('00000000-0000-4000-9000-' || lpad(i::text, 12, '0'))::uuid, 'lk' || i,
		   'dispatching', 'postgres', 1, now(), now() + interval '1 hour'
	FROM generate_series(1, 2000) i;

-- Index entries read so far on the table, per index, as the statistics system has them.
CREATE FUNCTION pg_temp.reads() RETURNS TABLE (index_name name, entries bigint)
LANGUAGE sql AS $$
	SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes
	WHERE relname = 'service_restart_requests'
$$;
CREATE TEMP TABLE before_calls AS SELECT * FROM pg_temp.reads();
SELECT pg_stat_force_next_flush();
TRUNCATE before_calls;
INSERT INTO before_calls SELECT * FROM pg_temp.reads();

-- One answer recorded alone (a job object), three together, one failed call.
SELECT restart_worker.worker_record_job('00000000-0000-4000-9000-000000000001', 'running',
										now(), NULL, NULL, '', NULL, 60000, NULL, true);
SELECT * FROM restart_worker.worker_record_jobs(
	ARRAY['00000000-0000-4000-9000-000000000002', '00000000-0000-4000-9000-000000000003',
		  '00000000-0000-4000-9000-000000000004']::uuid[],
	ARRAY['completed', 'running', 'failed'],
	ARRAY[now(), now(), now()], ARRAY[now(), NULL, now()], ARRAY[0, NULL, 1],
	ARRAY['', '', ''], ARRAY[NULL, NULL, 'step 1 exited with code 1'],
	ARRAY[NULL, NULL, NULL]::timestamptz[], ARRAY[true, false, true], 60000)
ORDER BY n;
SELECT action FROM restart_worker.worker_record('00000000-0000-4000-9000-000000000005',
	'connect', NULL, NULL, false, false, 5, 20, 200, 60000, NULL);
SELECT pg_stat_force_next_flush();

-- What the five look-ups read: a few entries of the primary key, none of the partial
-- indexes of the active requests (without the fix: 2,000 per look-up).
SELECT r.index_name, r.entries - b.entries BETWEEN 1 AND 20 AS read_a_few,
	   r.entries - b.entries = 0 AS read_none
	FROM pg_temp.reads() r JOIN before_calls b USING (index_name)
	WHERE r.index_name IN ('service_restart_requests_pkey', 'service_restart_requests_due',
						   'service_restart_requests_deadline')
	ORDER BY 1;
SELECT service_name, status FROM service_restart_requests
	WHERE service_name IN ('lk1', 'lk2', 'lk3', 'lk4', 'lk5') ORDER BY 1, 2;

-- A running request counts an attempt at every call that follows its job, without limit:
-- the backoff's exponent is capped, so a failed call after thousands of them is retried
-- (2 to the 1024th would overflow), within retry_max.
UPDATE service_restart_requests SET status = 'running', dispatched_at = now(), attempts = 5000
	WHERE id = '00000000-0000-4000-9000-000000000006';
SELECT action, next_at - now() BETWEEN interval '0' AND interval '200 ms' AS within_retry_max
	FROM restart_worker.worker_record('00000000-0000-4000-9000-000000000006',
		'connect', NULL, NULL, false, true, 5, 20, 200, 60000, NULL);
SELECT status, attempts FROM service_restart_requests
	WHERE id = '00000000-0000-4000-9000-000000000006';

DELETE FROM service_restart_requests WHERE service_name LIKE 'lk%';
DELETE FROM restart_worker.services WHERE name LIKE 'lk%';
DELETE FROM restart_worker.agents WHERE name = 'lkhost';
ALTER TABLE service_restart_requests RESET (autovacuum_enabled);
