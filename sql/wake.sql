-- The insert path wakes the worker when, and only when, the inserting transaction commits.
\set VERBOSITY terse
SELECT restart_worker.commit_wakeups() IS NOT NULL AS preloaded;
SELECT restart_worker.commit_wakeups() AS base \gset

-- A rolled back request wakes nobody.
BEGIN;
SELECT status FROM request_service_restart('api');
ROLLBACK;
SELECT restart_worker.commit_wakeups() - :base AS after_rollback;

-- Nothing happens before COMMIT; one wake-up at COMMIT.
BEGIN;
SELECT status FROM request_service_restart('api');
SELECT restart_worker.commit_wakeups() - :base AS before_commit;
COMMIT;
SELECT restart_worker.commit_wakeups() - :base AS after_commit;

-- A failed request (the service is busy) wakes nobody.
SELECT outcome($$SELECT request_service_restart('api')$$);
SELECT restart_worker.commit_wakeups() - :base AS after_refusal;

-- Updating requests does not wake the worker.
UPDATE service_restart_requests SET status = 'completed' WHERE service_name = 'api';
SELECT restart_worker.commit_wakeups() - :base AS after_update;

-- One statement inserting several rows wakes once.
INSERT INTO service_restart_requests (service_name, requested_by_role, deadline_at)
	VALUES ('api', 'postgres', now() + interval '1 minute'),
		   ('nocool', 'postgres', now() + interval '1 minute');
SELECT restart_worker.commit_wakeups() - :base AS after_multi_insert;

-- The trigger function is only for the trigger.
SELECT outcome($$SELECT restart_worker.wake_worker_at_commit()$$);
