-- worker_record_jobs(): the worker records the job objects of many answers with one call,
-- each as worker_record_job() records one, and learns what to do next for each.
\set VERBOSITY terse
SELECT restart_worker.register_agent('rjhost', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT count(restart_worker.register_service(s, 'rjhost', '0'))
	FROM unnest(ARRAY['rj1', 'rj2', 'rj3', 'rj4', 'rj5']) s;

-- Requests as the worker's claims leave them (ids fixed for the output): dispatching, or
-- running (a job the agent accepted earlier); one still pending; one past its deadline.
INSERT INTO service_restart_requests (id, service_name, status, requested_by_role, attempts,
									  requested_at, deadline_at, dispatched_at)
VALUES ('00000000-0000-4000-8000-000000000001', 'rj1', 'dispatching', 'postgres', 1, now(), now() + interval '1 hour', NULL),
	   ('00000000-0000-4000-8000-000000000002', 'rj2', 'dispatching', 'postgres', 1, now(), now() + interval '1 hour', NULL),
	   ('00000000-0000-4000-8000-000000000003', 'rj3', 'running', 'postgres', 1, now(), now() + interval '1 hour', now()),
	   ('00000000-0000-4000-8000-000000000004', 'rj4', 'pending', 'postgres', 0, now(), now() + interval '1 hour', NULL),
	   ('00000000-0000-4000-8000-000000000005', 'rj5', 'dispatching', 'postgres', 1,
		now() - interval '2 hours', now() - interval '1 hour', NULL);

-- 1: its 202 said running and its long-poll completed (recorded together, running
-- announced first); 2: a 202 of a job that runs; 3: a job that failed; 4: not the
-- worker's (pending), left out; 5: runs past its deadline, so it fails.
SELECT * FROM restart_worker.worker_record_jobs(
	ARRAY['00000000-0000-4000-8000-000000000001', '00000000-0000-4000-8000-000000000002',
		  '00000000-0000-4000-8000-000000000003', '00000000-0000-4000-8000-000000000004',
		  '00000000-0000-4000-8000-000000000005']::uuid[],
	ARRAY['completed', 'running', 'failed', 'completed', 'running'],
	ARRAY['2026-11-26 12:00:00.1+00', '2026-11-26 12:00:01+00', '2026-11-26 12:00:02+00',
		  NULL, '2026-11-26 12:00:04+00']::timestamptz[],
	ARRAY['2026-11-26 12:00:00.2+00', NULL, '2026-11-26 12:00:03+00', NULL, NULL]::timestamptz[],
	ARRAY[0, NULL, 3, 0, NULL]::integer[],
	ARRAY[E'==> step 1: /bin/true\n', NULL, 'partial output', 'x', NULL],
	ARRAY[NULL, NULL, 'step 1 exited with code 3', NULL, NULL],
	ARRAY['2026-11-26 12:00:00.05+00', NULL, NULL, NULL, NULL]::timestamptz[],
	ARRAY[true, false, false, false, false],
	60000)
ORDER BY n;

SELECT service_name, status, exit_code, output, error,
	   dispatched_at IS NOT NULL AS dispatched, started_at, completed_at IS NOT NULL AS ended,
	   CASE WHEN service_name <> 'rj5' THEN completed_at END AS completed_at,
	   next_attempt_at > now() AS leased
	FROM service_restart_requests WHERE service_name LIKE 'rj_' ORDER BY service_name;
SELECT dispatched_at FROM service_restart_requests WHERE service_name = 'rj1';

-- Requests that ended are no longer the worker's: a second call leaves them alone.
SELECT * FROM restart_worker.worker_record_jobs(
	ARRAY['00000000-0000-4000-8000-000000000001']::uuid[], ARRAY['failed'],
	ARRAY[NULL]::timestamptz[], ARRAY[NULL]::timestamptz[], ARRAY[1], ARRAY['late'],
	ARRAY['late'], ARRAY[NULL]::timestamptz[], ARRAY[false], 60000);
SELECT status, exit_code FROM service_restart_requests WHERE service_name = 'rj1';

-- No jobs: nothing to do.
SELECT count(*) FROM restart_worker.worker_record_jobs('{}', '{}', '{}', '{}', '{}', '{}', '{}',
													   '{}', '{}', 60000);

-- Only the worker's role (an admin) may call it, not a role that may merely look into the
-- schema.
CREATE ROLE rj_reader NOLOGIN;
GRANT USAGE ON SCHEMA restart_worker TO rj_reader;
SET ROLE rj_reader;
SELECT count(*) FROM restart_worker.worker_record_jobs('{}', '{}', '{}', '{}', '{}', '{}', '{}',
													   '{}', '{}', 60000);
RESET ROLE;
REVOKE USAGE ON SCHEMA restart_worker FROM rj_reader;
DROP ROLE rj_reader;

DELETE FROM service_restart_requests WHERE service_name LIKE 'rj_';
SELECT count(restart_worker.remove_service(s)) FROM unnest(ARRAY['rj1', 'rj2', 'rj3', 'rj4', 'rj5']) s;
SELECT restart_worker.remove_agent('rjhost');
