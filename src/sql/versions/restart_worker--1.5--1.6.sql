-- restart_worker 1.5 -> 1.6.
--
-- 1.6 lets the worker's claims commit asynchronously: waiting for a claim's commit to reach
-- the disk was most of a request's way from its COMMIT to its agent. A claim lost in a
-- crash leaves its request pending although its call may have reached the agent; so
-- worker_settle() is new (the worker makes such requests dispatching again before it
-- claims anything after a start), worker_unsettled_before() is new (until then cancel()
-- refuses them), cancel() asks it, and worker_claim() commits synchronously when it ends
-- requests past their deadline. The tables and their rows are unchanged. The definitions
-- below are those of src/sql/30_admin.sql and src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.6'" to load this file. \quit

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
		-- Claims commit asynchronously (src/settle.c); an end the agent's journal does not
		-- hold must not be lost in a crash, or the request could come back and run after
		-- it was announced failed: a claim that failed a request commits synchronously.
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
		IF FOUND THEN
			PERFORM pg_catalog.set_config('synchronous_commit', 'on', true);
		END IF;
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

-- Before its first claim in the life of the server the worker (src/settle.c) takes every
-- request still pending that was due before its first start (p_before) for one that may
-- have reached its agent: a claim commits asynchronously, and one lost in a crash (or not
-- yet received by a standby that was then promoted) left its request pending. Such a
-- request becomes dispatching: it is sent again with the same id (the agent answers with
-- the job it has, if any), holds its service's cooldown and can no longer be cancelled.
-- Each is announced (the claim's pending -> dispatching is not, see worker_announce()).
-- Returns how many. The worker commits this synchronously. SECURITY DEFINER: with a role
-- that row level security kept from seeing some requests, it would settle those as none.
CREATE FUNCTION restart_worker.worker_settle(p_before timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
	v_ids		uuid[];
BEGIN
	WITH settled AS (
		UPDATE public.service_restart_requests q
			SET status = 'dispatching', uncertain_at = coalesce(q.uncertain_at, pg_catalog.now()),
				updated_at = pg_catalog.now()
			WHERE q.status = 'pending' AND q.next_attempt_at <= p_before
			RETURNING q.id)
	SELECT pg_catalog.array_agg(settled.id) INTO v_ids FROM settled;
	IF v_ids IS NULL THEN
		RETURN 0;
	END IF;
	PERFORM restart_worker.worker_announce(v_ids);
	RETURN pg_catalog.cardinality(v_ids);
END;
$$;

-- The time before which a pending request of this database may have reached its agent
-- through a claim lost in a crash, while the worker has not yet settled those requests
-- (worker_settle()) in the life of the server: when the first worker started plus
-- restart_worker.settle_margin, or infinity if none has yet. NULL once it has settled, in
-- a database other than the worker's, and without the library in shared_preload_libraries
-- (there is no worker).
CREATE FUNCTION restart_worker.worker_unsettled_before()
RETURNS timestamptz
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'restart_worker_worker_unsettled_before';

-- Cancel a request that has not reached its agent yet. Shared by the admin and the user
-- variant; p_only_by restricts it to the requests of one user.
CREATE OR REPLACE FUNCTION restart_worker.cancel(p_id uuid, p_only_by uuid, p_who text)
RETURNS public.service_restart_requests
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
	v_row		public.service_restart_requests;
BEGIN
	PERFORM restart_worker.require(p_id, 'request id');
	SELECT * INTO v_row FROM public.service_restart_requests
		WHERE id = p_id AND (p_only_by IS NULL OR requested_by = p_only_by)
		FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown request %', p_id USING ERRCODE = 'invalid_parameter_value';
	ELSIF v_row.status <> 'pending' THEN
		RAISE EXCEPTION 'request % is %; only a pending request can be cancelled', p_id, v_row.status
			USING ERRCODE = 'object_not_in_prerequisite_state';
	ELSIF v_row.next_attempt_at <= restart_worker.worker_unsettled_before() THEN
		-- A claim lost in a crash leaves its request pending (worker_settle()).
		RAISE EXCEPTION 'request % cannot be cancelled yet: it may have reached its agent before the server restarted', p_id
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  DETAIL = 'The background worker has not yet checked the requests left pending from before the server started.',
				  HINT = 'The worker does so as soon as it runs; a request that may have reached its agent cannot be cancelled.';
	END IF;
	UPDATE public.service_restart_requests
		SET status = 'cancelled', completed_at = now(), updated_at = now(),
			error = 'cancelled by ' || p_who
		WHERE id = p_id
		RETURNING * INTO v_row;
	RETURN v_row;
END;
$$;

-- The privileges of the new functions, as 90_privileges.sql gives every function of the
-- schema: none for PUBLIC or anyone else a default privilege may have granted them,
-- EXECUTE for whoever may execute worker_claim() (the roles given
-- restart_worker.grant_admin()). pg_dump leaves such a grant out (it takes it for part of
-- the extension): after restoring a dump of a database updated to 1.6, run grant_admin()
-- again (README).
DO $$
DECLARE
	v_function	pg_catalog.regprocedure;
	v_grantee	pg_catalog.text;
BEGIN
	FOREACH v_function IN ARRAY ARRAY['restart_worker.worker_settle(timestamptz)',
									  'restart_worker.worker_unsettled_before()']::pg_catalog.regprocedure[]
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
