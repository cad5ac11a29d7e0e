-- restart_worker 1.4 -> 1.5.
--
-- 1.5 fails a pending request at its deadline also while every call slot of the worker
-- is busy. The worker claims nothing then, and the requests past their deadline were
-- failed by a claim only, so that a request waiting for a slot stayed pending past its
-- deadline until a slot was free. worker_fail_late() fails them and says when the next
-- pending request reaches its deadline; the worker runs it then (src/deadline.c). The
-- failing itself moves from worker_claim() to fail_late(), which both run. The tables,
-- their rows and the signatures, results and privileges of the existing functions are
-- unchanged. The definitions below are those of src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.5'" to load this file. \quit

-- Fail the active requests past their deadline that the worker does not have in flight
-- (p_exclude: a call in flight ends within the deadline, its timeout and a long-poll's
-- wait see to that, and the worker fails the request then), with the error
-- timeout_error() gives for their status. Rows locked by someone else are skipped, never
-- waited for. Returns how many it failed. worker_claim() runs it before every claim.
CREATE FUNCTION restart_worker.fail_late(p_exclude uuid[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
	v_failed	integer := 0;
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
		GET DIAGNOSTICS v_failed = ROW_COUNT;
	END IF;
	RETURN v_failed;
END;
$$;

-- While every call slot is busy the worker claims nothing, so that the requests waiting
-- for a slot would not end at their deadline: it runs this instead (src/deadline.c),
-- when the earliest of them reaches its deadline. Fails the requests past their deadline
-- that the worker does not have in flight (fail_late()) and returns how many (failed),
-- and when the next pending request reaches its deadline (next_deadline, NULL if none is
-- pending; what the worker has in flight is never pending).
CREATE FUNCTION restart_worker.worker_fail_late(p_exclude uuid[],
	OUT failed integer, OUT next_deadline timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
	failed := restart_worker.fail_late(p_exclude);
	SELECT q.deadline_at INTO next_deadline FROM public.service_restart_requests q
		WHERE q.status IN ('pending', 'dispatching', 'running') AND q.status = 'pending'
		ORDER BY q.deadline_at
		LIMIT 1;
END;
$$;

-- Claim up to p_limit due requests for the worker, except those it has in flight
-- (p_exclude): pending ones become dispatching, dispatching ones due for another attempt
-- and running ones due again (a call following the job failed, or their lease expired)
-- are taken again; each counts one attempt more. After a restart (p_recover) every
-- dispatching or running request is taken over at once: it is driven on with the same
-- id, and the agent answers with the existing job. Requests past their deadline fail
-- first (fail_late()). Rows locked by someone else are skipped, never waited for.
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
	PERFORM restart_worker.fail_late(p_exclude);

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

-- The privileges of the new functions, as 90_privileges.sql gives every function of the
-- schema: none for PUBLIC or anyone else a default privilege may have granted them,
-- EXECUTE for whoever may execute worker_claim() (the roles given
-- restart_worker.grant_admin()).
DO $$
DECLARE
	v_function	pg_catalog.regprocedure;
	v_grantee	pg_catalog.text;
BEGIN
	FOREACH v_function IN ARRAY ARRAY['restart_worker.fail_late(uuid[])',
									  'restart_worker.worker_fail_late(uuid[])']::pg_catalog.regprocedure[]
	LOOP
		EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function);
		FOR v_grantee IN
			SELECT a.grantee::pg_catalog.regrole::pg_catalog.text
			FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
			WHERE p.oid = v_function AND a.grantee <> p.proowner AND a.grantee <> 0
		LOOP
			EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %s', v_function, v_grantee);
		END LOOP;
		FOR v_grantee IN
			SELECT a.grantee::pg_catalog.regrole::pg_catalog.text
			FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
			WHERE p.oid = 'restart_worker.worker_claim(integer, uuid[], integer, boolean)'::pg_catalog.regprocedure
			  AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
		LOOP
			EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s', v_function, v_grantee);
		END LOOP;
	END LOOP;
END;
$$;
