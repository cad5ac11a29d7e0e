-- Waking the background worker when a new request commits.

-- Statement trigger: arrange for the worker's latch to be set when (and only if) the
-- inserting transaction commits, so a request is dispatched within milliseconds.
CREATE FUNCTION restart_worker.wake_worker_at_commit()
RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'restart_worker_wake_worker_at_commit';

CREATE TRIGGER wake_worker_at_commit
	AFTER INSERT ON public.service_restart_requests
	FOR EACH STATEMENT
	EXECUTE FUNCTION restart_worker.wake_worker_at_commit();

-- How many times committing transactions have woken the worker since the server started.
CREATE FUNCTION restart_worker.commit_wakeups()
RETURNS bigint
LANGUAGE c VOLATILE STRICT
AS 'MODULE_PATHNAME', 'restart_worker_commit_wakeups';
