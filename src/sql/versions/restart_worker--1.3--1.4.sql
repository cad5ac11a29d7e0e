-- restart_worker 1.3 -> 1.4.
--
-- 1.4 changes how the worker claims due requests (worker_claim()). The plan the worker kept
-- for it after its first calls looked for the due requests without a range on their index
-- (the restart's case was part of the condition), so every claim read every active
-- request: with 2,500 active, a claim of one took 0.24 ms in the function instead of
-- 0.08 ms. The rows it claimed (or failed past their deadline) were updated through a join
-- that the planner could run as a scan of the whole table, in a session with the default
-- settings. Its plans are now made once for any arguments, read the due requests up to a
-- time, and update the rows through the primary key. It also counts an attempt for a
-- running job taken again after a failed call, so that the delay before the next call
-- grows (it stayed at restart_worker.retry_base until the deadline). The tables, their rows and the
-- function's signature, results and privileges are unchanged. The definition below is
-- that of src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.4'" to load this file. \quit

-- Claim up to p_limit due requests for the worker, except those it has in flight
-- (p_exclude): pending ones become dispatching, dispatching ones due for another attempt
-- and running ones due again (a call following the job failed, or their lease expired)
-- are taken again; each counts one attempt more. After a
-- restart (p_recover) every dispatching or running request is taken over at once: it is
-- driven on with the same id, and the agent answers with the existing job. Requests past
-- their deadline fail. Rows locked by someone else are skipped, never waited for.
-- maybe_sent says whether an earlier call may have reached the agent (the row was not
-- pending). The worker keeps what it has in flight in memory; the lease only matters if
-- it forgets a request.
--
-- Its plans are made once (plan_cache_mode), as a plan for any arguments: planning at
-- every call costs more than a claim of a few requests, and a plan kept by default after
-- a few calls must not depend on them either. So the due requests are read through their
-- partial index up to a time (now, or after a restart the end of time; with the restart's
-- case OR-ed into the condition, as before 1.4, the kept plan had no range on that index and
-- read every active request), and the rows claimed or failed are updated through the
-- primary key, by their ids as an array (joined to the rows found, the planner may scan the
-- whole table for a few rows in a session that allows it; the worker's does not, see
-- src/worker.c).
CREATE OR REPLACE FUNCTION restart_worker.worker_claim(
	p_limit integer, p_exclude uuid[], p_lease_ms integer, p_recover boolean)
RETURNS TABLE (id uuid, url text, key bytea, body text, deadline_at timestamptz,
			   maybe_sent boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
	v_until		timestamptz := CASE WHEN p_recover THEN 'infinity' ELSE pg_catalog.now() END;
BEGIN
	-- Requests past their deadline are rare: look for one before running the update.
	IF EXISTS (SELECT FROM public.service_restart_requests q
			   WHERE q.status IN ('pending', 'dispatching', 'running')
				 AND q.deadline_at <= pg_catalog.now()) THEN
		WITH late AS (
			SELECT q.id FROM public.service_restart_requests q
			WHERE q.status IN ('pending', 'dispatching', 'running')
			  AND q.deadline_at <= pg_catalog.now()
			  AND NOT (q.id = ANY (p_exclude))
			FOR UPDATE SKIP LOCKED)
		UPDATE public.service_restart_requests r
			SET status = 'failed', completed_at = pg_catalog.now(), updated_at = pg_catalog.now(),
				error = restart_worker.timeout_error(r.status, r.error),
				-- A dispatching row may have reached its agent: it holds the cooldown.
				uncertain_at = CASE WHEN r.status = 'dispatching'
									THEN coalesce(r.uncertain_at, pg_catalog.now())
									ELSE r.uncertain_at END
			WHERE r.id = ANY (ARRAY(SELECT late.id FROM late));
	END IF;

	RETURN QUERY
	WITH due AS (
		SELECT q.id, q.status AS old_status FROM public.service_restart_requests q
		WHERE q.status IN ('pending', 'dispatching', 'running')
		  AND q.next_attempt_at <= v_until
		  -- pending ones once due, also after a restart
		  AND (q.status <> 'pending' OR q.next_attempt_at <= pg_catalog.now())
		  -- what the worker has in flight is never pending
		  AND (q.status = 'pending' OR NOT (q.id = ANY (p_exclude)))
		ORDER BY q.next_attempt_at
		LIMIT p_limit
		FOR UPDATE SKIP LOCKED),
	claimed AS (
		UPDATE public.service_restart_requests q
			SET status = CASE WHEN q.status = 'pending' THEN 'dispatching' ELSE q.status END,
				-- every call made again counts, also one following a running job after
				-- a failure, so that the delay before the next grows (worker_record())
				attempts = q.attempts + 1,
				next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_ms / 1000.0),
				updated_at = pg_catalog.now()
			WHERE q.id = ANY (ARRAY(SELECT due.id FROM due))
			RETURNING q.*)
	SELECT c.id, a.url, pg_catalog.decode(pg_catalog.substr(a.secret, 7), 'base64'),
		   restart_worker.call_body(c::public.service_restart_requests), c.deadline_at,
		   d.old_status <> 'pending'
	FROM claimed c
	JOIN due d ON d.id = c.id
	LEFT JOIN restart_worker.services s ON s.name = c.service_name
	LEFT JOIN restart_worker.agents a ON a.name = s.agent;
END;
$$;
